//! Part 8: the controller's death, restart and upgrade under load (those of the restart
//! tests), in the demo topology with three registering servers. What a client sees in each
//! event (UDP questions lost, connections failed, errors on long-lived connections) beside
//! the same probes over an equal window with nothing happening, and the time from an
//! adopting restart's start to "agent ready" and to every binding confirmed, beside a fresh
//! start's time to "agent ready".
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::{
    restart::{
        all_confirmed, binding_seqs, logged_tags, start_servers_and_traffic, tcp_retransmits,
        variant_bin, Tally,
    },
    topology::{ServerMode, Topology},
    workspace_bin,
};

use super::report::{median, Row, Section};

/// Long enough that bindings outlive every event of a round.
const LIFETIME: u64 = 120;
/// Pause between the client's new connections.
const CONNECT_EVERY: Duration = Duration::from_millis(5);

/// What the probes saw over the windows of one kind of event, summed over the rounds.
#[derive(Default)]
struct Seen {
    probes: Tally,
    connections: usize,
    failed: Vec<String>,
    /// TCP segments the client retransmitted during the windows.
    retransmits: u64,
}

impl Seen {
    fn add(&mut self, t: Tally, made: &[Result<String, String>], retransmits: u64) {
        self.retransmits += retransmits;
        self.probes.udp_sent += t.udp_sent;
        self.probes.udp_lost += t.udp_lost;
        self.probes.asked += t.asked;
        self.probes.held_errors.extend(t.held_errors);
        self.connections += made.len();
        self.failed
            .extend(made.iter().filter_map(|r| r.as_ref().err().cloned()));
    }

    fn json(&self) -> serde_json::Value {
        json!({"udp_sent": self.probes.udp_sent, "udp_lost": self.probes.udp_lost,
            "connections": self.connections, "failed": self.failed,
            "held_asks": self.probes.asked, "held_errors": self.probes.held_errors,
            "tcp_retransmits": self.retransmits})
    }
}

/// The kinds of event, in the order of a round; `quiet` is the baseline.
const EVENTS: [&str; 5] = ["quiet", "kill", "restart", "upgrade", "back"];

struct Measured {
    window: Duration,
    rounds: usize,
    seen: Vec<Seen>,
    fresh_ready_ms: Vec<f64>,
    ready_ms: Vec<f64>,
    confirmed_ms: Vec<f64>,
    upgrade_ready_ms: Vec<f64>,
    back_ready_ms: Vec<f64>,
    tags: Vec<serde_json::Value>,
    /// Why the upgrade rows are missing, if they are.
    no_upgrade: Option<String>,
}

pub fn restart(quick: bool) -> Result<Section> {
    let mut topo = Topology::build(
        "acbk",
        1,
        3,
        ServerMode::Registering {
            lifetime_secs: LIFETIME,
        },
    )?;
    // A state directory of its own (removed with the topology's), so the fresh starts find
    // no bindings an earlier run left.
    topo.config_extra = json!({"state_directory": topo.dir.join("state")});
    let dir = topo.dir.clone();
    let r = measure(&mut topo, quick);
    drop(topo);
    let _ = std::fs::remove_dir_all(dir);
    section(r?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Stops the agent with `signal`.
fn stop(topo: &mut Topology, signal: i32) -> Result<()> {
    let status = topo
        .agent_proc
        .as_mut()
        .context("no agent runs")?
        .stop_with(signal, Duration::from_secs(10))?;
    topo.agent_proc = None;
    if signal != libc::SIGKILL && !status.success() {
        bail!("the agent exited with {status} on signal {signal}");
    }
    Ok(())
}

/// Starts the agent from `bin`: the time from the start to "agent ready".
fn start(topo: &mut Topology, bin: &std::path::Path) -> Result<Duration> {
    let t = Instant::now();
    topo.start_agent_with(0, bin)?;
    Ok(t.elapsed())
}

/// Sleeps out the rest of a window that began at `from` (a fixed observation window).
fn rest_of(from: Instant, window: Duration) {
    std::thread::sleep((from + window).saturating_duration_since(Instant::now()));
}

fn measure(topo: &mut Topology, quick: bool) -> Result<Measured> {
    let (rounds, window) = if quick {
        (1, Duration::from_secs(3))
    } else {
        (3, Duration::from_secs(10))
    };
    let normal = workspace_bin("anycast-ctl")?;
    let variant = variant_bin();
    let mut m = Measured {
        window,
        rounds,
        seen: EVENTS.iter().map(|_| Seen::default()).collect(),
        fresh_ready_ms: Vec::new(),
        ready_ms: Vec::new(),
        confirmed_ms: Vec::new(),
        upgrade_ready_ms: Vec::new(),
        back_ready_ms: Vec::new(),
        tags: Vec::new(),
        no_upgrade: variant.as_ref().err().map(|e| format!("{e:#}")),
    };
    // The baseline of the start times: fresh starts, nothing pinned (a full stop between).
    for i in 0..rounds {
        m.fresh_ready_ms.push(ms(start(topo, &normal)?));
        if i + 1 < rounds {
            stop(topo, libc::SIGTERM)?;
        }
    }
    let (load, probes) = start_servers_and_traffic(topo, CONNECT_EVERY)?;
    let client = topo.clients[0].name.clone();
    let mut retransmitted = tcp_retransmits(&client)?;
    // Windows follow one another: the counter's growth since the last window's end.
    let count = |m: &mut Measured, event: usize, from: Instant, before: &mut u64| -> Result<()> {
        let to = from + window;
        let now = tcp_retransmits(&client)?;
        let retransmits = now - *before;
        *before = now;
        let made = load.between(from, to)?;
        let t = probes.between(from, to)?;
        eprintln!(
            "   {}: {} UDP questions ({} lost), {} connections ({} failed), {} long-lived \
             asks ({} errors), {retransmits} TCP retransmissions",
            EVENTS[event],
            t.udp_sent,
            t.udp_lost,
            made.len(),
            made.iter().filter(|r| r.is_err()).count(),
            t.asked,
            t.held_errors.len()
        );
        m.seen[event].add(t, &made, retransmits);
        Ok(())
    };
    for _ in 0..rounds {
        // Nothing happens.
        let from = Instant::now();
        rest_of(from, window);
        count(&mut m, 0, from, &mut retransmitted)?;

        // SIGKILL; the controller stays dead for the whole window.
        let seqs = binding_seqs(topo)?;
        let from = Instant::now();
        stop(topo, libc::SIGKILL)?;
        rest_of(from, window);
        count(&mut m, 1, from, &mut retransmitted)?;

        // Restart: adopts the pinned maps, restores the bindings, asks every server to
        // confirm. Polled every 10 ms (each poll is one `anycast-ctl bindings`).
        let from = Instant::now();
        m.ready_ms.push(ms(start(topo, &normal)?));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if all_confirmed(&seqs, &binding_seqs(topo)?) {
                m.confirmed_ms.push(ms(from.elapsed()));
                break;
            }
            if Instant::now() > deadline {
                bail!("the bindings were not all confirmed within 10 s of the restart");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        rest_of(from, window);
        count(&mut m, 2, from, &mut retransmitted)?;

        // Upgrade to the variant build and back: a handoff (SIGUSR2), then the other build.
        let Ok(variant) = &variant else { continue };
        for (event, bin) in [(3, variant), (4, &normal)] {
            let from = Instant::now();
            stop(topo, libc::SIGUSR2)?;
            let started = Instant::now();
            start(topo, bin)?;
            let to_ready = ms(from.elapsed());
            let log = topo.agent_proc.as_mut().context("agent runs")?.output();
            let Some((Some(old), new)) = logged_tags(&log, "eth0") else {
                bail!(
                    "{}: no program swapped into eth0's link: {log}",
                    EVENTS[event]
                );
            };
            if old == new {
                bail!(
                    "{}: the program tag stayed {old}: not another build",
                    EVENTS[event]
                );
            }
            m.tags
                .push(json!({"event": EVENTS[event], "old": old, "new": new,
                "handoff_ms": ms(started - from)}));
            if event == 3 {
                m.upgrade_ready_ms.push(to_ready);
            } else {
                m.back_ready_ms.push(to_ready);
            }
            rest_of(from, window);
            count(&mut m, event, from, &mut retransmitted)?;
        }
    }
    drop(load);
    drop(probes);
    Ok(m)
}

fn section(m: Measured) -> Result<Section> {
    let w = m.window.as_secs();
    let mut s = Section::new("restart", "8. Controller death, restart and upgrade");
    s.method = format!(
        "The restart tests' setting: the demo topology, three servers registered (lifetime \
         {LIFETIME} s), a client opening a new HTTP connection every {every} ms (each step \
         gives up after 500 ms), asking a UDP question every 5 ms (lost: no answer within \
         300 ms, one try) and asking three long-lived TCP connections every 20 ms (each must \
         answer with its own server's name); the client's TCP retransmissions (RetransSegs of its \
         /proc/net/snmp) count segments lost on the way even when a connection survives them. \
         {rounds} round(s), each of five {w} s windows \
         one after another: nothing happening (the baseline); SIGKILL of the controller, \
         dead for the whole window; a restart (from its start: adopts the pinned maps, \
         restores the bindings, asks every server to confirm); an upgrade (SIGUSR2 hand-off, \
         then anycast-ctl-variant, whose agent program differs in its instructions, swaps \
         its program into the pinned links); and back to the normal build the same way. \
         Counted: what was started in each window, summed over the rounds. Start times: \
         from starting the process to its 'agent ready' line, and to every binding having \
         a new sequence number (polled every 10 ms, each poll one `anycast-ctl bindings`), \
         median of the rounds; baseline: {rounds} fresh start(s) with nothing pinned, in the \
         same run before the servers register.",
        every = CONNECT_EVERY.as_millis(),
        rounds = m.rounds,
    );
    let quiet = &m.seen[0];
    let killed = format!("controller killed (SIGKILL, dead {w} s)");
    let titles = [
        "",
        killed.as_str(),
        "restart (adopting)",
        "upgrade to another build",
        "back to the normal build",
    ];
    for (event, seen) in m.seen.iter().enumerate().skip(1) {
        if event >= 3 && m.no_upgrade.is_some() {
            continue;
        }
        let name = titles[event];
        let base = format!("nothing happening, {w} s");
        s.rows.extend([
            Row::new(
                format!("{name}: UDP questions lost"),
                seen.probes.udp_lost as f64,
                "questions",
            )
            .baseline(&base, quiet.probes.udp_lost as f64)
            .other("questions asked", seen.probes.udp_sent as f64)
            .target("0", seen.probes.udp_lost == 0),
            Row::new(
                format!("{name}: connections failed"),
                seen.failed.len() as f64,
                "connections",
            )
            .baseline(&base, quiet.failed.len() as f64)
            .other("connections made", seen.connections as f64)
            .target("0", seen.failed.is_empty()),
            Row::new(
                format!("{name}: errors on long-lived connections"),
                seen.probes.held_errors.len() as f64,
                "asks",
            )
            .baseline(&base, quiet.probes.held_errors.len() as f64)
            .other("asks", seen.probes.asked as f64)
            .target("0", seen.probes.held_errors.is_empty()),
            Row::new(
                format!("{name}: TCP segments the client retransmitted"),
                seen.retransmits as f64,
                "segments",
            )
            .baseline(&base, quiet.retransmits as f64)
            .target("0", seen.retransmits == 0),
        ]);
    }
    let fresh = median(&m.fresh_ready_ms);
    s.rows.push(
        Row::new(
            "restart: start to agent ready (adopted)",
            median(&m.ready_ms),
            "ms",
        )
        .baseline("fresh start to agent ready", fresh),
    );
    s.rows.push(
        Row::new(
            "restart: start to every binding confirmed",
            median(&m.confirmed_ms),
            "ms",
        )
        .baseline("fresh start to agent ready", fresh),
    );
    if m.no_upgrade.is_none() {
        s.rows.push(
            Row::new(
                "upgrade: hand-off (SIGUSR2) to the other build ready",
                median(&m.upgrade_ready_ms),
                "ms",
            )
            .baseline("fresh start to agent ready", fresh)
            .other("back to the normal build", median(&m.back_ready_ms)),
        );
    }
    if let Some(why) = &m.no_upgrade {
        s.notes.push(format!("upgrade rows skipped: {why}"));
    } else if let (Some(up), Some(back)) = (m.tags.first(), m.tags.get(1)) {
        s.notes.push(format!(
            "program tags (eth0): normal build {}, variant {}; back to {}",
            up["old"].as_str().unwrap_or("?"),
            up["new"].as_str().unwrap_or("?"),
            back["new"].as_str().unwrap_or("?")
        ));
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
        "window_secs": w,
        "rounds": m.rounds,
        "events": EVENTS.iter().zip(&m.seen).map(|(e, x)| json!({"event": e, "seen": x.json()}))
            .collect::<Vec<_>>(),
        "fresh_ready_ms": m.fresh_ready_ms,
        "restart_ready_ms": m.ready_ms,
        "restart_confirmed_ms": m.confirmed_ms,
        "upgrade_ready_ms": m.upgrade_ready_ms,
        "back_ready_ms": m.back_ready_ms,
        "tags": m.tags,
        "upgrade_skipped": m.no_upgrade,
    });
    Ok(s)
}
