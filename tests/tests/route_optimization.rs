//! Route optimization end to end, in network namespaces (`acrp*`): the operator's PKI made
//! with `anycast-ctl pki`, two servers registered with the agent and holding certificates
//! (`--certificate --signing-key`), and a client running `anycast-ctl client`:
//!
//! 1. an impostor on the client's link (the router) sends bad bindings: self-signed, an
//!    expired certificate, another anycast address, a real address outside its
//!    certificate, a bad signature, garbage; and a binding of the real server replayed
//!    (from the server's own address, as a spoofing attacker would). Each is refused and
//!    counted by the daemon, no binding is taken, and traffic goes through the agent;
//! 2. a connection's first packets go through the agent; its server sees a new client and
//!    sends a binding; the client takes it and the connection's later packets go to the
//!    server directly (the agent's counters for that server stop; the client's tunnel
//!    counts them): the connection answers every request through the switch;
//! 3. the next connections go direct from their first packet (the agent sees nothing);
//! 4. the server is stopped (SIGTERM): it sends lifetime 0, the client goes back to the
//!    agent, the open connection still answers (through the agent, which drains it to its
//!    server) and new connections go to the other server;
//! 5. the other server binds the client too; then its daemon stops answering (SIGSTOP; its
//!    service and decapsulation go on): the client, still sending through the tunnel, ends
//!    the binding after `--unanswered-timeout` and goes back to the agent; the connection
//!    answers throughout.
//!
//! Runs as root.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anycast_common::{
    pki::{CertPrefix, Certificate, CertificateBody, SigningKey},
    wire::{self, Body, Message, Options, ServiceSelector},
};
use anycast_tests::{
    route_opt::{self, agent_packets},
    topology::{http_get, udp_ask, Held, ServerMode, Topology, HTTP_PORT, UDP_PORT},
    unhex, wait_until,
};

const CLIENT: &str = "10.71.1.11";
/// The router's address on the clients' link: where the impostor sends from.
const IMPOSTOR: &str = "10.71.1.1";
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let bytes = unhex(std::fs::read_to_string(path)?.trim())?;
    Ok(SigningKey::from_bytes(&bytes.as_slice().try_into()?))
}

fn host(s: &str) -> CertPrefix {
    let a = ip(s);
    CertPrefix::new(a, if a.is_ipv4() { 32 } else { 128 }).unwrap()
}

fn cert(issuer: &SigningKey, key: &SigningKey, id: &str, real: &str, valid: (u64, u64)) -> Vec<u8> {
    let body = CertificateBody {
        serial: 900,
        not_before: valid.0,
        not_after: valid.1,
        subject_key: key.verifying_key().to_bytes(),
        identity: id.into(),
        real: vec![host(real)],
        anycast: vec![host("10.71.100.1")],
    };
    Certificate::issue(body, issuer)
        .unwrap()
        .as_bytes()
        .to_vec()
}

/// A client binding for tcp/80 of `anycast`, sent at `sent` (Unix seconds).
fn binding(cert: Vec<u8>, signer: &SigningKey, anycast: &str, real: &str, sent: u64) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(ip(anycast)),
        dst: wire::to_mapped(ip(CLIENT)),
        body: Body::ClientBindingUpdate {
            seq: 7,
            lifetime: 15,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped(ip(real))),
            mesg_id: Some((sent + NTP_UNIX_OFFSET) << 32),
            service: Some(ServiceSelector {
                protocol: 6,
                port: HTTP_PORT,
            }),
            certificate: Some(cert),
            ..Options::default()
        },
    };
    wire::encode_signed(&msg, signer).unwrap()
}

struct Client {
    status: PathBuf,
}

impl Client {
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            &self.status,
        )?)?)
    }

    fn counter(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.status()?["counters"][name].as_u64().unwrap_or(0))
    }

    fn tunnelled(&self) -> anyhow::Result<u64> {
        Ok(route_opt::tunnelled(&self.status()?))
    }

    /// The server holding the binding for tcp/80 of the IPv4 anycast address, if any.
    fn bound_to(&self) -> anyhow::Result<Option<String>> {
        self.bound_for("10.71.100.1 tcp/80")
    }

    fn bound_for(&self, service: &str) -> anyhow::Result<Option<String>> {
        Ok(route_opt::binding_field(&self.status()?, service, "server"))
    }
}

fn send_from(topo: &Topology, ns: &anycast_tests::netns::Netns, from: IpAddr, payload: Vec<u8>) {
    let _ = topo;
    ns.in_ns(move || {
        let s = UdpSocket::bind(SocketAddr::new(from, 0))?;
        s.send_to(&payload, SocketAddr::new(ip(CLIENT), wire::CLIENT_PORT))?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn route_optimization_binds_clients_refuses_impostors_and_falls_back() -> anyhow::Result<()> {
    let mut topo = Topology::build("acrp", 1, 2, ServerMode::Registering { lifetime_secs: 60 })?;
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 2)?;
    // Rare probes: in step 5 a server's daemon is stopped while its service goes on, and the
    // agent must not declare it dead meanwhile (the client's fallback is what is tested).
    topo.registration_extra = serde_json::json!({
        "probe": {"interval_ms": 10000, "timeout_ms": 200, "misses": 3},
    });
    topo.server_args = route_opt::server_args(&dir, 12);
    route_opt::start_agent_and_servers(&mut topo, 2)?;
    let mut daemon = route_opt::start_client(
        &topo.clients[0],
        &dir,
        1,
        &["--unanswered-timeout", "6", "--checks-per-second", "200"],
    )?;
    let client = Client {
        status: route_opt::status_file(&dir, 1),
    };

    // 1. Impostors.
    let operator = signing_key(&dir.join("operator.key"))?;
    let impostor = SigningKey::from_bytes(&[0x66; 32]);
    let s1 = signing_key(&dir.join("ro-s1.key"))?;
    let t = now();
    let day = (t - 60, t + 86_400);
    let s1_cert = std::fs::read_to_string(dir.join("ro-s1.cert"))?;
    let s1_cert = unhex(s1_cert.trim())?;
    let certified_impostor = cert(&operator, &impostor, "s9", IMPOSTOR, day);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "refused_untrusted_certificate",
            binding(
                cert(&impostor, &impostor, "s9", IMPOSTOR, day),
                &impostor,
                "10.71.100.1",
                IMPOSTOR,
                t,
            ),
        ),
        (
            "refused_certificate_expired",
            binding(
                cert(&operator, &impostor, "s9", IMPOSTOR, (t - 7200, t - 3600)),
                &impostor,
                "10.71.100.1",
                IMPOSTOR,
                t,
            ),
        ),
        (
            "refused_anycast_not_certified",
            binding(
                certified_impostor.clone(),
                &impostor,
                "10.71.100.9",
                IMPOSTOR,
                t,
            ),
        ),
        (
            "refused_real_not_certified",
            binding(
                certified_impostor,
                &impostor,
                "10.71.100.1",
                "10.71.2.99",
                t,
            ),
        ),
        (
            "refused_bad_signature",
            binding(s1_cert.clone(), &impostor, "10.71.100.1", "10.71.2.11", t),
        ),
        ("refused_malformed_truncated", vec![0x3b, 0x02, 0x05]),
    ];
    for (_, payload) in &cases {
        send_from(&topo, &topo.net, ip(IMPOSTOR), payload.clone());
    }
    let check_refusals = |names: &[&str]| -> anyhow::Result<bool> {
        let s = client.status()?;
        Ok(names
            .iter()
            .all(|n| s["counters"][*n].as_u64().unwrap_or(0) >= 1))
    };
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let refused = wait_until("each impostor refused", Duration::from_secs(5), || {
        check_refusals(&names)
    });
    if let Err(e) = refused {
        panic!("{e:#}: {}", client.status()?);
    }
    assert_eq!(client.bound_to()?, None, "no impostor's binding taken");

    // A flood of forgeries that cost a full check each (a bad signature is found after the
    // certificate's): 5000 in 2.5 s, ten times --checks-per-second (200 here), paced so the
    // socket's buffer does not drop them first. At most the rate's worth (and one second's
    // burst) is checked; the rest is dropped unchecked and counted.
    const FLOOD: usize = 5000;
    let forged = binding(s1_cert.clone(), &impostor, "10.71.100.1", "10.71.2.11", t);
    let checked0 = client.counter("refused_bad_signature")?;
    let start = std::time::Instant::now();
    topo.net.in_ns(move || {
        let s = UdpSocket::bind(SocketAddr::new(ip(IMPOSTOR), 0))?;
        for _ in 0..FLOOD / 100 {
            for _ in 0..100 {
                let _ = s.send_to(&forged, SocketAddr::new(ip(CLIENT), wire::CLIENT_PORT));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })?;
    let mut last = (0, 0);
    let mut settled_at = start.elapsed();
    wait_until("the flood handled", Duration::from_secs(15), || {
        let now = (
            client.counter("received")?,
            client.counter("refused_bad_signature")?,
        );
        if now != last {
            settled_at = start.elapsed();
        }
        let settled = now == last;
        last = now;
        std::thread::sleep(Duration::from_millis(600));
        Ok(settled)
    })?;
    let checked = client.counter("refused_bad_signature")? - checked0;
    let limited = client.counter("dropped_rate_limited")?;
    println!(
        "flood: {FLOOD} forged bindings in 2.5 s: {} received, {checked} checked, {limited} \
         dropped by the rate limit, {} by the full queue, all handled within {settled_at:?}",
        client.counter("received")?,
        client.counter("dropped_queue_full")?
    );
    let allowed = 200 + (200.0 * settled_at.as_secs_f64()) as u64;
    assert!(
        checked <= allowed,
        "{checked} checks in {settled_at:?}, more than the rate allows"
    );
    assert!(limited >= 2000, "the rate limit dropped most of them");
    let before = agent_packets(&topo, None)?;
    // A UDP question (answered at once, one datagram: a UDP flow is bound only once it
    // lasted 500 ms; an HTTP connection would get its server to bind the client already).
    let (answered, _) = topo.clients[0].in_ns(|| udp_ask(Topology::anycast(false, UDP_PORT)))?;
    assert_eq!(client.bound_to()?, None);
    assert!(
        agent_packets(&topo, None)? > before,
        "after the impostors, traffic goes through the agent"
    );
    println!("after the impostors, answered by {answered} through the agent");

    // 2. A connection: through the agent first, then straight to its server.
    let opened = std::time::Instant::now();
    let mut held = topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT)))?;
    let server = held.server.clone();
    let mut asks = 1;
    // The connection answers throughout the switch.
    wait_until(
        "the client bound to its server",
        Duration::from_secs(5),
        || {
            assert_eq!(
                held.ask()
                    .expect("a request on the held connection (never retried)"),
                server,
                "the connection keeps its server"
            );
            asks += 1;
            Ok(client.bound_to()? == Some(server.clone()))
        },
    )?;
    println!(
        "bound to {server} {:?} after the connection opened ({asks} requests on it)",
        opened.elapsed()
    );
    // The map write is done before the status says so: every later packet is tunnelled.
    let (agent0, tunnel0) = (agent_packets(&topo, Some(&server))?, client.tunnelled()?);
    for _ in 0..20 {
        assert_eq!(held.ask()?, server);
    }
    wait_until("the tunnel's counters read", Duration::from_secs(2), || {
        Ok(client.tunnelled()? >= tunnel0 + 20)
    })?;
    let agent1 = agent_packets(&topo, Some(&server))?;
    println!(
        "20 requests: the agent forwarded {} packets to {server}, the client tunnelled {}",
        agent1 - agent0,
        client.tunnelled()? - tunnel0
    );
    assert_eq!(
        agent1, agent0,
        "the agent lets go: no packet of the bound client"
    );

    // A replay of the server's own binding (from its address, as a spoofer would send it):
    // older than the last one taken.
    let real: IpAddr = if server == "s1" {
        ip("10.71.2.11")
    } else {
        ip("10.71.2.12")
    };
    let (srv_cert, srv_key) = if server == "s1" {
        (s1_cert.clone(), s1.clone())
    } else {
        (
            unhex(std::fs::read_to_string(dir.join("ro-s2.cert"))?.trim())?,
            signing_key(&dir.join("ro-s2.key"))?,
        )
    };
    let idx = if server == "s1" { 0 } else { 1 };
    let replay = binding(srv_cert, &srv_key, "10.71.100.1", &real.to_string(), t - 5);
    send_from(&topo, &topo.servers[idx].ns, real, replay);
    wait_until("the replay refused", Duration::from_secs(5), || {
        Ok(client.counter("refused_replayed")? >= 1)
    })?;
    assert_eq!(client.bound_to()?, Some(server.clone()));

    // 3. New connections go direct from their first packet.
    let all0 = agent_packets(&topo, None)?;
    let answers = topo.clients[0].in_ns(|| {
        (0..10)
            .map(|_| http_get(Topology::anycast(false, HTTP_PORT)))
            .collect::<anyhow::Result<Vec<String>>>()
    })?;
    assert!(answers.iter().all(|a| *a == server), "{answers:?}");
    assert_eq!(
        agent_packets(&topo, None)?,
        all0,
        "10 new connections while bound: the agent saw none of their packets"
    );

    // The same over IPv6: a connection through the agent, then bound (the server's IPv6
    // real address), then direct.
    let mut held6 = topo.clients[0].in_ns(|| Held::open(Topology::anycast(true, HTTP_PORT)))?;
    let server6 = held6.server.clone();
    wait_until("the client bound over IPv6", Duration::from_secs(5), || {
        assert_eq!(
            held6
                .ask()
                .expect("a request on the held connection (never retried)"),
            server6
        );
        Ok(client.bound_for("fd71:100::1 tcp/80")?.is_some())
    })?;
    let all6 = agent_packets(&topo, None)?;
    for _ in 0..10 {
        assert_eq!(held6.ask()?, server6);
    }
    assert_eq!(agent_packets(&topo, None)?, all6, "IPv6: bound, direct");
    held6.reset();

    // 4. The server stops: lifetime 0, back to the agent without a failed connection.
    let pid = topo.servers[idx].decap.as_ref().unwrap().pid().unwrap();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_until("the binding withdrawn", Duration::from_secs(5), || {
        Ok(client.counter("withdrawn")? >= 1 && client.bound_to()?.is_none())
    })?;
    let back0 = agent_packets(&topo, None)?;
    assert_eq!(
        held.ask()?,
        server,
        "the open connection survives the withdrawal (through the agent, drained to it)"
    );
    assert!(
        agent_packets(&topo, None)? > back0,
        "back through the agent"
    );
    let other = if server == "s1" { "s2" } else { "s1" };
    wait_until(
        "the stopped server deregistered",
        Duration::from_secs(10),
        || Ok(!topo.active_servers()?.contains(&server)),
    )?;
    let answers = topo.clients[0].in_ns(|| {
        (0..5)
            .map(|_| http_get(Topology::anycast(false, HTTP_PORT)))
            .collect::<anyhow::Result<Vec<String>>>()
    })?;
    assert!(answers.iter().all(|a| a == other), "{answers:?}");
    held.reset();
    let decap = topo.servers[idx].decap.as_mut().unwrap();
    decap.wait_exit(Duration::from_secs(35))?;
    let out = decap.output();
    assert!(out.contains("sent lifetime 0 to"), "{out}");

    // 5. The other server's daemon stops answering (SIGSTOP: its decapsulation and service
    //    go on, its refreshes stop). The client, still sending through the tunnel, ends
    //    the binding after --unanswered-timeout and goes back to the agent; the connection
    //    answers throughout.
    let oidx = 1 - idx;
    let mut held = topo.clients[0].in_ns(|| Held::open(Topology::anycast(false, HTTP_PORT)))?;
    assert_eq!(held.server, other);
    wait_until(
        "the client bound to the other server",
        Duration::from_secs(5),
        || {
            assert_eq!(
                held.ask()
                    .expect("a request on the held connection (never retried)"),
                other
            );
            Ok(client.bound_to()? == Some(other.to_string()))
        },
    )?;
    let opid = topo.servers[oidx].decap.as_ref().unwrap().pid().unwrap();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(opid as i32, libc::SIGSTOP) };
    // Continued however the test ends.
    struct Continue(u32);
    impl Drop for Continue {
        fn drop(&mut self) {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
        }
    }
    let resume = Continue(opid);
    let stopped = std::time::Instant::now();
    let fell_back = wait_until(
        "the binding ended unanswered",
        Duration::from_secs(15),
        || {
            assert_eq!(
                held.ask()
                    .expect("a request on the held connection (never retried)"),
                other,
                "the connection keeps answering"
            );
            std::thread::sleep(Duration::from_millis(100));
            Ok(client.counter("ended_unanswered")? >= 1 && client.bound_to()?.is_none())
        },
    );
    fell_back?;
    println!(
        "the silent server's binding ended {:?} after its daemon stopped",
        stopped.elapsed()
    );
    let (via0, tun0) = (agent_packets(&topo, None)?, client.tunnelled()?);
    let pass0 = client.status()?["tunnel"]["pass_not_bound"]
        .as_u64()
        .unwrap_or(0);
    for _ in 0..5 {
        assert_eq!(held.ask()?, other);
    }
    if let Err(e) = wait_until("the tunnel's counters read", Duration::from_secs(2), || {
        Ok(client.status()?["tunnel"]["pass_not_bound"]
            .as_u64()
            .unwrap_or(0)
            >= pass0 + 5)
    }) {
        panic!("{e:#}: {}", client.status()?);
    }
    assert_eq!(
        client.tunnelled()?,
        tun0,
        "nothing tunnelled after the fallback"
    );
    let via1 = agent_packets(&topo, None)?;
    println!(
        "after the fallback: 5 requests, the agent forwarded {} packets",
        via1 - via0
    );
    assert!(
        via1 > via0,
        "after the fallback the connection goes through the agent"
    );
    // The server answers again: its next refresh binds the client again.
    drop(resume);
    wait_until(
        "bound again once the server answers",
        Duration::from_secs(10),
        || {
            assert_eq!(
                held.ask()
                    .expect("a request on the held connection (never retried)"),
                other
            );
            std::thread::sleep(Duration::from_millis(100));
            Ok(client.bound_to()? == Some(other.to_string()))
        },
    )?;
    println!("{}", client.status()?);
    daemon.stop_with(libc::SIGTERM, Duration::from_secs(5))?;
    Ok(())
}
