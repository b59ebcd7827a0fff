//! Human rendering of the agent's status (`anycast-ctl status`; `--json` prints the raw answer).
use std::fmt::Write as _;

use crate::control_socket::Status;

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let addr = |a: Option<std::net::IpAddr>| a.map_or("-".to_string(), |a| a.to_string());
    let _ = writeln!(
        out,
        "agent  v4 {}  v6 {}  config {}",
        addr(s.agent_v4),
        addr(s.agent_v6),
        s.config.display()
    );
    for i in &s.interfaces {
        let _ = writeln!(
            out,
            "  interface {} (ifindex {}), XDP {}",
            i.name, i.ifindex, i.xdp_mode
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:<28} {:<5} {:>5} {:>8} {:>12} {:>14}",
        "SERVICE", "ANYCAST ADDRESS", "PROTO", "PORT", "SERVERS", "PACKETS", "BYTES"
    );
    for svc in &s.dataplane.services {
        let up = svc.servers.iter().filter(|x| x.state == "up").count();
        let port = if svc.port == 0 {
            "*".to_string()
        } else {
            svc.port.to_string()
        };
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<5} {:>5} {:>8} {:>12} {:>14}",
            svc.name,
            svc.address,
            svc.protocol,
            port,
            format!("{up}/{}", svc.servers.len()),
            svc.packets,
            svc.bytes
        );
        for srv in &svc.servers {
            let share = 100.0 * srv.table_entries as f64 / svc.ring_size.max(1) as f64;
            let _ = writeln!(
                out,
                "  {:<14} {:<28} weight {:<6} {:<5} {:>6.2}% {:>12} {:>14}",
                srv.name, srv.address, srv.weight, srv.state, share, srv.packets, srv.bytes
            );
        }
    }
    if !s.health.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<14} {:<30} {:<8} {:<8} DETAIL",
            "SERVER", "REAL ADDRESS:PORT", "CHECK", "HEALTH"
        );
        for h in &s.health {
            let _ = writeln!(
                out,
                "{:<14} {:<30} {:<8} {:<8} {}",
                h.server,
                std::net::SocketAddr::new(h.real, h.port).to_string(),
                h.check,
                h.health.to_string(),
                h.detail
            );
        }
    }
    if !s.drained.is_empty() {
        let _ = writeln!(out, "drained by the operator: {}", s.drained.join(", "));
    }
    if let Some(r) = &s.routing {
        render_routing(&mut out, r);
    }
    let _ = writeln!(out);
    let f = &s.dataplane.flow_table;
    if f.sweeps > 0 {
        let _ = writeln!(
            out,
            "flow table: {} entries, {} expired entries deleted, last sweep {:.1} ms",
            f.entries, f.swept, f.last_sweep_ms
        );
    }
    if let Some(relay) = &s.relay {
        // Flows that move between agents: what this agent pins at its peers and takes.
        let _ = write!(out, "flow pins:");
        for (name, n) in relay
            .counters
            .iter()
            .filter(|(k, _)| k.contains("pin") || *k == "flow_exceptions")
        {
            let _ = write!(out, " {name}={n}");
        }
        let _ = writeln!(out);
    }
    if !s.dataplane.table_write_path.is_empty() {
        let _ = writeln!(
            out,
            "consistent-hash tables written by {}",
            s.dataplane.table_write_path
        );
    }
    let _ = write!(out, "verdicts:");
    for (name, n) in &s.dataplane.verdicts {
        let _ = write!(out, " {name}={n}");
    }
    let _ = writeln!(out);
    out
}

fn render_routing(out: &mut String, r: &crate::routing::RoutingStatus) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "routing: BIRD {} at {}; include {}; last configure: {}",
        r.bird,
        r.bird_socket.display(),
        r.bird_include.display(),
        if r.last_configure.is_empty() {
            "-"
        } else {
            &r.last_configure
        }
    );
    let _ = writeln!(out, "{:<44} {:<22} WHY", "PREFIX", "STATE");
    for p in &r.prefixes {
        let _ = writeln!(out, "{:<44} {:<22} {}", p.prefix, p.state, p.why);
    }
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<28} {:<8} INFO",
        "PROTOCOL", "TYPE", "NEIGHBOR", "STATE"
    );
    for p in &r.protocols {
        let n = p.neighbor.map_or("-".to_string(), |a| a.to_string());
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<28} {:<8} {}",
            p.name, p.proto, n, p.state, p.info
        );
    }
    if !r.bfd_sessions.is_empty() {
        let _ = writeln!(
            out,
            "{:<28} {:<12} {:<8} {:>9} {:>9}",
            "BFD PEER", "INTERFACE", "STATE", "INTERVAL", "TIMEOUT"
        );
        for b in &r.bfd_sessions {
            let _ = writeln!(
                out,
                "{:<28} {:<12} {:<8} {:>9} {:>9}",
                b.address, b.interface, b.state, b.interval, b.timeout
            );
        }
    }
}

/// Human rendering of `anycast-ctl bindings`.
pub fn render_bindings(r: &crate::registration::agent::BindingsReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<10} {:<12} {:<28} {:<9} {:<8} {:<24} {:>7} {:>6} {:>8} {:>9} {:>12}",
        "ANYCAST ADDRESS",
        "SERVICE",
        "SERVER",
        "REAL ADDRESS",
        "STATE",
        "PROBE",
        "REVERSE SYN-ACKS/SYNS",
        "WEIGHT",
        "SEQ",
        "AGE",
        "LEFT",
        "LOAD"
    );
    for b in &r.bindings {
        let service = match b.id.selector {
            Some((6, port)) => format!("tcp/{port}"),
            Some((17, port)) => format!("udp/{port}"),
            Some((p, port)) => format!("{p}/{port}"),
            None => "all".to_string(),
        };
        let load = b.load.as_ref().map_or("-".to_string(), |l| {
            if l.max_capacity > 0 {
                format!("{}/{}", l.used_capacity, l.max_capacity)
            } else {
                format!("{} sess", l.sessions_in_use)
            }
        });
        let state = format!("{:?}", b.state).to_lowercase();
        let reverse = b.reverse.as_ref().map_or("-".to_string(), |r| {
            format!(
                "{} {}/{}",
                format!("{:?}", r.state).to_lowercase(),
                r.syn_acks,
                r.syns
            )
        });
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<12} {:<28} {:<9} {:<8} {:<24} {:>7} {:>6} {:>7.0}s {:>8.1}s {:>12}",
            b.id.anycast.to_string(),
            service,
            b.id.server,
            b.id.real.to_string(),
            state,
            format!("{:?}", b.condition).to_lowercase(),
            reverse,
            b.weight,
            b.seq,
            b.age_secs,
            b.lifetime_left_secs,
            load
        );
    }
    let _ = writeln!(out);
    let _ = write!(out, "counters:");
    for (name, n) in &r.counters {
        let _ = write!(out, " {name}={n}");
    }
    let _ = writeln!(out);
    if let Some(relay) = &r.relay {
        render_relay(&mut out, relay);
    }
    out
}

fn render_relay(out: &mut String, relay: &crate::relay::RelayReport) {
    let _ = writeln!(
        out,
        "relay '{}' port {}: {} bindings, digest {}, {}",
        relay.id,
        relay.port,
        relay.bindings,
        relay.digest.get(..16).unwrap_or(""),
        if relay.in_sync {
            "in sync"
        } else {
            "NOT IN SYNC"
        }
    );
    for p in &relay.peers {
        let heard = p
            .heard_secs_ago
            .map_or("never heard".to_string(), |s| format!("heard {s:.1} s ago"));
        let sync = match p.in_sync {
            Some(true) => "agrees",
            Some(false) => "DIFFERS",
            None => "not compared",
        };
        let _ = writeln!(
            out,
            "  peer '{}' {}: {heard}, {} bindings, {sync}",
            p.id,
            p.address,
            p.bindings.map_or("?".to_string(), |n| n.to_string())
        );
    }
    for h in &relay.held_down {
        let _ = writeln!(
            out,
            "  held down: {} {} for {} {}/{} by {}",
            h.server.as_deref().unwrap_or("?"),
            h.entry.real,
            h.entry.anycast,
            match h.entry.protocol {
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                p => p.to_string(),
            },
            h.entry.port,
            h.down_by.join(", ")
        );
    }
    let _ = write!(out, "relay counters:");
    for (name, n) in &relay.counters {
        let _ = write!(out, " {name}={n}");
    }
    let _ = writeln!(out);
}

/// Human rendering of `anycast-ctl flows`.
pub fn render_flows(flows: &[crate::dataplane::FlowReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<46} {:<46} {:<28} {:>6} STATE",
        "PROTO", "CLIENT", "ANYCAST", "SERVER", "IDLE"
    );
    let mut sorted: Vec<_> = flows.iter().collect();
    sorted.sort_by_key(|f| (f.address, f.port, f.client, f.client_port));
    for f in sorted {
        let state = if f.expired {
            "expired"
        } else if f.closing {
            "closing"
        } else {
            "active"
        };
        let state = if f.learned {
            format!("{state}, pinned by a peer")
        } else {
            state.to_string()
        };
        let _ = writeln!(
            out,
            "{:<5} {:<46} {:<46} {:<28} {:>5}s {state}",
            f.protocol,
            std::net::SocketAddr::new(f.client, f.client_port).to_string(),
            std::net::SocketAddr::new(f.address, f.port).to_string(),
            f.server.map_or("(gone)".to_string(), |s| s.to_string()),
            f.age
        );
    }
    let _ = writeln!(out, "{} flows", flows.len());
    out
}
