//! The SYN-ACK tunnel (TC egress, clsact): the first response packet of each TCP connection
//! to an anycast address — the SYN-ACK, SYN and ACK set, from one of the addresses in
//! `SERVED` — goes back through the agent, IP-in-IP, instead of straight to the
//! client. The agent counts it for this server and forwards the inner packet, so it can tell
//! a server that answers new connections from one that has stopped. Every other packet
//! (the rest of the connection included) leaves untouched, straight to the client.
//!
//! Outer source: the server's real address (`REVERSE_CONFIG`), outer destination: the
//! agent. The FIB is asked for the route to the agent (not the client's), and the packet is
//! redirected to that egress with `bpf_redirect`, or with `bpf_redirect_neigh` when the
//! next hop's MAC is not known yet. The lookup is made as for a packet entering on `lo`
//! (as the kernel's own output routing does), so the controller enables forwarding on `lo`
//! (the helper refuses lookups for interfaces without it); no other interface forwards.
use anycast_common::{
    maps as names, syn_ack_tunnel as counter, AddressKey, SynAckTunnelConfig, ETH_LEN, ETH_P_IPV4,
    ETH_P_IPV6, FAMILY_V4, FAMILY_V6, IPV4_LEN, IPV4_OFFSET_MASK, IPV6_LEN, PROTO_IPIP, PROTO_IPV6,
    PROTO_TCP, TCP_ACK, TCP_FIN, TCP_FLAGS_OFF, TCP_RST, TCP_SYN,
};
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::error;

use super::decap::SERVED;
use crate::packet::{ipv4_tunnel_header, ipv6_tunnel_header_start, read_be16, Ipv4, Ipv6};

/// Where SYN-ACKs go. (The map's name predates the program's; userspace and operators see
/// it.)
#[map]
static REVERSE_CONFIG: Array<SynAckTunnelConfig> = Array::with_max_entries(1, 0);
map_name!(REVERSE_CONFIG, names::REVERSE_CONFIG);
/// What the program did, by [`counter`].
#[map]
static REVERSE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);
map_name!(REVERSE_STATS, names::REVERSE_STATS);

/// `lo`: the FIB lookup is made as for a locally sent packet.
const LOOPBACK_IFINDEX: u32 = 1;

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
    let outer_len: u16 = match config.family {
        FAMILY_V4 => IPV4_LEN as u16,
        FAMILY_V6 => IPV6_LEN as u16,
        _ => return (TC_ACT_OK, counter::PASS_DISABLED),
    };
    // The whole tunnel packet.
    let outer_total = syn_ack.inner_len + outer_len;

    // The route to the agent, before anything changes.
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = config.family;
    fib.l4_protocol = syn_ack.inner_proto;
    fib.__bindgen_anon_1.tot_len = outer_total;
    fib.ifindex = LOOPBACK_IFINDEX;
    if config.family == FAMILY_V4 {
        fib.__bindgen_anon_3.ipv4_src = config.source[0];
        fib.__bindgen_anon_4.ipv4_dst = config.agent[0];
    } else {
        fib.__bindgen_anon_3.ipv6_src = config.source;
        fib.__bindgen_anon_4.ipv6_dst = config.agent;
    }
    // SAFETY: fib is a valid, fully sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    let resolved = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH if fib.ifindex != LOOPBACK_IFINDEX => false,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return (TC_ACT_OK, counter::PASS_TOO_BIG),
        _ => return (TC_ACT_OK, counter::PASS_NO_ROUTE),
    };

    // Room for the outer header between the Ethernet header and the IP packet; the kernel
    // records the encapsulation (inner headers, GSO type) and the outer protocol.
    let encap = if config.family == FAMILY_V4 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } as u64;
    if ctx
        .skb
        .adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, encap)
        .is_err()
    {
        return (TC_ACT_OK, counter::PASS_ENCAP_FAILED);
    }
    let written = if config.family == FAMILY_V4 {
        let h = ipv4_tunnel_header(
            syn_ack.tos,
            outer_total,
            syn_ack.inner_proto,
            config.source[0],
            config.agent[0],
        );
        ctx.skb.store(l3, &h, 0).is_ok() && ctx.skb.store(12, &ETH_P_IPV4.to_be_bytes(), 0).is_ok()
    } else {
        let [w0, w1] =
            ipv6_tunnel_header_start(syn_ack.tos, 0, syn_ack.inner_len, syn_ack.inner_proto);
        let (s, a) = (config.source, config.agent);
        let h = [w0, w1, s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3]];
        ctx.skb.store(l3, &h, 0).is_ok() && ctx.skb.store(12, &ETH_P_IPV6.to_be_bytes(), 0).is_ok()
    };
    // Half rewritten: never let it out. The client retransmits its SYN.
    if !written {
        return (TC_ACT_SHOT, counter::DROP_WRITE_FAILED);
    }
    if resolved {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        if ctx.skb.store(0, &macs, 0).is_err() {
            return (TC_ACT_SHOT, counter::DROP_WRITE_FAILED);
        }
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
        (action, counter::TUNNELLED)
    } else {
        // The kernel routes the outer packet itself and resolves the neighbour.
        // SAFETY: no parameters: the helper looks the route up from the packet.
        let action = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
        (action, counter::TUNNELLED_RESOLVING)
    }
}
