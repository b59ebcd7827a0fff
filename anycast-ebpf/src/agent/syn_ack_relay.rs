//! The agent's end of the SYN-ACK tunnel: a server sends the first answer of each TCP
//! connection (its SYN-ACK) back through the agent, IP-in-IP (see `server/syn_ack_tunnel.rs`),
//! so the agent can tell a server that answers new connections from one that has stopped.
//!
//! A tunnel packet to the agent's own address is decapsulated only
//! - when reverse tunnelling is configured (`AGENT_REVERSE_TUNNEL`; else `pass_reverse_off`),
//! - from the real address of an installed server (a key of `REVERSE`; else
//!   `pass_reverse_stranger`),
//! - arriving on the interface through which the agent reaches that address (the FIB; else
//!   `pass_reverse_wrong_iface`): a client that spoofs a server's address sends from
//!   another side (RFC 3704, section 2.2, feasible paths, applied to the outer source),
//! - and when its inner source address, protocol and port are an anycast service.
//!
//! Then it is counted for that server, its outer header is stripped and the inner packet
//! goes to the kernel (`XDP_PASS`), which forwards it to the client. Anything else passes
//! untouched. Only packets whose outer protocol is 4 or 41 come here, so client packets pay
//! nothing for it.
use anycast_common::{
    verdict, AddressKey, ServiceKey, AGENT_HAS_V4, AGENT_HAS_V6, AGENT_REVERSE_TUNNEL, ANY_PORT,
    ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, FAMILY_V6, IPV4_FRAGMENT_MASK, IPV4_LEN, IPV6_LEN,
    PROTO_IPIP, PROTO_TCP, PROTO_UDP,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    programs::XdpContext,
};

use super::maps::{AGENT, REVERSE, SERVICES};
use super::next_hop::reaches_via;
use super::parse::Tunnel;
use crate::packet::{move_l2, read_be16, Ipv4, Ipv6};

/// Relays the tunnel packet `t` if it is a SYN-ACK of an installed server, from that
/// server's side, and reverse tunnelling is on (see the module doc).
/// Returns the XDP action and the verdict.
#[inline(always)]
pub(super) fn relay(ctx: &XdpContext, t: &Tunnel) -> (u32, u32) {
    const NOT_OURS: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_NOT_SERVICE);
    const MALFORMED: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_MALFORMED);
    let Some(agent) = AGENT.get(0) else {
        return NOT_OURS;
    };
    let mut real = AddressKey::default();
    let own = if t.family == FAMILY_V4 {
        if agent.flags & AGENT_HAS_V4 == 0 || t.dst[0] != agent.v4 {
            return NOT_OURS;
        }
        real.family = FAMILY_V4;
        real.addr[0] = t.src[0];
        [agent.v4, 0, 0, 0]
    } else {
        if agent.flags & AGENT_HAS_V6 == 0 {
            return NOT_OURS;
        }
        real.family = FAMILY_V6;
        let mut i = 0;
        while i < 4 {
            if t.dst[i] != agent.v6[i] {
                return NOT_OURS;
            }
            real.addr[i] = t.src[i];
            i += 1;
        }
        agent.v6
    };
    if agent.flags & AGENT_REVERSE_TUNNEL == 0 {
        return (xdp_action::XDP_PASS, verdict::PASS_REVERSE_OFF);
    }
    let Some(stats) = REVERSE.get_ptr_mut(&real) else {
        return (xdp_action::XDP_PASS, verdict::PASS_REVERSE_STRANGER);
    };
    if !reaches_via(ctx, t.family, own, real.addr, ctx.ingress_ifindex() as u32) {
        return (xdp_action::XDP_PASS, verdict::PASS_REVERSE_WRONG_IFACE);
    }
    // The parser checked the outer header's length (at least `IPV4_LEN`).
    let inner = t.l3 + t.outer_len;
    let mut service = ServiceKey::default();
    let (l4, ether_type) = if t.inner_proto == PROTO_IPIP {
        let Some(h) = Ipv4::at(ctx, inner) else {
            return MALFORMED;
        };
        let ihl = h.header_len();
        if h.version() != 4 || ihl < IPV4_LEN {
            return MALFORMED;
        }
        if h.frag_off() & IPV4_FRAGMENT_MASK != 0 {
            return (xdp_action::XDP_PASS, verdict::PASS_FRAGMENT);
        }
        service.family = FAMILY_V4;
        service.addr[0] = h.src();
        service.proto = h.proto();
        (inner + ihl, ETH_P_IPV4)
    } else {
        // PROTO_IPV6: the parser lets nothing else through.
        let Some(h) = Ipv6::at(ctx, inner) else {
            return MALFORMED;
        };
        if h.version() != 6 {
            return MALFORMED;
        }
        service.family = FAMILY_V6;
        service.addr = h.src();
        service.proto = h.next_header();
        (inner + IPV6_LEN, ETH_P_IPV6)
    };
    if service.proto != PROTO_TCP && service.proto != PROTO_UDP {
        return NOT_OURS;
    }
    let Some(sport) = read_be16(ctx, l4) else {
        return MALFORMED;
    };
    service.port = sport;
    // SAFETY: only tested for presence.
    if unsafe { SERVICES.get(&service) }.is_none() {
        service.port = ANY_PORT;
        if unsafe { SERVICES.get(&service) }.is_none() {
            return NOT_OURS;
        }
    }
    // SAFETY: this CPU's value of an existing entry; no concurrent writer.
    unsafe {
        (*stats).packets += 1;
        (*stats).last_seen_ns = bpf_ktime_get_coarse_ns();
    }
    if move_l2(ctx, 0, t.outer_len, t.vlan, ether_type).is_none() {
        return MALFORMED;
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, t.outer_len as i32) } != 0 {
        return MALFORMED;
    }
    (xdp_action::XDP_PASS, verdict::REVERSE_TUNNEL)
}
