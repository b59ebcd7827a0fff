//! Test support: network namespaces that clean up after themselves, processes that are
//! stopped when their guard drops, waiting on conditions, the demo/e2e topology, the one
//! packet builder of the data-path fixtures and the benchmarks ([`packet`]), the floods at
//! the registration port ([`floods`]), a second agent for the binding sync tests
//! ([`second_agent`]), probes of the agent's controller changing under load
//! ([`restart`]), and the benchmarks behind `anycast-bench` ([`bench`]).
pub mod agreement;
pub mod bench;
pub mod floods;
pub mod load;
pub mod netns;
pub mod packet;
pub mod restart;
pub mod route_opt;
pub mod routed;
pub mod second_agent;
pub mod topology;

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

/// The bytes of a hex string (key files, oracles' output).
pub fn unhex(hex: &str) -> anyhow::Result<Vec<u8>> {
    let hex = hex.trim();
    anyhow::ensure!(hex.len().is_multiple_of(2), "odd hex length {}", hex.len());
    (0..hex.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&hex[i..i + 2], 16)?))
        .collect()
}

/// Polls `check` until it returns true, or fails after `timeout` naming `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}: last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a log of things started one after another says of those started in `from..to`, once
/// each has its outcome: each is logged when it has one, so once one started at or after `to`
/// is logged, every earlier one is. Fails if none is within `timeout`.
pub fn logged_between<T: Clone>(
    log: &Mutex<Vec<(Instant, T)>>,
    from: Instant,
    to: Instant,
    timeout: Duration,
) -> Result<Vec<T>> {
    wait_until("an outcome logged after the period", timeout, || {
        Ok(log.lock().unwrap().iter().any(|(at, _)| *at >= to))
    })?;
    Ok(log
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| (from..to).contains(at))
        .map(|(_, outcome)| outcome.clone())
        .collect())
}

/// Where cargo put the workspace's binaries (the test executable lives in `<dir>/deps`).
pub fn bin_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A workspace binary, built by `cargo test --workspace` / `cargo build --workspace`.
pub fn workspace_bin(name: &str) -> Result<std::path::PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not built: run `cargo build --workspace` (or `cargo xtask test`)",
            p.display()
        );
    }
    Ok(p)
}
