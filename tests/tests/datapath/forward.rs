//! The agent's forward path, as a fixture table: packets to a service are encapsulated
//! towards a server and sent (XDP_TX, XDP_REDIRECT) or handed to the kernel; packets of no
//! service pass untouched; the egress MTU bounds the outer packet.
use std::net::IpAddr;

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anycast_tests::packet::DF;
use anyhow::Result;

use crate::fixtures::{self, fixture, untouched, AgentFixture, Fixture};
use crate::harness::*;

/// The rows; each sets the whole service set.
fn table() -> Vec<AgentFixture> {
    let mut v = Vec::new();

    // --- Encapsulated and sent.
    let f_tcp = Flow::v4("192.0.2.10", PROTO_TCP, 40000, 80);
    let ip_tcp = ip_packet(&f_tcp);
    let frame_tcp = client_frame(None, &ip_tcp);
    v.push(fixture(
        "IPv4 TCP to 192.0.2.10:80 -> IPv4-in-IPv4 to 10.9.2.11, XDP_TX",
        web_and_dns(),
        frame_tcp.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_tcp, &ip_tcp),
    ));

    let f_udp = Flow::v4("192.0.2.10", PROTO_UDP, 40001, 53);
    let ip_udp = ip_packet(&f_udp);
    v.push(fixture(
        "IPv4 UDP to 192.0.2.10:53 -> IPv4-in-IPv4 to 10.9.2.11, XDP_TX",
        web_and_dns(),
        client_frame(None, &ip_udp),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_udp, &ip_udp),
    ));

    let f_tcp6 = Flow::v6("2001:db8::10", PROTO_TCP, 40002, 443);
    let ip_tcp6 = ip_packet(&f_tcp6);
    let frame_tcp6 = client_frame(None, &ip_tcp6);
    v.push(fixture(
        "IPv6 TCP to [2001:db8::10]:443 -> IPv6-in-IPv6 to fd09:2::11, XDP_TX",
        web6(),
        frame_tcp6.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_tcp6, &ip_tcp6),
    ));

    let f_46 = Flow::v4("192.0.2.20", PROTO_TCP, 40003, 80);
    let ip_46 = ip_packet(&f_46);
    v.push(fixture(
        "IPv4 TCP to 192.0.2.20:80 whose server is fd09:2::11 -> IPv4-in-IPv6, XDP_TX",
        vec![service(
            "web46",
            "192.0.2.20",
            PROTO_TCP,
            80,
            &[("fd09:2::11", 1)],
        )],
        client_frame(None, &ip_46),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_46, &ip_46),
    ));

    let f_64 = Flow::v6("2001:db8::20", PROTO_UDP, 40004, 53);
    let ip_64 = ip_packet(&f_64);
    v.push(fixture(
        "IPv6 UDP to [2001:db8::20]:53 whose server is 10.9.2.11 -> IPv6-in-IPv4 (proto 41), XDP_TX",
        vec![service(
            "dns64",
            "2001:db8::20",
            PROTO_UDP,
            53,
            &[("10.9.2.11", 1)],
        )],
        client_frame(None, &ip_64),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_64, &ip_64),
    ));

    let f_opt = Flow::v4("192.0.2.10", PROTO_TCP, 40005, 80);
    // IHL 7: seven NOPs and an end-of-options.
    let ip_opt = ip_packet_with(&f_opt, DF, &[1, 1, 1, 1, 1, 1, 1, 0]);
    let frame_opt = client_frame(None, &ip_opt);
    v.push(fixture(
        "IPv4 with 8 bytes of options (IHL 7) TCP to 192.0.2.10:80 -> encapsulated, options kept, XDP_TX",
        web_and_dns(),
        frame_opt.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_opt, &ip_opt),
    ));

    let f_vlan = Flow::v4("192.0.2.10", PROTO_TCP, 40006, 80);
    let ip_vlan = ip_packet(&f_vlan);
    let frame_vlan = client_frame(Some(100), &ip_vlan);
    v.push(fixture(
        "802.1Q VID 100 IPv4 TCP to 192.0.2.10:80 -> encapsulated, tag popped (the FIB names fx0 itself, untagged), XDP_TX",
        web_and_dns(),
        frame_vlan.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_vlan, &ip_vlan),
    ));

    let f_vlan6 = Flow::v6("2001:db8::10", PROTO_TCP, 40007, 443);
    let ip_vlan6 = ip_packet(&f_vlan6);
    v.push(fixture(
        "802.1Q VID 100 IPv6 TCP to [2001:db8::10]:443 -> IPv6-in-IPv6, tag popped, XDP_TX",
        web6(),
        client_frame(Some(100), &ip_vlan6),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_vlan6, &ip_vlan6),
    ));
    // Out of another port, the frame carries that port's framing: the client's tag stays on
    // the client's segment.
    let f_vlan_redir = Flow::v4("192.0.2.40", PROTO_TCP, 40010, 80);
    let ip_vlan_redir = ip_packet(&f_vlan_redir);
    v.push(fixture(
        "802.1Q VID 30 IPv4 TCP, server 10.9.3.11 via fy0 -> XDP_REDIRECT untagged, MACs of fy0 and the neighbour",
        vec![service(
            "redir",
            "192.0.2.40",
            PROTO_TCP,
            80,
            &[("10.9.3.11", 1)],
        )],
        client_frame(Some(30), &ip_vlan_redir),
        XDP_REDIRECT,
        verdict::REDIRECT,
        encapsulated(
            neighbour_mac("10.9.3.11"),
            FY0_MAC,
            None,
            &f_vlan_redir,
            &ip_vlan_redir,
            "10.9.3.11",
        ),
    ));

    let wildcard = || {
        vec![service(
            "any-udp",
            "192.0.2.30",
            PROTO_UDP,
            0,
            &[("10.9.2.11", 1)],
        )]
    };
    let f_wild = Flow::v4("192.0.2.30", PROTO_UDP, 40008, 5353);
    let ip_wild = ip_packet(&f_wild);
    v.push(fixture(
        "UDP to 192.0.2.30:5353 matched by the port wildcard 192.0.2.30 udp 0 -> XDP_TX",
        wildcard(),
        client_frame(None, &ip_wild),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_wild, &ip_wild),
    ));
    v.push(untouched(
        "TCP to 192.0.2.30:5353: the udp port wildcard does not match tcp -> pass",
        wildcard(),
        client_frame(
            None,
            &ip_packet(&Flow::v4("192.0.2.30", PROTO_TCP, 40008, 5353)),
        ),
        verdict::PASS_NOT_SERVICE,
    ));

    let f_redir = Flow::v4("192.0.2.40", PROTO_TCP, 40009, 80);
    let ip_redir = ip_packet(&f_redir);
    v.push(fixture(
        "server 10.9.3.11 routed via fy0 (in TX_PORTS) -> XDP_REDIRECT, MACs of fy0 and the neighbour",
        vec![service(
            "redir",
            "192.0.2.40",
            PROTO_TCP,
            80,
            &[("10.9.3.11", 1)],
        )],
        client_frame(None, &ip_redir),
        XDP_REDIRECT,
        verdict::REDIRECT,
        encapsulated(
            neighbour_mac("10.9.3.11"),
            FY0_MAC,
            None,
            &f_redir,
            &ip_redir,
            "10.9.3.11",
        ),
    ));

    // Handed to the kernel to forward out of fz0, so the frame must still be addressed to
    // fx0: with the next hop's MAC as destination the stack takes it for another host's
    // frame (PACKET_OTHERHOST) and drops it.
    let f_notx = Flow::v4("192.0.2.41", PROTO_TCP, 40010, 80);
    let ip_notx = ip_packet(&f_notx);
    v.push(fixture(
        "server 10.9.4.11 routed via fz0 (not in TX_PORTS) -> XDP_PASS, encapsulated, MACs unchanged",
        vec![service(
            "notx",
            "192.0.2.41",
            PROTO_TCP,
            80,
            &[("10.9.4.11", 1)],
        )],
        client_frame(None, &ip_notx),
        XDP_PASS,
        verdict::PASS_NOT_TX_PORT,
        encapsulated(FX0_MAC, CLIENT_MAC, None, &f_notx, &ip_notx, "10.9.4.11"),
    ));
    // The kernel takes a tagged frame in on the tag's sub-interface and forwards with the
    // egress's own framing: the tag stays for it.
    let f_notx_vlan = Flow::v4("192.0.2.41", PROTO_TCP, 40012, 80);
    let ip_notx_vlan = ip_packet(&f_notx_vlan);
    v.push(fixture(
        "802.1Q VID 30, server 10.9.4.11 via fz0 (not in TX_PORTS) -> XDP_PASS, encapsulated behind the same tag, MACs unchanged",
        vec![service(
            "notx",
            "192.0.2.41",
            PROTO_TCP,
            80,
            &[("10.9.4.11", 1)],
        )],
        client_frame(Some(30), &ip_notx_vlan),
        XDP_PASS,
        verdict::PASS_NOT_TX_PORT,
        encapsulated(
            FX0_MAC,
            CLIENT_MAC,
            Some(30),
            &f_notx_vlan,
            &ip_notx_vlan,
            "10.9.4.11",
        ),
    ));

    // --- Encapsulated, handed to the kernel.
    let f_noneigh = Flow::v4("192.0.2.50", PROTO_TCP, 40011, 80);
    let ip_noneigh = ip_packet(&f_noneigh);
    v.push(fixture(
        "server 10.9.2.99 without a neighbour entry -> XDP_PASS, encapsulated, MACs unchanged",
        vec![service(
            "noneigh",
            "192.0.2.50",
            PROTO_TCP,
            80,
            &[("10.9.2.99", 1)],
        )],
        client_frame(None, &ip_noneigh),
        XDP_PASS,
        verdict::PASS_NO_NEIGH,
        encapsulated(
            FX0_MAC,
            CLIENT_MAC,
            None,
            &f_noneigh,
            &ip_noneigh,
            "10.9.2.99",
        ),
    ));

    let f_noroute = Flow::v4("192.0.2.60", PROTO_TCP, 40012, 80);
    let ip_noroute = ip_packet(&f_noroute);
    v.push(fixture(
        "server 10.99.0.1 without a route -> XDP_PASS, encapsulated, MACs unchanged",
        vec![service(
            "noroute",
            "192.0.2.60",
            PROTO_TCP,
            80,
            &[("10.99.0.1", 1)],
        )],
        client_frame(None, &ip_noroute),
        XDP_PASS,
        verdict::PASS_NO_ROUTE,
        encapsulated(
            FX0_MAC,
            CLIENT_MAC,
            None,
            &f_noroute,
            &ip_noroute,
            "10.99.0.1",
        ),
    ));

    // --- Dropped.
    let frame_w0 = client_frame(
        None,
        &ip_packet(&Flow::v4("192.0.2.70", PROTO_TCP, 40013, 80)),
    );
    v.push(fixture(
        "service whose only server has weight 0 -> XDP_DROP",
        vec![service(
            "weight0",
            "192.0.2.70",
            PROTO_TCP,
            80,
            &[("10.9.2.11", 0)],
        )],
        frame_w0.clone(),
        XDP_DROP,
        verdict::DROP_NO_SERVER,
        frame_w0,
    ));
    let mut down = service("down", "192.0.2.71", PROTO_TCP, 80, &[("10.9.2.11", 1)]);
    down.servers[0].up = false;
    let frame_down = client_frame(
        None,
        &ip_packet(&Flow::v4("192.0.2.71", PROTO_TCP, 40014, 80)),
    );
    v.push(fixture(
        "service whose only server is down -> XDP_DROP",
        vec![down],
        frame_down.clone(),
        XDP_DROP,
        verdict::DROP_NO_SERVER,
        frame_down,
    ));

    // --- Not for a service.
    for (what, flow) in [
        (
            "same address, other TCP port",
            Flow::v4("192.0.2.10", PROTO_TCP, 40015, 81),
        ),
        (
            "same address and port, other protocol (UDP 80)",
            Flow::v4("192.0.2.10", PROTO_UDP, 40015, 80),
        ),
        (
            "other address, same port",
            Flow::v4("192.0.2.11", PROTO_TCP, 40015, 80),
        ),
        (
            "IPv6 to another address",
            Flow::v6("2001:db8::11", PROTO_TCP, 40015, 443),
        ),
    ] {
        let services = if flow.dst.is_ipv4() {
            web_and_dns()
        } else {
            web6()
        };
        v.push(untouched(
            format!("not a service: {what} -> pass untouched"),
            services,
            client_frame(None, &ip_packet(&flow)),
            verdict::PASS_NOT_SERVICE,
        ));
    }
    let icmp = client_ip(IpAddr::V4(CLIENT_V4), "192.0.2.10".parse().unwrap(), 1)
        .packet(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    v.push(untouched(
        "not a service: ICMP echo to the service address -> pass untouched",
        web_and_dns(),
        client_frame(None, &icmp),
        verdict::PASS_NOT_SERVICE,
    ));
    v.push(untouched(
        "not a service: ARP request -> pass untouched",
        web_and_dns(),
        arp_request(),
        verdict::PASS_NOT_SERVICE,
    ));

    // --- The egress MTU (1500 on the veths) bounds the outer packet.
    let big = big_packet;
    let f_mtu = Flow::v4("192.0.2.10", PROTO_TCP, 40020, 80);
    let ip_1480 = big(&f_mtu, 1480);
    v.push(fixture(
        "IPv4 TCP of 1480 bytes -> IPv4-in-IPv4 of exactly the MTU (1500), XDP_TX",
        web_and_dns(),
        client_frame(None, &ip_1480),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_mtu, &ip_1480),
    ));
    // With DF the client is answered (too_big.rs); without, the packet is dropped.
    v.push(Fixture {
        description: "IPv4 TCP of 1481 bytes without DF -> IPv4-in-IPv4 of 1501 > MTU, XDP_DROP"
            .into(),
        setup: web_and_dns(),
        input: client_frame(None, &big_packet_no_df(&f_mtu, 1481)),
        action: XDP_DROP,
        counted: verdict::DROP_TOO_BIG,
        output: None,
    });
    let services_46 = || {
        vec![service(
            "web46",
            "192.0.2.20",
            PROTO_TCP,
            80,
            &[("fd09:2::11", 1)],
        )]
    };
    let f_mtu6 = Flow::v4("192.0.2.20", PROTO_TCP, 40021, 80);
    let ip_1460 = big(&f_mtu6, 1460);
    v.push(fixture(
        "IPv4 TCP of 1460 bytes -> IPv4-in-IPv6 of exactly the MTU (1500), XDP_TX",
        services_46(),
        client_frame(None, &ip_1460),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_mtu6, &ip_1460),
    ));
    v.push(Fixture {
        description: "IPv4 TCP of 1461 bytes without DF -> IPv4-in-IPv6 of 1501 > MTU, XDP_DROP"
            .into(),
        setup: services_46(),
        input: client_frame(None, &big_packet_no_df(&f_mtu6, 1461)),
        action: XDP_DROP,
        counted: verdict::DROP_TOO_BIG,
        output: None,
    });

    v
}

#[test]
fn fixtures_produce_expected_frames_and_verdicts() -> Result<()> {
    fixtures::run(&mut Harness::new()?, &table())
}
