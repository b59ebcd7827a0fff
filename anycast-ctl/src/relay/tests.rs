//! The relay envelope: encoding, MAC, and what a receiver refuses.
use std::collections::HashMap;

use super::*;
use crate::config::{RelayConfig, RelayPeer};

pub(super) const KEY_AB: &[u8] = b"the key agents a and b share....";
pub(super) const WALL: u64 = 4_000_000_000 << 32;

fn config(id: &str, peer: &str, address: &str) -> RelayConfig {
    RelayConfig {
        id: id.into(),
        port: 4192,
        digest_interval_ms: 1000,
        peers: vec![RelayPeer {
            id: peer.into(),
            address: address.parse().unwrap(),
            key_file: "unused".into(),
            agent_addresses: Vec::new(),
        }],
    }
}

pub(super) fn relay(id: &str, peer: &str, address: &str) -> Relay {
    let keys = HashMap::from([(peer.to_string(), KEY_AB.to_vec())]);
    Relay::new(&config(id, peer, address), &keys, 30, WALL - (10 << 32))
}

fn bodies() -> Vec<Body> {
    vec![
        Body::Relay {
            from: "10.0.2.11:5000".parse().unwrap(),
            message: vec![1, 2, 3, 4],
        },
        Body::Relay {
            from: "[2001:db8::5]:4191".parse().unwrap(),
            message: vec![9; 300],
        },
        Body::Snapshot {
            from: "10.0.2.11:5000".parse().unwrap(),
            message: vec![7; 64],
            extra: SnapshotExtra {
                expires_in: Duration::from_millis(12_345),
                smoothed_load: Some(41.5),
                weight: 58,
            },
        },
        Body::Snapshot {
            from: "10.0.2.11:5000".parse().unwrap(),
            message: vec![7; 64],
            extra: SnapshotExtra {
                expires_in: Duration::ZERO,
                smoothed_load: None,
                weight: 100,
            },
        },
        Body::Digest {
            bindings: 3,
            digest: [0xab; 32],
        },
        Body::Hello,
        Body::Health { down: Vec::new() },
        Body::Health {
            down: vec![
                crate::relay::HealthEntry {
                    anycast: "10.0.100.1".parse().unwrap(),
                    protocol: 6,
                    port: 80,
                    real: "10.0.2.11".parse().unwrap(),
                },
                crate::relay::HealthEntry {
                    anycast: "2001:db8:100::1".parse().unwrap(),
                    protocol: 17,
                    port: 0,
                    real: "2001:db8:2::11".parse().unwrap(),
                },
            ],
        },
    ]
}

pub(super) fn envelope(body: Body, timestamp: u64) -> Envelope {
    Envelope {
        sender: "a".into(),
        receiver: "b".into(),
        timestamp,
        body,
    }
}

#[test]
fn every_kind_round_trips_and_the_layout_is_as_documented() {
    for body in bodies() {
        let env = envelope(body, WALL);
        let bytes = encode(&env, KEY_AB);
        assert_eq!(decode(&bytes, KEY_AB), Ok(env.clone()));
        assert_eq!(&bytes[..4], b"ACRL");
        assert_eq!(bytes[4], 1);
        assert_eq!((bytes[6], bytes[7]), (1, 1));
        assert_eq!(&bytes[8..10], b"ab");
        assert_eq!(bytes[10..18], WALL.to_be_bytes());
        // The MAC: HMAC-SHA-256 over everything before it, its first 16 bytes.
        let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        assert_eq!(tag, mac(KEY_AB, signed));
    }
    let relay = encode(&envelope(bodies().remove(0), WALL), KEY_AB);
    assert_eq!(relay[5], 1);
    assert_eq!(
        relay[18..34],
        wire::to_mapped("10.0.2.11".parse().unwrap()).octets()
    );
    assert_eq!(relay[34..36], 5000u16.to_be_bytes());
    assert_eq!(relay[36..38], 4u16.to_be_bytes());
    assert_eq!(relay[38..42], [1, 2, 3, 4]);
    assert_eq!(relay.len(), 42 + MAC_LEN);
}

#[test]
fn a_changed_byte_or_another_key_is_refused() {
    for body in bodies() {
        let bytes = encode(&envelope(body, WALL), KEY_AB);
        assert_eq!(decode(&bytes, b"another key"), Err(Refused::Auth));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(decode(&b, KEY_AB).is_err(), "byte {i} flipped was accepted");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], KEY_AB).is_err(), "{n} bytes accepted");
        }
    }
}

#[test]
fn a_receiver_refuses_strangers_forgeries_replays_and_stale_envelopes_and_counts_them() {
    let (mut a, mut b) = (relay("a", "b", "10.0.0.9"), relay("b", "a", "10.0.0.1"));
    let now = Instant::now();
    let from_a: SocketAddr = "10.0.0.1:4192".parse().unwrap();
    let out = a.relay(&[5; 40], "10.0.2.11:5000".parse().unwrap(), WALL);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].to, "10.0.0.9:4192".parse().unwrap());
    let bytes = out[0].payload.clone();
    // From a host that is not the peer it names.
    let stranger: SocketAddr = "10.0.0.66:4192".parse().unwrap();
    assert_eq!(
        b.receive(stranger, &bytes, now, WALL).unwrap_err(),
        Refused::UnknownPeer
    );
    // The peer's address, another key (a forgery).
    let forged = encode(
        &envelope(Body::Hello, WALL + 1),
        b"not the key of the pair a-b....",
    );
    assert_eq!(
        b.receive(from_a, &forged, now, WALL).unwrap_err(),
        Refused::Auth
    );
    // The real one, once.
    let (peer, registration, env) = b.receive(from_a, &bytes, now, WALL).unwrap();
    assert_eq!(peer, "a");
    assert_eq!(
        registration,
        vec![wire::to_mapped("10.0.0.1".parse().unwrap())]
    );
    assert!(matches!(env.body, Body::Relay { .. }));
    // Again: a replay.
    assert_eq!(
        b.receive(from_a, &bytes, now, WALL).unwrap_err(),
        Refused::Replay
    );
    // Stamped too far from our clock, or before our start.
    let far = encode(&envelope(Body::Hello, WALL + (31 << 32)), KEY_AB);
    assert_eq!(
        b.receive(from_a, &far, now, WALL).unwrap_err(),
        Refused::Replay
    );
    let mut fresh = relay("b", "a", "10.0.0.1");
    let before_start = encode(&envelope(Body::Hello, WALL - (11 << 32)), KEY_AB);
    assert_eq!(
        fresh.receive(from_a, &before_start, now, WALL).unwrap_err(),
        Refused::Replay
    );
    // Meant for another agent.
    let to_c = encode(
        &Envelope {
            receiver: "c".into(),
            ..envelope(Body::Hello, WALL + 5)
        },
        KEY_AB,
    );
    assert_eq!(
        b.receive(from_a, &to_c, now, WALL).unwrap_err(),
        Refused::NotForUs
    );
    assert_eq!(
        b.receive(from_a, b"garbage", now, WALL).unwrap_err(),
        Refused::Malformed
    );
    let r = b.report((0, [0; 32]), now);
    for (counter, n) in [
        ("relay_refused_unknown_peer", 1),
        ("relay_refused_auth", 1),
        ("relay_refused_replay", 2),
        ("relay_refused_not_for_us", 1),
        ("relay_refused_malformed", 1),
        ("relay_received_relay", 1),
    ] {
        assert_eq!(r.counters.get(counter), Some(&n), "{counter}");
    }
}

#[test]
fn timestamps_only_grow_and_digests_that_keep_differing_raise_the_alarm_and_ask_for_a_snapshot() {
    let mut a = relay("a", "b", "10.0.0.9");
    let t0 = Instant::now();
    let stamps: Vec<u64> = (0..5)
        .map(|_| {
            let r = a.relay(&[1], "10.0.2.11:1".parse().unwrap(), WALL);
            decode(&r[0].payload, KEY_AB).unwrap().timestamp
        })
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    // The first tick: a hello (never heard from b) and a digest.
    let out = a.tick((1, [1; 32]), t0, WALL);
    let kinds: Vec<Body> = out
        .iter()
        .map(|r| decode(&r.payload, KEY_AB).unwrap().body)
        .collect();
    assert_eq!(kinds[0], Body::Hello);
    assert!(matches!(kinds[1], Body::Digest { bindings: 1, .. }));
    assert!(
        a.tick((1, [1; 32]), t0, WALL).is_empty(),
        "one round per interval"
    );
    // Two differing digests may be updates on their way; the third raises the alarm (and
    // asks for a snapshot: the last hello went five intervals ago).
    let t0 = t0 + Duration::from_secs(5);
    let ours = (1, [1; 32]);
    let theirs = (0, [2; 32]);
    assert!(a.compare("b", theirs, ours, t0, WALL).is_none());
    assert!(a.compare("b", theirs, ours, t0, WALL).is_none());
    assert_eq!(a.report(ours, t0).peers[0].in_sync, None);
    let hello = a.compare("b", theirs, ours, t0, WALL).expect("a hello");
    assert_eq!(decode(&hello.payload, KEY_AB).unwrap().body, Body::Hello);
    let r = a.report(ours, t0);
    assert!(!r.in_sync);
    assert_eq!(r.peers[0].in_sync, Some(false));
    assert_eq!(r.counters.get("relay_digest_mismatch"), Some(&1));
    // Not another hello at once; agreeing again clears it.
    assert!(a.compare("b", theirs, ours, t0, WALL).is_none());
    assert!(a.compare("b", ours, ours, t0, WALL).is_none());
    assert!(a.report(ours, t0).in_sync);
}

#[test]
fn snapshots_are_answered_at_most_once_a_second_per_peer() {
    let mut a = relay("a", "b", "10.0.0.9");
    let t0 = Instant::now();
    let out = a.snapshot("b", Vec::new(), (0, [0; 32]), t0, WALL);
    assert_eq!(out.len(), 1, "the digest, after no entries");
    assert!(a
        .snapshot("b", Vec::new(), (0, [0; 32]), t0, WALL)
        .is_empty());
    let later = t0 + Duration::from_secs(1);
    assert_eq!(
        a.snapshot("b", Vec::new(), (0, [0; 32]), later, WALL).len(),
        1
    );
    assert!(a
        .snapshot("nobody", Vec::new(), (0, [0; 32]), later, WALL)
        .is_empty());
}
