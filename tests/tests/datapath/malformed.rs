//! Malformed, fragmented and truncated packets, as a fixture table: all pass untouched.
use std::net::IpAddr;

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anycast_tests::packet::{fix_ipv4_checksum, tcp, DF, TCP_ACK, TCP_PSH};
use anyhow::Result;

use crate::fixtures::{self, untouched, AgentFixture};
use crate::harness::*;

/// A change to a valid IP packet that makes it malformed.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

fn table() -> Vec<AgentFixture> {
    let mut v = Vec::new();
    // The four packets whose every truncation is a row.
    let frame_tcp = client_frame(
        None,
        &ip_packet(&Flow::v4("192.0.2.10", PROTO_TCP, 40000, 80)),
    );
    let frame_tcp6 = client_frame(
        None,
        &ip_packet(&Flow::v6("2001:db8::10", PROTO_TCP, 40002, 443)),
    );
    let frame_opt = client_frame(
        None,
        &ip_packet_with(
            &Flow::v4("192.0.2.10", PROTO_TCP, 40005, 80),
            DF,
            &[1, 1, 1, 1, 1, 1, 1, 0],
        ),
    );
    let frame_vlan = client_frame(
        Some(100),
        &ip_packet(&Flow::v4("192.0.2.10", PROTO_TCP, 40006, 80)),
    );

    // --- Malformed headers in whole frames addressed to a service.
    let f_bad = Flow::v4("192.0.2.10", PROTO_TCP, 40022, 80);
    let f_bad_udp = Flow::v4("192.0.2.10", PROTO_UDP, 40022, 53);
    let edited = |flow: &Flow, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut ip = ip_packet(flow);
        edit(&mut ip);
        if flow.src.is_ipv4() {
            fix_ipv4_checksum(&mut ip);
        }
        client_frame(None, &ip)
    };
    let set_len = |len: u16| move |ip: &mut Vec<u8>| ip[2..4].copy_from_slice(&len.to_be_bytes());
    let v4_malformed: [(&str, &Flow, Edit); 6] = [
        ("IHL 4", &f_bad, Box::new(|ip| ip[0] = 0x44)),
        (
            "version 6 in an IPv4 frame",
            &f_bad,
            Box::new(|ip| ip[0] = 0x65),
        ),
        (
            "total length 16, below the header's 20",
            &f_bad,
            Box::new(set_len(16)),
        ),
        (
            "total length 30: the TCP header is not inside the IP packet",
            &f_bad,
            Box::new(set_len(30)),
        ),
        (
            "total length 26: the UDP header is not inside the IP packet",
            &f_bad_udp,
            Box::new(set_len(26)),
        ),
        (
            "IHL 15 (60 bytes) with total length 60: no room for TCP",
            &f_bad,
            Box::new(|ip| {
                ip[0] = 0x4f;
                ip[2..4].copy_from_slice(&60u16.to_be_bytes());
            }),
        ),
    ];
    for (what, flow, edit) in &v4_malformed {
        v.push(untouched(
            format!("malformed IPv4 to a service: {what} -> pass untouched"),
            web_and_dns(),
            edited(flow, edit.as_ref()),
            verdict::PASS_MALFORMED,
        ));
    }
    let f_bad6 = Flow::v6("2001:db8::10", PROTO_TCP, 40023, 443);
    let v6_malformed: [(&str, Edit); 2] = [
        ("version 4 in an IPv6 frame", Box::new(|ip| ip[0] = 0x4a)),
        (
            "payload length 10: the TCP header is not inside the IP packet",
            Box::new(|ip| ip[4..6].copy_from_slice(&10u16.to_be_bytes())),
        ),
    ];
    for (what, edit) in &v6_malformed {
        v.push(untouched(
            format!("malformed IPv6 to a service: {what} -> pass untouched"),
            web6(),
            edited(&f_bad6, edit.as_ref()),
            verdict::PASS_MALFORMED,
        ));
    }

    // --- Fragments.
    let f_frag = Flow::v4("192.0.2.10", PROTO_TCP, 40016, 80);
    v.push(untouched(
        "IPv4 first fragment (MF set) to a service -> pass untouched",
        web_and_dns(),
        client_frame(None, &ip_packet_with(&f_frag, 0x2000, &[])),
        verdict::PASS_FRAGMENT,
    ));
    v.push(untouched(
        "IPv4 later fragment (offset 24 bytes, MF clear) to a service -> pass untouched",
        web_and_dns(),
        client_frame(None, &ip_packet_with(&f_frag, 0x0003, &[])),
        verdict::PASS_FRAGMENT,
    ));
    let mut frag6 = vec![PROTO_TCP, 0, 0x00, 0x01]; // offset 0, M set
    frag6.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    frag6.extend_from_slice(&tcp(40017, 443, TCP_PSH | TCP_ACK, PAYLOAD));
    let ip_frag6 =
        client_ip(IpAddr::V6(CLIENT_V6), "2001:db8::10".parse().unwrap(), 44).packet(&frag6);
    v.push(untouched(
        "IPv6 with a Fragment header to a service -> pass untouched",
        web6(),
        client_frame(None, &ip_frag6),
        verdict::PASS_FRAGMENT,
    ));

    // --- Every truncation of four packets.
    for (what, full, services) in [
        ("IPv4 TCP", &frame_tcp, web_and_dns()),
        ("IPv6 TCP", &frame_tcp6, web6()),
        ("802.1Q IPv4 TCP", &frame_vlan, web_and_dns()),
        ("IPv4 with options TCP", &frame_opt, web_and_dns()),
    ] {
        for len in 14..full.len() {
            v.push(untouched(
                format!(
                    "{what} truncated to {len} of {} bytes -> pass untouched",
                    full.len()
                ),
                services.clone(),
                full[..len].to_vec(),
                verdict::PASS_MALFORMED,
            ));
        }
    }
    v
}

#[test]
fn malformed_fragmented_and_truncated_packets_pass_untouched() -> Result<()> {
    fixtures::run(&mut Harness::new()?, &table())
}
