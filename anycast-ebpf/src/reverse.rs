//! The server side of the reverse tunnel (TC egress, clsact): the first response packet of
//! each TCP connection to an anycast address — the SYN-ACK, SYN and ACK set, from one of the
//! addresses in `SERVED` — goes back through the agent, IP-in-IP, instead of straight to the
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
    reverse, AddressKey, ReverseConfig, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6, PROTO_TCP,
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

use crate::{decap::SERVED, packet::*};

#[map]
static REVERSE_CONFIG: Array<ReverseConfig> = Array::with_max_entries(1, 0);
#[map]
static REVERSE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reverse::COUNT, 0);

const TTL: u8 = 64;
/// `lo`: the FIB lookup is made as for a locally sent packet.
const LOOPBACK_IFINDEX: u32 = 1;

#[classifier]
pub fn anycast_reverse(ctx: TcContext) -> i32 {
    let (action, reason) = tunnel(&ctx);
    if let Some(c) = REVERSE_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    action
}

/// A bounds-checked copy of `T` at `off` in the linear part of the packet.
#[inline(always)]
fn read_tc<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above; packet data has no alignment guarantee.
    Some(unsafe { ((start + off) as *const T).read_unaligned() })
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
    const OTHER: (i32, u32) = (TC_ACT_OK, reverse::PASS_OTHER);
    let Some(ether_type) = read_tc::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes) else {
        return OTHER;
    };
    let l3 = ETH_LEN;
    let mut source = AddressKey::default();
    let (l4, syn_ack) = match ether_type {
        ETH_P_IPV4 => {
            let Some(h) = read_tc::<[u8; IPV4_LEN]>(ctx, l3) else {
                return OTHER;
            };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4 || ihl < IPV4_LEN || h[9] != PROTO_TCP {
                return OTHER;
            }
            // A fragment's later pieces carry no TCP header.
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return OTHER;
            }
            source.family = FAMILY_V4;
            source.addr[0] = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
            let s = SynAck {
                inner_proto: PROTO_IPIP,
                inner_len: u16::from_be_bytes([h[2], h[3]]),
                tos: h[1],
            };
            (l3 + ihl, s)
        }
        ETH_P_IPV6 => {
            let Some(h) = read_tc::<[u8; IPV6_LEN]>(ctx, l3) else {
                return OTHER;
            };
            if h[0] >> 4 != 6 || h[6] != PROTO_TCP {
                return OTHER;
            }
            source.family = FAMILY_V6;
            let mut i = 0;
            while i < 4 {
                let s = 8 + i * 4;
                source.addr[i] = u32::from_ne_bytes([h[s], h[s + 1], h[s + 2], h[s + 3]]);
                i += 1;
            }
            let s = SynAck {
                inner_proto: PROTO_IPV6,
                inner_len: IPV6_LEN as u16 + u16::from_be_bytes([h[4], h[5]]),
                tos: (h[0] << 4) | (h[1] >> 4),
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
        return (TC_ACT_OK, reverse::PASS_NOT_SERVED);
    }
    let Some(config) = REVERSE_CONFIG.get(0) else {
        return (TC_ACT_OK, reverse::PASS_DISABLED);
    };
    let config = *config;
    let outer_len: u16 = match config.family {
        FAMILY_V4 => IPV4_LEN as u16,
        FAMILY_V6 => IPV6_LEN as u16,
        _ => return (TC_ACT_OK, reverse::PASS_DISABLED),
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
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return (TC_ACT_OK, reverse::PASS_TOO_BIG),
        _ => return (TC_ACT_OK, reverse::PASS_NO_ROUTE),
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
        return (TC_ACT_OK, reverse::PASS_ENCAP_FAILED);
    }
    let written = if config.family == FAMILY_V4 {
        let mut h = [0u8; IPV4_LEN];
        h[0] = 0x45;
        h[1] = syn_ack.tos;
        [h[2], h[3]] = outer_total.to_be_bytes();
        h[6] = 0x40; // DF
        h[8] = TTL;
        h[9] = syn_ack.inner_proto;
        [h[12], h[13], h[14], h[15]] = config.source[0].to_ne_bytes();
        [h[16], h[17], h[18], h[19]] = config.agent[0].to_ne_bytes();
        [h[10], h[11]] = ipv4_checksum(&h).to_be_bytes();
        ctx.skb.store(l3, &h, 0).is_ok() && ctx.skb.store(12, &ETH_P_IPV4.to_be_bytes(), 0).is_ok()
    } else {
        let mut h = [0u8; IPV6_LEN];
        h[0] = 0x60 | (syn_ack.tos >> 4);
        h[1] = syn_ack.tos << 4;
        [h[4], h[5]] = syn_ack.inner_len.to_be_bytes();
        h[6] = syn_ack.inner_proto;
        h[7] = TTL;
        let mut i = 0;
        while i < 4 {
            let s = config.source[i].to_ne_bytes();
            let d = config.agent[i].to_ne_bytes();
            let o = 8 + i * 4;
            [h[o], h[o + 1], h[o + 2], h[o + 3]] = s;
            [h[o + 16], h[o + 17], h[o + 18], h[o + 19]] = d;
            i += 1;
        }
        ctx.skb.store(l3, &h, 0).is_ok() && ctx.skb.store(12, &ETH_P_IPV6.to_be_bytes(), 0).is_ok()
    };
    // Half rewritten: never let it out. The client retransmits its SYN.
    if !written {
        return (TC_ACT_SHOT, reverse::DROP_WRITE_FAILED);
    }
    if resolved {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        if ctx.skb.store(0, &macs, 0).is_err() {
            return (TC_ACT_SHOT, reverse::DROP_WRITE_FAILED);
        }
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
        (action, reverse::TUNNELLED)
    } else {
        // The kernel routes the outer packet itself and resolves the neighbour.
        // SAFETY: no parameters: the helper looks the route up from the packet.
        let action = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
        (action, reverse::TUNNELLED_RESOLVING)
    }
}

#[inline(always)]
fn ipv4_checksum(h: &[u8; IPV4_LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
