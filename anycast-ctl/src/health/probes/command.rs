//! An operator's command judged by its exit status, as keepalived's `MISC_CHECK`.
use super::*;

/// Kills a command's process group when the check is cancelled (timed out) before the
/// command ended: `sh -c` may have children of its own.
pub(crate) struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: plain syscall. The group's leader is our unreaped child, so its id
            // cannot have been reused.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

pub(crate) async fn run_command(
    command: String,
    server: String,
    real: IpAddr,
    port: u16,
) -> Result<String, String> {
    let started = Instant::now();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("ANYCAST_REAL_ADDRESS", real.to_string())
        .env("ANYCAST_PORT", port.to_string())
        .env("ANYCAST_SERVER", &server)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let mut group = KillGroup(child.id());
    let out = child.wait_with_output().await;
    group.0 = None;
    let out = out.map_err(|e| format!("waiting for the command: {e}"))?;
    if out.status.success() {
        return Ok(format!("exit 0 in {}", fmt_elapsed(started)));
    }
    let mut why = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => format!("{}", out.status),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        why.push_str(": ");
        why.extend(line.trim().chars().take(160));
    }
    Err(why)
}
