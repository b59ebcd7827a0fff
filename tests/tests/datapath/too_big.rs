//! Client packets too big for the tunnel: answered with ICMP "fragmentation needed" (IPv4
//! with DF) or ICMPv6 "packet too big" from the anycast address, giving the egress MTU less
//! the outer header, sent back out of the ingress port; dropped and counted otherwise
//! (no DF, answers off, a source no error may go to, a path below IPv6's minimum MTU, the
//! CPU's answers used up). The expected answers are built here, byte by byte, with their
//! checksums computed over the whole message (RFC 1071), independently of the program.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anycast_tests::packet::{ethernet, inet_checksum, tcp, udp, Ip, TCP_ACK, TCP_PSH};
use anyhow::Result;

use crate::fixtures::{self, fixture, AgentFixture, Fixture};
use crate::harness::*;

/// Bytes of the client's packet an IPv4 answer quotes, and an IPv6 one.
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 1232;

/// The ICMP answer the agent must send for the client's IPv4 packet `inner` received on
/// fx0: from the anycast address (the packet's destination) to the client, TOS 0xc0, TTL
/// 64, id 0, DF; type 3 code 4 with next-hop MTU `mtu`, quoting the packet's first 68
/// bytes; MACs swapped, the client's tag kept.
pub fn frag_needed(vlan: Option<u16>, inner: &[u8], mtu: u16) -> Vec<u8> {
    let anycast = IpAddr::from(<[u8; 4]>::try_from(&inner[16..20]).unwrap());
    let client = IpAddr::from(<[u8; 4]>::try_from(&inner[12..16]).unwrap());
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&inner[..QUOTE_V4]);
    let sum = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let ip = Ip::new(anycast, client, 1).tos(0xc0).packet(&icmp);
    ethernet(CLIENT_MAC, FX0_MAC, vlan, &ip)
}

/// The ICMPv6 answer for the client's IPv6 packet `inner`: from the anycast address to the
/// client, traffic class and flow label 0, hop limit 64; type 2 code 0 with MTU `mtu`,
/// quoting the packet's first 1232 bytes (a 1280-byte packet).
pub fn packet_too_big(vlan: Option<u16>, inner: &[u8], mtu: u32) -> Vec<u8> {
    let anycast = <[u8; 16]>::try_from(&inner[24..40]).unwrap();
    let client = <[u8; 16]>::try_from(&inner[8..24]).unwrap();
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&inner[..QUOTE_V6]);
    // RFC 8200 section 8.1: source, destination, upper-layer length, zeros, next header.
    let mut pseudo = anycast.to_vec();
    pseudo.extend_from_slice(&client);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = inet_checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let ip = Ip::new(IpAddr::from(anycast), IpAddr::from(client), 58).packet(&icmp);
    assert_eq!(ip.len(), 1280, "an IPv6 answer fills the minimum MTU");
    ethernet(CLIENT_MAC, FX0_MAC, vlan, &ip)
}

/// An IPv6 packet of `flow` (TCP PSH ACK or UDP) of `total` bytes.
pub fn big_packet_v6(flow: &Flow, total: usize) -> Vec<u8> {
    let header = if flow.proto == PROTO_TCP { 20 } else { 8 };
    let payload: Vec<u8> = (0..total - 40 - header).map(|i| (i * 7) as u8).collect();
    let l4 = if flow.proto == PROTO_TCP {
        tcp(flow.sport, flow.dport, TCP_PSH | TCP_ACK, &payload)
    } else {
        udp(flow.sport, flow.dport, &payload)
    };
    client_ip(flow.src, flow.dst, flow.proto).packet(&l4)
}

/// 192.0.2.20 tcp 80 served by fd09:2::11 (IPv4-in-IPv6).
fn web46() -> Vec<anycast_ctl::dataplane::DesiredService> {
    vec![service(
        "web46",
        "192.0.2.20",
        PROTO_TCP,
        80,
        &[("fd09:2::11", 1)],
    )]
}

/// [2001:db8::20] udp 53 served by 10.9.2.11 (IPv6-in-IPv4).
fn dns64() -> Vec<anycast_ctl::dataplane::DesiredService> {
    vec![service(
        "dns64",
        "2001:db8::20",
        PROTO_UDP,
        53,
        &[("10.9.2.11", 1)],
    )]
}

/// A row dropped without an answer: `drop_too_big`.
fn not_answered(
    description: &str,
    services: Vec<anycast_ctl::dataplane::DesiredService>,
    input: Vec<u8>,
) -> AgentFixture {
    Fixture {
        description: description.into(),
        setup: services,
        input,
        action: XDP_DROP,
        counted: verdict::DROP_TOO_BIG,
        output: None,
    }
}

/// The rows at the veths' MTU of 1500.
fn table() -> Vec<AgentFixture> {
    let mut v = Vec::new();
    let f44 = Flow::v4("192.0.2.10", PROTO_TCP, 42000, 80);
    let ip = big_packet(&f44, 1481);
    v.push(fixture(
        "IPv4 TCP of 1481 bytes with DF, IPv4-in-IPv4 of 1501 > 1500 -> frag needed, MTU 1480",
        web_and_dns(),
        client_frame(None, &ip),
        XDP_TX,
        verdict::TOO_BIG_ANSWERED,
        frag_needed(None, &ip, 1480),
    ));
    let ip = big_packet(&f44, 1500);
    v.push(fixture(
        "IPv4 TCP of 1500 bytes with DF behind 802.1Q tag 100 -> frag needed with the tag, MTU 1480",
        web_and_dns(),
        client_frame(Some(100), &ip),
        XDP_TX,
        verdict::TOO_BIG_ANSWERED,
        frag_needed(Some(100), &ip, 1480),
    ));
    let f46 = Flow::v4("192.0.2.20", PROTO_TCP, 42001, 80);
    let ip = big_packet(&f46, 1461);
    v.push(fixture(
        "IPv4 TCP of 1461 bytes with DF, IPv4-in-IPv6 of 1501 -> frag needed, MTU 1460",
        web46(),
        client_frame(None, &ip),
        XDP_TX,
        verdict::TOO_BIG_ANSWERED,
        frag_needed(None, &ip, 1460),
    ));
    let f66 = Flow::v6("2001:db8::10", PROTO_TCP, 42002, 443);
    let ip = big_packet_v6(&f66, 1461);
    v.push(fixture(
        "IPv6 TCP of 1461 bytes, IPv6-in-IPv6 of 1501 -> packet too big, MTU 1460",
        web6(),
        client_frame(None, &ip),
        XDP_TX,
        verdict::TOO_BIG_ANSWERED,
        packet_too_big(None, &ip, 1460),
    ));
    let ip = big_packet_v6(&f66, 1500);
    v.push(fixture(
        "IPv6 TCP of 1500 bytes behind 802.1Q tag 7 -> packet too big with the tag, MTU 1460",
        web6(),
        client_frame(Some(7), &ip),
        XDP_TX,
        verdict::TOO_BIG_ANSWERED,
        packet_too_big(Some(7), &ip, 1460),
    ));
    let f64 = Flow::v6("2001:db8::20", PROTO_UDP, 42003, 53);
    let ip = big_packet_v6(&f64, 1481);
    v.push(fixture(
        "IPv6 UDP of 1481 bytes, IPv6-in-IPv4 of 1501 -> packet too big, MTU 1480",
        dns64(),
        client_frame(None, &ip),
        XDP_TX,
        verdict::TOO_BIG_ANSWERED,
        packet_too_big(None, &ip, 1480),
    ));

    // Not answered.
    v.push(not_answered(
        "IPv4 TCP of 1481 bytes without DF -> dropped",
        web_and_dns(),
        client_frame(None, &big_packet_no_df(&f44, 1481)),
    ));
    let mut spoofed = big_packet(&f44, 1481);
    spoofed[12..16].copy_from_slice(&[224, 0, 0, 9]);
    anycast_tests::packet::fix_ipv4_checksum(&mut spoofed);
    v.push(not_answered(
        "IPv4 with DF from a multicast source (224.0.0.9) -> dropped, no error to a group",
        web_and_dns(),
        client_frame(None, &spoofed),
    ));
    let mut spoofed = big_packet(&f44, 1481);
    spoofed[12..16].copy_from_slice(&[127, 0, 0, 1]);
    anycast_tests::packet::fix_ipv4_checksum(&mut spoofed);
    v.push(not_answered(
        "IPv4 with DF from a loopback source -> dropped",
        web_and_dns(),
        client_frame(None, &spoofed),
    ));
    let mut spoofed = big_packet_v6(&f66, 1461);
    spoofed[8] = 0xff;
    v.push(not_answered(
        "IPv6 from a multicast source (ff..) -> dropped",
        web6(),
        client_frame(None, &spoofed),
    ));
    let mut spoofed = big_packet_v6(&f66, 1461);
    spoofed[8..24].fill(0);
    v.push(not_answered(
        "IPv6 from the unspecified source -> dropped",
        web6(),
        client_frame(None, &spoofed),
    ));
    let mut broadcast = client_frame(None, &big_packet(&f44, 1481));
    broadcast[..6].fill(0xff);
    v.push(not_answered(
        "IPv4 with DF in a frame to the Ethernet broadcast address -> dropped",
        web_and_dns(),
        broadcast,
    ));
    v
}

#[test]
fn oversized_client_packets_get_frag_needed_or_packet_too_big() -> Result<()> {
    fixtures::run(&mut Harness::new()?, &table())
}

/// The MTU the answer gives is the FIB's, less the outer header; a path that leaves an IPv6
/// client less than IPv6's minimum MTU (1280) is not answered, as no valid answer exists.
#[test]
fn the_answer_carries_the_fibs_mtu_and_ipv6_never_gets_less_than_1280() -> Result<()> {
    // ICMP errors forwarded to their servers, as the agent's configuration has by default.
    let mut h = crate::icmp::icmp_harness()?;
    ip(&["link", "set", "fx0", "mtu", "1300"])?;
    let f44 = Flow::v4("192.0.2.10", PROTO_TCP, 42010, 80);
    let f66 = Flow::v6("2001:db8::10", PROTO_TCP, 42011, 443);
    let f64 = Flow::v6("2001:db8::20", PROTO_UDP, 42012, 53);
    let ip44 = big_packet(&f44, 1281);
    let ip64 = big_packet_v6(&f64, 1281);
    let mut services = web_and_dns();
    services.extend(web6());
    services.extend(dns64());
    let rows = vec![
        fixture(
            "egress MTU 1300: IPv4 of 1281 bytes in IPv4 -> frag needed, MTU 1280",
            services.clone(),
            client_frame(None, &ip44),
            XDP_TX,
            verdict::TOO_BIG_ANSWERED,
            frag_needed(None, &ip44, 1280),
        ),
        fixture(
            "egress MTU 1300: IPv6 of 1281 bytes in IPv4 -> packet too big, MTU 1280 exactly",
            services.clone(),
            client_frame(None, &ip64),
            XDP_TX,
            verdict::TOO_BIG_ANSWERED,
            packet_too_big(None, &ip64, 1280),
        ),
        not_answered(
            "egress MTU 1300: IPv6 of 1261 bytes in IPv6 (1260 left < 1280) -> dropped",
            services.clone(),
            client_frame(None, &big_packet_v6(&f66, 1261)),
        ),
        // An ICMP error about a service's reply is tunnelled to its server (icmp.rs); one
        // too big for the tunnel gets no error about it (RFC 1812 section 4.3.2.7), even
        // with DF set.
        not_answered(
            "egress MTU 1300: a frag-needed error of 1298 bytes with DF, tunnelled -> dropped",
            services.clone(),
            client_frame(
                None,
                &crate::icmp::too_big_error(&f44, &crate::icmp::reply_of(&f44)[..1270]),
            ),
        ),
        fixture(
            "egress MTU 1300: IPv6 of 1260 bytes in IPv6 -> tunnelled (it fits)",
            services,
            client_frame(None, &big_packet_v6(&f66, 1260)),
            XDP_TX,
            verdict::TX,
            tx_to("fd09:2::11", None, &f66, &big_packet_v6(&f66, 1260)),
        ),
    ];
    fixtures::run(&mut h, &rows)
}

/// Turned off, an oversized packet with DF is dropped silently, as before answers existed;
/// on again, it is answered.
#[test]
fn with_answers_off_oversized_packets_are_dropped() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&web_and_dns())?;
    let flow = Flow::v4("192.0.2.10", PROTO_TCP, 42020, 80);
    let ip = big_packet(&flow, 1481);
    h.dataplane.set_too_big_answers(false, 1000)?;
    let (outcome, rose) = counting(&h.dataplane, || {
        run_xdp(&h.dataplane, h.fx0, &client_frame(None, &ip))
    })?;
    assert_eq!(outcome.0, XDP_DROP, "answers off: dropped");
    assert_eq!(rose[verdict::DROP_TOO_BIG as usize], 1);
    assert_eq!(rose[verdict::TOO_BIG_ANSWERED as usize], 0);
    h.dataplane.set_too_big_answers(true, 1000)?;
    let (action, out) = run_xdp(&h.dataplane, h.fx0, &client_frame(None, &ip))?;
    assert_eq!((action, out), (XDP_TX, frag_needed(None, &ip, 1480)));
    Ok(())
}

/// At 2 answers per second and CPU: a burst of 2 is answered, the third packet is dropped
/// and counted; half a second later the bucket holds one answer again, not two.
#[test]
fn answers_are_rate_limited_per_cpu() -> Result<()> {
    let _cpu = OnOneCpu::new();
    let mut h = Harness::new()?;
    h.dataplane.apply(&web_and_dns())?;
    h.dataplane.set_too_big_answers(true, 2)?;
    let flow = Flow::v4("192.0.2.10", PROTO_TCP, 42030, 80);
    let ip = big_packet(&flow, 1481);
    let answer = frag_needed(None, &ip, 1480);
    let run = || run_xdp(&h.dataplane, h.fx0, &client_frame(None, &ip));
    let start = Instant::now();
    let (outcomes, rose) = counting(&h.dataplane, || Ok(vec![run()?, run()?, run()?]))?;
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "the burst took {:?}: too slow for the bucket's arithmetic below",
        start.elapsed()
    );
    assert_eq!(outcomes[0], (XDP_TX, answer.clone()), "first: answered");
    assert_eq!(outcomes[1], (XDP_TX, answer.clone()), "second: answered");
    assert_eq!(outcomes[2].0, XDP_DROP, "third: rate-limited");
    assert_eq!(rose[verdict::TOO_BIG_ANSWERED as usize], 2);
    assert_eq!(rose[verdict::TOO_BIG_RATE_LIMITED as usize], 1);
    assert_eq!(rose[verdict::DROP_TOO_BIG as usize], 0);

    // 0.6 s refills 0.6 s of credit: one answer (0.5 s each), not two.
    std::thread::sleep(Duration::from_millis(600));
    let (outcomes, rose) = counting(&h.dataplane, || Ok(vec![run()?, run()?]))?;
    assert_eq!(outcomes[0], (XDP_TX, answer), "after 0.6 s: answered");
    assert_eq!(outcomes[1].0, XDP_DROP, "and the next one limited");
    assert_eq!(rose[verdict::TOO_BIG_ANSWERED as usize], 1);
    assert_eq!(rose[verdict::TOO_BIG_RATE_LIMITED as usize], 1);
    Ok(())
}
