//! The decapsulator (XDP): strips the outer header of IP-in-IP packets whose inner
//! destination is an anycast address this server answers for, and hands the inner packet to
//! the stack. The kernel here has no ipip/ip6_tunnel module, so nothing else would.
use anycast_common::{
    decap, maps as names, AddressKey, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, FAMILY_V6,
    IPV4_FRAGMENT_MASK, IPV4_LEN, IPV6_LEN, MAX_SERVED, PROTO_IPIP, PROTO_IPV6,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};

use crate::packet::{move_l2, parse_l2, Ipv4, Ipv6};

/// Also read by the SYN-ACK tunnel (`syn_ack_tunnel.rs`): its SYN-ACKs come from these.
#[map]
pub(crate) static SERVED: HashMap<AddressKey, u32> = HashMap::with_max_entries(MAX_SERVED, 0);
map_name!(SERVED, names::SERVED);
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNT, 0);
map_name!(DECAP_STATS, names::DECAP_STATS);

#[xdp]
pub fn anycast_decap(ctx: XdpContext) -> u32 {
    let reason = strip(&ctx);
    if let Some(c) = DECAP_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn strip(ctx: &XdpContext) -> u32 {
    let Some(l2) = parse_l2(ctx) else {
        return decap::PASS_MALFORMED;
    };
    let l3 = l2.l3;
    let (outer_len, inner_proto) = match l2.ether_type {
        ETH_P_IPV4 => {
            let Some(h) = Ipv4::at(ctx, l3) else {
                return decap::PASS_MALFORMED;
            };
            // A fragmented tunnel packet cannot be decapsulated piecewise: leave it.
            if h.frag_off() & IPV4_FRAGMENT_MASK != 0 {
                return decap::PASS_NOT_TUNNEL;
            }
            (h.header_len(), h.proto())
        }
        ETH_P_IPV6 => {
            let Some(h) = Ipv6::at(ctx, l3) else {
                return decap::PASS_MALFORMED;
            };
            (IPV6_LEN, h.next_header())
        }
        _ => return decap::PASS_NOT_TUNNEL,
    };
    if outer_len < IPV4_LEN {
        return decap::PASS_MALFORMED;
    }
    let inner = l3 + outer_len;
    let mut key = AddressKey::default();
    let ether_type = match inner_proto {
        PROTO_IPIP => {
            let Some(h) = Ipv4::at(ctx, inner) else {
                return decap::PASS_MALFORMED;
            };
            key.family = FAMILY_V4;
            key.addr[0] = h.dst();
            ETH_P_IPV4
        }
        PROTO_IPV6 => {
            let Some(h) = Ipv6::at(ctx, inner) else {
                return decap::PASS_MALFORMED;
            };
            key.family = FAMILY_V6;
            key.addr = h.dst();
            ETH_P_IPV6
        }
        _ => return decap::PASS_NOT_TUNNEL,
    };
    if SERVED.get_ptr(&key).is_none() {
        return decap::PASS_NOT_SERVED;
    }
    if move_l2(ctx, 0, outer_len, l2.vlan(), ether_type).is_none() {
        return decap::PASS_MALFORMED;
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return decap::PASS_MALFORMED;
    }
    decap::DECAPSULATED
}
