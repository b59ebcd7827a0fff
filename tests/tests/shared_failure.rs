//! Confirmed failures are shared between agents: two agents on the servers' LAN (as in
//! relay.rs), both checking every real address by ICMP. s1's IPv4 real address becomes
//! unreachable from agent A only (a blackhole route in A's namespace): A confirms it down,
//! tells B in a health envelope, and B drops it too: both `held_down` lists name it (A:
//! `local`, B: `peer a`), B's own observation stays up, every service's `table_digest` is
//! the same at both, and the digests they compare agree. The route back, both take it back.
//! Cut again, then A killed (SIGKILL) while it holds it down: B's mark lapses after about
//! three digest intervals. Health envelopes from a host that is no peer, with a wrong MAC,
//! or naming a real address B has no binding for are refused or ignored, and counted.
//! Runs as root.
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use anycast_common::wire;
use anycast_ctl::relay::{self, Envelope, HealthEntry};
use anycast_tests::{
    agreement::tables,
    second_agent::{send_as_a, send_to_b, SecondAgent, A_ADDR, B_ADDR},
    topology::{ServerMode, Topology, ANYCAST_V4},
    wait_until,
};
use anyhow::{Context as _, Result};

const PAIR_KEY_HEX: &str = "8a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9";
/// s1's IPv4 real address: the one A loses.
const S1_REAL: &str = "10.71.2.11";
const DIGEST_INTERVAL_MS: u64 = 200;

fn pair_key() -> Vec<u8> {
    anycast_tests::unhex(PAIR_KEY_HEX).expect("a hex key")
}

/// Who holds `real` down, per `relay.held_down` (the union over its services).
fn down_by(json: &serde_json::Value, real: &str) -> Vec<String> {
    let mut by: Vec<String> = json["relay"]["held_down"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["real"] == real)
        .flat_map(|h| h["down_by"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    by.sort();
    by.dedup();
    by
}

fn held_down_count(json: &serde_json::Value) -> usize {
    json["relay"]["held_down"].as_array().map_or(0, Vec::len)
}

/// Table entries `real` has, over every service.
fn entries_of(status: &serde_json::Value, real: &str) -> u64 {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["servers"].as_array().cloned().unwrap_or_default())
        .filter(|x| x["address"] == real)
        .map(|x| x["table_entries"].as_u64().unwrap_or(0))
        .sum()
}

fn relay_counter(json: &serde_json::Value, name: &str) -> u64 {
    json["relay"]["counters"][name].as_u64().unwrap_or(0)
}

/// The bindings of real address `real`: (condition, down_by).
fn bindings_of(json: &serde_json::Value, real: &str) -> Vec<(String, Vec<String>)> {
    json["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["real"] == real)
        .map(|b| {
            (
                b["condition"].as_str().unwrap_or("?").to_string(),
                b["down_by"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
            )
        })
        .collect()
}

/// A health envelope "from a" to "b", MAC'd with `key`.
fn health_envelope(down: Vec<HealthEntry>, key: &[u8]) -> Vec<u8> {
    relay::encode(
        &Envelope {
            sender: "a".into(),
            receiver: "b".into(),
            timestamp: wire::ntp_now(),
            body: relay::Body::Health { down },
        },
        key,
    )
}

/// Both agents agree: the same tables, and their digests (which include what is held down).
fn agree(topo: &Topology, b: &SecondAgent) -> Result<bool> {
    Ok(tables(&topo.status()?) == tables(&b.ctl_json("status")?)
        && topo.bindings()?["relay"]["in_sync"] == true
        && b.ctl_json("bindings")?["relay"]["in_sync"] == true)
}

#[test]
fn a_failure_one_agent_confirms_is_dropped_by_both_and_lapses_when_it_dies() -> Result<()> {
    let mut topo = Topology::build("acsf", 0, 3, ServerMode::Registering { lifetime_secs: 60 })?;
    let key_path = topo.dir.join("ab.key");
    fs::write(&key_path, PAIR_KEY_HEX)?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    // No probing: the active checks (the same at both) are what finds the failure.
    topo.registration_extra = serde_json::json!({
        "probe": null,
        "relay": {"id": "a", "digest_interval_ms": DIGEST_INTERVAL_MS,
                  "peers": [{"id": "b", "address": B_ADDR, "key_file": "ab.key"}]},
    });
    topo.config_extra = serde_json::json!({"health_checks": [
        {"type": "icmp", "interval_ms": 100, "timeout_ms": 80, "fall": 2, "rise": 2}
    ]});
    topo.start_agent(0)?;
    let b = SecondAgent::start(
        &topo,
        "acsfb",
        serde_json::json!({
            "id": "b",
            "digest_interval_ms": DIGEST_INTERVAL_MS,
            "peers": [{"id": "a", "address": A_ADDR, "key_file": "ab.key"}],
        }),
    )?;
    for i in 0..3 {
        topo.start_server(i)?;
    }
    wait_until(
        "both agents hold the twelve bindings and agree",
        Duration::from_secs(20),
        || {
            let n = |v: serde_json::Value| v["bindings"].as_array().map_or(0, Vec::len);
            Ok(n(topo.bindings()?) == 12 && n(b.ctl_json("bindings")?) == 12 && agree(&topo, &b)?)
        },
    )?;
    assert!(entries_of(&topo.status()?, S1_REAL) > 0);
    assert_eq!(held_down_count(&b.ctl_json("bindings")?), 0);

    // Hostile health envelopes, while nothing is held down: from a host that is no peer;
    // from A's address with a wrong MAC; with the pair's MAC naming a real address B has no
    // binding for (taken, ignored, counted: nothing marked).
    let before = b.ctl_json("bindings")?;
    let stranger_entry = HealthEntry {
        anycast: IpAddr::V4(ANYCAST_V4),
        protocol: 6,
        port: 80,
        real: "10.71.2.99".parse()?,
    };
    let s1_entry = HealthEntry {
        real: S1_REAL.parse()?,
        ..stranger_entry
    };
    send_to_b(
        &topo.servers[1].ns,
        "10.71.2.12",
        vec![health_envelope(vec![s1_entry], &pair_key())],
    )?;
    send_to_b(
        &topo.agent,
        A_ADDR,
        vec![health_envelope(
            vec![s1_entry],
            b"not the key a and b share",
        )],
    )?;
    send_as_a(
        &b,
        &topo.agent,
        || health_envelope(vec![stranger_entry], &pair_key()),
        |now| {
            relay_counter(now, "relay_health_unknown")
                > relay_counter(&before, "relay_health_unknown")
        },
    )?;
    wait_until("B counts the three", Duration::from_secs(2), || {
        let now = b.ctl_json("bindings")?;
        let more = |c| relay_counter(&now, c) > relay_counter(&before, c);
        Ok(more("relay_refused_unknown_peer")
            && more("relay_refused_auth")
            && more("relay_health_unknown"))
    })?;
    let after = b.ctl_json("bindings")?;
    // A's own lists (it holds nothing down, so it sends none) cannot add to these.
    for c in [
        "relay_refused_unknown_peer",
        "relay_refused_auth",
        "relay_health_unknown",
    ] {
        assert_eq!(
            relay_counter(&after, c) - relay_counter(&before, c),
            1,
            "{c}"
        );
    }
    assert!(
        relay_counter(&after, "relay_received_health")
            > relay_counter(&before, "relay_received_health")
    );
    assert_eq!(held_down_count(&after), 0, "nothing marked: {after:#}");

    // s1's IPv4 real address unreachable from A only.
    topo.agent
        .ip(&["route", "add", "blackhole", &format!("{S1_REAL}/32")])?;
    let cut = Instant::now();
    let (mut at_a, mut at_b) = (None, None);
    while at_b.is_none() && cut.elapsed() < Duration::from_secs(10) {
        if at_a.is_none() && down_by(&topo.bindings()?, S1_REAL) == ["local"] {
            at_a = Some(Instant::now());
        }
        if down_by(&b.ctl_json("bindings")?, S1_REAL) == ["peer a"] {
            at_b = Some(Instant::now());
        }
    }
    // B can take A's envelope between the polls of A and of B: then A showed it at most
    // one poll before B did.
    if at_a.is_none() && at_b.is_some() && down_by(&topo.bindings()?, S1_REAL) == ["local"] {
        at_a = at_b;
    }
    let at_a = at_a.context("A never held s1's address down")?;
    let at_b = at_b.context("B never marked s1's address down")?;
    let lag = at_b.saturating_duration_since(at_a);
    println!(
        "cut: down at A {:.0} ms after the cut, at B {:.1} ms after A showed it",
        (at_a - cut).as_secs_f64() * 1e3,
        lag.as_secs_f64() * 1e3
    );
    assert!(lag <= Duration::from_millis(300), "{lag:?}");
    // B's own observation stays up; its bindings say who holds them down.
    let bb = b.ctl_json("bindings")?;
    let at_b_bindings = bindings_of(&bb, S1_REAL);
    assert_eq!(at_b_bindings.len(), 2, "{bb:#}");
    for (condition, by) in &at_b_bindings {
        assert_eq!(condition, "up");
        assert_eq!(by, &["peer a".to_string()]);
    }
    for (_, by) in bindings_of(&topo.bindings()?, S1_REAL) {
        assert_eq!(by, ["local".to_string()]);
    }
    let start = Instant::now();
    wait_until(
        "both drop it: the same tables, without it, and digests that agree",
        Duration::from_secs(3),
        || {
            Ok(entries_of(&topo.status()?, S1_REAL) == 0
                && entries_of(&b.ctl_json("status")?, S1_REAL) == 0
                && agree(&topo, &b)?)
        },
    )?;
    println!(
        "tables agree without it {:.0} ms after B marked it",
        start.elapsed().as_secs_f64() * 1e3
    );
    let (ta, tb) = (tables(&topo.status()?), tables(&b.ctl_json("status")?));
    assert_eq!(ta, tb);
    println!("tables at both: {ta:#?}");
    assert!(relay_counter(&b.ctl_json("bindings")?, "relay_received_health") >= 2);
    let mut b = b;
    let log = b.proc.as_mut().context("B runs")?.output();
    assert!(
        log.contains(&format!(
            "server s1 {S1_REAL} real address down by peer 'a'"
        )),
        "{log}"
    );

    // The route back: A sees it up again, says so, and both take it back.
    topo.agent
        .ip(&["route", "del", "blackhole", &format!("{S1_REAL}/32")])?;
    let back = Instant::now();
    wait_until("both take it back", Duration::from_secs(5), || {
        let (x, y) = (topo.bindings()?, b.ctl_json("bindings")?);
        Ok(held_down_count(&x) == 0
            && held_down_count(&y) == 0
            && entries_of(&topo.status()?, S1_REAL) > 0
            && entries_of(&b.ctl_json("status")?, S1_REAL) > 0)
    })?;
    println!(
        "restored: back at both {:.0} ms after the route",
        back.elapsed().as_secs_f64() * 1e3
    );
    wait_until("tables agree again", Duration::from_secs(3), || {
        agree(&topo, &b)
    })?;

    // Cut again, then A dies while it holds the address down: B's mark lapses after three
    // digest intervals without A's list (and not at once).
    topo.agent
        .ip(&["route", "add", "blackhole", &format!("{S1_REAL}/32")])?;
    wait_until("B marks it again", Duration::from_secs(5), || {
        Ok(down_by(&b.ctl_json("bindings")?, S1_REAL) == ["peer a"])
    })?;
    let lapsed_before = relay_counter(&b.ctl_json("bindings")?, "relay_health_lapsed");
    topo.agent_proc
        .take()
        .context("A runs")?
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    let killed = Instant::now();
    wait_until("B's mark lapses", Duration::from_secs(3), || {
        Ok(held_down_count(&b.ctl_json("bindings")?) == 0)
    })?;
    let lapse = killed.elapsed();
    println!(
        "A killed: B's mark lapsed {:.0} ms later (digest interval {DIGEST_INTERVAL_MS} ms)",
        lapse.as_secs_f64() * 1e3
    );
    let interval = Duration::from_millis(DIGEST_INTERVAL_MS);
    // Three intervals after A's last list, which came about one interval or less before
    // it died (more only if A's ticks were late): not at once.
    assert!(lapse >= interval, "{lapse:?}");
    assert!(
        lapse <= interval * 3 + Duration::from_millis(500),
        "{lapse:?}"
    );
    assert_eq!(
        relay_counter(&b.ctl_json("bindings")?, "relay_health_lapsed") - lapsed_before,
        1
    );
    wait_until(
        "B serves s1's address again",
        Duration::from_secs(3),
        || Ok(entries_of(&b.ctl_json("status")?, S1_REAL) > 0),
    )?;
    Ok(())
}
