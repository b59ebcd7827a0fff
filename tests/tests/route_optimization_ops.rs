//! Route optimization's client daemon in operation (namespaces `acco*`):
//!
//! 1. the revocation list re-read while the daemon runs: a client bound straight to a
//!    server; the operator revokes that server's certificate (`anycast-ctl pki revoke`) and
//!    writes the new list over the client's `--revocations` file; within a bounded wait the
//!    binding is gone, the server's refreshes are refused, and the open connection's
//!    requests are answered through the agent (its counters rise again), none failing. Then
//!    a forged list (signed by another key) and an older list are written over the file:
//!    each refused and counted once, the current list kept; SIGHUP and `client-reload`
//!    re-read the file (refused again, counted) without stopping the daemon;
//! 2. the control socket against local users and hostile requests: mode 0600 whatever the
//!    umask; another local user (uid 65534 under `setpriv`) refused by the socket's mode
//!    and, with the socket opened to all, by the credential check; malformed, non-UTF-8,
//!    oversized and silent requests refused or timed out; a flood of connections bounded
//!    (at most 64 served, the rest closed at once); the daemon answers throughout.
//!
//! Runs as root.
use std::{
    io::{Read as _, Write as _},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anycast_tests::{
    netns::Netns,
    route_opt::{self, agent_packets, ctl},
    topology::{Held, ServerMode, Topology, HTTP_PORT},
    wait_until, workspace_bin,
};

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

/// Writes `from`'s content over `to` as an operator's copy would (aside, then renamed).
fn install(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

#[test]
fn a_revoked_servers_binding_ends_while_running_and_bad_lists_are_refused() -> anyhow::Result<()> {
    let mut topo = Topology::build("acco", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 2)?;
    // Refreshes every 4 s while the client has a connection.
    topo.server_args = route_opt::server_args(&dir, 12);
    route_opt::start_agent_and_servers(&mut topo, 2)?;
    // The operator starts a list (number 1, nothing revoked); a copy is kept for later.
    let list = dir.join("revoked.list");
    let operator = path(&dir, "operator.key");
    route_opt::pki(&[
        "revoke",
        "--operator-key",
        &operator,
        "--out",
        &path(&dir, "list-1"),
    ])?;
    install(&dir.join("list-1"), &list)?;
    let list_s = list.to_string_lossy().into_owned();
    let mut daemon =
        route_opt::start_client(&topo.clients[0], &dir, 1, &["--revocations", &list_s])?;
    let status = || route_opt::client_status(&dir, 1);
    let bound_to = || -> anyhow::Result<Option<String>> {
        Ok(status()?["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["service"] == "10.71.100.1 tcp/80")
            .and_then(|b| b["server"].as_str().map(str::to_string)))
    };
    assert_eq!(status()?["revocations"]["number"], 1);

    // Bound straight to a server.
    let mut held = topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT)))?;
    let server = held.server.clone();
    wait_until(
        "the client bound to its server",
        Duration::from_secs(10),
        || {
            assert_eq!(
                held.ask()
                    .expect("a request on the held connection (never retried)"),
                server,
                "the connection keeps its server"
            );
            Ok(bound_to()? == Some(server.clone()))
        },
    )?;
    let direct0 = agent_packets(&topo, Some(&server))?;
    for _ in 0..5 {
        assert_eq!(held.ask()?, server);
    }
    assert_eq!(
        agent_packets(&topo, Some(&server))?,
        direct0,
        "bound: the agent sees none of the connection's packets"
    );
    let (ok, out) = ctl(&["client-bindings", "--socket", &path(&dir, "client-c1.sock")])?;
    assert!(ok && out.contains(&server), "client-bindings: {out}");

    // The operator revokes that server's certificate (serial N for sN) and writes the new
    // list over the client's file.
    let serial = server.trim_start_matches('s').to_string();
    route_opt::pki(&[
        "revoke",
        "--operator-key",
        &operator,
        "--list",
        &path(&dir, "list-1"),
        "--serial",
        &serial,
        "--out",
        &path(&dir, "list-2"),
    ])?;
    let asked_before = held.ask()?;
    assert_eq!(asked_before, server);
    let revoked_at = Instant::now();
    install(&dir.join("list-2"), &list)?;
    let mut asks = 0;
    wait_until("the revoked binding ended", Duration::from_secs(5), || {
        // The connection answers throughout: a failed request fails the test.
        assert_eq!(
            held.ask()
                .expect("a request on the held connection (never retried)"),
            server,
            "the connection keeps its server"
        );
        asks += 1;
        let s = status()?;
        Ok(s["revocations"]["number"] == 2
            && counter(&s, "ended_revoked") == 1
            && bound_to()?.is_none())
    })?;
    let took = revoked_at.elapsed();
    println!("the revoked binding ended {took:?} after the list was written ({asks} requests answered meanwhile)");
    daemon.wait_for_line("revoked: binding ended", Duration::from_secs(2))?;

    // Back through the agent: the open connection's requests rise its counters again.
    let via0 = agent_packets(&topo, Some(&server))?;
    for _ in 0..5 {
        assert_eq!(held.ask()?, server, "answered through the agent");
    }
    wait_until(
        "the agent forwards the connection again",
        Duration::from_secs(3),
        || Ok(agent_packets(&topo, Some(&server))? > via0),
    )?;
    println!(
        "after the revocation: 5 requests, the agent forwarded {} packets to {server}",
        agent_packets(&topo, Some(&server))? - via0
    );
    // The server still sends its refreshes (its connection is open): refused, not bound.
    wait_until(
        "the revoked server's refresh refused",
        Duration::from_secs(10),
        || {
            assert_eq!(
                held.ask()
                    .expect("a request on the held connection (never retried)"),
                server
            );
            Ok(counter(&status()?, "refused_certificate_revoked") >= 1)
        },
    )?;
    assert_eq!(bound_to()?, None, "the revoked server cannot bind again");

    // A forged list: another key signs a newer list revoking nothing (it would un-revoke).
    route_opt::pki(&["keygen", "--out", &path(&dir, "forger")])?;
    route_opt::pki(&[
        "revoke",
        "--operator-key",
        &path(&dir, "forger.key"),
        "--serial",
        "99",
        "--out",
        &path(&dir, "forged-list"),
    ])?;
    // Its number must be above 2 to be a real threat: re-sign twice more.
    for _ in 0..3 {
        route_opt::pki(&[
            "revoke",
            "--operator-key",
            &path(&dir, "forger.key"),
            "--list",
            &path(&dir, "forged-list"),
            "--out",
            &path(&dir, "forged-list"),
        ])?;
    }
    install(&dir.join("forged-list"), &list)?;
    wait_until("the forged list refused", Duration::from_secs(5), || {
        Ok(counter(&status()?, "revocation_list_refused_bad_signature") == 1)
    })?;
    // An older list (number 1, which revoked nothing).
    install(&dir.join("list-1"), &list)?;
    wait_until("the older list refused", Duration::from_secs(5), || {
        Ok(counter(&status()?, "revocation_list_refused_older") == 1)
    })?;
    let s = status()?;
    assert_eq!(s["revocations"]["number"], 2, "the current list stays: {s}");
    assert!(
        s["revocations"]["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_u64().map(|n| n.to_string()) == Some(serial.clone())),
        "{s}"
    );
    // Logged and counted once per change of the file, not at every poll: seconds of polls
    // later, still one each.
    assert_eq!(
        counter(&s, "revocation_list_refused_bad_signature"),
        1,
        "{s}"
    );
    // `client-reload` re-reads it now: refused, with the reason; SIGHUP likewise, and the
    // daemon keeps running.
    let (ok, out) = ctl(&["client-reload", "--socket", &path(&dir, "client-c1.sock")])?;
    assert!(!ok && out.contains("not newer"), "client-reload: {out}");
    let pid = daemon.pid().unwrap();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    wait_until("the SIGHUP re-read refused", Duration::from_secs(5), || {
        Ok(counter(&status()?, "revocation_list_refused_older") == 3)
    })?;
    // The right list again: nothing changes, nothing is counted.
    install(&dir.join("list-2"), &list)?;
    let (ok, out) = ctl(&["client-reload", "--socket", &path(&dir, "client-c1.sock")])?;
    assert!(
        ok && out.contains("number 2: unchanged"),
        "client-reload: {out}"
    );
    let s = status()?;
    // List 2 only: the list read at start is not counted, the same list again neither.
    assert_eq!(counter(&s, "revocation_list_taken"), 1, "{s}");
    assert_eq!(counter(&s, "revocation_list_refused_older"), 3, "{s}");
    assert_eq!(
        counter(&s, "revocation_list_refused_bad_signature"),
        1,
        "{s}"
    );
    assert_eq!(held.ask()?, server, "the connection answers at the end");
    println!("{s}");
    held.reset();
    let exit = daemon.stop_with(libc::SIGTERM, Duration::from_secs(5))?;
    assert!(exit.success(), "client exit: {exit}\n{}", daemon.output());
    assert!(
        !dir.join("client-c1.sock").exists(),
        "the control socket is removed at exit"
    );
    Ok(())
}

/// `anycast-ctl ARGS` as uid/gid 65534 with no other group.
fn as_nobody(args: &[&str]) -> anyhow::Result<(bool, String)> {
    route_opt::outcome(
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(workspace_bin("anycast-ctl")?)
            .args(args),
    )
}

/// Sends `bytes` on a new connection and reads until the daemon closes it (bounded). The
/// daemon may close before taking all of an oversized request (the write then fails, and
/// the read ends in a reset once the answer is read): only what was answered counts.
fn exchange(socket: &Path, bytes: &[u8]) -> anyhow::Result<(String, Duration)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let start = Instant::now();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        anyhow::ensure!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "no answer and not closed within 10 s"
        );
    }
    Ok((String::from_utf8_lossy(&out).into_owned(), start.elapsed()))
}

fn fd_count(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn the_client_control_socket_holds_against_local_users_and_hostile_requests() -> anyhow::Result<()>
{
    let ns = Netns::new("accol")?;
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["addr", "add", "10.73.0.2/24", "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    let dir = std::env::temp_dir().join("accol-anycast");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Traversable by the unprivileged user (the socket's own mode is what is tested).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    route_opt::pki(&["keygen", "--out", &path(&dir, "operator")])?;
    let socket = dir.join("client.sock");
    let sock = socket.to_string_lossy().into_owned();
    let cmd = format!(
        "umask 000; exec {} client --trust {} --interface eth0 --control-socket {sock}",
        workspace_bin("anycast-ctl")?.display(),
        path(&dir, "operator.pub")
    );
    let mut daemon = ns.spawn("client", Path::new("/bin/sh"), &["-c", &cmd])?;
    daemon.wait_for_line("client ready", Duration::from_secs(20))?;
    let pid = daemon.pid().unwrap();

    // Mode 0600 under umask 000, owned by the daemon's user (root).
    let meta = std::fs::metadata(&socket)?;
    assert_eq!(meta.mode() & 0o7777, 0o600, "socket mode {:o}", meta.mode());
    assert_eq!(meta.uid(), 0, "socket owner");

    // Root: every request answered.
    let (ok, out) = ctl(&["client-status", "--socket", &sock])?;
    assert!(
        ok && out.contains("revocation list: none"),
        "client-status: {out}"
    );
    let (ok, out) = ctl(&["client-bindings", "--socket", &sock])?;
    assert!(
        ok && out.contains("bindings: none"),
        "client-bindings: {out}"
    );
    let (ok, out) = ctl(&["client-unbind", "10.73.100.1:tcp:80", "--socket", &sock])?;
    assert!(
        !ok && out.contains("no binding held"),
        "client-unbind: {out}"
    );
    let (ok, out) = ctl(&["client-reload", "--socket", &sock])?;
    assert!(
        !ok && out.contains("without --revocations"),
        "client-reload: {out}"
    );
    // SIGHUP without a list: logged, the daemon goes on.
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    daemon.wait_for_line("no --revocations file", Duration::from_secs(5))?;

    // Another local user: refused by the socket's mode...
    for args in [
        &["client-status", "--socket", &sock][..],
        &["client-unbind", "10.73.100.1", "--socket", &sock],
        &["client-reload", "--socket", &sock],
    ] {
        let (ok, out) = as_nobody(args)?;
        assert!(
            !ok && out.contains("Permission denied"),
            "{args:?} as nobody: {out}"
        );
    }
    // ...and by the credential check when the socket is opened to everyone.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    for (args, name) in [
        (&["client-status", "--socket", &sock][..], "client-status"),
        (
            &["client-unbind", "10.73.100.1", "--socket", &sock],
            "client-unbind",
        ),
    ] {
        let (ok, out) = as_nobody(args)?;
        assert!(
            !ok && out.contains(&format!("permission denied: {name} needs root or uid 0")),
            "{args:?} as nobody through an open socket: {out}"
        );
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    daemon.wait_for_line("control socket: permission denied", Duration::from_secs(5))?;

    // Malformed requests: answered with the reason, the daemon unharmed.
    for bad in [
        &b"garbage\n"[..],
        b"{\"request\":\"unbind\"}\n",
        b"{\"request\":\"unbind\",\"anycast\":\"10.73.100.1\",\"protocol\":6,\"port\":99999}\n",
        b"{\"request\":\"drain\",\"server\":\"s1\",\"undo\":false}\n",
    ] {
        let (out, _) = exchange(&socket, bad)?;
        assert!(
            out.contains("bad request"),
            "{:?}: {out}",
            String::from_utf8_lossy(bad)
        );
    }
    // Oversized: 100 kB without a newline; only the first 64 KiB are read, then refused.
    let (out, _) = exchange(&socket, &vec![b'a'; 100_000])?;
    assert!(out.contains("bad request"), "oversized: {out}");
    // Not UTF-8: closed without an answer.
    let (out, _) = exchange(&socket, b"\xff\xfe\xfd\n")?;
    assert!(out.is_empty(), "non-UTF-8: {out}");
    // Silent: closed after the request timeout (5 s).
    let (out, took) = exchange(&socket, b"")?;
    assert!(
        out.is_empty() && took >= Duration::from_secs(4),
        "silent: {out} {took:?}"
    );
    println!("a silent connection was closed after {took:?}");

    // A flood of connections that send nothing: at most 64 are served at once, the rest
    // are closed at once; the daemon's descriptors stay bounded; once the served ones time
    // out it answers again, with the flood's connections still open.
    const FLOOD: usize = 300;
    let fds0 = fd_count(pid)?;
    let started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let s = UnixStream::connect(&socket)?;
        s.set_nonblocking(true)?;
        flood.push(s);
    }
    // Those beyond the 64 served are closed at once (well before the 5 s timeout).
    let mut closed = vec![false; FLOOD];
    wait_until(
        "the connections beyond 64 closed",
        Duration::from_secs(3),
        || {
            for (s, c) in flood.iter_mut().zip(closed.iter_mut()) {
                let mut b = [0u8; 1];
                if !*c && matches!(s.read(&mut b), Ok(0)) {
                    *c = true;
                }
            }
            Ok(closed.iter().filter(|c| **c).count() >= FLOOD - 64)
        },
    )?;
    let closed_at_once = closed.iter().filter(|c| **c).count();
    let fds = fd_count(pid)?;
    println!(
        "flood: {FLOOD} silent connections: {closed_at_once} closed within {:?}, {} held; \
         the daemon holds {} more descriptors",
        started.elapsed(),
        FLOOD - closed_at_once,
        fds.saturating_sub(fds0)
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed before any timeout"
    );
    assert!(fds <= fds0 + 64 + 4, "descriptors {fds0} -> {fds}");
    daemon.wait_for_line("connections already open", Duration::from_secs(5))?;
    wait_until(
        "the daemon answers during the flood",
        Duration::from_secs(12),
        || Ok(ctl(&["client-status", "--socket", &sock])?.0),
    )?;
    println!("answering again {:?} into the flood", started.elapsed());
    drop(flood);
    let (ok, out) = ctl(&["client-status", "--json", "--socket", &sock])?;
    assert!(ok, "{out}");
    let s: serde_json::Value = serde_json::from_str(&out)?;
    assert!(
        s["bindings"].as_array().is_some_and(|b| b.is_empty()),
        "{s}"
    );

    let exit = daemon.stop_with(libc::SIGTERM, Duration::from_secs(5))?;
    assert!(exit.success(), "client exit: {exit}\n{}", daemon.output());
    assert!(!socket.exists(), "the control socket is removed at exit");
    drop(ns);
    Ok(())
}
