//! Route optimization with a multi-homed server, end to end in network namespaces (`acmh*`;
//! the patent's claims 5 and 10 for client bindings): server s1 has a second link (eth1,
//! 10.71.3.11 and fd71:3::11; its certificate covers both links' addresses) and routes that
//! fail over between its links; a client running `anycast-ctl client` is bound to s1's first
//! real addresses (10.71.2.11, fd71:2::11) and holds an IPv4 and an IPv6 connection.
//!
//! 1. s1's first link goes down (its eth0 set down): s1 sends the client new bindings to
//!    its second link's addresses at once (a fraction of a second, not the next refresh),
//!    from those addresses, and logs the move; the client's status shows them, its tunnel
//!    carries the held connections there (s1's eth1 receives them), every request on them
//!    is answered, and new connections work, none through the agent;
//! 2. the first link comes back: the bindings stay on the second (no move back);
//! 3. the second link loses its carrier (its far end set down, a cut cable): the bindings
//!    move back to the first link's addresses; the IPv4 connection answers throughout and
//!    new connections work over both families;
//! 4. stopping s1: its exit line counts the moves, two per family.
//!
//! Runs as root.
use std::time::{Duration, Instant};

use anyhow::Context as _;

use anycast_tests::{
    route_opt::{self, agent_packets},
    topology::{http_get, Held, ServerMode, Topology, HTTP_PORT},
    wait_until,
};

const V4_SERVICE: &str = "10.71.100.1 tcp/80";
const V6_SERVICE: &str = "fd71:100::1 tcp/80";

/// The client daemon's status file.
struct Status(std::path::PathBuf);

impl Status {
    fn read(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(&self.0)?)?)
    }

    /// The real address the binding for `service` points at, if there is one.
    fn real(&self, service: &str) -> anyhow::Result<Option<String>> {
        Ok(route_opt::binding_field(&self.read()?, service, "real"))
    }

    fn counter(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.read()?["counters"][name].as_u64().unwrap_or(0))
    }

    fn tunnelled(&self) -> anyhow::Result<u64> {
        Ok(route_opt::tunnelled(&self.read()?))
    }
}

/// Asks on each held connection in turn (each must answer s1: a failed request fails the
/// test, where `wait_until` would retry it) until `done`; fails after `within`. Returns the
/// rounds of requests made and the slowest request.
fn talk_until(
    what: &str,
    held: &mut [&mut Held],
    within: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let (mut rounds, mut slowest) = (0, Duration::ZERO);
    loop {
        for (i, h) in held.iter_mut().enumerate() {
            let t = Instant::now();
            let answer = h
                .ask()
                .with_context(|| format!("{what}: request {rounds} on connection {i}"))?;
            anyhow::ensure!(answer == "s1", "{what}: answered by {answer}");
            slowest = slowest.max(t.elapsed());
        }
        rounds += 1;
        if done()? {
            return Ok((rounds, slowest));
        }
        anyhow::ensure!(
            start.elapsed() < within,
            "{what}: not done within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the client's bindings point at `v4` and `v6`.
fn bound_at(status: &Status, v4: &str, v6: &str) -> anyhow::Result<bool> {
    Ok(status.real(V4_SERVICE)?.as_deref() == Some(v4)
        && status.real(V6_SERVICE)?.as_deref() == Some(v6))
}

/// `count` new connections of each family, each answered by s1, none through the agent.
fn new_connections(topo: &Topology, count: usize) -> anyhow::Result<()> {
    let agent0 = agent_packets(topo, None)?;
    let answers = topo.clients[0].in_ns(move || {
        (0..count)
            .flat_map(|_| [false, true])
            .map(|v6| http_get(Topology::anycast(v6, HTTP_PORT)))
            .collect::<anyhow::Result<Vec<String>>>()
    })?;
    assert!(answers.iter().all(|a| a == "s1"), "{answers:?}");
    assert_eq!(
        agent_packets(topo, None)?,
        agent0,
        "the new connections go direct, none through the agent"
    );
    Ok(())
}

#[test]
fn a_multihomed_server_moves_its_bound_clients_when_a_link_fails() -> anyhow::Result<()> {
    let mut topo = Topology::build("acmh", 1, 1, ServerMode::Registering { lifetime_secs: 60 })?;
    topo.add_second_link(0)?;
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 1)?;
    // A lifetime of 60 s: the refreshes (every 20 s) come after the bounded waits below, so
    // only a move changes the client's real address.
    topo.server_args = route_opt::server_args(&dir, 60);
    // Rare probes: the agent plays no part once the client is bound.
    topo.registration_extra = serde_json::json!({
        "probe": {"interval_ms": 10000, "timeout_ms": 200, "misses": 3},
    });
    {
        // s1's routes fail over to its second link, as a multi-homed host's must: a default
        // route through it behind the first's, routes through a link without carrier
        // ignored, and eth0's IPv6 address kept while it is down (so it can come back).
        let s1 = &topo.servers[0].ns;
        s1.ip(&[
            "route",
            "add",
            "default",
            "via",
            "10.71.3.1",
            "metric",
            "2000",
        ])?;
        s1.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd71:3::1",
            "metric",
            "2000",
        ])?;
        for family in ["ipv4", "ipv6"] {
            for dev in ["all", "eth0", "eth1"] {
                s1.sysctl(
                    &format!("net.{family}.conf.{dev}.ignore_routes_with_linkdown"),
                    "1",
                )?;
            }
        }
        s1.sysctl("net.ipv6.conf.eth0.keep_addr_on_down", "1")?;
    }
    topo.start_agent(0)?;
    topo.start_server(0)?;
    wait_until("s1 registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.contains("s1"))
    })?;
    let mut daemon = route_opt::start_client(&topo.clients[0], &dir, 1, &[])?;
    let status = Status(route_opt::status_file(&dir, 1));

    // Bound to s1's first link, over both families.
    let mut held = topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT)))?;
    let mut held6 = topo.clients[0].in_ns(|| Held::open(Topology::anycast(true, HTTP_PORT)))?;
    talk_until(
        "the client bound to s1's first link",
        &mut [&mut held, &mut held6],
        Duration::from_secs(10),
        || bound_at(&status, "10.71.2.11", "fd71:2::11"),
    )?;
    let (agent0, tunnel0) = (agent_packets(&topo, None)?, status.tunnelled()?);
    let mut rounds = 0;
    talk_until(
        "requests while bound",
        &mut [&mut held, &mut held6],
        Duration::from_secs(10),
        || {
            rounds += 1;
            Ok(rounds >= 10)
        },
    )?;
    wait_until("the tunnel's counters read", Duration::from_secs(2), || {
        Ok(status.tunnelled()? >= tunnel0 + 20)
    })?;
    assert_eq!(
        agent_packets(&topo, None)?,
        agent0,
        "bound: direct to s1, not through the agent"
    );

    // 1. s1's first link goes down.
    let cut = Instant::now();
    topo.servers[0].ns.ip(&["link", "set", "eth0", "down"])?;
    let (rounds, slowest) = talk_until(
        "the client moved to s1's second link",
        &mut [&mut held, &mut held6],
        Duration::from_secs(10),
        || bound_at(&status, "10.71.3.11", "fd71:3::11"),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}: {}", status.read().unwrap_or_default()))?;
    let took = cut.elapsed();
    let server = topo.servers[0].decap.as_mut().unwrap();
    let line = server.wait_for_line("bound clients moved to 10.71.3.11", Duration::from_secs(2))?;
    println!("s1: {line}");
    server.wait_for_line("bound clients moved to fd71:3::11", Duration::from_secs(2))?;
    println!(
        "first link down: the client's status shows the second link's addresses {took:?} \
         later; {rounds} requests on each held connection meanwhile, all answered, the \
         slowest in {slowest:?}"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "no request waited long for the move"
    );
    assert_eq!(
        status.counter("bound")?,
        4,
        "two bindings and two moves taken: {}",
        status.read()?
    );
    let refused: Vec<String> = status.read()?["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| k.starts_with("refused") && v.as_u64() > Some(0))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert!(refused.is_empty(), "nothing refused: {refused:?}");
    // The held connections now reach s1 through its second link, in the client's tunnel.
    let s1_rx = |topo: &Topology| topo.servers[0].ns.link_stat("eth1", "rx_packets");
    let (eth1_0, tunnel1) = (s1_rx(&topo)?, status.tunnelled()?);
    let mut rounds = 0;
    talk_until(
        "requests after the move",
        &mut [&mut held, &mut held6],
        Duration::from_secs(10),
        || {
            rounds += 1;
            Ok(rounds >= 20)
        },
    )?;
    wait_until("the tunnel's counters read", Duration::from_secs(2), || {
        Ok(status.tunnelled()? >= tunnel1 + 40)
    })?;
    let eth1_1 = s1_rx(&topo)?;
    println!(
        "after the move: 20 requests on each connection, s1's eth1 received {} packets, the \
         client tunnelled {}",
        eth1_1 - eth1_0,
        status.tunnelled()? - tunnel1
    );
    assert!(
        eth1_1 >= eth1_0 + 40,
        "the requests reach s1 through its second link"
    );
    new_connections(&topo, 5)?;

    // 2. The first link comes back: the bindings stay on the second.
    let s1 = &topo.servers[0].ns;
    s1.ip(&["link", "set", "eth0", "up"])?;
    wait_until("s1's eth0 up", Duration::from_secs(10), || {
        let l = s1.ip(&["-o", "link", "show", "eth0"])?;
        Ok(l.contains("LOWER_UP") && l.contains("state UP"))
    })?;
    // Its routes came down with it: back, behind the second link's.
    s1.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.71.2.1",
        "metric",
        "3000",
    ])?;
    s1.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd71:2::1",
        "metric",
        "3000",
    ])?;
    // Several of the server's polls (200 ms each) with both links up, the connections talking.
    let back = Instant::now();
    talk_until(
        "requests with both links up",
        &mut [&mut held, &mut held6],
        Duration::from_secs(10),
        || Ok(back.elapsed() >= Duration::from_secs(1)),
    )?;
    assert!(
        bound_at(&status, "10.71.3.11", "fd71:3::11")?,
        "no move back: {}",
        status.read()?
    );

    // 3. The second link loses its carrier (its far end goes down): back to the first.
    //    Linux keeps an IPv6 socket's cached route through a link that only lost its
    //    carrier (the route is not deleted, only marked linkdown), so the held IPv6
    //    connection's replies would wait for TCP's own retransmission timeouts to find the
    //    other route (seen here: a request unanswered for over 5 s, while IPv4 re-routes at
    //    once): it is closed first, and new IPv6 connections are tested instead.
    held6.reset();
    let cut = Instant::now();
    topo.net.ip(&["link", "set", "s1t", "down"])?;
    let (rounds, slowest) = talk_until(
        "the client moved back to s1's first link",
        &mut [&mut held],
        Duration::from_secs(10),
        || bound_at(&status, "10.71.2.11", "fd71:2::11"),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}: {}", status.read().unwrap_or_default()))?;
    println!(
        "second link's carrier lost: the client's status shows the first link's addresses \
         {:?} later; {rounds} requests on the IPv4 connection meanwhile, all answered, the \
         slowest in {slowest:?}",
        cut.elapsed()
    );
    assert!(slowest < Duration::from_secs(3));
    new_connections(&topo, 3)?;

    // 4. Stopping s1: the withdrawals, and the moves counted, two per family.
    let server = topo.servers[0].decap.as_mut().unwrap();
    let pid = server.pid().unwrap();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let line = server.wait_for_line("sent lifetime 0 to", Duration::from_secs(5))?;
    println!("s1: {line}");
    assert!(line.contains("real_address_moves=4"), "{line}");
    assert!(line.contains("moves_sent=4"), "{line}");
    wait_until("both bindings withdrawn", Duration::from_secs(5), || {
        Ok(status.counter("withdrawn")? >= 2)
    })?;
    held.reset();
    daemon.stop_with(libc::SIGTERM, Duration::from_secs(5))?;
    Ok(())
}
