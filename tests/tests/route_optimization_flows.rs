//! Route optimization moves only the connections a binding covers, end to end, in network
//! namespaces (`acrf*`): a client holds connections to one anycast service that the agent
//! spread over both servers, before its daemon runs. Then its daemon takes one server's
//! binding. The connections of that server (named in its binding) go direct; the
//! connections the agent gave the other server stay on the agent's path and keep their
//! server (were they moved, that server would answer them with a reset); new connections
//! go direct from their first packet. Every request on every connection is answered by
//! the server it began with. The agent lets go of the bound connections: their flow
//! entries idle out (claim 18) while the other server's stay.
//!
//! Runs as root.
use std::time::{Duration, Instant};

use anycast_tests::{
    route_opt::{self, agent_packets},
    topology::{http_get, Held, ServerMode, Topology, HTTP_PORT},
};

fn counter(status: &serde_json::Value, group: &str, name: &str) -> u64 {
    status[group][name].as_u64().unwrap_or(0)
}

/// Every held connection asked once: each must answer with the server it began with.
fn ask_all(held: &mut [Held]) -> anyhow::Result<()> {
    for h in held.iter_mut() {
        let answer = h
            .ask()
            .map_err(|e| anyhow::anyhow!("the connection to {} failed: {e:#}", h.server))?;
        assert_eq!(answer, h.server, "a connection changed server");
    }
    Ok(())
}

#[test]
fn a_binding_moves_its_servers_connections_and_leaves_the_others_on_the_agent() -> anyhow::Result<()>
{
    let mut topo = Topology::build("acrf", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 2)?;
    topo.server_args = route_opt::server_args(&dir, 12);
    // A short idle time, so the agent's letting go of the bound connections is seen.
    topo.config_extra =
        serde_json::json!({"flow_timeouts": {"tcp_idle": 3, "udp_idle": 30, "tcp_closing": 10}});
    route_opt::start_agent_and_servers(&mut topo, 2)?;

    // Connections opened before the client's daemon runs: through the agent, which spreads
    // them by source port; until both servers hold some (at most 40).
    let mut held: Vec<Held> = Vec::new();
    for _ in 0..40 {
        held.push(topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT)))?);
        let on = |s: &str| held.iter().filter(|h| h.server == s).count();
        if held.len() >= 6 && on("s1") >= 2 && on("s2") >= 2 {
            break;
        }
    }
    let on = |held: &[Held], s: &str| held.iter().filter(|h| h.server == s).count();
    assert!(
        on(&held, "s1") >= 1 && on(&held, "s2") >= 1,
        "the agent gave connections to both servers"
    );

    // The daemon starts; the servers' bindings sent so far were lost (no daemon). Their next
    // refresh (a third of 12 s) binds the client to one of them; the other is refused.
    let mut daemon = route_opt::start_client(&topo.clients[0], &dir, 1, &[])?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    let bound = loop {
        // Asked outside any retry: a failed request fails the test.
        ask_all(&mut held)?;
        let s = route_opt::client_status(&dir, 1)?;
        let server = route_opt::binding_field(&s, "10.71.100.1 tcp/80", "server");
        if let Some(server) = server {
            break server;
        }
        assert!(Instant::now() < deadline, "no binding taken: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let other = if bound == "s1" { "s2" } else { "s1" };
    println!(
        "bound to {bound} {:?} after the daemon started; {} connections on {bound}, {} on {other}",
        started.elapsed(),
        on(&held, &bound),
        on(&held, other)
    );

    // Every connection keeps its server; the bound server's go direct (the agent forwards
    // none of their packets), the other server's go through the agent.
    // The binding names the connections: wait until the client wrote them (its tunnel
    // counts a packet of a named connection as tunnelled).
    let (to_bound0, to_other0) = (
        agent_packets(&topo, Some(&bound))?,
        agent_packets(&topo, Some(other))?,
    );
    let s0 = route_opt::client_status(&dir, 1)?;
    const ROUNDS: usize = 10;
    for _ in 0..ROUNDS {
        ask_all(&mut held)?;
    }
    let s1 = route_opt::client_status(&dir, 1)?;
    let (to_bound1, to_other1) = (
        agent_packets(&topo, Some(&bound))?,
        agent_packets(&topo, Some(other))?,
    );
    let tunnelled = route_opt::tunnelled(&s1) - route_opt::tunnelled(&s0);
    let kept =
        counter(&s1, "tunnel", "pass_opened_before") - counter(&s0, "tunnel", "pass_opened_before");
    println!(
        "{ROUNDS} rounds: the agent forwarded {} packets to {bound} and {} to {other}; the client \
         tunnelled {tunnelled} and left {kept} on the agent's path",
        to_bound1 - to_bound0,
        to_other1 - to_other0
    );
    assert_eq!(
        to_bound1, to_bound0,
        "the bound server's connections go direct"
    );
    assert!(
        to_other1 - to_other0 >= (ROUNDS * on(&held, other)) as u64,
        "the other server's connections stay on the agent's path"
    );
    assert!(
        tunnelled >= (ROUNDS * on(&held, &bound)) as u64,
        "the tunnel carried the bound server's connections"
    );
    assert!(
        kept >= (ROUNDS * on(&held, other)) as u64,
        "counted as open before the binding"
    );

    // The agent lets go (claim 18): the bound server's connections no longer refresh their
    // flow entries, which idle out and are swept; the other server's stay (their packets
    // still pass). The connections keep talking meanwhile.
    let live_entries = || -> anyhow::Result<std::collections::BTreeSet<u16>> {
        let flows: serde_json::Value = serde_json::from_str(&topo.ctl(&["flows", "--json"])?)?;
        Ok(flows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["address"] == "10.71.100.1" && f["expired"] != true)
            .filter_map(|f| f["client_port"].as_u64().map(|p| p as u16))
            .collect())
    };
    let ports_on = |held: &[Held], s: &str| -> Vec<u16> {
        held.iter()
            .filter(|h| h.server == s)
            .map(Held::local_port)
            .collect()
    };
    let let_go = Instant::now();
    loop {
        ask_all(&mut held)?;
        let live = live_entries()?;
        if ports_on(&held, &bound).iter().all(|p| !live.contains(p)) {
            assert!(
                ports_on(&held, other).iter().all(|p| live.contains(p)),
                "the other server's connections keep their entries: {live:?}"
            );
            break;
        }
        assert!(
            let_go.elapsed() < Duration::from_secs(15),
            "the bound connections' entries never idled out: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "the agent's entries of the {} connections on {bound} idled out within {:?} (tcp_idle \
         3 s); the {} on {other} kept theirs",
        on(&held, &bound),
        let_go.elapsed(),
        on(&held, other)
    );

    // New connections go direct from their first packet, to the bound server.
    let all0 = agent_packets(&topo, None)?;
    let answers = topo.clients[0].in_ns(|| {
        (0..5)
            .map(|_| http_get(Topology::anycast(false, HTTP_PORT)))
            .collect::<anyhow::Result<Vec<String>>>()
    })?;
    assert!(answers.iter().all(|a| *a == bound), "{answers:?}");
    assert_eq!(agent_packets(&topo, None)?, all0, "new connections: direct");
    // And the old ones still answer, each from its own server.
    ask_all(&mut held)?;
    for h in held {
        h.reset();
    }
    // The bound server's decapsulator took every packet sent to it, through the agent or
    // straight from the client (both IP-in-IP): it counts at least their sum.
    let s = route_opt::client_status(&dir, 1)?;
    let direct = route_opt::tunnelled(&s);
    let via_agent = agent_packets(&topo, Some(&bound))?;
    daemon.stop_with(libc::SIGTERM, Duration::from_secs(5))?;
    let idx = if bound == "s1" { 0 } else { 1 };
    let server = topo.servers[idx].decap.as_mut().expect("started");
    let pid = server.pid().expect("running");
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    server.wait_exit(Duration::from_secs(35))?;
    let out = server.output();
    // Its exit line: "...: stopping (decapsulated=N pass_not_tunnel=...".
    let decapsulated: u64 = out
        .split("(decapsulated=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no decapsulated count in the server's log: {out}"))?;
    println!(
        "{bound} decapsulated {decapsulated} packets: {via_agent} forwarded by the agent, \
         {direct} sent straight by the client"
    );
    assert!(
        decapsulated >= via_agent + direct,
        "the server received the client's direct packets"
    );
    Ok(())
}
