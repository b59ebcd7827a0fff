//! Hostile packets at the data path, end to end in network namespaces:
//! - IP-in-IP from the clients' side whose outer source is a server's real address (or an
//!   address that is no server's), carrying a SYN-ACK "from" the anycast address: the agent
//!   does not decapsulate it, the client never sees the inner segment, and the refusal is
//!   counted (`pass_reverse_wrong_iface`, `pass_reverse_stranger`);
//! - a client's 802.1Q-tagged SYN: forwarded to its server without the client's tag.
//!
//! Frames are written and read with packet sockets on the test's own veths. Runs as root.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anycast_tests::{
    bench::capture::Capture,
    netns::{FrameSender, Netns},
    packet::{ethernet, tcp, Ip, TCP_SYN, TCP_SYN_ACK},
    topology::{http_get, ServerMode, Topology, ANYCAST_V4, HTTP_PORT},
    wait_until,
};
use anyhow::Context as _;

const AGENT: Ipv4Addr = Ipv4Addr::new(10, 71, 1, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 71, 1, 11);
const PROTO_IPIP: u8 = 4;
const PROTO_TCP: u8 = 6;

/// Sends raw frames out of `dev` in `ns`.
fn inject(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>) -> anyhow::Result<()> {
    let dev = dev.to_string();
    ns.in_ns(move || {
        let sender = FrameSender::open(&dev)?;
        for f in &frames {
            sender
                .send(f)
                .with_context(|| format!("sending a frame on {dev}"))?;
        }
        Ok(())
    })
}

/// The frames a [`watch`] kept, when it stops.
type Frames = std::thread::JoinHandle<anyhow::Result<Vec<Vec<u8>>>>;

/// Collects, on `dev` in `ns`, the frames `keep` picks, until the returned stop flag is
/// set (and at most 60 s).
fn watch(
    ns: &Netns,
    dev: &str,
    keep: impl Fn(&[u8]) -> bool + Send + 'static,
) -> (Arc<AtomicBool>, Frames) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (name, dev, stopped) = (ns.name.clone(), dev.to_string(), stop.clone());
    let thread = std::thread::spawn(move || {
        anycast_tests::bench::capture::enter_ns(&name)?;
        let capture = Capture::open(&dev)?;
        let _ = ready_tx.send(());
        let start = Instant::now();
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 4096];
        while !stopped.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            if let Some((n, _)) = capture.next(&mut buf)? {
                if keep(&buf[..n]) {
                    kept.push(buf[..n].to_vec());
                }
            }
        }
        Ok(kept)
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(10));
    (stop, thread)
}

/// The TCP segment of an untagged IPv4 frame: (source, destination, source port,
/// destination port), after `skip` bytes of IPv4-in-IPv4 outer header (0 or 20).
fn tcp_of(frame: &[u8], skip: usize) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16)> {
    if frame.len() < 14 + skip + 24 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    if skip > 0 && frame[14 + 9] != PROTO_IPIP {
        return None;
    }
    let ip = &frame[14 + skip..];
    if ip[0] >> 4 != 4 || ip[9] != PROTO_TCP {
        return None;
    }
    let l4 = &ip[usize::from(ip[0] & 0xf) * 4..];
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    Some((
        addr(12),
        addr(16),
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    ))
}

#[test]
fn spoofed_reverse_tunnelled_segments_never_reach_the_client() -> anyhow::Result<()> {
    let mut topo = Topology::build("achd", 1, 1, ServerMode::Registering { lifetime_secs: 60 })?;
    topo.registration_extra = serde_json::json!({"reverse_tunnel": {"suspect_after_ms": 1000}});
    topo.server_args = vec!["--reverse-tunnel".into()];
    topo.start_agent(0)?;
    topo.start_server(0)?;
    wait_until("s1 registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 1)
    })?;
    // The relay works for the real server: its SYN-ACKs come back through the agent.
    let relayed = topo.verdict("reverse_tunnel")?;
    let answer = topo.clients[0].in_ns(|| http_get(Topology::anycast(false, HTTP_PORT)))?;
    assert_eq!(answer, "s1");
    assert!(
        topo.verdict("reverse_tunnel")? > relayed,
        "s1's SYN-ACK was relayed"
    );
    let relayed = topo.verdict("reverse_tunnel")?;

    let s1: IpAddr = topo.servers[0].v4.into();
    let client_mac = topo.clients[0].mac("eth0")?;
    let agent_mac = topo.agent.mac("eth0")?;
    // Two forged senders: s1's real address (on the clients' side, where the agent does not
    // reach s1) and an address that is no server's. Each carries a SYN-ACK "from" the
    // anycast address to the client, on a port of its own.
    let forged = |outer_src: IpAddr, dport: u16| {
        let inner = Ip::new(ANYCAST_V4.into(), CLIENT.into(), PROTO_TCP).packet(&tcp(
            HTTP_PORT,
            dport,
            TCP_SYN_ACK,
            b"",
        ));
        let outer = Ip::new(outer_src, AGENT.into(), PROTO_IPIP).packet(&inner);
        ethernet(agent_mac, client_mac, None, &outer)
    };
    let (stop, seen) = watch(&topo.clients[0], "eth0", |f| {
        tcp_of(f, 0).is_some_and(|(src, _, sport, dport)| {
            src == ANYCAST_V4 && sport == HTTP_PORT && (dport == 40001 || dport == 40002)
        })
    });
    let wrong_iface = topo.verdict("pass_reverse_wrong_iface")?;
    let stranger = topo.verdict("pass_reverse_stranger")?;
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(forged(s1, 40001));
        frames.push(forged(Ipv4Addr::new(10, 71, 1, 99).into(), 40002));
    }
    inject(&topo.clients[0], "eth0", frames)?;
    wait_until("the forgeries counted", Duration::from_secs(10), || {
        Ok(topo.verdict("pass_reverse_wrong_iface")? >= wrong_iface + 5
            && topo.verdict("pass_reverse_stranger")? >= stranger + 5)
    })?;
    // Whatever the agent had done with them is done by now; give a relayed frame the time to
    // cross two veths and a bridge.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen = seen
        .join()
        .map_err(|_| anyhow::anyhow!("the capture thread panicked"))??;
    assert!(
        seen.is_empty(),
        "no forged segment reached the client: {} did",
        seen.len()
    );
    assert_eq!(
        topo.verdict("reverse_tunnel")?,
        relayed,
        "nothing forged was relayed"
    );
    Ok(())
}

#[test]
fn a_clients_vlan_tag_never_reaches_the_server_segment() -> anyhow::Result<()> {
    let mut topo = Topology::build("achv", 1, 1, ServerMode::Static)?;
    topo.start_agent(1)?;
    // A first connection, so that the agent knows s1's link-layer address.
    let answer = topo.clients[0].in_ns(|| http_get(Topology::anycast(false, HTTP_PORT)))?;
    assert_eq!(answer, "s1");

    let client_mac = topo.clients[0].mac("eth0")?;
    let agent_mac = topo.agent.mac("eth0")?;
    let syn = Ip::new(CLIENT.into(), ANYCAST_V4.into(), PROTO_TCP)
        .packet(&tcp(41234, HTTP_PORT, TCP_SYN, b""));
    let tagged = ethernet(agent_mac, client_mac, Some(30), &syn);
    // Every frame the server's link carries towards s1 (the bridge port in the router's
    // namespace): tagged ones, and the tunnelled SYN.
    let (stop, seen) = watch(&topo.net, "s1p", |f| {
        f.len() >= 14 && (f[12..14] == [0x81, 0x00] || tcp_of(f, 20).is_some_and(|t| t.2 == 41234))
    });
    let forwarded = topo.verdict("redirect")?;
    let mut arrived = Vec::new();
    wait_until(
        "the tagged SYN forwarded to s1",
        Duration::from_secs(10),
        || {
            inject(&topo.clients[0], "eth0", vec![tagged.clone()])?;
            std::thread::sleep(Duration::from_millis(100));
            Ok(topo.verdict("redirect")? > forwarded)
        },
    )?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    arrived.extend(
        seen.join()
            .map_err(|_| anyhow::anyhow!("the capture thread panicked"))??,
    );
    let tagged_frames = arrived.iter().filter(|f| f[12..14] == [0x81, 0x00]).count();
    let tunnelled = arrived
        .iter()
        .filter(|f| tcp_of(f, 20).is_some_and(|t| t.2 == 41234 && t.3 == HTTP_PORT))
        .count();
    println!("on s1's link: {tunnelled} tunnelled SYNs, {tagged_frames} tagged frames");
    assert!(tunnelled >= 1, "the SYN reached s1's link, tunnelled");
    assert_eq!(tagged_frames, 0, "no frame on s1's link carries a tag");
    Ok(())
}
