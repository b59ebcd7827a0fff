//! Two agents behind a router, each announcing the anycast addresses through its own BIRD
//! (BGP with BFD); the router installs them as one multipath route (tests/src/routed.rs).
//! Convergence times are printed (`-- --nocapture`).
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anycast_tests::{
    load::Load,
    routed::{all_succeeded, running, Bird, Routed, A4, A6, B4},
    topology::HTTP_PORT,
    wait_until,
};

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[test]
fn two_agents_announce_withdraw_and_fail_over_through_bgp() -> anyhow::Result<()> {
    let mut t = Routed::build("acbg", 2, 3)?;
    let (a4, a6, b4) = (IpAddr::V4(A4), IpAddr::V6(A6), IpAddr::V4(B4));
    let http = |a: IpAddr| SocketAddr::new(a, HTTP_PORT);
    for k in 0..2 {
        t.write_config(k, serde_json::json!({"withdraw_grace_ms": 300}))?;
    }
    let monitor = t.monitor()?;

    // Both agents' routes become one multipath route on the router.
    let started = Instant::now();
    t.start_agent(0)?;
    t.start_agent(1)?;
    for a in [a4, a6, b4] {
        t.wait_next_hops(a, &["ra1", "ra2"], Duration::from_secs(30))?;
    }
    println!(
        "both agents' routes on the router (multipath) {} after starting the agents",
        ms(started.elapsed())
    );
    for k in 0..2 {
        // The sessions' states in `status` are read from BIRD every poll_ms (200 ms here).
        wait_until(
            "status showing the sessions up",
            Duration::from_secs(5),
            || {
                let s = t.status(k)?;
                let up = |list: &serde_json::Value, key: &str, want: &str| {
                    list.as_array()
                        .is_some_and(|l| l.iter().filter(|p| p[key] == want).count() == 2)
                };
                Ok(up(&s["routing"]["protocols"], "info", "Established")
                    && up(&s["routing"]["bfd_sessions"], "state", "Up"))
            },
        )?;
        let s = t.status(k)?;
        let r = &s["routing"];
        assert!(
            r["bird"].as_str().unwrap_or("").starts_with("connected"),
            "{r}"
        );
        for p in ["10.73.100.1/32", "fd73:100::1/128", "10.73.100.2/32"] {
            assert_eq!(t.prefix_state(k, p)?, "announced", "agent {k} {p}: {r}");
        }
        let sessions: Vec<_> = r["protocols"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["proto"] == "BGP")
            .collect();
        assert_eq!(sessions.len(), 2, "{r}");
        for p in &sessions {
            assert_eq!(p["state"], "up", "{p}");
            assert_eq!(p["info"], "Established", "{p}");
            assert!(p["neighbor"].is_string(), "{p}");
        }
        let bfd = r["bfd_sessions"].as_array().cloned().unwrap_or_default();
        assert_eq!(bfd.len(), 2, "{r}");
        assert!(bfd.iter().all(|b| b["state"] == "Up"), "{r}");
    }
    let text = t.agents[0].ns.exec(
        &anycast_tests::workspace_bin("anycast-ctl")?.to_string_lossy(),
        &["status", "--socket", &t.agents[0].socket.to_string_lossy()],
    )?;
    assert!(text.contains("10.73.100.1/32"), "{text}");
    assert!(text.contains("anycast_bgp0"), "{text}");
    println!("{text}");

    // New connections spread over both agents, and every one succeeds.
    let before = [t.service_packets(0, "a4")?, t.service_packets(1, "a4")?];
    let answers = t.connect_many(http(a4), 200)?;
    assert_eq!(answers.len(), 200);
    let after = [t.service_packets(0, "a4")?, t.service_packets(1, "a4")?];
    let delta = [after[0] - before[0], after[1] - before[1]];
    let total = (delta[0] + delta[1]).max(1);
    println!(
        "200 IPv4 connections: agent 1 forwarded {} packets ({:.0}%), agent 2 {} ({:.0}%)",
        delta[0],
        100.0 * delta[0] as f64 / total as f64,
        delta[1],
        100.0 * delta[1] as f64 / total as f64
    );
    for (k, d) in delta.iter().enumerate() {
        assert!(
            *d * 5 >= total,
            "agent {} forwarded {d} of {total} packets: the router did not spread the flows",
            k + 1
        );
    }
    let before6 = [t.service_packets(0, "a6")?, t.service_packets(1, "a6")?];
    t.connect_many(http(a6), 100)?;
    let after6 = [t.service_packets(0, "a6")?, t.service_packets(1, "a6")?];
    println!(
        "100 IPv6 connections: agent 1 forwarded {} packets, agent 2 {}",
        after6[0] - before6[0],
        after6[1] - before6[1]
    );
    assert!(after6[0] > before6[0] && after6[1] > before6[1]);

    // Agent 1's only server for B fails its checks: agent 1 withdraws B, agent 2 keeps it
    // (its own server for B is healthy) and A stays announced by both.
    let load_b = Load::start_to(&t.clients[0].name, http(b4), Duration::from_millis(5));
    wait_until("connections to B", Duration::from_secs(5), || {
        Ok(load_b.since(Instant::now() - Duration::from_secs(5)).len() >= 10)
    })?;
    let killed = Instant::now();
    drop(t.servers[0].1.take());
    let withdrawn = monitor.first_event(b4, killed, Duration::from_secs(5))?;
    t.wait_next_hops(b4, &["ra2"], Duration::from_secs(5))?;
    println!(
        "B withdrawn by agent 1 {} after its only server for B stopped (TCP checks 100 ms, fall 2)",
        ms(withdrawn - killed)
    );
    assert_eq!(t.prefix_state(0, "10.73.100.2/32")?, "withdrawn");
    let why = t.status(0)?["routing"]["prefixes"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["prefix"] == "10.73.100.2/32").cloned())
        .unwrap_or_default();
    assert_eq!(why["why"], "no healthy server", "{why}");
    assert_eq!(t.prefix_state(1, "10.73.100.2/32")?, "announced");
    assert_eq!(t.prefix_state(0, "10.73.100.1/32")?, "announced");
    assert_eq!(t.next_hops(a4)?, ["ra1", "ra2"]);
    // Connections to B started after the withdrawal all go through agent 2 to s2.
    let settled = Instant::now();
    let answers = t.connect_many(http(b4), 50)?;
    assert!(answers.iter().all(|s| s == "s2"), "{answers:?}");
    wait_until(
        "20 connections to B after the withdrawal",
        Duration::from_secs(10),
        || Ok(load_b.since(settled).len() >= 20),
    )?;
    let after_withdrawal = load_b.between(settled, Instant::now())?;
    assert!(after_withdrawal.len() >= 20);
    all_succeeded(&after_withdrawal)?;
    drop(load_b);
    // Its server back, agent 1 announces B again.
    let restarted = Instant::now();
    t.start_app(0)?;
    t.wait_next_hops(b4, &["ra1", "ra2"], Duration::from_secs(10))?;
    println!(
        "B announced again by agent 1 {} after its server came back (rise 2)",
        ms(restarted.elapsed())
    );

    // Agent 1's BIRD is killed and started again: the router loses agent 1's routes at
    // once, the new BIRD reads the include as it is, and the agent sees it restarted and
    // re-asserts its state.
    let bird_killed = Instant::now();
    t.agents[0]
        .bird
        .as_mut()
        .expect("bird a1")
        .proc
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    for a in [a4, b4] {
        t.wait_next_hops(a, &["ra2"], Duration::from_secs(5))?;
    }
    println!(
        "agent 1's BIRD SIGKILLed: its routes withdrawn {} later",
        ms(monitor.first_event(a4, bird_killed, Duration::from_secs(1))? - bird_killed)
    );
    let bird_started = Instant::now();
    let (conf, ctl) = (t.dir.join("a1-bird.conf"), t.dir.join("a1-bird.ctl"));
    t.agents[0].bird = Some(Bird::start(&t.agents[0].ns, "bird a1", &conf, &ctl)?);
    t.agents[0]
        .agent
        .as_mut()
        .expect("agent 1 runs")
        .wait_for_line("BIRD restarted; re-asserting", Duration::from_secs(10))?;
    for a in [a4, a6, b4] {
        t.wait_next_hops(a, &["ra1", "ra2"], Duration::from_secs(20))?;
    }
    println!(
        "agent 1's BIRD restarted: routes back on the router {} after it was started",
        ms(bird_started.elapsed())
    );

    // SIGKILL of agent 1's controller: the liveness device goes with it, and the router
    // withdraws agent 1's routes within milliseconds; new connections keep succeeding
    // through agent 2.
    let load = Load::start_to(&t.clients[0].name, http(a4), Duration::from_millis(5));
    let killed = Instant::now();
    t.agents[0]
        .agent
        .as_mut()
        .expect("agent 1 runs")
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    let withdrawn = monitor.first_event(a4, killed, Duration::from_secs(5))?;
    for a in [a4, a6, b4] {
        t.wait_next_hops(a, &["ra2"], Duration::from_secs(5))?;
    }
    println!(
        "agent 1 SIGKILLed: its route withdrawn on the router {} later",
        ms(withdrawn - killed)
    );
    assert!(
        withdrawn - killed < Duration::from_secs(1),
        "the dead man's switch took {:?}",
        withdrawn - killed
    );
    let answers = t.connect_many(http(a4), 100)?;
    assert_eq!(answers.len(), 100);
    let after_kill = load.between(killed, Instant::now())?;
    println!(
        "{} connections during and after the kill, {} failed",
        after_kill.len(),
        after_kill.iter().filter(|r| r.is_err()).count()
    );
    all_succeeded(&after_kill)?;

    // Restarted, agent 1 adopts its data path and announces again once it has published.
    let restarted = Instant::now();
    t.start_agent(0)?;
    t.wait_next_hops(a4, &["ra1", "ra2"], Duration::from_secs(10))?;
    println!(
        "agent 1 restarted: announced again {} after it was started",
        ms(restarted.elapsed())
    );

    // SIGTERM to agent 2: its routes are withdrawn while it still runs and forwards (the
    // grace time), and no connection fails.
    let pid = t.agents[1]
        .agent
        .as_ref()
        .and_then(|p| p.pid())
        .expect("pid");
    let term = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    t.wait_next_hops(a4, &["ra1"], Duration::from_secs(3))?;
    let alive = running(pid);
    let xdp = t.agents[1].ns.ip(&["link", "show", "eth0"])?;
    let withdrawn = monitor.first_event(a4, term, Duration::from_secs(1))?;
    assert!(alive, "agent 2 exited before its route was withdrawn");
    assert!(
        xdp.contains("xdp"),
        "agent 2 detached before its route was withdrawn: {xdp}"
    );
    t.agents[1]
        .agent
        .as_mut()
        .expect("agent 2 runs")
        .stop_with(0, Duration::from_secs(10))?;
    let exited = Instant::now();
    println!(
        "agent 2 SIGTERMed: route withdrawn {} later, while it still forwarded; exited {} later",
        ms(withdrawn - term),
        ms(exited - term)
    );
    for a in [a6, b4] {
        t.wait_next_hops(a, &["ra1"], Duration::from_secs(3))?;
    }
    let include = std::fs::read_to_string(&t.agents[1].include)?;
    assert!(!include.contains("route "), "{include}");
    let around_term = load.between(term, Instant::now())?;
    assert!(!around_term.is_empty());
    all_succeeded(&around_term)?;
    drop(load);

    // Handoff (SIGUSR2) of the one agent left, `on_handoff: withdraw` (the default): its
    // routes are withdrawn, the data path stays for the next agent.
    let pid = t.agents[0]
        .agent
        .as_ref()
        .and_then(|p| p.pid())
        .expect("pid");
    let handoff = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGUSR2) };
    t.wait_next_hops(a4, &[], Duration::from_secs(3))?;
    println!(
        "handoff with on_handoff withdraw: route withdrawn {} later",
        ms(monitor.first_event(a4, handoff, Duration::from_secs(1))? - handoff)
    );
    let agent1 = t.agents[0].agent.as_mut().expect("agent 1 runs");
    agent1.stop_with(0, Duration::from_secs(10))?;
    assert!(agent1
        .seen
        .iter()
        .any(|l| l.contains("every route withdrawn before exit")));

    // `on_handoff: keep` (a single agent): the liveness device outlives the agent, the
    // route stays through the handoff and the next agent takes the device over; not one
    // route event, not one failed connection.
    t.write_config(0, serde_json::json!({"on_handoff": "keep"}))?;
    t.start_agent(0)?;
    t.wait_next_hops(a4, &["ra1"], Duration::from_secs(10))?;
    let load = Load::start_to(&t.clients[0].name, http(a4), Duration::from_millis(5));
    wait_until(
        "connections before the handoff",
        Duration::from_secs(5),
        || {
            Ok(!load
                .since(Instant::now() - Duration::from_secs(5))
                .is_empty())
        },
    )?;
    let handoff = Instant::now();
    t.agents[0]
        .agent
        .as_mut()
        .expect("agent 1 runs")
        .stop_with(libc::SIGUSR2, Duration::from_secs(10))?;
    let device = t.agents[0].ns.ip(&["link", "show", "aclive0"])?;
    assert!(device.contains("UP"), "{device}");
    assert_eq!(t.next_hops(a4)?, ["ra1"]);
    t.start_agent(0)?;
    wait_until("the next agent announcing", Duration::from_secs(10), || {
        Ok(t.prefix_state(0, "10.73.100.1/32")? == "announced")
    })?;
    let events = monitor.events_since(a4, handoff);
    assert!(
        events.is_empty(),
        "the route changed over a keeping handoff: {events:?}"
    );
    assert_eq!(t.next_hops(a4)?, ["ra1"]);
    let over_handoff = load.between(handoff, Instant::now())?;
    assert!(!over_handoff.is_empty());
    all_succeeded(&over_handoff)?;
    println!(
        "handoff with on_handoff keep: {} connections over it, none failed, no route change",
        over_handoff.len()
    );
    // The new agent made the device non-persistent again: it goes with the agent.
    let killed = Instant::now();
    t.agents[0]
        .agent
        .as_mut()
        .expect("agent 1 runs")
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    t.wait_next_hops(a4, &[], Duration::from_secs(3))?;
    assert!(t.agents[0].ns.ip(&["link", "show", "aclive0"]).is_err());
    println!(
        "the next agent SIGKILLed: route withdrawn {} later",
        ms(monitor.first_event(a4, killed, Duration::from_secs(1))? - killed)
    );

    // A keeping handoff nobody takes over: `agent --cleanup` removes the device, and the
    // routes go with it.
    t.start_agent(0)?;
    t.wait_next_hops(a4, &["ra1"], Duration::from_secs(10))?;
    t.agents[0]
        .agent
        .as_mut()
        .expect("agent 1 runs")
        .stop_with(libc::SIGUSR2, Duration::from_secs(10))?;
    assert_eq!(t.next_hops(a4)?, ["ra1"]);
    let a = &t.agents[0];
    let mut cleanup = a.ns.spawn(
        "cleanup a1",
        &anycast_tests::workspace_bin("anycast-ctl")?,
        &[
            "agent",
            "--cleanup",
            "--config",
            &a.config.to_string_lossy(),
            "--socket",
            &a.socket.to_string_lossy(),
        ],
    )?;
    let cleaned = Instant::now();
    assert!(
        cleanup.wait_exit(Duration::from_secs(10))?.success(),
        "{:?}",
        cleanup.seen
    );
    t.wait_next_hops(a4, &[], Duration::from_secs(3))?;
    assert!(t.agents[0].ns.ip(&["link", "show", "aclive0"]).is_err());
    println!(
        "agent --cleanup after a keeping handoff: route withdrawn {} after it started",
        ms(monitor.first_event(a4, cleaned, Duration::from_secs(1))? - cleaned)
    );
    Ok(())
}
