//! The SYN-ACK tunnel (TC egress, clsact): the first response packet of each TCP connection
//! to an anycast address — the SYN-ACK, SYN and ACK set, from one of the addresses in
//! `SERVED` — goes back through the agent, IP-in-IP, instead of straight to the
//! client. The agent counts it for this server and forwards the inner packet, so it can tell
//! a server that answers new connections from one that has stopped. Every other packet
//! (the rest of the connection included) leaves untouched, straight to the client.
//!
//! Outer source: the server's real address (`REVERSE_CONFIG`), outer destination: the
//! agent. The FIB is asked for the route to the agent (not the client's), and the packet is
//! redirected to that egress (`crate::tc_tunnel`, which the client's tunnel shares); no
//! interface but `lo` forwards.
use anycast_common::{
    maps as names, syn_ack_tunnel as counter, AddressKey, SynAckTunnelConfig, ETH_LEN, ETH_P_IPV4,
    ETH_P_IPV6, FAMILY_V4, FAMILY_V6, IPV4_LEN, IPV4_OFFSET_MASK, IPV6_LEN, PROTO_IPIP, PROTO_IPV6,
    PROTO_TCP, TCP_ACK, TCP_FIN, TCP_FLAGS_OFF, TCP_RST, TCP_SYN,
};
use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::error;

use super::decap::SERVED;
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

/// Where SYN-ACKs go. (The map's name predates the program's; userspace and operators see
/// it.)
#[map]
static REVERSE_CONFIG: Array<SynAckTunnelConfig> = Array::with_max_entries(1, 0);
map_name!(REVERSE_CONFIG, names::REVERSE_CONFIG);
/// What the program did, by [`counter`].
#[map]
static REVERSE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
map_name!(REVERSE_STATS, names::REVERSE_STATS);

/// The SYN-ACK tunnel. (Its name in the object, `anycast_reverse`, predates this one: `tc
/// filter show` lists it.)
#[classifier]
pub fn anycast_reverse(ctx: TcContext) -> i32 {
    let (action, reason) = tunnel(&ctx);
    // Not expected on a working host (the kernel refused to grow or rewrite the packet), so
    // logged; at most once per connection. The counters record it too.
    if reason == counter::PASS_ENCAP_FAILED || reason == counter::DROP_WRITE_FAILED {
        let what = if reason == counter::DROP_WRITE_FAILED {
            "outer header not written after growing the packet: dropped"
        } else {
            "bpf_skb_adjust_room failed: sent untouched"
        };
        error!(&ctx, "SYN-ACK tunnel: {}", what);
    }
    if let Some(c) = REVERSE_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    action
}

/// What a SYN-ACK needs to be tunnelled.
struct SynAck {
    /// 4 (IPv4 inside) or 41 (IPv6 inside).
    inner_proto: u8,
    inner_len: u16,
    tos: u8,
}

#[inline(always)]
fn tunnel(ctx: &TcContext) -> (i32, u32) {
    const OTHER: (i32, u32) = (TC_ACT_OK, counter::PASS_OTHER);
    // Frames leave without an 802.1Q tag here: the Ethernet header alone.
    let Some(ether_type) = read_be16(ctx, 12) else {
        return OTHER;
    };
    let l3 = ETH_LEN;
    let mut source = AddressKey::default();
    let (l4, syn_ack) = match ether_type {
        ETH_P_IPV4 => {
            let Some(h) = Ipv4::at(ctx, l3) else {
                return OTHER;
            };
            let ihl = h.header_len();
            if h.version() != 4 || ihl < IPV4_LEN || h.proto() != PROTO_TCP {
                return OTHER;
            }
            // A fragment's later pieces carry no TCP header.
            if h.frag_off() & IPV4_OFFSET_MASK != 0 {
                return OTHER;
            }
            source.family = FAMILY_V4;
            source.addr[0] = h.src();
            let s = SynAck {
                inner_proto: PROTO_IPIP,
                inner_len: h.total_len(),
                tos: h.tos(),
            };
            (l3 + ihl, s)
        }
        ETH_P_IPV6 => {
            let Some(h) = Ipv6::at(ctx, l3) else {
                return OTHER;
            };
            if h.version() != 6 || h.next_header() != PROTO_TCP {
                return OTHER;
            }
            source.family = FAMILY_V6;
            source.addr = h.src();
            let s = SynAck {
                inner_proto: PROTO_IPV6,
                inner_len: IPV6_LEN as u16 + h.payload_len(),
                tos: h.traffic_class(),
            };
            (l3 + IPV6_LEN, s)
        }
        _ => return OTHER,
    };
    // At a variable offset (IPv4 options): bpf_skb_load_bytes, which also reaches past the
    // linear part, rather than a direct read whose bound the verifier cannot follow here.
    let Ok(flags) = ctx.load::<u8>(l4 + TCP_FLAGS_OFF) else {
        return OTHER;
    };
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN | TCP_ACK {
        return OTHER;
    }
    if SERVED.get_ptr(&source).is_none() {
        return (TC_ACT_OK, counter::PASS_NOT_SERVED);
    }
    let Some(config) = REVERSE_CONFIG.get(0) else {
        return (TC_ACT_OK, counter::PASS_DISABLED);
    };
    let config = *config;
    if config.family != FAMILY_V4 && config.family != FAMILY_V6 {
        return (TC_ACT_OK, counter::PASS_DISABLED);
    }
    let t = Tunnel {
        family: config.family,
        source: config.source,
        dest: config.agent,
        inner_proto: syn_ack.inner_proto,
        inner_len: syn_ack.inner_len,
        tos: syn_ack.tos,
    };
    encapsulate_and_redirect(ctx, &t).verdict(&OUTCOMES)
}
