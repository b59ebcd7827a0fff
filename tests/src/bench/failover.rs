//! Part 5: time from a server's death to the last packet the agent sends to it, per health
//! method, in the demo topology's namespaces with two registering servers.
//!
//! A client keeps sending UDP datagrams to the anycast address on flows it keeps renewing; a packet
//! socket on the agent's link into the server network (`ags` in the router namespace)
//! records every tunnelled packet to s2's real address. s2 dies: its link is cut (its
//! bridge port leaves the bridge, so nothing reaches it and nothing comes back) and its
//! processes are killed (no more binding refreshes). The figure is the kernel receive time
//! of the last tunnelled packet to s2 minus the time of death. s2 is then restored (link
//! back, server restarted, it registers again) for the next run.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    topology::{ServerMode, Topology, ANYCAST_V4},
    wait_until,
};
use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::capture::{ms_between, Sender, Watch};
use super::report::{median, Row, Section};

const INTERVAL_MS: u64 = 100;
const TIMEOUT_MS: u64 = 80;
const FALL: u64 = 2;
const LIFETIME_SECS: u64 = 4;

struct Method {
    name: &'static str,
    config_extra: Value,
    registration_extra: Value,
    lifetime: u64,
    /// The detection time the settings allow (the baseline).
    bound_ms: f64,
}

fn methods() -> Vec<Method> {
    let check_with = |kind: &str, interval: u64, timeout: u64| {
        let mut c = json!({"type": kind, "interval_ms": interval, "timeout_ms": timeout,
            "fall": FALL, "rise": 2});
        if kind == "tcp" {
            c["port"] = json!(80);
        }
        json!({"health_checks": [c]})
    };
    let check = |kind: &str| check_with(kind, INTERVAL_MS, TIMEOUT_MS);
    let no_probe = json!({"probe": null});
    let bound = (INTERVAL_MS * FALL) as f64;
    vec![
        Method {
            name: "binding refresh requests (BRR probe)",
            config_extra: json!({}),
            registration_extra: json!({"probe": {"interval_ms": INTERVAL_MS,
                "timeout_ms": TIMEOUT_MS, "misses": FALL}}),
            lifetime: 60,
            bound_ms: bound,
        },
        Method {
            name: "ICMP echo check",
            config_extra: check("icmp"),
            registration_extra: no_probe.clone(),
            lifetime: 60,
            bound_ms: bound,
        },
        Method {
            name: "TCP connect check",
            config_extra: check("tcp"),
            registration_extra: no_probe.clone(),
            lifetime: 60,
            bound_ms: bound,
        },
        Method {
            name: "ICMP echo check, every 50 ms (timeout 40 ms)",
            config_extra: check_with("icmp", 50, 40),
            registration_extra: json!({"probe": null}),
            lifetime: 60,
            bound_ms: (50 * FALL) as f64,
        },
        Method {
            name: "lifetime expiry",
            config_extra: json!({}),
            registration_extra: no_probe,
            lifetime: LIFETIME_SECS,
            bound_ms: (LIFETIME_SECS * 1000) as f64,
        },
    ]
}

fn stop_all(topo: &mut Topology) {
    for s in &mut topo.servers {
        s.app = None;
        s.decap = None;
    }
    topo.agent_proc = None;
}

/// When the agent logged `line` (its first word is an RFC 3339 UTC time).
fn log_time(line: &str) -> Option<SystemTime> {
    // Drop ANSI colour sequences.
    let mut clean = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let stamp = clean.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<u64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let (y, m, day) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
            + Duration::from_nanos(nanos),
    )
}

/// The first time after `death` the agent logged s2's real address `real` as down (a health
/// check, refresh-request probing) or its binding as expired.
fn detected(log: &str, real: &str, death: SystemTime) -> Option<SystemTime> {
    log.lines()
        .filter(|l| l.contains(real))
        .filter(|l| l.contains("-> down") || l.contains(" is Down") || l.contains("expired"))
        .filter_map(log_time)
        .find(|&t| t >= death)
}

/// One death of s2: returns the time from death to the last packet sent to it and, if the
/// agent logged it, to its detection (ms).
fn one_run(
    topo: &mut Topology,
    watch: &Watch,
    quiet: Duration,
    limit: Duration,
) -> Result<(f64, Option<f64>)> {
    let client = topo.clients[0].name.clone();
    // New flows all the time (16 at a time, replaced every 50 ms), so some always hash to
    // s2 while the agent thinks it is up, whatever happened to earlier flows.
    let sender = Sender::start(
        &client,
        SocketAddr::new(IpAddr::V4(ANYCAST_V4), 7000),
        16,
        Some(Duration::from_millis(50)),
    );
    let recent = |w: &Watch| {
        let t = SystemTime::now() - Duration::from_millis(150);
        !w.since(t).is_empty()
    };
    // s2 gets traffic, steadily, before it dies.
    for _ in 0..2 {
        let reached = wait_until("packets reaching s2", Duration::from_secs(20), || {
            Ok(recent(watch))
        });
        if let Err(e) = reached {
            let status = topo.status().unwrap_or_default();
            bail!(
                "{e:#}; health: {}; verdicts: {}",
                status["health"],
                status["verdicts"]
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let s2 = &mut topo.servers[1];
    let port = "s2p";
    let death = SystemTime::now();
    topo.net.ip(&["link", "set", port, "nomaster"])?;
    for p in [s2.decap.as_mut(), s2.app.as_mut()].into_iter().flatten() {
        p.stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    }
    let waited = Instant::now();
    let last = loop {
        std::thread::sleep(Duration::from_millis(50));
        let last = watch.since(death).into_iter().max();
        let since = last.unwrap_or(death);
        if SystemTime::now().duration_since(since).unwrap_or_default() >= quiet {
            break last;
        }
        if waited.elapsed() > limit {
            bail!("packets still went to s2 {limit:?} after its death");
        }
    };
    drop(sender);
    let real = topo.servers[1].v4.to_string();
    let log = topo
        .agent_proc
        .as_mut()
        .map(|p| p.output())
        .unwrap_or_default();
    let detect = detected(&log, &real, death).map(|t| ms_between(t, death));
    // Restore s2 for the next run.
    topo.net.ip(&["link", "set", port, "master", "brs"])?;
    topo.start_server(1)?;
    Ok((last.map_or(0.0, |l| ms_between(l, death)), detect))
}

pub fn failover(quick: bool) -> Result<Section> {
    let mut topo = Topology::build("acbf", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    let dir = topo.dir.clone();
    let r = measure(&mut topo, quick);
    stop_all(&mut topo);
    drop(topo);
    let _ = std::fs::remove_dir_all(dir);
    r
}

fn measure(topo: &mut Topology, quick: bool) -> Result<Section> {
    let runs = if quick { 1 } else { 3 };
    let s2_real = topo.servers[1].v4;
    let mut rows = Vec::new();
    let mut data = Vec::new();
    let mut medians = Vec::new();
    let methods = methods();
    let chosen: Vec<&Method> = if quick {
        methods.iter().take(1).collect()
    } else {
        methods.iter().collect()
    };
    for m in chosen {
        topo.config_extra = m.config_extra.clone();
        topo.registration_extra = m.registration_extra.clone();
        topo.mode = ServerMode::Registering {
            lifetime_secs: m.lifetime,
        };
        stop_all(topo);
        topo.start_agent(0)?;
        topo.start_server(0)?;
        topo.start_server(1)?;
        wait_until("both servers registered", Duration::from_secs(30), || {
            Ok(topo.active_servers()?.len() == 2)
        })?;
        let watch = Watch::start(&topo.net.name, "ags", s2_real, ANYCAST_V4)?;
        let limit = Duration::from_millis(m.bound_ms as u64 * 3 + 5000);
        let (mut times, mut detections) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (t, d) = one_run(topo, &watch, Duration::from_secs(1), limit)?;
            times.push(t);
            detections.extend(d);
        }
        drop(watch);
        let med = median(&times);
        medians.push(med);
        let mut row = Row::new(format!("failover, {}", m.name), med, "ms")
            .baseline("detection time the settings allow", m.bound_ms);
        if !detections.is_empty() {
            row = row.other("declared down (agent log)", median(&detections));
        }
        rows.push(row);
        data.push(
            json!({"method": m.name, "runs_ms": times, "detected_ms": detections,
            "config": m.config_extra, "registration": m.registration_extra,
            "lifetime_secs": m.lifetime}),
        );
    }
    stop_all(topo);
    // The target applies to the fastest method.
    if let Some((i, best)) = medians
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
    {
        let row = rows[i].clone();
        rows[i] = row.target("< 250 ms with the fastest method", best < 250.0);
    }
    let mut s = Section::new("failover", "5. Failover");
    s.method = format!(
        "Two servers register with the agent (demo topology, registering mode); a client \
         sends UDP datagrams to the anycast address every ~0.1 ms; a \
         packet socket on the agent's link into the server network records every tunnelled \
         packet to s2. s2 dies: its bridge port leaves the bridge (nothing reaches it, \
         nothing comes back) and its processes are SIGKILLed. The client keeps 16 flows and replaces them with new ones every 50 ms. Figure: kernel receive time of \
         the last packet the agent sent to s2 minus the time of death, median of {runs} \
         run(s) per method (s2 restored and re-registered between runs). Settings: checks \
         and probes every {INTERVAL_MS} ms, timeout {TIMEOUT_MS} ms, down after {FALL} \
         failures (one ICMP row every 50 ms, timeout 40 ms); lifetime method: the server asks for {LIFETIME_SECS} s (one 4 s unit), \
         no probes or checks. Baseline: the detection time those settings allow (interval \
         x failures, or the lifetime). 'Declared down' is when the agent logged the \
         transition (its log clock, same host), so the rest of the figure is the time the \
         agent took to stop sending after deciding."
    );
    s.rows = rows;
    s.data = json!({"methods": data});
    Ok(s)
}
