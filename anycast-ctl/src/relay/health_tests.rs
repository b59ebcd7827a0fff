//! Health envelopes (kind 5): layout, refusals, marks made, lifted and lapsed.
use std::collections::BTreeSet;

use super::tests::{envelope, relay, KEY_AB, WALL};
use super::*;

fn entry(real: &str) -> HealthEntry {
    HealthEntry {
        anycast: "10.0.100.1".parse().unwrap(),
        protocol: 6,
        port: 80,
        real: real.parse().unwrap(),
    }
}

fn set(reals: &[&str]) -> BTreeSet<HealthEntry> {
    reals.iter().map(|r| entry(r)).collect()
}

const FROM_A: &str = "10.0.0.1:4192";

/// Takes every envelope in `out` at `b` and hands health lists to `take_health`, knowing
/// every real address under 10.0.2.0/24 as server "s1". Returns whether marks changed.
fn deliver(b: &mut Relay, out: &[Reply], now: Instant) -> bool {
    let mut changed = false;
    for r in out {
        let (peer, _, env) = b
            .receive(FROM_A.parse().unwrap(), &r.payload, now, WALL)
            .unwrap();
        if let Body::Health { down } = env.body {
            changed |= b.take_health(&peer, &down, known, now);
        }
    }
    changed
}

fn known(e: &HealthEntry) -> Option<String> {
    match e.real {
        IpAddr::V4(v4) if v4.octets()[..3] == [10, 0, 2] => Some("s1".into()),
        _ => None,
    }
}

fn marked(b: &Relay) -> Vec<IpAddr> {
    b.peer_marks().keys().map(|e| e.real).collect()
}

#[test]
fn the_health_body_is_laid_out_as_documented() {
    let env = envelope(
        Body::Health {
            down: vec![entry("10.0.2.11")],
        },
        WALL,
    );
    let bytes = encode(&env, KEY_AB);
    assert_eq!(decode(&bytes, KEY_AB), Ok(env));
    assert_eq!(bytes[5], 5, "kind 5");
    assert_eq!(bytes[18..20], 1u16.to_be_bytes());
    assert_eq!(
        bytes[20..36],
        wire::to_mapped("10.0.100.1".parse().unwrap()).octets()
    );
    assert_eq!(bytes[36], 6);
    assert_eq!(bytes[37..39], 80u16.to_be_bytes());
    assert_eq!(
        bytes[39..55],
        wire::to_mapped("10.0.2.11".parse().unwrap()).octets()
    );
    assert_eq!(bytes.len(), 55 + MAC_LEN);
    // The largest list, with the longest identities, fits the 2048-byte receive buffer.
    let longest = Envelope {
        sender: "a".repeat(MAX_ID),
        receiver: "b".repeat(MAX_ID),
        timestamp: WALL,
        body: Body::Health {
            down: (0..MAX_HEALTH_ENTRIES)
                .map(|i| entry(&format!("10.0.2.{i}")))
                .collect(),
        },
    };
    assert!(encode(&longest, KEY_AB).len() <= 2048);
}

/// A health envelope whose body is `body`, MAC'd correctly: only the body is wrong.
fn signed_with_body(body: &[u8]) -> Vec<u8> {
    let mut out = b"ACRL".to_vec();
    out.extend_from_slice(&[1, 5, 1, 1, b'a', b'b']);
    out.extend_from_slice(&WALL.to_be_bytes());
    out.extend_from_slice(body);
    let tag = mac(KEY_AB, &out);
    out.extend_from_slice(&tag);
    out
}

#[test]
fn malformed_health_bodies_are_refused_even_with_a_valid_mac() {
    let one = entry("10.0.2.11").bytes();
    let ok = [&1u16.to_be_bytes()[..], &one].concat();
    assert!(decode(&signed_with_body(&ok), KEY_AB).is_ok());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no count", Vec::new()),
        ("one byte of count", vec![0]),
        (
            "count 2, one entry",
            [&2u16.to_be_bytes()[..], &one].concat(),
        ),
        (
            "a short entry",
            [&1u16.to_be_bytes()[..], &one[..34]].concat(),
        ),
        ("trailing bytes", [&ok[..], &[0]].concat()),
        (
            "more entries than allowed",
            [
                &((MAX_HEALTH_ENTRIES + 1) as u16).to_be_bytes()[..],
                &one.repeat(MAX_HEALTH_ENTRIES + 1),
            ]
            .concat(),
        ),
        (
            "count 65535, nothing after",
            0xffffu16.to_be_bytes().to_vec(),
        ),
    ];
    for (what, body) in cases {
        assert_eq!(
            decode(&signed_with_body(&body), KEY_AB),
            Err(Refused::Malformed),
            "{what}"
        );
    }
}

#[test]
fn forged_stranger_and_replayed_health_envelopes_are_refused_and_counted() {
    let (mut a, mut b) = (relay("a", "b", "10.0.0.9"), relay("b", "a", "10.0.0.1"));
    let now = Instant::now();
    let out = a.announce_health(&set(&["10.0.2.11"]), WALL);
    let bytes = out[0].payload.clone();
    let forged = encode(
        &envelope(
            Body::Health {
                down: vec![entry("10.0.2.12")],
            },
            WALL + 1,
        ),
        b"not the key of the pair a-b....",
    );
    let from_a: SocketAddr = FROM_A.parse().unwrap();
    assert_eq!(
        b.receive("10.0.0.66:4192".parse().unwrap(), &bytes, now, WALL)
            .unwrap_err(),
        Refused::UnknownPeer
    );
    assert_eq!(
        b.receive(from_a, &forged, now, WALL).unwrap_err(),
        Refused::Auth
    );
    assert!(b.receive(from_a, &bytes, now, WALL).is_ok());
    assert_eq!(
        b.receive(from_a, &bytes, now, WALL).unwrap_err(),
        Refused::Replay
    );
    let r = b.report((0, [0; 32]), now);
    for (counter, n) in [
        ("relay_refused_unknown_peer", 1),
        ("relay_refused_auth", 1),
        ("relay_refused_replay", 1),
        ("relay_received_health", 1),
    ] {
        assert_eq!(r.counters.get(counter), Some(&n), "{counter}");
    }
}

#[test]
fn a_list_goes_out_on_each_change_and_every_interval_while_not_empty() {
    let mut a = relay("a", "b", "10.0.0.9");
    let t0 = Instant::now();
    // The first list goes out even when empty (a restarted agent lifts its old marks).
    assert_eq!(a.announce_health(&BTreeSet::new(), WALL).len(), 1);
    assert!(a.announce_health(&BTreeSet::new(), WALL).is_empty());
    let health_in = |out: &[Reply]| {
        out.iter()
            .filter_map(|r| match decode(&r.payload, KEY_AB).unwrap().body {
                Body::Health { down } => Some(down),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Empty: the digest round sends no list.
    assert!(health_in(&a.tick((0, [0; 32]), t0, WALL)).is_empty());
    let out = a.announce_health(&set(&["10.0.2.11"]), WALL);
    assert_eq!(health_in(&out), vec![vec![entry("10.0.2.11")]]);
    assert!(a.announce_health(&set(&["10.0.2.11"]), WALL).is_empty());
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(
        health_in(&a.tick((0, [0; 32]), t1, WALL)),
        vec![vec![entry("10.0.2.11")]],
        "re-asserted with the digest"
    );
    // Up again: an empty list at once, and nothing more at the next round.
    assert_eq!(
        health_in(&a.announce_health(&BTreeSet::new(), WALL)),
        vec![vec![]]
    );
    let t2 = t1 + Duration::from_secs(1);
    assert!(health_in(&a.tick((0, [0; 32]), t2, WALL)).is_empty());
    // More than fit: the first ones, counted.
    let many: BTreeSet<HealthEntry> = (0..60).map(|i| entry(&format!("10.0.2.{i}"))).collect();
    let sent = health_in(&a.announce_health(&many, WALL));
    assert_eq!(sent[0].len(), MAX_HEALTH_ENTRIES);
    assert_eq!(
        sent[0],
        many.iter()
            .take(MAX_HEALTH_ENTRIES)
            .copied()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        a.report((0, [0; 32]), t2)
            .counters
            .get("relay_health_truncated"),
        Some(&1)
    );
}

#[test]
fn marks_follow_the_peers_list_ignore_unknown_addresses_and_lapse_after_three_intervals() {
    let (mut a, mut b) = (relay("a", "b", "10.0.0.9"), relay("b", "a", "10.0.0.1"));
    let t0 = Instant::now();
    // 192.0.2.7 is no real address b knows: ignored, counted.
    let out = a.announce_health(&set(&["10.0.2.11", "10.0.2.12", "192.0.2.7"]), WALL);
    assert!(deliver(&mut b, &out, t0));
    assert_eq!(
        marked(&b),
        vec![
            "10.0.2.11".parse::<IpAddr>().unwrap(),
            "10.0.2.12".parse().unwrap()
        ]
    );
    assert_eq!(b.peer_marks()[&entry("10.0.2.11")], vec!["a".to_string()]);
    assert_eq!(
        b.report((0, [0; 32]), t0)
            .counters
            .get("relay_health_unknown"),
        Some(&1)
    );
    // The same list again changes nothing; one address up again lifts its mark only.
    let t1 = t0 + Duration::from_secs(1);
    assert!(!deliver(&mut b, &a.tick((0, [0; 32]), t1, WALL), t1));
    let out = a.announce_health(&set(&["10.0.2.12"]), WALL);
    assert!(deliver(&mut b, &out, t1));
    assert_eq!(marks_of(&b), set(&["10.0.2.12"]));
    // Re-asserted every interval, the mark stays however long.
    let mut t = t1;
    for _ in 0..5 {
        t += Duration::from_secs(1);
        deliver(&mut b, &a.tick((0, [0; 32]), t, WALL), t);
        assert!(!b.expire_health(t));
    }
    assert_eq!(marks_of(&b), set(&["10.0.2.12"]));
    // a falls silent (dies, or a partition): the mark stays for just under three
    // intervals, then lapses, once.
    assert!(!b.expire_health(t + Duration::from_millis(2999)));
    assert_eq!(marks_of(&b), set(&["10.0.2.12"]));
    assert!(b.expire_health(t + Duration::from_secs(3)));
    assert!(b.peer_marks().is_empty());
    assert!(!b.expire_health(t + Duration::from_secs(4)));
    assert_eq!(
        b.report((0, [0; 32]), t)
            .counters
            .get("relay_health_lapsed"),
        Some(&1)
    );
    // a comes back with its list: marked again.
    let t = t + Duration::from_secs(5);
    assert!(deliver(&mut b, &a.tick((0, [0; 32]), t, WALL), t));
    assert_eq!(marks_of(&b), set(&["10.0.2.12"]));
    // An empty list lifts every mark.
    assert!(deliver(
        &mut b,
        &a.announce_health(&BTreeSet::new(), WALL),
        t
    ));
    assert!(b.peer_marks().is_empty());
}

fn marks_of(b: &Relay) -> BTreeSet<HealthEntry> {
    b.peer_marks().into_keys().collect()
}

#[test]
fn a_list_from_an_unknown_peer_name_marks_nothing() {
    let mut b = relay("b", "a", "10.0.0.1");
    assert!(!b.take_health("c", &[entry("10.0.2.11")], known, Instant::now()));
    assert!(b.peer_marks().is_empty());
}

#[test]
fn a_peer_changing_its_list_cannot_flood_the_log() {
    let mut b = relay("b", "a", "10.0.0.1");
    let t0 = Instant::now();
    let many: Vec<HealthEntry> = (0..30).map(|i| entry(&format!("10.0.2.{i}"))).collect();
    assert!(b.take_health("a", &many, known, t0));
    // 20 lines a second; the other 10 marks are made, only not logged one by one.
    assert_eq!(b.peer_marks().len(), 30);
    let counted = |b: &Relay| {
        b.report((0, [0; 32]), t0)
            .counters
            .get("relay_health_logs_suppressed")
            .copied()
    };
    assert_eq!(counted(&b), Some(10));
    // A second later, the budget is back.
    assert!(b.take_health("a", &many[..10], known, t0 + Duration::from_secs(1)));
    assert_eq!(b.peer_marks().len(), 10);
    assert_eq!(counted(&b), Some(10));
}
