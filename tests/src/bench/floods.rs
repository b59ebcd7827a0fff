//! Part 7: floods at the registration port (those of the `hostile_floods` test, shorter),
//! each beside a period without a flood measured just before it: the rate reached, the
//! agent's CPU and memory, s3's refresh round trips, unanswered refreshes and failed client
//! connections.
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::floods::{Figures, Flood, FloodedAgent, AT_LEAST, PACE, REFRESH_EVERY};

use super::report::{Row, Section};

/// The agent's memory must stay under this during a flood (as in the test).
const RSS_BOUND_KIB: u64 = 200 * 1024;

pub fn floods(quick: bool) -> Result<Section> {
    let how_long = Duration::from_secs(if quick { 2 } else { 5 });
    let agent = FloodedAgent::start("acbfl")?;
    let dir = agent.topo.dir.clone();
    let r = measure(&agent, how_long);
    drop(agent);
    let _ = std::fs::remove_dir_all(dir);
    r
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn measure(agent: &FloodedAgent, how_long: Duration) -> Result<Section> {
    // Each flood beside a quiet period right before it, so that both see the same load from
    // the rest of the machine.
    let mut pairs = Vec::new();
    for kind in agent.kinds() {
        let quiet = agent.measure(Flood::none(), PACE, how_long)?;
        eprintln!("   {quiet}");
        let f = agent.measure(kind, PACE, how_long)?;
        eprintln!("   {f}");
        pairs.push((quiet, f));
    }
    let mut s = Section::new("floods", "7. Registration floods");
    s.method = format!(
        "The hostile_floods test's floods, {secs} s each instead of 20: from a namespace of \
         its own on the clients' link, a packet socket writes UDP datagrams with correct \
         checksums to the agent's registration port (4191) at a pace of {PACE}/s: 64 bytes of \
         garbage and well-formed binding updates signed with the wrong key, from one source, \
         from 1 000 spoofed sources (nobody answers ARP for them) and spoofing the servers' \
         own addresses. Throughout, s1 and s2 (the server daemon) stay registered with \
         refresh requests every 500 ms, a client opens an HTTP connection through the agent \
         every 20 ms, and the bench itself, as s3, sends an authenticated refresh every \
         {refresh} ms and times its acknowledgement (1 s timeout). Baseline: {secs} s \
         without a flood, measured just before each flood. Rate: datagrams sent / \
         the flood's duration. CPU: the agent's user + system time (/proc/PID/stat) over the \
         period, in % of one core. RSS growth: the most VmRSS read (every 500 ms) during the \
         flood minus VmRSS before it, beside VmRSS before it. Refresh round trip: from \
         sending s3's refresh to its acknowledgement, median and max of about {n} \
         refreshes per period. Unanswered refreshes and failed connections: those started \
         during the period.",
        secs = how_long.as_secs(),
        refresh = REFRESH_EVERY.as_millis(),
        n = how_long.as_millis() / REFRESH_EVERY.as_millis(),
    );
    for (q, f) in &pairs {
        let w = &f.what;
        let growth = f.rss_max_kib.saturating_sub(f.rss_before_kib);
        s.rows.extend([
            Row::new(format!("{w}: datagrams/s reached"), f.rate(), "datagrams/s")
                .baseline("pace asked for", PACE as f64)
                .target(format!(">= {AT_LEAST:.0}/s"), f.rate() >= AT_LEAST),
            Row::new(format!("{w}: agent CPU"), f.cpu_percent, "% of a core")
                .baseline("no flood", q.cpu_percent),
            Row::new(format!("{w}: agent RSS growth"), growth as f64, "KiB")
                .baseline("RSS before the flood", f.rss_before_kib as f64)
                .target(
                    format!("RSS < {} MiB", RSS_BOUND_KIB / 1024),
                    f.rss_max_kib < RSS_BOUND_KIB,
                ),
            Row::new(
                format!("{w}: s3's refresh round trip, median"),
                ms(f.round_trip(0.5)),
                "ms",
            )
            .baseline("no flood", ms(q.round_trip(0.5))),
            Row::new(
                format!("{w}: s3's refresh round trip, max"),
                ms(f.round_trip(1.0)),
                "ms",
            )
            .baseline("no flood", ms(q.round_trip(1.0))),
            Row::new(
                format!("{w}: s3's refreshes unanswered"),
                f.unanswered.len() as f64,
                "refreshes",
            )
            .baseline(
                "refreshes sent",
                (f.unanswered.len() + f.round_trips.len()) as f64,
            )
            .target("none", f.unanswered.is_empty()),
            Row::new(
                format!("{w}: client connections failed"),
                f.failed_connections.len() as f64,
                "connections",
            )
            .baseline("connections made", f.connections as f64)
            .target("none", f.failed_connections.is_empty()),
        ]);
        s.notes.push(format!(
            "{w}: the agent counted {} of {} datagrams as dropped or refused; {} refresh \
             requests to the servers, {} unanswered; {} binding-table readings, {} differing \
             from the table before the floods",
            f.counted,
            f.sent,
            f.probes,
            f.probes_missed,
            f.samples,
            f.changed_states.len()
        ));
        s.notes.push(format!(
            "without a flood, before {w}: {} of {} refreshes unanswered, {} of {} \
             connections failed, {} of {} refresh requests unanswered",
            q.unanswered.len(),
            q.unanswered.len() + q.round_trips.len(),
            q.failed_connections.len(),
            q.connections,
            q.probes_missed,
            q.probes
        ));
    }
    s.data = json!({
        "seconds_each": how_long.as_secs_f64(),
        "pace": PACE,
        "floods": pairs
            .iter()
            .map(|(q, f)| json!({"no_flood": figures(q), "flood": figures(f)}))
            .collect::<Vec<_>>(),
    });
    Ok(s)
}

fn figures(f: &Figures) -> Value {
    json!({
        "what": f.what,
        "sent": f.sent,
        "secs": f.secs,
        "rate": f.rate(),
        "cpu_percent": f.cpu_percent,
        "rss_before_kib": f.rss_before_kib,
        "rss_max_kib": f.rss_max_kib,
        "rss_after_kib": f.rss_after_kib,
        "probes": f.probes,
        "probes_missed": f.probes_missed,
        "refreshed": f.refreshed,
        "counted": f.counted,
        "samples": f.samples,
        "changed_states": f.changed_states,
        "round_trips_ms": f.round_trips.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        "unanswered": f.unanswered,
        "connections": f.connections,
        "failed_connections": f.failed_connections,
    })
}
