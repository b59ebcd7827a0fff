//! Reverse tunnel, server side: the TC egress program tunnels the server's SYN-ACKs from an
//! anycast address to the agent, and nothing else; as a fixture table.
use anycast_common::{syn_ack_tunnel, PROTO_TCP, PROTO_UDP};
use anycast_tests::packet::{ethernet, TCP_SYN_ACK};
use anyhow::Result;

use crate::fixtures::{self, Fixture, SynAckTunnel};
use crate::harness::*;

/// A frame as the server's stack sends it towards the client (via its router).
fn server_frame(ip: &[u8]) -> Vec<u8> {
    ethernet(ROUTER_MAC, SERVER_MAC, None, ip)
}

/// Where the tunnel goes: (agent, source).
type Tunnel = (&'static str, &'static str);

/// A row: with the tunnel set to `tunnel`, `input` gives `action`, `output` and a rise of
/// counter `counted`.
fn case(
    tunnel: Tunnel,
    description: impl Into<String>,
    input: Vec<u8>,
    action: u32,
    output: Vec<u8>,
    counted: u32,
) -> Fixture<Tunnel> {
    Fixture::new(description, tunnel, input, action, counted, output)
}

#[test]
fn the_server_tunnels_syn_acks_from_anycast_addresses_to_the_agent_and_nothing_else() -> Result<()>
{
    let mut srv = ServerSide::new(&["192.0.2.10", "2001:db8::10"])?;
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40400, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40401, TCP_SYN_ACK);

    // Not configured yet: untouched.
    let (rc, out) = srv.run_tc(&server_frame(&syn_ack4))?;
    assert_eq!((rc, out), (TC_ACT_OK, server_frame(&syn_ack4)));

    // The agent 10.9.3.11 is routed via fy0 (a permanent neighbour): the route to the
    // agent, not the client's, gives the egress and the MACs.
    let mut tunnel: Tunnel = ("10.9.3.11", "10.9.2.1");
    let agent_mac = neighbour_mac("10.9.3.11");
    let mut v = Vec::new();
    v.push(case(
        tunnel,
        "IPv4 SYN-ACK from 192.0.2.10 -> IPv4-in-IPv4 to the agent, redirected",
        server_frame(&syn_ack4),
        TC_ACT_REDIRECT,
        tunnelled(agent_mac, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn_ack4),
        syn_ack_tunnel::TUNNELLED,
    ));
    v.push(case(
        tunnel,
        "IPv6 SYN-ACK from 2001:db8::10 -> IPv6-in-IPv4 (41) to the agent, redirected",
        server_frame(&syn_ack6),
        TC_ACT_REDIRECT,
        tunnelled(agent_mac, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn_ack6),
        syn_ack_tunnel::TUNNELLED,
    ));
    for (what, flags) in [
        ("SYN", 0x02u8),
        ("ACK", 0x10),
        ("PSH ACK (data)", 0x18),
        ("FIN ACK", 0x11),
        ("RST ACK", 0x14),
        ("SYN ACK with RST", 0x16),
    ] {
        let p = answer("192.0.2.10", PROTO_TCP, 80, 40402, flags);
        v.push(case(
            tunnel,
            format!("{what} from the anycast address -> untouched"),
            server_frame(&p),
            TC_ACT_OK,
            server_frame(&p),
            syn_ack_tunnel::PASS_OTHER,
        ));
    }
    let udp_answer = answer("192.0.2.10", PROTO_UDP, 53, 40403, 0);
    v.push(case(
        tunnel,
        "UDP from the anycast address -> untouched",
        server_frame(&udp_answer),
        TC_ACT_OK,
        server_frame(&udp_answer),
        syn_ack_tunnel::PASS_OTHER,
    ));
    let not_served = answer("192.0.2.99", PROTO_TCP, 80, 40404, TCP_SYN_ACK);
    v.push(case(
        tunnel,
        "SYN-ACK from 192.0.2.99, not an anycast address of ours -> untouched",
        server_frame(&not_served),
        TC_ACT_OK,
        server_frame(&not_served),
        syn_ack_tunnel::PASS_NOT_SERVED,
    ));
    v.push(case(
        tunnel,
        "ARP -> untouched",
        arp_request(),
        TC_ACT_OK,
        arp_request(),
        syn_ack_tunnel::PASS_OTHER,
    ));
    // The kernel refuses sched_cls test frames of the IPv4 ether type shorter than an IPv4
    // header (14 + 20 bytes); 46 ends just before the TCP flags.
    for len in [34usize, 40, 46] {
        let cut = server_frame(&syn_ack4)[..len].to_vec();
        v.push(case(
            tunnel,
            format!("SYN-ACK truncated to {len} bytes -> untouched"),
            cut.clone(),
            TC_ACT_OK,
            cut,
            syn_ack_tunnel::PASS_OTHER,
        ));
    }

    // No neighbour entry for the agent yet: tunnelled and left to bpf_redirect_neigh,
    // MACs untouched.
    tunnel = ("10.9.2.99", "10.9.2.1");
    v.push(case(
        tunnel,
        "agent 10.9.2.99 without a neighbour entry -> tunnelled, redirect_neigh, MACs unchanged",
        server_frame(&syn_ack4),
        TC_ACT_REDIRECT,
        tunnelled(ROUTER_MAC, SERVER_MAC, "10.9.2.1", "10.9.2.99", &syn_ack4),
        syn_ack_tunnel::TUNNELLED_RESOLVING,
    ));
    tunnel = ("10.99.0.1", "10.9.2.1");
    v.push(case(
        tunnel,
        "no route to the agent 10.99.0.1 -> untouched, straight to the client",
        server_frame(&syn_ack4),
        TC_ACT_OK,
        server_frame(&syn_ack4),
        syn_ack_tunnel::PASS_NO_ROUTE,
    ));

    // An IPv6 agent: IPv4-in-IPv6 and IPv6-in-IPv6 from the server's IPv6 address, via fx0.
    tunnel = ("fd09:2::11", "fd09:2::1");
    let agent6_mac = neighbour_mac("fd09:2::11");
    v.push(case(
        tunnel,
        "IPv4 SYN-ACK, IPv6 agent -> IPv4-in-IPv6 (4), redirected via fx0",
        server_frame(&syn_ack4),
        TC_ACT_REDIRECT,
        tunnelled(agent6_mac, FX0_MAC, "fd09:2::1", "fd09:2::11", &syn_ack4),
        syn_ack_tunnel::TUNNELLED,
    ));
    v.push(case(
        tunnel,
        "IPv6 SYN-ACK, IPv6 agent -> IPv6-in-IPv6 (41), redirected via fx0",
        server_frame(&syn_ack6),
        TC_ACT_REDIRECT,
        tunnelled(agent6_mac, FX0_MAC, "fd09:2::1", "fd09:2::11", &syn_ack6),
        syn_ack_tunnel::TUNNELLED,
    ));
    fixtures::run(&mut SynAckTunnel(&mut srv), &v)
}
