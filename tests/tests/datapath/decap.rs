//! The server's decapsulation (`anycast_decap`, XDP), as a fixture table: IP-in-IP whose
//! inner destination is an anycast address the server answers for loses its outer header
//! (the L2 header, VLAN tag included, moves up and takes the inner ether type); anything
//! else passes untouched. The program always returns XDP_PASS; what it did is counted in
//! `DECAP_STATS`.
use std::net::IpAddr;

use anycast_common::{decap, PROTO_TCP};
use anycast_tests::packet::{ethernet, Ip, MF};
use anyhow::Result;

use crate::fixtures::{self, Decap, Fixture};
use crate::harness::*;

/// The anycast addresses of the rows' services.
const SERVED: [&str; 2] = ["192.0.2.10", "2001:db8::10"];

/// The frame the server's stack should get: `inner` behind the tunnel frame's own MACs.
fn stripped(server: &str, vlan: Option<u16>, inner: &[u8]) -> Vec<u8> {
    ethernet(neighbour_mac(server), FX0_MAC, vlan, inner)
}

fn table() -> Vec<Fixture<Vec<&'static str>>> {
    let served = || SERVED.to_vec();
    let mut v = Vec::new();
    let f4 = Flow::v4("192.0.2.10", PROTO_TCP, 42000, 80);
    let f6 = Flow::v6("2001:db8::10", PROTO_TCP, 42001, 443);
    let (ip4, ip6) = (ip_packet(&f4), ip_packet(&f6));

    // --- Decapsulated: every combination of families, behind a VLAN tag, outer options.
    for (what, server, vlan, flow, inner) in [
        ("IPv4-in-IPv4", "10.9.2.11", None, &f4, &ip4),
        ("IPv6-in-IPv4", "10.9.2.11", None, &f6, &ip6),
        ("IPv4-in-IPv6", "fd09:2::11", None, &f4, &ip4),
        ("IPv6-in-IPv6", "fd09:2::11", None, &f6, &ip6),
        ("802.1Q VID 7 IPv4-in-IPv4", "10.9.2.11", Some(7), &f4, &ip4),
        (
            "802.1Q VID 7 IPv6-in-IPv6",
            "fd09:2::11",
            Some(7),
            &f6,
            &ip6,
        ),
    ] {
        v.push(Fixture::new(
            format!("{what} from the agent to a served address -> outer header stripped"),
            served(),
            tx_to(server, vlan, flow, inner),
            XDP_PASS,
            decap::DECAPSULATED,
            stripped(server, vlan, inner),
        ));
    }
    let agent = IpAddr::V4(AGENT_V4);
    let with_options = Ip::new(agent, SERVER_A.parse().unwrap(), 4)
        .options(&[1, 1, 1, 0])
        .packet(&ip4);
    v.push(Fixture::new(
        "IPv4-in-IPv4 whose outer header has 4 bytes of options (IHL 6) -> all 24 bytes stripped",
        served(),
        ethernet(neighbour_mac(SERVER_A), FX0_MAC, None, &with_options),
        XDP_PASS,
        decap::DECAPSULATED,
        stripped(SERVER_A, None, &ip4),
    ));

    // --- Tunnelled, but not to an address this server answers for.
    let other = ip_packet(&Flow::v4("192.0.2.11", PROTO_TCP, 42002, 80));
    v.push(Fixture::untouched(
        "IPv4-in-IPv4 whose inner destination 192.0.2.11 is not served -> untouched",
        served(),
        tx_to(SERVER_A, None, &f4, &other),
        XDP_PASS,
        decap::PASS_NOT_SERVED,
    ));
    v.push(Fixture::untouched(
        "IPv6-in-IPv6 while the server answers for nothing -> untouched",
        vec![],
        tx_to("fd09:2::11", None, &f6, &ip6),
        XDP_PASS,
        decap::PASS_NOT_SERVED,
    ));

    // --- Not a tunnel.
    for (what, input) in [
        (
            "plain IPv4 TCP to a served address",
            client_frame(None, &ip4),
        ),
        (
            "plain IPv6 TCP to a served address",
            client_frame(None, &ip6),
        ),
        ("ARP", arp_request()),
    ] {
        v.push(Fixture::untouched(
            format!("{what} -> untouched"),
            served(),
            input,
            XDP_PASS,
            decap::PASS_NOT_TUNNEL,
        ));
    }
    for (what, frag) in [
        ("first fragment (MF)", MF),
        ("later fragment (offset 24)", 3),
    ] {
        let outer = Ip::new(agent, SERVER_A.parse().unwrap(), 4)
            .frag(frag)
            .packet(&ip4);
        v.push(Fixture::untouched(
            format!("IPv4-in-IPv4 whose outer packet is a {what} -> untouched"),
            served(),
            ethernet(neighbour_mac(SERVER_A), FX0_MAC, None, &outer),
            XDP_PASS,
            decap::PASS_NOT_TUNNEL,
        ));
    }

    // --- Malformed.
    let mut ihl4 = tx_to(SERVER_A, None, &f4, &ip4);
    ihl4[14] = 0x44;
    v.push(Fixture::untouched(
        "IPv4-in-IPv4 whose outer IHL is 4 -> untouched",
        served(),
        ihl4,
        XDP_PASS,
        decap::PASS_MALFORMED,
    ));
    for (what, full, headers) in [
        (
            "IPv4-in-IPv4",
            tx_to(SERVER_A, None, &f4, &ip4),
            14 + 20 + 20,
        ),
        (
            "IPv6-in-IPv6",
            tx_to("fd09:2::11", None, &f6, &ip6),
            14 + 40 + 40,
        ),
    ] {
        // Cut inside the outer or the inner IP header.
        for len in 14..headers {
            v.push(Fixture::untouched(
                format!(
                    "{what} truncated to {len} of {} bytes -> untouched",
                    full.len()
                ),
                served(),
                full[..len].to_vec(),
                XDP_PASS,
                decap::PASS_MALFORMED,
            ));
        }
    }
    v
}

#[test]
fn decapsulation_fixtures_produce_expected_frames_and_counts() -> Result<()> {
    let mut side = ServerSide::new(&SERVED)?;
    fixtures::run(&mut Decap(&mut side), &table())
}
