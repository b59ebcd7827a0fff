//! Servers register themselves, end to end in network namespaces: no server is configured on
//! the agent. Three servers bind the anycast addresses with authenticated binding updates and
//! get traffic; one deregisters (SIGTERM) and drains; one is killed (SIGKILL) and its binding
//! expires; forged, replayed and unauthorized updates are refused with the right status and
//! change nothing. Native XDP on veth throughout. Runs as root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anycast_common::wire::{self, status, Body, Key, LoadInfo, Message, Options, ServiceSelector};
use anycast_tests::{
    netns::Netns,
    topology::{self, http_get, Held, ServerMode, Topology, ANYCAST_V4, HTTP_PORT},
    wait_until,
};

const LIFETIME: u64 = 8;

/// `n` HTTP connections from every client; answers per server.
fn connections(topo: &Topology, n: usize, v6: bool) -> anyhow::Result<BTreeMap<String, u32>> {
    let addr = Topology::anycast(v6, HTTP_PORT);
    let mut total = BTreeMap::new();
    for c in &topo.clients {
        let counts = c.in_ns(move || {
            let mut counts = BTreeMap::<String, u32>::new();
            for _ in 0..n {
                *counts.entry(http_get(addr)?).or_default() += 1;
            }
            Ok(counts)
        })?;
        for (k, v) in counts {
            *total.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

/// s3's bindings, without the fields that move on their own (age, lifetime left, seq, load).
fn binding_ids(topo: &Topology) -> anyhow::Result<BTreeSet<String>> {
    let b = topo.bindings()?;
    Ok(b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["server"] == "s3")
        .map(|x| {
            format!(
                "{} {} {} {} {}",
                x["anycast"], x["selector"], x["server"], x["real"], x["state"]
            )
        })
        .collect())
}

fn counter(topo: &Topology, name: &str) -> anyhow::Result<u64> {
    Ok(topo.bindings()?["counters"][name].as_u64().unwrap_or(0))
}

/// Sends one binding update from inside a server's namespace and returns the BA's status.
fn send_bu(ns: &Netns, from: IpAddr, payload: Vec<u8>) -> anyhow::Result<u8> {
    ns.in_ns(move || {
        let sock = UdpSocket::bind(SocketAddr::new(from, 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.send_to(&payload, "10.71.1.2:4191")?;
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf)?;
        match wire::decode(&buf[..n])?.body {
            Body::BindingAck { status, .. } => Ok(status),
            b => anyhow::bail!("expected a binding acknowledgement, got {b:?}"),
        }
    })
}

fn bu(
    identity: &str,
    home: IpAddr,
    real: IpAddr,
    selector: Option<ServiceSelector>,
    key: &[u8],
) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(home),
        dst: wire::to_mapped("10.71.1.2".parse().unwrap()),
        body: Body::BindingUpdate {
            seq: 7,
            ack: true,
            lifetime: 5,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped(real)),
            mn_id: Some(identity.into()),
            mesg_id: Some(wire::ntp_now()),
            load: Some(LoadInfo::default()),
            service: selector,
            ..Options::default()
        },
    };
    wire::encode(
        &msg,
        Some(Key {
            spi: topology::spi_of(identity),
            secret: key,
        }),
    )
}

#[test]
fn servers_register_deregister_expire_and_forgeries_are_refused() -> anyhow::Result<()> {
    let mut topo = Topology::build(
        "acreg",
        2,
        3,
        ServerMode::Registering {
            lifetime_secs: LIFETIME,
        },
    )?;
    topo.start_agent(0)?;
    let status = topo.status()?;
    assert!(
        status["services"].as_array().unwrap().is_empty(),
        "no service configured on the agent"
    );
    for i in 0..3 {
        topo.start_server(i)?;
    }
    wait_until("three servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 3)
    })?;
    println!("{}", topo.ctl(&["bindings"])?);

    // Traffic reaches all three, over IPv4 and IPv6.
    for v6 in [false, true] {
        let counts = connections(&topo, 60, v6)?;
        println!("registered servers, v6={v6}: {counts:?}");
        for s in ["s1", "s2", "s3"] {
            assert!(
                counts.get(s).copied().unwrap_or(0) >= 12,
                "{s} gets traffic (v6={v6}): {counts:?}"
            );
        }
    }

    // A long-lived connection on s1, then s1 deregisters (SIGTERM) and drains.
    let c1 = &topo.clients[0];
    let mut held: Vec<Held> = c1.in_ns(|| {
        let mut held = Vec::new();
        for _ in 0..60 {
            let h = Held::open(Topology::anycast(false, HTTP_PORT))?;
            let on_s1 = h.server == "s1";
            held.push(h);
            if on_s1 {
                break;
            }
        }
        Ok(held)
    })?;
    let mut on_s1 = held
        .pop()
        .filter(|h| h.server == "s1")
        .expect("a connection landed on s1");
    drop(held);
    let mut s1 = topo.servers[0].decap.take().unwrap();
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(s1.pid().unwrap() as i32, libc::SIGTERM) };
    wait_until("s1 deregistered", Duration::from_secs(10), || {
        Ok(!topo.active_servers()?.contains("s1"))
    })?;
    let counts = connections(&topo, 45, false)?;
    println!("after s1 deregistered: {counts:?}");
    assert_eq!(
        counts.get("s1"),
        None,
        "no new connection goes to a deregistered server"
    );
    assert_eq!(
        on_s1.ask()?,
        "s1",
        "s1's open connection still works while it drains"
    );
    drop(on_s1);
    // With its last connection closed, s1 finishes draining and exits cleanly.
    let exit = s1.wait_exit(Duration::from_secs(20))?;
    assert!(exit.success(), "s1 exit: {exit}\n{}", s1.output());
    let out = s1.output();
    assert!(
        out.contains("deregistered"),
        "s1 logged its deregistration:\n{out}"
    );
    let lo = topo.servers[0].ns.ip(&["addr", "show", "dev", "lo"])?;
    assert!(
        !lo.contains(&ANYCAST_V4.to_string()),
        "s1 removed the anycast address"
    );

    // s2 is killed outright: its binding expires after its lifetime.
    let mut s2 = topo.servers[1].decap.take().unwrap();
    let killed = std::time::Instant::now();
    s2.stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    let expired_before = counter(&topo, "expired")?;
    wait_until(
        "s2's binding expired",
        Duration::from_secs(3 * LIFETIME),
        || Ok(!topo.active_servers()?.contains("s2")),
    )?;
    println!(
        "s2's binding expired {:?} after SIGKILL (lifetime {LIFETIME} s)",
        killed.elapsed()
    );
    assert!(counter(&topo, "expired")? > expired_before);
    let counts = connections(&topo, 30, false)?;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        vec!["s3"],
        "only s3 is left: {counts:?}"
    );

    // Forgeries, replays and unauthorized bindings from s3's namespace change nothing.
    let s3 = &topo.servers[2];
    let real: IpAddr = s3.v4.into();
    let key = std::fs::read_to_string(topo.key_file(3))?;
    let key = anycast_ctl::registration::keys::parse_key(&key)?;
    let before = binding_ids(&topo)?;

    let forged = bu(
        "s3",
        ANYCAST_V4.into(),
        real,
        None,
        b"not-the-key-of-s3-at-all",
    );
    assert_eq!(
        send_bu(&s3.ns, real, forged)?,
        status::AUTH_FAILED,
        "forged update"
    );
    assert_eq!(
        binding_ids(&topo)?,
        before,
        "a forged update changed the bindings"
    );

    let elsewhere: IpAddr = "10.71.200.1".parse()?;
    let unauthorized = bu("s3", elsewhere, real, None, &key);
    assert_eq!(
        send_bu(&s3.ns, real, unauthorized)?,
        status::PROHIBITED,
        "unauthorized address"
    );
    assert_eq!(
        binding_ids(&topo)?,
        before,
        "an unauthorized update changed the bindings"
    );

    // A legitimate update for one more service, accepted once; the same bytes again are a replay.
    let selector = Some(ServiceSelector {
        protocol: anycast_common::PROTO_TCP,
        port: 8080,
    });
    let fresh = bu("s3", ANYCAST_V4.into(), real, selector, &key);
    assert_eq!(
        send_bu(&s3.ns, real, fresh.clone())?,
        status::ACCEPTED,
        "fresh update"
    );
    let with_new = binding_ids(&topo)?;
    assert_eq!(with_new.len(), before.len() + 1);
    assert_eq!(
        send_bu(&s3.ns, real, fresh)?,
        status::ID_MISMATCH,
        "replayed update (RFC 4285: MESG-ID outside the window)"
    );
    assert_eq!(
        binding_ids(&topo)?,
        with_new,
        "a replayed update changed the bindings"
    );

    for (name, at_least) in [("refused_146", 1), ("refused_129", 1), ("refused_144", 1)] {
        assert!(counter(&topo, name)? >= at_least, "{name} counted");
    }
    println!("{}", topo.ctl(&["bindings"])?);
    Ok(())
}
