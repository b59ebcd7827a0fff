//! ICMP to an anycast address: echo requests are answered here (`echo.rs`); errors about a
//! service's reply go to the server that sent it.
//!
//! A server answers its clients directly, from the anycast address. A router on that path
//! whose next link is too small sends "fragmentation needed" (ICMPv4 destination
//! unreachable, code 4, RFC 1191) or "packet too big" (ICMPv6, RFC 8201) to that address,
//! which routes to the agent, not to the server: without this stage the server never learns
//! the path MTU and its large replies vanish (a PMTU black hole). The error quotes the
//! start of the reply (RFC 792: the IP header and at least 8 bytes; RFC 4443: as much as
//! fits), so the reply's flow is known: the client is the quoted destination. The whole
//! ICMP packet is tunnelled, like a client packet of that flow, to the server the flow
//! table names for it, else to the consistent-hash choice for it (the server a new packet
//! of the flow would go to); no flow entry is made, and an entry is not refreshed.
//!
//! Only ICMPv4 destination unreachable and ICMPv6 packet too big and destination
//! unreachable are tunnelled, and only when the quote is consistent: the quoted IP version
//! is the error's, the quoted header and 8 bytes of its transport header lie inside the
//! error, the quoted source is the address the error was sent to, and the quoted protocol
//! and source port are a service's. Anything else passes to the kernel, counted.
use anycast_common::{
    flow_hash, verdict, AgentInfo, FlowKey, ServerInfo, AGENT_ANSWER_PING,
    AGENT_FORWARD_ICMP_ERRORS, EMBRYO_SLOTS, FAMILY_V4, ICMPV6_DEST_UNREACHABLE,
    ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMP_DEST_UNREACHABLE, ICMP_ECHO_REQUEST, ICMP_LEN,
    IPV4_LEN, IPV4_OFFSET_MASK, IPV6_LEN, PROTO_TCP, PROTO_UDP,
};
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use super::maps::{AGENT, EMBRYOS, FLOWS, FLOW_CONFIG};
use super::parse::{Flow, Icmp};
use super::select::{
    entry_server, flow_clock_now, handshake_server, hashed_server, lookup_service,
};
use super::{echo, encap, next_hop};
use crate::packet::{load, ptr_at, read_be16, Ipv4, Ipv6};

const NOT_SERVICE: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_NOT_SERVICE);
const MALFORMED: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_ICMP_MALFORMED);
const NOT_FROM_SERVICE: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_ICMP_NOT_SERVICE);

/// An echo request is answered, an error about a service's reply tunnelled to its server,
/// each when configured (else, and for any other ICMP, the packet passes as before:
/// `pass_not_service`). Returns the XDP action and the verdict.
#[inline(always)]
pub(super) fn handle(ctx: &XdpContext, m: &Icmp) -> (u32, u32) {
    let Some(agent) = AGENT.get(0) else {
        return NOT_SERVICE;
    };
    // Type and code as one 16-bit read: a 1-byte read's bounds check compiles to a form
    // the verifier cannot use (`data + off >= data_end`).
    let Some(type_code) = read_be16(ctx, m.l4) else {
        return NOT_SERVICE;
    };
    let kind = (type_code >> 8) as u8;
    let v4 = m.family == FAMILY_V4;
    let echo = if v4 {
        kind == ICMP_ECHO_REQUEST
    } else {
        kind == ICMPV6_ECHO_REQUEST
    };
    if echo {
        if agent.flags & AGENT_ANSWER_PING == 0 {
            return NOT_SERVICE;
        }
        return echo::reply(ctx, m);
    }
    let error = if v4 {
        kind == ICMP_DEST_UNREACHABLE
    } else {
        kind == ICMPV6_PACKET_TOO_BIG || kind == ICMPV6_DEST_UNREACHABLE
    };
    if !error || agent.flags & AGENT_FORWARD_ICMP_ERRORS == 0 {
        return NOT_SERVICE;
    }
    to_server(ctx, m, agent)
}

/// Tunnels the error `m` to the server of the flow it quotes (see the module doc).
#[inline(always)]
fn to_server(ctx: &XdpContext, m: &Icmp, agent: &AgentInfo) -> (u32, u32) {
    let quote = m.l4 + ICMP_LEN;
    // The client's flow: the quoted packet reversed (client = quoted destination).
    let mut key = FlowKey {
        family: m.family,
        ..FlowKey::default()
    };
    let l4 = if m.family == FAMILY_V4 {
        let Some(h) = Ipv4::at(ctx, quote) else {
            return MALFORMED;
        };
        let ihl = h.header_len();
        if h.version() != 4 || ihl < IPV4_LEN || (h.total_len() as usize) < ihl + 8 {
            return MALFORMED;
        }
        // A later fragment quotes no transport header.
        if h.frag_off() & IPV4_OFFSET_MASK != 0 {
            return MALFORMED;
        }
        if h.src() != m.dst[0] {
            return NOT_FROM_SERVICE;
        }
        key.src[0] = h.dst();
        key.dst[0] = m.dst[0];
        key.proto = h.proto();
        quote + ihl
    } else {
        let Some(h) = Ipv6::at(ctx, quote) else {
            return MALFORMED;
        };
        if h.version() != 6 || h.payload_len() < 8 {
            return MALFORMED;
        }
        let mut i = 0;
        while i < 4 {
            if h.src_word(i) != m.dst[i] {
                return NOT_FROM_SERVICE;
            }
            i += 1;
        }
        key.src = h.dst();
        key.dst = m.dst;
        // A reply with extension headers is not a service's (they send none).
        key.proto = h.next_header();
        quote + IPV6_LEN
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return NOT_FROM_SERVICE;
    }
    // The quoted ports, inside the error's IP packet and the frame.
    if l4 + 8 > m.end {
        return MALFORMED;
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4) else {
        return MALFORMED;
    };
    let ports = ports as *const u8;
    // SAFETY: ptr_at checked the bounds of both ports.
    unsafe {
        key.dport = u16::from_be(load::<u16>(ports, 0));
        key.sport = u16::from_be(load::<u16>(ports, 2));
    }
    let Some(service) = lookup_service(&key) else {
        return NOT_FROM_SERVICE;
    };
    let now = flow_clock_now();
    let Some((server_id, server)) = pinned(&key, now)
        .or_else(|| handshake(&key, now))
        .or_else(|| hashed_server(&key, &service, flow_hash(&key)))
    else {
        return (xdp_action::XDP_DROP, verdict::DROP_NO_SERVER);
    };
    let p = Flow {
        l3: m.l3,
        vlan: m.vlan,
        key,
        inner_len: (m.end - m.l3) as u16,
        tos: m.tos,
        tcp_flags: 0,
    };
    match encap::encapsulate(ctx, &p, agent, &server) {
        Ok(outer_len) => match next_hop::send(ctx, &p, agent, server_id, &server, outer_len, now) {
            (action, verdict::TX | verdict::REDIRECT) => (action, verdict::ICMP_TO_SERVER),
            other => other,
        },
        Err(reason) => (xdp_action::XDP_DROP, reason),
    }
}

/// The server the flow is pinned to, if its entry is live (as `select::pinned_server` judges
/// it, without counting or refreshing it: an error is not the client's traffic).
#[inline(always)]
fn pinned(key: &FlowKey, now: u32) -> Option<(u32, ServerInfo)> {
    // SAFETY: the value is copied out at once.
    let v = *unsafe { FLOWS.get(key) }?;
    let s = entry_server(&v)?;
    if FLOW_CONFIG.get(0)?.expired(key.proto, &v, now) {
        return None;
    }
    Some((v.server, s))
}

/// The server of the flow's SYN, if its handshake is in progress (its `EMBRYOS` slot, as
/// `select::choose_server` reads it for the first packet after the SYN).
#[inline(always)]
fn handshake(key: &FlowKey, now: u32) -> Option<(u32, ServerInfo)> {
    let slot = EMBRYOS.get_ptr_mut(flow_hash(key) & (EMBRYO_SLOTS - 1))?;
    handshake_server(key, slot, now)
}
