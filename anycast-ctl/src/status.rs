//! Human rendering of the agent's status (`anycast-ctl status`; `--json` prints the raw answer).
use std::fmt::Write as _;

use crate::api::Status;

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
    let _ = writeln!(out);
    let _ = write!(out, "verdicts:");
    for (name, n) in &s.dataplane.verdicts {
        let _ = write!(out, " {name}={n}");
    }
    let _ = writeln!(out);
    out
}
