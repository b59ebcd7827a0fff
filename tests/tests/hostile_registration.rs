//! Hostile registration, end to end in network namespaces: binding updates that a member (a
//! server with its own valid key) or an attacker with a captured update sends, each built
//! independently with scapy (`tests/oracles/build_bu.py`) since the message is the attack.
//! Every case asserts the status, the counter and that nothing changed: the bindings, and the
//! servers' share of new connections.
//!
//! - A member binding a care-of address it does not own (another server's real address,
//!   loopback, the agent's own address, a client's, an anycast address) is refused with
//!   RFC 6275's "invalid care-of address" (174).
//! - An authentic update captured before an agent restart and replayed after it is refused
//!   with RFC 4285's MIPV6-ID-MISMATCH (144): the restarted agent has the replay state back
//!   from its bindings file, and MESG-IDs older than its start are refused; the binding it
//!   restored is neither renewed nor changed.
//! - Forged updates claiming s1, sent from s1's own address, do not use up s1's budget:
//!   authentication comes before the per-identity rate limit, so s1 keeps answering the
//!   refresh-request probes and never goes down; the refusals are answered only within the
//!   global budget for senders that do not authenticate.
//!
//! Runs as root; needs python3 with scapy.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anycast_common::wire::{self, status, Body};
use anycast_tests::{
    netns::Netns,
    topology::{http_get, spi_of, ServerMode, Topology, ANYCAST_V4, ANYCAST_V6, HTTP_PORT},
    wait_until,
};
use anyhow::{bail, Context as _, Result};

const AGENT: &str = "10.71.1.2";
const LIFETIME: u64 = 8;

/// An authenticated binding update built by scapy, as the UDP payload.
struct Scapy<'a> {
    identity: &'a str,
    key: &'a [u8],
    home: IpAddr,
    coa: IpAddr,
    seq: u16,
    /// Lifetime in 4-second units.
    lifetime: u16,
    service: Option<&'a str>,
    /// The MESG-ID is this far ahead of our clock.
    ahead_secs: u64,
}

impl Scapy<'_> {
    fn build(&self) -> Result<Vec<u8>> {
        let mapped = |a: IpAddr| -> Ipv6Addr { wire::to_mapped(a) };
        let hex: String = self.key.iter().map(|b| format!("{b:02x}")).collect();
        let oracle = Path::new(env!("CARGO_MANIFEST_DIR")).join("oracles/build_bu.py");
        let mut cmd = Command::new("python3");
        cmd.arg(oracle)
            .args(["--home", &mapped(self.home).to_string()])
            .args(["--agent", &mapped(AGENT.parse()?).to_string()])
            .args(["--coa", &mapped(self.coa).to_string()])
            .args(["--mn-id", self.identity])
            .args(["--seq", &self.seq.to_string()])
            .args(["--lifetime", &self.lifetime.to_string()])
            .args(["--spi", &spi_of(self.identity).to_string()])
            .args(["--secret-hex", &hex])
            .args([
                "--mesg-id",
                &(wire::ntp_now() + (self.ahead_secs << 32)).to_string(),
            ])
            .args(["--load", "0,0,0,0,0"]);
        if let Some(s) = self.service {
            cmd.args(["--service", s]);
        }
        let out = cmd
            .output()
            .context("python3 with scapy (python3 -m pip install scapy)")?;
        if !out.status.success() {
            bail!(
                "build_bu.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        anycast_tests::unhex(&String::from_utf8(out.stdout)?)
    }
}

/// Sends `payload` to the agent from `from` inside `ns` and returns the BA's status.
fn send_bu(ns: &Netns, from: IpAddr, payload: Vec<u8>) -> Result<u8> {
    ns.in_ns(move || {
        let sock = UdpSocket::bind(SocketAddr::new(from, 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.send_to(&payload, (AGENT, wire::DEFAULT_PORT))?;
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf)?;
        match wire::decode(&buf[..n])?.body {
            Body::BindingAck { status, .. } => Ok(status),
            b => bail!("expected a binding acknowledgement, got {b:?}"),
        }
    })
}

/// Every binding, without the fields that move on their own (age, lifetime left, seq, load).
fn binding_ids(topo: &Topology) -> Result<BTreeSet<String>> {
    let b = topo.bindings()?;
    Ok(b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "{} {} {} {} {}",
                x["anycast"], x["selector"], x["server"], x["real"], x["state"]
            )
        })
        .collect())
}

/// s3's binding for the captured service: its sequence number and seconds of lifetime left.
fn s3_binding(topo: &Topology) -> Result<Option<(u64, f64)>> {
    let b = topo.bindings()?;
    Ok(b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["server"] == "s3")
        .map(|x| {
            (
                x["seq"].as_u64().unwrap_or(0),
                x["lifetime_left_secs"].as_f64().unwrap_or(0.0),
            )
        }))
}

fn counter(topo: &Topology, name: &str) -> Result<u64> {
    Ok(topo.bindings()?["counters"][name].as_u64().unwrap_or(0))
}

/// `n` HTTP connections from the client to the IPv4 anycast address: answers per server.
fn connections(topo: &Topology, n: usize) -> Result<BTreeMap<String, u32>> {
    let addr = Topology::anycast(false, HTTP_PORT);
    topo.clients[0].in_ns(move || {
        let mut counts = BTreeMap::<String, u32>::new();
        for _ in 0..n {
            *counts.entry(http_get(addr)?).or_default() += 1;
        }
        Ok(counts)
    })
}

fn both_serve(topo: &Topology, what: &str) -> Result<()> {
    let counts = connections(topo, 40)?;
    println!("{what}: {counts:?}");
    for s in ["s1", "s2"] {
        assert!(
            counts.get(s).copied().unwrap_or(0) >= 8,
            "{what}: {s} keeps its share of new connections: {counts:?}"
        );
    }
    Ok(())
}

#[test]
fn members_cannot_bind_addresses_they_do_not_own_and_replays_fail_after_a_restart() -> Result<()> {
    let mut topo = Topology::build(
        "achost",
        1,
        3,
        ServerMode::Registering {
            lifetime_secs: LIFETIME,
        },
    )?;
    topo.start_agent(0)?;
    // s1 and s2 run; s3's namespace and key exist, its server does not run.
    topo.start_server(0)?;
    topo.start_server(1)?;
    wait_until("s1 and s2 registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 2)
    })?;
    both_serve(&topo, "before the attacks")?;

    // s1, with its own valid key, binds care-of addresses it does not own.
    let key = |i: usize| -> Result<Vec<u8>> {
        anycast_ctl::registration::keys::read_key(&topo.key_file(i))
    };
    let s1_key = key(1)?;
    let s1_real: IpAddr = topo.servers[0].v4.into();
    let before = binding_ids(&topo)?;
    let refused_before = counter(&topo, "refused_174")?;
    let cases: [(&str, IpAddr, IpAddr); 7] = [
        (
            "s2's real address",
            ANYCAST_V4.into(),
            topo.servers[1].v4.into(),
        ),
        (
            "s2's real IPv6 address",
            ANYCAST_V6.into(),
            topo.servers[1].v6.into(),
        ),
        ("loopback", ANYCAST_V4.into(), "127.0.0.1".parse()?),
        ("the agent's own address", ANYCAST_V4.into(), AGENT.parse()?),
        (
            "a client's address",
            ANYCAST_V4.into(),
            "10.71.1.11".parse()?,
        ),
        ("the anycast address", ANYCAST_V4.into(), ANYCAST_V4.into()),
        (
            "the IPv6 anycast address",
            ANYCAST_V6.into(),
            ANYCAST_V6.into(),
        ),
    ];
    for (n, (what, home, coa)) in cases.iter().enumerate() {
        let bu = Scapy {
            identity: "s1",
            key: &s1_key,
            home: *home,
            coa: *coa,
            seq: 1000 + n as u16,
            lifetime: 5,
            service: None,
            // A little ahead, so the running server's own updates (it answers a refresh
            // request every second) are not newer by the time this one arrives.
            ahead_secs: 3,
        }
        .build()?;
        assert_eq!(
            send_bu(&topo.servers[0].ns, s1_real, bu)?,
            status::INVALID_COA,
            "s1 binding {what} ({coa})"
        );
        assert_eq!(
            binding_ids(&topo)?,
            before,
            "s1 binding {what} changed the bindings"
        );
    }
    assert_eq!(
        counter(&topo, "refused_174")? - refused_before,
        cases.len() as u64,
        "every refusal counted"
    );
    both_serve(&topo, "after the care-of attacks")?;

    // Forged updates claiming s1 (s2's key), from s1's own address, 4 s at about 2 000 a
    // second: far above s1's budget (50 a second). s1 answers a refresh-request probe every
    // second; before authentication came first, the forgeries used up its budget and its
    // answers were dropped until the probes declared it down.
    let forged = Scapy {
        identity: "s1",
        key: &key(2)?,
        home: ANYCAST_V4.into(),
        coa: s1_real,
        seq: 2000,
        lifetime: 5,
        service: None,
        ahead_secs: 0,
    }
    .build()?;
    let (refused_before, suppressed_before, limited_before, missed_before) = (
        counter(&topo, "refused_146")?,
        counter(&topo, "replies_suppressed_unauthenticated")?,
        counter(&topo, "dropped_rate_limited")?,
        counter(&topo, "probes_missed")?,
    );
    let flood_for = Duration::from_secs(4);
    let flood = {
        let ns = Netns {
            name: topo.servers[0].ns.name.clone(),
        };
        std::thread::spawn(move || -> Result<u64> {
            let result = ns.in_ns(move || {
                let sock = UdpSocket::bind(SocketAddr::new(s1_real, 0))?;
                let mut sent = 0u64;
                let start = Instant::now();
                while start.elapsed() < flood_for {
                    for _ in 0..20 {
                        sock.send_to(&forged, (AGENT, wire::DEFAULT_PORT))?;
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(sent)
            });
            // The namespace belongs to the topology: do not delete it here.
            std::mem::forget(ns);
            result
        })
    };
    let start = Instant::now();
    while start.elapsed() < flood_for {
        let b = topo.bindings()?;
        for x in b["bindings"].as_array().into_iter().flatten() {
            assert!(
                x["state"] == "active" && x["condition"] != "down",
                "every binding stays up during the forged flood: {x}"
            );
        }
        assert_eq!(topo.active_servers()?.len(), 2);
        std::thread::sleep(Duration::from_millis(250));
    }
    let sent = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let refused = counter(&topo, "refused_146")? - refused_before;
    let suppressed = counter(&topo, "replies_suppressed_unauthenticated")? - suppressed_before;
    println!(
        "forged flood: {sent} sent, {refused} refused (146), {suppressed} refusals not answered, \
         {} probes missed",
        counter(&topo, "probes_missed")? - missed_before
    );
    assert!(sent > 2000, "the flood ran: {sent}");
    assert!(
        refused > sent / 2,
        "the forgeries were authenticated and refused: {refused} of {sent}"
    );
    assert!(
        suppressed > 0 && suppressed < refused,
        "refusals to senders that do not authenticate are answered within a budget"
    );
    assert_eq!(
        counter(&topo, "dropped_rate_limited")?,
        limited_before,
        "the forgeries used up no identity's budget"
    );
    both_serve(&topo, "after the forged flood")?;

    // A captured update: authentic, fresh, for a service no client uses (s3 does not run),
    // accepted by the agent before its restart.
    let s3_real: IpAddr = topo.servers[2].v4.into();
    let captured = Scapy {
        identity: "s3",
        key: &key(3)?,
        home: ANYCAST_V4.into(),
        coa: s3_real,
        seq: 7,
        lifetime: 5,
        service: Some("6:8080"),
        ahead_secs: 0,
    }
    .build()?;
    assert_eq!(
        send_bu(&topo.servers[2].ns, s3_real, captured.clone())?,
        status::ACCEPTED,
        "the captured update was authentic"
    );
    assert!(binding_ids(&topo)?.iter().any(|b| b.contains("\"s3\"")));

    // The agent restarts; the replay arrives well within the replay window. The restarted
    // agent has the bindings back from its state file, s3's among them: the replay must
    // neither renew it nor change it.
    let mut agent = topo.agent_proc.take().expect("the agent runs");
    agent.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    topo.start_agent(0)?;
    let restored = s3_binding(&topo)?;
    let replayed_before = counter(&topo, "refused_144")?;
    assert_eq!(
        send_bu(&topo.servers[2].ns, s3_real, captured.clone())?,
        status::ID_MISMATCH,
        "the captured update replayed from s3's own address after the restart"
    );
    let client: IpAddr = "10.71.1.11".parse()?;
    assert_eq!(
        send_bu(&topo.clients[0], client, captured)?,
        status::ID_MISMATCH,
        "the captured update replayed from a client's address after the restart"
    );
    assert_eq!(counter(&topo, "refused_144")? - replayed_before, 2);
    let after = s3_binding(&topo)?;
    match (&restored, &after) {
        // Expired meanwhile (its lifetime is 5 s): the replay did not bring it back.
        (_, None) => {}
        (Some((seq0, left0)), Some((seq1, left1))) => {
            assert_eq!(seq1, seq0, "the replay changed s3's binding");
            assert!(
                left1 <= left0,
                "the replay renewed s3's binding: {left0} -> {left1}"
            );
        }
        (None, Some(b)) => panic!("the replay bound s3: {b:?}"),
    }

    // The real servers' bindings came back with the restart (the state file), and they
    // refresh them when asked.
    wait_until(
        "s1 and s2 registered after the restart",
        Duration::from_secs(3 * LIFETIME),
        || {
            let active = topo.active_servers()?;
            Ok(active.contains("s1") && active.contains("s2"))
        },
    )?;
    both_serve(&topo, "after the restart")?;
    println!("{}", topo.ctl(&["bindings"])?);
    Ok(())
}
