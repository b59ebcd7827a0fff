//! `anycast-ctl top`: a live view of the agent over the control socket. Every refresh asks
//! for `status` (the same request and permission as `anycast-ctl status`) and shows the
//! rates between the last two answers: per service and server packets/s, bytes/s, new
//! flows/s and SYNs/s beside the server's state and weight, and the verdicts' rates.
//!
//! This file is the pure part (rates and lines); `term.rs` drives the terminal, or prints
//! plain blocks when stdout is not a terminal.
mod term;
#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

use crate::control_socket::Status;

pub use term::run;

/// One answer and when it came.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since an arbitrary start (monotonic).
    pub at: Duration,
    pub status: Status,
}

/// Per-second rates of a service or a server.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub packets: f64,
    pub bytes: f64,
    pub flows: f64,
    pub syns: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerRow {
    pub name: String,
    pub state: String,
    pub weight: u32,
    /// Share of the live table, in percent.
    pub share: f64,
    /// `None` on the first sample, or for a server that was not in the previous one.
    pub rates: Option<Rates>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    /// `ADDRESS PROTO/PORT` (port `*` for every port).
    pub what: String,
    pub rates: Option<Rates>,
    pub servers: Vec<ServerRow>,
}

/// What one screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub services: Vec<ServiceRow>,
    /// Verdicts with a non-zero rate, highest first (empty on the first sample).
    pub verdicts: Vec<(String, f64)>,
    pub flow_entries: u64,
    /// The seconds the rates are over (0 on the first sample).
    pub over: f64,
}

/// A counter's rate: a counter that went back (an agent that started afresh) counts from 0.
fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    now.checked_sub(before).unwrap_or(now) as f64 / secs
}

/// The view of `cur`, with rates against `prev` when given.
pub fn view(prev: Option<&Sample>, cur: &Sample) -> View {
    let secs = prev.map_or(0.0, |p| cur.at.saturating_sub(p.at).as_secs_f64());
    let dp = &cur.status.dataplane;
    let before = prev.map(|p| &p.status.dataplane);
    let services = dp
        .services
        .iter()
        .map(|svc| {
            let old = before.and_then(|b| {
                b.services
                    .iter()
                    .find(|s| s.name == svc.name && s.id == svc.id)
            });
            let rates = old.map(|o| Rates {
                packets: rate(svc.packets, o.packets, secs),
                bytes: rate(svc.bytes, o.bytes, secs),
                flows: rate(svc.flows, o.flows, secs),
                syns: rate(svc.syns, o.syns, secs),
            });
            let servers = svc
                .servers
                .iter()
                .map(|s| {
                    let old = old.and_then(|o| {
                        o.servers
                            .iter()
                            .find(|x| x.name == s.name && x.slot == s.slot)
                    });
                    ServerRow {
                        name: s.name.clone(),
                        state: s.state.clone(),
                        weight: s.weight,
                        share: if svc.ring_size == 0 {
                            0.0
                        } else {
                            100.0 * s.table_entries as f64 / svc.ring_size as f64
                        },
                        rates: old.map(|o| Rates {
                            packets: rate(s.packets, o.packets, secs),
                            bytes: rate(s.bytes, o.bytes, secs),
                            flows: rate(s.flows, o.flows, secs),
                            syns: rate(s.syns, o.syns, secs),
                        }),
                    }
                })
                .collect();
            let port = match svc.port {
                0 => "*".to_string(),
                p => p.to_string(),
            };
            ServiceRow {
                name: svc.name.clone(),
                what: format!("{} {}/{port}", svc.address, svc.protocol),
                rates,
                servers,
            }
        })
        .collect();
    let mut verdicts: Vec<(String, f64)> = match before {
        Some(b) => dp
            .verdicts
            .iter()
            .filter_map(|(name, v)| {
                let old = b
                    .verdicts
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |x| x.1);
                let r = rate(*v, old, secs);
                (r > 0.0).then(|| (name.clone(), r))
            })
            .collect(),
        None => Vec::new(),
    };
    verdicts.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    View {
        services,
        verdicts,
        flow_entries: dp.flow_table.entries,
        over: secs,
    }
}

/// A rate with an SI suffix: `0`, `12.5`, `3.4k`, `1.2M`.
pub fn si(v: f64) -> String {
    let (v, unit) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else {
        format!("{v:.1}{unit}")
    }
}

const HEAD: &str = "SERVICE / SERVER";

/// The lines of a screen (without the title line), each at most `width` characters.
pub fn lines(v: &View, width: usize) -> Vec<String> {
    let mut out = Vec::new();
    out.push(format!(
        "{HEAD:<34} {:<7} {:>7} {:>6} {:>9} {:>10} {:>9} {:>8}",
        "STATE", "WEIGHT", "SHARE", "PKTS/S", "BYTES/S", "FLOWS/S", "SYNS/S"
    ));
    let cols = |r: Option<Rates>| match r {
        Some(r) => format!(
            "{:>9} {:>10} {:>9} {:>8}",
            si(r.packets),
            format!("{}B", si(r.bytes)),
            si(r.flows),
            si(r.syns)
        ),
        None => format!("{:>9} {:>10} {:>9} {:>8}", "-", "-", "-", "-"),
    };
    for s in &v.services {
        let title = format!("{} {}", s.name, s.what);
        out.push(format!(
            "{title:<34} {:<7} {:>7} {:>6} {}",
            "",
            "",
            "",
            cols(s.rates)
        ));
        for srv in &s.servers {
            out.push(format!(
                "  {:<32} {:<7} {:>7} {:>5.1}% {}",
                srv.name,
                srv.state,
                srv.weight,
                srv.share,
                cols(srv.rates)
            ));
        }
    }
    if v.services.is_empty() {
        out.push("(no services)".into());
    }
    out.push(String::new());
    out.push(format!("flow table: {} entries", v.flow_entries));
    let mut verdicts = String::from("verdicts/s:");
    if v.over == 0.0 {
        verdicts.push_str(" (after the next refresh)");
    } else if v.verdicts.is_empty() {
        verdicts.push_str(" none");
    }
    for (name, r) in &v.verdicts {
        verdicts.push_str(&format!(" {name} {}", si(*r)));
    }
    // Wrapped, not cut: every verdict stays visible.
    let mut line = String::new();
    for word in verdicts.split(' ') {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            out.push(std::mem::take(&mut line));
            line.push_str("  ");
        } else if !line.is_empty() && !line.ends_with("  ") {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push(line);
    out.into_iter()
        .map(|l| l.chars().take(width).collect())
        .collect()
}
