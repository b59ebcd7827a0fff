//! The agent's controller changing under load, for the restart tests and the bench's restart
//! part: what a client sees meanwhile ([`Probes`]), the bindings' sequence numbers (a
//! restarted agent asks every server to confirm), the program tags the agent logs when it
//! swaps its program into a pinned link, and the test-only build to swap in
//! ([`variant_bin`]).
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    load::Load,
    netns::Netns,
    topology::{Held, Topology, HTTP_PORT, UDP_PORT},
    wait_until,
};

/// Pause between UDP questions.
pub const UDP_EVERY: Duration = Duration::from_millis(5);
/// A question unanswered within this is lost (one try).
pub const UDP_TIMEOUT: Duration = Duration::from_millis(300);
/// Pause between rounds of asks on the long-lived connections.
pub const HELD_EVERY: Duration = Duration::from_millis(20);

/// When each probe started, and how it ended.
type ProbeLog<T> = Arc<Mutex<Vec<(Instant, T)>>>;

/// What the probes saw in a period.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub udp_sent: usize,
    pub udp_lost: usize,
    /// Asks on the long-lived connections.
    pub asked: usize,
    /// What went wrong on the long-lived connections.
    pub held_errors: Vec<String>,
}

/// From a client namespace: one UDP question every [`UDP_EVERY`] to the anycast address
/// (each answered or counted lost after [`UDP_TIMEOUT`]), and each long-lived connection
/// asked every [`HELD_EVERY`], which must answer with its own server's name. Each outcome is
/// logged with when its probe started, so any period can be counted.
pub struct Probes {
    stop: Arc<AtomicBool>,
    udp: ProbeLog<bool>,
    held: ProbeLog<Result<(), String>>,
    threads: Vec<JoinHandle<()>>,
}

impl Probes {
    pub fn start(client: &str, held: Vec<Held>) -> Probes {
        Probes::start_with(client, Some(Topology::anycast(false, UDP_PORT)), held)
    }

    /// The same, with the UDP questions going to `udp` (none when `None`).
    pub fn start_with(
        client: &str,
        udp_to: Option<std::net::SocketAddr>,
        held: Vec<Held>,
    ) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let udp: ProbeLog<bool> = Arc::default();
        let held_log: ProbeLog<Result<(), String>> = Arc::default();
        let mut threads = Vec::new();
        let (s, log, name) = (stop.clone(), udp.clone(), client.to_string());
        threads.push(std::thread::spawn(move || {
            let Some(to) = udp_to else { return };
            let ns = Netns { name };
            let _ = ns.in_ns(move || {
                let socket = || -> Result<std::net::UdpSocket> {
                    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
                    sock.set_read_timeout(Some(UDP_TIMEOUT))?;
                    Ok(sock)
                };
                let mut sock = socket()?;
                let mut buf = [0u8; 512];
                // Bounded: at most ten minutes of questions.
                for _ in 0..120_000 {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let at = Instant::now();
                    sock.send_to(b"who\n", to)?;
                    let answered = sock.recv_from(&mut buf).is_ok();
                    log.lock().unwrap().push((at, answered));
                    if !answered {
                        // Every answer reads the same: a late one must not pass for the
                        // answer to the next question.
                        sock = socket()?;
                    }
                    std::thread::sleep(UDP_EVERY);
                }
                Ok(())
            });
            std::mem::forget(ns); // the topology owns it
        }));
        let (s, log) = (stop.clone(), held_log.clone());
        threads.push(std::thread::spawn(move || {
            let mut held = held;
            // Bounded: at most ten minutes of asks.
            for _ in 0..30_000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                for h in &mut held {
                    let at = Instant::now();
                    let outcome = match h.ask() {
                        Ok(name) if name == h.server => Ok(()),
                        Ok(name) => Err(format!("{} answered as {name}", h.server)),
                        Err(e) => Err(format!("{}: {e:#}", h.server)),
                    };
                    log.lock().unwrap().push((at, outcome));
                }
                std::thread::sleep(HELD_EVERY);
            }
        }));
        Probes {
            stop,
            udp,
            held: held_log,
            threads,
        }
    }

    fn tally(&self, keep: impl Fn(Instant) -> bool) -> Tally {
        let udp = self.udp.lock().unwrap();
        let held = self.held.lock().unwrap();
        let udp: Vec<bool> = udp
            .iter()
            .filter(|(at, _)| keep(*at))
            .map(|x| x.1)
            .collect();
        Tally {
            udp_sent: udp.len(),
            udp_lost: udp.iter().filter(|answered| !**answered).count(),
            asked: held.iter().filter(|(at, _)| keep(*at)).count(),
            held_errors: held
                .iter()
                .filter(|(at, _)| keep(*at))
                .filter_map(|(_, r)| r.clone().err())
                .collect(),
        }
    }

    /// What the probes started in `from..to` saw, once each has its outcome.
    pub fn between(&self, from: Instant, to: Instant) -> Result<Tally> {
        // A UDP question ends within its timeout; an ask within the connection's (5 s).
        crate::logged_between(&self.udp, from, to, Duration::from_secs(5))?;
        crate::logged_between(&self.held, from, to, Duration::from_secs(20))?;
        Ok(self.tally(|at| (from..to).contains(&at)))
    }

    /// Stops the probes; what they saw from start to end.
    pub fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.tally(|_| true)
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Each binding's server and real address, with its sequence number.
/// Starts the three registering servers and waits for their bindings, then the client's
/// traffic: a new connection every `connect_every`, UDP questions and three long-lived
/// connections ([`Probes`]); returns once connections are flowing.
pub fn start_servers_and_traffic(
    topo: &mut Topology,
    connect_every: Duration,
) -> Result<(Load, Probes)> {
    for i in 0..3 {
        topo.start_server(i)?;
    }
    wait_until("three servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 3)
    })?;
    let held: Vec<Held> = (0..3)
        .map(|_| topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT))))
        .collect::<Result<_>>()?;
    let load = Load::start(&topo.clients[0].name, connect_every);
    let probes = Probes::start(&topo.clients[0].name, held);
    wait_until("connections flowing", Duration::from_secs(10), || {
        Ok(load.since(Instant::now() - Duration::from_secs(5)).len() >= 20)
    })?;
    Ok((load, probes))
}

pub fn binding_seqs(topo: &Topology) -> Result<Vec<(String, u64)>> {
    let b = topo.bindings()?;
    Ok(b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            (
                format!("{} {}", x["server"].as_str().unwrap_or("?"), x["real"]),
                x["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Whether every binding of `before` is there with another sequence number (its server
/// sent a new update since), and no other binding is.
pub fn all_confirmed(before: &[(String, u64)], now: &[(String, u64)]) -> bool {
    now.len() == before.len()
        && now
            .iter()
            .all(|(k, s)| before.iter().any(|(k0, s0)| k0 == k && s != s0))
}

/// The program tags in the agent's log line about `iface`: `(None, new)` for a new link,
/// `(Some(old), new)` for a program swapped into a pinned link; the last such line counts.
pub fn logged_tags(log: &str, iface: &str) -> Option<(Option<String>, String)> {
    log.lines().rev().find_map(|l| {
        if let Some(rest) = l.split_once(&format!("pinned link on {iface} ")) {
            let (old, new) = rest.1.split_once("program tag ")?.1.split_once(" -> ")?;
            Some((Some(old.to_string()), new.trim().to_string()))
        } else if l.contains(&format!("attached to {iface} ")) {
            let tag = l.split_once("program tag ")?.1;
            Some((None, tag.trim().to_string()))
        } else {
            None
        }
    })
}

/// The tag of the XDP program attached to `iface` in `ns`, as the kernel reports it
/// (`ip` for the program's id, `bpftool` for its tag): what the agent's log is checked
/// against.
pub fn attached_tag(ns: &Netns, iface: &str) -> Result<String> {
    let link: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show", "dev", iface])?)
            .context("ip -j link show")?;
    let id = link[0]["xdp"]["prog"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("no XDP program on {iface}: {link}"))?;
    let prog: serde_json::Value = serde_json::from_str(&crate::netns::run(
        "bpftool",
        &["-j", "prog", "show", "id", &id.to_string()],
    )?)
    .context("bpftool -j prog show")?;
    prog["tag"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("bpftool shows no tag for program {id}: {prog}"))
}

/// TCP segments the namespace `ns` has retransmitted so far (`RetransSegs` of its /proc/net/snmp): a
/// segment lost between the client and its server shows here even when the connection
/// survives it.
pub fn tcp_retransmits(ns: &str) -> Result<u64> {
    tcp_counter(ns, "RetransSegs")
}

/// A counter of the `Tcp:` lines of the namespace `ns`'s /proc/net/snmp, e.g. `EstabResets`
/// (connections reset in ESTABLISHED or CLOSE-WAIT) or `AttemptFails`.
pub fn tcp_counter(ns: &str, name: &str) -> Result<u64> {
    let snmp = crate::netns::run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        bail!("no Tcp lines in /proc/net/snmp of {ns}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow!("no {name} in /proc/net/snmp of {ns}"))
}

/// The test-only build of anycast-ctl, whose agent program differs from the normal build's
/// in its instructions only (the `upgrade-variant` feature of anycast-ctl and anycast-ebpf).
/// `cargo xtask test` and `cargo xtask build --release` build it beside anycast-ctl.
pub fn variant_bin() -> Result<PathBuf> {
    let p = crate::bin_dir().join(VARIANT);
    if !p.exists() {
        bail!(
            "{} not built: `cargo xtask test` and `cargo xtask build --release` build it (by \
             hand: cargo build --release -p anycast-ctl --features upgrade-variant --bin {VARIANT})",
            p.display()
        );
    }
    Ok(p)
}

/// The test-only build's binary.
pub const VARIANT: &str = "anycast-ctl-variant";
