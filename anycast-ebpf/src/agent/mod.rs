//! The agent: forwards packets for anycast services to a server's real address, IP-in-IP.
//!
//! The forward pipeline, one stage per file:
//!
//! ```text
//! parse.rs        Ethernet / 802.1Q, IPv4 / IPv6, TCP / UDP / ICMP; address filter
//!   |  \__ IP-in-IP ______________________ syn_ack_relay.rs: a server's SYN-ACK -> the client
//!   |  \__ ICMP _________________________ icmp.rs: an error about a service's reply ->
//!   |                                      encap.rs, next_hop.rs to the flow's server;
//!   |                                      echo.rs: an echo request -> its reply (XDP_TX)
//! select.rs       flow table, else service lookup and consistent-hash table (the client's
//!   |             preferred one, for a service with topology preferences); pin the flow
//! encap.rs        outer IPv4 / IPv6 header to the server's real address
//!   |
//! next_hop.rs     next hop (cached FIB answer) -> XDP_TX / XDP_REDIRECT (or hand to the
//!   |             kernel when the neighbour is unknown)
//!    \__ too big for the egress MTU ______ too_big.rs: ICMP frag-needed / ICMPv6 packet
//!                                         too big back to the client, or drop
//! ```
//!
//! `maps.rs` holds the maps and the counters; every packet is counted in `VERDICTS` by the
//! reason of what was done with it.
mod echo;
mod encap;
mod icmp;
mod maps;
mod next_hop;
mod parse;
mod select;
mod syn_ack_relay;
mod too_big;

use anycast_common::{flow_hash, verdict};
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use maps::{add_server_traffic, add_service_traffic, count, AGENT};
use parse::{parse, Parsed};
use select::{choose_server, flow_clock_now, lookup_service, opens, pinned_server, Pinned};

#[xdp]
pub fn anycast_agent(ctx: XdpContext) -> u32 {
    #[cfg(feature = "upgrade-variant")]
    variant_marker(&ctx);
    let (action, reason) = forward(&ctx);
    count(reason);
    action
}

/// The upgrade-variant build's only difference: one context read whose value is discarded.
/// Volatile, so the compiler keeps it and the program's instructions differ; it touches no
/// map and changes no verdict.
#[cfg(feature = "upgrade-variant")]
#[inline(always)]
fn variant_marker(ctx: &XdpContext) {
    // SAFETY: the kernel's xdp_md, readable for the whole run of the program.
    let _ = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ctx).rx_queue_index)) };
}

/// The pipeline: returns the XDP action and the verdict to count.
#[inline(always)]
fn forward(ctx: &XdpContext) -> (u32, u32) {
    let p = match parse(ctx) {
        Ok(Parsed::Flow(p)) => p,
        Ok(Parsed::Tunnel(t)) => return syn_ack_relay::relay(ctx, &t),
        Ok(Parsed::Icmp(m)) => return icmp::handle(ctx, &m),
        Err(reason) => return (xdp_action::XDP_PASS, reason),
    };
    let now = flow_clock_now();
    let syn = opens(&p);
    // A flow-table hit names its server, and the server slot its service: no service lookup.
    // A SYN never reads the flow table: SYNs are not pinned, and the table's bucket is a
    // cache miss in a table of a million flows, the largest part of a new flow's cost. (A
    // SYN on a closing entry's 5-tuple is found by the ACK after it, from `EMBRYOS`.)
    let pinned = if syn {
        Pinned::Miss
    } else {
        pinned_server(&p, now)
    };
    // `new_flow`: this packet pinned its flow (a SYN does not: its handshake's next packet
    // does), counted per server.
    let ((server_id, server), new_flow) = match pinned {
        Pinned::Hit(id, server) => ((id, server), false),
        pinned => {
            let Some(service) = lookup_service(&p.key) else {
                return (xdp_action::XDP_PASS, verdict::PASS_NOT_SERVICE);
            };
            count(verdict::FLOW_MISS);
            let ended = matches!(pinned, Pinned::Ended);
            let Some((id, server, pinned)) =
                choose_server(&p, &service, flow_hash(&p.key), now, ended)
            else {
                return (xdp_action::XDP_DROP, verdict::DROP_NO_SERVER);
            };
            ((id, server), pinned)
        }
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    add_service_traffic(server.service as u32, frame_len);
    add_server_traffic(server_id, frame_len, syn, new_flow);
    let Some(agent) = AGENT.get(0) else {
        return (xdp_action::XDP_DROP, verdict::DROP_NO_AGENT_ADDR);
    };
    match encap::encapsulate(ctx, &p, agent, &server) {
        Ok(outer_len) => next_hop::send(ctx, &p, agent, server_id, &server, outer_len, now),
        Err(reason) => (xdp_action::XDP_DROP, reason),
    }
}
