use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use super::{test_support::*, *};

const SECOND: u64 = 1 << 32;

fn source(real: &str) -> SocketAddr {
    SocketAddr::new(real.parse().unwrap(), 5000)
}

/// Sends `bu` from its own real address; panics unless it is accepted.
fn accept(r: &mut Registry, bu: &Bu, now: Instant, wall: u64) {
    let o = r.handle(&bu.bytes(), source(bu.real), now, wall);
    assert!(
        ["registered", "refreshed", "deregistered"].contains(&o.counted.as_str()),
        "{o:?}"
    );
}

fn s2(seq: u16, ts: u64) -> Bu {
    Bu {
        id: "s2",
        key: KEY2,
        spi: 2,
        home: "192.0.2.5",
        real: "10.0.3.1",
        ..Bu::new(seq, ts)
    }
}

fn capacity(used: u32) -> LoadInfo {
    LoadInfo {
        used_capacity: used,
        max_capacity: 1000,
        ..Default::default()
    }
}

/// s1's IPv4 binding: 60 s, with load reports that leave a smoothed load behind.
fn s1_v4(seq: u16, ts: u64, used: u32) -> Bu {
    Bu {
        lifetime: 15,
        load: capacity(used),
        ..Bu::new(seq, ts)
    }
}

/// s1's two IPv6 bindings (60 s), one per service of the same anycast address, standby tier.
fn s1_v6(port: u16, seq: u16, ts: u64) -> Bu {
    Bu {
        home: "2001:db8::10",
        real: "2001:db8:2::11",
        service: Some((PROTO_TCP, port)),
        lifetime: 15,
        load: LoadInfo {
            priority: 1,
            sessions_in_use: 7,
            max_sessions: 70,
            ..Default::default()
        },
        ..Bu::new(seq, ts)
    }
}

/// A registry at `t0`/`WALL` with: s1 over IPv4 (smoothed load), s1 over IPv6 for two
/// services, s2 (20 s, suspect after one unanswered probe), and s1 via 10.0.2.12 draining.
fn populated(t0: Instant) -> Registry {
    let mut r = registry(Limits::default(), 30);
    for (i, used) in [0, 800, 800].into_iter().enumerate() {
        let i = i as u16;
        accept(&mut r, &s1_v4(1 + i, WALL + u64::from(i), used), t0, WALL);
    }
    accept(&mut r, &s1_v6(443, 1, WALL + 10), t0, WALL);
    accept(&mut r, &s1_v6(80, 1, WALL + 11), t0, WALL);
    accept(&mut r, &s2(1, WALL), t0, WALL);
    let draining = |seq, ts, lifetime| Bu {
        real: "10.0.2.12",
        lifetime,
        ..Bu::new(seq, ts)
    };
    accept(&mut r, &draining(1, WALL + 12, 5), t0, WALL);
    accept(&mut r, &draining(2, WALL + 13, 0), t0, WALL);
    // Everyone is probed; all but s2 answer.
    let (sent, _) = r.probe(t0);
    assert_eq!(sent.len(), 3);
    let t = t0 + Duration::from_millis(100);
    accept(&mut r, &s1_v4(4, WALL + 20, 800), t, WALL);
    accept(&mut r, &s1_v6(443, 2, WALL + 21), t, WALL);
    accept(&mut r, &s1_v6(80, 2, WALL + 22), t, WALL);
    r.probe(t0 + Duration::from_millis(600));
    r
}

/// `report`'s bindings with the times that move with the clock set aside.
fn without_times(report: &BindingsReport) -> (Vec<BindingReport>, Vec<(f64, f64)>) {
    report
        .bindings
        .iter()
        .map(|b| {
            let times = (b.age_secs, b.lifetime_left_secs);
            let b = BindingReport {
                age_secs: 0.0,
                lifetime_left_secs: 0.0,
                ..b.clone()
            };
            (b, times)
        })
        .unzip()
}

fn restored(state: &RegistryState, r: &mut Registry, now: Instant, wall: u64) -> RestoreReport {
    let json = serde_json::to_string(state).unwrap();
    r.restore(serde_json::from_str(&json).unwrap(), now, wall)
}

#[test]
fn a_restored_registry_reports_and_selects_as_before() {
    let t0 = Instant::now();
    let mut before = populated(t0);
    let snap_at = t0 + Duration::from_millis(700);
    let state = before.snapshot(snap_at, WALL);
    let (bindings, times) = without_times(&before.report(snap_at, None));
    assert_eq!(bindings.len(), 5);
    let conditions: Vec<Condition> = bindings.iter().map(|b| b.condition).collect();
    assert!(conditions.contains(&Condition::Suspect), "{conditions:?}");
    assert!(bindings.iter().any(|b| b.state == BindingState::Draining));

    // The new process: another monotonic clock, 2 s later on the wall clock.
    let later = t0 + Duration::from_secs(1000);
    let mut after = registry(Limits::default(), 30);
    let report = restored(&state, &mut after, later, WALL + 2 * SECOND);
    assert_eq!(report.restored.len(), 5, "{report}");
    assert!(
        report.expired.is_empty() && report.refused.is_empty(),
        "{report}"
    );
    assert_eq!(report.replay_restored, 2);
    assert!((report.saved_secs_ago - 2.0).abs() < 1e-6);

    let (bindings_after, times_after) = without_times(&after.report(later, None));
    assert_eq!(bindings_after, bindings);
    for ((age, left), (age_after, left_after)) in times.iter().zip(&times_after) {
        assert!((age_after - age - 2.0).abs() < 0.01, "{age} -> {age_after}");
        assert!(
            (left - left_after - 2.0).abs() < 0.01,
            "{left} -> {left_after}"
        );
    }
    assert_eq!(after.selected(&[]), before.selected(&[]));

    // The smoothed load came back, not only the weight: the next report moves both alike
    // (a smoother that starts over would publish 200 here).
    let next = s1_v4(5, WALL + 3 * SECOND, 800);
    let now = t0 + Duration::from_secs(3);
    accept(&mut before, &next, now, WALL + 3 * SECOND);
    accept(
        &mut after,
        &next,
        later + Duration::from_secs(1),
        WALL + 3 * SECOND,
    );
    let weight = |r: &Registry| {
        r.report(now, None)
            .bindings
            .iter()
            .find(|b| b.id.real == "10.0.2.11".parse::<IpAddr>().unwrap())
            .unwrap()
            .weight
    };
    assert_eq!(weight(&before), 392);
    assert_eq!(weight(&after), 392);
    assert_eq!(after.selected(&[]), before.selected(&[]));
}

#[test]
fn bindings_that_expired_while_no_agent_ran_are_not_restored() {
    let t0 = Instant::now();
    // s1's bindings were refreshed 0.5 s before the snapshot (60 s), s2 registered 0.6 s
    // before it (20 s), the draining one deregistered 0.6 s before it (30 s).
    let state = populated(t0).snapshot(t0 + Duration::from_millis(600), WALL);
    let mut r = registry(Limits::default(), 30);
    let later = t0 + Duration::from_secs(500);
    let report = restored(&state, &mut r, later, WALL + 31 * SECOND);
    let servers = |ids: &[BindingId]| -> Vec<(String, IpAddr)> {
        ids.iter().map(|id| (id.server.clone(), id.real)).collect()
    };
    assert_eq!(
        servers(&report.expired),
        [
            ("s2".to_string(), "10.0.3.1".parse().unwrap()),
            ("s1".to_string(), "10.0.2.12".parse().unwrap())
        ]
    );
    assert_eq!(report.restored.len(), 3, "{report}");
    assert!(report.refused.is_empty(), "{report}");
    let left: Vec<f64> = r
        .report(later, None)
        .bindings
        .iter()
        .map(|b| b.lifetime_left_secs)
        .collect();
    assert!(left.iter().all(|&l| (l - 28.5).abs() < 0.01), "{left:?}");
    // The restored expiry is a real one.
    assert!(!r.expire(later + Duration::from_millis(28_400)));
    assert!(r.expire(later + Duration::from_millis(28_600)));
    assert!(r.report(later, None).bindings.is_empty());

    // No longer than the policy grants now: a lifetime of at most 20 s, a drain of 5 s.
    let mut reg = registration(Limits::default(), 5);
    reg.max_lifetime = 20;
    let keys = HashMap::from([
        ("s1".to_string(), KEY1.to_vec()),
        ("s2".to_string(), KEY2.to_vec()),
    ]);
    let mut r = Registry::new(&reg, &keys, &[AGENT.parse().unwrap()], 64);
    let report = restored(&state, &mut r, later, WALL + SECOND);
    assert_eq!(report.restored.len(), 5, "{report}");
    for b in r.report(later, None).bindings {
        let longest = match b.state {
            BindingState::Active => 20.0,
            BindingState::Draining => 5.0,
        };
        assert!(b.lifetime_left_secs <= longest, "{b:?}");
        assert!(b.lifetime_secs <= 20, "{b:?}");
    }
}

#[test]
fn bindings_the_present_policy_does_not_allow_are_refused() {
    let t0 = Instant::now();
    let mut before = registry(Limits::default(), 30);
    accept(&mut before, &Bu::new(1, WALL), t0, WALL);
    accept(&mut before, &s2(1, WALL), t0, WALL);
    // s1 also through 10.0.2.50, which s2 may use too.
    let shared = Bu {
        real: "10.0.2.50",
        ..Bu::new(1, WALL + 1)
    };
    accept(&mut before, &shared, t0, WALL);
    let state = before.snapshot(t0, WALL);
    let real = |r: &str| r.parse::<IpAddr>().unwrap();
    let refused = |r: &mut Registry| {
        let report = restored(&state, r, t0, WALL);
        let mut refused: Vec<(IpAddr, String)> = report
            .refused
            .iter()
            .map(|(id, why)| (id.real, why.clone()))
            .collect();
        refused.sort();
        (report, refused)
    };

    // The same policy takes everything back.
    let (report, refused_now) = refused(&mut registry(Limits::default(), 30));
    assert_eq!((report.restored.len(), refused_now), (3, vec![]));

    // s1's real addresses narrowed to 10.0.2.128/25; s2 removed; s2 bound 10.0.2.50 since
    // the start.
    let mut reg = registration(Limits::default(), 30);
    reg.servers[0].real = vec!["10.0.2.128/25".parse().unwrap()];
    reg.servers.truncate(1);
    let mut narrowed = Registry::new(
        &reg,
        &HashMap::from([("s1".to_string(), KEY1.to_vec())]),
        &[AGENT.parse().unwrap()],
        64,
    );
    let (report, refused_now) = refused(&mut narrowed);
    assert!(report.restored.is_empty(), "{report}");
    assert_eq!(refused_now.len(), 3, "{report}");
    assert_eq!(refused_now[0].0, real("10.0.2.11"));
    assert!(refused_now[0].1.contains("not among its real addresses"));
    assert_eq!(refused_now[1].0, real("10.0.2.50"));
    assert!(refused_now[1].1.contains("not among its real addresses"));
    assert_eq!(refused_now[2].0, real("10.0.3.1"));
    assert!(refused_now[2].1.contains("'s2' is not configured"));
    assert_eq!(
        report.replay_dropped,
        [("s2".to_string(), "not configured".to_string())]
    );
    assert!(narrowed.report(t0, None).bindings.is_empty());
    assert!(narrowed.selected(&[]).is_empty());

    let mut r = registry(Limits::default(), 30);
    let s2_shared = Bu {
        real: "10.0.2.50",
        ..s2(2, WALL + 1)
    };
    accept(&mut r, &s2_shared, t0, WALL);
    let (report, refused_now) = refused(&mut r);
    assert_eq!(report.restored.len(), 2, "{report}");
    assert_eq!(refused_now.len(), 1, "{report}");
    assert_eq!(refused_now[0].0, real("10.0.2.50"));
    assert!(refused_now[0].1.contains("bound by 's2'"), "{report}");

    // The anycast address no longer allowed; a configured service's address now; the
    // limits lower.
    let mut reg = registration(Limits::default(), 30);
    reg.servers[1].allow = vec!["192.0.2.128/25".parse().unwrap()];
    let keys = HashMap::from([
        ("s1".to_string(), KEY1.to_vec()),
        ("s2".to_string(), KEY2.to_vec()),
    ]);
    let mut r = Registry::new(&reg, &keys, &[AGENT.parse().unwrap()], 64)
        .with_service_addresses([real("10.0.2.50")]);
    let (report, refused_now) = refused(&mut r);
    assert_eq!(report.restored.len(), 1, "{report}");
    assert!(
        refused_now[0].1.contains("is an anycast address"),
        "{report}"
    );
    assert!(refused_now[1]
        .1
        .contains("not authorized to bind 192.0.2.5"));
    let mut r = Registry::new(
        &registration(Limits::default(), 30),
        &keys,
        &[AGENT.parse().unwrap()],
        2,
    );
    // s1's two bindings share 192.0.2.1's two services (TCP and UDP); s2's would be more.
    let (report, refused_now) = refused(&mut r);
    assert_eq!(report.restored.len(), 2, "{report}");
    assert_eq!(refused_now.len(), 1, "{report}");
    assert_eq!(refused_now[0].0, real("10.0.3.1"));
    assert!(refused_now[0].1.contains("at most 2 services"), "{report}");

    // A tampered file: a weight no smoother publishes, a MESG-ID far ahead.
    let mut json = serde_json::to_value(&state).unwrap();
    json["bindings"][0]["weight"] = serde_json::json!(crate::selection::MAX_WEIGHT + 1);
    json["last_mesg_id"]["s1"] = serde_json::json!(WALL + 1000 * SECOND);
    let mut r = registry(Limits::default(), 30);
    let report = r.restore(serde_json::from_value(json).unwrap(), t0, WALL);
    assert_eq!(report.refused.len(), 1, "{report}");
    assert!(
        report.refused[0].1.contains("implausible weight"),
        "{report}"
    );
    assert_eq!(report.replay_dropped.len(), 1, "{report}");
    assert_eq!(report.replay_dropped[0].0, "s1");
    let o = r.handle(&Bu::new(2, WALL + 5).bytes(), from(), t0, WALL);
    assert_eq!(
        ba_status(&o, Some(KEY1), 1).0,
        status::ACCEPTED,
        "not locked out by the tampered MESG-ID"
    );
}

/// A server whose clock runs 10 s ahead of the agent's: its update is newer than the
/// restarted agent's start, so only the restored replay state refuses the replay.
#[test]
fn an_update_accepted_before_the_restart_cannot_be_replayed_after_it() {
    let t0 = Instant::now();
    let captured = Bu::new(7, WALL + 10 * SECOND).bytes();
    let mut before = registry(Limits::default(), 30);
    assert_eq!(
        before.handle(&captured, from(), t0, WALL).counted,
        "registered"
    );
    let state = before.snapshot(t0, WALL);
    let restart = WALL + SECOND;
    let later = t0 + Duration::from_secs(1);

    // Without the state, the start-time check lets it through.
    let mut empty = registry(Limits::default(), 30).refusing_mesg_ids_before(restart);
    assert_eq!(
        empty.handle(&captured, from(), later, restart).counted,
        "registered"
    );

    let mut r = registry(Limits::default(), 30).refusing_mesg_ids_before(restart);
    let report = restored(&state, &mut r, later, restart);
    assert_eq!(report.restored.len(), 1);
    let o = r.handle(&captured, from(), later, restart);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ID_MISMATCH);
    assert!(!o.changed);
    // The sequence number came back, too: a newer MESG-ID with an old sequence is refused.
    let o = r.handle(
        &Bu::new(7, WALL + 11 * SECOND).bytes(),
        from(),
        later,
        restart,
    );
    assert_eq!(
        ba_status(&o, Some(KEY1), 1),
        (status::SEQUENCE_OUT_OF_WINDOW, 7, 0)
    );
    // The server's next update is accepted.
    let o = r.handle(
        &Bu::new(8, WALL + 12 * SECOND).bytes(),
        from(),
        later,
        restart,
    );
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ACCEPTED);

    // A replay state newer than the file's (an update since the start) is kept.
    let mut r = registry(Limits::default(), 30);
    let newer = Bu {
        real: "10.0.2.12",
        ..Bu::new(1, WALL + 20 * SECOND)
    };
    accept(&mut r, &newer, later, restart);
    restored(&state, &mut r, later, restart);
    let o = r.handle(
        &Bu::new(8, WALL + 15 * SECOND).bytes(),
        from(),
        later,
        restart,
    );
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ID_MISMATCH);
}

#[test]
fn refresh_all_asks_every_active_binding_at_once_and_answers_count_as_probe_answers() {
    let t0 = Instant::now();
    let state = populated(t0).snapshot(t0 + Duration::from_millis(600), WALL);
    let mut r = registry(Limits::default(), 30);
    let t = t0 + Duration::from_secs(100);
    restored(&state, &mut r, t, WALL + SECOND);

    let requests = r.refresh_all(t);
    let mut got: Vec<(SocketAddr, IpAddr, &str)> = requests
        .iter()
        .map(|q| {
            let msg = wire::decode(&q.payload).unwrap();
            assert_eq!(msg.body, Body::BindingRefreshRequest);
            let signer = [("s1", KEY1, 1), ("s2", KEY2, 2)]
                .into_iter()
                .find(|&(_, secret, spi)| wire::verify(&q.payload, Key { spi, secret }))
                .expect("signed with a server's key")
                .0;
            (q.to, wire::from_mapped(msg.dst), signer)
        })
        .collect();
    got.sort();
    // One per identity, anycast address and source: the IPv6 pair shares one; the draining
    // binding gets none.
    assert_eq!(
        got,
        [
            (source("10.0.2.11"), "192.0.2.1".parse().unwrap(), "s1"),
            (source("10.0.3.1"), "192.0.2.5".parse().unwrap(), "s2"),
            (
                source("2001:db8:2::11"),
                "2001:db8::10".parse().unwrap(),
                "s1"
            ),
        ]
    );
    assert_eq!(r.report(t, None).counters["refresh_requests_sent"], 3);

    // s1 answers within the probe timeout (500 ms); s2 does not.
    let answered = t + Duration::from_millis(499);
    let wall = WALL + 2 * SECOND;
    accept(&mut r, &s1_v4(10, wall, 800), answered, wall);
    accept(&mut r, &s1_v6(443, 10, wall + 1), answered, wall);
    accept(&mut r, &s1_v6(80, 10, wall + 2), answered, wall);
    let (sent, changed) = r.probe(t + Duration::from_millis(500));
    assert!(sent.is_empty(), "the next probes are an interval away");
    assert!(changed);
    assert_eq!(r.report(t, None).counters["probes_missed"], 1, "s2's only");
    // The metrics' account: s1's answers with their round trips, s2's miss.
    let (outcomes, timeout) = r.take_probe_outcomes();
    assert_eq!(outcomes.missed, 1);
    assert!(!outcomes.round_trips.is_empty());
    assert!(
        outcomes
            .round_trips
            .iter()
            .all(|d| *d == Duration::from_millis(499)),
        "{outcomes:?}"
    );
    assert_eq!(timeout, Some(Duration::from_millis(500)));
    assert_eq!(r.take_probe_outcomes().0, Default::default(), "taken once");
    let conditions: Vec<(String, Condition)> = r
        .report(t, None)
        .bindings
        .into_iter()
        .filter(|b| b.state == BindingState::Active)
        .map(|b| (b.id.server, b.condition))
        .collect();
    assert_eq!(
        conditions,
        [
            ("s1".into(), Condition::Up),
            ("s2".into(), Condition::Down),
            ("s1".into(), Condition::Up),
            ("s1".into(), Condition::Up),
        ],
        "s2 missed the probe before the restart and this one: down"
    );
}

#[test]
fn take_dirty_says_when_the_state_file_is_out_of_date() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut r = registry(Limits::default(), 10);
    assert!(!r.take_dirty());
    let first = Bu::new(1, WALL).bytes();
    assert!(r.handle(&first, from(), t0, WALL).changed);
    assert!(r.take_dirty());
    assert!(!r.take_dirty(), "once");

    // Refused or dropped: nothing the file holds changed.
    for (bytes, why) in [
        (first.clone(), "a replay"),
        (
            Bu {
                key: KEY2,
                ..Bu::new(2, WALL + 1)
            }
            .bytes(),
            "forged",
        ),
        (
            Bu {
                home: "192.0.2.2",
                ..Bu::new(2, WALL + 2)
            }
            .bytes(),
            "not authorized",
        ),
        (Bu::new(1, WALL + 3).bytes(), "an old sequence number"),
        (vec![0u8; 40], "garbage"),
    ] {
        let o = r.handle(&bytes, from(), t0, WALL);
        assert!(o.counted.starts_with("refused") || o.counted.starts_with("dropped"));
        assert!(!r.take_dirty(), "{why}");
    }
    // What the file does not hold.
    r.refresh_requests(ms(16_000));
    r.refresh_all(t0);
    r.watch_reverse(t0, &BTreeMap::new());
    r.snapshot(t0, WALL);
    assert!(!r.take_dirty());

    // A refresh: a newer sequence number and MESG-ID, nothing else.
    let o = r.handle(&Bu::new(2, WALL + 4).bytes(), from(), ms(100), WALL);
    assert!(!o.changed);
    assert!(r.take_dirty());

    // Missed probes, up to down; not those after. (The refresh above answered the
    // request of refresh_all; the next probe is an interval later.)
    assert_eq!(r.probe(ms(1000)).0.len(), 1);
    assert!(!r.take_dirty(), "a probe sent");
    r.probe(ms(1500));
    assert!(r.take_dirty(), "suspect");
    r.probe(ms(2000));
    r.probe(ms(2500));
    assert!(r.take_dirty(), "down");
    r.probe(ms(3000));
    r.probe(ms(3500));
    assert_eq!(r.report(t0, None).counters["probes_missed"], 3);
    assert!(!r.take_dirty(), "down already");

    // Deregistration, the drain's end; nothing to expire.
    accept(
        &mut r,
        &Bu {
            lifetime: 0,
            ..Bu::new(3, WALL + 5)
        },
        ms(4000),
        WALL,
    );
    assert!(r.take_dirty());
    assert!(!r.expire(ms(5000)));
    assert!(!r.take_dirty());
    assert!(r.expire(ms(14_000)));
    assert!(r.take_dirty());

    // A reload that keeps every binding keeps a pending flag; one that removes sets it.
    accept(&mut r, &Bu::new(4, WALL + 6), ms(14_000), WALL);
    r.update_policy(registry(Limits::default(), 10));
    assert!(r.take_dirty());
    r.update_policy(registry(Limits::default(), 10));
    assert!(!r.take_dirty());
    let mut reg = registration(Limits::default(), 10);
    reg.servers[0].allow = vec!["192.0.2.128/25".parse().unwrap()];
    r.update_policy(Registry::new(
        &reg,
        &HashMap::from([("s1".to_string(), KEY1.to_vec())]),
        &[AGENT.parse().unwrap()],
        64,
    ));
    assert!(r.take_dirty());

    // A restore.
    let state = r.snapshot(t0, WALL);
    r.restore(state, t0, WALL);
    assert!(r.take_dirty());
}

/// A directory of its own under the system's temporary directory, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("anycast-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_state_file_is_written_atomically_and_private() {
    let dir = TempDir::new("write");
    let path = dir.0.join("registry.json");
    let t0 = Instant::now();
    let state = populated(t0).snapshot(t0, WALL);
    write_state_file(&path, &state).unwrap();
    assert_eq!(dir.entries(), ["registry.json"], "no temporary file left");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(read_state_file(&path).unwrap(), Some(state.clone()));

    // Over an old file, and over the leftover of an interrupted write, which is a symbolic
    // link to a file that must not be touched.
    let elsewhere = dir.0.join("elsewhere");
    fs::write(&elsewhere, "keep").unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.0.join(".registry.json.tmp")).unwrap();
    let empty = registry(Limits::default(), 30).snapshot(t0, WALL);
    write_state_file(&path, &empty).unwrap();
    assert_eq!(dir.entries(), ["elsewhere", "registry.json"]);
    assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "keep");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(read_state_file(&path).unwrap(), Some(empty));

    // A directory that does not exist: an error naming it, nothing written.
    let missing = dir.0.join("no-such-dir").join("registry.json");
    let e = format!("{:#}", write_state_file(&missing, &state).unwrap_err());
    assert!(e.contains("no-such-dir"), "{e}");
}

#[test]
fn state_files_that_cannot_be_trusted_or_read_are_errors() {
    let dir = TempDir::new("read");
    let path = dir.0.join("registry.json");
    assert_eq!(read_state_file(&path).unwrap(), None, "no file yet");

    let t0 = Instant::now();
    let state = populated(t0).snapshot(t0, WALL);
    let good = serde_json::to_value(&state).unwrap();
    let error = |contents: &str, mode: u32| {
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        format!("{:#}", read_state_file(&path).unwrap_err())
    };
    let mut other = good.clone();
    other["format"] = serde_json::json!(STATE_FORMAT + 1);
    let mut no_format = good.clone();
    no_format.as_object_mut().unwrap().remove("format");
    let mut bad_binding = good.clone();
    bad_binding["bindings"][0]["source"] = serde_json::json!("not an address");
    for (contents, mode, expected) in [
        (
            "{\"format\": 1, \"bindings\": [".to_string(),
            0o600,
            "not JSON",
        ),
        (
            other.to_string(),
            0o600,
            "state format 2, this agent reads format 1",
        ),
        (no_format.to_string(), 0o600, "no format number"),
        (bad_binding.to_string(), 0o600, "malformed registry state"),
        (
            good.to_string(),
            0o620,
            "writable by group or others (mode 0620)",
        ),
        (good.to_string(), 0o602, "mode 0602"),
    ] {
        let e = error(&contents, mode);
        assert!(
            e.contains(&path.display().to_string()),
            "names the file: {e}"
        );
        assert!(e.contains(expected), "{expected}: {e}");
    }
    // Readable by others is not refused: it holds no secret.
    fs::write(&path, good.to_string()).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(read_state_file(&path).unwrap(), Some(state.clone()));

    // Owned by another user (only root can make one).
    if std::os::unix::fs::chown(&path, Some(65534), None).is_ok() {
        let e = format!("{:#}", read_state_file(&path).unwrap_err());
        assert!(e.contains("owned by uid 65534"), "{e}");
    }

    let e = format!("{:#}", read_state_file(&dir.0).unwrap_err());
    assert!(e.contains("not a regular file"), "{e}");

    // A state of another format handed to restore directly takes nothing.
    let mut r = registry(Limits::default(), 30);
    let report = r.restore(serde_json::from_value(other).unwrap(), t0, WALL);
    assert!(report.restored.is_empty());
    assert_eq!(report.refused.len(), 5);
    assert!(r.report(t0, None).bindings.is_empty());
}
