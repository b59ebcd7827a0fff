//! Part 9: several agents behind a BIRD router (the multi-agent tests' topology,
//! `crate::routed`, two agents, three servers registering with agent 1, two clients): how
//! fast a dead or silent agent's routes go, how fast agent 1 relays a binding, and what a
//! client sees meanwhile, each beside a baseline of the same run.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::{
    agreement::of_server,
    load::Load,
    restart::{tcp_counter, Probes, Tally},
    routed::{Options, Registering, RouteMonitor, Routed, A4, UDP_PORT},
    topology::{Held, HTTP_PORT},
    wait_until,
};

use super::report::{median, Row, Section};

const DIGEST_MS: u64 = 200;
/// BFD on every session: 100 ms x 3.
const BFD_BOUND_MS: f64 = 300.0;

/// The kinds of window, in the order of a round; `quiet` is the baseline.
const EVENTS: [&str; 5] = ["quiet", "stop", "kill", "silent", "back"];

/// What a client saw over the windows of one kind.
#[derive(Default)]
struct Seen {
    probes: Tally,
    connections: usize,
    failed: Vec<String>,
    resets: u64,
}

#[derive(Default)]
struct Measured {
    rounds: usize,
    window: Duration,
    seen: Vec<Seen>,
    stop_ms: Vec<f64>,
    kill_ms: Vec<f64>,
    silent_ms: Vec<f64>,
    restart_ms: Vec<f64>,
    return_ms: Vec<f64>,
    bound_ms: Vec<f64>,
    deregistered_ms: Vec<f64>,
    local_ms: Vec<f64>,
}

pub fn agents(quick: bool) -> Result<Section> {
    let mut t = Routed::build_with(
        "acmab",
        Options {
            agents: 2,
            servers: 3,
            clients: 2,
            registering: Some(Registering {
                digest_interval_ms: DIGEST_MS,
                // A deregistered server's bindings go soon: it registers again each round.
                drain_time_secs: 2,
                server_drain_secs: 2,
                ..Registering::default()
            }),
        },
    )?;
    let r = measure(&mut t, quick);
    drop(t);
    section(r?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls agent 1 then agent 2 until both show `done`; the time agent 2 did after agent 1.
fn relay_lag(t: &Routed, done: impl Fn(&serde_json::Value) -> bool) -> Result<(f64, Instant)> {
    let start = Instant::now();
    let (mut one, mut two) = (None, None);
    while two.is_none() && start.elapsed() < Duration::from_secs(10) {
        if one.is_none() && done(&t.bindings(0)?) {
            one = Some(Instant::now());
        }
        if done(&t.bindings(1)?) {
            two = Some(Instant::now());
        }
    }
    let one = one.context("never at agent 1")?;
    let two = two.context("never relayed to agent 2")?;
    Ok((ms(two.saturating_duration_since(one)), one))
}

/// Starts server `i` and times its bindings: from its start to agent 1, from agent 1 to 2.
fn register(t: &mut Routed, i: usize, m: &mut Measured) -> Result<()> {
    let name = format!("s{}", i + 1);
    let want = if i == 2 { 6 } else { 4 };
    let started = Instant::now();
    t.start_server(i)?;
    let (lag, at_one) = relay_lag(t, |b| {
        b["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["server"] == name.as_str() && x["state"] == "active")
            .count()
            == want
    })?;
    m.local_ms.push(ms(at_one - started));
    m.bound_ms.push(lag);
    Ok(())
}

/// Sleeps out the rest of a window that began at `from`.
fn rest_of(from: Instant, window: Duration) {
    std::thread::sleep((from + window).saturating_duration_since(Instant::now()));
}

fn measure(t: &mut Routed, quick: bool) -> Result<Measured> {
    let (rounds, window) = if quick {
        (1, Duration::from_secs(2))
    } else {
        (3, Duration::from_secs(3))
    };
    let mut m = Measured {
        rounds,
        window,
        seen: EVENTS.iter().map(|_| Seen::default()).collect(),
        ..Measured::default()
    };
    let a4 = A4.into();
    for k in 0..2 {
        t.write_config(k, json!({"withdraw_grace_ms": 300}))?;
        t.start_agent(k)?;
    }
    let monitor = t.monitor()?;
    // Sessions up and peers heard before anything is timed.
    wait_until("sessions and peers up", Duration::from_secs(30), || {
        for k in 0..2 {
            let s = t.status(k)?;
            let bgp = s["routing"]["protocols"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["proto"] == "BGP" && p["info"] == "Established")
                .count();
            if bgp != 2 || s["relay"]["peers"][0]["heard_secs_ago"].is_null() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    for i in 0..3 {
        register(t, i, &mut m)?;
    }
    t.wait_next_hops(a4, &["ra1", "ra2"], Duration::from_secs(30))?;

    let dst = std::net::SocketAddr::new(a4, HTTP_PORT);
    // Long-lived connections to s1 and s2 only: s3 leaves and comes back each round.
    let mut held = Vec::new();
    for i in 0..100 {
        if held.len() == 6 {
            break;
        }
        let h = t.clients[i % 2].in_ns(move || Held::open(dst))?;
        if h.server != "s3" {
            held.push(h);
        }
    }
    let probes = Probes::start_with(
        &t.clients[0].name,
        Some(std::net::SocketAddr::new(a4, UDP_PORT)),
        held,
    );
    let loads: Vec<Load> = t
        .clients
        .iter()
        .map(|c| Load::start_to(&c.name, dst, Duration::from_millis(10)))
        .collect();
    let resets = |t: &Routed| -> Result<u64> {
        t.clients
            .iter()
            .map(|c| tcp_counter(&c.name, "EstabResets"))
            .sum()
    };
    wait_until("connections flowing", Duration::from_secs(10), || {
        Ok(loads.iter().all(|l| l.log.lock().unwrap().len() >= 20))
    })?;
    let count = |t: &Routed, m: &mut Measured, event: usize, from: Instant, before: u64| {
        let to = from + window;
        rest_of(from, window);
        let mut made = Vec::new();
        for l in &loads {
            made.extend(l.between(from, to)?);
        }
        let tally = probes.between(from, to)?;
        let s = &mut m.seen[event];
        s.resets += resets(t)? - before;
        s.connections += made.len();
        s.failed
            .extend(made.iter().filter_map(|r| r.as_ref().err().cloned()));
        s.probes.udp_sent += tally.udp_sent;
        s.probes.udp_lost += tally.udp_lost;
        s.probes.asked += tally.asked;
        s.probes.held_errors.extend(tally.held_errors);
        anyhow::Ok(())
    };
    let withdrawn = |monitor: &RouteMonitor, from: Instant| -> Result<f64> {
        Ok(ms(
            monitor.first_event(a4, from, Duration::from_secs(5))? - from
        ))
    };
    let both = ["ra1", "ra2"];
    for round in 0..rounds {
        eprintln!("   round {}", round + 1);
        let before = resets(t)?;
        count(t, &mut m, 0, Instant::now(), before)?;

        // A planned stop (SIGTERM: the agent withdraws, then detaches), and a fresh start.
        let before = resets(t)?;
        let from = Instant::now();
        let pid = t.agents[1]
            .agent
            .as_ref()
            .and_then(|p| p.pid())
            .context("a2")?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        m.stop_ms.push(withdrawn(&monitor, from)?);
        t.stop_agent(1, 0)?;
        count(t, &mut m, 1, from, before)?;
        let before = resets(t)?;
        let from = Instant::now();
        t.start_agent(1)?;
        t.wait_next_hops(a4, &both, Duration::from_secs(10))?;
        count(t, &mut m, 4, from, before)?;

        // The controller SIGKILLed (the data path stays, the liveness device goes), and an
        // adopting restart.
        let before = resets(t)?;
        let from = Instant::now();
        t.stop_agent(1, libc::SIGKILL)?;
        m.kill_ms.push(withdrawn(&monitor, from)?);
        count(t, &mut m, 2, from, before)?;
        let before = resets(t)?;
        let from = Instant::now();
        t.start_agent(1)?;
        t.wait_next_hops(a4, &both, Duration::from_secs(10))?;
        m.restart_ms.push(ms(from.elapsed()));
        count(t, &mut m, 4, from, before)?;

        // Silent (every frame it sends on its uplink dropped): BFD; then back.
        let before = resets(t)?;
        let from = Instant::now();
        t.silence(1, true)?;
        m.silent_ms.push(withdrawn(&monitor, from)?);
        count(t, &mut m, 3, from, before)?;
        let back = Instant::now();
        t.silence(1, false)?;
        t.wait_next_hops(a4, &both, Duration::from_secs(30))?;
        m.return_ms.push(ms(back.elapsed()));
        let before = resets(t)?;
        count(t, &mut m, 4, Instant::now(), before)?;

        // s3 deregisters (SIGTERM; its drain is short) and registers again: both relayed.
        let s3 = t.servers[2]
            .0
            .as_ref()
            .and_then(|p| p.pid())
            .context("s3")?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(s3 as i32, libc::SIGTERM) };
        let (lag, _) = relay_lag(t, |b| {
            let s: Vec<_> = b["bindings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["server"] == "s3")
                .collect();
            s.is_empty() || s.iter().all(|x| x["state"] == "draining")
        })?;
        m.deregistered_ms.push(lag);
        t.servers[2]
            .0
            .as_mut()
            .context("s3")?
            .wait_exit(Duration::from_secs(20))?;
        t.servers[2].1 = None;
        wait_until("s3's bindings gone", Duration::from_secs(10), || {
            Ok(of_server(&t.bindings(0)?, "s3") == 0 && of_server(&t.bindings(1)?, "s3") == 0)
        })?;
        register(t, 2, &mut m)?;
    }
    drop(loads);
    drop(probes);
    Ok(m)
}

fn section(m: Measured) -> Result<Section> {
    let w = m.window.as_secs();
    let mut s = Section::new("agents", "9. Several agents: failover and binding relay");
    s.method = format!(
        "The multi-agent tests' topology: a router namespace running BIRD (ECMP, hash policy \
         3 on the 5-tuple, BFD 100 ms x 3 to each agent), two agent namespaces each with BIRD \
         and anycast-ctl agent, three servers registering with agent 1 only (agent 1 relays \
         every binding to agent 2, digests every {DIGEST_MS} ms), two clients. Route changes \
         are timed on the router (`ip monitor route`, the first event for the anycast address \
         after the cause). Each of {rounds} round(s): agent 2 stopped (SIGTERM: it withdraws \
         its routes first) and started again; its controller SIGKILLed (the liveness device \
         goes with it) and restarted (adopting its pinned data path); silent (`tc qdisc \
         replace dev eth0 root blackhole` on its uplink: no BGP, no BFD) and back; s3 \
         deregistered (SIGTERM) and registered again. Relay lag: agent 1 then agent 2 polled \
         over their control sockets (about a millisecond a poll) until each shows the \
         server's bindings (active, or draining/gone); the time agent 2 did after agent 1. \
         Meanwhile each client opens a new connection every 10 ms (each step gives up after \
         500 ms), client 1 asks a UDP question every 5 ms (lost: no answer within 300 ms) \
         and six long-lived connections are asked every 20 ms (each must answer with its own \
         server); TCP resets are the clients' EstabResets. Counted over {w} s windows from \
         each cause (the 'back' windows from each return of agent 2 to the router), beside \
         {w} s with nothing happening.",
        rounds = m.rounds
    );
    let quiet = &m.seen[0];
    let max = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
    s.rows.push(
        Row::new(
            "controller SIGKILLed: route withdrawn",
            median(&m.kill_ms),
            "ms",
        )
        .baseline("SIGTERM (planned): route withdrawn", median(&m.stop_ms))
        .other("slowest kill", max(&m.kill_ms))
        .target("< 1 s", max(&m.kill_ms) < 1000.0),
    );
    s.rows.push(
        Row::new(
            "agent silent: route withdrawn (BFD)",
            median(&m.silent_ms),
            "ms",
        )
        .baseline("BFD bound (100 ms x 3)", BFD_BOUND_MS)
        .other("slowest", max(&m.silent_ms))
        .target("< 500 ms", max(&m.silent_ms) < 500.0),
    );
    s.rows.push(
        Row::new(
            "binding relayed: at agent 2 after agent 1",
            median(&m.bound_ms),
            "ms",
        )
        .baseline("digest interval (the repair path)", DIGEST_MS as f64)
        .other("slowest", max(&m.bound_ms))
        .other("server start to agent 1", median(&m.local_ms))
        .target("<= 100 ms", max(&m.bound_ms) <= 100.0),
    );
    s.rows.push(
        Row::new(
            "deregistration relayed: draining at agent 2 after agent 1",
            median(&m.deregistered_ms),
            "ms",
        )
        .baseline("digest interval (the repair path)", DIGEST_MS as f64)
        .other("slowest", max(&m.deregistered_ms))
        .target("<= 100 ms", max(&m.deregistered_ms) <= 100.0),
    );
    s.rows.push(
        Row::new(
            "restarted agent: route back after its start",
            median(&m.restart_ms),
            "ms",
        )
        .note("adopting its pinned data path; BIRD kept the sessions"),
    );
    s.rows.push(
        Row::new(
            "silent agent speaks again: route back",
            median(&m.return_ms),
            "ms",
        )
        .note("BGP session again after the router's error wait (5 s) and BFD"),
    );
    let titles = [
        "",
        "SIGTERM",
        "controller SIGKILLed",
        "agent silent",
        "agent back",
    ];
    for (event, seen) in m.seen.iter().enumerate().skip(1) {
        let base = format!("nothing happening, {w} s");
        let name = titles[event];
        let lost = seen.failed.len() + seen.probes.held_errors.len() + seen.probes.udp_lost;
        s.rows.extend([
            Row::new(
                format!("{name}: connections failed"),
                seen.failed.len() as f64,
                "connections",
            )
            .baseline(&base, quiet.failed.len() as f64)
            .other("connections made", seen.connections as f64)
            .target("0", seen.failed.is_empty()),
            Row::new(
                format!("{name}: long-lived errors, UDP lost, resets"),
                (seen.probes.held_errors.len() + seen.probes.udp_lost) as f64 + seen.resets as f64,
                "events",
            )
            .baseline(
                &base,
                (quiet.probes.held_errors.len() + quiet.probes.udp_lost) as f64
                    + quiet.resets as f64,
            )
            .other("long-lived asks", seen.probes.asked as f64)
            .other("UDP questions", seen.probes.udp_sent as f64)
            .target("0", lost == 0 && seen.resets == 0),
        ]);
    }
    let failed: Vec<&String> = m.seen.iter().flat_map(|x| &x.failed).collect();
    let errors: Vec<&String> = m.seen.iter().flat_map(|x| &x.probes.held_errors).collect();
    if !failed.is_empty() || !errors.is_empty() {
        s.notes.push(format!(
            "failures: connections {:?}; long-lived connections {:?}",
            failed.iter().take(5).collect::<Vec<_>>(),
            errors.iter().take(5).collect::<Vec<_>>()
        ));
    }
    s.data = json!({
        "rounds": m.rounds, "window_secs": w,
        "stop_ms": m.stop_ms, "kill_ms": m.kill_ms, "silent_ms": m.silent_ms,
        "restart_ms": m.restart_ms, "return_ms": m.return_ms,
        "relay_bound_ms": m.bound_ms, "relay_deregistered_ms": m.deregistered_ms,
        "server_start_to_agent_1_ms": m.local_ms,
        "events": EVENTS.iter().zip(&m.seen).map(|(e, x)| json!({"event": e,
            "connections": x.connections, "failed": x.failed, "held_asks": x.probes.asked,
            "held_errors": x.probes.held_errors, "udp_sent": x.probes.udp_sent,
            "udp_lost": x.probes.udp_lost, "tcp_resets": x.resets})).collect::<Vec<_>>(),
    });
    Ok(s)
}
