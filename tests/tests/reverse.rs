//! Reverse-tunnel monitoring end to end, in network namespaces: two servers register with
//! `--reverse-tunnel`, so each connection's SYN-ACK comes back through the agent (IP-in-IP,
//! from the server's real address) and the rest of the connection goes straight to the
//! client. The agent (`registration.reverse_tunnel`) watches, per server, the new TCP flows
//! it forwards against the SYN-ACKs that come back:
//!
//! 1. connections over IPv4 and IPv6 work, and each server's reverse counter rises with
//!    them;
//! 2. s1 stops reverse-tunnelling but still answers (its TC filter is deleted): the agent
//!    suspects it within `suspect_after_ms` of its new flows, sends a refresh request, s1
//!    answers, and stays up (its SYN-ACKs now go straight to the clients);
//! 3. s2 really fails (its `anycast-ctl server` is killed with SIGKILL: nothing
//!    decapsulates the tunnelled SYNs any more): the monitor suspects it and the refresh
//!    requests it sends at once go unanswered, so s2 is down long before the regular probe
//!    (every 10 s here) or its lifetime (60 s) would tell.
//!
//! Runs as root.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anycast_tests::{
    load::Load,
    topology::{http_get, ServerMode, Topology, HTTP_PORT},
    wait_until,
};

const SUSPECT_AFTER_MS: u64 = 300;

/// `anycast-ctl bindings --json`: each binding of `server` as (condition, reverse state,
/// SYN-ACKs, SYNs).
fn reverse_of(topo: &Topology, server: &str) -> anyhow::Result<Vec<(String, String, u64, u64)>> {
    let b = topo.bindings()?;
    Ok(b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["server"] == server)
        .map(|x| {
            (
                x["condition"].as_str().unwrap_or("?").to_string(),
                x["reverse"]["state"].as_str().unwrap_or("?").to_string(),
                x["reverse"]["syn_acks"].as_u64().unwrap_or(0),
                x["reverse"]["syns"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

fn counter(topo: &Topology, name: &str) -> anyhow::Result<u64> {
    Ok(topo.bindings()?["counters"][name].as_u64().unwrap_or(0))
}

fn counts(topo: &Topology, v6: bool, n: usize) -> anyhow::Result<BTreeMap<String, u32>> {
    topo.clients[0].in_ns(move || {
        let mut c = BTreeMap::<String, u32>::new();
        for _ in 0..n {
            *c.entry(http_get(Topology::anycast(v6, HTTP_PORT))?)
                .or_default() += 1;
        }
        Ok(c)
    })
}

#[test]
fn reverse_tunnel_monitoring_suspects_confirms_and_detects_a_dead_server() -> anyhow::Result<()> {
    let mut topo = Topology::build("acrv", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    // Regular probes are rare here, so that a fast detection can only come from the
    // reverse-tunnel monitor (whose refresh requests use the same timeout and misses).
    topo.registration_extra = serde_json::json!({
        "probe": {"interval_ms": 10000, "timeout_ms": 200, "misses": 2},
        "reverse_tunnel": {"suspect_after_ms": SUSPECT_AFTER_MS},
    });
    topo.server_args = vec!["--reverse-tunnel".into()];
    topo.start_agent(0)?;
    for i in 0..2 {
        topo.start_server(i)?;
    }
    for s in &mut topo.servers {
        let out = s.decap.as_mut().unwrap().output();
        assert!(out.contains("reverse tunnel on eth0 egress"), "{out}");
    }
    wait_until("two servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 2)
    })?;
    let shown = topo.servers[0]
        .ns
        .exec("tc", &["filter", "show", "dev", "eth0", "egress"])?;
    assert!(
        shown.contains("anycast_reverse") && shown.contains("direct-action"),
        "the reverse-tunnel program is a clsact egress filter: {shown}"
    );

    // 1. Connections work over IPv4 and IPv6: SYN-ACKs through the agent, the rest direct.
    let before = topo.verdict("reverse_tunnel")?;
    let c4 = counts(&topo, false, 40)?;
    let c6 = counts(&topo, true, 10)?;
    println!("IPv4: {c4:?}; IPv6: {c6:?}");
    assert_eq!(c4.values().sum::<u32>(), 40);
    assert_eq!(c6.values().sum::<u32>(), 10);
    assert!(c4.contains_key("s1") && c4.contains_key("s2"), "{c4:?}");
    let tunnelled = topo.verdict("reverse_tunnel")? - before;
    // One SYN-ACK per connection (a retransmitted one now and then).
    assert!(
        (50..=55).contains(&tunnelled),
        "the agent decapsulated {tunnelled} reverse-tunnelled packets for 50 connections"
    );
    // The agent reads the counters every 50 ms (the 50 connections may take less).
    let t = Instant::now();
    let watched = wait_until("both servers watched", Duration::from_secs(2), || {
        Ok(reverse_of(&topo, "s1")?.iter().all(|x| x.1 == "ok")
            && reverse_of(&topo, "s2")?.iter().all(|x| x.1 == "ok"))
    });
    if let Err(e) = watched {
        let out = topo.agent_proc.as_mut().unwrap().output();
        panic!(
            "{e:#}: {:?} {:?}\n{out}",
            reverse_of(&topo, "s1")?,
            reverse_of(&topo, "s2")?
        );
    }
    println!(
        "both servers watched {:?} after the connections",
        t.elapsed()
    );
    for s in ["s1", "s2"] {
        let r = reverse_of(&topo, s)?;
        println!("{s}: {r:?}");
        let acks: u64 = r.iter().map(|x| x.2).sum();
        assert!(acks > 0, "{s}'s reverse counter rose: {r:?}");
        assert!(
            r.iter().all(|x| x.0 == "up" && x.1 == "ok"),
            "{s} watched and up: {r:?}"
        );
    }
    println!("{}", topo.ctl(&["bindings"])?);

    // 2. s1 stops reverse-tunnelling but still answers TCP: its SYN-ACKs go straight to the
    //    clients. The agent suspects it, asks, gets an answer: s1 stays up.
    let out = topo.agent_proc.as_mut().unwrap().output();
    for s in ["s1", "s2"] {
        assert!(
            out.contains(&format!("'{s}' reverse-tunnels its SYN-ACKs: watching it")),
            "{out}"
        );
    }
    topo.servers[0]
        .ns
        .exec("tc", &["filter", "del", "dev", "eth0", "egress"])?;
    let removed = Instant::now();
    let load = Load::start(&topo.clients[0].name, Duration::from_millis(10));
    let agent = topo.agent_proc.as_mut().unwrap();
    agent.wait_for_line("'s1' is suspect", Duration::from_secs(10))?;
    let suspected = Instant::now();
    agent.wait_for_line("'s1' answered the refresh request", Duration::from_secs(5))?;
    let answered = Instant::now();
    let first_s1 = load
        .since(removed)
        .iter()
        .find(|(_, r)| r.as_deref() == Ok("s1"))
        .map(|(t, _)| *t)
        .expect("a connection to s1 after the filter went");
    let after_flow = suspected.saturating_duration_since(first_s1);
    println!(
        "s1 stopped reverse-tunnelling: suspect {after_flow:?} after its first new flow \
         (suspect_after_ms {SUSPECT_AFTER_MS}), answered the refresh request {:?} later",
        answered - suspected
    );
    assert!(
        after_flow >= Duration::from_millis(SUSPECT_AFTER_MS - 60)
            && after_flow <= Duration::from_millis(SUSPECT_AFTER_MS + 400),
        "suspected {after_flow:?} after s1's first new flow"
    );
    assert!(
        !topo
            .agent_proc
            .as_ref()
            .unwrap()
            .seen
            .iter()
            .any(|l| l.contains("'s2' is suspect")),
        "s2 still reverse-tunnels: never suspect"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let r1 = reverse_of(&topo, "s1")?;
    assert!(
        r1.iter().all(|x| x.0 == "up" && x.1 == "silent"),
        "s1 answered: up, not watched: {r1:?}"
    );
    let since = load.since(answered);
    let s1_ok = since
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("s1"))
        .count();
    let failed: Vec<_> = load
        .since(removed)
        .into_iter()
        .filter(|(_, r)| r.is_err())
        .collect();
    assert!(s1_ok > 0, "s1 keeps taking connections: {since:?}");
    assert!(failed.is_empty(), "no connection failed: {failed:?}");
    assert_eq!(counter(&topo, "reverse_suspected")?, 1);
    assert_eq!(counter(&topo, "reverse_silent")?, 1);

    // 3. s2 really fails: its server side is killed, nothing decapsulates its tunnelled
    //    SYNs, it answers no refresh request.
    let killed = Instant::now();
    topo.servers[1]
        .decap
        .as_mut()
        .unwrap()
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    let agent = topo.agent_proc.as_mut().unwrap();
    agent.wait_for_line("'s2' is suspect", Duration::from_secs(10))?;
    let suspected = Instant::now();
    wait_until("s2 declared down", Duration::from_secs(10), || {
        let r = reverse_of(&topo, "s2")?;
        Ok(!r.is_empty() && r.iter().all(|x| x.0 == "down"))
    })?;
    let detected = killed.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let after = load.since(killed);
    drop(load);
    let last_failure = Load::last_failure_since(&after, killed);
    println!(
        "s2 killed: suspect after {:?}, declared down after {detected:?} (regular probes every \
         10 s); last failed connection {last_failure:?} after the kill",
        suspected - killed
    );
    assert!(
        detected < Duration::from_secs(4),
        "detected by the reverse-tunnel monitor, not the 10 s probe: {detected:?}"
    );
    let late: Vec<_> = after
        .iter()
        .filter(|(t, r)| {
            r.is_err() && t.duration_since(killed) > detected + Duration::from_millis(300)
        })
        .collect();
    assert!(
        late.is_empty(),
        "connections failed after detection: {late:?}"
    );
    let tail: Vec<_> = after
        .iter()
        .filter(|(t, _)| t.duration_since(killed) > detected + Duration::from_millis(300))
        .collect();
    assert!(
        !tail.is_empty() && tail.iter().all(|(_, r)| r.as_deref() == Ok("s1")),
        "after detection s1 answers every connection: {tail:?}"
    );
    assert_eq!(counter(&topo, "reverse_suspected")?, 2);
    println!("{}", topo.ctl(&["bindings"])?);

    // A clean exit undoes the server's host changes: the clsact qdisc it added (and its
    // filter with it) and forwarding on lo.
    let s1 = &mut topo.servers[0];
    assert!(s1
        .ns
        .exec("tc", &["qdisc", "show", "dev", "eth0"])?
        .contains("clsact"));
    s1.decap
        .as_mut()
        .unwrap()
        .stop_with(libc::SIGTERM, Duration::from_secs(20))?;
    let out = s1.decap.as_mut().unwrap().output();
    assert!(out.contains("reverse_tunnelled="), "{out}");
    let qdiscs = s1.ns.exec("tc", &["qdisc", "show", "dev", "eth0"])?;
    assert!(!qdiscs.contains("clsact"), "{qdiscs}");
    let fwd = s1
        .ns
        .exec("sysctl", &["-n", "net.ipv4.conf.lo.forwarding"])?;
    assert_eq!(fwd.trim(), "0");
    Ok(())
}
