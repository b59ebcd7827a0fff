//! ICMP to the anycast addresses, as a fixture table: errors about a service's reply
//! (fragmentation needed and other destination unreachables, packet too big) are tunnelled
//! whole to the server of the quoted flow, for every kind of tunnel; inconsistent quotes
//! pass untouched, counted; echo requests are answered with exact reply bytes. Checksums of
//! the expected frames are computed in full here, independently of the program's
//! incremental updates.
use std::net::IpAddr;

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anycast_tests::packet::{inet_checksum, TCP_ACK, TCP_PSH};
use anyhow::Result;

use crate::fixtures::{self, fixture, untouched, AgentFixture};
use crate::harness::*;

/// The router on the way to the client that reports the error.
pub const ROUTER_V4: &str = "203.0.113.1";
pub const ROUTER_V6: &str = "2001:db8:ffff::1";

/// The ICMP (ICMPv6) message `body` (type, code, checksum 0, rest) with its checksum: over
/// the message for ICMPv4, over the pseudo-header and the message for ICMPv6 (RFC 4443
/// section 2.3).
pub fn icmp_message(src: IpAddr, dst: IpAddr, mut body: Vec<u8>) -> Vec<u8> {
    body[2] = 0;
    body[3] = 0;
    let sum = match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(body.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            pseudo.extend_from_slice(&body);
            inet_checksum(&pseudo)
        }
        _ => inet_checksum(&body),
    };
    body[2..4].copy_from_slice(&sum.to_be_bytes());
    body
}

/// An ICMP packet from `src` to `dst` as a router sends it (IPv4 id 0x1c46, TTL 61; IPv6
/// hop limit 59), of type `kind`, code `code`, 4 bytes `rest`, then `quote`.
pub fn icmp_packet(
    src: IpAddr,
    dst: IpAddr,
    kind: u8,
    code: u8,
    rest: u32,
    quote: &[u8],
) -> Vec<u8> {
    let mut body = vec![kind, code, 0, 0];
    body.extend_from_slice(&rest.to_be_bytes());
    body.extend_from_slice(quote);
    let proto = if src.is_ipv4() { 1 } else { 58 };
    host_ip(src, dst, proto).packet(&icmp_message(src, dst, body))
}

/// The reply a server sent to the client of `flow` (from the service address and port), as
/// the router saw it: a full-size TCP segment, or a UDP datagram.
pub fn reply_of(flow: &Flow) -> Vec<u8> {
    let payload = vec![0x5a; 1400];
    let l4 = if flow.proto == PROTO_TCP {
        anycast_tests::packet::tcp(flow.dport, flow.sport, TCP_PSH | TCP_ACK, &payload)
    } else {
        anycast_tests::packet::udp(flow.dport, flow.sport, &payload)
    };
    host_ip(flow.dst, flow.src, flow.proto).packet(&l4)
}

/// What a router quotes of `reply`: IPv4 the header and 8 bytes (RFC 792), IPv6 as much as
/// keeps the error within 1280 bytes (RFC 4443 section 2.4 (c)).
pub fn quote(reply: &[u8]) -> Vec<u8> {
    let n = if reply[0] >> 4 == 4 {
        usize::from(reply[0] & 0x0f) * 4 + 8
    } else {
        1280 - 40 - 8
    };
    reply[..n.min(reply.len())].to_vec()
}

/// "Fragmentation needed" (ICMPv4 3/4, next-hop MTU 1280) or "packet too big" (ICMPv6 2/0,
/// MTU 1280) from the router, about the server's `reply` to the client of `flow`.
pub fn too_big_error(flow: &Flow, quoted: &[u8]) -> Vec<u8> {
    match flow.dst {
        IpAddr::V4(_) => icmp_packet(ROUTER_V4.parse().unwrap(), flow.dst, 3, 4, 1280, quoted),
        IpAddr::V6(_) => icmp_packet(ROUTER_V6.parse().unwrap(), flow.dst, 2, 0, 1280, quoted),
    }
}

/// An echo request from `src` to `dst` (identifier 0x4242, sequence 7, 24 bytes of data).
pub fn echo_request(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    echo(src, dst, if src.is_ipv4() { 8 } else { 128 }, 61)
}

/// The agent's reply to [`echo_request`]`(src, dst)`: from `dst` to `src`, type 0 (129),
/// TTL (hop limit) 64, the request's id, DSCP/ECN and flow label kept.
pub fn echo_reply(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    echo(dst, src, if src.is_ipv4() { 0 } else { 129 }, 64)
}

fn echo(src: IpAddr, dst: IpAddr, kind: u8, ttl: u8) -> Vec<u8> {
    let mut body = vec![kind, 0, 0, 0, 0x42, 0x42, 0, 7];
    body.extend(b"anycast ping fixture !!!");
    let proto = if src.is_ipv4() { 1 } else { 58 };
    client_ip(src, dst, proto)
        .ttl(ttl)
        .packet(&icmp_message(src, dst, body))
}

fn addr(a: &str) -> IpAddr {
    a.parse().unwrap()
}

/// `ip`, edited by `f`.
fn edited(ip: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut q = ip.to_vec();
    f(&mut q);
    q
}

fn table() -> Vec<AgentFixture> {
    let mut v = Vec::new();
    let web46 = || {
        vec![service(
            "web46",
            "192.0.2.20",
            PROTO_TCP,
            80,
            &[("fd09:2::11", 1)],
        )]
    };
    let dns64 = || {
        vec![service(
            "dns64",
            "2001:db8::20",
            PROTO_UDP,
            53,
            &[("10.9.2.11", 1)],
        )]
    };

    // --- Tunnelled to the server of the quoted flow, each kind of tunnel.
    for (what, services, flow, server) in [
        (
            "frag-needed about 192.0.2.10:80 -> client -> IPv4-in-IPv4 to 10.9.2.11",
            web_and_dns(),
            Flow::v4("192.0.2.10", PROTO_TCP, 40100, 80),
            "10.9.2.11",
        ),
        (
            "packet-too-big about [2001:db8::10]:443 -> client -> IPv6-in-IPv6 to fd09:2::11",
            web6(),
            Flow::v6("2001:db8::10", PROTO_TCP, 40101, 443),
            "fd09:2::11",
        ),
        (
            "frag-needed about 192.0.2.20:80 (server fd09:2::11) -> IPv4-in-IPv6",
            web46(),
            Flow::v4("192.0.2.20", PROTO_TCP, 40102, 80),
            "fd09:2::11",
        ),
        (
            "packet-too-big about UDP [2001:db8::20]:53 (server 10.9.2.11) -> IPv6-in-IPv4",
            dns64(),
            Flow::v6("2001:db8::20", PROTO_UDP, 40103, 53),
            "10.9.2.11",
        ),
    ] {
        let error = too_big_error(&flow, &quote(&reply_of(&flow)));
        v.push(fixture(
            format!("{what}, XDP_TX"),
            services,
            client_frame(None, &error),
            XDP_TX,
            verdict::ICMP_TO_SERVER,
            tx_to(server, None, &flow, &error),
        ));
    }
    // The whole reply quoted (an IPv4 router may quote more than 8 bytes).
    let f = Flow::v4("192.0.2.10", PROTO_UDP, 40104, 53);
    let port_unreachable = icmp_packet(addr(ROUTER_V4), f.dst, 3, 3, 0, &reply_of(&f)[..200]);
    v.push(fixture(
        "port unreachable (3/3) quoting 200 bytes of a UDP reply from 192.0.2.10:53 -> 10.9.2.11",
        web_and_dns(),
        client_frame(None, &port_unreachable),
        XDP_TX,
        verdict::ICMP_TO_SERVER,
        tx_to("10.9.2.11", None, &f, &port_unreachable),
    ));
    let f = Flow::v6("2001:db8::10", PROTO_TCP, 40105, 443);
    let unreachable6 = icmp_packet(addr(ROUTER_V6), f.dst, 1, 3, 0, &quote(&reply_of(&f)));
    v.push(fixture(
        "ICMPv6 address unreachable (1/3) about [2001:db8::10]:443 -> fd09:2::11",
        web6(),
        client_frame(None, &unreachable6),
        XDP_TX,
        verdict::ICMP_TO_SERVER,
        tx_to("fd09:2::11", None, &f, &unreachable6),
    ));
    let f = Flow::v4("192.0.2.10", PROTO_TCP, 40106, 80);
    let tagged = too_big_error(&f, &quote(&reply_of(&f)));
    v.push(fixture(
        "802.1Q VID 100 frag-needed -> IPv4-in-IPv4, tag popped, XDP_TX",
        web_and_dns(),
        client_frame(Some(100), &tagged),
        XDP_TX,
        verdict::ICMP_TO_SERVER,
        tx_to("10.9.2.11", None, &f, &tagged),
    ));
    let f = Flow::v4("192.0.2.40", PROTO_TCP, 40107, 80);
    let redirected = too_big_error(&f, &quote(&reply_of(&f)));
    v.push(fixture(
        "frag-needed about 192.0.2.40:80 (server 10.9.3.11 via fy0) -> XDP_REDIRECT",
        vec![service(
            "redir",
            "192.0.2.40",
            PROTO_TCP,
            80,
            &[("10.9.3.11", 1)],
        )],
        client_frame(None, &redirected),
        XDP_REDIRECT,
        verdict::ICMP_TO_SERVER,
        encapsulated(
            neighbour_mac("10.9.3.11"),
            FY0_MAC,
            None,
            &f,
            &redirected,
            "10.9.3.11",
        ),
    ));

    // --- Inconsistent quotes pass untouched.
    let f4 = Flow::v4("192.0.2.10", PROTO_TCP, 40110, 80);
    let r4 = reply_of(&f4);
    let f6 = Flow::v6("2001:db8::10", PROTO_TCP, 40111, 443);
    let r6 = reply_of(&f6);
    let malformed: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "IPv4 quote of the header and 4 bytes",
            false,
            r4[..24].to_vec(),
        ),
        ("IPv4 quote of 12 bytes of header", false, r4[..12].to_vec()),
        (
            "IPv6 quote of the header and 4 bytes",
            true,
            r6[..44].to_vec(),
        ),
        ("IPv6 quote of 30 bytes of header", true, r6[..30].to_vec()),
        ("ICMPv4 quoting an IPv6 packet", false, quote(&r6)),
        ("ICMPv6 quoting an IPv4 packet", true, r4[..60].to_vec()),
        (
            "IPv4 quote with IHL 4",
            false,
            edited(&quote(&r4), |q| q[0] = 0x44),
        ),
        (
            "IPv4 quote with total length 24 (< header + 8)",
            false,
            edited(&quote(&r4), |q| {
                q[2..4].copy_from_slice(&24u16.to_be_bytes())
            }),
        ),
        (
            "IPv4 quote of a later fragment (offset 8)",
            false,
            edited(&quote(&r4), |q| {
                q[6..8].copy_from_slice(&1u16.to_be_bytes())
            }),
        ),
        (
            "IPv4 quote with IHL 15 (its ports beyond the quote)",
            false,
            edited(&quote(&r4), |q| q[0] = 0x4f),
        ),
        (
            "IPv6 quote with payload length 4",
            true,
            edited(&quote(&r6), |q| {
                q[4..6].copy_from_slice(&4u16.to_be_bytes())
            }),
        ),
    ];
    for (what, six, quoted) in malformed {
        let flow = if six { &f6 } else { &f4 };
        let services = if six { web6() } else { web_and_dns() };
        v.push(untouched(
            format!("{what} -> pass untouched"),
            services,
            client_frame(None, &too_big_error(flow, &quoted)),
            verdict::PASS_ICMP_MALFORMED,
        ));
    }
    // The quote's ports lie in the frame's padding, beyond the ICMP packet's IP length.
    let mut short = too_big_error(&f4, &quote(&r4));
    let cut = short.len() - 4;
    short[2..4].copy_from_slice(&(cut as u16).to_be_bytes());
    anycast_tests::packet::fix_ipv4_checksum(&mut short);
    v.push(untouched(
        "frag-needed whose IP length ends before the quoted ports (the rest is padding) -> pass",
        web_and_dns(),
        client_frame(None, &short),
        verdict::PASS_ICMP_MALFORMED,
    ));

    // --- Quotes of packets that are not a service's reply.
    let not_service: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "IPv4 quote from another address (192.0.2.99)",
            false,
            edited(&quote(&r4), |q| {
                q[12..16].copy_from_slice(&[192, 0, 2, 99]);
                anycast_tests::packet::fix_ipv4_checksum(q);
            }),
        ),
        (
            "IPv4 quote from port 8080 (no service)",
            false,
            edited(&quote(&r4), |q| {
                q[20..22].copy_from_slice(&8080u16.to_be_bytes())
            }),
        ),
        (
            "IPv4 quote of an ICMP packet",
            false,
            edited(&quote(&r4), |q| {
                q[9] = 1;
                anycast_tests::packet::fix_ipv4_checksum(q);
            }),
        ),
        (
            "IPv6 quote from another address",
            true,
            edited(&quote(&r6), |q| q[23] = 0x99),
        ),
        (
            "IPv6 quote with an extension header (hop-by-hop)",
            true,
            edited(&quote(&r6), |q| q[6] = 0),
        ),
    ];
    for (what, six, quoted) in not_service {
        let flow = if six { &f6 } else { &f4 };
        let services = if six { web6() } else { web_and_dns() };
        v.push(untouched(
            format!("{what} -> pass untouched"),
            services,
            client_frame(None, &too_big_error(flow, &quoted)),
            verdict::PASS_ICMP_NOT_SERVICE,
        ));
    }

    // --- Other ICMP: as before.
    let other = Flow::v4("192.0.2.11", PROTO_TCP, 40112, 80);
    v.push(untouched(
        "frag-needed to 192.0.2.11 (no service address) -> pass",
        web_and_dns(),
        client_frame(None, &too_big_error(&other, &quote(&reply_of(&other)))),
        verdict::PASS_NOT_SERVICE,
    ));
    v.push(untouched(
        "time exceeded (11/0) to the service address -> pass",
        web_and_dns(),
        client_frame(
            None,
            &icmp_packet(addr(ROUTER_V4), f4.dst, 11, 0, 0, &quote(&r4)),
        ),
        verdict::PASS_NOT_SERVICE,
    ));
    v.push(untouched(
        "ICMPv4 (protocol 1) in IPv6 to the service address -> pass",
        web6(),
        client_frame(
            None,
            &host_ip(addr(ROUTER_V6), f6.dst, 1).packet(&icmp_message(
                addr(ROUTER_V6),
                f6.dst,
                [vec![3, 4, 0, 0, 0, 0, 5, 0], quote(&r4)].concat(),
            )),
        ),
        verdict::PASS_NOT_SERVICE,
    ));
    v.push(untouched(
        "ICMP of 4 bytes to the service address -> pass",
        web_and_dns(),
        client_frame(
            None,
            &host_ip(addr(ROUTER_V4), f4.dst, 1).packet(&[3, 4, 0xfc, 0xfb]),
        ),
        verdict::PASS_MALFORMED,
    ));

    // --- Echo requests.
    let client4 = IpAddr::V4(CLIENT_V4);
    let client6 = IpAddr::V6(CLIENT_V6);
    let s4 = addr("192.0.2.10");
    let s6 = addr("2001:db8::10");
    for (what, vlan, services, client, service) in [
        ("IPv4 echo request", None, web_and_dns(), client4, s4),
        ("IPv6 echo request", None, web6(), client6, s6),
        (
            "802.1Q VID 100 IPv4 echo request",
            Some(100),
            web_and_dns(),
            client4,
            s4,
        ),
        (
            "802.1Q VID 100 IPv6 echo request",
            Some(100),
            web6(),
            client6,
            s6,
        ),
    ] {
        v.push(fixture(
            format!("{what} to {service} -> echo reply, MACs and addresses swapped, XDP_TX"),
            services,
            ethernet_frame(FX0_MAC, CLIENT_MAC, vlan, &echo_request(client, service)),
            XDP_TX,
            verdict::ECHO_REPLY,
            ethernet_frame(CLIENT_MAC, FX0_MAC, vlan, &echo_reply(client, service)),
        ));
    }
    v.push(untouched(
        "echo request to 192.0.2.11 (no service address) -> pass",
        web_and_dns(),
        client_frame(None, &echo_request(client4, addr("192.0.2.11"))),
        verdict::PASS_NOT_SERVICE,
    ));
    for (what, services, from, to) in [
        (
            "from 224.0.0.1 (multicast)",
            web_and_dns(),
            addr("224.0.0.1"),
            s4,
        ),
        (
            "from 255.255.255.255",
            web_and_dns(),
            addr("255.255.255.255"),
            s4,
        ),
        ("from 127.0.0.1", web_and_dns(), addr("127.0.0.1"), s4),
        ("from ff02::1 (multicast)", web6(), addr("ff02::1"), s6),
        ("from :: (unspecified)", web6(), addr("::"), s6),
    ] {
        v.push(untouched(
            format!("echo request {what} -> not answered, pass"),
            services,
            client_frame(None, &echo_request(from, to)),
            verdict::PASS_ICMP_MALFORMED,
        ));
    }
    v
}

fn ethernet_frame(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    anycast_tests::packet::ethernet(dst, src, vlan, ip)
}

/// The agent with both ICMP features on (the agent's configuration's default).
pub fn icmp_harness() -> Result<Harness> {
    let mut h = Harness::new()?;
    h.dataplane.set_icmp(true, true)?;
    Ok(h)
}

#[test]
fn icmp_fixtures_produce_expected_frames_and_verdicts() -> Result<()> {
    fixtures::run(&mut icmp_harness()?, &table())
}

/// The tunnelled error, as the server's decapsulator gets it: stripped, the ICMP packet to
/// the anycast address goes to the server's stack (its kernel lowers the path MTU).
#[test]
fn server_decapsulates_a_tunnelled_error_for_its_stack() -> Result<()> {
    use anycast_common::decap;
    let mut side = ServerSide::new(&[])?;
    let mut rows = Vec::new();
    for (flow, server) in [
        (Flow::v4("192.0.2.10", PROTO_TCP, 40120, 80), "10.9.2.11"),
        (
            Flow::v6("2001:db8::10", PROTO_TCP, 40121, 443),
            "fd09:2::11",
        ),
        (Flow::v4("192.0.2.20", PROTO_TCP, 40122, 80), "fd09:2::11"),
        (Flow::v6("2001:db8::20", PROTO_UDP, 40123, 53), "10.9.2.11"),
    ] {
        let error = too_big_error(&flow, &quote(&reply_of(&flow)));
        let served: &'static str = if flow.dst.is_ipv4() {
            if flow.dst == addr("192.0.2.10") {
                "192.0.2.10"
            } else {
                "192.0.2.20"
            }
        } else if flow.dst == addr("2001:db8::10") {
            "2001:db8::10"
        } else {
            "2001:db8::20"
        };
        let input = tx_to(server, None, &flow, &error);
        rows.push(fixtures::Fixture::new(
            format!("error about {flow:?} tunnelled to {server} -> decapsulated"),
            vec![served],
            input,
            XDP_PASS,
            decap::DECAPSULATED,
            anycast_tests::packet::ethernet(neighbour_mac(server), FX0_MAC, None, &error),
        ));
    }
    fixtures::run(&mut fixtures::Decap(&mut side), &rows)
}
