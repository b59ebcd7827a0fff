//! `cargo xtask demo -- --agents N`: N agents behind a router running BIRD (ECMP over the
//! agents, BGP and BFD to each), three servers that register with agent 1 only (agent 1
//! relays their bindings to the others), two clients. Prints where the clients' connections
//! went (agent and server), then kills one agent's controller under load and shows that
//! no connection failed and every long-lived connection kept its server.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anycast_tests::{
    agreement::agreed,
    load::Load,
    restart::Probes,
    routed::{Options, Registering, Routed, A4, A6, B4, UDP_PORT},
    topology::{Held, HTTP_PORT},
    wait_until,
};
use anyhow::Result;

/// Connections per client for the spread.
const SPREAD: usize = 60;

pub fn run(agents: usize, hold: bool, stopped: fn() -> bool, wait_for_stop: fn()) -> Result<()> {
    println!(
        "== building the multi-agent topology (namespaces acdm*: a router running BIRD with \
         ECMP, {agents} agents each with BIRD and anycast-ctl agent, 3 servers, 2 clients)"
    );
    let mut t = Routed::build_with(
        "acdm",
        Options {
            agents,
            servers: 3,
            clients: 2,
            registering: Some(Registering::default()),
        },
    )?;
    for k in 0..agents {
        t.write_config(k, serde_json::json!({}))?;
        t.start_agent(k)?;
    }
    println!(
        "== {agents} agents running, no server configured; the servers register with agent 1 \
         only, which relays every binding to its peers"
    );
    for i in 0..3 {
        t.start_server(i)?;
    }
    wait_until(
        "every agent holding every binding",
        Duration::from_secs(30),
        || {
            for k in 0..agents {
                if agreed(&t.bindings(k)?).len() != 14 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let ports: Vec<String> = (1..=agents).map(|k| format!("ra{k}")).collect();
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    for a in [A4.into(), A6.into(), B4.into()] {
        // BGP sessions come up in a few seconds.
        t.wait_next_hops(a, &ports, Duration::from_secs(60))?;
    }
    println!(
        "\n== agent {agents}'s bindings (relayed by a1):\n{}",
        t.ctl(agents - 1, &["bindings"])?
    );
    println!(
        "== the router's route to {A4} (one next hop per agent):\n{}",
        t.router.ip(&["route", "show", &A4.to_string()])?
    );
    if stopped() {
        return Ok(());
    }

    // Where the connections go: each client connects SPREAD times; the router's FIB says
    // which agent each connection's port went through, the answer which server.
    let dst = SocketAddr::new(A4.into(), HTTP_PORT);
    let mut spread = BTreeMap::<(String, String), usize>::new();
    for c in 0..t.clients.len() {
        for _ in 0..SPREAD {
            let h = t.clients[c].in_ns(move || Held::open(dst))?;
            let agent = t.agent_of(c, h.local_port(), dst)?;
            *spread.entry((agent, h.server.clone())).or_default() += 1;
        }
    }
    let total = 2 * SPREAD;
    println!("== {total} connections to {dst} from two clients, by agent and server:");
    println!("   agent   s1   s2   s3   all");
    for k in 1..=agents {
        let agent = format!("ra{k}");
        let of = |s: &str| spread.get(&(agent.clone(), s.to_string())).copied();
        let row: Vec<usize> = ["s1", "s2", "s3"]
            .iter()
            .map(|s| of(s).unwrap_or(0))
            .collect();
        println!(
            "   a{k}    {:>4} {:>4} {:>4}  {:>4} ({:.0}%)",
            row[0],
            row[1],
            row[2],
            row.iter().sum::<usize>(),
            100.0 * row.iter().sum::<usize>() as f64 / total as f64
        );
    }

    // One agent dies under load: new connections every 10 ms from each client, a UDP
    // question every 5 ms and long-lived connections asked every 20 ms.
    let held: Vec<Held> = (0..6)
        .map(|i| t.clients[i % 2].in_ns(move || Held::open(dst)))
        .collect::<Result<_>>()?;
    let servers: Vec<String> = held.iter().map(|h| h.server.clone()).collect();
    let probes = Probes::start_with(
        &t.clients[0].name,
        Some(SocketAddr::new(A4.into(), UDP_PORT)),
        held,
    );
    let loads: Vec<Load> = t
        .clients
        .iter()
        .map(|c| Load::start_to(&c.name, dst, Duration::from_millis(10)))
        .collect();
    wait_until("connections flowing", Duration::from_secs(10), || {
        Ok(loads.iter().all(|l| l.log.lock().unwrap().len() >= 20))
    })?;
    let victim = agents - 1;
    let monitor = t.monitor()?;
    println!(
        "\n== killing agent {}'s controller (SIGKILL) under load; 6 long-lived connections \
         to {servers:?}",
        victim + 1
    );
    let killed = Instant::now();
    t.stop_agent(victim, libc::SIGKILL)?;
    let withdrawn = monitor.first_event(A4.into(), killed, Duration::from_secs(5))?;
    let left: Vec<&str> = ports[..victim].to_vec();
    t.wait_next_hops(A4.into(), &left, Duration::from_secs(5))?;
    println!(
        "   the router withdrew its route {:.1} ms after the kill: now {}",
        (withdrawn - killed).as_secs_f64() * 1e3,
        t.router
            .ip(&["route", "show", &A4.to_string()])?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    let after = Instant::now();
    wait_until(
        "two seconds of traffic after",
        Duration::from_secs(10),
        || Ok(loads.iter().all(|l| l.since(after).len() >= 100)),
    )?;
    let to = Instant::now();
    let mut made = Vec::new();
    for l in &loads {
        made.extend(l.between(killed, to)?);
    }
    let tally = probes.between(killed, to)?;
    println!(
        "   since the kill: {} new connections, {} failed; {} asks on the long-lived \
         connections, {} not answered by their own server; {} UDP questions, {} lost",
        made.len(),
        made.iter().filter(|r| r.is_err()).count(),
        tally.asked,
        tally.held_errors.len(),
        tally.udp_sent,
        tally.udp_lost
    );
    drop(loads);
    drop(probes);
    println!("\n== agent 1's status\n{}", t.ctl(0, &["status"])?);
    if hold && !stopped() {
        println!(
            "== holding; namespaces acdmr (router), acdma1..{agents}, acdms1..3, acdmc, acdmc2. \
             Try: ip netns exec acdmc curl http://{A4}/ ; ip netns exec acdmr ip route. \
             Ctrl-C to stop."
        );
        wait_for_stop();
    }
    println!("== tearing down");
    Ok(())
}
