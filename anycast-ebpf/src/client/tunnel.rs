//! The client's tunnel (TC egress, clsact): a TCP or UDP packet to a service the client
//! holds a binding for (`CLIENT_BINDINGS`, written by the client daemon after it checked
//! the server's signed binding) is IP-in-IP encapsulated to the server's real address, the
//! inner packet untouched (its destination stays the anycast address, which the server's
//! decapsulator serves), and redirected to the egress the FIB chose for the real address
//! (`crate::tc_tunnel`). Everything else, and a bound packet that cannot be tunnelled (no
//! route, too big, no room), leaves untouched: through the agent, as without a binding.
//!
//! The service is looked up as the agent looks services up: (address, protocol, port),
//! then (address, protocol, any port), then the whole address (protocol 0, any port).
//!
//! A binding moves only the connections it covers (`CLIENT_FLOWS`, 5-tuple -> the
//! binding's generation): a TCP connection whose SYN leaves while the binding is held (it
//! is recorded then), a UDP flow first seen while it is held, and the connections the
//! server named (written by the daemon). Any other packet to the service belongs to a
//! connection the agent may have given to another server: it stays on the agent's path
//! (`pass_opened_before`), or it would reach a server that never heard of it and be reset.
use anycast_common::{
    client_tunnel as counter, maps as names, ClientBinding, FlowKey, ServiceKey, ANY_PORT, ETH_LEN,
    ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, FAMILY_V6, IPV4_LEN, IPV6_LEN, MAX_CLIENT_BINDINGS,
    MAX_CLIENT_FLOWS, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FLAGS_OFF,
    TCP_SYN,
};
use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};

use crate::packet::{read_be16, Ipv4, Ipv6};
use crate::tc_tunnel::{encapsulate_and_redirect, OutcomeCounters, Tunnel};

/// The tunnel's outcomes in this program's counters.
const OUTCOMES: OutcomeCounters = OutcomeCounters {
    tunnelled: counter::TUNNELLED,
    tunnelled_resolving: counter::TUNNELLED_RESOLVING,
    no_route: counter::PASS_NO_ROUTE,
    too_big: counter::PASS_TOO_BIG,
    encap_failed: counter::PASS_ENCAP_FAILED,
    write_failed: counter::DROP_WRITE_FAILED,
};

/// The bindings the client took: service -> the server's real address.
#[map]
static CLIENT_BINDINGS: HashMap<ServiceKey, ClientBinding> =
    HashMap::with_max_entries(MAX_CLIENT_BINDINGS, 0);
map_name!(CLIENT_BINDINGS, names::CLIENT_BINDINGS);
/// The connections that go direct: 5-tuple (as sent) -> the generation of the binding
/// they go with.
#[map]
static CLIENT_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_CLIENT_FLOWS, 0);
map_name!(CLIENT_FLOWS, names::CLIENT_FLOWS);
/// What the program did, by [`counter`].
#[map]
static CLIENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
map_name!(CLIENT_STATS, names::CLIENT_STATS);

/// IPv4 flags and fragment offset: more fragments, and the offset.
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;

#[classifier]
pub fn anycast_client(ctx: TcContext) -> i32 {
    let (action, reason) = tunnel(&ctx);
    if let Some(c) = CLIENT_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    action
}

#[inline(always)]
fn lookup(mut key: ServiceKey) -> Option<ClientBinding> {
    // SAFETY: each value is copied out at once.
    unsafe {
        if let Some(b) = CLIENT_BINDINGS.get(&key) {
            return Some(*b);
        }
        key.port = ANY_PORT;
        if let Some(b) = CLIENT_BINDINGS.get(&key) {
            return Some(*b);
        }
        key.proto = 0;
        CLIENT_BINDINGS.get(&key).copied()
    }
}

#[inline(always)]
fn tunnel(ctx: &TcContext) -> (i32, u32) {
    const OTHER: (i32, u32) = (TC_ACT_OK, counter::PASS_OTHER);
    // Frames leave without an 802.1Q tag here: the Ethernet header alone.
    let Some(ether_type) = read_be16(ctx, 12) else {
        return OTHER;
    };
    let l3 = ETH_LEN;
    let mut key = ServiceKey::default();
    let mut flow = FlowKey::default();
    let (l4, inner_proto, inner_len, tos) = match ether_type {
        ETH_P_IPV4 => {
            let Some(h) = Ipv4::at(ctx, l3) else {
                return OTHER;
            };
            let ihl = h.header_len();
            if h.version() != 4 || ihl < IPV4_LEN {
                return OTHER;
            }
            // Only whole packets: a fragment's later pieces carry no ports, and all pieces
            // of a packet take one path.
            if h.frag_off() & IPV4_MF_AND_OFFSET != 0 {
                return OTHER;
            }
            key.family = FAMILY_V4;
            key.proto = h.proto();
            key.addr[0] = h.dst();
            flow.src[0] = h.src();
            (l3 + ihl, PROTO_IPIP, h.total_len(), h.tos())
        }
        ETH_P_IPV6 => {
            let Some(h) = Ipv6::at(ctx, l3) else {
                return OTHER;
            };
            if h.version() != 6 {
                return OTHER;
            }
            key.family = FAMILY_V6;
            key.proto = h.next_header();
            key.addr = h.dst();
            flow.src = h.src();
            let len = IPV6_LEN as u16 + h.payload_len();
            (l3 + IPV6_LEN, PROTO_IPV6, len, h.traffic_class())
        }
        _ => return OTHER,
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return OTHER;
    }
    // The ports, at a variable offset (IPv4 options): bpf_skb_load_bytes.
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
        return OTHER;
    };
    key.port = u16::from_be_bytes([ports[2], ports[3]]);
    let Some(binding) = lookup(key) else {
        return (TC_ACT_OK, counter::PASS_NOT_BOUND);
    };
    if binding.family != FAMILY_V4 && binding.family != FAMILY_V6 {
        return (TC_ACT_OK, counter::PASS_NOT_BOUND);
    }
    flow.dst = key.addr;
    flow.sport = u16::from_be_bytes([ports[0], ports[1]]);
    flow.dport = key.port;
    flow.proto = key.proto;
    flow.family = key.family;
    // SAFETY: the value is copied out at once.
    let known = unsafe { CLIENT_FLOWS.get(&flow).copied() };
    if known != Some(binding.generation) {
        // A new connection: a TCP SYN (not a SYN-ACK), or a UDP flow never seen (an entry
        // of another generation is a flow that began with another binding).
        let opens = if key.proto == PROTO_TCP {
            let Ok(flags) = ctx.load::<u8>(l4 + TCP_FLAGS_OFF) else {
                return OTHER;
            };
            flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        } else {
            known.is_none()
        };
        if !opens {
            return (TC_ACT_OK, counter::PASS_OPENED_BEFORE);
        }
        // A full map evicts its least recently used connection, which then goes back
        // through the agent: better than refusing new ones.
        let _ = CLIENT_FLOWS.insert(&flow, &binding.generation, 0);
    }
    let t = Tunnel {
        family: binding.family,
        source: binding.source,
        dest: binding.real,
        inner_proto,
        inner_len,
        tos,
    };
    encapsulate_and_redirect(ctx, &t).verdict(&OUTCOMES)
}
