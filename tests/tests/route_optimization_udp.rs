//! Route optimization for a UDP service, end to end, in network namespaces (`acud*`): two
//! servers registered with the agent, holding certificates, serving UDP on the anycast
//! addresses (given whole: the binding is for udp/5353), and a client running `anycast-ctl
//! client`:
//!
//! 0. a flood of UDP questions from 2000 spoofed sources (200 addresses of the clients' link,
//!    10 ports each, one datagram each) reaches both servers through the agent: nobody is
//!    sent a binding for them (a flow must last the refresh interval), checked in the
//!    servers' logs at the end;
//! 1. a connected UDP socket asks its first question through the agent (server X answers);
//!    a second connected socket, opened then too, is given by the agent to the other server
//!    Y (sockets are opened until one is);
//! 2. the first socket keeps asking: its flow lasts the decapsulator's refresh interval, X's
//!    daemon finds it in `SERVER_UDP_FLOWS` and sends a binding naming it; the client takes
//!    it, and the same socket's later questions go to X directly (the agent's counter for X
//!    stops, the client's `tunnelled` rises), every question answered by X within the
//!    retries allowed;
//! 3. the second socket keeps its server: its questions go through the agent to Y (its
//!    flow was running before the binding, so the client's daemon kept it on the agent's
//!    path), and Y's own binding, sent when that flow lasts, is refused (`other_server_bound`);
//! 4. a new socket goes to X directly from its first datagram (the agent sees nothing).
//!
//! Runs as root.
use std::{
    net::UdpSocket,
    path::Path,
    time::{Duration, Instant},
};

use anycast_tests::{
    netns::Netns,
    packet::{udp, Ip},
    route_opt,
    topology::{ServerMode, Topology, UDP_PORT},
    wait_until,
};
use anyhow::{anyhow, bail, Result};

const SERVICE: &str = "10.71.100.1 udp/5353";
/// The spoofed sources: 10.71.1.128 to 10.71.1.227 (nobody's), 20 ports each.
const SPOOFED: u32 = 2000;

/// One UDP question from each spoofed source, sent with a raw socket in the client's
/// namespace (the kernel routes it; the source is ours to write), paced at 100 per 20 ms.
fn spoofed_flood(ns: &Netns) -> Result<()> {
    ns.in_ns(|| {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if raw < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let anycast = Topology::anycast(false, UDP_PORT);
        // SAFETY: all-zero is a valid sockaddr_in; the fields are set below.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        if let std::net::IpAddr::V4(a) = anycast.ip() {
            to.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
        }
        for i in 0..SPOOFED {
            let src = std::net::Ipv4Addr::new(10, 71, 1, 128 + (i % 100) as u8);
            let mut datagram = udp(20_000 + (i / 100) as u16, UDP_PORT, b"who\n");
            // No checksum (IPv4 allows it): a valid datagram, as a flood's would be.
            datagram[6] = 0;
            datagram[7] = 0;
            let packet = Ip::new(src.into(), anycast.ip(), 17).packet(&datagram);
            // SAFETY: a valid buffer and sockaddr_in of the right sizes.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr() as *const libc::c_void,
                    packet.len(),
                    0,
                    &to as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if n < 0 {
                bail!(
                    "sending a spoofed datagram: {}",
                    std::io::Error::last_os_error()
                );
            }
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    })
}
/// Tries per question (each waits `ANSWER_WAIT` for the answer).
const TRIES: u32 = 3;
const ANSWER_WAIT: Duration = Duration::from_millis(300);

/// A connected UDP socket to the IPv4 anycast address's UDP service, made in the client's
/// namespace; each question is retried at most `TRIES` times.
struct Asker {
    sock: UdpSocket,
    /// Questions sent again (their first datagram or answer lost).
    retries: u32,
}

impl Asker {
    fn open(ns: &Netns) -> Result<Asker> {
        let sock = ns.in_ns(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(Topology::anycast(false, UDP_PORT))?;
            s.set_read_timeout(Some(ANSWER_WAIT))?;
            Ok(s)
        })?;
        Ok(Asker { sock, retries: 0 })
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().map_or(0, |a| a.port())
    }

    /// One question: the name of the server that answered.
    fn ask(&mut self) -> Result<String> {
        let mut buf = [0u8; 512];
        for attempt in 0..TRIES {
            if attempt > 0 {
                self.retries += 1;
            }
            self.sock.send(b"who\n")?;
            if let Ok(n) = self.sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                return text
                    .trim()
                    .strip_prefix("server=")
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("bad UDP answer {text:?}"));
            }
        }
        bail!("no answer on port {} after {TRIES} tries", self.port())
    }
}

fn status(dir: &Path) -> Result<serde_json::Value> {
    route_opt::client_status(dir, 1)
}

fn bound_to(dir: &Path) -> Result<Option<String>> {
    Ok(status(dir)?["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["service"] == SERVICE)
        .and_then(|b| b["server"].as_str().map(str::to_string)))
}

fn counter(dir: &Path, name: &str) -> Result<u64> {
    Ok(status(dir)?["counters"][name].as_u64().unwrap_or(0))
}

fn tunnelled(dir: &Path) -> Result<u64> {
    let s = status(dir)?;
    Ok(s["tunnel"]["tunnelled"].as_u64().unwrap_or(0)
        + s["tunnel"]["tunnelled_resolving"].as_u64().unwrap_or(0))
}

#[test]
fn a_udp_client_is_bound_and_only_its_new_and_named_flows_go_direct() -> Result<()> {
    let started = Instant::now();
    let mut topo = Topology::build("acud", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 2)?;
    topo.server_args = route_opt::server_args(&dir, 12);
    topo.start_agent(0)?;
    for i in 0..2 {
        topo.start_server(i)?;
    }
    wait_until("two servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 2)
    })?;
    let _daemon = route_opt::start_client(&topo.clients[0], &dir, 1, &[])?;
    let ns = &topo.clients[0];

    // 0. The spoofed flood: it reaches the servers through the agent.
    let flood0 = route_opt::agent_packets(&topo, None)?;
    spoofed_flood(ns)?;
    wait_until(
        "the flood through the agent",
        Duration::from_secs(5),
        || Ok(route_opt::agent_packets(&topo, None)? >= flood0 + u64::from(SPOOFED) * 9 / 10),
    )?;
    println!(
        "spoofed flood: the agent forwarded {} of {SPOOFED} datagrams",
        route_opt::agent_packets(&topo, None)? - flood0
    );

    // 1. The first question through the agent; a second socket the agent gives the other
    // server (each socket's flow is hashed on its own).
    let opened = Instant::now();
    let mut first = Asker::open(ns)?;
    let x = first.ask()?;
    let mut other = None;
    for _ in 0..32 {
        let mut s = Asker::open(ns)?;
        if s.ask()? != x {
            other = Some(s);
            break;
        }
    }
    let mut other = other.ok_or_else(|| anyhow!("32 sockets, all given to {x}"))?;
    let y = other.ask()?;
    assert_ne!(x, y);
    assert_eq!(bound_to(&dir)?, None, "no binding after one question each");
    println!(
        "socket {} -> {x}, socket {} -> {y}",
        first.port(),
        other.port()
    );

    // 2. The first socket keeps asking: bound to X, then direct.
    let mut asks = 1;
    wait_until("the client bound to X", Duration::from_secs(10), || {
        assert_eq!(first.ask()?, x, "the first socket keeps its server");
        asks += 1;
        std::thread::sleep(Duration::from_millis(100));
        Ok(bound_to(&dir)?.is_some())
    })?;
    println!(
        "bound to {:?} {:?} after the first question ({asks} questions on the socket)",
        bound_to(&dir)?,
        opened.elapsed()
    );
    assert_eq!(bound_to(&dir)?, Some(x.clone()));
    let (agent0, tunnel0) = (route_opt::agent_packets(&topo, Some(&x))?, tunnelled(&dir)?);
    for _ in 0..20 {
        assert_eq!(first.ask()?, x, "the same socket, the same server");
    }
    let agent1 = route_opt::agent_packets(&topo, Some(&x))?;
    let tunnel1 = tunnelled(&dir)?;
    println!(
        "20 questions on the bound socket: the agent forwarded {} packets to {x}, the client \
         tunnelled {}; retries {}",
        agent1 - agent0,
        tunnel1 - tunnel0,
        first.retries
    );
    assert_eq!(
        agent1, agent0,
        "the agent lets go of the bound socket's flow"
    );
    assert!(tunnel1 >= tunnel0 + 20, "{tunnel0} -> {tunnel1}");

    // 3. The socket the agent gave Y keeps Y, through the agent; Y's binding (its flow now
    // lasts) is refused while X's is held.
    let agent_y0 = route_opt::agent_packets(&topo, Some(&y))?;
    let tunnel2 = tunnelled(&dir)?;
    let mut y_asks = 0;
    wait_until("Y's binding refused", Duration::from_secs(10), || {
        assert_eq!(other.ask()?, y, "the older socket keeps its server");
        y_asks += 1;
        std::thread::sleep(Duration::from_millis(100));
        Ok(y_asks >= 10 && counter(&dir, "refused_other_server_bound")? >= 1)
    })?;
    let agent_y1 = route_opt::agent_packets(&topo, Some(&y))?;
    println!(
        "{y_asks} questions on the older socket: the agent forwarded {} packets to {y}; \
         retries {}",
        agent_y1 - agent_y0,
        other.retries
    );
    assert!(
        agent_y1 >= agent_y0 + y_asks,
        "the older socket's questions go through the agent: {agent_y0} -> {agent_y1}"
    );
    assert_eq!(tunnelled(&dir)?, tunnel2, "none of them tunnelled");
    assert_eq!(bound_to(&dir)?, Some(x.clone()), "X's binding stays");

    // 4. A new socket: direct from its first datagram.
    let all0 = route_opt::agent_packets(&topo, None)?;
    let mut fresh = Asker::open(ns)?;
    for _ in 0..5 {
        assert_eq!(fresh.ask()?, x, "a new socket goes to the bound server");
    }
    assert_eq!(
        route_opt::agent_packets(&topo, None)?,
        all0,
        "the agent saw none of the new socket's datagrams"
    );
    // The spoofed sources were sent no binding (the servers log each first binding).
    let mut logs = String::new();
    for s in &mut topo.servers {
        if let Some(p) = s.decap.as_mut() {
            logs.push_str(&p.output());
        }
    }
    assert!(
        logs.contains(&format!("17/{UDP_PORT} -> client 10.71.1.11")),
        "the real client's binding is logged:\n{logs}"
    );
    let spoofed_bound: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("-> client 10.71.1.") && !l.contains("-> client 10.71.1.11"))
        .collect();
    assert!(
        spoofed_bound.is_empty(),
        "spoofed sources bound: {spoofed_bound:?}"
    );

    // No question lost beyond the retries: each answered within TRIES tries, and few
    // needed a second.
    let retries = first.retries + other.retries + fresh.retries;
    println!(
        "retries over all questions: {retries}; took {:?}",
        started.elapsed()
    );
    assert!(retries <= 3, "{retries} questions needed a retry");
    Ok(())
}
