//! Choosing well and failing over fast, end to end in network namespaces: servers register
//! themselves (s3 through two real addresses, on two links), the agent probes them with
//! refresh requests and checks them with ICMP echo and TCP connects. A client keeps making
//! connections while servers report load, are drained, die and lose a link; long-lived
//! connections to the other servers must see no reset and no stall. Runs as root.
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anycast_tests::{
    load::Load,
    topology::{http_get, Held, ServerMode, Topology, HTTP_PORT},
    wait_until,
};

/// Long-lived connections asked every 20 ms; records the slowest answer and any error.
struct Watch {
    stop: Arc<AtomicBool>,
    result: Arc<Mutex<(Duration, Vec<String>, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(mut conns: Vec<Held>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let result = Arc::new(Mutex::new((Duration::ZERO, Vec::new(), 0)));
        let (s, r) = (stop.clone(), result.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for h in &mut conns {
                    let t = Instant::now();
                    let answer = h.ask();
                    let mut res = r.lock().unwrap();
                    res.0 = res.0.max(t.elapsed());
                    res.2 += 1;
                    match answer {
                        Ok(name) if name == h.server => {}
                        Ok(name) => res.1.push(format!("{} answered as {name}", h.server)),
                        Err(e) => res.1.push(format!("{}: {e:#}", h.server)),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch {
            stop,
            result,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (Duration, Vec<String>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.result.lock().unwrap().clone()
    }
}

fn counts(topo: &Topology, n: usize) -> anyhow::Result<BTreeMap<String, u32>> {
    topo.clients[0].in_ns(move || {
        let mut c = BTreeMap::<String, u32>::new();
        for _ in 0..n {
            *c.entry(http_get(Topology::anycast(false, HTTP_PORT))?)
                .or_default() += 1;
        }
        Ok(c)
    })
}

/// Opens connections until one lands on each of `servers`.
fn held_on(topo: &Topology, servers: &[&str]) -> anyhow::Result<Vec<Held>> {
    let want: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
    topo.clients[0].in_ns(move || {
        let mut got: Vec<Held> = Vec::new();
        for _ in 0..200 {
            let h = Held::open(Topology::anycast(false, HTTP_PORT))?;
            if want.contains(&h.server) && !got.iter().any(|g| g.server == h.server) {
                got.push(h);
            }
            if got.len() == want.len() {
                return Ok(got);
            }
        }
        anyhow::bail!("could not land a connection on each of {want:?}")
    })
}

/// The condition of every binding of `server` (from `anycast-ctl bindings --json`).
fn probe_conditions(topo: &Topology, server: &str) -> anyhow::Result<Vec<String>> {
    let b = topo.bindings()?;
    Ok(b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["server"] == server)
        .map(|x| x["condition"].as_str().unwrap_or("?").to_string())
        .collect())
}

/// Health of `server`'s checks on `real` from `anycast-ctl status --json`.
fn check_health(topo: &Topology, server: &str, real: &str) -> anyhow::Result<Vec<String>> {
    let s = topo.status()?;
    Ok(s["health"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["server"] == server && h["real"] == real)
        .map(|h| h["health"].as_str().unwrap_or("?").to_string())
        .collect())
}

#[test]
fn load_drain_death_and_link_failure() -> anyhow::Result<()> {
    let mut topo = Topology::build("acfo", 1, 3, ServerMode::Registering { lifetime_secs: 60 })?;
    topo.add_second_link(2)?;
    let check = |kind: serde_json::Value| {
        let mut c = serde_json::json!({"interval_ms": 100, "timeout_ms": 80, "fall": 2, "rise": 2});
        c.as_object_mut()
            .unwrap()
            .extend(kind.as_object().unwrap().clone());
        c
    };
    topo.config_extra = serde_json::json!({"health_checks": [
        check(serde_json::json!({"type": "icmp"})),
        check(serde_json::json!({"type": "tcp", "port": HTTP_PORT})),
    ]});
    merge_extra(
        &mut topo.config_extra,
        serde_json::json!({"flow_timeouts": {"tcp_idle": 20, "udp_idle": 2, "tcp_closing": 1}}),
    );
    topo.registration_extra =
        serde_json::json!({"probe": {"interval_ms": 200, "timeout_ms": 150, "misses": 2}});
    // Load reports come from a file per server ("USED MAX").
    for i in 1..=3 {
        std::fs::write(topo.dir.join(format!("s{i}.load")), "0 100")?;
    }
    let load_file = topo.dir.join("{name}.load").to_string_lossy().into_owned();
    topo.server_args = vec!["--load-cmd".into(), format!("cat {load_file}")];
    topo.start_agent(0)?;
    for i in 0..3 {
        topo.start_server(i)?;
    }
    wait_until("three servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 3)
    })?;
    wait_until(
        "s3 bound through both links",
        Duration::from_secs(30),
        || {
            let b = topo.bindings()?;
            let reals: std::collections::BTreeSet<String> = b["bindings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["server"] == "s3")
                .filter_map(|x| x["real"].as_str().map(str::to_string))
                .collect();
            Ok(reals.contains("10.71.3.13") && reals.contains("10.71.2.13"))
        },
    )?;
    wait_until("every health check up", Duration::from_secs(10), || {
        let s = topo.status()?;
        let h = s["health"].as_array().cloned().unwrap_or_default();
        Ok(!h.is_empty() && h.iter().all(|x| x["health"] == "up"))
    })?;

    // 1. High load: s1 reports 90 of 100 used, the others 0: its share falls to about 10/210.
    // Weights: s1 100, s2 100, s3 100 per real address (two): s1's fair share is 25%.
    let before = counts(&topo, 300)?;
    println!("equal load: {before:?}");
    std::fs::write(topo.dir.join("s1.load"), "90 100")?;
    wait_until(
        "s1's weight follows its load",
        Duration::from_secs(15),
        || {
            let b = topo.bindings()?;
            Ok(b["bindings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["server"] == "s1")
                .all(|x| x["weight"].as_u64() <= Some(12)))
        },
    )?;
    // Now about 10 / 310: 3%.
    let loaded = counts(&topo, 300)?;
    println!("s1 at 90% load: {loaded:?}");
    let share = |c: &BTreeMap<String, u32>, s: &str| {
        c.get(s).copied().unwrap_or(0) as f64 / c.values().sum::<u32>() as f64
    };
    // Bounds at least 4 standard deviations from the expected shares.
    assert!(
        share(&loaded, "s1") < 0.10 && share(&loaded, "s1") < share(&before, "s1") / 3.0,
        "s1's share of new connections fell with its load: before {before:?}, after {loaded:?}"
    );
    std::fs::write(topo.dir.join("s1.load"), "0 100")?;

    // 2. Drain s1 by the operator: its open connection finishes, it gets no new ones.
    let mut on_s1 = held_on(&topo, &["s1"])?.pop().unwrap();
    println!("{}", topo.ctl(&["drain", "s1"])?);
    let drained = counts(&topo, 60)?;
    assert_eq!(
        drained.get("s1"),
        None,
        "a drained server gets no new connections: {drained:?}"
    );
    assert_eq!(
        on_s1.ask()?,
        "s1",
        "the drained server's open connection still works"
    );
    drop(on_s1);
    println!("{}", topo.ctl(&["drain", "s1", "--undo"])?);
    wait_until(
        "s1 takes connections again",
        Duration::from_secs(10),
        || Ok(counts(&topo, 30)?.contains_key("s1")),
    )?;

    // 3. Kill s2 (its server side and its service) while a client keeps connecting and
    //    long-lived connections to s1 and s3 keep talking.
    let watch = Watch::start(held_on(&topo, &["s1", "s3"])?);
    let load = Load::start(&topo.clients[0].name, Duration::ZERO);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(3000)); // some traffic before the failure
    {
        let log = load.log.lock().unwrap();
        let before: Vec<_> = log.iter().filter(|(t, _)| *t >= started).collect();
        let failed: Vec<_> = before.iter().filter(|(_, r)| r.is_err()).collect();
        println!(
            "before the kill: {} connections, {} failed: {:?}",
            before.len(),
            failed.len(),
            failed
        );
    }
    let s2 = &mut topo.servers[1];
    s2.decap
        .as_mut()
        .unwrap()
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    s2.app
        .as_mut()
        .unwrap()
        .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    // From here on s2 can answer nothing.
    let killed = Instant::now();
    wait_until("s2 declared down", Duration::from_secs(10), || {
        Ok(probe_conditions(&topo, "s2")?.iter().all(|c| c == "down"))
    })?;
    let detected = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2)); // traffic after the failure
    let after = load.since(killed);
    drop(load);
    let last_failure = Load::last_failure_since(&after, killed);
    let answered: BTreeMap<String, u32> =
        after
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .fold(BTreeMap::new(), |mut m, s| {
                *m.entry(s.clone()).or_default() += 1;
                m
            });
    println!(
        "failover: s2 killed; detected (declared down) after {detected:?}; last failed connection {last_failure:?} after the kill; {} connections since, answered by {answered:?}",
        after.len()
    );
    for (t, r) in after.iter().filter(|(_, r)| r.is_err()) {
        println!(
            "  failed at {:?}: {}",
            t.duration_since(killed),
            r.as_ref().unwrap_err()
        );
    }
    assert!(!answered.contains_key("s2"), "a dead server answered?");
    if let Some(last) = last_failure {
        assert!(
            last <= detected + Duration::from_millis(300),
            "connections kept failing after detection: last {last:?}, detected {detected:?}"
        );
    }
    let (slowest, errors, asked) = watch.finish();
    println!("long-lived connections to s1 and s3: {asked} answers, slowest {slowest:?}");
    assert!(
        errors.is_empty(),
        "connections to healthy servers were disturbed: {errors:?}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a connection to a healthy server stalled for {slowest:?}"
    );

    // 4. Cut s3's second link: that real address goes down, s3 carries on through the other.
    let cut = Instant::now();
    topo.servers[2].ns.ip(&["link", "set", "eth1", "down"])?;
    wait_until(
        "s3's second address declared down",
        Duration::from_secs(10),
        || {
            Ok(check_health(&topo, "s3", "10.71.3.13")?
                .iter()
                .any(|h| h == "down"))
        },
    )?;
    println!("s3's link cut: declared down after {:?}", cut.elapsed());
    assert!(
        check_health(&topo, "s3", "10.71.2.13")?
            .iter()
            .all(|h| h == "up"),
        "s3's first address stays up"
    );
    let c = counts(&topo, 90)?;
    println!("after the link cut: {c:?}");
    assert!(
        c.get("s3").copied().unwrap_or(0) >= 15,
        "s3 still takes connections through its other link: {c:?}"
    );
    assert_eq!(c.values().sum::<u32>(), 90, "every connection answered");

    // 5. The flow table (read from the map): a FIN or RST from the client ends its flow's
    //    entry after the closing timeout, an idle UDP flow's entry expires, an active
    //    connection's entry stays.
    let opened = Instant::now();
    let mut conns = held_on(&topo, &["s1", "s3"])?;
    let fin = conns.pop().unwrap();
    let rst = conns.pop().unwrap();
    let (fin_port, rst_port) = (fin.local_port(), rst.local_port());
    let mut active = topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT)))?;
    let active_port = active.local_port();
    let udp_port = topo.clients[0].in_ns(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(
            b"who",
            Topology::anycast(false, anycast_tests::topology::UDP_PORT),
        )?;
        let mut buf = [0u8; 64];
        sock.recv_from(&mut buf)?;
        Ok(sock.local_addr()?.port())
    })?;
    let flows = flow_states(&topo)?;
    // By protocol and port: the UDP client may well use a port number that one of the
    // thousands of TCP connections before it used too.
    let (fin_key, rst_key, active_key, udp_key) = (
        ("tcp", fin_port),
        ("tcp", rst_port),
        ("tcp", active_port),
        ("udp", udp_port),
    );
    let ours = [
        ("fin", fin_key),
        ("rst", rst_key),
        ("active", active_key),
        ("udp", udp_key),
    ];
    // Printed before asserting, so a failure shows every one of them.
    let states: Vec<String> = ours
        .iter()
        .map(|(what, key)| format!("{what} (port {}): {:?}", key.1, flows.get(key)))
        .collect();
    println!(
        "flow entries {:?} after opening them: {}",
        opened.elapsed(),
        states.join(", ")
    );
    for (what, key) in ours {
        assert_eq!(
            flows.get(&key).map(String::as_str),
            Some("active"),
            "{what} flow in the map"
        );
    }
    let swept = |topo: &Topology| -> anyhow::Result<u64> {
        Ok(topo.status()?["flow_table"]["swept"].as_u64().unwrap_or(0))
    };
    let swept_before = swept(&topo)?;
    drop(fin); // FIN
    rst.reset(); // RST
    let t = Instant::now();
    wait_until(
        "FIN, RST and idle UDP entries removed",
        Duration::from_secs(15),
        || {
            let f = flow_states(&topo)?;
            Ok(!f.contains_key(&fin_key) && !f.contains_key(&rst_key) && !f.contains_key(&udp_key))
        },
    )?;
    println!(
        "closed and idle flow entries removed {:?} after the close",
        t.elapsed()
    );
    // The sweeper (its own thread) accounts for them in `anycast-ctl status`.
    let sweeper = &topo.status()?["flow_table"];
    println!("flow sweeper: {sweeper}");
    assert!(
        swept(&topo)? >= swept_before + 3,
        "the sweeper's report counts the three deleted entries (it had {swept_before}): {sweeper}"
    );
    assert_eq!(
        active.ask()?,
        active.server,
        "the active connection still works"
    );
    assert!(
        flow_states(&topo)?.contains_key(&active_key),
        "an active flow's entry stays"
    );
    println!("{}", topo.ctl(&["status"])?);
    Ok(())
}

/// (protocol, client port) -> state of every IPv4 flow entry to the anycast address.
fn flow_states(topo: &Topology) -> anyhow::Result<BTreeMap<(&'static str, u16), String>> {
    let flows: serde_json::Value = serde_json::from_str(&topo.ctl(&["flows", "--json"])?)?;
    Ok(flows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["address"] == "10.71.100.1")
        .map(|f| {
            let state = if f["expired"] == true {
                "expired"
            } else if f["closing"] == true {
                "closing"
            } else {
                "active"
            };
            let protocol = if f["protocol"] == "udp" { "udp" } else { "tcp" };
            (
                (protocol, f["client_port"].as_u64().unwrap_or(0) as u16),
                state.to_string(),
            )
        })
        .collect())
}

fn merge_extra(into: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(i), Some(e)) = (into.as_object_mut(), extra.as_object()) {
        i.extend(e.clone());
    }
}
