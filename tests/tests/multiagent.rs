//! Several agents behind a BIRD router (ECMP on the 5-tuple), registering servers and the
//! binding relay together (tests/src/routed/): the servers register with one agent only and
//! every agent holds their bindings and builds the same tables; under continuous new
//! connections and long-lived ones through every agent, an agent's controller is SIGKILLed
//! (then its BIRD), another goes silent (BFD), both come back, a server leaves and then an
//! agent dies, and an agent with no server for an address withdraws it: no connection fails
//! or is reset, and every long-lived connection keeps its server wherever the router moves
//! it. Times are printed (`-- --nocapture`).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anycast_tests::{
    agreement::{agreed, of_server, tables},
    load::Load,
    restart::{tcp_counter, Probes, Tally},
    routed::{all_succeeded, Options, Registering, RouteMonitor, Routed, A4, A6, B4, UDP_PORT},
    topology::{Held, HTTP_PORT},
    wait_until,
};
use anyhow::{bail, Context as _, Result};

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn http(a: IpAddr) -> SocketAddr {
    SocketAddr::new(a, HTTP_PORT)
}

/// A long-lived connection: which client, its port, the router port (agent) it goes
/// through and the server that answers it.
#[derive(Debug, Clone)]
struct Conn {
    client: usize,
    port: u16,
    agent: String,
    server: String,
}

/// Builds the topology, starts every agent, then the servers one by one (registering with
/// agent 1 only), each server's bindings timed at agent 1 and at every other agent; waits
/// for the multipath routes and for every agent's tables to be agent 1's.
fn start(prefix: &str, agents: usize) -> Result<(Routed, RouteMonitor)> {
    let mut t = Routed::build_with(
        prefix,
        Options {
            agents,
            servers: 3,
            clients: 2,
            registering: Some(Registering::default()),
        },
    )?;
    for k in 0..agents {
        t.write_config(k, serde_json::json!({"withdraw_grace_ms": 300}))?;
    }
    let monitor = t.monitor()?;
    for k in 0..agents {
        t.start_agent(k)?;
    }
    wait_until(
        "every agent hears every peer",
        Duration::from_secs(5),
        || {
            for k in 0..agents {
                let b = t.bindings(k)?;
                let peers = b["relay"]["peers"].as_array().cloned().unwrap_or_default();
                if peers.len() != agents - 1 || peers.iter().any(|p| p["heard_secs_ago"].is_null())
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;

    // The BGP sessions up first (BIRD's work at start is done): the agents are idle when the
    // relay is timed.
    wait_until(
        "every agent's BGP sessions established",
        Duration::from_secs(30),
        || {
            for k in 0..agents {
                let s = t.status(k)?;
                let up = s["routing"]["protocols"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["proto"] == "BGP" && p["info"] == "Established")
                    .count();
                if up != 2 {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;

    // (a) The servers register with agent 1 only: every other agent holds each server's
    // bindings within 100 ms of agent 1 showing them (polled over the control sockets,
    // agent 1 first, about a millisecond a poll).
    for i in 0..3 {
        let name = format!("s{}", i + 1);
        // Two real addresses times A4 and A6, and B4 for the last server.
        let want = if i == 2 { 6 } else { 4 };
        t.start_server(i)?;
        let start = Instant::now();
        let mut seen: Vec<Option<Instant>> = vec![None; agents];
        while seen.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(10) {
            for (k, at) in seen.iter_mut().enumerate() {
                if at.is_none() && of_server(&t.bindings(k)?, &name) == want {
                    *at = Some(Instant::now());
                }
            }
        }
        let at: Vec<Instant> = seen
            .iter()
            .enumerate()
            .map(|(k, x)| x.with_context(|| format!("{name}'s bindings never at a{}", k + 1)))
            .collect::<Result<_>>()?;
        let lags: Vec<Duration> = at[1..]
            .iter()
            .map(|x| x.saturating_duration_since(at[0]))
            .collect();
        println!(
            "(a) {name}: its {want} bindings at {} after agent 1 showed them",
            lags.iter()
                .enumerate()
                .map(|(k, l)| format!("a{} {}", k + 2, ms(*l)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for l in lags {
            assert!(
                l <= Duration::from_millis(100),
                "{name}: relayed after {l:?}"
            );
        }
    }
    let ports: Vec<String> = (1..=agents).map(|k| format!("ra{k}")).collect();
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    for a in [A4.into(), A6.into(), B4.into()] {
        t.wait_next_hops(a, &ports, Duration::from_secs(30))?;
    }
    wait_same_tables(&t, "after the servers registered")?;
    let b1 = t.bindings(0)?;
    assert_eq!(agreed(&b1).len(), 14, "{b1:#}");
    for k in 1..agents {
        let b = t.bindings(k)?;
        assert_eq!(
            b["counters"]["registered"].as_u64().unwrap_or(0),
            0,
            "a{}",
            k + 1
        );
        assert!(b["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|x| x["relayed_by"] == "a1"));
    }
    Ok((t, monitor))
}

/// Waits until every agent's bindings agree with agent 1's and their `status --json` shows
/// the same table (`table_digest`, each server's entries) for every service, all relay
/// digests in sync; prints agent 1's tables.
fn wait_same_tables(t: &Routed, when: &str) -> Result<()> {
    let agents = t.agents.len();
    let started = Instant::now();
    let mut last = String::new();
    wait_until(
        &format!("the same tables on every agent {when}"),
        Duration::from_secs(10),
        || {
            let one = tables(&t.status(0)?);
            let b1 = agreed(&t.bindings(0)?);
            for k in 0..agents {
                let (s, b) = (t.status(k)?, t.bindings(k)?);
                if tables(&s) != one || agreed(&b) != b1 || b["relay"]["in_sync"] != true {
                    last = format!("a{}: {:#?} against {one:#?}", k + 1, tables(&s));
                    return Ok(false);
                }
            }
            Ok(one.len() == 6 && one.values().all(|x| x.len() > 64))
        },
    )
    .with_context(|| last.clone())?;
    let one = tables(&t.status(0)?);
    println!(
        "every agent's tables equal {when} ({} later): {}",
        ms(started.elapsed()),
        one.iter()
            .map(|(k, v)| format!("{} {}", k.replace('"', ""), &v[1..13]))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}

/// Opens long-lived connections to A4 from both clients until every (agent, server) pair
/// has at least one (at most two kept per pair, at most 300 tries); returns them with what
/// each is.
fn hold_through_every_agent(t: &Routed) -> Result<(Vec<Held>, Vec<Conn>)> {
    let agents = t.agents.len();
    let dst = http(A4.into());
    let (mut held, mut conns) = (Vec::new(), Vec::<Conn>::new());
    let mut per_pair = BTreeMap::<(String, String), usize>::new();
    for n in 0..300 {
        if per_pair.len() == agents * 3 {
            break;
        }
        let c = n % t.clients.len();
        let h = t.clients[c].in_ns(move || Held::open(dst))?;
        let agent = t.agent_of(c, h.local_port(), dst)?;
        let pair = (agent.clone(), h.server.clone());
        let count = per_pair.entry(pair).or_default();
        if *count < 2 {
            *count += 1;
            conns.push(Conn {
                client: c,
                port: h.local_port(),
                agent,
                server: h.server.clone(),
            });
            held.push(h);
        }
    }
    if per_pair.len() != agents * 3 {
        bail!("no long-lived connection for every agent and server: {per_pair:?}");
    }
    println!(
        "{} long-lived connections, per (agent, server): {per_pair:?}",
        held.len()
    );
    Ok((held, conns))
}

/// Where each connection goes now (the router's FIB); prints and returns how many moved
/// since `conns` was last updated, and updates it.
fn moved(t: &Routed, conns: &mut [Conn], what: &str) -> Result<usize> {
    let mut moves = BTreeMap::<String, usize>::new();
    for c in conns.iter_mut() {
        let now = t.agent_of(c.client, c.port, http(A4.into()))?;
        if now != c.agent {
            *moves
                .entry(format!("{} -> {now} ({})", c.agent, c.server))
                .or_default() += 1;
            c.agent = now;
        }
    }
    let n = moves.values().sum();
    println!("{what}: {n} long-lived connections moved: {moves:?}");
    Ok(n)
}

/// Client traffic: long-lived connections through every agent asked every 20 ms, a UDP
/// question every 5 ms from client 1, and new connections one after another from each
/// client (client 1 to A4, client 2 to A6).
struct Traffic {
    probes: Probes,
    loads: Vec<Load>,
    resets: Vec<(String, u64, u64)>,
}

impl Traffic {
    fn start(t: &Routed, held: Vec<Held>) -> Result<Traffic> {
        let probes = Probes::start_with(
            &t.clients[0].name,
            Some(SocketAddr::new(A4.into(), UDP_PORT)),
            held,
        );
        let loads = vec![
            Load::start_to(
                &t.clients[0].name,
                http(A4.into()),
                Duration::from_millis(10),
            ),
            Load::start_to(
                &t.clients[1].name,
                http(A6.into()),
                Duration::from_millis(10),
            ),
        ];
        let resets = t
            .clients
            .iter()
            .map(|c| {
                Ok((
                    c.name.clone(),
                    tcp_counter(&c.name, "EstabResets")?,
                    tcp_counter(&c.name, "AttemptFails")?,
                ))
            })
            .collect::<Result<_>>()?;
        let tr = Traffic {
            probes,
            loads,
            resets,
        };
        tr.settle(Instant::now())?;
        Ok(tr)
    }

    /// Waits until each client made 20 new connections since `t`.
    fn settle(&self, t: Instant) -> Result<()> {
        wait_until("new connections after", Duration::from_secs(10), || {
            Ok(self.loads.iter().all(|l| l.since(t).len() >= 20))
        })
    }

    /// What was started from `from` to now: fails on any failed connection, lost UDP
    /// question or wrong or failed answer on a long-lived connection; prints the counts.
    fn check_since(&self, from: Instant, what: &str) -> Result<Tally> {
        let to = Instant::now();
        let tally = self.probes.between(from, to)?;
        let mut made = Vec::new();
        for l in &self.loads {
            made.extend(l.between(from, to)?);
        }
        println!(
            "{what}: {} new connections ({} failed), {} asks on long-lived connections ({} \
             errors), {} UDP questions ({} lost)",
            made.len(),
            made.iter().filter(|r| r.is_err()).count(),
            tally.asked,
            tally.held_errors.len(),
            tally.udp_sent,
            tally.udp_lost
        );
        all_succeeded(&made)?;
        assert!(
            tally.held_errors.is_empty(),
            "{what}: long-lived connections: {:?}",
            tally.held_errors
        );
        assert_eq!(tally.udp_lost, 0, "{what}: UDP questions lost");
        assert!(tally.asked > 0 && !made.is_empty());
        Ok(tally)
    }

    /// No TCP connection of either client was reset or failed to connect since the start.
    fn no_resets(&self) -> Result<()> {
        for (ns, resets, fails) in &self.resets {
            let (r, f) = (
                tcp_counter(ns, "EstabResets")? - resets,
                tcp_counter(ns, "AttemptFails")? - fails,
            );
            println!("{ns}: {r} connections reset, {f} failed attempts");
            assert_eq!((r, f), (0, 0), "{ns}: resets, failed attempts");
        }
        Ok(())
    }
}

#[test]
fn three_agents_share_bindings_and_keep_every_flow_through_agent_failures() -> Result<()> {
    let (mut t, monitor) = start("acma", 3)?;
    let (a4, a6, b4): (IpAddr, IpAddr, IpAddr) = (A4.into(), A6.into(), B4.into());
    let (held, mut conns) = hold_through_every_agent(&t)?;
    let traffic = Traffic::start(&t, held)?;
    let began = Instant::now();

    // (b) Agent 2's controller is SIGKILLed: its liveness device goes and the router
    // withdraws its routes; its data path keeps forwarding what is still on the way. Its
    // flows move to agents 1 and 3, whose tables are the same: they keep their servers.
    let killed = Instant::now();
    t.stop_agent(1, libc::SIGKILL)?;
    let withdrawn = monitor.first_event(a4, killed, Duration::from_secs(5))?;
    for a in [a4, a6, b4] {
        t.wait_next_hops(a, &["ra1", "ra3"], Duration::from_secs(5))?;
    }
    println!(
        "(b) agent 2's controller SIGKILLed: its routes withdrawn {} later",
        ms(withdrawn - killed)
    );
    assert!(withdrawn - killed < Duration::from_secs(1));
    t.kill_bird(1)?;
    traffic.settle(Instant::now())?;
    assert!(moved(&t, &mut conns, "(b) agent 2 gone")? >= 3);
    traffic.check_since(killed, "(b) agent 2 killed, then its BIRD")?;

    // (c) Agent 3 goes silent (its uplink drops every frame it sends): BFD takes it out.
    let silenced = Instant::now();
    t.silence(2, true)?;
    let withdrawn = monitor.first_event(a4, silenced, Duration::from_secs(3))?;
    for a in [a4, a6, b4] {
        t.wait_next_hops(a, &["ra1"], Duration::from_secs(3))?;
    }
    println!(
        "(c) agent 3 silent: its routes withdrawn {} later (BFD 100 ms x 3)",
        ms(withdrawn - silenced)
    );
    assert!(
        withdrawn - silenced < Duration::from_millis(500),
        "BFD took {:?}",
        withdrawn - silenced
    );
    traffic.settle(Instant::now())?;
    assert!(moved(&t, &mut conns, "(c) agent 3 silent")? >= 3);
    traffic.check_since(silenced, "(c) agent 3 silent")?;

    // (d) Both come back: agent 3 speaks again, agent 2's BIRD and controller start again
    // (it adopts its pinned data path and restores its bindings; its peers' snapshots bring
    // what it missed). Flows moving back keep their servers.
    let back = Instant::now();
    t.silence(2, false)?;
    t.start_bird(1)?;
    t.start_agent(1)?;
    for a in [a4, a6, b4] {
        t.wait_next_hops(a, &["ra1", "ra2", "ra3"], Duration::from_secs(30))?;
    }
    println!(
        "(d) agents 2 and 3 back on the router {} after (the router's BGP error wait is 5 s)",
        ms(back.elapsed())
    );
    wait_same_tables(&t, "after both came back")?;
    traffic.settle(Instant::now())?;
    // How many move back depends on the order of the next hops the router installs again.
    assert!(moved(&t, &mut conns, "(d) agents 2 and 3 back")? >= 1);
    traffic.check_since(back, "(d) agents 2 and 3 back")?;
    traffic.check_since(began, "(b)-(d) altogether")?;
    traffic.no_resets()?;
    drop(traffic);

    // (f) Agent 2 has no server left for B (s3, B's only server, drained there by the
    // operator: a local decision, not shared): it withdraws B, agents 1 and 3 keep it, and
    // every connection to B succeeds through them.
    let drained = Instant::now();
    t.ctl(1, &["drain", "s3"])?;
    t.wait_next_hops(b4, &["ra1", "ra3"], Duration::from_secs(5))?;
    let withdrawn = monitor.first_event(b4, drained, Duration::from_secs(1))?;
    let why = t.status(1)?["routing"]["prefixes"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["prefix"] == "10.73.100.2/32").cloned())
        .unwrap_or_default();
    println!(
        "(f) s3 drained at agent 2: B withdrawn by agent 2 {} later ({})",
        ms(withdrawn - drained),
        why["why"]
    );
    assert_eq!(why["state"], "withdrawn", "{why}");
    for k in [0, 2] {
        assert_eq!(t.prefix_state(k, "10.73.100.2/32")?, "announced");
    }
    assert_eq!(t.next_hops(a4)?, ["ra1", "ra2", "ra3"]);
    for c in 0..2 {
        let answers = t.connect_many_from(c, http(b4), 30)?;
        assert!(answers.iter().all(|s| s == "s3"), "{answers:?}");
        t.connect_many_from(c, http(a4), 30)?;
    }
    let undone = Instant::now();
    t.ctl(1, &["drain", "s3", "--undo"])?;
    t.wait_next_hops(b4, &["ra1", "ra2", "ra3"], Duration::from_secs(5))?;
    println!(
        "(f) the drain undone: B announced by agent 2 again {} later",
        ms(undone.elapsed())
    );
    Ok(())
}

/// (e) A server leaves, then an agent dies: the flows pinned to the leaving server before
/// the change keep it, also those the router moves to another agent (which must have
/// learned them from the agent that carried them: flow pins synced between agents).
#[test]
fn flows_pinned_before_a_server_leaves_keep_it_when_their_agent_dies() -> Result<()> {
    let (mut t, monitor) = start("acmae", 2)?;
    let a4: IpAddr = A4.into();
    let (held, mut conns) = hold_through_every_agent(&t)?;
    let traffic = Traffic::start(&t, held)?;

    // s1 deregisters at agent 1 (SIGTERM: lifetime 0): draining at both agents, its open
    // connections stay on it (the server waits for them), new ones avoid it.
    let pid = t.servers[0]
        .0
        .as_ref()
        .and_then(|p| p.pid())
        .context("s1")?;
    let left = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let draining = |b: &serde_json::Value| {
        let s1: Vec<_> = b["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["server"] == "s1")
            .collect();
        !s1.is_empty() && s1.iter().all(|x| x["state"] == "draining")
    };
    wait_until("s1 draining at both agents", Duration::from_secs(3), || {
        Ok(draining(&t.bindings(0)?) && draining(&t.bindings(1)?))
    })?;
    println!(
        "(e) s1 deregistered: draining at both agents {} later",
        ms(left.elapsed())
    );
    wait_same_tables(&t, "after s1 left")?;
    let s1_via_a2: Vec<Conn> = conns
        .iter()
        .filter(|c| c.agent == "ra2" && c.server == "s1")
        .cloned()
        .collect();
    assert!(!s1_via_a2.is_empty());
    // Agent 1 learns agent 2's flows to s1 (now exceptions to the tables): seen in its flow
    // table with s1's real address. Not asserted here: what counts is the connections.
    let learned = wait_until(
        "agent 1 holding agent 2's flows to s1",
        Duration::from_secs(3),
        || {
            let flows = t.query(0, "flows")?;
            Ok(s1_via_a2.iter().all(|c| {
                flows["flows"].as_array().into_iter().flatten().any(|f| {
                    f["client_port"] == c.port
                        && f["server"] == "10.73.2.11"
                        && f["client"]
                            == if c.client == 0 {
                                "10.73.1.10"
                            } else {
                                "10.73.3.10"
                            }
                })
            }))
        },
    );
    println!(
        "(e) agent 1 holds agent 2's {} flows to s1: {}",
        s1_via_a2.len(),
        match &learned {
            Ok(()) => format!("yes, {} after s1 left", ms(left.elapsed())),
            Err(e) => format!("no ({e:#})"),
        }
    );

    // Agent 2 dies: all its flows move to agent 1, those to s1 too.
    let killed = Instant::now();
    t.stop_agent(1, libc::SIGKILL)?;
    let withdrawn = monitor.first_event(a4, killed, Duration::from_secs(5))?;
    t.wait_next_hops(a4, &["ra1"], Duration::from_secs(5))?;
    println!(
        "(e) agent 2 SIGKILLed: its routes withdrawn {} later",
        ms(withdrawn - killed)
    );
    traffic.settle(Instant::now())?;
    assert!(moved(&t, &mut conns, "(e) agent 2 gone")? >= s1_via_a2.len());
    traffic.check_since(left, "(e) s1 left, then agent 2 died")?;
    // New connections made once s1 was draining went elsewhere.
    let since = traffic.loads[0].since(killed);
    assert!(
        since.iter().all(|(_, r)| r.as_deref() != Ok("s1")),
        "a new connection went to the draining s1"
    );
    traffic.no_resets()?;
    Ok(())
}
