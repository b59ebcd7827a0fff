//! Route optimization in the test topology: the operator's PKI made with `anycast-ctl pki`
//! (an operator key pair, and per server `ro-sN.key`, `ro-sN.pub`, `ro-sN.cert` covering its
//! real addresses on both server networks, the second for a multi-homed server, and both
//! anycast addresses), the servers' arguments, and the client daemon (`anycast-ctl client`,
//! its status file `client-cN.json` and control socket `client-cN.sock`).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{ensure, Result};

use crate::{
    netns::{Netns, Proc},
    topology::{ANYCAST_V4, ANYCAST_V6},
    workspace_bin,
};

/// `anycast-ctl pki ARGS`.
pub fn pki(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(workspace_bin("anycast-ctl")?)
        .arg("pki")
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// The operator's key pair (`operator.key`, `operator.pub`) and a certificate for each of
/// servers s1..s`servers` (serial N), in `dir`. A certificate covers its server's addresses
/// on the first server network (10.71.2.x, fd71:2::x) and on the second, which
/// `Topology::add_second_link` gives a multi-homed server (10.71.3.x, fd71:3::x).
pub fn make_pki(dir: &Path, servers: usize) -> Result<()> {
    pki(&["keygen", "--out", &path(dir, "operator")])?;
    for n in 1..=servers {
        let s = format!("s{n}");
        pki(&["keygen", "--out", &path(dir, &format!("ro-{s}"))])?;
        let v4 = format!("10.71.2.{}", 10 + n);
        let v6 = format!("fd71:2::{:x}", 0x10 + n);
        let second_v4 = format!("10.71.3.{}", 10 + n);
        let second_v6 = format!("fd71:3::{:x}", 0x10 + n);
        pki(&[
            "issue",
            "--operator-key",
            &path(dir, "operator.key"),
            "--server-pub",
            &path(dir, &format!("ro-{s}.pub")),
            "--id",
            &s,
            "--real",
            &v4,
            "--real",
            &v6,
            "--real",
            &second_v4,
            "--real",
            &second_v6,
            "--anycast",
            &ANYCAST_V4.to_string(),
            "--anycast",
            &ANYCAST_V6.to_string(),
            "--serial",
            &n.to_string(),
            "--out",
            &path(dir, &format!("ro-{s}.cert")),
        ])?;
    }
    Ok(())
}

/// `anycast-ctl server` arguments (for `Topology::server_args`) sending clients bindings of
/// `lifetime_secs`.
pub fn server_args(dir: &Path, lifetime_secs: u64) -> Vec<String> {
    vec![
        "--certificate".into(),
        path(dir, "ro-{name}.cert"),
        "--signing-key".into(),
        path(dir, "ro-{name}.key"),
        "--client-binding-lifetime".into(),
        lifetime_secs.to_string(),
    ]
}

/// The status file of client `n`'s daemon.
pub fn status_file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("client-c{n}.json"))
}

/// The control socket of client `n`'s daemon.
pub fn control_socket(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("client-c{n}.sock"))
}

/// `anycast-ctl ARGS` (e.g. `client-status --json --socket S`): whether it succeeded, and
/// its output (stdout then stderr).
pub fn ctl(args: &[&str]) -> Result<(bool, String)> {
    outcome(std::process::Command::new(workspace_bin("anycast-ctl")?).args(args))
}

/// Runs `cmd`: whether it succeeded, and its output (stdout then stderr).
pub fn outcome(cmd: &mut std::process::Command) -> Result<(bool, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Starts the agent (no server configured: they register) and servers `0..n`, and waits
/// until all have registered.
pub fn start_agent_and_servers(topo: &mut crate::topology::Topology, n: usize) -> Result<()> {
    topo.start_agent(0)?;
    for i in 0..n {
        topo.start_server(i)?;
    }
    crate::wait_until("the servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == n)
    })
}

/// The packets a client's status (file or `client-status`) says its tunnel sent.
pub fn tunnelled(status: &serde_json::Value) -> u64 {
    status["tunnel"]["tunnelled"].as_u64().unwrap_or(0)
        + status["tunnel"]["tunnelled_resolving"]
            .as_u64()
            .unwrap_or(0)
}

/// A field (`server`, `real`) of the binding a client's status holds for `service` (e.g.
/// `10.71.100.1 tcp/80`), if it holds one.
pub fn binding_field(status: &serde_json::Value, service: &str, field: &str) -> Option<String> {
    status["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["service"] == service)
        .and_then(|b| b[field].as_str().map(str::to_string))
}

/// Client `n`'s status asked on its control socket (`anycast-ctl client-status --json`).
pub fn client_status(dir: &Path, n: usize) -> Result<serde_json::Value> {
    let socket = control_socket(dir, n).to_string_lossy().into_owned();
    let (ok, out) = ctl(&["client-status", "--json", "--socket", &socket])?;
    ensure!(ok, "client-status: {out}");
    Ok(serde_json::from_str(&out)?)
}

/// Starts `anycast-ctl client` in client `n`'s namespace (its eth0), trusting the operator
/// of `make_pki`, and waits until it is ready.
pub fn start_client(ns: &Netns, dir: &Path, n: usize, extra: &[&str]) -> Result<Proc> {
    let trust = path(dir, "operator.pub");
    let status = status_file(dir, n).to_string_lossy().into_owned();
    let socket = control_socket(dir, n).to_string_lossy().into_owned();
    let mut args = vec![
        "client",
        "--trust",
        &trust,
        "--interface",
        "eth0",
        "--status-file",
        &status,
        "--control-socket",
        &socket,
    ];
    args.extend_from_slice(extra);
    let mut p = ns.spawn(
        &format!("client c{n}"),
        &workspace_bin("anycast-ctl")?,
        &args,
    )?;
    p.wait_for_line("client ready", Duration::from_secs(20))?;
    crate::wait_until("the client's status file", Duration::from_secs(5), || {
        Ok(status_file(dir, n).exists())
    })?;
    Ok(p)
}

/// The agent's packets to `server` (all servers: `None`), over all services.
pub fn agent_packets(topo: &crate::topology::Topology, server: Option<&str>) -> Result<u64> {
    let s = topo.status()?;
    Ok(s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|svc| svc["servers"].as_array().cloned().unwrap_or_default())
        .filter(|x| server.is_none_or(|n| x["name"] == n))
        .map(|x| x["packets"].as_u64().unwrap_or(0))
        .sum())
}
