//! End to end in namespaces (the demo topology of `anycast_tests::topology`, servers
//! registering): the time from a binding update to the first packet forwarded to the new
//! server (part 4), and TCP throughput through the agent beside the direct path (part 2).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    topology::{ServerMode, Topology, ANYCAST_V4},
    wait_until,
};
use anycast_common::wire::{self, Body, Key, Message, Options};
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;

use super::capture::{enter_ns, ms_between, Sender, Watch};
use super::report::{median, Row, Section};

const AGENT: Ipv4Addr = Ipv4Addr::new(10, 71, 1, 2);
const UDP_PORT: u16 = 7000;

pub fn run(quick: bool, registration: bool, iperf: bool) -> Vec<(&'static str, Result<Section>)> {
    let mut topo =
        match Topology::build("acbe", 1, 2, ServerMode::Registering { lifetime_secs: 60 }) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("{e:#}");
                let mut out = Vec::new();
                if registration {
                    out.push(("registration", Err(anyhow!("building the topology: {msg}"))));
                }
                if iperf {
                    out.push(("iperf", Err(anyhow!("building the topology: {msg}"))));
                }
                return out;
            }
        };
    let mut out = Vec::new();
    if registration {
        out.push(("registration", registration_latency(&mut topo, quick)));
        topo.agent_proc = None;
    }
    if iperf {
        out.push(("iperf", throughput(&mut topo, quick)));
    }
    // Servers first (they deregister while the agent still answers), then the agent.
    for s in &mut topo.servers {
        s.app = None;
        s.decap = None;
    }
    topo.agent_proc = None;
    let dir = topo.dir.clone();
    drop(topo);
    let _ = std::fs::remove_dir_all(dir);
    out
}

/// One BU for `s2`, as its server would send it: the anycast address through its real one.
fn binding_update(topo: &Topology, real: Ipv4Addr) -> Result<Vec<u8>> {
    let key = anycast_ctl::registration::keys::read_key(&topo.key_file(2))?;
    let msg = Message {
        src: wire::to_mapped(IpAddr::V4(ANYCAST_V4)),
        dst: wire::to_mapped(IpAddr::V4(AGENT)),
        body: Body::BindingUpdate {
            seq: 1,
            ack: true,
            lifetime: 15,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped(IpAddr::V4(real))),
            mn_id: Some("s2".into()),
            mesg_id: Some(wire::ntp_now()),
            ..Default::default()
        },
    };
    Ok(wire::encode(
        &msg,
        Some(Key {
            spi: crate::topology::spi_of("s2"),
            secret: &key,
        }),
    ))
}

fn registration_latency(topo: &mut Topology, quick: bool) -> Result<Section> {
    let runs = if quick { 1 } else { 5 };
    let real = topo.servers[1].v4;
    let s2_ns = topo.servers[1].ns.name.clone();
    let client_ns = topo.clients[0].name.clone();
    let (mut first, mut acked) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        topo.agent_proc = None;
        // A fresh agent: nothing restored from the last run's state file or pinned maps
        // (the agent keeps both across restarts).
        let _ = std::fs::remove_dir_all(topo.state_directory());
        crate::topology::remove_pins(&topo.pin_directory());
        topo.start_agent(0)?;
        let watch = Watch::start(&s2_ns, "eth0", real, ANYCAST_V4)?;
        let sender = Sender::start(
            &client_ns,
            SocketAddr::new(IpAddr::V4(ANYCAST_V4), UDP_PORT),
            1,
            None,
        );
        // The client's packets flow (and are not forwarded) before the server registers.
        std::thread::sleep(Duration::from_millis(300));
        let early = watch.since(SystemTime::UNIX_EPOCH);
        if !early.is_empty() {
            bail!(
                "{} packets reached s2 before it registered; the agent's bindings: {}",
                early.len(),
                topo.bindings()
                    .map(|b| b.to_string())
                    .unwrap_or_else(|e| format!("{e:#}"))
            );
        }
        let bu = binding_update(topo, real)?;
        let ns = s2_ns.clone();
        let (sent, ba) = std::thread::spawn(move || -> Result<(SystemTime, SystemTime)> {
            enter_ns(&ns)?;
            let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(real), 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            let sent = SystemTime::now();
            sock.send_to(&bu, SocketAddr::new(IpAddr::V4(AGENT), wire::DEFAULT_PORT))?;
            let mut buf = [0u8; 512];
            let (n, _) = sock
                .recv_from(&mut buf)
                .context("waiting for the binding acknowledgement")?;
            let ba = SystemTime::now();
            match wire::decode(&buf[..n]).map(|m| m.body) {
                Ok(Body::BindingAck { status: 0, .. }) => Ok((sent, ba)),
                other => bail!("the agent did not accept the binding update: {other:?}"),
            }
        })
        .join()
        .map_err(|_| anyhow!("the BU thread panicked"))??;
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            if let Some(&t) = watch.since(sent).iter().min() {
                break t;
            }
            if Instant::now() > deadline {
                bail!("no packet reached s2 within 5 s of its binding update");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(sender);
        drop(watch);
        first.push(ms_between(got, sent));
        acked.push(ms_between(ba, sent));
        topo.agent_proc = None;
    }
    let f = median(&first);
    let mut s = Section::new("control", "4. Control plane");
    s.method = format!(
        "Registration to first forwarded packet: a real agent (anycast-ctl agent, default \
         sizes, no server configured) in the demo topology's namespaces, started afresh for \
         each of {runs} run(s); a client sends a UDP datagram to the anycast address every \
         ~0.1 ms; the benchmark sends s2's signed BU from s2's namespace and watches s2's \
         eth0 with a packet socket; the figure is the kernel receive time of the first \
         IPv4-in-IPv4 packet for the anycast address minus the time the BU was sent \
         (median). Baseline: the time from the BU to its acknowledgement (BA) in the same \
         run. The first packet to a new server also waits for ARP (the agent hands it to \
         the kernel until the neighbour is known)."
    );
    s.rows.push(
        Row::new("binding update to first packet at the new server", f, "ms")
            .baseline("binding update to its acknowledgement", median(&acked))
            .target("<= 1 ms", f <= 1.0),
    );
    s.data = json!({"registration_ms": first, "acknowledged_ms": acked});
    Ok(s)
}

/// Bits per second received, from `iperf3 -J`.
fn iperf(topo: &Topology, to: &str, secs: u32, streams: u32) -> Result<f64> {
    let out = topo.clients[0].exec(
        "iperf3",
        &[
            "-c",
            to,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received in the iperf3 output"))
}

fn throughput(topo: &mut Topology, quick: bool) -> Result<Section> {
    topo.agent_proc = None;
    topo.start_agent(0)?;
    topo.start_server(0)?;
    wait_until("s1 registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.contains("s1"))
    })?;
    let iperf3 = Path::new("/usr/bin/iperf3");
    if !iperf3.exists() {
        bail!("iperf3 is not installed (cargo xtask setup installs it)");
    }
    let server = topo.servers[0].ns.spawn("iperf3 server", iperf3, &["-s"])?;
    std::thread::sleep(Duration::from_millis(500));
    let (secs, reps) = if quick { (1, 1) } else { (5, 2) };
    let direct = topo.servers[0].v4.to_string();
    let anycast = ANYCAST_V4.to_string();
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for streams in [1u32, 4] {
        let (mut via, mut dir) = (Vec::new(), Vec::new());
        for r in 0..reps {
            for j in 0..2 {
                let through_agent = (j + r) % 2 == 0;
                let to = if through_agent { &anycast } else { &direct };
                let bps = iperf(topo, to, secs, streams)?;
                if through_agent {
                    via.push(bps);
                } else {
                    dir.push(bps);
                }
            }
        }
        let (v, d) = (median(&via) / 1e9, median(&dir) / 1e9);
        rows.push(
            Row::new(
                format!("TCP throughput through the agent, {streams} connection(s)"),
                v,
                "Gbit/s",
            )
            .baseline("direct path through the router, no agent", d)
            .target(">= 0.95x the direct path", v >= 0.95 * d),
        );
        data.push(json!({"streams": streams, "through_agent_bps": via, "direct_bps": dir}));
    }
    drop(server);
    let tx = topo.verdict("redirect").unwrap_or(0);
    let mut s = Section::new("rate", "2. Forwarding rate and TCP throughput");
    s.method = format!(
        "TCP throughput: iperf3 ({secs} s per test, {reps} alternating repetition(s), \
         median) from the demo topology's client to the anycast address, through the agent \
         (XDP_REDIRECT from its client-side to its server-side interface, IPv4-in-IPv4) to \
         a registered server that decapsulates in XDP and answers directly; baseline: the \
         same client to the server's real address through the router namespace (kernel \
         forwarding), the same links. Every process (client, agent, router, server) shares \
         the 2 CPUs; the clients' veths have transmit checksum offload off (see README), \
         so TCP segmentation is in software on both paths."
    );
    s.rows = rows;
    s.notes.push(format!(
        "the agent redirected {tx} packets during the TCP tests (verdict counter)"
    ));
    s.data = json!({"iperf3": data});
    Ok(s)
}
