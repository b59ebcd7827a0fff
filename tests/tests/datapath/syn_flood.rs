//! SYN floods and handshakes: a SYN (without ACK) is sent by the consistent-hash table and
//! remembered in its `EMBRYOS` slot, not pinned in the flow table; the first packet after it
//! is pinned to the SYN's server. So a flood of SYNs from random sources evicts no pinned
//! flow, and a handshake keeps its server when the table changes between SYN and ACK.
use std::net::{IpAddr, Ipv4Addr};

use std::time::Instant;

use anycast_common::{flow_hash, verdict, FlowKey, EMBRYO_SLOTS, PROTO_TCP, PROTO_UDP};
use anycast_ctl::dataplane::DesiredService;
use anycast_tests::packet::{TCP_ACK, TCP_PSH, TCP_SYN};
use anyhow::{ensure, Result};

use crate::harness::*;

const FLOOD_ADDR: &str = "192.0.2.70";

fn flood_service(servers: &[(&str, u32, bool)]) -> Vec<DesiredService> {
    let weights: Vec<(&str, u32)> = servers.iter().map(|(a, w, _)| (*a, *w)).collect();
    let mut svc = service("flooded", FLOOD_ADDR, PROTO_TCP, 80, &weights);
    for (s, (_, _, up)) in svc.servers.iter_mut().zip(servers) {
        s.up = *up;
    }
    vec![svc]
}

fn clients(first_port: u16, n: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| Flow::v4(FLOOD_ADDR, PROTO_TCP, first_port + i, 80))
        .collect()
}

/// `n` flows from pseudo-random IPv4 sources and ports (xorshift, fixed seed), as a
/// spoofing flood sends them.
fn random_sources(seed: u64, n: usize) -> Vec<Flow> {
    random_flows(seed).take(n).collect()
}

fn random_flows(seed: u64) -> impl Iterator<Item = Flow> {
    let mut x = seed;
    std::iter::repeat(()).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Flow {
            src: IpAddr::V4(Ipv4Addr::from((x >> 16) as u32)),
            dst: FLOOD_ADDR.parse().unwrap(),
            proto: PROTO_TCP,
            sport: (x >> 48) as u16 | 1024,
            dport: 80,
        }
    })
}

fn pinned(h: &Harness, flows: &[Flow]) -> Result<usize> {
    let table = flow_table(&h.dataplane)?;
    Ok(flows.iter().filter(|f| entry(&table, f).is_some()).count())
}

/// The flow table (4096 entries here) three quarters full of established flows; then
/// 20 000 SYNs from random sources, five times the table: every established entry is still
/// there, the SYNs pinned nothing, and each established flow's next packet is a hit on its
/// server. Control: the same flood as ACKs (pinned, like any first packet without a SYN
/// before it) evicts established entries, so the table was small enough to show eviction.
#[test]
fn a_syn_flood_from_random_sources_evicts_no_pinned_flow() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&flood_service(&[
        (SERVER_A, 1, true),
        (SERVER_B, 1, true),
        (SERVER_C, 1, true),
    ]))?;
    let established = clients(30000, 3000);
    let servers = send_all(&h, &established, TCP_ACK)?;
    ensure!(
        pinned(&h, &established)? == established.len(),
        "all established flows are pinned before the flood"
    );

    let flood = random_sources(0x5eed_1234_abcd_0001, 20_000);
    let (_, delta) = counting(&h.dataplane, || send_all(&h, &flood, TCP_SYN))?;
    assert_eq!(
        delta[verdict::FLOW_MISS as usize],
        20_000,
        "every SYN misses"
    );
    assert_eq!(
        delta[verdict::FLOW_EMBRYO as usize],
        20_000,
        "every SYN is remembered as a handshake, not pinned"
    );
    let survived = pinned(&h, &established)?;
    let table_len = flow_table(&h.dataplane)?.len();
    eprintln!(
        "after 20000 random-source SYNs: {survived} of {} established entries survive; the flow table holds {table_len}",
        established.len()
    );
    assert_eq!(survived, established.len(), "no established entry evicted");
    assert_eq!(table_len, established.len(), "the SYNs pinned nothing");

    let (after, delta) = counting(&h.dataplane, || {
        send_all(&h, &established, TCP_PSH | TCP_ACK)
    })?;
    assert_eq!(after, servers, "established flows keep their servers");
    assert_eq!(delta[verdict::FLOW_HIT as usize], 3000, "all hits");

    // Control: first packets that are not SYNs are pinned; as many of them evict.
    send_all(&h, &random_sources(0x5eed_1234_abcd_0002, 20_000), TCP_ACK)?;
    let left = pinned(&h, &established)?;
    eprintln!("control: after 20000 random-source ACKs, {left} of 3000 survive");
    assert!(
        left < established.len(),
        "control: an ACK flood of five times the table should evict established entries"
    );
    Ok(())
}

/// SYNs under three servers; the table changes (a fourth server, a draining one, a server
/// down); retransmitted SYNs and the ACKs after the SYNs: each follows its SYN's server
/// while that server is up (draining included), and the ACK is pinned there. A server that went down loses its handshakes
/// to the table's choice.
#[test]
fn a_handshake_keeps_its_server_across_a_table_change() -> Result<()> {
    let mut h = Harness::new()?;
    let three = [
        (SERVER_A, 1, true),
        (SERVER_B, 1, true),
        (SERVER_D, 1, true),
    ];
    let four = [
        (SERVER_A, 1, true),
        (SERVER_B, 1, true),
        (SERVER_D, 1, true),
        (SERVER_C, 1, true),
    ];
    h.dataplane.apply(&flood_service(&three))?;
    let flows = clients(31000, 200);
    let syn_servers = send_all(&h, &flows, TCP_SYN)?;
    assert_eq!(pinned(&h, &flows)?, 0, "a SYN pins nothing");

    h.dataplane.apply(&flood_service(&four))?;
    // Control: without the SYNs, the four-server table sends some of these flows elsewhere.
    let mut fresh = Harness::new()?;
    fresh.dataplane.apply(&flood_service(&four))?;
    let unpinned = send_all(&fresh, &flows, TCP_ACK)?;
    drop(fresh);
    let differ = unpinned
        .iter()
        .zip(&syn_servers)
        .filter(|(a, b)| a != b)
        .count();
    assert!(differ > 0, "control: the new table moves some of the flows");
    eprintln!("control: the new table alone would move {differ} of 200 handshakes");

    // A retransmitted SYN goes where the first went (that server may have answered it).
    let (again, delta) = counting(&h.dataplane, || send_all(&h, &flows, TCP_SYN))?;
    assert_eq!(
        again, syn_servers,
        "retransmitted SYNs follow the first ones"
    );
    assert_eq!(delta[verdict::FLOW_EMBRYO as usize], 200);
    let (acks, delta) = counting(&h.dataplane, || send_all(&h, &flows, TCP_ACK))?;
    assert_eq!(acks, syn_servers, "every ACK follows its SYN's server");
    assert_eq!(delta[verdict::FLOW_PROMOTED as usize], 200);
    assert_eq!(pinned(&h, &flows)?, 200, "the ACKs pinned their flows");
    let data = send_all(&h, &flows, TCP_PSH | TCP_ACK)?;
    assert_eq!(data, syn_servers, "and the flows stay there");

    // Draining (weight 0) keeps handshakes; down loses them.
    let b: IpAddr = SERVER_B.parse()?;
    let draining = clients(31200, 200);
    let before = send_all(&h, &draining, TCP_SYN)?;
    assert!(before.contains(&b), "some handshakes start on {b}");
    h.dataplane.apply(&flood_service(&[
        (SERVER_A, 1, true),
        (SERVER_B, 0, true),
        (SERVER_D, 1, true),
        (SERVER_C, 1, true),
    ]))?;
    assert_eq!(
        send_all(&h, &draining, TCP_ACK)?,
        before,
        "a draining server keeps its handshakes"
    );
    let downed = clients(31400, 200);
    let before = send_all(&h, &downed, TCP_SYN)?;
    h.dataplane.apply(&flood_service(&[
        (SERVER_A, 1, true),
        (SERVER_B, 1, false),
        (SERVER_D, 1, true),
        (SERVER_C, 1, true),
    ]))?;
    let after = send_all(&h, &downed, TCP_ACK)?;
    for (i, (s, a)) in before.iter().zip(&after).enumerate() {
        if *s == b {
            assert_ne!(*a, b, "flow {i}: its SYN's server is down");
        } else {
            assert_eq!(a, s, "flow {i}: its SYN's server is up");
        }
    }
    Ok(())
}

/// A later SYN of another flow in the same `EMBRYOS` slot replaces the first one's entry:
/// the first flow's ACK then takes the table's choice (the same server while the table has
/// not changed). A retransmitted SYN rewrites its own slot.
#[test]
fn a_handshake_whose_slot_was_taken_follows_the_table() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&flood_service(&[
        (SERVER_A, 1, true),
        (SERVER_B, 1, true),
        (SERVER_D, 1, true),
    ]))?;
    let key = |f: &Flow| FlowKey::new(f.src, f.dst, f.proto, f.sport, f.dport);
    let slot = |f: &Flow| flow_hash(&key(f)) & (EMBRYO_SLOTS - 1);
    let first = Flow::v4(FLOOD_ADDR, PROTO_TCP, 32000, 80);
    let rival = random_flows(0x5107)
        .take(5_000_000)
        .find(|f| slot(f) == slot(&first))
        .expect("a flow in the same slot among 5 M");
    send(&h, &first, TCP_SYN)?;
    send(&h, &first, TCP_SYN)?; // retransmitted
    send(&h, &rival, TCP_SYN)?;
    let (_, delta) = counting(&h.dataplane, || send(&h, &first, TCP_ACK))?;
    assert_eq!(delta[verdict::FLOW_MISS as usize], 1);
    assert_eq!(
        delta[verdict::FLOW_PROMOTED as usize],
        0,
        "the slot holds the rival's handshake"
    );
    let (_, delta) = counting(&h.dataplane, || send(&h, &rival, TCP_ACK))?;
    assert_eq!(delta[verdict::FLOW_PROMOTED as usize], 1, "the rival's own");
    Ok(())
}

/// Flows not seen opening (ACKs without a SYN before them, UDP first packets) are pinned
/// only within each CPU's budget (`unseen_pins_per_second`, 500 here): an ACK flood and a
/// UDP flood from random sources, 20 000 packets each, are all forwarded by the table, but
/// at most the budget (its one-second burst plus the refill over the run) pin, so all
/// 3000 established entries survive in a table of 4096. Handshakes seen from their SYN
/// are pinned whatever the budget: 3000 flows open after it is spent.
/// Control: the ACK flood with the default budget (20 000/s) evicts established entries
/// (the first test of this file). The thread stays on one CPU: the budget is per CPU.
#[test]
fn floods_of_flows_not_seen_opening_pin_no_more_than_the_budget() -> Result<()> {
    const BUDGET: u32 = 500;
    let _cpu = OnOneCpu::new();
    let mut h = Harness::new()?;
    let mut services = flood_service(&[
        (SERVER_A, 1, true),
        (SERVER_B, 1, true),
        (SERVER_C, 1, true),
    ]);
    services.push(service(
        "flooded-udp",
        FLOOD_ADDR,
        PROTO_UDP,
        53,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
    ));
    h.dataplane.apply(&services)?;
    h.dataplane.set_unseen_pins(BUDGET)?;
    let start = Instant::now();
    // Spend the burst first, so that the handshakes below open with an empty budget.
    let early = random_sources(0x5eed_0b0d_0000_0001, BUDGET as usize);
    let (_, delta) = counting(&h.dataplane, || send_all(&h, &early, TCP_ACK))?;
    assert_eq!(delta[verdict::FLOW_UNPINNED as usize], 0, "the burst pins");

    let opened = clients(33000, 3000);
    send_all(&h, &opened, TCP_SYN)?;
    let (_, delta) = counting(&h.dataplane, || send_all(&h, &opened, TCP_ACK))?;
    // Two handshakes of these 3000 in one `EMBRYOS` slot (about 3000^2 / 2^18 = 34 pairs):
    // the later SYN took it, the earlier one's ACK is a flow not seen opening, pinned only
    // if the budget refilled meanwhile.
    let promoted = delta[verdict::FLOW_PROMOTED as usize];
    assert!(
        promoted >= 2900,
        "handshakes pin beyond the budget: {promoted} of 3000"
    );
    let table = flow_table(&h.dataplane)?;
    let established: Vec<Flow> = opened
        .into_iter()
        .filter(|f| entry(&table, f).is_some())
        .collect();
    assert!(established.len() as u64 >= promoted);
    let servers = send_all(&h, &established, TCP_ACK)?;

    let acks = random_sources(0x5eed_0b0d_0000_0002, 20_000);
    let udp: Vec<Flow> = random_sources(0x5eed_0b0d_0000_0003, 20_000)
        .into_iter()
        .map(|f| Flow {
            proto: PROTO_UDP,
            dport: 53,
            ..f
        })
        .collect();
    let (_, delta) = counting(&h.dataplane, || {
        send_all(&h, &acks, TCP_ACK)?;
        send_all(&h, &udp, 0)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let misses = delta[verdict::FLOW_MISS as usize];
    let unpinned = delta[verdict::FLOW_UNPINNED as usize];
    let pins = misses - unpinned;
    // The burst was spent; the refill over the run is all the flood may pin (one token of
    // slack for the clock's rounding).
    let most = (BUDGET as f64 * secs).ceil() as u64 + 1;
    eprintln!(
        "40000 ACK and UDP first packets from random sources in {secs:.2} s: {pins} pinned (at most {most}), {unpinned} forwarded unpinned"
    );
    assert_eq!(
        misses, 40_000,
        "every flood packet misses (and was forwarded: send checks)"
    );
    assert!(pins <= most, "{pins} pins, budget {most}");
    assert_eq!(
        pinned(&h, &established)?,
        established.len(),
        "no established entry evicted"
    );
    let table = flow_table(&h.dataplane)?.len() as u64;
    assert!(
        table <= established.len() as u64 + BUDGET as u64 + most,
        "the table holds {table}: the floods pinned more than the budget"
    );
    let (after, delta) = counting(&h.dataplane, || {
        send_all(&h, &established, TCP_PSH | TCP_ACK)
    })?;
    assert_eq!(after, servers, "established flows keep their servers");
    assert_eq!(delta[verdict::FLOW_HIT as usize], established.len() as u64);
    Ok(())
}
