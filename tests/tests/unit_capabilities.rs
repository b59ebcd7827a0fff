//! The systemd units' capability sets are enough: the agent and the servers run end to end
//! with exactly the capabilities their unit grants (`CapabilityBoundingSet=` of
//! anycast-ctl/debian/*.service, read from the files), as root without the others, which is
//! what systemd makes of a root service with that setting. `setpriv --bounding-set` does
//! the same here, where systemd is not init. The agent attaches, answers the control socket
//! (its group changed: CAP_CHOWN), runs ICMP health checks (CAP_NET_RAW), forwards to
//! servers that registered and reverse-tunnel (their TC programs), re-reads its
//! configuration, hands off and is adopted by the next agent (reading the pinned link's
//! program tag needs CAP_SYS_ADMIN), and stops fully. Each tells the service manager
//! (`Type=notify`) when it is ready and when it stops, through `$NOTIFY_SOCKET` (here a
//! socket of the test's). Namespaces `acuc*`. Runs as root.
use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::Duration,
};

use anycast_tests::{
    topology::{http_get, ServerMode, Topology, HTTP_PORT},
    wait_until,
};
use anyhow::{bail, ensure, Context, Result};

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../anycast-ctl/debian");

/// The capabilities a unit grants, lower case without `CAP_` (as setpriv names them);
/// `AmbientCapabilities=` must list the same.
fn unit_capabilities(unit: &str) -> Result<Vec<String>> {
    let path = Path::new(UNITS).join(unit);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let setting = |key: &str| -> Result<Vec<String>> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("{unit} has no {key}"))?;
        let mut caps: Vec<String> = line
            .split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_lowercase())
            .collect();
        caps.sort();
        Ok(caps)
    };
    let bounding = setting("CapabilityBoundingSet=")?;
    ensure!(
        bounding == setting("AmbientCapabilities=")?,
        "{unit}: ambient and bounding capabilities differ"
    );
    Ok(bounding)
}

/// The kernel's bit of each capability a unit may name.
fn mask(caps: &[String]) -> Result<u64> {
    caps.iter().try_fold(0u64, |m, c| {
        let bit = match c.as_str() {
            "chown" => 0,
            "dac_override" => 1,
            "net_admin" => 12,
            "net_raw" => 13,
            "sys_admin" => 21,
            "perfmon" => 38,
            "bpf" => 39,
            other => bail!("capability {other} not in this test's table"),
        };
        Ok(m | 1 << bit)
    })
}

/// The bounding set of process `pid` (CapBnd in /proc/PID/status).
fn bounding_set(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .context("no CapBnd")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// A script that runs the workspace's anycast-ctl with only `caps` (exec all the way, so
/// the process started is anycast-ctl itself and signals reach it).
fn capped(dir: &Path, name: &str, caps: &[String]) -> Result<PathBuf> {
    let ctl = anycast_tests::workspace_bin("anycast-ctl")?;
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all{set} --inh-caps=-all {} \"$@\"\n",
            ctl.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}

/// The next message to the test's notification socket.
fn notified(socket: &UnixDatagram) -> Result<String> {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .context("no message to NOTIFY_SOCKET within 10 s")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn expect_notified(socket: &UnixDatagram, start: &str) -> Result<()> {
    let message = notified(socket)?;
    ensure!(
        message.starts_with(start),
        "notified {message:?}, not {start:?}..."
    );
    Ok(())
}

/// Every server answers over IPv4 and IPv6 through the agent.
fn answered_by_both(topo: &Topology) -> Result<()> {
    wait_until("both servers answering", Duration::from_secs(10), || {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..20 {
            let v6 = i % 2 == 1;
            seen.insert(topo.clients[0].in_ns(move || http_get(Topology::anycast(v6, HTTP_PORT)))?);
        }
        Ok(seen.len() == 2)
    })
}

#[test]
fn agent_and_servers_run_with_only_their_units_capabilities() -> Result<()> {
    let agent_caps = unit_capabilities("anycast-agent.service")?;
    let server_caps = unit_capabilities("anycast-server@.service")?;
    let mut topo = Topology::build("acuc", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    let agent_ctl = capped(&topo.dir, "agent-capped", &agent_caps)?;
    topo.server_ctl = Some(capped(&topo.dir, "server-capped", &server_caps)?);
    topo.server_args = vec!["--reverse-tunnel".into()];
    topo.registration_extra = serde_json::json!({"reverse_tunnel": {"suspect_after_ms": 1000}});
    topo.config_extra = serde_json::json!({
        // gid 4 (adm on Debian): a group root is not in, so the chown needs CAP_CHOWN.
        "control": {"group": "4"},
        "health_checks": [
            {"type": "icmp", "interval_ms": 200, "timeout_ms": 150, "fall": 2, "rise": 1}
        ]
    });

    // The processes started from here on inherit it.
    let notify_path = topo.dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(10)))?;
    std::env::set_var("NOTIFY_SOCKET", &notify_path);

    topo.start_agent_with(0, &agent_ctl)?;
    expect_notified(&notify, "READY=1\nSTATUS=agent ready: ")?;
    let pid = topo
        .agent_proc
        .as_ref()
        .and_then(|p| p.pid())
        .context("agent pid")?;
    ensure!(
        bounding_set(pid)? == mask(&agent_caps)?,
        "the agent runs with bounding set {:#x}, not {agent_caps:?}",
        bounding_set(pid)?
    );
    for i in 0..2 {
        topo.start_server(i)?;
        expect_notified(&notify, "READY=1\nSTATUS=server ready")?;
        let pid = topo.servers[i]
            .decap
            .as_ref()
            .and_then(|p| p.pid())
            .context("server pid")?;
        ensure!(
            bounding_set(pid)? == mask(&server_caps)?,
            "server {i} runs with bounding set {:#x}, not {server_caps:?}",
            bounding_set(pid)?
        );
    }
    wait_until("both servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 2)
    })?;
    answered_by_both(&topo)?;
    // ICMP checks answered (a raw socket refused would leave an error here).
    wait_until(
        "echo replies from both servers",
        Duration::from_secs(10),
        || {
            let status = topo.status()?;
            let icmp: Vec<&serde_json::Value> = status["health"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| h["check"].as_str().is_some_and(|c| c.contains("icmp")))
                .collect();
            Ok(icmp.len() >= 2
                && icmp.iter().all(|h| {
                    h["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("echo reply"))
                }))
        },
    )?;
    ensure!(
        topo.verdict("reverse_tunnel")? > 0,
        "no reverse-tunnelled SYN-ACK reached the agent"
    );
    let reloaded = topo.ctl(&["reload"])?;
    ensure!(reloaded.trim() == "reloaded", "reload: {reloaded}");

    // Hand-off and adoption, both capped.
    let handed = topo
        .agent_proc
        .as_mut()
        .context("agent runs")?
        .stop_with(libc::SIGUSR2, Duration::from_secs(10))?;
    ensure!(handed.success(), "the hand-off ended with {handed}");
    expect_notified(&notify, "STOPPING=1\nSTATUS=SIGUSR2: handing off")?;
    topo.agent_proc = None;
    topo.start_agent_with(0, &agent_ctl)?;
    expect_notified(&notify, "READY=1")?;
    let log = topo.agent_proc.as_mut().context("agent runs")?.output();
    ensure!(
        log.contains("replaced the program of the pinned link"),
        "the capped agent did not adopt the pinned link: {log}"
    );
    ensure!(
        !log.contains("Operation not permitted") && !log.contains("Permission denied"),
        "the capped agent was refused something: {log}"
    );
    answered_by_both(&topo)?;

    // Full stop.
    let stopped = topo
        .agent_proc
        .as_mut()
        .context("agent runs")?
        .stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    topo.agent_proc = None;
    ensure!(stopped.success(), "the full stop ended with {stopped}");
    expect_notified(&notify, "STOPPING=1\nSTATUS=SIGTERM: detaching")?;
    ensure!(
        !topo.agent.ip(&["link", "show", "eth0"])?.contains("xdp"),
        "still attached after a full stop"
    );
    Ok(())
}
