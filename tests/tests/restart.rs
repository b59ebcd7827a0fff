//! The agent's death is not an outage, end to end in network namespaces. Servers register
//! themselves; a client keeps opening connections every few milliseconds, asks UDP
//! questions and holds long-lived TCP connections while the agent's controller is killed
//! (SIGKILL), restarted, handed off (SIGUSR2) and replaced. The data path must keep
//! forwarding from its pinned maps throughout; a restarted controller adopts them (flow
//! table, counters, slots), has its bindings at once and confirms them within a round trip.
//! A full stop (SIGTERM) or `agent --cleanup` leaves nothing pinned and the original sysctl
//! values restored. Runs as root.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anycast_tests::{
    load::Load,
    topology::{Held, ServerMode, Topology, HTTP_PORT, UDP_PORT},
    wait_until,
};

/// Long enough that bindings outlive the controller's absence; servers refresh only at
/// about half of it, so a binding confirmed within a second of a restart was asked for.
const LIFETIME: u64 = 120;

/// How long the controller stays dead.
const DEAD_FOR: Duration = Duration::from_secs(10);

/// One UDP question every 5 ms from the client, each answered or counted lost (one try,
/// 300 ms), plus the long-lived connections asked every 20 ms.
struct Probes {
    stop: Arc<AtomicBool>,
    udp_sent: Arc<AtomicU64>,
    udp_lost: Arc<AtomicU64>,
    held_errors: Arc<std::sync::Mutex<Vec<String>>>,
    held_asked: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probes {
    fn start(topo: &Topology, held: Vec<Held>) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_sent = Arc::new(AtomicU64::new(0));
        let udp_lost = Arc::new(AtomicU64::new(0));
        let held_errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held_asked = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let client = topo.clients[0].name.clone();
        let (s, sent, lost) = (stop.clone(), udp_sent.clone(), udp_lost.clone());
        threads.push(std::thread::spawn(move || {
            let ns = anycast_tests::netns::Netns { name: client };
            let _ = ns.in_ns(move || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
                sock.set_read_timeout(Some(Duration::from_millis(300)))?;
                let to = Topology::anycast(false, UDP_PORT);
                let mut buf = [0u8; 512];
                // Bounded: at most ten minutes of questions.
                for _ in 0..120_000 {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    sock.send_to(b"who\n", to)?;
                    if sock.recv_from(&mut buf).is_err() {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            });
            std::mem::forget(ns);
        }));
        let (s, errors, asked) = (stop.clone(), held_errors.clone(), held_asked.clone());
        threads.push(std::thread::spawn(move || {
            let mut held = held;
            for _ in 0..30_000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                for h in &mut held {
                    asked.fetch_add(1, Ordering::SeqCst);
                    match h.ask() {
                        Ok(name) if name == h.server => {}
                        Ok(name) => errors
                            .lock()
                            .unwrap()
                            .push(format!("{} answered as {name}", h.server)),
                        Err(e) => errors.lock().unwrap().push(format!("{}: {e:#}", h.server)),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
        Probes {
            stop,
            udp_sent,
            udp_lost,
            held_errors,
            held_asked,
            threads,
        }
    }

    /// (UDP questions sent, lost, long-lived asks, their errors) so far.
    fn counts(&self) -> (u64, u64, u64, Vec<String>) {
        (
            self.udp_sent.load(Ordering::SeqCst),
            self.udp_lost.load(Ordering::SeqCst),
            self.held_asked.load(Ordering::SeqCst),
            self.held_errors.lock().unwrap().clone(),
        )
    }

    fn finish(mut self) -> (u64, u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.counts()
    }
}

/// Every flow the agent lists, as (client, client port, address, port, protocol, slot).
fn flows(topo: &Topology) -> anyhow::Result<BTreeSet<String>> {
    let v: serde_json::Value = serde_json::from_str(&topo.ctl(&["flows", "--json"])?)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            format!(
                "{} {} {} {} {} slot {}",
                f["client"],
                f["client_port"],
                f["address"],
                f["port"],
                f["protocol"],
                f["server_slot"]
            )
        })
        .collect())
}

/// Each binding's server and sequence number.
fn binding_seqs(topo: &Topology) -> anyhow::Result<Vec<(String, u64)>> {
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

fn pin_dir(topo: &Topology) -> anyhow::Result<PathBuf> {
    let s = topo.status()?;
    Ok(PathBuf::from(
        s["instance"]["pin_directory"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("status has no instance: {s}"))?,
    ))
}

fn xdp_attached(topo: &Topology) -> anyhow::Result<bool> {
    Ok(topo.agent.ip(&["link", "show", "eth0"])?.contains("xdp"))
}

fn ip_forward(topo: &Topology) -> anyhow::Result<String> {
    Ok(topo
        .agent
        .exec("cat", &["/proc/sys/net/ipv4/ip_forward"])?
        .trim()
        .to_string())
}

fn failures_since(load: &Load, t: Instant) -> Vec<String> {
    load.log
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, r)| *at >= t && r.is_err())
        .map(|(at, r)| format!("{:?} after: {:?}", at.duration_since(t), r))
        .collect()
}

fn connections_since(load: &Load, t: Instant) -> usize {
    load.log
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= t)
        .count()
}

#[test]
fn a_killed_agent_keeps_forwarding_and_a_restart_adopts_its_state() -> anyhow::Result<()> {
    let mut topo = Topology::build(
        "acrs",
        1,
        3,
        ServerMode::Registering {
            lifetime_secs: LIFETIME,
        },
    )?;
    let forward_before = ip_forward(&topo)?;
    topo.start_agent(0)?;
    for i in 0..3 {
        topo.start_server(i)?;
    }
    wait_until("three servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 3)
    })?;
    let pins = pin_dir(&topo)?;
    let held: Vec<Held> = (0..3)
        .map(|_| topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT))))
        .collect::<anyhow::Result<_>>()?;
    let load = Load::start(&topo.clients[0].name, Duration::from_millis(5));
    let probes = Probes::start(&topo, held);
    wait_until("connections flowing", Duration::from_secs(10), || {
        Ok(connections_since(&load, Instant::now() - Duration::from_secs(5)) >= 20)
    })?;

    // SIGKILL: the data path keeps forwarding from the pinned maps.
    let flows_before = flows(&topo)?;
    let no_server_before = topo.verdict("drop_no_server")?;
    let seqs_before = binding_seqs(&topo)?;
    let killed = Instant::now();
    topo.agent_proc
        .as_mut()
        .expect("agent runs")
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    topo.agent_proc = None;
    let (udp_sent0, udp_lost0, asked0, _) = probes.counts();
    std::thread::sleep(DEAD_FOR);
    let dead = failures_since(&load, killed);
    let made_dead = connections_since(&load, killed);
    let (udp_sent1, udp_lost1, asked1, errors1) = probes.counts();
    println!(
        "controller dead {DEAD_FOR:?}: {made_dead} connections ({} failed), {} UDP questions \
         ({} lost), {} asks on long-lived connections ({} errors)",
        dead.len(),
        udp_sent1 - udp_sent0,
        udp_lost1 - udp_lost0,
        asked1 - asked0,
        errors1.len()
    );
    assert!(made_dead >= 200, "the client kept connecting: {made_dead}");
    assert!(
        dead.is_empty(),
        "connections failed while the controller was dead: {dead:?}"
    );
    assert_eq!(
        udp_lost1, udp_lost0,
        "UDP questions lost while the controller was dead"
    );
    assert!(
        asked1 - asked0 >= 300,
        "long-lived connections made progress"
    );
    assert!(
        errors1.is_empty(),
        "long-lived connections broke: {errors1:?}"
    );
    assert!(pins.join("maps").exists() && xdp_attached(&topo)?);

    // Restart: the pinned state is adopted, the bindings are there at once and confirmed
    // within a round trip.
    let restarted = Instant::now();
    topo.start_agent(0)?;
    let ready = restarted.elapsed();
    let status = topo.status()?;
    let adopted = status["instance"]["adopted_flows"].as_u64();
    let active = topo.active_servers()?;
    let flows_after = flows(&topo)?;
    let lost_flows: Vec<_> = flows_before.difference(&flows_after).collect();
    println!(
        "restart: ready in {ready:?}, adopted {adopted:?} flows ({} before the kill), \
         {} active bindings at once",
        flows_before.len(),
        active.len()
    );
    assert!(
        adopted.is_some_and(|n| n as usize >= flows_before.len()),
        "{status}"
    );
    assert!(
        lost_flows.is_empty(),
        "flows lost over the restart: {lost_flows:?}"
    );
    assert_eq!(active.len(), 3, "bindings restored at once: {active:?}");
    let confirm = Instant::now();
    wait_until("every binding confirmed", Duration::from_secs(5), || {
        let now = binding_seqs(&topo)?;
        Ok(now.len() == seqs_before.len()
            && now
                .iter()
                .all(|(k, s)| seqs_before.iter().any(|(k0, s0)| k0 == k && s != s0)))
    })?;
    let confirmed = confirm.elapsed();
    println!("every binding confirmed {confirmed:?} after the agent was ready");
    assert!(
        confirmed < Duration::from_secs(1),
        "confirmed by the servers' own refresh, not a refresh request: {confirmed:?}"
    );
    let no_server_after = topo.verdict("drop_no_server")?;
    assert_eq!(
        no_server_after, no_server_before,
        "packets found no server around the restart (counters are kept across it)"
    );

    // Handoff (SIGUSR2) and a new controller swapping its program into the pinned links.
    let handoff = Instant::now();
    let status = topo
        .agent_proc
        .as_mut()
        .expect("agent runs")
        .stop_with(libc::SIGUSR2, Duration::from_secs(5))?;
    topo.agent_proc = None;
    assert!(status.success(), "handoff exits 0: {status:?}");
    assert_eq!(ip_forward(&topo)?, "1", "a handoff leaves the sysctls set");
    assert!(
        xdp_attached(&topo)?,
        "a handoff leaves the program attached"
    );
    topo.start_agent(0)?;
    let log = topo.agent_proc.as_mut().expect("agent runs").output();
    assert!(
        log.contains("replaced the program of the pinned link on eth0"),
        "the new program replaced the old one in the pinned link: {log}"
    );
    let swapped = failures_since(&load, handoff);
    assert!(
        swapped.is_empty(),
        "connections failed over the handoff: {swapped:?}"
    );

    drop(load);
    let (udp_sent, udp_lost, asked, errors) = probes.finish();
    println!(
        "whole run: {udp_sent} UDP questions, {udp_lost} lost; {asked} long-lived asks, {} errors",
        errors.len()
    );
    assert_eq!(udp_lost, 0, "UDP questions lost");
    assert!(
        errors.is_empty(),
        "long-lived connections broke: {errors:?}"
    );

    // A full stop after all this: nothing pinned, the original sysctl back (not the value
    // the first, killed, controller set).
    topo.agent_proc
        .as_mut()
        .expect("agent runs")
        .stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    topo.agent_proc = None;
    assert!(!pins.exists(), "{} left after a full stop", pins.display());
    assert!(!xdp_attached(&topo)?, "a full stop detaches");
    assert_eq!(
        ip_forward(&topo)?,
        forward_before,
        "the original ip_forward restored"
    );
    Ok(())
}

#[test]
fn cleanup_after_a_crash_and_refusal_of_incompatible_maps() -> anyhow::Result<()> {
    let mut topo = Topology::build("acrc", 1, 2, ServerMode::Static)?;
    let forward_before = ip_forward(&topo)?;
    topo.start_agent(2)?;
    let pins = pin_dir(&topo)?;
    topo.agent_proc
        .as_mut()
        .expect("agent runs")
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    topo.agent_proc = None;
    assert!(xdp_attached(&topo)? && pins.exists());

    // Another max_flows: the pinned flow table cannot be reused; refused, nothing touched.
    let ctl = anycast_tests::workspace_bin("anycast-ctl")?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&topo.config_path)?)?;
    config["max_flows"] = serde_json::json!(4096);
    let other = topo.dir.join("other-sizes.json");
    std::fs::write(&other, serde_json::to_string(&config)?)?;
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topo.agent.name))
        .arg(&ctl)
        .args(["agent", "--config"])
        .arg(&other)
        .arg("--socket")
        .arg(&topo.socket)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an incompatible layout was adopted: {err}"
    );
    assert!(
        err.contains("FLOWS") && err.contains("max_flows") && err.contains("--cleanup"),
        "the refusal says what differs and what to do: {err}"
    );
    assert!(
        xdp_attached(&topo)? && pins.exists(),
        "the refusal changed nothing"
    );
    assert_eq!(ip_forward(&topo)?, "1");

    // --cleanup: detached, nothing pinned, the original sysctl back.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topo.agent.name))
        .arg(&ctl)
        .args(["agent", "--cleanup", "--config"])
        .arg(&topo.config_path)
        .arg("--socket")
        .arg(&topo.socket)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists(), "{} left after --cleanup", pins.display());
    assert!(!xdp_attached(&topo)?, "--cleanup detaches");
    assert_eq!(ip_forward(&topo)?, forward_before);
    Ok(())
}
