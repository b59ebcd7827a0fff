//! The agent's owner task never waits on a socket, end to end in network namespaces:
//! control connections that never send a request stall nothing, and a registration socket
//! whose send queue is full costs dropped (counted) replies, never a lost refresh. Runs as
//! root.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anycast_common::wire::{self, status, Body, Key, LoadInfo, Message, Options};
use anycast_tests::{
    netns::{veth, Netns},
    topology::{self, ServerMode, Topology, ANYCAST_V4},
    wait_until,
};

/// The agent's registration address (`agent_address.v4` in the topology's configuration).
const AGENT: Ipv4Addr = Ipv4Addr::new(10, 71, 1, 2);
const REGISTRATION_PORT: u16 = 4191;

fn counter(topo: &Topology, name: &str) -> anyhow::Result<u64> {
    Ok(topo.bindings()?["counters"][name].as_u64().unwrap_or(0))
}

/// One request on the control socket, straight from the test process (no CLI start-up in
/// the measured time): the answer line and how long it took.
fn timed_request(topo: &Topology, request: &str) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let mut s = UnixStream::connect(&topo.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok((line, start.elapsed()))
}

/// A binding update of `identity`, signed with its key, for `home` via `real`.
fn binding_update(
    identity: &str,
    home: IpAddr,
    real: IpAddr,
    seq: u16,
    lifetime: u16,
    secret: &[u8],
) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(home),
        dst: wire::to_mapped(AGENT.into()),
        body: Body::BindingUpdate {
            seq,
            ack: true,
            lifetime,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped(real)),
            mn_id: Some(identity.into()),
            mesg_id: Some(wire::ntp_now()),
            load: Some(LoadInfo::default()),
            service: None,
            ..Options::default()
        },
    };
    wire::encode(
        &msg,
        Some(Key {
            spi: topology::spi_of(identity),
            secret,
        }),
    )
}

#[test]
fn idle_control_connections_stall_neither_updates_nor_probes_nor_status() -> anyhow::Result<()> {
    let mut topo = Topology::build("acidle", 1, 2, ServerMode::Registering { lifetime_secs: 8 })?;
    topo.registration_extra =
        serde_json::json!({"probe": {"interval_ms": 250, "timeout_ms": 200, "misses": 3}});
    topo.start_agent(0)?;
    for i in 0..2 {
        topo.start_server(i)?;
    }
    wait_until("two servers registered", Duration::from_secs(30), || {
        Ok(topo.active_servers()?.len() == 2)
    })?;
    let states = topo.binding_states()?;
    println!("bindings: {states:#?}");

    let window = Duration::from_secs(3);
    let before = counter(&topo, "probes_sent")?;
    std::thread::sleep(window);
    let quiet_rate = counter(&topo, "probes_sent")? - before;

    // Ten connections that never send a request.
    let idle: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&topo.socket))
        .collect::<Result<_, _>>()?;

    // A server's binding update is answered at once: s2's own key, for an anycast address
    // it may not bind, so it is authenticated, refused and changes nothing.
    let key = anycast_ctl::registration::keys::read_key(&topo.key_file(2))?;
    let real: IpAddr = topo.servers[1].v4.into();
    let bu = binding_update("s2", "10.71.200.1".parse()?, real, 9, 2, &key);
    let (answer, rtt) = topo.servers[1].ns.in_ns(move || {
        let sock = UdpSocket::bind(SocketAddr::new(real, 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let start = Instant::now();
        sock.send_to(&bu, SocketAddr::new(AGENT.into(), REGISTRATION_PORT))?;
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf)?;
        let rtt = start.elapsed();
        Ok((wire::decode(&buf[..n])?.body, rtt))
    })?;
    println!("binding update answered in {rtt:?}: {answer:?}");
    assert!(
        matches!(
            answer,
            Body::BindingAck {
                status: status::PROHIBITED,
                ..
            }
        ),
        "the update is refused as not authorized: {answer:?}"
    );
    assert!(
        rtt < Duration::from_millis(50),
        "a binding update is answered within 50 ms with 10 idle control connections: {rtt:?}"
    );

    // Status answers at once, every time.
    let mut times = Vec::new();
    for _ in 0..5 {
        let (line, took) = timed_request(&topo, r#"{"request":"status"}"#)?;
        assert!(
            line.contains(r#""result":"status""#),
            "status answer: {line}"
        );
        times.push(took);
    }
    println!("status answered in {times:?}");
    for t in &times {
        assert!(
            *t < Duration::from_millis(50),
            "status answers within 50 ms with 10 idle control connections: {times:?}"
        );
    }

    // Probes keep their rate while the connections stay open.
    let before = counter(&topo, "probes_sent")?;
    std::thread::sleep(window);
    let busy_rate = counter(&topo, "probes_sent")? - before;
    println!("probes sent per {window:?}: {quiet_rate} quiet, {busy_rate} with idle connections");
    assert!(quiet_rate >= 10, "probes are sent: {quiet_rate}");
    assert!(
        busy_rate * 10 >= quiet_rate * 8,
        "probes keep their rate with idle control connections: {busy_rate} vs {quiet_rate}"
    );
    assert_eq!(
        topo.binding_states()?,
        states,
        "no binding changed state (or condition)"
    );
    assert_eq!(counter(&topo, "probes_missed")?, 0, "no probe was missed");
    drop(idle);
    Ok(())
}

/// An update with an unknown Mobility Header type (answered with a Binding Error, RFC 6275
/// 9.2): garbage any host can send, which the agent must answer.
fn unknown_message_type() -> Vec<u8> {
    let mut bytes = binding_update(
        "nobody",
        "10.71.100.1".parse().unwrap(),
        "10.71.2.99".parse().unwrap(),
        9,
        2,
        b"no key at all, at least sixteen bytes",
    );
    bytes[40 + 2] = 42;
    // The checksum covers the type byte in the high half of its 16-bit word.
    let sum = u16::from_be_bytes([bytes[44], bytes[45]]) as u32;
    let fixed = (sum + (5u32 << 8) + 0xffff - (42u32 << 8)) % 0xffff;
    [bytes[44], bytes[45]] = (fixed as u16).to_be_bytes();
    bytes
}

#[test]
fn a_full_reply_queue_drops_and_counts_replies_and_loses_no_refresh() -> anyhow::Result<()> {
    let mut topo = Topology::build("acfull", 1, 2, ServerMode::Registering { lifetime_secs: 4 })?;
    // This test is about the full reply queue: the global budget of answers to senders that
    // do not authenticate (100 per second by default) is raised so the flood's binding
    // errors fill it.
    topo.registration_extra = serde_json::json!({"limits": {"unauthenticated_replies_per_second": 100000, "socket_buffer_bytes": 212992}});
    topo.start_agent(0)?;

    // A host on the servers' link that sends from 40 addresses nobody answers ARP for: the
    // agent's answers to them wait in the neighbour queues, holding the registration
    // socket's send buffer. Unresolved neighbours are kept 20 s, longer than the test.
    let spoofer = Netns::new("acfullsp")?;
    veth(&spoofer, "eth0", &topo.net, "spp", 1600)?;
    topo.net.ip(&["link", "set", "spp", "master", "brs"])?;
    spoofer.sysctl("net.ipv4.conf.all.arp_ignore", "8")?;
    spoofer.sysctl("net.ipv4.conf.eth0.arp_ignore", "8")?;
    spoofer.ip(&["addr", "add", "10.71.2.90/24", "dev", "eth0"])?;
    let sources: Vec<Ipv4Addr> = (100..140).map(|i| Ipv4Addr::new(10, 71, 2, i)).collect();
    for s in &sources {
        spoofer.ip(&["addr", "add", &format!("{s}/32"), "dev", "eth0"])?;
    }
    let agent_link: serde_json::Value =
        serde_json::from_str(&topo.agent.ip(&["-j", "link", "show", "eth1"])?)?;
    let agent_mac = agent_link[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no MAC address for the agent's eth1"))?
        .to_string();
    spoofer.ip(&[
        "neigh",
        "add",
        "10.71.2.2",
        "lladdr",
        &agent_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    spoofer.ip(&["route", "add", &format!("{AGENT}/32"), "via", "10.71.2.2"])?;
    topo.agent
        .sysctl("net.ipv4.neigh.eth1.mcast_solicit", "20")?;
    topo.agent
        .sysctl("net.ipv4.neigh.eth1.retrans_time_ms", "1000")?;

    let dropped_before = counter(&topo, "replies_dropped_queue_full")?;
    // 40 sources, 1600 datagrams a second in all.
    let flood_for = Duration::from_secs(10);
    let flood = std::thread::spawn({
        let sources = sources.clone();
        let name = spoofer.name.clone();
        move || -> anyhow::Result<u64> {
            let ns = Netns { name };
            let result = ns.in_ns(move || {
                let garbage = unknown_message_type();
                let socks: Vec<UdpSocket> = sources
                    .iter()
                    .map(|s| UdpSocket::bind(SocketAddr::new((*s).into(), 0)))
                    .collect::<Result<_, _>>()?;
                let to = SocketAddr::new(AGENT.into(), REGISTRATION_PORT);
                let mut sent = 0u64;
                let start = Instant::now();
                while start.elapsed() < flood_for {
                    for s in &socks {
                        s.send_to(&garbage, to)?;
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                Ok(sent)
            });
            // The guard belongs to the test's `spoofer`: do not delete the namespace here.
            std::mem::forget(ns);
            result
        }
    });

    // Meanwhile s2 (this test, with s2's key) registers and refreshes every half second
    // with a lifetime of 4 s; its acknowledgements share the full socket, so most are lost.
    // Every update must still be processed, and the binding must stay.
    wait_until(
        "the agent's replies are being dropped",
        Duration::from_secs(5),
        || Ok(counter(&topo, "replies_dropped_queue_full")? > dropped_before),
    )?;
    let accepted = |topo: &Topology| -> anyhow::Result<u64> {
        Ok(counter(topo, "registered")? + counter(topo, "refreshed")?)
    };
    let accepted_before = accepted(&topo)?;
    let key = anycast_ctl::registration::keys::read_key(&topo.key_file(2))?;
    let real: IpAddr = topo.servers[1].v4.into();
    let home: IpAddr = ANYCAST_V4.into();
    let sock = topo.servers[1]
        .ns
        .in_ns(move || Ok(UdpSocket::bind(SocketAddr::new(real, 0))?))?;
    let mut sent_updates = 0u16;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        sent_updates += 1;
        sock.send_to(
            &binding_update("s2", home, real, sent_updates, 1, &key),
            SocketAddr::new(AGENT.into(), REGISTRATION_PORT),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let (line, took) = timed_request(&topo, r#"{"request":"bindings"}"#)?;
        assert!(
            took < Duration::from_secs(1),
            "bindings answered in {took:?} during the flood"
        );
        let b: serde_json::Value = serde_json::from_str(&line)?;
        let bound = b["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["server"] == "s2" && x["state"] == "active");
        assert!(bound, "s2 stays bound during the flood: {line}");
    }
    let sent = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let dropped = counter(&topo, "replies_dropped_queue_full")? - dropped_before;
    let accepted = accepted(&topo)? - accepted_before;
    let errors_sent = counter(&topo, "binding_errors_sent")?;
    println!(
        "flood: {sent} datagrams, {errors_sent} binding errors answered, {dropped} replies \
         dropped with a full queue; {sent_updates} updates sent, {accepted} accepted"
    );
    assert!(
        dropped > 0,
        "replies that could not be queued were dropped and counted"
    );
    assert_eq!(
        accepted,
        u64::from(sent_updates),
        "every binding update was processed during the flood"
    );
    Ok(())
}
