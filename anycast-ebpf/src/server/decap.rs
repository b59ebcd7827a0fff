//! The decapsulator (XDP): strips the outer header of IP-in-IP packets whose inner
//! destination is an anycast address this server answers for, and hands the inner packet to
//! the stack. The kernel here has no ipip/ip6_tunnel module, so nothing else would.
//!
//! A decapsulated UDP packet's flow is recorded in `SERVER_UDP_FLOWS` (when first and last
//! seen): a UDP service has no per-client socket, so this is how the server daemon finds
//! the UDP clients it binds (route optimization). One lookup a packet; a write only for a
//! new flow or one whose entry is [`UDP_SEEN_REFRESH_NS`] old.
use anycast_common::{
    decap, maps as names, AddressKey, FlowKey, UdpSeen, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4,
    FAMILY_V6, IPV4_FRAGMENT_MASK, IPV4_LEN, IPV6_LEN, MAX_SERVED, MAX_SERVER_UDP_FLOWS,
    PROTO_IPIP, PROTO_IPV6, PROTO_UDP, UDP_SEEN_REFRESH_NS,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};

use crate::packet::{move_l2, parse_l2, read, Ipv4, Ipv6};

/// Also read by the SYN-ACK tunnel (`syn_ack_tunnel.rs`): its SYN-ACKs come from these.
#[map]
pub(crate) static SERVED: HashMap<AddressKey, u32> = HashMap::with_max_entries(MAX_SERVED, 0);
map_name!(SERVED, names::SERVED);
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNT, 0);
map_name!(DECAP_STATS, names::DECAP_STATS);
/// The UDP flows decapsulated for a served address, read by the server daemon (sized at
/// load time: [`MAX_SERVER_UDP_FLOWS`] in the server, 1 elsewhere).
#[map]
static SERVER_UDP_FLOWS: LruHashMap<FlowKey, UdpSeen> =
    LruHashMap::with_max_entries(MAX_SERVER_UDP_FLOWS, 0);
map_name!(SERVER_UDP_FLOWS, names::SERVER_UDP_FLOWS);

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
    let mut flow = FlowKey::default();
    // Where the inner packet's UDP ports are, when it is UDP and not a later fragment.
    let mut udp_at = None;
    let ether_type = match inner_proto {
        PROTO_IPIP => {
            let Some(h) = Ipv4::at(ctx, inner) else {
                return decap::PASS_MALFORMED;
            };
            key.family = FAMILY_V4;
            key.addr[0] = h.dst();
            if h.proto() == PROTO_UDP && h.frag_off() & 0x1fff == 0 {
                flow.src[0] = h.src();
                udp_at = Some(inner + h.header_len());
            }
            ETH_P_IPV4
        }
        PROTO_IPV6 => {
            let Some(h) = Ipv6::at(ctx, inner) else {
                return decap::PASS_MALFORMED;
            };
            key.family = FAMILY_V6;
            key.addr = h.dst();
            if h.next_header() == PROTO_UDP {
                flow.src = h.src();
                udp_at = Some(inner + IPV6_LEN);
            }
            ETH_P_IPV6
        }
        _ => return decap::PASS_NOT_TUNNEL,
    };
    if SERVED.get_ptr(&key).is_none() {
        return decap::PASS_NOT_SERVED;
    }
    if let Some(at) = udp_at {
        if let Some(ports) = read::<[u8; 4]>(ctx, at) {
            flow.dst = key.addr;
            flow.family = key.family;
            flow.proto = PROTO_UDP;
            flow.sport = u16::from_be_bytes([ports[0], ports[1]]);
            flow.dport = u16::from_be_bytes([ports[2], ports[3]]);
            record_udp(&flow);
        }
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

/// Notes a UDP flow in `SERVER_UDP_FLOWS`: inserted when new, its `last_ns` rewritten in
/// place when at least [`UDP_SEEN_REFRESH_NS`] old (so a busy flow does not write its entry's
/// cache line on every packet).
#[inline(always)]
fn record_udp(flow: &FlowKey) {
    // SAFETY: a helper reading the clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match SERVER_UDP_FLOWS.get_ptr_mut(flow) {
        Some(seen) => {
            // SAFETY: a pointer into the map's value; racing writers write the same kind of
            // value, and a torn read only delays or hastens one refresh.
            unsafe {
                if now.wrapping_sub((*seen).last_ns) >= UDP_SEEN_REFRESH_NS {
                    (*seen).last_ns = now;
                }
            }
        }
        None => {
            let seen = UdpSeen {
                first_ns: now,
                last_ns: now,
            };
            // A full map evicts its least recently used flow (a flood evicts real clients,
            // which then stay on the agent's path: nothing breaks).
            let _ = SERVER_UDP_FLOWS.insert(flow, &seen, 0);
        }
    }
}
