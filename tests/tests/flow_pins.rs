//! Flows that move between agents: two agents with their bindings in sync (servers register
//! with A, A relays to B); long-lived TCP connections go through A; a third server
//! registers, so both agents' tables change and some of A's connections are pinned to a
//! server that is no longer their table's choice. B holds those flows pinned to the same
//! real addresses within a bound (the window is printed); then the client's route moves to
//! B and every connection keeps answering from its own server (without the pins, the
//! exceptions would reach the new server, which resets them). A pin for a flow B already
//! carries to another server is refused (B's own choice wins); pin envelopes from a host
//! that is no peer, with a forged MAC, malformed, for an unknown server or service are
//! refused and counted. Runs as root.
use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use anycast_common::{wire, FlowKey, PROTO_TCP};
use anycast_ctl::{
    dataplane::FlowPin,
    relay::{self, Envelope},
};
use anycast_tests::{
    agreement::{of_server, tables},
    second_agent::{send_as_a, send_to_b, SecondAgent, A_ADDR, B_ADDR},
    topology::{Held, ServerMode, Topology, ANYCAST_V4, HTTP_PORT},
    wait_until,
};
use anyhow::{Context as _, Result};

const CLIENT: &str = "10.71.1.11";
const PAIR_KEY_HEX: &str = "a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4";
/// Connections held open through A.
const CONNECTIONS: usize = 40;

fn pair_key() -> Vec<u8> {
    anycast_tests::unhex(PAIR_KEY_HEX).expect("a hex key")
}

/// Agent B on the servers' bridge, with A as its relay peer.
fn start_b(topo: &Topology) -> Result<SecondAgent> {
    SecondAgent::start(
        topo,
        "acfpb",
        serde_json::json!({
            "id": "b",
            "digest_interval_ms": 200,
            "peers": [{"id": "a", "address": A_ADDR, "key_file": "ab.key"}],
        }),
    )
}

fn relay_counter(v: &serde_json::Value, name: &str) -> u64 {
    v["relay"]["counters"][name].as_u64().unwrap_or(0)
}

/// The client's TCP flows to the web service: client port -> (server real address, learned).
fn client_flows(flows: &serde_json::Value) -> BTreeMap<u16, (String, bool)> {
    flows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["client"] == CLIENT && f["protocol"] == "tcp" && f["port"] == HTTP_PORT)
        .filter_map(|f| {
            Some((
                f["client_port"].as_u64()? as u16,
                (f["server"].as_str()?.to_string(), f["learned"] == true),
            ))
        })
        .collect()
}

/// Entries of web4 in a table, for a server (from `status --json`).
fn table_entries(status: &serde_json::Value, real: &str) -> u64 {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["address"] == ANYCAST_V4.to_string() && s["protocol"] == "tcp")
        .flat_map(|s| s["servers"].as_array().cloned().unwrap_or_default())
        .filter(|x| x["address"] == real)
        .map(|x| x["table_entries"].as_u64().unwrap_or(0))
        .sum()
}

/// A pin of the client's flow from `port` to `server`.
fn pin(port: u16, anycast_port: u16, server: &str) -> FlowPin {
    FlowPin {
        key: FlowKey::new(
            CLIENT.parse().unwrap(),
            IpAddr::V4(ANYCAST_V4),
            PROTO_TCP,
            port,
            anycast_port,
        ),
        server: server.parse().unwrap(),
        closing: false,
        idle_left_secs: 300,
    }
}

/// A pin envelope "from a" to B, MAC'd with `key`, stamped now.
fn pin_envelope(pins: Vec<FlowPin>, key: &[u8]) -> Vec<u8> {
    relay::encode(
        &Envelope {
            sender: "a".into(),
            receiver: "b".into(),
            timestamp: wire::ntp_now(),
            body: relay::Body::FlowPins { pins },
        },
        key,
    )
}

#[test]
fn flows_pinned_at_one_agent_reach_their_servers_through_another() -> Result<()> {
    let mut topo = Topology::build("acfp", 1, 3, ServerMode::Registering { lifetime_secs: 60 })?;
    let key_path = topo.dir.join("ab.key");
    fs::write(&key_path, PAIR_KEY_HEX)?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    topo.registration_extra = serde_json::json!({
        "probe": null,
        "relay": {"id": "a", "digest_interval_ms": 200,
                  "peers": [{"id": "b", "address": B_ADDR, "key_file": "ab.key"}]},
    });
    topo.start_agent(0)?;
    let b = start_b(&topo)?;
    // The router reaches the anycast address through B (used once the client's route
    // moves there).
    topo.net
        .ip(&["route", "add", &format!("{ANYCAST_V4}/32"), "via", B_ADDR])?;
    topo.start_server(0)?;
    topo.start_server(1)?;
    wait_until(
        "B holds s1's and s2's bindings",
        Duration::from_secs(10),
        || {
            let x = b.ctl_json("bindings")?;
            Ok(of_server(&x, "s1") == 4 && of_server(&x, "s2") == 4)
        },
    )?;
    wait_until("the tables agree", Duration::from_secs(5), || {
        Ok(tables(&topo.status()?) == tables(&b.ctl_json("status")?))
    })?;

    // Long-lived connections through A.
    let mut held: Vec<Held> = topo.clients[0].in_ns(|| {
        (0..CONNECTIONS)
            .map(|_| Held::open(Topology::anycast(false, HTTP_PORT)))
            .collect()
    })?;
    let first: BTreeMap<u16, String> = held
        .iter()
        .map(|h| (h.local_port(), h.server.clone()))
        .collect();
    assert_eq!(first.len(), CONNECTIONS);
    let at_a = client_flows(&serde_json::from_str(&topo.ctl(&["flows", "--json"])?)?);
    assert_eq!(at_a.len(), CONNECTIONS, "{at_a:?}");
    assert!(client_flows(&b.ctl_json("flows")?).is_empty(), "B saw none");

    // s3 registers: both tables give it a share, and the flows A holds on s1 and s2 whose
    // hash s3 now owns are exceptions.
    let s3 = topo.servers[2].v4.to_string();
    let registered = Instant::now();
    topo.start_server(2)?;
    let mut table_at_a = None;
    let mut exceptions = 0;
    let mut pinned_at_b = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let status = topo.status()?;
        if table_at_a.is_none() && table_entries(&status, &s3) > 0 {
            table_at_a = Some(Instant::now());
        }
        exceptions = relay_counter(&status, "flow_exceptions");
        pinned_at_b = client_flows(&b.ctl_json("flows")?)
            .into_iter()
            .filter(|(_, (_, learned))| *learned)
            .collect();
        if table_at_a.is_some() && exceptions > 0 && pinned_at_b.len() as u64 == exceptions {
            break;
        }
    }
    let table_at_a = table_at_a.context("s3 never entered A's table")?;
    let window = table_at_a.elapsed();
    println!(
        "s3 in A's table {:.0} ms after it started; {exceptions} of {CONNECTIONS} flows \
         pinned at B {:.1} ms after A's table showed s3 (the window)",
        table_at_a.duration_since(registered).as_secs_f64() * 1e3,
        window.as_secs_f64() * 1e3
    );
    assert!(exceptions > 0, "no flow became an exception");
    assert_eq!(pinned_at_b.len() as u64, exceptions, "{pinned_at_b:?}");
    // Sent after the publish, not at the next sweep (every second).
    assert!(window < Duration::from_millis(300), "{window:?}");
    // Each pinned to the server it has at A, which is not s3.
    let at_a = client_flows(&serde_json::from_str(&topo.ctl(&["flows", "--json"])?)?);
    for (port, (server, _)) in &pinned_at_b {
        assert_eq!(Some(server), at_a.get(port).map(|x| &x.0), "port {port}");
        assert_ne!(server, &s3);
    }
    let bs = b.ctl_json("status")?;
    assert_eq!(relay_counter(&bs, "pins_installed"), exceptions);
    assert!(relay_counter(&bs, "relay_received_pins") >= exceptions);
    wait_until("the tables agree again", Duration::from_secs(5), || {
        Ok(tables(&topo.status()?) == tables(&b.ctl_json("status")?))
    })?;

    // The client's route moves to B (through the router): every connection answers from
    // its own server, the exceptions through their pins, the rest through B's table.
    topo.clients[0].ip(&[
        "route",
        "replace",
        &format!("{ANYCAST_V4}/32"),
        "via",
        "10.71.1.1",
    ])?;
    let hits_before = b.ctl_json("status")?;
    let answers: Vec<(u16, String)> = held
        .iter_mut()
        .map(|h| Ok((h.local_port(), h.ask()?)))
        .collect::<Result<_>>()?;
    for (port, server) in &answers {
        assert_eq!(Some(server), first.get(port), "port {port} moved servers");
    }
    let at_b = client_flows(&b.ctl_json("flows")?);
    assert_eq!(at_b.len(), CONNECTIONS, "B carries them all now: {at_b:?}");
    let service_packets = |v: &serde_json::Value| -> u64 {
        v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["packets"].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(
        service_packets(&b.ctl_json("status")?)
            >= service_packets(&hits_before) + CONNECTIONS as u64
    );

    // B's own choice wins: a pin for a flow B carries (not learned) to another server is
    // refused, and the connection stays where it is.
    let (&own_port, (own_server, _)) = at_b
        .iter()
        .find(|(_, (_, learned))| !learned)
        .context("a flow of B's own")?;
    let other = topo
        .servers
        .iter()
        .map(|s| s.v4.to_string())
        .find(|s| s != own_server)
        .unwrap();
    let before = b.ctl_json("status")?;
    send_as_a(
        &b,
        &topo.agent,
        || pin_envelope(vec![pin(own_port, HTTP_PORT, &other)], &pair_key()),
        |now| {
            relay_counter(now, "pins_refused_local") > relay_counter(&before, "pins_refused_local")
        },
    )?;
    let h = held
        .iter_mut()
        .find(|h| h.local_port() == own_port)
        .unwrap();
    assert_eq!(&h.ask()?, first.get(&own_port).unwrap());

    // Hostile: from a host that is no peer, a forged MAC, a malformed body (21 pins), a
    // server B does not have, a service B does not have.
    let before = b.ctl_json("status")?;
    let stranger = pin(40000, HTTP_PORT, "10.71.2.11");
    // An anycast address B serves nothing on (the servers bind every port of theirs).
    let mut unknown_service = pin(40002, HTTP_PORT, "10.71.2.11");
    unknown_service.key.dst = anycast_common::addr_words("10.71.100.9".parse()?).0;
    send_to_b(
        &topo.servers[0].ns,
        "10.71.2.11",
        vec![pin_envelope(vec![stranger], &pair_key())],
    )?;
    // Refused before the replay check: a forged MAC, a malformed body.
    send_to_b(
        &topo.agent,
        A_ADDR,
        vec![
            pin_envelope(vec![stranger], b"not the key a and b share"),
            pin_envelope(vec![stranger; 21], &pair_key()),
        ],
    )?;
    for (pins, counter) in [
        (
            vec![pin(40001, HTTP_PORT, "10.71.2.99")],
            "pins_refused_unknown_server",
        ),
        (vec![unknown_service], "pins_refused_unknown_service"),
    ] {
        send_as_a(
            &b,
            &topo.agent,
            || pin_envelope(pins.clone(), &pair_key()),
            |now| relay_counter(now, counter) > relay_counter(&before, counter),
        )?;
    }
    let counters = [
        "relay_refused_unknown_peer",
        "relay_refused_auth",
        "relay_refused_malformed",
        "pins_refused_unknown_server",
        "pins_refused_unknown_service",
    ];
    let counted = wait_until("B counts the five", Duration::from_secs(2), || {
        let now = b.ctl_json("status")?;
        Ok(counters
            .iter()
            .all(|c| relay_counter(&now, c) > relay_counter(&before, c)))
    });
    if counted.is_err() {
        let now = b.ctl_json("status")?;
        panic!(
            "B's counters before {} and after {}",
            before["relay"]["counters"], now["relay"]["counters"]
        );
    }
    let after = b.ctl_json("status")?;
    for c in counters {
        assert_eq!(
            relay_counter(&after, c) - relay_counter(&before, c),
            1,
            "{c}"
        );
    }
    let flows = client_flows(&b.ctl_json("flows")?);
    for port in [40000, 40001, 40002] {
        assert!(!flows.contains_key(&port), "port {port} pinned: {flows:?}");
    }
    println!("B's relay counters: {}", after["relay"]["counters"]);
    // The connections still answer from their servers.
    for h in held.iter_mut() {
        assert_eq!(&h.ask()?, first.get(&h.local_port()).unwrap());
    }
    Ok(())
}
