//! Messages relayed by a peer agent: re-verified as the server's own, never answered, never
//! probed; snapshots; the digest of the binding table.
use super::{test_support::*, *};

/// Agent B: same policy as [`registry`], its own address. The servers' messages are
/// addressed to agent A (`AGENT`), which relays them.
fn peer_b() -> Registry {
    let keys = HashMap::from([
        ("s1".to_string(), KEY1.to_vec()),
        ("s2".to_string(), KEY2.to_vec()),
    ]);
    Registry::new(
        &registration(Limits::default(), 30),
        &keys,
        &["10.0.0.9".parse().unwrap()],
        64,
    )
}

fn by_a(snapshot: Option<SnapshotExtra>) -> Relayed {
    Relayed {
        peer: "a".into(),
        peer_addresses: vec![wire::to_mapped(AGENT.parse().unwrap())],
        snapshot,
    }
}

#[test]
fn a_relayed_update_binds_at_the_peer_without_an_answer_and_is_not_relayed_again() {
    let (mut a, mut b) = (registry(Limits::default(), 30), peer_b());
    let now = Instant::now();
    let bu = Bu::new(10, WALL).bytes();
    let at_a = a.handle(&bu, from(), now, WALL);
    assert!(
        Registry::accepted_outcome(&at_a),
        "A relays what it accepted"
    );
    let at_b = b.handle_relayed(&bu, from(), &by_a(None), now, WALL);
    assert_eq!(at_b.counted, "relayed_registered");
    assert!(at_b.changed);
    assert!(at_b.reply.is_none(), "no acknowledgement from a peer");
    assert!(
        !Registry::accepted_outcome(&at_b),
        "a relayed message is not relayed again"
    );
    assert_eq!(a.selected(&[]), b.selected(&[]));
    assert_eq!(a.inputs_digest(), b.inputs_digest());
    let report = b.report(now, None);
    assert_eq!(report.bindings[0].relayed_by.as_deref(), Some("a"));
    // A snapshot for A leaves out what A relayed; one for another peer has it.
    assert!(b.snapshot_entries("a", now).is_empty());
    assert_eq!(b.snapshot_entries("c", now).len(), 1);
    // The same message relayed again (a replay by anyone who captured it): refused.
    let again = b.handle_relayed(&bu, from(), &by_a(None), now, WALL);
    assert_eq!(
        again.counted,
        format!("relayed_refused_{}", status::ID_MISMATCH)
    );
    assert!(again.reply.is_none() && !again.changed);
}

#[test]
fn a_peer_cannot_forge_a_server_message_or_move_its_source() {
    let mut b = peer_b();
    let now = Instant::now();
    // Signed with s2's key while claiming s1 (what a relaying agent, which holds no
    // server's key it has not been given, or a member, could try).
    let forged = Bu {
        key: KEY2,
        ..Bu::new(10, WALL)
    }
    .bytes();
    let o = b.handle_relayed(&forged, from(), &by_a(None), now, WALL);
    assert_eq!(
        o.counted,
        format!("relayed_refused_{}", status::AUTH_FAILED)
    );
    // One flipped byte of an authentic message.
    let mut tampered = Bu::new(10, WALL).bytes();
    let at = tampered.len() - 20;
    tampered[at] ^= 1;
    let o = b.handle_relayed(&tampered, from(), &by_a(None), now, WALL);
    assert!(o.counted.starts_with("relayed_"), "{}", o.counted);
    assert!(!o.changed);
    // An authentic message with an outer source outside s1's real prefixes: the care-of
    // check uses the carried source exactly as for a direct update.
    let elsewhere: SocketAddr = "10.9.9.9:5000".parse().unwrap();
    let o = b.handle_relayed(
        &Bu::new(10, WALL).bytes(),
        elsewhere,
        &by_a(None),
        now,
        WALL,
    );
    assert_eq!(
        o.counted,
        format!("relayed_refused_{}", status::INVALID_COA)
    );
    // Addressed to another agent than the one relaying it.
    let to_c = Relayed {
        peer_addresses: vec![wire::to_mapped("10.0.0.7".parse().unwrap())],
        ..by_a(None)
    };
    let o = b.handle_relayed(&Bu::new(10, WALL).bytes(), from(), &to_c, now, WALL);
    assert_eq!(o.counted, "relayed_dropped_not_for_this_agent");
    // Not allowed by B's policy (s2 may not bind 192.0.2.1's neighbour outside its allow).
    let unauthorized = Bu {
        home: "2001:db8::1",
        ..Bu {
            id: "s2",
            key: KEY2,
            spi: 2,
            real: "10.0.3.5",
            ..Bu::new(10, WALL)
        }
    }
    .bytes();
    let o = b.handle_relayed(
        &unauthorized,
        "10.0.3.5:1".parse().unwrap(),
        &by_a(None),
        now,
        WALL,
    );
    assert_eq!(o.counted, format!("relayed_refused_{}", status::PROHIBITED));
    assert!(b.selected(&[]).is_empty(), "nothing bound");
}

#[test]
fn relayed_bindings_are_not_probed_nor_asked_to_refresh_and_deregistrations_travel() {
    // B holds A's address too here, so that the server's own messages (addressed to it)
    // can also reach it directly, below.
    let mut b = registry(Limits::default(), 30);
    let t0 = Instant::now();
    b.handle_relayed(&Bu::new(10, WALL).bytes(), from(), &by_a(None), t0, WALL);
    // Long past every probe interval and into the last quarter of the lifetime (20 s).
    let later = t0 + Duration::from_secs(16);
    assert!(b.refresh_requests(later).is_empty());
    let (probes, changed) = b.probe(later);
    assert!(probes.is_empty() && !changed);
    assert!(b.refresh_all(later).is_empty());
    // The deregistration, relayed: draining here too.
    let dereg = Bu {
        lifetime: 0,
        ..Bu::new(11, WALL + 1)
    }
    .bytes();
    let o = b.handle_relayed(&dereg, from(), &by_a(None), later, WALL + 1);
    assert_eq!(o.counted, "relayed_deregistered");
    assert!(o.changed && o.reply.is_none());
    assert_eq!(
        b.report(later, None).bindings[0].state,
        BindingState::Draining
    );
    // The server now talks to B directly: B answers and probes it again.
    let direct = b.handle(&Bu::new(12, WALL + 2).bytes(), from(), later, WALL + 2);
    assert_eq!(direct.counted, "refreshed");
    assert!(direct.reply.is_some());
    assert_eq!(b.report(later, None).bindings[0].relayed_by, None);
}

#[test]
fn a_snapshot_entry_older_than_the_window_binds_for_the_time_left_with_the_senders_weight() {
    let mut a = registry(Limits::default(), 30);
    let t0 = Instant::now();
    let first = Bu::new(10, WALL);
    a.handle(&first.bytes(), from(), t0, WALL);
    let mut loaded = Bu::new(11, WALL + (1 << 32));
    loaded.load = LoadInfo {
        used_capacity: 40,
        max_capacity: 100,
        ..Default::default()
    };
    a.handle(&loaded.bytes(), from(), t0, WALL + (1 << 32));
    // 15 s later (beyond no window but half the lifetime), B (re)connects and asks.
    let t = t0 + Duration::from_secs(15);
    let wall = WALL + (15 << 32);
    let entries = a.snapshot_entries("b", t);
    assert_eq!(entries.len(), 1, "one binding, its last message");
    let mut b = peer_b();
    for e in &entries {
        let o = b.handle_relayed(
            &e.message.payload,
            e.message.from,
            &by_a(Some(e.extra)),
            t,
            wall,
        );
        assert_eq!(o.counted, "relayed_registered");
    }
    assert_eq!(
        a.inputs_digest(),
        b.inputs_digest(),
        "same seq, state, weight"
    );
    let left = |r: &Registry| r.report(t, None).bindings[0].lifetime_left_secs;
    assert!(
        (left(&a) - left(&b)).abs() < 0.01,
        "{} {}",
        left(&a),
        left(&b)
    );
    // The same entry past its own lifetime (20 s) by more than the window: refused.
    let mut c = peer_b();
    let late = WALL + (60 << 32);
    let e = &entries[0];
    let o = c.handle_relayed(
        &e.message.payload,
        e.message.from,
        &by_a(Some(e.extra)),
        t,
        late,
    );
    assert_eq!(
        o.counted,
        format!("relayed_refused_{}", status::ID_MISMATCH)
    );
    // An entry no newer than what B has: refused by its sequence number.
    let o = b.handle_relayed(
        &e.message.payload,
        e.message.from,
        &by_a(Some(e.extra)),
        t,
        wall,
    );
    assert_eq!(
        o.counted,
        format!("relayed_refused_{}", status::SEQUENCE_OUT_OF_WINDOW)
    );
}

#[test]
fn the_digest_follows_seq_state_and_weight_and_not_the_order_of_arrival() {
    let now = Instant::now();
    let s1 = Bu::new(10, WALL).bytes();
    let s2 = Bu {
        id: "s2",
        key: KEY2,
        spi: 2,
        home: "192.0.2.7",
        real: "10.0.3.5",
        ..Bu::new(3, WALL + 1)
    }
    .bytes();
    let s2_from: SocketAddr = "10.0.3.5:1".parse().unwrap();
    let (mut x, mut y) = (
        registry(Limits::default(), 30),
        registry(Limits::default(), 30),
    );
    x.handle(&s1, from(), now, WALL + 1);
    x.handle(&s2, s2_from, now, WALL + 1);
    y.handle(&s2, s2_from, now, WALL + 1);
    assert_ne!(x.inputs_digest(), y.inputs_digest());
    y.handle(&s1, from(), now, WALL + 1);
    assert_eq!(x.inputs_digest(), y.inputs_digest());
    assert_eq!(x.inputs_digest().0, 2);
    x.handle(&Bu::new(11, WALL + 2).bytes(), from(), now, WALL + 2);
    assert_ne!(
        x.inputs_digest(),
        y.inputs_digest(),
        "a newer sequence number"
    );
}
