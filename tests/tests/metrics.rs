//! The operator's views, end to end in network namespaces (`acmt*`): the Prometheus endpoint
//! (`metrics.listen`) scraped over HTTP while real traffic goes through the agent, checked
//! by `promtool`, and scraped again while a binding-update flood keeps the control plane
//! busy; `anycast-ctl top` run in tmux, read off the screen and quit with `q`, and run with
//! its output piped. Runs as root; needs `promtool` (Debian `prometheus`) and `tmux`.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::Mutex,
    time::{Duration, Instant},
};

use anycast_tests::{
    floods::{flood, FloodedAgent, PACE},
    load::Load,
    netns::Netns,
    topology::{http_get, ServerMode, Topology, HTTP_PORT, UDP_PORT},
    wait_until, workspace_bin,
};
use anyhow::{bail, Context as _, Result};

/// The agent's metrics endpoint, on the agent namespace's loopback.
const LISTEN: &str = "127.0.0.1:9464";

/// One topology at a time: they are heavy for this machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn metrics_config() -> serde_json::Value {
    serde_json::json!({"metrics": {"listen": LISTEN}})
}

/// `GET /metrics` from inside `ns`; returns how long the answer took and its body.
fn scrape(ns: &Netns, timeout: Duration) -> Result<(Duration, String)> {
    ns.in_ns(move || {
        let started = Instant::now();
        let addr: SocketAddr = LISTEN.parse()?;
        let mut c = TcpStream::connect_timeout(&addr, timeout).context("connecting")?;
        c.set_read_timeout(Some(timeout))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).context("reading the answer")?;
        let took = started.elapsed();
        let answer = String::from_utf8(answer)?;
        let Some((head, body)) = answer.split_once("\r\n\r\n") else {
            bail!("no end of head in {answer:?}");
        };
        if !head.starts_with("HTTP/1.1 200") || !head.contains("text/plain; version=0.0.4") {
            bail!("unexpected head {head:?}");
        }
        Ok((took, body.to_string()))
    })
}

/// Samples by name and labels, exactly as written (`name{a="b"}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    s.get(key).copied().unwrap_or(0.0)
}

fn server(metric: &str, service: &str, server: &str) -> String {
    format!("anycast_server_{metric}_total{{service=\"{service}\",server=\"{server}\"}}")
}

fn service(metric: &str, service: &str) -> String {
    format!("anycast_service_{metric}_total{{service=\"{service}\"}}")
}

/// `promtool check metrics` says nothing about `text`.
fn promtool(text: &str) -> Result<()> {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (Debian prometheus; cargo xtask setup installs it)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("promtool: {}: {said}", out.status);
    }
    Ok(())
}

#[test]
fn metrics_match_the_traffic_sent() -> Result<()> {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::build("acmte", 1, 3, ServerMode::Static)?;
    topo.config_extra = metrics_config();
    topo.start_agent(3)?;
    let mut before = BTreeMap::new();
    wait_until("the first snapshot", Duration::from_secs(10), || {
        before = samples(&scrape(&topo.agent, Duration::from_secs(2))?.1);
        Ok(before.contains_key(&service("packets", "web4")))
    })?;

    // 60 HTTP connections, each a new flow; 40 UDP questions, one datagram each.
    const CONNECTIONS: usize = 60;
    const QUESTIONS: usize = 40;
    let answered = topo.clients[0].in_ns(|| {
        let mut by_server: BTreeMap<String, u64> = BTreeMap::new();
        for _ in 0..CONNECTIONS {
            *by_server
                .entry(http_get(Topology::anycast(false, HTTP_PORT))?)
                .or_default() += 1;
        }
        for _ in 0..QUESTIONS {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            sock.send_to(b"who\n", Topology::anycast(false, UDP_PORT))?;
            let mut buf = [0u8; 256];
            sock.recv_from(&mut buf).context("a UDP answer")?;
        }
        Ok(by_server)
    })?;
    println!("HTTP answers by server: {answered:?}");

    // The snapshot is published once a second: wait until it shows all of it.
    let delta = |after: &BTreeMap<String, f64>, key: &str| get(after, key) - get(&before, key);
    let mut after = BTreeMap::new();
    let mut text = String::new();
    wait_until(
        "the traffic in the metrics",
        Duration::from_secs(10),
        || {
            text = scrape(&topo.agent, Duration::from_secs(2))?.1;
            after = samples(&text);
            Ok(
                delta(&after, &service("new_flows", "web4")) >= CONNECTIONS as f64
                    && delta(&after, &service("packets", "udp4")) >= QUESTIONS as f64,
            )
        },
    )?;

    // Each connection is one new flow of its server, each question one packet and flow.
    for s in ["s1", "s2", "s3"] {
        let n = answered.get(s).copied().unwrap_or(0) as f64;
        assert_eq!(
            delta(&after, &server("new_flows", "web4", s)),
            n,
            "{s}: new flows"
        );
        let syns = delta(&after, &server("syns", "web4", s));
        assert!(syns >= n, "{s}: {syns} SYNs for {n} connections");
        // SYN, ACK, request, FIN and the last ACK at least.
        let packets = delta(&after, &server("packets", "web4", s));
        assert!(
            packets >= 5.0 * n,
            "{s}: {packets} packets for {n} connections"
        );
        let bytes = delta(&after, &server("bytes", "web4", s));
        assert!(
            bytes >= 54.0 * packets,
            "{s}: {bytes} bytes for {packets} packets"
        );
    }
    assert_eq!(
        delta(&after, &service("new_flows", "web4")),
        CONNECTIONS as f64
    );
    assert_eq!(delta(&after, &service("packets", "udp4")), QUESTIONS as f64);
    assert_eq!(
        delta(&after, &service("new_flows", "udp4")),
        QUESTIONS as f64
    );
    // Ethernet 14 + IPv4 20 + UDP 8 + "who\n" 4.
    assert_eq!(
        delta(&after, &service("bytes", "udp4")),
        46.0 * QUESTIONS as f64
    );
    // What was forwarded is what the verdicts say was sent on.
    let forwarded: f64 = ["web4", "web6", "udp4", "udp6"]
        .iter()
        .map(|s| delta(&after, &service("packets", s)))
        .sum();
    let sent_on: f64 = ["redirect", "tx", "pass_no_neigh"]
        .iter()
        .map(|r| delta(&after, &format!("anycast_verdicts_total{{reason=\"{r}\"}}")))
        .sum();
    assert_eq!(forwarded, sent_on, "forwarded packets and their verdicts");
    assert_eq!(
        get(&after, "anycast_server_up{service=\"web4\",server=\"s1\"}"),
        1.0
    );
    assert!(get(&after, "anycast_flow_table_capacity") > 0.0);

    // Nothing moves now: the metrics equal `status` (the same counters).
    wait_until("metrics equal to status", Duration::from_secs(10), || {
        let status = topo.status()?;
        let m = samples(&scrape(&topo.agent, Duration::from_secs(2))?.1);
        let mut equal = true;
        for svc in status["services"].as_array().context("services")? {
            let name = svc["name"].as_str().context("name")?;
            for srv in svc["servers"].as_array().context("servers")? {
                let s = srv["name"].as_str().context("server")?;
                equal &= get(&m, &server("packets", name, s))
                    == srv["packets"].as_f64().context("packets")?;
                equal &=
                    get(&m, &server("bytes", name, s)) == srv["bytes"].as_f64().context("bytes")?;
            }
        }
        Ok(equal)
    })?;
    promtool(&text)?;
    println!("{} samples; promtool: no problem", samples(&text).len());
    Ok(())
}

#[test]
fn metrics_answer_under_a_binding_update_flood() -> Result<()> {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let agent = FloodedAgent::start_with("acmtf", metrics_config())?;
    let quiet = scrape(&agent.topo.agent, Duration::from_secs(2))?;
    let before = samples(&quiet.1);
    let refused_or_dropped = |s: &BTreeMap<String, f64>| -> f64 {
        s.iter()
            .filter(|(k, _)| {
                k.starts_with("anycast_registration_messages_total")
                    && (k.contains("result=\"refused\"") || k.contains("result=\"dropped\""))
            })
            .map(|(_, v)| v)
            .sum()
    };
    // Forged updates from 1 000 spoofed sources, 8 s at the floods' pace.
    let frames = agent.kinds().swap_remove(3).frames;
    let flooder = agent.flooder.name.clone();
    let flooding = std::thread::spawn(move || {
        let ns = Netns { name: flooder };
        let sent = flood(&ns, "eth0", frames, PACE, Duration::from_secs(8));
        std::mem::forget(ns); // the flooded agent owns it
        sent
    });
    let mut took = Vec::new();
    let mut ages = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        let (t, text) = scrape(&agent.topo.agent, Duration::from_secs(2))
            .context("a scrape during the flood")?;
        took.push(t);
        ages.push(get(&samples(&text), "anycast_metrics_snapshot_age_seconds"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = flooding.join().expect("flood thread")?;
    took.sort();
    let max_age = ages.iter().copied().fold(0.0, f64::max);
    println!(
        "{} scrapes during a flood of {sent} forged updates: answered in {:?} median, {:?} max \
         (without the flood: {:?}); snapshot age at most {max_age:.2} s",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1],
        quiet.0
    );
    assert!(took.len() >= 20, "scrapes: {}", took.len());
    assert!(
        took[took.len() - 1] < Duration::from_secs(1),
        "every scrape answered within a second: {took:?}"
    );
    assert!(max_age < 3.0, "the owner kept publishing: ages {ages:?}");
    // The flood is counted in the metrics.
    let mut after = BTreeMap::new();
    wait_until("the flood counted", Duration::from_secs(10), || {
        after = samples(&scrape(&agent.topo.agent, Duration::from_secs(2))?.1);
        Ok(refused_or_dropped(&after) - refused_or_dropped(&before) >= sent as f64 * 0.99)
    })?;
    // The refresh-request probes (every 500 ms to each server) went on, as a health method.
    let probes = |result: &str| {
        let key = format!(
            "anycast_health_checks_total{{method=\"refresh_request\",result=\"{result}\"}}"
        );
        get(&after, &key) - get(&before, &key)
    };
    println!(
        "refresh-request probes during the flood: {} answered, {} missed",
        probes("success"),
        probes("failure")
    );
    assert!(
        probes("success") >= 10.0,
        "probes answered: {}",
        probes("success")
    );
    assert_eq!(
        get(
            &after,
            "anycast_bindings{state=\"active\",condition=\"up\"}"
        ),
        agent.states.len() as f64,
        "every binding active and up: {:?}",
        agent.states
    );
    Ok(())
}

/// Kills the test's tmux server (its own socket name) however the test ends.
struct Tmux;

impl Tmux {
    fn run(args: &[&str]) -> Result<String> {
        let mut all = vec!["-L", "acmt"];
        all.extend_from_slice(args);
        let out = std::process::Command::new("tmux").args(&all).output()?;
        if !out.status.success() {
            bail!("tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Tmux::run(&["kill-server"]);
    }
}

/// The rate columns of the service row `name` on a screen: packets/s, bytes/s, flows/s, SYNs/s.
fn row_rates(screen: &str, name: &str) -> Option<Vec<String>> {
    let line = screen
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    Some(
        words[words.len() - 4..]
            .iter()
            .map(|w| w.to_string())
            .collect(),
    )
}

#[test]
fn top_shows_moving_rates_and_quits_on_q() -> Result<()> {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::build("acmtt", 1, 2, ServerMode::Static)?;
    topo.start_agent(2)?;
    let _load = Load::start(&topo.clients[0].name, Duration::from_millis(10));
    let ctl = workspace_bin("anycast-ctl")?;
    let socket = topo.socket.to_string_lossy().into_owned();

    // Piped: plain blocks, no escape sequences; the second block has rates.
    let out = std::process::Command::new(&ctl)
        .args([
            "top",
            "--count",
            "2",
            "--interval-ms",
            "500",
            "--socket",
            &socket,
        ])
        .output()?;
    let plain = String::from_utf8(out.stdout)?;
    assert!(out.status.success(), "{plain}");
    assert!(!plain.contains('\x1b'), "escape sequences in {plain:?}");
    let blocks: Vec<&str> = plain.split("anycast-ctl top: ").skip(1).collect();
    assert_eq!(blocks.len(), 2, "{plain}");
    assert!(blocks[0].contains("(after the next refresh)"), "{plain}");
    let rates = row_rates(blocks[1], "web4").context("web4 row")?;
    assert_ne!(rates[0], "-", "{plain}");
    assert!(blocks[1].contains("verdicts/s: "), "{plain}");
    println!("plain:\n{}", blocks[1]);

    // In a terminal: full screen, refreshed every second, `q` quits with status 0.
    let exit = topo.dir.join("top.exit");
    let _ = std::fs::remove_file(&exit);
    let tmux = Tmux;
    Tmux::run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "40",
        &format!(
            "{} top --socket {socket}; echo $? > {}; sleep 60",
            ctl.display(),
            exit.display()
        ),
    ])?;
    let mut seen: Vec<Vec<String>> = Vec::new();
    let mut screen = String::new();
    wait_until("top's rates moving", Duration::from_secs(20), || {
        screen = Tmux::run(&["capture-pane", "-p", "-t", "top"])?;
        if let Some(r) = row_rates(&screen, "web4").filter(|r| r[0] != "-" && r[0] != "0") {
            if !seen.contains(&r) {
                seen.push(r);
            }
        }
        Ok(seen.len() >= 2)
    })
    .with_context(|| format!("last screen:\n{screen}"))?;
    println!("screen:\n{screen}\nweb4 rates seen: {seen:?}");
    assert!(screen.contains("(q quits)"), "{screen}");
    assert!(screen.contains("  s1"), "{screen}");
    assert!(screen.contains("redirect"), "{screen}");
    Tmux::run(&["send-keys", "-t", "top", "q"])?;
    wait_until("top to exit", Duration::from_secs(5), || Ok(exit.exists()))?;
    // Written by the shell after top returned.
    wait_until("its status", Duration::from_secs(2), || {
        Ok(std::fs::read_to_string(&exit)?.trim() == "0")
    })?;
    drop(tmux);
    Ok(())
}
