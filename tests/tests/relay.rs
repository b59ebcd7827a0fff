//! Binding sync between two agents on the servers' LAN (no BIRD, no client traffic): three
//! servers register with agent A only; agent B holds every binding within 100 ms of A, both
//! agents' `bindings --json` agree and their consistent-hash tables are the same (the
//! `table_digest` of every service in `status --json`); a deregistration at A drains and
//! then removes the binding at B too; relay envelopes from a host that is no peer, forged by
//! a configured peer (wrong MAC; a valid MAC around a server message with a wrong
//! signature) and replayed are refused and counted; a binding only B holds makes the two
//! agents' digests differ, which raises the alarm, and agreement returns when it expires.
//! Runs as root.
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use anycast_common::wire::{self, Body, Key, LoadInfo, Message, Options, ServiceSelector};
use anycast_ctl::relay::{self, Envelope};
use anycast_tests::{
    agreement::{agreed, has_server, of_server, tables, PER_SERVER},
    netns::Proc,
    second_agent::{send_as_a, send_to_b, SecondAgent, A_ADDR, B_ADDR},
    topology::{self, ServerMode, Topology, ANYCAST_V4},
    wait_until,
};
use anyhow::{Context as _, Result};

/// The key A and B share (hex in `ab.key`).
const PAIR_KEY_HEX: &str = "5a5b5c5d5e5f606162636465666768696a6b6c6d6e6f70717273747576777879";

fn pair_key() -> Vec<u8> {
    anycast_tests::unhex(PAIR_KEY_HEX).expect("a hex key")
}

/// Agent B on the servers' bridge, with A as its relay peer.
fn start_b(topo: &Topology) -> Result<SecondAgent> {
    SecondAgent::start(
        topo,
        "acrlb",
        serde_json::json!({
            "id": "b",
            "digest_interval_ms": 200,
            "peers": [{"id": "a", "address": A_ADDR, "key_file": "ab.key"}],
        }),
    )
}

fn relay_counter(bindings: &serde_json::Value, name: &str) -> u64 {
    bindings["relay"]["counters"][name].as_u64().unwrap_or(0)
}

fn counter(bindings: &serde_json::Value, name: &str) -> u64 {
    bindings["counters"][name].as_u64().unwrap_or(0)
}

/// A binding update of s2 for ANYCAST_V4 tcp/8080 (a binding no running server makes),
/// addressed to agent A, signed with `key`.
fn s2_update(key: &[u8], seq: u16) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(IpAddr::V4(ANYCAST_V4)),
        dst: wire::to_mapped(A_ADDR.parse().unwrap()),
        body: Body::BindingUpdate {
            seq,
            ack: true,
            lifetime: 1,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped("10.71.2.12".parse().unwrap())),
            mn_id: Some("s2".into()),
            mesg_id: Some(wire::ntp_now()),
            load: Some(LoadInfo::default()),
            service: Some(ServiceSelector {
                protocol: 6,
                port: 8080,
            }),
            ..Options::default()
        },
    };
    wire::encode(
        &msg,
        Some(Key {
            spi: topology::spi_of("s2"),
            secret: key,
        }),
    )
}

/// An envelope "from a" to "b" relaying `message` as coming from s2's address.
fn envelope(message: Vec<u8>, key: &[u8]) -> Vec<u8> {
    relay::encode(
        &Envelope {
            sender: "a".into(),
            receiver: "b".into(),
            timestamp: wire::ntp_now(),
            body: relay::Body::Relay {
                from: "10.71.2.12:4191".parse().unwrap(),
                message,
            },
        },
        key,
    )
}

/// Sends datagrams to B's relay port from `from`, inside `ns`.
#[test]
fn two_agents_hold_the_same_bindings_and_tables_and_refuse_forged_relays() -> Result<()> {
    let mut topo = Topology::build("acrl", 0, 3, ServerMode::Registering { lifetime_secs: 60 })?;
    let key_path = topo.dir.join("ab.key");
    fs::write(&key_path, PAIR_KEY_HEX)?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    // No probing: the servers' updates (and so the sequence numbers) stay still while the
    // agents are compared. A short drain, so a deregistration's end is seen.
    topo.registration_extra = serde_json::json!({
        "probe": null,
        "drain_time": 2,
        "relay": {"id": "a", "digest_interval_ms": 200,
                  "peers": [{"id": "b", "address": B_ADDR, "key_file": "ab.key"}]},
    });
    topo.start_agent(0)?;
    let b = start_b(&topo)?;
    wait_until("A and B hear each other", Duration::from_secs(5), || {
        let (x, y) = (topo.bindings()?, b.ctl_json("bindings")?);
        Ok(!x["relay"]["peers"][0]["heard_secs_ago"].is_null()
            && !y["relay"]["peers"][0]["heard_secs_ago"].is_null())
    })?;

    // Three servers register with A only; each server's bindings are polled at A, then at
    // B, until each holds all of them.
    let mut lags = Vec::new();
    for i in 0..3 {
        let name = format!("s{}", i + 1);
        topo.start_server(i)?;
        let start = Instant::now();
        let (mut at_a, mut at_b) = (None, None);
        while at_b.is_none() && start.elapsed() < Duration::from_secs(10) {
            if at_a.is_none() && of_server(&topo.bindings()?, &name) == PER_SERVER {
                at_a = Some(Instant::now());
            }
            if of_server(&b.ctl_json("bindings")?, &name) == PER_SERVER {
                at_b = Some(Instant::now());
                // B has them only from A: a poll of A that came a moment too early (the
                // last binding arriving between the two polls) saw them as late as B.
                at_a = at_a.or(at_b);
            }
        }
        let (at_a, at_b) = (
            at_a.context(format!("{name} never registered at A"))?,
            at_b.context(format!("{name}'s binding never reached B"))?,
        );
        let lag = at_b.saturating_duration_since(at_a);
        println!(
            "{name}: at B {:.1} ms after A showed it",
            lag.as_secs_f64() * 1e3
        );
        lags.push(lag);
    }
    for (i, lag) in lags.iter().enumerate() {
        assert!(*lag <= Duration::from_millis(100), "s{}: {lag:?}", i + 1);
    }
    let (ba, bb) = (topo.bindings()?, b.ctl_json("bindings")?);
    assert_eq!(agreed(&ba).len(), 3 * PER_SERVER, "{ba:#}");
    assert_eq!(agreed(&ba), agreed(&bb));
    assert!(bb["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["relayed_by"] == "a"));
    assert!(ba["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["relayed_by"].is_null()));
    // B answered no server: every acknowledgement counted is A's.
    assert_eq!(counter(&bb, "registered"), 0);
    assert_eq!(counter(&bb, "relayed_registered"), 3 * PER_SERVER as u64);
    wait_until("digests agree", Duration::from_secs(3), || {
        Ok(topo.bindings()?["relay"]["in_sync"] == true
            && b.ctl_json("bindings")?["relay"]["in_sync"] == true)
    })?;
    let (ta, tb) = (tables(&topo.status()?), tables(&b.ctl_json("status")?));
    println!("tables at A: {ta:#?}");
    assert_eq!(ta.len(), 4, "tcp and udp, v4 and v6");
    assert!(ta.values().all(|t| t.len() > 64), "{ta:?}");
    assert_eq!(ta, tb, "the same consistent-hash tables");

    // Refused: from a host that is no peer (s2's address, the pair's key and A's name).
    let genuine = s2_update(&topo.server_key(2)?, 1);
    let before = b.ctl_json("bindings")?;
    send_to_b(
        &topo.servers[1].ns,
        "10.71.2.12",
        vec![envelope(genuine.clone(), &pair_key())],
    )?;
    // From A's address: a wrong MAC; then the right MAC around s2's update signed with
    // s1's key (a peer forging a server's message).
    send_to_b(
        &topo.agent,
        A_ADDR,
        vec![envelope(genuine.clone(), b"not the key a and b share")],
    )?;
    let forged_server = s2_update(&topo.server_key(1)?, 2);
    send_as_a(
        &b,
        &topo.agent,
        || envelope(forged_server.clone(), &pair_key()),
        |now| counter(now, "relayed_refused_146") > counter(&before, "relayed_refused_146"),
    )?;
    wait_until("B counts the three", Duration::from_secs(2), || {
        let now = b.ctl_json("bindings")?;
        Ok(relay_counter(&now, "relay_refused_unknown_peer")
            > relay_counter(&before, "relay_refused_unknown_peer")
            && relay_counter(&now, "relay_refused_auth")
                > relay_counter(&before, "relay_refused_auth")
            && counter(&now, "relayed_refused_146") > counter(&before, "relayed_refused_146"))
    })?;
    let after = b.ctl_json("bindings")?;
    for (c, relay_level) in [
        ("relay_refused_unknown_peer", true),
        ("relay_refused_auth", true),
        ("relayed_refused_146", false),
    ] {
        let n = |v: &serde_json::Value| {
            if relay_level {
                relay_counter(v, c)
            } else {
                counter(v, c)
            }
        };
        assert_eq!(n(&after) - n(&before), 1, "{c}");
    }
    assert_eq!(agreed(&after), agreed(&before), "nothing bound");

    // A valid envelope (as A would send, MAC'd with the pair's key) around s2's authentic
    // update is taken once; the same bytes again are a replay. The binding it makes exists
    // at B only: the digests differ and the alarm goes up.
    let valid = std::cell::RefCell::new(Vec::new());
    send_as_a(
        &b,
        &topo.agent,
        || {
            *valid.borrow_mut() = envelope(genuine.clone(), &pair_key());
            valid.borrow().clone()
        },
        |now| {
            now["bindings"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["selector"].to_string().contains("8080"))
        },
    )?;
    let valid = valid.into_inner();
    let before = b.ctl_json("bindings")?;
    send_to_b(&topo.agent, A_ADDR, vec![valid])?;
    wait_until("B refuses the replay", Duration::from_secs(2), || {
        Ok(
            relay_counter(&b.ctl_json("bindings")?, "relay_refused_replay")
                > relay_counter(&before, "relay_refused_replay"),
        )
    })?;
    let start = Instant::now();
    wait_until("the alarm", Duration::from_secs(3), || {
        let x = b.ctl_json("bindings")?;
        Ok(x["relay"]["in_sync"] == false && relay_counter(&x, "relay_digest_mismatch") >= 1)
    })?;
    println!(
        "digests differ: alarm after {:.2} s",
        start.elapsed().as_secs_f64()
    );
    // Its lifetime (4 s) over, the agents agree again.
    wait_until("agreement again", Duration::from_secs(8), || {
        Ok(topo.bindings()?["relay"]["in_sync"] == true
            && b.ctl_json("bindings")?["relay"]["in_sync"] == true)
    })?;

    // s1 deregisters at A (SIGTERM; it sends lifetime 0 and waits for its
    // acknowledgement): draining at B too, then gone from both.
    let s1 = topo.servers[0]
        .decap
        .as_ref()
        .and_then(Proc::pid)
        .context("s1 runs")?;
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(s1 as i32, libc::SIGTERM) };
    let draining = |v: &serde_json::Value| {
        v["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["server"] == "s1")
            .all(|x| x["state"] == "draining")
    };
    wait_until("s1 draining at B", Duration::from_secs(2), || {
        let x = b.ctl_json("bindings")?;
        Ok(has_server(&x, "s1") && draining(&x))
    })?;
    assert!(draining(&topo.bindings()?));
    wait_until("s1 gone from both", Duration::from_secs(5), || {
        Ok(!has_server(&topo.bindings()?, "s1") && !has_server(&b.ctl_json("bindings")?, "s1"))
    })?;
    wait_until(
        "tables agree after the deregistration",
        Duration::from_secs(3),
        || Ok(tables(&topo.status()?) == tables(&b.ctl_json("status")?)),
    )?;
    assert_eq!(agreed(&topo.bindings()?), agreed(&b.ctl_json("bindings")?));
    topo.servers[0]
        .decap
        .as_mut()
        .context("s1 runs")?
        .wait_exit(Duration::from_secs(30))?;

    // B restarts empty: its hello gets A's snapshot, older than the replay window allows a
    // delta to be, and it holds every binding again, with A's weights: the same tables.
    let mut b = b;
    b.restart_empty()?;
    let start = Instant::now();
    let want = agreed(&topo.bindings()?);
    assert_eq!(want.len(), 2 * PER_SERVER);
    wait_until("B has A's bindings again", Duration::from_secs(3), || {
        Ok(agreed(&b.ctl_json("bindings")?) == want)
    })?;
    println!(
        "restarted empty, B holds every binding {:.0} ms after it was ready",
        start.elapsed().as_secs_f64() * 1e3
    );
    let bb = b.ctl_json("bindings")?;
    assert_eq!(counter(&bb, "relayed_registered"), 2 * PER_SERVER as u64);
    assert!(relay_counter(&bb, "relay_received_snapshot") >= 2 * PER_SERVER as u64);
    wait_until(
        "tables agree after the snapshot",
        Duration::from_secs(3),
        || Ok(tables(&topo.status()?) == tables(&b.ctl_json("status")?)),
    )?;
    Ok(())
}
