//! Reverse tunnel, agent side: a server's SYN-ACK, IP-in-IP from its real address to the
//! agent, decapsulated and handed to the kernel for the client; counted per server.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anycast_ctl::dataplane::{coarse_clock_ns, Dataplane, DesiredService, ReverseCounters};
use anycast_tests::packet::{ethernet, fix_ipv4_checksum, hex, MF, TCP_RST, TCP_SYN_ACK};
use anyhow::Result;

use crate::fixtures::{self, fixture, untouched, AgentFixture, OnPort};
use crate::harness::*;

/// `inner` in an outer header from `real` to `agent` as a server's host sends it (IPv4: DF,
/// TTL 61; IPv6: hop limit 59; TOS/traffic class 0), in a frame from the server to the
/// agent's fx0.
fn reverse_frame(vlan: Option<u16>, real: &str, agent: IpAddr, inner: &[u8]) -> Vec<u8> {
    let next = if inner[0] >> 4 == 4 { 4u8 } else { 41u8 };
    let outer = host_ip(real.parse().unwrap(), agent, next).packet(inner);
    ethernet(FX0_MAC, SERVER_MAC, vlan, &outer)
}

/// What the agent passes to the kernel: the inner packet in the same frame.
fn decapsulated(vlan: Option<u16>, inner: &[u8]) -> Vec<u8> {
    ethernet(FX0_MAC, SERVER_MAC, vlan, inner)
}

/// 192.0.2.10 tcp 80 served by 10.9.2.11; [2001:db8::10] tcp 443 served by 10.9.2.11 and
/// fd09:2::11; 192.0.2.30 udp (every port) served by 10.9.2.11.
fn reverse_services() -> Vec<DesiredService> {
    vec![
        service("web", "192.0.2.10", PROTO_TCP, 80, &[("10.9.2.11", 1)]),
        service(
            "web6",
            "2001:db8::10",
            PROTO_TCP,
            443,
            &[("10.9.2.11", 1), ("fd09:2::11", 1)],
        ),
        service("any-udp", "192.0.2.30", PROTO_UDP, 0, &[("10.9.2.11", 1)]),
    ]
}

fn table() -> Vec<AgentFixture> {
    let mut v = Vec::new();
    let a4 = IpAddr::V4(AGENT_V4);
    let a6 = IpAddr::V6(AGENT_V6);
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40100, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40101, TCP_SYN_ACK);
    for (what, vlan, real, agent, inner) in [
        ("IPv4-in-IPv4", None, "10.9.2.11", a4, &syn_ack4),
        ("IPv6-in-IPv4", None, "10.9.2.11", a4, &syn_ack6),
        ("IPv4-in-IPv6", None, "fd09:2::11", a6, &syn_ack4),
        ("IPv6-in-IPv6", None, "fd09:2::11", a6, &syn_ack6),
        (
            "802.1Q VID 7 IPv4-in-IPv4",
            Some(7),
            "10.9.2.11",
            a4,
            &syn_ack4,
        ),
    ] {
        v.push(fixture(
            format!("reverse tunnel: {what} SYN-ACK from server {real} to the agent -> outer header stripped, XDP_PASS"),
            reverse_services(),
            reverse_frame(vlan, real, agent, inner),
            XDP_PASS,
            verdict::REVERSE_TUNNEL,
            decapsulated(vlan, inner),
        ));
    }
    let udp_answer = answer("192.0.2.30", PROTO_UDP, 5353, 40102, 0);
    v.push(fixture(
        "reverse tunnel: UDP answer from 192.0.2.30:5353 (a port-wildcard service) -> stripped, XDP_PASS",
        reverse_services(),
        reverse_frame(None, "10.9.2.11", a4, &udp_answer),
        XDP_PASS,
        verdict::REVERSE_TUNNEL,
        decapsulated(None, &udp_answer),
    ));
    let icmp = client_ip("192.0.2.10".parse().unwrap(), IpAddr::V4(CLIENT_V4), 1)
        .packet(&[0, 0, 0xff, 0xff, 0, 0, 0, 0]);
    for (what, real, agent, inner) in [
        (
            "outer destination not the agent (10.9.2.12)",
            "10.9.2.11",
            IpAddr::V4("10.9.2.12".parse().unwrap()),
            syn_ack4.clone(),
        ),
        (
            "inner source 192.0.2.11 is no service",
            "10.9.2.11",
            a4,
            answer("192.0.2.11", PROTO_TCP, 80, 40103, TCP_SYN_ACK),
        ),
        (
            "inner source port 81 is not the service's",
            "10.9.2.11",
            a4,
            answer("192.0.2.10", PROTO_TCP, 81, 40103, TCP_SYN_ACK),
        ),
        (
            "inner UDP from the TCP service's address and port",
            "10.9.2.11",
            a4,
            answer("192.0.2.10", PROTO_UDP, 80, 40103, 0),
        ),
        ("inner ICMP from the service address", "10.9.2.11", a4, icmp),
    ] {
        v.push(untouched(
            format!("reverse tunnel: {what} -> pass untouched"),
            reverse_services(),
            reverse_frame(None, real, agent, &inner),
            verdict::PASS_NOT_SERVICE,
        ));
    }
    // Outer sources that are no installed server's real address: strangers, whatever the
    // inner packet.
    for (what, real, agent, inner) in [
        ("10.9.2.99", "10.9.2.99", a4, &syn_ack4),
        ("fd09:2::99", "fd09:2::99", a6, &syn_ack6),
        (
            "198.51.100.7 (the client's own address)",
            "198.51.100.7",
            a4,
            &syn_ack4,
        ),
        (
            "10.9.2.12 (a neighbour on the servers' link, serving nothing)",
            "10.9.2.12",
            a4,
            &answer("192.0.2.10", PROTO_TCP, 80, 40104, TCP_RST),
        ),
    ] {
        v.push(untouched(
            format!("reverse tunnel: outer source {what} is no server of ours -> pass untouched"),
            reverse_services(),
            reverse_frame(None, real, agent, inner),
            verdict::PASS_REVERSE_STRANGER,
        ));
    }
    let mut frag = syn_ack4.clone();
    frag[6..8].copy_from_slice(&MF.to_be_bytes());
    fix_ipv4_checksum(&mut frag);
    v.push(untouched(
        "reverse tunnel: the inner packet is a fragment -> pass untouched",
        reverse_services(),
        reverse_frame(None, "10.9.2.11", a4, &frag),
        verdict::PASS_FRAGMENT,
    ));
    let full = reverse_frame(None, "10.9.2.11", a4, &syn_ack4);
    for len in 14..full.len() {
        v.push(untouched(
            format!(
                "reverse tunnel: IPv4-in-IPv4 truncated to {len} of {} bytes -> pass untouched",
                full.len()
            ),
            reverse_services(),
            full[..len].to_vec(),
            verdict::PASS_MALFORMED,
        ));
    }
    // The outer IPv4 header says 20 bytes more than the frame holds: the inner header is
    // cut short, so nothing is decapsulated.
    let mut short = full.clone();
    let inner_cut = 14 + 20 + 12;
    short.truncate(inner_cut);
    let outer_total = (short.len() - 14) as u16;
    short[16..18].copy_from_slice(&outer_total.to_be_bytes());
    fix_ipv4_checksum(&mut short[14..]);
    v.push(untouched(
        "reverse tunnel: the inner IPv4 header is cut short (12 of 20 bytes) -> pass untouched",
        reverse_services(),
        short,
        verdict::PASS_MALFORMED,
    ));
    v
}

fn reverse_counts(dp: &Dataplane) -> Result<BTreeMap<IpAddr, ReverseCounters>> {
    dp.reverse_counters()
}

#[test]
fn reverse_tunnelled_packets_are_counted_per_server_and_syns_per_server() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&reverse_services())?;
    let a4 = IpAddr::V4(AGENT_V4);
    let a6 = IpAddr::V6(AGENT_V6);
    let s4: IpAddr = "10.9.2.11".parse()?;
    let s6: IpAddr = "fd09:2::11".parse()?;
    let c = reverse_counts(&h.dataplane)?;
    assert_eq!(
        c.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([s4, s6]),
        "one entry per installed server address"
    );
    assert!(
        c.values().all(|x| *x == ReverseCounters::default()),
        "{c:?}"
    );

    // Three reverse packets from 10.9.2.11 (two families inside), one from fd09:2::11.
    let t0 = coarse_clock_ns();
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40200, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40201, TCP_SYN_ACK);
    for (real, agent, inner) in [
        ("10.9.2.11", a4, &syn_ack4),
        ("10.9.2.11", a4, &syn_ack4),
        ("10.9.2.11", a4, &syn_ack6),
        ("fd09:2::11", a6, &syn_ack4),
    ] {
        let (action, _) = run_xdp(
            &h.dataplane,
            h.fx0,
            &reverse_frame(None, real, agent, inner),
        )?;
        assert_eq!(action_name(action), action_name(XDP_PASS));
    }
    // Refused ones count nothing.
    run_xdp(
        &h.dataplane,
        h.fx0,
        &reverse_frame(None, "10.9.2.99", a4, &syn_ack4),
    )?;
    run_xdp(
        &h.dataplane,
        h.fx0,
        &reverse_frame(
            None,
            "10.9.2.11",
            a4,
            &answer("192.0.2.11", PROTO_TCP, 80, 1, TCP_SYN_ACK),
        ),
    )?;
    let c = reverse_counts(&h.dataplane)?;
    assert_eq!(c[&s4].reverse_packets, 3, "{c:?}");
    assert_eq!(c[&s6].reverse_packets, 1, "{c:?}");
    let now = coarse_clock_ns();
    for s in [s4, s6] {
        assert!(
            (t0.saturating_sub(20_000_000)..=now + 20_000_000).contains(&c[&s].last_reverse_ns),
            "{s}: last seen {} not within [{t0}, {now}] (coarse clock)",
            c[&s].last_reverse_ns
        );
    }
    assert_eq!(
        counter(&h.dataplane, verdict::REVERSE_TUNNEL)?,
        4,
        "reverse_tunnel verdicts"
    );

    // SYNs (without ACK) forwarded to a server are counted for its address; other TCP
    // packets and UDP are not.
    let web = Flow::v4("192.0.2.10", PROTO_TCP, 40300, 80);
    send(&h, &web, 0x02)?; // SYN
    send(&h, &web, 0x02)?; // its retransmission
    send(&h, &web, 0x10)?; // ACK
    send(&h, &web, 0x18)?; // PSH ACK
    let other = Flow::v4("192.0.2.10", PROTO_TCP, 40301, 80);
    send(&h, &other, 0x02)?;
    let dns = Flow::v4("192.0.2.30", PROTO_UDP, 40302, 53);
    send(&h, &dns, 0)?;
    let c = reverse_counts(&h.dataplane)?;
    assert_eq!(c[&s4].syns, 3, "{c:?}");
    assert_eq!(c[&s6].syns, 0, "{c:?}");
    let report = h.dataplane.report()?;
    let web_servers = &report
        .services
        .iter()
        .find(|s| s.name == "web")
        .unwrap()
        .servers;
    assert_eq!(web_servers[0].syns, 3, "status shows the SYNs per server");
    // New flows: packets that pinned their flow. SYNs are not pinned: `web`'s first ACK
    // pins it (from its SYN's slot), its PSH ACK is a hit; `other` sent only a SYN.
    assert_eq!(web_servers[0].flows, 1, "new flows per server");
    let web_flows = report
        .services
        .iter()
        .find(|s| s.name == "web")
        .unwrap()
        .flows;
    assert_eq!(web_flows, 1, "new flows per service");

    // A server that leaves loses its entry; its reverse packets are no longer taken.
    h.dataplane.apply(&[service(
        "web",
        "192.0.2.10",
        PROTO_TCP,
        80,
        &[("10.9.2.11", 1)],
    )])?;
    let c = reverse_counts(&h.dataplane)?;
    assert!(!c.contains_key(&s6), "{c:?}");
    assert_eq!(
        c[&s4].reverse_packets, 3,
        "a server that stays keeps its count"
    );
    let input = reverse_frame(None, "fd09:2::11", a6, &syn_ack4);
    let (action, out) = run_xdp(&h.dataplane, h.fx0, &input)?;
    assert_eq!(
        (action_name(action), out),
        (action_name(XDP_PASS), input),
        "untouched"
    );
    Ok(())
}

#[test]
fn reverse_tunnel_fixtures_produce_expected_frames_and_verdicts() -> Result<()> {
    fixtures::run(&mut Harness::new()?, &table())
}

/// [`reverse_services`] plus 192.0.2.40 tcp 80 served by 10.9.3.11, which the agent reaches
/// through fy0.
fn services_with_fy0_server() -> Vec<DesiredService> {
    let mut v = reverse_services();
    v.push(service(
        "redir",
        "192.0.2.40",
        PROTO_TCP,
        80,
        &[("10.9.3.11", 1)],
    ));
    v
}

/// Reverse-tunnelled packets received on `port`: only those whose outer source the agent
/// reaches through `port` are decapsulated.
fn by_port_table(port: &str) -> Vec<AgentFixture> {
    let a4 = IpAddr::V4(AGENT_V4);
    let a6 = IpAddr::V6(AGENT_V6);
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40110, TCP_SYN_ACK);
    let rst4 = answer("192.0.2.10", PROTO_TCP, 80, 40111, TCP_RST);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40112, TCP_SYN_ACK);
    let redir = answer("192.0.2.40", PROTO_TCP, 80, 40113, TCP_SYN_ACK);
    let mut v = Vec::new();
    // The servers of fx0, spoofed from another port.
    for (what, real, agent, inner) in [
        ("IPv4-in-IPv4 SYN-ACK", "10.9.2.11", a4, &syn_ack4),
        ("IPv4-in-IPv4 RST", "10.9.2.11", a4, &rst4),
        ("IPv6-in-IPv4 SYN-ACK", "10.9.2.11", a4, &syn_ack6),
        ("IPv4-in-IPv6 SYN-ACK", "fd09:2::11", a6, &syn_ack4),
        ("IPv6-in-IPv6 SYN-ACK", "fd09:2::11", a6, &syn_ack6),
    ] {
        v.push(untouched(
            format!("reverse tunnel on {port}: {what} from {real}, which the agent reaches through fx0 -> pass untouched"),
            services_with_fy0_server(),
            reverse_frame(None, real, agent, inner),
            verdict::PASS_REVERSE_WRONG_IFACE,
        ));
    }
    v.push(untouched(
        format!("reverse tunnel on {port}: 802.1Q VID 7 SYN-ACK from 10.9.2.11 (reached through fx0) -> pass untouched"),
        services_with_fy0_server(),
        reverse_frame(Some(7), "10.9.2.11", a4, &syn_ack4),
        verdict::PASS_REVERSE_WRONG_IFACE,
    ));
    let from_d = reverse_frame(None, SERVER_D, a4, &redir);
    if port == "fy0" {
        v.push(fixture(
            "reverse tunnel on fy0: SYN-ACK from 10.9.3.11, which the agent reaches through fy0 -> stripped, XDP_PASS",
            services_with_fy0_server(),
            from_d,
            XDP_PASS,
            verdict::REVERSE_TUNNEL,
            decapsulated(None, &redir),
        ));
    } else {
        v.push(untouched(
            format!("reverse tunnel on {port}: SYN-ACK from 10.9.3.11, which the agent reaches through fy0 -> pass untouched"),
            services_with_fy0_server(),
            from_d,
            verdict::PASS_REVERSE_WRONG_IFACE,
        ));
    }
    v
}

#[test]
fn reverse_tunnel_is_taken_only_on_the_port_that_reaches_the_server() -> Result<()> {
    let mut h = Harness::new()?;
    let (fx0, fy0, fz0) = (h.fx0, h.fy0, h.fz0);
    // fx0: the port of 10.9.2.11 and fd09:2::11; the table's own rows also run on it.
    let mut fx0_rows = by_port_table("fx0");
    fx0_rows.retain(|f| f.description.contains("10.9.3.11"));
    fixtures::run(&mut OnPort(&mut h, fx0), &fx0_rows)?;
    fixtures::run(&mut OnPort(&mut h, fy0), &by_port_table("fy0"))?;
    // fz0 is in no device map: the check follows the FIB, not the ports XDP sends on.
    fixtures::run(&mut OnPort(&mut h, fz0), &by_port_table("fz0"))?;
    // Nothing refused was counted for a server.
    let c = reverse_counts(&h.dataplane)?;
    let d: IpAddr = SERVER_D.parse()?;
    assert_eq!(c[&d].reverse_packets, 1, "{c:?}");
    for s in ["10.9.2.11", "fd09:2::11"] {
        assert_eq!(c[&s.parse::<IpAddr>()?].reverse_packets, 0, "{s}: {c:?}");
    }
    Ok(())
}

/// Without `registration.reverse_tunnel`, the agent decapsulates nothing, even from an
/// installed server on its own port.
fn off_table() -> Vec<AgentFixture> {
    let a4 = IpAddr::V4(AGENT_V4);
    let a6 = IpAddr::V6(AGENT_V6);
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40120, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40121, TCP_SYN_ACK);
    let mut v = Vec::new();
    for (what, vlan, real, agent, inner) in [
        ("IPv4-in-IPv4", None, "10.9.2.11", a4, &syn_ack4),
        ("IPv6-in-IPv4", None, "10.9.2.11", a4, &syn_ack6),
        ("IPv4-in-IPv6", None, "fd09:2::11", a6, &syn_ack4),
        ("IPv6-in-IPv6", None, "fd09:2::11", a6, &syn_ack6),
        (
            "802.1Q VID 7 IPv4-in-IPv4",
            Some(7),
            "10.9.2.11",
            a4,
            &syn_ack4,
        ),
        (
            "IPv4-in-IPv4 from a stranger",
            None,
            "10.9.2.99",
            a4,
            &syn_ack4,
        ),
    ] {
        v.push(untouched(
            format!(
                "reverse tunnelling off: {what} SYN-ACK from {real} to the agent -> pass untouched"
            ),
            reverse_services(),
            reverse_frame(vlan, real, agent, inner),
            verdict::PASS_REVERSE_OFF,
        ));
    }
    v.push(untouched(
        "reverse tunnelling off: IP-in-IP to another address (10.9.2.12) -> pass untouched, not ours",
        reverse_services(),
        reverse_frame(None, "10.9.2.11", "10.9.2.12".parse().unwrap(), &syn_ack4),
        verdict::PASS_NOT_SERVICE,
    ));
    v
}

#[test]
fn reverse_tunnel_is_refused_when_not_configured() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.set_reverse_tunnel(false)?;
    fixtures::run(&mut h, &off_table())?;
    let c = reverse_counts(&h.dataplane)?;
    assert!(
        c.values().all(|x| x.reverse_packets == 0),
        "nothing counted for a server: {c:?}"
    );
    // Turned on (a reload that adds `registration.reverse_tunnel`), the same packet is
    // relayed.
    h.dataplane.set_reverse_tunnel(true)?;
    let inner = answer("192.0.2.10", PROTO_TCP, 80, 40122, TCP_SYN_ACK);
    let (action, out) = run_xdp(
        &h.dataplane,
        h.fx0,
        &reverse_frame(None, "10.9.2.11", IpAddr::V4(AGENT_V4), &inner),
    )?;
    assert_eq!(
        (action_name(action), hex(&out)),
        (action_name(XDP_PASS), hex(&decapsulated(None, &inner)))
    );
    Ok(())
}
