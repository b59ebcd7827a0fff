//! Agent discovery end to end: two agents relaying to each other, both holding the address
//! all agents share (the discovery address, on `lo`; the servers route it to agent A, the
//! "nearest"). A server given only the discovery address (`--agent-discovery`) finds both
//! agents and registers with each directly; a server that sends its binding updates to the
//! discovery address itself (`--agent DISCOVERY`) is bound at A, which answers it (also its
//! refresh requests, from the discovery address) and relays it to B. Forged, misplaced and
//! replayed discovery requests are counted and not answered. Runs as root.
use std::{
    fs,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use anycast_common::wire::{self, AgentEntry, Body, Key, Message, Options};
use anycast_tests::{
    netns::Netns,
    second_agent::SecondAgent,
    topology::{self, ServerMode, Topology, ANYCAST_V4, ANYCAST_V6},
    wait_until, workspace_bin,
};
use anyhow::{Context as _, Result};

const A_ADDR: &str = "10.71.1.2";
const A_ADDR6: &str = "fd71:1::2";
/// A's address on the servers' bridge: the servers' route to the discovery address.
const A_SERVER_SIDE: &str = "10.71.2.2";
const A_SERVER_SIDE6: &str = "fd71:2::2";
const B_ADDR: &str = "10.71.2.3";
const B_ADDR6: &str = "fd71:2::3";
const DISCOVERY: &str = "10.71.9.9";
const DISCOVERY6: &str = "fd71:9::9";
const PAIR_KEY_HEX: &str = "8a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9";
/// Each server binds both anycast addresses through both its real addresses.
const PER_SERVER: usize = 4;

/// The discovery address on an agent's `lo`: each agent answers on it.
fn hold_discovery_address(ns: &Netns) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{DISCOVERY}/32"), "dev", "lo"])?;
    ns.ip(&["addr", "add", &format!("{DISCOVERY6}/128"), "dev", "lo"])?;
    Ok(())
}

/// Agent B on the servers' bridge: A's policy, its own addresses, A as its peer, the same
/// discovery address.
fn start_b(topo: &Topology) -> Result<SecondAgent> {
    SecondAgent::start_with(
        topo,
        "acdib",
        serde_json::json!({
            "id": "b",
            "digest_interval_ms": 200,
            "peers": [{"id": "a", "address": A_ADDR, "key_file": "ab.key",
                       "agent_addresses": [A_ADDR, A_ADDR6]}],
        }),
        |ns, _| hold_discovery_address(ns),
    )
}

/// Starts `anycast-ctl server` for server `i` (0-based) with `how` (its agent arguments).
fn start_server(topo: &mut Topology, i: usize, how: &[&str]) -> Result<()> {
    let ctl = workspace_bin("anycast-ctl")?;
    let name = format!("s{}", i + 1);
    let key = topo.key_file(i + 1).to_string_lossy().into_owned();
    let spi = topology::spi_of(&name).to_string();
    let (v4, v6) = (ANYCAST_V4.to_string(), ANYCAST_V6.to_string());
    let mut args = vec![
        "server",
        "--iface",
        "eth0",
        "--anycast",
        &v4,
        "--anycast",
        &v6,
        "--xdp-mode",
        "native",
        "--id",
        &name,
        "--key",
        &key,
        "--spi",
        &spi,
        "--lifetime",
        "20",
        "--drain-timeout",
        "1",
    ];
    args.extend_from_slice(how);
    let s = &mut topo.servers[i];
    let mut proc = s.ns.spawn(&format!("server {name}"), &ctl, &args)?;
    proc.wait_for_line("server ready", Duration::from_secs(20))?;
    s.decap = Some(proc);
    Ok(())
}

fn of_server<'a>(
    bindings: &'a serde_json::Value,
    server: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    bindings["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |b| b["server"] == server)
}

fn counter(bindings: &serde_json::Value, name: &str) -> u64 {
    bindings["counters"][name].as_u64().unwrap_or(0)
}

/// A discovery request of `id` signed with `key` (as server `spi`'s), to the IPv4 discovery
/// address.
fn request(id: &str, key: &[u8], spi: u32, from: &str, signed: bool) -> Vec<u8> {
    request_to(DISCOVERY, id, key, spi, from, signed)
}

fn request_to(to: &str, id: &str, key: &[u8], spi: u32, from: &str, signed: bool) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(from.parse().unwrap()),
        dst: wire::to_mapped(to.parse().unwrap()),
        body: Body::DiscoveryRequest,
        options: Options {
            mn_id: Some(id.into()),
            mesg_id: Some(wire::ntp_now()),
            ..Options::default()
        },
    };
    wire::encode(&msg, signed.then_some(Key { spi, secret: key }))
}

/// Sends each datagram from `from` (inside `ns`) to the discovery address of `from`'s family
/// and returns what came back to each within `wait`.
fn ask(
    ns: &Netns,
    from: &str,
    datagrams: Vec<Vec<u8>>,
    wait: Duration,
) -> Result<Vec<Option<Vec<u8>>>> {
    let from: IpAddr = from.parse()?;
    let discovery = if from.is_ipv4() {
        DISCOVERY
    } else {
        DISCOVERY6
    };
    let to = SocketAddr::new(discovery.parse()?, wire::DEFAULT_PORT);
    ns.in_ns(move || {
        let sock = UdpSocket::bind(SocketAddr::new(from, 0))?;
        sock.set_read_timeout(Some(wait))?;
        let mut out = Vec::new();
        for d in datagrams {
            sock.send_to(&d, to)?;
            let mut buf = vec![0u8; 4096];
            out.push(match sock.recv_from(&mut buf) {
                Ok((n, src)) => {
                    assert_eq!(src, to, "answered from the discovery address");
                    Some(buf[..n].to_vec())
                }
                Err(_) => None,
            });
        }
        Ok(out)
    })
}

#[test]
fn a_server_given_only_the_discovery_address_registers_with_every_agent() -> Result<()> {
    let mut topo = Topology::build("acdi", 0, 2, ServerMode::Registering { lifetime_secs: 20 })?;
    let key_path = topo.dir.join("ab.key");
    fs::write(&key_path, PAIR_KEY_HEX)?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    hold_discovery_address(&topo.agent)?;
    topo.registration_extra = serde_json::json!({
        "discovery_address": {"v4": DISCOVERY, "v6": DISCOVERY6},
        "relay": {"id": "a", "digest_interval_ms": 200,
                  "peers": [{"id": "b", "address": B_ADDR, "key_file": "ab.key",
                             "agent_addresses": [B_ADDR, B_ADDR6]}]},
    });
    topo.start_agent(0)?;
    let b = start_b(&topo)?;
    // The discovery address is anycast: the servers' routers take it to the nearest
    // agent, here A.
    for s in &topo.servers {
        s.ns.ip(&[
            "route",
            "add",
            &format!("{DISCOVERY}/32"),
            "via",
            A_SERVER_SIDE,
        ])?;
        s.ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{DISCOVERY6}/128"),
            "via",
            A_SERVER_SIDE6,
        ])?;
    }

    // s1, given only the discovery address, is registered directly with both agents.
    let start = Instant::now();
    start_server(&mut topo, 0, &["--agent-discovery", DISCOVERY])?;
    wait_until(
        "s1 registered at A and at B",
        Duration::from_secs(10),
        || {
            let (x, y) = (topo.bindings()?, b.ctl_json("bindings")?);
            // B's direct counters count only s1's updates: s2 is not running yet.
            Ok(of_server(&x, "s1").count() == PER_SERVER
                && of_server(&y, "s1").count() == PER_SERVER
                && counter(&y, "registered") + counter(&y, "refreshed") >= PER_SERVER as u64)
        },
    )?;
    println!(
        "s1 bound at both agents {:.0} ms after it started",
        start.elapsed().as_secs_f64() * 1e3
    );
    let (x, y) = (topo.bindings()?, b.ctl_json("bindings")?);
    assert!(counter(&x, "discovery_answered") >= 1, "{x:#}");
    assert_eq!(
        counter(&y, "discovery_answered"),
        0,
        "the nearest agent answered"
    );
    assert!(counter(&x, "registered") + counter(&x, "refreshed") >= PER_SERVER as u64);
    let log = topo.servers[0].decap.as_mut().context("s1 runs")?;
    log.wait_for_line(
        &format!("lists agent 'b' at {B_ADDR}:4191"),
        Duration::from_secs(1),
    )?;
    log.wait_for_line(&format!("at {B_ADDR}:4191 for"), Duration::from_secs(1))?;

    // s2 sends its binding updates to the discovery address itself: A takes and answers
    // them and relays them to B.
    start_server(&mut topo, 1, &["--agent", DISCOVERY])?;
    wait_until(
        "s2 bound at A and, relayed, at B",
        Duration::from_secs(10),
        || {
            let (x, y) = (topo.bindings()?, b.ctl_json("bindings")?);
            Ok(of_server(&x, "s2").count() == PER_SERVER
                && of_server(&y, "s2").count() == PER_SERVER)
        },
    )?;
    let y = b.ctl_json("bindings")?;
    assert!(
        of_server(&y, "s2").all(|b| b["relayed_by"] == "a"),
        "B holds s2's bindings by A's relay: {y:#}"
    );
    assert!(of_server(&topo.bindings()?, "s2").all(|b| b["relayed_by"].is_null()));
    topo.servers[1]
        .decap
        .as_mut()
        .context("s2 runs")?
        .wait_for_line(&format!("at {DISCOVERY}:4191 for"), Duration::from_secs(1))?;
    // A probes s2 (a refresh request per anycast address every second; two misses make a
    // binding down) from the discovery address, which s2 answers: three rounds of them
    // reach s2 (it logs each), and its bindings are still up.
    let s2 = topo.servers[1].decap.as_mut().context("s2 runs")?;
    for _ in 0..6 {
        s2.wait_for_line(
            &format!("agent {DISCOVERY}:4191 asks to refresh"),
            Duration::from_secs(4),
        )?;
    }
    let x = topo.bindings()?;
    assert!(
        of_server(&x, "s2").all(|b| b["condition"] == "up"),
        "s2 answers A's refresh requests: {x:#}"
    );

    // Discovery requests that must learn nothing: signed with another server's key, from
    // another server's address (the answer would go there), unsigned; then a genuine one
    // (answered, the list signed with s2's key) and the same bytes again (a replay).
    let (k1, k2) = (topo.server_key(1)?, topo.server_key(2)?);
    let (spi1, spi2) = (topology::spi_of("s1"), topology::spi_of("s2"));
    let before = topo.bindings()?;
    let genuine = request("s2", &k2, spi2, "10.71.2.12", true);
    let answers = ask(
        &topo.servers[1].ns,
        "10.71.2.12",
        vec![
            request("s2", &k1, spi2, "10.71.2.12", true),
            request("s1", &k1, spi1, "10.71.2.12", true),
            request("s2", &k2, spi2, "10.71.2.12", false),
            genuine.clone(),
            genuine,
        ],
        Duration::from_millis(500),
    )?;
    let after = topo.bindings()?;
    let delta = |c: &str| counter(&after, c) - counter(&before, c);
    assert_eq!(delta("discovery_refused_auth"), 2);
    assert_eq!(delta("discovery_refused_source"), 1);
    assert_eq!(delta("discovery_refused_replay"), 1);
    assert_eq!(delta("discovery_answered"), 1);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.is_some(), i == 3, "answer {i}: {a:?}");
    }
    let reply = answers[3]
        .as_ref()
        .context("the genuine request's answer")?;
    assert!(wire::verify(
        reply,
        Key {
            spi: spi2,
            secret: &k2
        }
    ));
    let Body::DiscoveryReply { agents, .. } = wire::decode(reply)?.body else {
        panic!("not a discovery reply");
    };
    let entry = |id: &str, v4: &str, v6: &str| AgentEntry {
        id: id.into(),
        v4: Some(v4.parse().unwrap()),
        v6: Some(v6.parse().unwrap()),
    };
    assert_eq!(
        agents,
        vec![entry("a", A_ADDR, A_ADDR6), entry("b", B_ADDR, B_ADDR6)]
    );
    // Over IPv6 too, with the same list.
    let v6 = ask(
        &topo.servers[1].ns,
        "fd71:2::12",
        vec![request_to(DISCOVERY6, "s2", &k2, spi2, "fd71:2::12", true)],
        Duration::from_secs(2),
    )?;
    let reply6 = v6[0].as_ref().context("no answer over IPv6")?;
    assert!(wire::verify(
        reply6,
        Key {
            spi: spi2,
            secret: &k2
        }
    ));
    assert!(
        matches!(wire::decode(reply6)?.body, Body::DiscoveryReply { agents: ref a, .. } if *a == agents)
    );
    println!(
        "discovery request {} bytes, reply {} bytes",
        request("s2", &k2, spi2, "10.71.2.12", true).len(),
        reply.len()
    );
    Ok(())
}
