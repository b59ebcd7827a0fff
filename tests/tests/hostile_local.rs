//! Local users: the agent's control socket and key files hold against a local user who is
//! not root and not in the configured groups. Runs as root; the unprivileged client is
//! `anycast-ctl` under `setpriv` as uid/gid 65534 (nobody), with or without the control
//! groups. Namespace `acloc`, addresses 10.9.0.0/16 only inside it.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anycast_tests::{netns::Netns, workspace_bin};

/// The control socket's group and the admin group (numeric: no group database entry needed).
const GROUP: u32 = 47101;
const ADMIN: u32 = 47102;

fn config(dir: &Path) -> PathBuf {
    let path = dir.join("agent.json");
    let text = serde_json::json!({
        "interfaces": ["eth0"],
        "xdp_mode": "generic",
        "agent_address": {"v4": "10.9.0.1"},
        "services": [{"name": "web", "address": "10.9.100.1", "protocol": "tcp", "port": 80,
                      "servers": [{"name": "a", "address": "10.9.0.11"}]}],
        "registration": {"servers": [{"id": "s1", "spi": 257, "key_file": "s1.key",
                                      "allow": ["10.9.100.2"], "real": ["10.9.0.12"]}]},
        "control": {"group": GROUP.to_string(), "admin_group": ADMIN.to_string()},
    });
    std::fs::write(&path, serde_json::to_string_pretty(&text).unwrap()).unwrap();
    path
}

/// `anycast-ctl ARGS` as root, or as uid/gid 65534 with exactly `groups` besides.
fn ctl(as_user: Option<&[u32]>, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let bin = workspace_bin("anycast-ctl")?;
    let mut c = match as_user {
        None => Command::new(&bin),
        Some(groups) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534"]);
            if groups.is_empty() {
                c.arg("--clear-groups");
            } else {
                let list: Vec<String> = groups.iter().map(u32::to_string).collect();
                c.args(["--groups", &list.join(",")]);
            }
            c.arg(&bin);
            c
        }
    };
    let out = c.args(args).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn xdp_attached(ns: &Netns) -> anyhow::Result<bool> {
    Ok(ns.ip(&["link", "show", "dev", "eth0"])?.contains("xdp"))
}

#[test]
fn control_socket_and_key_files_hold_against_local_users() -> anyhow::Result<()> {
    let ns = Netns::new("acloc")?;
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["addr", "add", "10.9.0.1/24", "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    let dir = std::env::temp_dir().join("acloc-anycast");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Traversable by the unprivileged client (the socket's own mode is what is tested).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let key = dir.join("s1.key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n")?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let cfg = config(&dir);
    let cfg_s = cfg.to_str().unwrap();
    let socket = dir.join("agent.sock");
    let sock = socket.to_str().unwrap();
    let bin = workspace_bin("anycast-ctl")?;

    let (ok, out) = ctl(None, &["check", "--config", cfg_s])?;
    assert!(ok, "check refused a good configuration: {out}");

    // A non-root user cannot read the key the set-up created.
    let (ok, out) = ctl(Some(&[]), &["check", "--config", cfg_s])?;
    assert!(!ok, "an unprivileged check read the key file: {out}");
    assert!(out.contains("Permission denied"), "{out}");

    // Under umask 000 the socket is still 0660, in the configured group.
    let cmd = format!(
        "umask 000; exec {} agent --config {cfg_s} --socket {sock}",
        bin.display()
    );
    let mut agent = ns.spawn("agent", Path::new("/bin/sh"), &["-c", &cmd])?;
    agent.wait_for_line("agent ready", Duration::from_secs(20))?;
    let meta = std::fs::metadata(&socket)?;
    assert_eq!(
        meta.mode() & 0o7777,
        0o660,
        "socket mode {:o} under umask 000",
        meta.mode()
    );
    assert_eq!(meta.gid(), GROUP, "socket group");

    // Root gets answers to every request.
    let (ok, out) = ctl(None, &["status", "--socket", sock])?;
    assert!(ok && out.contains("web"), "root status: {out}");
    let (ok, out) = ctl(None, &["bindings", "--socket", sock])?;
    assert!(ok, "root bindings: {out}");
    let (ok, out) = ctl(None, &["drain", "a", "--socket", sock])?;
    assert!(ok && out.contains("drained now: a"), "root drain: {out}");
    let (ok, out) = ctl(None, &["drain", "a", "--undo", "--socket", sock])?;
    assert!(
        ok && out.contains("drained now: none"),
        "root undrain: {out}"
    );
    let (ok, out) = ctl(None, &["reload", "--socket", sock])?;
    assert!(ok && out.contains("reloaded"), "root reload: {out}");

    // Without the groups: connecting is refused by the socket's mode.
    for args in [
        &["status", "--socket", sock][..],
        &["drain", "a", "--socket", sock],
        &["reload", "--socket", sock],
    ] {
        let (ok, out) = ctl(Some(&[]), args)?;
        assert!(!ok, "{args:?} as nobody without groups: {out}");
        assert!(out.contains("Permission denied"), "{args:?}: {out}");
    }

    // In the socket's group: reading is allowed, changing is refused by the credential
    // check, with the reason, and logged.
    let (ok, out) = ctl(Some(&[GROUP]), &["status", "--socket", sock])?;
    assert!(
        ok && out.contains("web"),
        "status in the socket's group: {out}"
    );
    let (ok, out) = ctl(Some(&[GROUP]), &["flows", "--socket", sock])?;
    assert!(ok, "flows in the socket's group: {out}");
    for args in [
        &["drain", "a", "--socket", sock][..],
        &["reload", "--socket", sock],
    ] {
        let (ok, out) = ctl(Some(&[GROUP]), args)?;
        assert!(!ok, "{args:?} in the socket's group only: {out}");
        assert!(
            out.contains("permission denied") && out.contains("uid 65534"),
            "{args:?}: {out}"
        );
    }
    agent.wait_for_line("control socket: permission denied", Duration::from_secs(5))?;
    let (ok, out) = ctl(None, &["status", "--json", "--socket", sock])?;
    assert!(ok, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        status["drained"],
        serde_json::json!([]),
        "a refused drain changed something: {out}"
    );

    // The credential check, not only the socket's mode: even with the socket opened to
    // everyone, a user in no control group is refused status.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let (ok, out) = ctl(Some(&[]), &["status", "--socket", sock])?;
    assert!(!ok, "status as nobody through an open socket: {out}");
    assert!(
        out.contains("permission denied: status needs root"),
        "{out}"
    );
    let (ok, out) = ctl(Some(&[]), &["reload", "--socket", sock])?;
    assert!(
        !ok && out.contains("permission denied: reload needs root"),
        "{out}"
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))?;

    // In the admin group (supplementary groups; the socket's group opens the socket):
    // drain and reload are allowed.
    let (ok, out) = ctl(Some(&[GROUP, ADMIN]), &["drain", "a", "--socket", sock])?;
    assert!(ok && out.contains("drained now: a"), "admin drain: {out}");
    let (ok, out) = ctl(Some(&[GROUP, ADMIN]), &["reload", "--socket", sock])?;
    assert!(ok && out.contains("reloaded"), "admin reload: {out}");

    let status = agent.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    assert!(status.success(), "agent exit: {status}\n{}", agent.output());

    // A world-readable key file: `check` and `agent` refuse it, naming the mode and the fix,
    // and the agent changes nothing.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let fix = format!(
        "key file {} is mode 0644: readable by group, readable by others; run chmod 600 {}",
        key.display(),
        key.display()
    );
    let (ok, out) = ctl(None, &["check", "--config", cfg_s])?;
    assert!(!ok, "check accepted a 0644 key");
    assert!(
        out.contains("registration.servers[0].key_file") && out.contains(&fix),
        "{out}"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&bin)
        .args(["agent", "--config", cfg_s, "--socket", sock])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "agent started with a 0644 key: {err}"
    );
    assert!(err.contains(&fix), "{err}");
    assert!(!xdp_attached(&ns)?, "XDP attached despite the refused key");
    assert!(!socket.exists(), "socket created despite the refused key");

    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
