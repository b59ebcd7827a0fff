//! The one harness of the data-path tests: a network namespace this thread has entered, the
//! eBPF object loaded as the agent ([`Harness`]) or as the server side ([`ServerSide`]),
//! programs run with `BPF_PROG_TEST_RUN`, and the frames of the test topology.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anycast_common::{
    addr_words, decap, flow_hash, maps, programs, syn_ack_tunnel, verdict, AddressKey, FlowKey,
    ServiceKey, SynAckTunnelConfig, PROTO_TCP, PROTO_UDP,
};
use anycast_ctl::dataplane::{
    flow_clock_now, load_object, Dataplane, DesiredServer, DesiredService, FlowReport, Sizes,
};
use anycast_tests::{
    netns::{run, Netns as TestNetns},
    packet::{self, ethernet, first_difference, hex, mac_str, Ip, DF, TCP_ACK, TCP_PSH},
};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, Map, MapData, MapInfo, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};

// XDP actions, as the programs return them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub fn action_name(a: u32) -> String {
    match a {
        XDP_ABORTED => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        other => format!("unknown action {other}"),
    }
}

// TC actions.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_REDIRECT: u32 = 7;

// ---------------------------------------------------------------------------------------
// The namespace and its addresses.

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const FX0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const FY0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// A third port, deliberately left out of the device map.
pub const FZ0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
/// The server's MAC in frames it sends to the agent's fx0 (server A's).
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x0b];
/// The server's router, in frames the server's stack sends towards the client.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x09, 0x01];

/// Permanent neighbours: (address, MAC, device).
const NEIGHBOURS: &[(&str, [u8; 6], &str)] = &[
    ("10.9.2.11", [0x02, 0, 0, 0, 0x02, 0x0b], "fx0"),
    ("10.9.2.12", [0x02, 0, 0, 0, 0x02, 0x0c], "fx0"),
    ("10.9.2.13", [0x02, 0, 0, 0, 0x02, 0x0d], "fx0"),
    ("fd09:2::11", [0x02, 0, 0, 0, 0x02, 0x0b], "fx0"),
    ("10.9.3.11", [0x02, 0, 0, 0, 0x03, 0x0b], "fy0"),
    ("10.9.4.11", [0x02, 0, 0, 0, 0x04, 0x0b], "fz0"),
];

pub fn neighbour_mac(addr: &str) -> [u8; 6] {
    NEIGHBOURS
        .iter()
        .find(|n| n.0 == addr)
        .unwrap_or_else(|| panic!("{addr} is not a neighbour of the test namespace"))
        .1
}

pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 2, 1);
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 2, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);

pub const SERVER_A: &str = "10.9.2.11";
pub const SERVER_B: &str = "10.9.2.12";
pub const SERVER_C: &str = "10.9.2.13";
/// Reached through fy0: XDP_REDIRECT.
pub const SERVER_D: &str = "10.9.3.11";

/// `ip ARGS` in the namespace this thread is in.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(|_| ())
}

fn setns(file: &File) -> Result<()> {
    // SAFETY: plain syscall on a file descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// A network namespace (from `anycast_tests::netns`) with the test topology, which this
/// thread has entered; on drop the thread goes back to where it was, then the namespace is
/// deleted (also when the test panics).
pub struct Netns {
    ns: TestNetns,
    original: File,
}

impl Netns {
    pub fn new() -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "acdp{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let original =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let ns = Netns {
            ns: TestNetns::new(&name)?,
            original,
        };
        ns.configure()?;
        Ok(ns)
    }

    fn configure(&self) -> Result<()> {
        let ipn = |args: &[&str]| self.ns.ip(args).map(|_| ());
        let pairs = [
            ("fx0", "fx1", FX0_MAC, vec!["10.9.2.1/24", "fd09:2::1/64"]),
            ("fy0", "fy1", FY0_MAC, vec!["10.9.3.1/24"]),
            ("fz0", "fz1", FZ0_MAC, vec!["10.9.4.1/24"]),
        ];
        for (a, b, mac, addrs) in &pairs {
            ipn(&["link", "add", a, "type", "veth", "peer", "name", b])?;
            ipn(&["link", "set", a, "address", &mac_str(*mac)])?;
            ipn(&["link", "set", a, "up"])?;
            ipn(&["link", "set", b, "up"])?;
            for addr in addrs {
                if addr.contains(':') {
                    ipn(&["addr", "add", addr, "dev", a, "nodad"])?;
                } else {
                    ipn(&["addr", "add", addr, "dev", a])?;
                }
            }
        }
        for (addr, mac, dev) in NEIGHBOURS {
            ipn(&[
                "neigh",
                "add",
                addr,
                "lladdr",
                &mac_str(*mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        // The kernel does the data path's FIB lookups in the namespace of the thread that
        // runs the program: this one, from now on.
        self.ns.enter()?;
        // Net sysctls resolve in the namespace of the writing thread: this one, now.
        for (path, what) in [
            ("/proc/sys/net/ipv4/ip_forward", "IPv4 forwarding"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6 forwarding"),
        ] {
            std::fs::write(path, "1").with_context(|| format!("turning on {what}"))?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Back first; `ns` then deletes the namespace.
        if let Err(e) = setns(&self.original) {
            eprintln!("leaving namespace {}: {e:#}", self.ns.name);
        }
    }
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} in the test namespace");
    }
    Ok(i)
}

// ---------------------------------------------------------------------------------------
// The agent: the data plane and running its program.

/// A namespace, its interfaces and a loaded data plane. Fields drop in order: the data
/// plane's maps and program go before the namespace.
pub struct Harness {
    pub dataplane: Dataplane,
    pub fx0: u32,
    pub fy0: u32,
    pub fz0: u32,
    _ns: Netns,
}

pub fn new_dataplane(fy0: u32) -> Result<Dataplane> {
    new_dataplane_with_flows(fy0, 4096)
}

pub fn new_dataplane_with_flows(fy0: u32, max_flows: u32) -> Result<Dataplane> {
    let mut dp = Dataplane::new(Sizes {
        ring_size: 4099,
        max_services: 8,
        max_flows,
        ..Default::default()
    })?;
    dp.set_agent_addresses(Some(IpAddr::V4(AGENT_V4)), Some(IpAddr::V6(AGENT_V6)))?;
    // As with `registration.reverse_tunnel` configured; the tests of the flag turn it off.
    dp.set_reverse_tunnel(true)?;
    dp.add_tx_port(fy0)?;
    let prog: &mut Xdp = dp
        .ebpf
        .program_mut(programs::AGENT)
        .ok_or_else(|| anyhow!("no program {}", programs::AGENT))?
        .try_into()?;
    prog.load().context("loading the agent program")?;
    Ok(dp)
}

impl Harness {
    pub fn new() -> Result<Self> {
        let ns = Netns::new()?;
        let fx0 = ifindex("fx0")?;
        let fy0 = ifindex("fy0")?;
        let fz0 = ifindex("fz0")?;
        let dataplane = new_dataplane(fy0)?;
        Ok(Harness {
            dataplane,
            fx0,
            fy0,
            fz0,
            _ns: ns,
        })
    }
}

/// Runs an XDP program once on `input`, received on `ingress`: the action and the frame.
pub fn test_run_xdp(prog: &Xdp, ingress: u32, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, input.len() as u32, 0, ingress, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; input.len() + 64];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// Runs the agent once on `input`, received on `ingress`. Returns the action and the frame.
pub fn run_xdp(dp: &Dataplane, ingress: u32, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let prog: &Xdp = dp
        .ebpf
        .program(programs::AGENT)
        .ok_or_else(|| anyhow!("no program {}", programs::AGENT))?
        .try_into()?;
    test_run_xdp(prog, ingress, input)
}

/// The `VERDICTS` counters, summed over CPUs, in `verdict::NAMES` order.
pub fn counters(dp: &Dataplane) -> Result<Vec<u64>> {
    let v = dp.report()?.verdicts;
    let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        verdict::NAMES,
        "the report lists the verdicts in order"
    );
    Ok(v.into_iter().map(|(_, c)| c).collect())
}

pub fn counter(dp: &Dataplane, reason: u32) -> Result<u64> {
    Ok(counters(dp)?[reason as usize])
}

/// Counter rises over `f`, by verdict index.
pub fn counting<T>(dp: &Dataplane, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<u64>)> {
    let before = counters(dp)?;
    let t = f()?;
    let after = counters(dp)?;
    Ok((t, after.iter().zip(&before).map(|(a, b)| a - b).collect()))
}

/// One of the agent program's maps, opened by id behind the data plane's back.
pub fn agent_map(dp: &Dataplane, name: &str) -> Result<Map> {
    let prog: &Xdp = dp
        .ebpf
        .program(programs::AGENT)
        .ok_or_else(|| anyhow!("no program {}", programs::AGENT))?
        .try_into()?;
    let ids = prog
        .info()?
        .map_ids()?
        .ok_or_else(|| anyhow!("the kernel does not list a program's maps"))?;
    for id in ids {
        if MapInfo::from_id(id)?.name_as_str() == Some(name) {
            return Ok(Map::from_map_data(MapData::from_id(id)?)?);
        }
    }
    bail!("the agent program uses no map {name}")
}

/// Waits until the flow clock has passed second `t` (at most about a second).
pub fn wait_past(t: u32) {
    let start = Instant::now();
    while flow_clock_now() <= t {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the flow clock stands still"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// Services.

pub fn service(
    name: &str,
    addr: &str,
    proto: u8,
    port: u16,
    servers: &[(&str, u32)],
) -> DesiredService {
    DesiredService {
        name: name.into(),
        key: ServiceKey::new(addr.parse().unwrap(), proto, port),
        servers: servers
            .iter()
            .map(|(a, w)| DesiredServer {
                name: a.to_string(),
                address: a.parse().unwrap(),
                weight: *w,
                up: true,
            })
            .collect(),
        preferences: Vec::new(),
    }
}

/// 192.0.2.10 tcp 80 and udp 53, both served by 10.9.2.11.
pub fn web_and_dns() -> Vec<DesiredService> {
    vec![
        service("web", "192.0.2.10", PROTO_TCP, 80, &[("10.9.2.11", 1)]),
        service("dns", "192.0.2.10", PROTO_UDP, 53, &[("10.9.2.11", 1)]),
    ]
}

pub fn web6() -> Vec<DesiredService> {
    vec![service(
        "web6",
        "2001:db8::10",
        PROTO_TCP,
        443,
        &[("fd09:2::11", 1)],
    )]
}

// ---------------------------------------------------------------------------------------
// Packets of the topology, built with the tests library's packet builder.

#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn v4(dst: &str, proto: u8, sport: u16, dport: u16) -> Self {
        Flow {
            src: IpAddr::V4(CLIENT_V4),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
        }
    }
    pub fn v6(dst: &str, proto: u8, sport: u16, dport: u16) -> Self {
        Flow {
            src: IpAddr::V6(CLIENT_V6),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
        }
    }
    /// The outer IPv6 flow label of the flow's tunnelled packets: the only value the
    /// expected frames borrow from the project.
    pub fn label(&self) -> u32 {
        flow_hash(&FlowKey::new(
            self.src, self.dst, self.proto, self.sport, self.dport,
        )) & 0x000f_ffff
    }
}

pub const PAYLOAD: &[u8] = b"anycast data path fixture payload";

/// DSCP EF plus ECT(1): copied into the outer header.
pub const TOS: u8 = 0xb9;
/// Traffic class of the IPv6 inputs.
pub const TCLASS: u8 = 0xa6;
pub const INNER_LABEL: u32 = 0x5_4321;

/// An IP header as the hosts of the topology send it (IPv4 id 0x1c46, TTL 61; IPv6 hop
/// limit 59), with DF, TOS/traffic class 0 and flow label 0 unless set.
pub fn host_ip(src: IpAddr, dst: IpAddr, proto: u8) -> Ip {
    let ttl = if src.is_ipv4() { 61 } else { 59 };
    Ip::new(src, dst, proto).id(0x1c46).ttl(ttl)
}

/// A client's IP header: IPv4 with [`TOS`], IPv6 with [`TCLASS`] and [`INNER_LABEL`].
pub fn client_ip(src: IpAddr, dst: IpAddr, proto: u8) -> Ip {
    match src {
        IpAddr::V4(_) => host_ip(src, dst, proto).tos(TOS),
        IpAddr::V6(_) => host_ip(src, dst, proto).tos(TCLASS).label(INNER_LABEL),
    }
}

/// The L4 header and payload of a flow: TCP (PSH ACK) or UDP.
pub fn l4(flow: &Flow) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => packet::tcp(flow.sport, flow.dport, TCP_PSH | TCP_ACK, PAYLOAD),
        PROTO_UDP => packet::udp(flow.sport, flow.dport, PAYLOAD),
        p => panic!("no L4 builder for protocol {p}"),
    }
}

/// The IP packet of a flow, as the client sends it.
pub fn ip_packet(flow: &Flow) -> Vec<u8> {
    ip_packet_with(flow, DF, &[])
}

/// The IP packet of a flow with IPv4 flags and fragment offset `frag` and IPv4 `options`.
pub fn ip_packet_with(flow: &Flow, frag: u16, options: &[u8]) -> Vec<u8> {
    let ip = client_ip(flow.src, flow.dst, flow.proto);
    let ip = if flow.src.is_ipv4() {
        ip.frag(frag).options(options)
    } else {
        ip
    };
    ip.packet(&l4(flow))
}

/// The client's IP packet of a flow; TCP with the given flags.
pub fn packet_with_flags(flow: &Flow, flags: u8) -> Vec<u8> {
    let l4 = match flow.proto {
        PROTO_TCP => packet::tcp(flow.sport, flow.dport, flags, PAYLOAD),
        _ => l4(flow),
    };
    client_ip(flow.src, flow.dst, flow.proto).packet(&l4)
}

/// An IPv4 TCP packet of `total` bytes.
pub fn big_packet(flow: &Flow, total: usize) -> Vec<u8> {
    assert!(flow.src.is_ipv4(), "IPv4 only");
    let payload: Vec<u8> = (0..total - 40).map(|i| i as u8).collect();
    client_ip(flow.src, flow.dst, PROTO_TCP).packet(&packet::tcp(
        flow.sport,
        flow.dport,
        TCP_PSH | TCP_ACK,
        &payload,
    ))
}

/// An IPv4 TCP packet of `total` bytes without DF (the agent does not answer those when
/// they are too big for the tunnel: it drops them).
pub fn big_packet_no_df(flow: &Flow, total: usize) -> Vec<u8> {
    let mut ip = big_packet(flow, total);
    ip[6] &= !0x40;
    packet::fix_ipv4_checksum(&mut ip);
    ip
}

/// A frame from the client to the agent's fx0.
pub fn client_frame(vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    ethernet(FX0_MAC, CLIENT_MAC, vlan, ip)
}

/// The outer header's TOS/traffic class and protocol for `inner`: the inner DSCP and ECN,
/// and IPv4-in-IP (4) or IPv6-in-IP (41).
pub fn outer_tos_and_proto(inner: &[u8]) -> (u8, u8) {
    match inner[0] >> 4 {
        4 => (inner[1], 4u8),
        6 => ((inner[0] << 4) | (inner[1] >> 4), 41u8),
        v => panic!("IP version {v}"),
    }
}

/// What the agent should send: `inner` (the client's IP packet, unchanged) in an outer
/// header from the agent to `server` (IPv4: id 0, DF, TTL 64; IPv6: the flow's label, hop
/// limit 64), in a frame from `src_mac` to `dst_mac`.
pub fn encapsulated(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    flow: &Flow,
    inner: &[u8],
    server: &str,
) -> Vec<u8> {
    let server: IpAddr = server.parse().unwrap();
    let (tos, next) = outer_tos_and_proto(inner);
    let outer = match server {
        IpAddr::V4(_) => Ip::new(IpAddr::V4(AGENT_V4), server, next).tos(tos),
        IpAddr::V6(_) => Ip::new(IpAddr::V6(AGENT_V6), server, next)
            .tos(tos)
            .label(flow.label()),
    };
    ethernet(dst_mac, src_mac, vlan, &outer.packet(inner))
}

/// A frame encapsulated towards a neighbour on fx0, sent back out of fx0.
pub fn tx_to(server: &str, vlan: Option<u16>, flow: &Flow, inner: &[u8]) -> Vec<u8> {
    encapsulated(neighbour_mac(server), FX0_MAC, vlan, flow, inner, server)
}

/// The client's ARP request for 192.0.2.10.
pub fn arp_request() -> Vec<u8> {
    packet::arp_request(CLIENT_MAC, CLIENT_V4.octets(), [192, 0, 2, 10])
}

/// A server's answer: from the anycast `service` address and `port` to the client.
pub fn answer(service: &str, proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = if proto == PROTO_TCP {
        packet::tcp(sport, dport, flags, &[])
    } else {
        packet::udp(sport, dport, PAYLOAD)
    };
    let src: IpAddr = service.parse().unwrap();
    let dst = match src {
        IpAddr::V4(_) => IpAddr::V4(CLIENT_V4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT_V6),
    };
    client_ip(src, dst, proto).packet(&l4)
}

// ---------------------------------------------------------------------------------------
// Sending flows through the agent.

/// The frame the agent must send for `inner` tunnelled to `server` (fy0's neighbour is
/// redirected there, the others go back out of fx0).
pub fn expected_frame(server: &str, flow: &Flow, inner: &[u8]) -> (u32, Vec<u8>) {
    if server == SERVER_D {
        (
            XDP_REDIRECT,
            encapsulated(neighbour_mac(server), FY0_MAC, None, flow, inner, server),
        )
    } else {
        (XDP_TX, tx_to(server, None, flow, inner))
    }
}

/// Sends one packet of `flow` (TCP flags `flags`) and returns the server it was tunnelled
/// to, after checking the whole output frame against the one built here for that server.
pub fn send(h: &Harness, flow: &Flow, flags: u8) -> Result<IpAddr> {
    let inner = packet_with_flags(flow, flags);
    let (action, out) = run_xdp(&h.dataplane, h.fx0, &client_frame(None, &inner))?;
    let dst: IpAddr = match out.get(12..14) {
        Some([0x08, 0x00]) if out.len() >= 34 => IpAddr::from([out[30], out[31], out[32], out[33]]),
        Some([0x86, 0xdd]) if out.len() >= 54 => {
            IpAddr::from(<[u8; 16]>::try_from(&out[38..54]).expect("16 bytes"))
        }
        _ => bail!(
            "{flow:?}: not a tunnelled frame ({}):\n{}",
            action_name(action),
            hex(&out)
        ),
    };
    let (want_action, want) = expected_frame(&dst.to_string(), flow, &inner);
    if action != want_action || out != want {
        bail!(
            "{flow:?} to {dst}: got {}, expected {}; {}\nactual:\n{}expected:\n{}",
            action_name(action),
            action_name(want_action),
            first_difference(&out, &want),
            hex(&out),
            hex(&want)
        );
    }
    Ok(dst)
}

/// Sends one packet of each flow; the servers they went to.
pub fn send_all(h: &Harness, flows: &[Flow], flags: u8) -> Result<Vec<IpAddr>> {
    flows.iter().map(|f| send(h, f, flags)).collect()
}

pub fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

pub fn servers_used(dsts: &[IpAddr]) -> BTreeSet<IpAddr> {
    dsts.iter().copied().collect()
}

/// The flow table's entries by (client, client port, protocol).
pub fn flow_table(dp: &Dataplane) -> Result<BTreeMap<(IpAddr, u16, String), FlowReport>> {
    Ok(dp
        .flows()?
        .into_iter()
        .map(|f| ((f.client, f.client_port, f.protocol.clone()), f))
        .collect())
}

pub fn entry<'a>(
    table: &'a BTreeMap<(IpAddr, u16, String), FlowReport>,
    flow: &Flow,
) -> Option<&'a FlowReport> {
    let proto = if flow.proto == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    };
    table.get(&(flow.src, flow.sport, proto.to_string()))
}

// ---------------------------------------------------------------------------------------
// The server side: decapsulation (XDP) and the SYN-ACK tunnel (TC egress).

/// The server side's object, its maps and its loaded programs (`anycast_decap` and
/// `anycast_reverse`), in the test namespace (whose forwarding, lo included, is on: the TC
/// program's FIB lookups need it on lo).
pub struct ServerSide {
    ebpf: aya::Ebpf,
    /// Held: a map whose last descriptor closes before the program loads is freed.
    served: aya::maps::HashMap<MapData, AddressKey, u32>,
    reverse_stats: PerCpuArray<MapData, u64>,
    decap_stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, SynAckTunnelConfig>,
    pub fx0: u32,
    _ns: Netns,
}

impl ServerSide {
    /// Loaded, answering for the anycast addresses `served`.
    pub fn new(served: &[&str]) -> Result<Self> {
        let ns = Netns::new()?;
        let mut ebpf = load_object(Sizes {
            ring_size: 1,
            max_services: 1,
            max_flows: 1,
            max_preference_tables: 1,
            max_client_flows: 1,
            max_server_udp_flows: anycast_common::MAX_SERVER_UDP_FLOWS,
        })?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the object has no map {name}"))
        };
        let served_map = aya::maps::HashMap::try_from(take(maps::SERVED)?)?;
        let reverse_stats = PerCpuArray::try_from(take(maps::REVERSE_STATS)?)?;
        let decap_stats = PerCpuArray::try_from(take(maps::DECAP_STATS)?)?;
        let config = Array::try_from(take(maps::REVERSE_CONFIG)?)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(programs::SERVER_REVERSE)
            .ok_or_else(|| anyhow!("no program {}", programs::SERVER_REVERSE))?
            .try_into()?;
        tc.load().context("loading the reverse-tunnel program")?;
        let xdp: &mut Xdp = ebpf
            .program_mut(programs::SERVER_DECAP)
            .ok_or_else(|| anyhow!("no program {}", programs::SERVER_DECAP))?
            .try_into()?;
        xdp.load().context("loading the decapsulation program")?;
        let mut side = ServerSide {
            ebpf,
            served: served_map,
            reverse_stats,
            decap_stats,
            config,
            fx0: ifindex("fx0")?,
            _ns: ns,
        };
        side.set_served(served)?;
        Ok(side)
    }

    /// Replaces the anycast addresses the server answers for.
    pub fn set_served(&mut self, served: &[&str]) -> Result<()> {
        let old: Vec<AddressKey> = self.served.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.served.remove(&k)?;
        }
        for a in served {
            self.served.insert(AddressKey::new(a.parse()?), 1, 0)?;
        }
        Ok(())
    }

    /// Where the SYN-ACK tunnel goes: to `agent`, from `source`.
    pub fn set_tunnel(&mut self, agent: &str, source: &str) -> Result<()> {
        let (agent, family) = addr_words(agent.parse()?);
        self.config.set(
            0,
            SynAckTunnelConfig {
                agent,
                source: addr_words(source.parse()?).0,
                family,
                _pad: [0; 3],
            },
            0,
        )?;
        Ok(())
    }

    /// Runs the TC program on `input`: the action and the frame.
    pub fn run_tc(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(programs::SERVER_REVERSE)
            .ok_or_else(|| anyhow!("no program"))?
            .try_into()?;
        let mut out = vec![0u8; input.len() + 128];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (sched_cls)")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// The loaded object (for maps no helper here reads).
    pub fn ebpf(&mut self) -> &mut aya::Ebpf {
        &mut self.ebpf
    }

    /// Runs the decapsulation program on `input`, received on fx0.
    pub fn run_decap(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &Xdp = self
            .ebpf
            .program(programs::SERVER_DECAP)
            .ok_or_else(|| anyhow!("no program"))?
            .try_into()?;
        test_run_xdp(prog, self.fx0, input)
    }

    /// The SYN-ACK tunnel's counters (`syn_ack_tunnel::NAMES` order), summed over CPUs.
    pub fn reverse_counters(&self) -> Result<Vec<u64>> {
        (0..syn_ack_tunnel::COUNT)
            .map(|i| Ok(self.reverse_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// The decapsulation counters (`decap::NAMES` order), summed over CPUs.
    pub fn decap_counters(&self) -> Result<Vec<u64>> {
        (0..decap::COUNT)
            .map(|i| Ok(self.decap_stats.get(&i, 0)?.iter().sum()))
            .collect()
    }
}

/// `inner` IP-in-IP from `source` to `dest` with the outer header the server's tunnel
/// builds: outer IPv4 with the inner DSCP/ECN, DF, TTL 64, id 0; outer IPv6 with the inner
/// traffic class, flow label 0, hop limit 64.
pub fn tunnelled(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    source: &str,
    dest: &str,
    inner: &[u8],
) -> Vec<u8> {
    let (tos, next) = outer_tos_and_proto(inner);
    let outer = Ip::new(source.parse().unwrap(), dest.parse().unwrap(), next).tos(tos);
    ethernet(dst_mac, src_mac, None, &outer.packet(inner))
}

/// Keeps this thread on the CPU it runs on until dropped: `BPF_PROG_TEST_RUN` runs the
/// program on the calling thread's CPU, and the rate limits' buckets are per CPU.
pub struct OnOneCpu(libc::cpu_set_t);

impl OnOneCpu {
    pub fn new() -> Self {
        // SAFETY: plain syscalls on this thread with sets we own.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old);
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut one);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one),
                0,
                "pinning the test thread to its CPU"
            );
            OnOneCpu(old)
        }
    }
}

impl Drop for OnOneCpu {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}
