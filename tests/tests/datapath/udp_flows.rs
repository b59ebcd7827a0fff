//! The decapsulator's record of UDP flows (`SERVER_UDP_FLOWS`), how a server finds the
//! clients of its UDP services to bind them (route optimization): each decapsulated UDP
//! packet to a served address notes its flow (first and last seen); nothing else does. The
//! frames themselves are decapsulated exactly as `decap.rs`'s rows are.
use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anycast_common::{
    decap, maps, FlowKey, UdpSeen, MAX_SERVER_UDP_FLOWS, PROTO_TCP, PROTO_UDP, UDP_SEEN_REFRESH_NS,
};
use anycast_ctl::{server::AnycastSpec, server_binding::udp_connections_in};
use anycast_tests::packet::{ethernet, Ip};
use anyhow::{anyhow, ensure, Result};
use aya::maps::MapData;

use crate::harness::*;

const SERVED: [&str; 2] = ["192.0.2.10", "2001:db8::10"];

/// The decapsulator's `SERVER_UDP_FLOWS`: every entry.
fn udp_flows(side: &mut ServerSide) -> Result<Vec<(FlowKey, UdpSeen)>> {
    let m = side
        .ebpf()
        .map(maps::SERVER_UDP_FLOWS)
        .ok_or_else(|| anyhow!("no map {}", maps::SERVER_UDP_FLOWS))?;
    let h: aya::maps::HashMap<&MapData, FlowKey, UdpSeen> = aya::maps::HashMap::try_from(m)?;
    Ok(h.iter().collect::<Result<_, _>>()?)
}

/// Empties `SERVER_UDP_FLOWS`.
fn clear_udp_flows(side: &mut ServerSide) -> Result<()> {
    let keys: Vec<FlowKey> = udp_flows(side)?.into_iter().map(|(k, _)| k).collect();
    let m = side
        .ebpf()
        .map_mut(maps::SERVER_UDP_FLOWS)
        .ok_or_else(|| anyhow!("no map {}", maps::SERVER_UDP_FLOWS))?;
    let mut h: aya::maps::HashMap<&mut MapData, FlowKey, UdpSeen> =
        aya::maps::HashMap::try_from(m)?;
    for k in keys {
        h.remove(&k)?;
    }
    Ok(())
}

/// Runs one frame: it must be decapsulated into exactly `inner` behind the tunnel's MACs.
fn decapsulates(side: &ServerSide, server: &str, frame: &[u8], inner: &[u8]) -> Result<()> {
    let before = side.decap_counters()?;
    let (action, out) = side.run_decap(frame)?;
    ensure!(action == XDP_PASS, "action {}", action_name(action));
    let want = ethernet(neighbour_mac(server), FX0_MAC, None, inner);
    ensure!(
        out == want,
        "frame differs:\n got {out:02x?}\nwant {want:02x?}"
    );
    let after = side.decap_counters()?;
    ensure!(
        after[decap::DECAPSULATED as usize] == before[decap::DECAPSULATED as usize] + 1,
        "not counted as decapsulated"
    );
    Ok(())
}

fn key(flow: &Flow) -> FlowKey {
    FlowKey::new(flow.src, flow.dst, flow.proto, flow.sport, flow.dport)
}

#[test]
fn decapsulated_udp_flows_are_recorded_and_nothing_else() -> Result<()> {
    let mut side = ServerSide::new(&SERVED)?;
    // Recorded: UDP to a served address, each family, the inner IPv4 header with options.
    let u4 = Flow::v4("192.0.2.10", PROTO_UDP, 42000, 53);
    let u6 = Flow::v6("2001:db8::10", PROTO_UDP, 42001, 5353);
    let u4_options = Flow::v4("192.0.2.10", PROTO_UDP, 42002, 53);
    let ip4 = ip_packet(&u4);
    let ip6 = ip_packet(&u6);
    let ip4_options = ip_packet_with(&u4_options, anycast_tests::packet::DF, &[1, 1, 1, 0]);
    for (server, flow, inner) in [
        (SERVER_A, &u4, &ip4),
        ("fd09:2::11", &u6, &ip6),
        (SERVER_A, &u4_options, &ip4_options),
    ] {
        clear_udp_flows(&mut side)?;
        decapsulates(&side, server, &tx_to(server, None, flow, inner), inner)?;
        let flows = udp_flows(&mut side)?;
        ensure!(flows.len() == 1, "{flows:?}");
        ensure!(
            flows[0].0 == key(flow),
            "recorded {:?}, sent {flow:?}",
            flows[0].0
        );
        let seen = flows[0].1;
        ensure!(
            seen.first_ns == seen.last_ns && seen.first_ns > 0,
            "{seen:?}"
        );
    }
    // Not recorded: TCP (its clients are in the socket table), a later fragment of a UDP
    // packet (no ports), UDP cut before its ports (all decapsulated all the same), and UDP
    // to an address not served (not decapsulated).
    clear_udp_flows(&mut side)?;
    let t4 = Flow::v4("192.0.2.10", PROTO_TCP, 42003, 53);
    let tcp = ip_packet(&t4);
    decapsulates(&side, SERVER_A, &tx_to(SERVER_A, None, &t4, &tcp), &tcp)?;
    let later = ip_packet_with(&u4, 3, &[]);
    decapsulates(&side, SERVER_A, &tx_to(SERVER_A, None, &u4, &later), &later)?;
    let cut = Ip::new(u4.src, u4.dst, PROTO_UDP).packet(&[0xa4, 0x10]);
    decapsulates(&side, SERVER_A, &tx_to(SERVER_A, None, &u4, &cut), &cut)?;
    let other = Flow::v4("192.0.2.11", PROTO_UDP, 42004, 53);
    let (_, out) = side.run_decap(&tx_to(SERVER_A, None, &other, &ip_packet(&other)))?;
    ensure!(out == tx_to(SERVER_A, None, &other, &ip_packet(&other)));
    ensure!(
        udp_flows(&mut side)?.is_empty(),
        "{:?}",
        udp_flows(&mut side)?
    );
    Ok(())
}

#[test]
fn a_flows_last_seen_moves_only_after_the_refresh_interval() -> Result<()> {
    let mut side = ServerSide::new(&SERVED)?;
    clear_udp_flows(&mut side)?;
    let u4 = Flow::v4("192.0.2.10", PROTO_UDP, 42000, 53);
    let frame = tx_to(SERVER_A, None, &u4, &ip_packet(&u4));
    side.run_decap(&frame)?;
    let first = udp_flows(&mut side)?[0].1;
    // At once: the entry is not written again.
    for _ in 0..100 {
        side.run_decap(&frame)?;
    }
    ensure!(
        udp_flows(&mut side)?[0].1 == first,
        "rewritten within the interval"
    );
    // After the interval: last seen moves, first seen stays.
    sleep(Duration::from_nanos(UDP_SEEN_REFRESH_NS) + Duration::from_millis(20));
    side.run_decap(&frame)?;
    let later = udp_flows(&mut side)?[0].1;
    ensure!(later.first_ns == first.first_ns, "{first:?} -> {later:?}");
    ensure!(
        later.last_ns - later.first_ns >= UDP_SEEN_REFRESH_NS,
        "{first:?} -> {later:?}"
    );
    // The server daemon now takes it for a client of udp/53.
    let specs: Vec<AnycastSpec> = vec!["192.0.2.10:udp:53".parse().unwrap()];
    let (conns, _) = udp_connections_in(&udp_flows(&mut side)?, &specs, later.last_ns);
    ensure!(conns.len() == 1 && conns[0].1 == (42000, 53), "{conns:?}");
    Ok(())
}

/// A flood of new flows (one datagram each, as from spoofed sources) keeps the map at its
/// size, the oldest evicted; reading a full map (as the server daemon does every poll) is
/// timed.
#[test]
fn a_flood_of_new_udp_flows_stays_within_the_map() -> Result<()> {
    let mut side = ServerSide::new(&SERVED)?;
    let n = MAX_SERVER_UDP_FLOWS + 1000;
    let start = Instant::now();
    for i in 0..n {
        let mut f = Flow::v4("192.0.2.10", PROTO_UDP, (1024 + i % 60_000) as u16, 53);
        f.src = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a80_0000 + i));
        side.run_decap(&tx_to(SERVER_A, None, &f, &ip_packet(&f)))?;
    }
    let fill = start.elapsed();
    let start = Instant::now();
    let flows = udp_flows(&mut side)?;
    let read = start.elapsed();
    ensure!(
        flows.len() <= MAX_SERVER_UDP_FLOWS as usize
            && flows.len() > MAX_SERVER_UDP_FLOWS as usize / 2,
        "{} entries",
        flows.len()
    );
    // One datagram each: no client among them.
    let specs: Vec<AnycastSpec> = vec!["192.0.2.10:udp:53".parse().unwrap()];
    let now = flows.iter().map(|(_, s)| s.last_ns).max().unwrap_or(0);
    ensure!(udp_connections_in(&flows, &specs, now).0.is_empty());
    eprintln!(
        "{n} new UDP flows through the decapsulator in {fill:?} (test runs); {} entries kept, \
         read in {read:?}",
        flows.len()
    );
    Ok(())
}
