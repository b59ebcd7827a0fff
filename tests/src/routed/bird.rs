//! The BIRD daemons of the routed topology and a watch on the router's routing table.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    netns::{run, Netns, Proc},
    wait_until,
};

/// A `bird -f` in a namespace, with its control socket.
pub struct Bird {
    pub proc: Proc,
    pub ctl: PathBuf,
}

impl Bird {
    pub fn start(ns: &Netns, label: &str, conf: &Path, ctl: &Path) -> Result<Bird> {
        let _ = fs::remove_file(ctl);
        let pid = ctl.with_extension("pid");
        let proc = ns.spawn(
            label,
            Path::new("/usr/sbin/bird"),
            &[
                "-f",
                "-c",
                &conf.to_string_lossy(),
                "-s",
                &ctl.to_string_lossy(),
                "-P",
                &pid.to_string_lossy(),
            ],
        )?;
        let bird = Bird {
            proc,
            ctl: ctl.to_path_buf(),
        };
        wait_until(
            &format!("{label} answering"),
            Duration::from_secs(10),
            || Ok(bird.birdc("show status")?.contains("Daemon is up")),
        )?;
        Ok(bird)
    }

    pub fn birdc(&self, command: &str) -> Result<String> {
        let mut args = vec!["-s", self.ctl.to_str().unwrap_or_default()];
        args.extend(command.split_whitespace());
        run("birdc", &args)
    }
}

pub struct RouteMonitor {
    child: std::process::Child,
    events: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl RouteMonitor {
    /// Follows the router's routing table (`ip monitor route`), each event with the time it
    /// was read: the convergence times come from here, not from polling.
    pub fn start(router: &Netns) -> Result<RouteMonitor> {
        let mut child = std::process::Command::new("ip")
            .args(["-n", &router.name, "monitor", "route"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("ip monitor route")?;
        let out = child.stdout.take().context("piped")?;
        let events: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let e = events.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                e.lock().unwrap().push((Instant::now(), line));
            }
        });
        // Started before the events it must see: `ip monitor` subscribes at once, but make
        // sure it runs by waiting for its process to be past exec.
        wait_until("ip monitor started", Duration::from_secs(5), || {
            Ok(fs::read_to_string(format!("/proc/{}/comm", child.id()))?.trim() == "ip")
        })?;
        Ok(RouteMonitor { child, events })
    }

    /// When the first route event for `addr` after `since` was seen, waiting up to
    /// `timeout` for one.
    pub fn first_event(&self, addr: IpAddr, since: Instant, timeout: Duration) -> Result<Instant> {
        let needle = addr.to_string();
        let mut at = None;
        wait_until(&format!("a route event for {addr}"), timeout, || {
            at = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|(t, l)| *t >= since && mentions(l, &needle))
                .map(|(t, _)| *t);
            Ok(at.is_some())
        })?;
        at.context("no event")
    }

    /// The route events for `addr` seen since `since`.
    pub fn events_since(&self, addr: IpAddr, since: Instant) -> Vec<String> {
        let needle = addr.to_string();
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, l)| *t >= since && mentions(l, &needle))
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// Whether an `ip monitor` line is about this destination (`10.73.100.1 ...`,
/// `Deleted 10.73.100.1 ...`).
fn mentions(line: &str, addr: &str) -> bool {
    let l = line.strip_prefix("Deleted ").unwrap_or(line);
    l.split_whitespace().next() == Some(addr)
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
