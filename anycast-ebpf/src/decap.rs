//! The server side: strips the outer header of IP-in-IP packets whose inner destination is an
//! anycast address this server answers for, and hands the inner packet to the stack. The
//! kernel here has no ipip/ip6_tunnel module, so nothing else would.
use anycast_common::{decap, AddressKey, FAMILY_V4, FAMILY_V6, MAX_SERVED, PROTO_IPIP, PROTO_IPV6};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};

use crate::packet::*;

/// Also read by the reverse-tunnel program (`reverse.rs`): its SYN-ACKs come from these.
#[map]
pub(crate) static SERVED: HashMap<AddressKey, u32> = HashMap::with_max_entries(MAX_SERVED, 0);
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNT, 0);

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
            let Some(h) = read::<[u8; IPV4_LEN]>(ctx, l3) else {
                return decap::PASS_MALFORMED;
            };
            // A fragmented tunnel packet cannot be decapsulated piecewise: leave it.
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return decap::PASS_NOT_TUNNEL;
            }
            ((h[0] & 0x0f) as usize * 4, h[9])
        }
        ETH_P_IPV6 => {
            let Some(h) = read::<[u8; IPV6_LEN]>(ctx, l3) else {
                return decap::PASS_MALFORMED;
            };
            (IPV6_LEN, h[6])
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
            let Some(h) = read::<[u8; IPV4_LEN]>(ctx, inner) else {
                return decap::PASS_MALFORMED;
            };
            key.family = FAMILY_V4;
            key.addr[0] = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
            ETH_P_IPV4
        }
        PROTO_IPV6 => {
            let Some(h) = read::<[u8; IPV6_LEN]>(ctx, inner) else {
                return decap::PASS_MALFORMED;
            };
            key.family = FAMILY_V6;
            let mut i = 0;
            while i < 4 {
                let d = 24 + i * 4;
                key.addr[i] = u32::from_ne_bytes([h[d], h[d + 1], h[d + 2], h[d + 3]]);
                i += 1;
            }
            ETH_P_IPV6
        }
        _ => return decap::PASS_NOT_TUNNEL,
    };
    if SERVED.get_ptr(&key).is_none() {
        return decap::PASS_NOT_SERVED;
    }
    if move_l2(ctx, 0, outer_len, l3 != ETH_LEN, ether_type).is_none() {
        return decap::PASS_MALFORMED;
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return decap::PASS_MALFORMED;
    }
    decap::DECAPSULATED
}
