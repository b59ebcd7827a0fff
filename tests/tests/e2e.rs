//! End to end in network namespaces: two clients, a router, the agent and four servers (three
//! configured at first). Real TCP and UDP traffic over IPv4 and IPv6 through the anycast
//! addresses, in both topologies (two-armed: XDP_REDIRECT; on a stick: XDP_TX). All XDP
//! programs (agent, veth peers, servers) run in native (driver) mode on veth. Runs as root.
use std::{collections::BTreeMap, time::Duration};

use anycast_tests::{
    netns::Netns,
    topology::{http_get, udp_ask, Held, ServerMode, Topology, ANYCAST_V4, HTTP_PORT, UDP_PORT},
    workspace_bin,
};

type Counts = BTreeMap<String, u32>;

/// `per_client` HTTP connections from every client at once; returns answers per server.
fn connections(topo: &Topology, per_client: usize, v6: bool) -> anyhow::Result<Counts> {
    let addr = Topology::anycast(v6, HTTP_PORT);
    let mut handles = Vec::new();
    for c in &topo.clients {
        let name = c.name.clone();
        handles.push(std::thread::spawn(move || -> anyhow::Result<Counts> {
            let ns = Netns { name };
            let r = ns.in_ns(move || {
                let mut counts = Counts::new();
                for _ in 0..per_client {
                    *counts.entry(http_get(addr)?).or_default() += 1;
                }
                Ok(counts)
            });
            std::mem::forget(ns); // owned by the topology
            r
        }));
    }
    let mut total = Counts::new();
    for h in handles {
        for (k, v) in h.join().expect("client thread")? {
            *total.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

fn verdicts(topo: &Topology) -> anyhow::Result<BTreeMap<String, u64>> {
    let s = topo.status()?;
    Ok(s["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
        .collect())
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, k: &str) -> u64 {
    after[k] - before[k]
}

/// Every connection answered, and every server got at least `min_percent` of them. The
/// bound sits at least 4 standard deviations below the fair share, so it does not flake.
fn assert_spread(counts: &Counts, servers: &[&str], total: u32, min_percent: u32, what: &str) {
    println!("{what}: {counts:?}");
    assert_eq!(
        counts.values().sum::<u32>(),
        total,
        "{what}: every connection answered"
    );
    for s in servers {
        let n = counts.get(*s).copied().unwrap_or(0);
        assert!(
            n * 100 >= total * min_percent,
            "{what}: {s} got {n} of {total} connections, less than {min_percent}%: {counts:?}"
        );
    }
}

fn xdp_line(ns: &Netns, dev: &str) -> String {
    ns.ip(&["-d", "link", "show", dev]).unwrap_or_default()
}

#[test]
fn anycast_end_to_end() -> anyhow::Result<()> {
    let mut topo = Topology::build("ace2e", 2, 4, ServerMode::Static)?;
    topo.start_agent(3)?;

    // Native (driver) XDP on every veth involved; generic mode would show "xdpgeneric".
    for (ns, dev) in [
        (&topo.agent, "eth0"),
        (&topo.agent, "eth1"),
        (&topo.servers[0].ns, "eth0"),
    ] {
        let line = xdp_line(ns, dev);
        assert!(
            line.contains("prog/xdp") && !line.contains("xdpgeneric"),
            "{dev}: not native XDP:\n{line}"
        );
    }
    println!("XDP mode on veth: native (driver) for the agent, its veth peers and the servers");

    // Two-armed: 300 new connections over IPv4 and 300 over IPv6, from both clients.
    let before = verdicts(&topo)?;
    let rx_before =
        topo.agent.link_stat("eth0", "rx_packets")? + topo.agent.link_stat("eth1", "rx_packets")?;
    let v4 = connections(&topo, 150, false)?;
    assert_spread(&v4, &["s1", "s2", "s3"], 300, 20, "IPv4, two-armed");
    let v6 = connections(&topo, 150, true)?;
    assert_spread(&v6, &["s1", "s2", "s3"], 300, 20, "IPv6, two-armed");
    for c in &topo.clients {
        for v6 in [false, true] {
            let (server, from) = c.in_ns(move || udp_ask(Topology::anycast(v6, UDP_PORT)))?;
            assert_eq!(
                from,
                Topology::anycast(v6, UDP_PORT),
                "UDP reply from {server} must come from the anycast address"
            );
        }
    }
    let after = verdicts(&topo)?;
    let rx_after =
        topo.agent.link_stat("eth0", "rx_packets")? + topo.agent.link_stat("eth1", "rx_packets")?;
    let forwarded = delta(&after, &before, "redirect") + delta(&after, &before, "pass_no_neigh");
    let other = delta(&after, &before, "pass_not_service");
    println!(
        "agent: forwarded {forwarded} client packets, saw {other} other frames, interface rx {}",
        rx_after - rx_before
    );
    // Every TCP connection has at least 3 packets each way. Had the replies come through
    // the agent, it would have seen at least as many frames that are not for a service.
    assert!(
        forwarded >= 3 * 600,
        "too few packets forwarded: {forwarded}"
    );
    assert!(
        other * 10 < forwarded,
        "the agent saw {other} non-service frames: replies passed through it?"
    );
    assert_eq!(
        delta(&after, &before, "tx"),
        0,
        "two-armed forwarding never sends back out of the ingress port"
    );
    assert!(
        rx_after - rx_before < forwarded + other + 100,
        "agent interfaces received more than it forwarded"
    );

    // Long-lived connections keep their server while a fourth server is added. With 24 flows
    // and a quarter of the table moving to s4, all 24 keeping their server without the flow
    // table would happen with probability 0.75^24 < 0.1%.
    let c1 = &topo.clients[0];
    let mut held: Vec<Held> = c1.in_ns(|| {
        (0..24)
            .map(|i| Held::open(Topology::anycast(i % 2 == 1, HTTP_PORT)))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    topo.write_config(4)?;
    topo.ctl(&["reload"])?;
    let status = topo.status()?;
    let web4 = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web4")
        .unwrap();
    assert_eq!(
        web4["servers"].as_array().unwrap().len(),
        4,
        "s4 configured after reload"
    );
    for h in &mut held {
        let now = h.ask()?;
        assert_eq!(
            now, h.server,
            "a long-lived connection changed server after s4 was added"
        );
    }
    let v4 = connections(&topo, 100, false)?;
    println!("IPv4 after adding s4: {v4:?}");
    assert!(
        v4.get("s4").copied().unwrap_or(0) >= 10,
        "s4 gets new connections: {v4:?}"
    );

    // On a stick: the agent's route to the servers goes back out of eth0 (XDP_TX).
    topo.use_stick_mode()?;
    let before = verdicts(&topo)?;
    let v4 = connections(&topo, 100, false)?;
    assert_spread(&v4, &["s1", "s2", "s3", "s4"], 200, 12, "IPv4, on a stick");
    let v6 = connections(&topo, 100, true)?;
    assert_spread(&v6, &["s1", "s2", "s3", "s4"], 200, 12, "IPv6, on a stick");
    for h in &mut held {
        assert_eq!(
            h.ask()?,
            h.server,
            "a long-lived connection changed server in stick mode"
        );
    }
    let after = verdicts(&topo)?;
    println!(
        "stick mode: tx {} redirect {}",
        delta(&after, &before, "tx"),
        delta(&after, &before, "redirect")
    );
    assert!(
        delta(&after, &before, "tx") >= 3 * 400,
        "stick mode forwards with XDP_TX"
    );
    assert_eq!(
        delta(&after, &before, "redirect"),
        0,
        "stick mode never redirects"
    );
    drop(held);

    // Topology preference: c1 (IPv4 and IPv6) prefers s2; c2 is hashed over everyone.
    topo.config_extra = serde_json::json!({"preferences": [
        {"clients": ["10.71.1.11/32", "fd71:1::11/128"], "servers": ["s2"]}
    ]});
    topo.write_config(4)?;
    topo.ctl(&["reload"])?;
    for v6 in [false, true] {
        let addr = Topology::anycast(v6, HTTP_PORT);
        let c1 = topo.clients[0].in_ns(move || {
            let mut c = Counts::new();
            for _ in 0..40 {
                *c.entry(http_get(addr)?).or_default() += 1;
            }
            Ok(c)
        })?;
        let c2 = topo.clients[1].in_ns(move || {
            let mut c = Counts::new();
            for _ in 0..40 {
                *c.entry(http_get(addr)?).or_default() += 1;
            }
            Ok(c)
        })?;
        println!("preference (v6={v6}): c1 {c1:?}, c2 {c2:?}");
        assert_eq!(
            c1.keys().collect::<Vec<_>>(),
            vec!["s2"],
            "c1 goes to its preferred server"
        );
        assert!(c2.len() >= 3, "c2 is hashed over all servers: {c2:?}");
    }

    // Clean shutdown: the agent detaches, the server removes the anycast address from lo.
    let mut agent = topo.agent_proc.take().unwrap();
    let status = agent.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    assert!(status.success(), "agent exit: {status}\n{}", agent.output());
    assert!(
        !xdp_line(&topo.agent, "eth0").contains("prog/xdp"),
        "agent left XDP attached"
    );
    let s1 = &mut topo.servers[0];
    let mut decap = s1.decap.take().unwrap();
    assert!(s1
        .ns
        .ip(&["addr", "show", "dev", "lo"])?
        .contains(&ANYCAST_V4.to_string()));
    let status = decap.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    assert!(
        status.success(),
        "server exit: {status}\n{}",
        decap.output()
    );
    assert!(
        !s1.ns
            .ip(&["addr", "show", "dev", "lo"])?
            .contains(&ANYCAST_V4.to_string()),
        "server left the anycast address on lo"
    );
    assert!(
        !xdp_line(&s1.ns, "eth0").contains("prog/xdp"),
        "server left XDP attached"
    );
    Ok(())
}

/// A bad configuration names the field and the reason, and changes nothing on the host.
#[test]
fn bad_config_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let ns = Netns::new("acbadcfg")?;
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    let dir = std::env::temp_dir().join("acbadcfg-anycast");
    std::fs::create_dir_all(&dir)?;
    let ctl = workspace_bin("anycast-ctl")?;
    let forward_before = ns.exec("cat", &["/proc/sys/net/ipv4/ip_forward"])?;
    let cases = [
        (
            r#"{"interfaces":["eth0"],"agent_address":{"v4":"10.0.0.1"},"services":[{"name":"w","address":"192.0.2.1","protocol":"tcp","port":80,"servers":[{"name":"a","address":"10.0.2.x"}]}]}"#,
            "invalid IP address",
        ),
        (
            r#"{"interfaces":["nosuch0"],"agent_address":{"v4":"10.0.0.1"},"services":[]}"#,
            "interfaces[0]",
        ),
        (
            r#"{"interfaces":["eth0"],"agent_address":{"v4":"10.0.0.1"},"services":[{"name":"w","address":"192.0.2.1","protocol":"tcp","port":80,"servers":[{"name":"a","address":"fd00::2"}]}]}"#,
            "services[0].servers[0].address",
        ),
        (
            r#"{"interfaces":["eth0"],"agent_address":{"v4":"10.0.0.1"},"ring_size":65536,"services":[]}"#,
            "ring_size",
        ),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.json"));
        std::fs::write(&path, text)?;
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&ctl)
            .args([
                "agent",
                "--config",
                path.to_str().unwrap(),
                "--socket",
                dir.join("s.sock").to_str().unwrap(),
            ])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i}: bad config accepted");
        assert!(
            err.contains(expect),
            "case {i}: error does not name {expect:?}: {err}"
        );
        assert!(
            !xdp_line(&ns, "eth0").contains("prog/xdp"),
            "case {i}: XDP attached despite bad config"
        );
        assert_eq!(
            ns.exec("cat", &["/proc/sys/net/ipv4/ip_forward"])?,
            forward_before,
            "case {i}: sysctl changed"
        );
    }
    Ok(())
}
