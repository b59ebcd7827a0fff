//! Floods at the registration port, end to end in network namespaces: 20 s each of garbage
//! and of well-formed forged binding updates (signed with the wrong key), from one source,
//! from 1 000 spoofed sources and spoofing the servers' own addresses, at 100 000 datagrams
//! a second, while a client connects continuously and a server (the test itself, as s3)
//! refreshes every 200 ms. Every datagram reaches the agent's socket (correct UDP checksums)
//! and is counted; every refresh is acknowledged; no binding is lost or flaps, no refresh
//! request goes unanswered, no client connection fails, the agent's memory stays bounded.
//! Prints the rates reached, the agent's CPU and memory and the refresh round trips.
//!
//! Frames are written with a packet socket from a namespace of the test's own on the
//! clients' link; it answers ARP for none of the addresses it sends from, so the agent's
//! answers to them wait for neighbours that never come (they must not hold up the refresh
//! requests to the servers). Runs as root.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anycast_common::wire::{self, Body, Key, LoadInfo, Message, Options, ServiceSelector};
use anycast_tests::{
    load::Load,
    netns::{veth, FrameSender, Netns},
    packet::{ethernet, inet_checksum, udp, Ip},
    topology::{spi_of, ServerMode, Topology, ANYCAST_V4},
    wait_until,
};
use anyhow::Context as _;

const AGENT: Ipv4Addr = Ipv4Addr::new(10, 71, 1, 2);
const PORT: u16 = 4191;
/// The flood's pace: above 100 000 a second, the rate it must at least reach.
const RATE: u64 = 105_000;
const AT_LEAST: f64 = 100_000.0;
const FLOOD: Duration = Duration::from_secs(20);

/// Sends `frames` round-robin out of `dev` in `ns` at `rate` a second for `how_long`;
/// returns how many were sent.
fn flood(
    ns: &Netns,
    dev: &str,
    frames: Vec<Vec<u8>>,
    rate: u64,
    how_long: Duration,
) -> anyhow::Result<u64> {
    let dev = dev.to_string();
    ns.in_ns(move || {
        let sender = FrameSender::open(&dev)?;
        let start = Instant::now();
        let mut sent = 0u64;
        let mut i = 0usize;
        while start.elapsed() < how_long {
            // Keep to the rate, in steps of a millisecond's worth.
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            for _ in 0..(due - sent).min(1000) {
                let f = &frames[i % frames.len()];
                i += 1;
                if sender.send(f).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })
}

/// A well-formed binding update of `identity` for the anycast address via `real`, signed
/// with `secret`; for one UDP service (port 9999) when `service` is set.
fn update(identity: &str, real: Ipv4Addr, seq: u16, secret: &[u8], service: bool) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(ANYCAST_V4.into()),
        dst: wire::to_mapped(AGENT.into()),
        body: Body::BindingUpdate {
            seq,
            ack: true,
            lifetime: 2,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped(real.into())),
            mn_id: Some(identity.into()),
            mesg_id: Some(wire::ntp_now()),
            load: Some(LoadInfo::default()),
            service: service.then_some(ServiceSelector {
                protocol: 17,
                port: 9999,
            }),
            auth: None,
        },
    };
    wire::encode(
        &msg,
        Some(Key {
            spi: spi_of(identity),
            secret,
        }),
    )
}

/// A well-formed binding update claiming `identity`, signed with a key that is not its own.
fn forged_update(identity: &str, seq: u16) -> Vec<u8> {
    let real = Ipv4Addr::new(10, 71, 2, 11);
    update(
        identity,
        real,
        seq,
        b"not the key of this server, sixteen+ bytes",
        false,
    )
}

/// When each refresh went out, and its round trip or why it failed.
type RefreshLog = Arc<Mutex<Vec<(Instant, Result<Duration, String>)>>>;

/// The agent's CPU time (user + system, in clock ticks) and resident memory (KiB).
fn agent_usage(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok((ticks, rss))
}

fn counter(topo: &Topology, name: &str) -> anyhow::Result<u64> {
    Ok(topo.bindings()?["counters"][name].as_u64().unwrap_or(0))
}

/// Every binding as "server real state condition".
fn binding_states(topo: &Topology) -> anyhow::Result<Vec<String>> {
    let b = topo.bindings()?;
    let mut out: Vec<String> = b["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "{} {} {} {}",
                x["server"], x["real"], x["state"], x["condition"]
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn registration_floods_lose_no_binding_refresh_or_connection() -> anyhow::Result<()> {
    // s1 and s2 run the server daemon; the test itself is s3, refreshing every half second
    // and timing each acknowledgement.
    let mut topo = Topology::build("acfl", 1, 3, ServerMode::Registering { lifetime_secs: 8 })?;
    topo.registration_extra =
        serde_json::json!({"probe": {"interval_ms": 500, "timeout_ms": 400, "misses": 2}});
    topo.start_agent(0)?;
    for i in 0..2 {
        topo.start_server(i)?;
    }
    let s3_key = anycast_ctl::registration::keys::read_key(&topo.key_file(3))?;
    let s3_real = topo.servers[2].v4;
    let s3 = topo.servers[2]
        .ns
        .in_ns(move || Ok(UdpSocket::bind(SocketAddr::new(s3_real.into(), 0))?))?;
    s3.set_read_timeout(Some(Duration::from_secs(1)))?;
    // s3's refreshes, every 200 ms from now to the end (any update also answers the
    // agent's refresh requests): when each went out, and its round trip or why it failed.
    let refreshes: RefreshLog = Arc::default();
    let refreshing = Arc::new(AtomicBool::new(true));
    let refresher = {
        let (log, on) = (refreshes.clone(), refreshing.clone());
        std::thread::spawn(move || {
            let mut seq = 0u16;
            let mut buf = [0u8; 2048];
            while on.load(Ordering::Relaxed) {
                seq = seq.wrapping_add(1);
                let started = Instant::now();
                let sent = s3.send_to(
                    // A UDP service of its own: the client's connections (TCP port 80) are
                    // not sent to s3, which runs no server.
                    &update("s3", s3_real, seq, &s3_key, true),
                    SocketAddr::new(AGENT.into(), PORT),
                );
                let outcome = match sent {
                    Err(e) => Err(format!("sending: {e}")),
                    Ok(_) => loop {
                        match s3.recv_from(&mut buf) {
                            Err(e) => break Err(format!("no acknowledgement: {e}")),
                            Ok((n, _)) => match wire::decode(&buf[..n]).map(|m| m.body) {
                                Ok(Body::BindingAck { status, seq: s, .. }) if s == seq => {
                                    break if status < 128 {
                                        Ok(started.elapsed())
                                    } else {
                                        Err(format!("refused with {status}"))
                                    };
                                }
                                _ => continue,
                            },
                        }
                    },
                };
                log.lock().unwrap().push((started, outcome));
                std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
            }
        })
    };
    wait_until("three servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 3)
    })?;
    let states = binding_states(&topo)?;
    let pid = topo
        .agent_proc
        .as_ref()
        .and_then(|p| p.pid())
        .context("the agent's pid")?;

    // The flooder sits on the clients' link; it never answers ARP for what it spoofs.
    let flooder = Netns::new("acflsp")?;
    veth(&flooder, "eth0", &topo.net, "flp", 1600)?;
    topo.net.ip(&["link", "set", "flp", "master", "brc"])?;
    flooder.sysctl("net.ipv4.conf.all.arp_ignore", "8")?;
    let own_mac = flooder.mac("eth0")?;
    let agent_mac = topo.agent.mac("eth0")?;
    // With a correct UDP checksum, so that every datagram reaches the agent's socket.
    let frame = |src: Ipv4Addr, payload: &[u8]| {
        let mut datagram = udp(40000, PORT, payload);
        datagram[6..8].copy_from_slice(&[0, 0]);
        let mut pseudo = Vec::with_capacity(12 + datagram.len());
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&AGENT.octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&datagram);
        let sum = match inet_checksum(&pseudo) {
            0 => 0xffff,
            s => s,
        };
        datagram[6..8].copy_from_slice(&sum.to_be_bytes());
        let ip = Ip::new(src.into(), AGENT.into(), 17).packet(&datagram);
        ethernet(agent_mac, own_mac, None, &ip)
    };
    let mut garbage = vec![0u8; 64];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let one = Ipv4Addr::new(10, 71, 1, 200);
    // 1 000 sources in 10.71.10.0-10.71.13.255, no host of the test's.
    let spoofed: Vec<Ipv4Addr> = (0..1000u32)
        .map(|i| Ipv4Addr::new(10, 71, 10 + (i / 250) as u8, (i % 250 + 1) as u8))
        .collect();
    let servers: Vec<Ipv4Addr> = topo.servers.iter().map(|s| s.v4).collect();
    let kinds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("garbage from one source", vec![frame(one, &garbage)]),
        (
            "forged updates from one source",
            (0..64)
                .map(|i| frame(one, &forged_update("s1", i)))
                .collect(),
        ),
        (
            "garbage from 1 000 spoofed sources",
            spoofed.iter().map(|s| frame(*s, &garbage)).collect(),
        ),
        (
            "forged updates from 1 000 spoofed sources",
            spoofed
                .iter()
                .enumerate()
                .map(|(i, s)| frame(*s, &forged_update("s2", i as u16)))
                .collect(),
        ),
        (
            "forged updates spoofing the servers' own addresses",
            (0..64)
                .map(|i| {
                    let who = i % servers.len();
                    frame(
                        servers[who],
                        &forged_update(&format!("s{}", who + 1), i as u16),
                    )
                })
                .collect(),
        ),
    ];

    let load = Load::start(&topo.clients[0].name, Duration::from_millis(20));
    for (what, frames) in kinds {
        let (cpu0, _) = agent_usage(pid)?;
        let missed0 = counter(&topo, "probes_missed")?;
        let sent_probes0 = counter(&topo, "probes_sent")?;
        let refreshed0 = counter(&topo, "refreshed")?;
        let counters0 = topo.bindings()?["counters"].clone();
        let started = Instant::now();
        let flooder_name = flooder.name.clone();
        let sender = std::thread::spawn(move || {
            let ns = Netns { name: flooder_name };
            let r = flood(&ns, "eth0", frames, RATE, FLOOD);
            std::mem::forget(ns);
            r
        });
        let mut samples = 0;
        let mut max_rss = 0;
        while !sender.is_finished() {
            let now = binding_states(&topo)?;
            assert_eq!(now, states, "{what}: no binding lost or flapping");
            max_rss = max_rss.max(agent_usage(pid)?.1);
            samples += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut latencies = Vec::new();
        for (at, outcome) in refreshes.lock().unwrap().iter() {
            if *at >= started {
                match outcome {
                    Ok(rtt) => latencies.push(*rtt),
                    Err(e) => panic!("{what}: a refresh of s3 was not acknowledged: {e}"),
                }
            }
        }
        assert!(
            latencies.len() >= 50,
            "{what}: s3 refreshed: {}",
            latencies.len()
        );
        latencies.sort();
        let latency = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
        let secs = started.elapsed().as_secs_f64();
        let (cpu1, rss) = agent_usage(pid)?;
        let missed = counter(&topo, "probes_missed")? - missed0;
        let probes = counter(&topo, "probes_sent")? - sent_probes0;
        let refreshed = counter(&topo, "refreshed")? - refreshed0;
        let counters = topo.bindings()?["counters"].clone();
        let handled: u64 = counters
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("dropped_") || k.starts_with("refused_"))
            .map(|(k, v)| v.as_u64().unwrap_or(0) - counters0[k].as_u64().unwrap_or(0))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        println!(
            "{what}: {sent} datagrams in {secs:.1} s ({:.0}/s); agent CPU {:.0}%, RSS {rss} KiB \
             (max {max_rss}); {probes} refresh requests, {missed} missed; {refreshed} refreshes; \
             {handled} flood datagrams counted by the agent; {samples} samples; s3's refreshes: \
             {} answered, latency median {:?}, max {:?}",
            sent as f64 / secs,
            (cpu1 - cpu0) as f64 / hz / secs * 100.0,
            latencies.len(),
            latency(0.5),
            latency(1.0),
        );
        assert!(
            sent as f64 / secs >= AT_LEAST,
            "{what}: the flood reached {:.0}/s",
            sent as f64 / secs
        );
        assert_eq!(missed, 0, "{what}: every refresh request was answered");
        assert!(
            handled as f64 >= sent as f64 * 0.99,
            "{what}: the agent counted {handled} of {sent} datagrams"
        );
        assert!(
            probes >= 2 * 20,
            "{what}: refresh requests went out: {probes}"
        );
        assert!(
            max_rss < 200 * 1024,
            "{what}: agent memory stays bounded: {max_rss} KiB"
        );
    }
    refreshing.store(false, Ordering::Relaxed);
    refresher
        .join()
        .map_err(|_| anyhow::anyhow!("the refresher panicked"))?;
    let failures = load.since(Instant::now() - Duration::from_secs(200));
    let failed: Vec<_> = failures.iter().filter(|(_, r)| r.is_err()).collect();
    println!(
        "client connections: {} ({} failed)",
        failures.len(),
        failed.len()
    );
    assert!(failures.len() > 100, "the client connected throughout");
    assert!(failed.is_empty(), "no client connection failed: {failed:?}");
    Ok(())
}
