//! The agent's XDP data path, run with `BPF_PROG_TEST_RUN` against hand-built packets.
//!
//! Each test gets a network namespace of its own (veth pairs, addresses, permanent
//! neighbours, forwarding on) and moves its thread into it, because the kernel does the
//! data path's FIB lookups in the namespace of the thread that runs the test. Inputs and
//! expected outputs are built here byte by byte, independently of the program's code; the
//! only value borrowed from the project is the flow hash that becomes the outer IPv6 flow
//! label.
//!
//! Needs root. Run with `cargo test --release -p anycast-tests --test datapath --
//! --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anycast_common::{
    addr_words, flow_hash, flow_ticks, maps, programs, reverse, verdict, AddressKey, FlowKey,
    PreferenceTable, ReverseConfig, ServiceKey, PROTO_TCP, PROTO_UDP,
};
use anycast_ctl::dataplane::{
    coarse_clock_ns, flow_clock_now, load_object, Dataplane, DesiredServer, DesiredService,
    FlowReport, FlowTimeouts, Preference, ReverseCounters, Sizes,
};
use anycast_tests::netns::{run, Netns as TestNetns};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, LpmTrie, Map, MapData, MapInfo, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};

// XDP actions, as the program returns them.
const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn action_name(a: u32) -> String {
    match a {
        XDP_ABORTED => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        other => format!("unknown action {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// The namespace and its addresses.

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const FX0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const FY0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// A third port, deliberately left out of the device map.
const FZ0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];

/// Permanent neighbours: (address, MAC, device).
const NEIGHBOURS: &[(&str, [u8; 6], &str)] = &[
    ("10.9.2.11", [0x02, 0, 0, 0, 0x02, 0x0b], "fx0"),
    ("10.9.2.12", [0x02, 0, 0, 0, 0x02, 0x0c], "fx0"),
    ("10.9.2.13", [0x02, 0, 0, 0, 0x02, 0x0d], "fx0"),
    ("fd09:2::11", [0x02, 0, 0, 0, 0x02, 0x0b], "fx0"),
    ("10.9.3.11", [0x02, 0, 0, 0, 0x03, 0x0b], "fy0"),
    ("10.9.4.11", [0x02, 0, 0, 0, 0x04, 0x0b], "fz0"),
];

fn neighbour_mac(addr: &str) -> [u8; 6] {
    NEIGHBOURS
        .iter()
        .find(|n| n.0 == addr)
        .unwrap_or_else(|| panic!("{addr} is not a neighbour of the test namespace"))
        .1
}

const AGENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 2, 1);
const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 2, 0, 0, 0, 0, 0, 1);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(|_| ())
}

fn setns(file: &File) -> Result<()> {
    // SAFETY: plain syscall on a file descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// A network namespace (from `anycast_tests::netns`) that this thread has entered; on drop
/// the thread goes back to where it was, then the namespace is deleted (also when the test
/// panics).
struct Netns {
    ns: TestNetns,
    original: File,
}

impl Netns {
    fn new() -> Result<Self> {
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

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} in the test namespace");
    }
    Ok(i)
}

// ---------------------------------------------------------------------------------------
// The data plane and running the program.

/// A namespace, its interfaces and a loaded data plane. Fields drop in order: the data
/// plane's maps and program go before the namespace.
struct Harness {
    dataplane: Dataplane,
    fx0: u32,
    fy0: u32,
    _ns: Netns,
}

fn new_dataplane(fy0: u32) -> Result<Dataplane> {
    new_dataplane_with_flows(fy0, 4096)
}

fn new_dataplane_with_flows(fy0: u32, max_flows: u32) -> Result<Dataplane> {
    let mut dp = Dataplane::new(Sizes {
        ring_size: 4099,
        max_services: 8,
        max_flows,
        ..Default::default()
    })?;
    dp.set_agent_addresses(Some(IpAddr::V4(AGENT_V4)), Some(IpAddr::V6(AGENT_V6)))?;
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
    fn new() -> Result<Self> {
        let ns = Netns::new()?;
        let fx0 = ifindex("fx0")?;
        let fy0 = ifindex("fy0")?;
        let dataplane = new_dataplane(fy0)?;
        Ok(Harness {
            dataplane,
            fx0,
            fy0,
            _ns: ns,
        })
    }
}

/// Runs the agent once on `input`, received on `ingress`. Returns the action and the frame.
fn run_xdp(dp: &Dataplane, ingress: u32, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let prog: &Xdp = dp
        .ebpf
        .program(programs::AGENT)
        .ok_or_else(|| anyhow!("no program {}", programs::AGENT))?
        .try_into()?;
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

/// The `VERDICTS` counters, summed over CPUs, in `verdict::NAMES` order.
fn counters(dp: &Dataplane) -> Result<Vec<u64>> {
    let v = dp.report()?.verdicts;
    let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        verdict::NAMES,
        "the report lists the verdicts in order"
    );
    Ok(v.into_iter().map(|(_, c)| c).collect())
}

// ---------------------------------------------------------------------------------------
// Packets, built by hand.

/// Internet checksum (RFC 1071) of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
}

impl Flow {
    fn v4(dst: &str, proto: u8, sport: u16, dport: u16) -> Self {
        Flow {
            src: IpAddr::V4(CLIENT_V4),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
        }
    }
    fn v6(dst: &str, proto: u8, sport: u16, dport: u16) -> Self {
        Flow {
            src: IpAddr::V6(CLIENT_V6),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
        }
    }
    fn label(&self) -> u32 {
        flow_hash(&FlowKey::new(
            self.src, self.dst, self.proto, self.sport, self.dport,
        )) & 0x000f_ffff
    }
}

const PAYLOAD: &[u8] = b"anycast data path fixture payload";

fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    h.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // ack
    h.push(5 << 4); // data offset
    h.push(0x18); // PSH, ACK
    h.extend_from_slice(&0xfaf0u16.to_be_bytes()); // window
    h.extend_from_slice(&0xbeefu16.to_be_bytes()); // checksum: never read by the data path
    h.extend_from_slice(&[0, 0]); // urgent pointer
    h.extend_from_slice(payload);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&0xbeefu16.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn l4(flow: &Flow) -> Vec<u8> {
    match flow.proto {
        PROTO_TCP => tcp(flow.sport, flow.dport, PAYLOAD),
        PROTO_UDP => udp(flow.sport, flow.dport, PAYLOAD),
        p => panic!("no L4 builder for protocol {p}"),
    }
}

/// An IPv4 header (with options) and payload; the header checksum is computed here.
fn ipv4(
    tos: u8,
    frag: u16,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let ihl = (20 + options.len()) / 4;
    let total = (ihl * 4 + payload.len()) as u16;
    let mut h = vec![0x40 | ihl as u8, tos];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&0x1c46u16.to_be_bytes()); // id
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(61); // ttl
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let sum = inet_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header and payload.
fn ipv6(tclass: u8, label: u32, next: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let first = (6u32 << 28) | (u32::from(tclass) << 20) | (label & 0x000f_ffff);
    let mut h = first.to_be_bytes().to_vec();
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(59); // hop limit
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// DSCP EF plus ECT(1): copied into the outer header.
const TOS: u8 = 0xb9;
/// Traffic class of the IPv6 inputs.
const TCLASS: u8 = 0xa6;
const INNER_LABEL: u32 = 0x5_4321;
const DF: u16 = 0x4000;

/// The IP packet of a flow, as the client sends it.
fn ip_packet(flow: &Flow) -> Vec<u8> {
    ip_packet_with(flow, DF, &[])
}

fn ip_packet_with(flow: &Flow, frag: u16, options: &[u8]) -> Vec<u8> {
    match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(TOS, frag, flow.proto, s, d, options, &l4(flow)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(TCLASS, INNER_LABEL, flow.proto, s, d, &l4(flow)),
        _ => panic!("mixed families in {flow:?}"),
    }
}

/// An IPv4 TCP packet of `total` bytes.
fn big_packet(flow: &Flow, total: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..total - 40).map(|i| i as u8).collect();
    let (IpAddr::V4(s), IpAddr::V4(d)) = (flow.src, flow.dst) else {
        panic!("IPv4 only")
    };
    ipv4(
        TOS,
        DF,
        PROTO_TCP,
        s,
        d,
        &[],
        &tcp(flow.sport, flow.dport, &payload),
    )
}

fn ethertype_of(ip: &[u8]) -> u16 {
    match ip[0] >> 4 {
        4 => 0x0800,
        6 => 0x86dd,
        v => panic!("IP version {v}"),
    }
}

fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A frame from the client to the agent's fx0.
fn client_frame(vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    ethernet(FX0_MAC, CLIENT_MAC, vlan, ethertype_of(ip), ip)
}

/// What the agent should send: `inner` (the client's IP packet, unchanged) in an outer
/// header from the agent to `server`, in a frame from `src_mac` to `dst_mac`.
fn encapsulated(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    flow: &Flow,
    inner: &[u8],
    server: &str,
) -> Vec<u8> {
    let server: IpAddr = server.parse().unwrap();
    let (tos, next) = match inner[0] >> 4 {
        4 => (inner[1], 4u8),
        6 => ((inner[0] << 4) | (inner[1] >> 4), 41u8),
        v => panic!("IP version {v}"),
    };
    let outer = match server {
        IpAddr::V4(s) => {
            let mut h = vec![0x45, tos];
            h.extend_from_slice(&(20 + inner.len() as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]); // id
            h.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
            h.push(64);
            h.push(next);
            h.extend_from_slice(&[0, 0]);
            h.extend_from_slice(&AGENT_V4.octets());
            h.extend_from_slice(&s.octets());
            let sum = inet_checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h.extend_from_slice(inner);
            h
        }
        IpAddr::V6(s) => ipv6_outer(tos, flow.label(), next, s, inner),
    };
    ethernet(dst_mac, src_mac, vlan, ethertype_of(&outer), &outer)
}

fn ipv6_outer(tclass: u8, label: u32, next: u8, server: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let first = (6u32 << 28) | (u32::from(tclass) << 20) | label;
    let mut h = first.to_be_bytes().to_vec();
    h.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&AGENT_V6.octets());
    h.extend_from_slice(&server.octets());
    h.extend_from_slice(inner);
    h
}

/// A frame encapsulated towards a neighbour on fx0, sent back out of fx0.
fn tx_to(server: &str, vlan: Option<u16>, flow: &Flow, inner: &[u8]) -> Vec<u8> {
    encapsulated(neighbour_mac(server), FX0_MAC, vlan, flow, inner, server)
}

fn arp_request() -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    a.extend_from_slice(&CLIENT_MAC);
    a.extend_from_slice(&CLIENT_V4.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&[192, 0, 2, 10]);
    ethernet([0xff; 6], CLIENT_MAC, None, 0x0806, &a)
}

/// Hex dump, 16 bytes a line, so that assertion diffs point at the offending bytes.
fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let _ = write!(s, "{:04x}:", i * 16);
        for byte in chunk {
            let _ = write!(s, " {byte:02x}");
        }
        s.push('\n');
    }
    s
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None if a.len() != b.len() => {
            format!(
                "lengths differ: {} (actual) vs {} (expected)",
                a.len(),
                b.len()
            )
        }
        None => "identical".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Services.

fn service(
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
fn web_and_dns() -> Vec<DesiredService> {
    vec![
        service("web", "192.0.2.10", PROTO_TCP, 80, &[("10.9.2.11", 1)]),
        service("dns", "192.0.2.10", PROTO_UDP, 53, &[("10.9.2.11", 1)]),
    ]
}

fn web6() -> Vec<DesiredService> {
    vec![service(
        "web6",
        "2001:db8::10",
        PROTO_TCP,
        443,
        &[("fd09:2::11", 1)],
    )]
}

// ---------------------------------------------------------------------------------------
// Fixtures.

struct Fixture {
    description: String,
    /// The whole service set for this case (`apply` removes any other).
    services: Vec<DesiredService>,
    input: Vec<u8>,
    /// XDP action.
    action: u32,
    /// Index into `VERDICTS` that must rise by one.
    reason: u32,
    /// The frame after the program; `None` for a frame dropped half-way through
    /// encapsulation, whose bytes are nobody's business.
    output: Option<Vec<u8>>,
}

fn fixture(
    description: impl Into<String>,
    services: Vec<DesiredService>,
    input: Vec<u8>,
    action: u32,
    reason: u32,
    output: Vec<u8>,
) -> Fixture {
    Fixture {
        description: description.into(),
        services,
        input,
        action,
        reason,
        output: Some(output),
    }
}

/// A change to a valid IP packet that makes it malformed.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

/// Passed to the kernel untouched.
fn untouched(
    description: impl Into<String>,
    services: Vec<DesiredService>,
    input: Vec<u8>,
    reason: u32,
) -> Fixture {
    let output = input.clone();
    fixture(description, services, input, XDP_PASS, reason, output)
}

fn fixtures() -> Vec<Fixture> {
    let mut v = Vec::new();

    // --- Encapsulated and sent.
    let f_tcp = Flow::v4("192.0.2.10", PROTO_TCP, 40000, 80);
    let ip_tcp = ip_packet(&f_tcp);
    let frame_tcp = client_frame(None, &ip_tcp);
    v.push(fixture(
        "IPv4 TCP to 192.0.2.10:80 -> IPv4-in-IPv4 to 10.9.2.11, XDP_TX",
        web_and_dns(),
        frame_tcp.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_tcp, &ip_tcp),
    ));

    let f_udp = Flow::v4("192.0.2.10", PROTO_UDP, 40001, 53);
    let ip_udp = ip_packet(&f_udp);
    v.push(fixture(
        "IPv4 UDP to 192.0.2.10:53 -> IPv4-in-IPv4 to 10.9.2.11, XDP_TX",
        web_and_dns(),
        client_frame(None, &ip_udp),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_udp, &ip_udp),
    ));

    let f_tcp6 = Flow::v6("2001:db8::10", PROTO_TCP, 40002, 443);
    let ip_tcp6 = ip_packet(&f_tcp6);
    let frame_tcp6 = client_frame(None, &ip_tcp6);
    v.push(fixture(
        "IPv6 TCP to [2001:db8::10]:443 -> IPv6-in-IPv6 to fd09:2::11, XDP_TX",
        web6(),
        frame_tcp6.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_tcp6, &ip_tcp6),
    ));

    let f_46 = Flow::v4("192.0.2.20", PROTO_TCP, 40003, 80);
    let ip_46 = ip_packet(&f_46);
    v.push(fixture(
        "IPv4 TCP to 192.0.2.20:80 whose server is fd09:2::11 -> IPv4-in-IPv6, XDP_TX",
        vec![service(
            "web46",
            "192.0.2.20",
            PROTO_TCP,
            80,
            &[("fd09:2::11", 1)],
        )],
        client_frame(None, &ip_46),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_46, &ip_46),
    ));

    let f_64 = Flow::v6("2001:db8::20", PROTO_UDP, 40004, 53);
    let ip_64 = ip_packet(&f_64);
    v.push(fixture(
        "IPv6 UDP to [2001:db8::20]:53 whose server is 10.9.2.11 -> IPv6-in-IPv4 (proto 41), XDP_TX",
        vec![service(
            "dns64",
            "2001:db8::20",
            PROTO_UDP,
            53,
            &[("10.9.2.11", 1)],
        )],
        client_frame(None, &ip_64),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_64, &ip_64),
    ));

    let f_opt = Flow::v4("192.0.2.10", PROTO_TCP, 40005, 80);
    // IHL 7: seven NOPs and an end-of-options.
    let ip_opt = ip_packet_with(&f_opt, DF, &[1, 1, 1, 1, 1, 1, 1, 0]);
    let frame_opt = client_frame(None, &ip_opt);
    v.push(fixture(
        "IPv4 with 8 bytes of options (IHL 7) TCP to 192.0.2.10:80 -> encapsulated, options kept, XDP_TX",
        web_and_dns(),
        frame_opt.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_opt, &ip_opt),
    ));

    let f_vlan = Flow::v4("192.0.2.10", PROTO_TCP, 40006, 80);
    let ip_vlan = ip_packet(&f_vlan);
    let frame_vlan = client_frame(Some(100), &ip_vlan);
    v.push(fixture(
        "802.1Q VID 100 IPv4 TCP to 192.0.2.10:80 -> encapsulated behind the same tag, XDP_TX",
        web_and_dns(),
        frame_vlan.clone(),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", Some(100), &f_vlan, &ip_vlan),
    ));

    let f_vlan6 = Flow::v6("2001:db8::10", PROTO_TCP, 40007, 443);
    let ip_vlan6 = ip_packet(&f_vlan6);
    v.push(fixture(
        "802.1Q VID 100 IPv6 TCP to [2001:db8::10]:443 -> IPv6-in-IPv6 behind the same tag, XDP_TX",
        web6(),
        client_frame(Some(100), &ip_vlan6),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", Some(100), &f_vlan6, &ip_vlan6),
    ));

    let wildcard = || {
        vec![service(
            "any-udp",
            "192.0.2.30",
            PROTO_UDP,
            0,
            &[("10.9.2.11", 1)],
        )]
    };
    let f_wild = Flow::v4("192.0.2.30", PROTO_UDP, 40008, 5353);
    let ip_wild = ip_packet(&f_wild);
    v.push(fixture(
        "UDP to 192.0.2.30:5353 matched by the port wildcard 192.0.2.30 udp 0 -> XDP_TX",
        wildcard(),
        client_frame(None, &ip_wild),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_wild, &ip_wild),
    ));
    v.push(untouched(
        "TCP to 192.0.2.30:5353: the udp port wildcard does not match tcp -> pass",
        wildcard(),
        client_frame(
            None,
            &ip_packet(&Flow::v4("192.0.2.30", PROTO_TCP, 40008, 5353)),
        ),
        verdict::PASS_NOT_SERVICE,
    ));

    let f_redir = Flow::v4("192.0.2.40", PROTO_TCP, 40009, 80);
    let ip_redir = ip_packet(&f_redir);
    v.push(fixture(
        "server 10.9.3.11 routed via fy0 (in TX_PORTS) -> XDP_REDIRECT, MACs of fy0 and the neighbour",
        vec![service(
            "redir",
            "192.0.2.40",
            PROTO_TCP,
            80,
            &[("10.9.3.11", 1)],
        )],
        client_frame(None, &ip_redir),
        XDP_REDIRECT,
        verdict::REDIRECT,
        encapsulated(
            neighbour_mac("10.9.3.11"),
            FY0_MAC,
            None,
            &f_redir,
            &ip_redir,
            "10.9.3.11",
        ),
    ));

    // Handed to the kernel to forward out of fz0, so the frame must still be addressed to
    // fx0: with the next hop's MAC as destination the stack takes it for another host's
    // frame (PACKET_OTHERHOST) and drops it.
    let f_notx = Flow::v4("192.0.2.41", PROTO_TCP, 40010, 80);
    let ip_notx = ip_packet(&f_notx);
    v.push(fixture(
        "server 10.9.4.11 routed via fz0 (not in TX_PORTS) -> XDP_PASS, encapsulated, MACs unchanged",
        vec![service(
            "notx",
            "192.0.2.41",
            PROTO_TCP,
            80,
            &[("10.9.4.11", 1)],
        )],
        client_frame(None, &ip_notx),
        XDP_PASS,
        verdict::PASS_NOT_TX_PORT,
        encapsulated(FX0_MAC, CLIENT_MAC, None, &f_notx, &ip_notx, "10.9.4.11"),
    ));

    // --- Encapsulated, handed to the kernel.
    let f_noneigh = Flow::v4("192.0.2.50", PROTO_TCP, 40011, 80);
    let ip_noneigh = ip_packet(&f_noneigh);
    v.push(fixture(
        "server 10.9.2.99 without a neighbour entry -> XDP_PASS, encapsulated, MACs unchanged",
        vec![service(
            "noneigh",
            "192.0.2.50",
            PROTO_TCP,
            80,
            &[("10.9.2.99", 1)],
        )],
        client_frame(None, &ip_noneigh),
        XDP_PASS,
        verdict::PASS_NO_NEIGH,
        encapsulated(
            FX0_MAC,
            CLIENT_MAC,
            None,
            &f_noneigh,
            &ip_noneigh,
            "10.9.2.99",
        ),
    ));

    let f_noroute = Flow::v4("192.0.2.60", PROTO_TCP, 40012, 80);
    let ip_noroute = ip_packet(&f_noroute);
    v.push(fixture(
        "server 10.99.0.1 without a route -> XDP_PASS, encapsulated, MACs unchanged",
        vec![service(
            "noroute",
            "192.0.2.60",
            PROTO_TCP,
            80,
            &[("10.99.0.1", 1)],
        )],
        client_frame(None, &ip_noroute),
        XDP_PASS,
        verdict::PASS_NO_ROUTE,
        encapsulated(
            FX0_MAC,
            CLIENT_MAC,
            None,
            &f_noroute,
            &ip_noroute,
            "10.99.0.1",
        ),
    ));

    // --- Dropped.
    let frame_w0 = client_frame(
        None,
        &ip_packet(&Flow::v4("192.0.2.70", PROTO_TCP, 40013, 80)),
    );
    v.push(fixture(
        "service whose only server has weight 0 -> XDP_DROP",
        vec![service(
            "weight0",
            "192.0.2.70",
            PROTO_TCP,
            80,
            &[("10.9.2.11", 0)],
        )],
        frame_w0.clone(),
        XDP_DROP,
        verdict::DROP_NO_SERVER,
        frame_w0,
    ));
    let mut down = service("down", "192.0.2.71", PROTO_TCP, 80, &[("10.9.2.11", 1)]);
    down.servers[0].up = false;
    let frame_down = client_frame(
        None,
        &ip_packet(&Flow::v4("192.0.2.71", PROTO_TCP, 40014, 80)),
    );
    v.push(fixture(
        "service whose only server is down -> XDP_DROP",
        vec![down],
        frame_down.clone(),
        XDP_DROP,
        verdict::DROP_NO_SERVER,
        frame_down,
    ));

    // --- Not for a service.
    for (what, flow) in [
        (
            "same address, other TCP port",
            Flow::v4("192.0.2.10", PROTO_TCP, 40015, 81),
        ),
        (
            "same address and port, other protocol (UDP 80)",
            Flow::v4("192.0.2.10", PROTO_UDP, 40015, 80),
        ),
        (
            "other address, same port",
            Flow::v4("192.0.2.11", PROTO_TCP, 40015, 80),
        ),
        (
            "IPv6 to another address",
            Flow::v6("2001:db8::11", PROTO_TCP, 40015, 443),
        ),
    ] {
        let services = if flow.dst.is_ipv4() {
            web_and_dns()
        } else {
            web6()
        };
        v.push(untouched(
            format!("not a service: {what} -> pass untouched"),
            services,
            client_frame(None, &ip_packet(&flow)),
            verdict::PASS_NOT_SERVICE,
        ));
    }
    let icmp = ipv4(
        TOS,
        DF,
        1,
        CLIENT_V4,
        "192.0.2.10".parse().unwrap(),
        &[],
        &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
    );
    v.push(untouched(
        "not a service: ICMP echo to the service address -> pass untouched",
        web_and_dns(),
        client_frame(None, &icmp),
        verdict::PASS_NOT_SERVICE,
    ));
    v.push(untouched(
        "not a service: ARP request -> pass untouched",
        web_and_dns(),
        arp_request(),
        verdict::PASS_NOT_SERVICE,
    ));

    // --- The egress MTU (1500 on the veths) bounds the outer packet.
    let big = big_packet;
    let f_mtu = Flow::v4("192.0.2.10", PROTO_TCP, 40020, 80);
    let ip_1480 = big(&f_mtu, 1480);
    v.push(fixture(
        "IPv4 TCP of 1480 bytes -> IPv4-in-IPv4 of exactly the MTU (1500), XDP_TX",
        web_and_dns(),
        client_frame(None, &ip_1480),
        XDP_TX,
        verdict::TX,
        tx_to("10.9.2.11", None, &f_mtu, &ip_1480),
    ));
    v.push(Fixture {
        description: "IPv4 TCP of 1481 bytes -> IPv4-in-IPv4 of 1501 > MTU, XDP_DROP".into(),
        services: web_and_dns(),
        input: client_frame(None, &big(&f_mtu, 1481)),
        action: XDP_DROP,
        reason: verdict::DROP_TOO_BIG,
        output: None,
    });
    let services_46 = || {
        vec![service(
            "web46",
            "192.0.2.20",
            PROTO_TCP,
            80,
            &[("fd09:2::11", 1)],
        )]
    };
    let f_mtu6 = Flow::v4("192.0.2.20", PROTO_TCP, 40021, 80);
    let ip_1460 = big(&f_mtu6, 1460);
    v.push(fixture(
        "IPv4 TCP of 1460 bytes -> IPv4-in-IPv6 of exactly the MTU (1500), XDP_TX",
        services_46(),
        client_frame(None, &ip_1460),
        XDP_TX,
        verdict::TX,
        tx_to("fd09:2::11", None, &f_mtu6, &ip_1460),
    ));
    v.push(Fixture {
        description: "IPv4 TCP of 1461 bytes -> IPv4-in-IPv6 of 1501 > MTU, XDP_DROP".into(),
        services: services_46(),
        input: client_frame(None, &big(&f_mtu6, 1461)),
        action: XDP_DROP,
        reason: verdict::DROP_TOO_BIG,
        output: None,
    });

    // --- Malformed headers in whole frames addressed to a service.
    let f_bad = Flow::v4("192.0.2.10", PROTO_TCP, 40022, 80);
    let f_bad_udp = Flow::v4("192.0.2.10", PROTO_UDP, 40022, 53);
    let edited = |flow: &Flow, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut ip = ip_packet(flow);
        edit(&mut ip);
        if flow.src.is_ipv4() && ip[0] & 0x0f >= 5 {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = inet_checksum(&ip[..ihl.min(ip.len())]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        client_frame(None, &ip)
    };
    let set_len = |len: u16| move |ip: &mut Vec<u8>| ip[2..4].copy_from_slice(&len.to_be_bytes());
    let v4_malformed: [(&str, &Flow, Edit); 6] = [
        ("IHL 4", &f_bad, Box::new(|ip| ip[0] = 0x44)),
        (
            "version 6 in an IPv4 frame",
            &f_bad,
            Box::new(|ip| ip[0] = 0x65),
        ),
        (
            "total length 16, below the header's 20",
            &f_bad,
            Box::new(set_len(16)),
        ),
        (
            "total length 30: the TCP header is not inside the IP packet",
            &f_bad,
            Box::new(set_len(30)),
        ),
        (
            "total length 26: the UDP header is not inside the IP packet",
            &f_bad_udp,
            Box::new(set_len(26)),
        ),
        (
            "IHL 15 (60 bytes) with total length 60: no room for TCP",
            &f_bad,
            Box::new(|ip| {
                ip[0] = 0x4f;
                ip[2..4].copy_from_slice(&60u16.to_be_bytes());
            }),
        ),
    ];
    for (what, flow, edit) in &v4_malformed {
        v.push(untouched(
            format!("malformed IPv4 to a service: {what} -> pass untouched"),
            web_and_dns(),
            edited(flow, edit.as_ref()),
            verdict::PASS_MALFORMED,
        ));
    }
    let f_bad6 = Flow::v6("2001:db8::10", PROTO_TCP, 40023, 443);
    let v6_malformed: [(&str, Edit); 2] = [
        ("version 4 in an IPv6 frame", Box::new(|ip| ip[0] = 0x4a)),
        (
            "payload length 10: the TCP header is not inside the IP packet",
            Box::new(|ip| ip[4..6].copy_from_slice(&10u16.to_be_bytes())),
        ),
    ];
    for (what, edit) in &v6_malformed {
        v.push(untouched(
            format!("malformed IPv6 to a service: {what} -> pass untouched"),
            web6(),
            edited(&f_bad6, edit.as_ref()),
            verdict::PASS_MALFORMED,
        ));
    }

    // --- Fragments.
    let f_frag = Flow::v4("192.0.2.10", PROTO_TCP, 40016, 80);
    v.push(untouched(
        "IPv4 first fragment (MF set) to a service -> pass untouched",
        web_and_dns(),
        client_frame(None, &ip_packet_with(&f_frag, 0x2000, &[])),
        verdict::PASS_FRAGMENT,
    ));
    v.push(untouched(
        "IPv4 later fragment (offset 24 bytes, MF clear) to a service -> pass untouched",
        web_and_dns(),
        client_frame(None, &ip_packet_with(&f_frag, 0x0003, &[])),
        verdict::PASS_FRAGMENT,
    ));
    let mut frag6 = vec![PROTO_TCP, 0, 0x00, 0x01]; // offset 0, M set
    frag6.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    frag6.extend_from_slice(&tcp(40017, 443, PAYLOAD));
    let ip_frag6 = ipv6(
        TCLASS,
        INNER_LABEL,
        44,
        CLIENT_V6,
        "2001:db8::10".parse().unwrap(),
        &frag6,
    );
    v.push(untouched(
        "IPv6 with a Fragment header to a service -> pass untouched",
        web6(),
        client_frame(None, &ip_frag6),
        verdict::PASS_FRAGMENT,
    ));

    // --- Reverse tunnel: a server's SYN-ACK back through the agent.
    v.extend(reverse_fixtures());

    // --- Every truncation of four packets.
    for (what, full, services) in [
        ("IPv4 TCP", &frame_tcp, web_and_dns()),
        ("IPv6 TCP", &frame_tcp6, web6()),
        ("802.1Q IPv4 TCP", &frame_vlan, web_and_dns()),
        ("IPv4 with options TCP", &frame_opt, web_and_dns()),
    ] {
        for len in 14..full.len() {
            v.push(untouched(
                format!(
                    "{what} truncated to {len} of {} bytes -> pass untouched",
                    full.len()
                ),
                services.clone(),
                full[..len].to_vec(),
                verdict::PASS_MALFORMED,
            ));
        }
    }
    v
}

/// Verdicts that come after a service was found, and so after a flow-table lookup.
fn looks_up_flow(reason: u32) -> bool {
    !matches!(
        reason,
        verdict::PASS_NOT_SERVICE
            | verdict::PASS_FRAGMENT
            | verdict::PASS_MALFORMED
            | verdict::REVERSE_TUNNEL
    )
}

fn check_fixture(
    f: &Fixture,
    action: u32,
    out: &[u8],
    before: &[u64],
    after: &[u64],
) -> Result<(), String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        assert_eq!(
            action_name(action),
            action_name(f.action),
            "{}: XDP action",
            f.description
        );
        if let Some(expected) = &f.output {
            assert_eq!(
                hex(out),
                hex(expected),
                "{}: output frame, left actual, right expected ({})",
                f.description,
                first_difference(out, expected)
            );
        }
        let delta: Vec<(&str, u64)> = verdict::NAMES
            .iter()
            .zip(before.iter().zip(after))
            .map(|(n, (b, a))| (*n, a - b))
            .collect();
        let mut want: Vec<(&str, u64)> = verdict::NAMES.iter().map(|n| (*n, 0)).collect();
        want[f.reason as usize].1 = 1;
        let split = verdict::FLOW_HIT as usize;
        assert_eq!(
            &delta[..split],
            &want[..split],
            "{}: verdict counters that rose (expected {} +1)",
            f.description,
            verdict::NAMES[f.reason as usize]
        );
        let rest = verdict::FLOW_EXPIRED as usize + 1;
        assert_eq!(
            &delta[rest..],
            &want[rest..],
            "{}: verdict counters after the flow counters (expected {} +1)",
            f.description,
            verdict::NAMES[f.reason as usize]
        );
        let lookups = delta[split].1 + delta[split + 1].1;
        assert_eq!(
            lookups,
            u64::from(looks_up_flow(f.reason)),
            "{}: flow_hit + flow_miss",
            f.description
        );
        assert_eq!(
            delta[verdict::FLOW_EXPIRED as usize],
            ("flow_expired", 0),
            "{}: no flow-table entry ends within a fixture run",
            f.description
        );
    }));
    outcome.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| format!("{}: failed", f.description))
    })
}

#[test]
fn fixtures_produce_expected_frames_and_verdicts() -> Result<()> {
    let mut h = Harness::new()?;
    let fixtures = fixtures();
    let mut failures = Vec::new();
    for f in &fixtures {
        h.dataplane
            .apply(&f.services)
            .with_context(|| format!("{}: applying the services", f.description))?;
        let before = counters(&h.dataplane)?;
        let (action, out) = run_xdp(&h.dataplane, h.fx0, &f.input)
            .with_context(|| format!("{}: running the program", f.description))?;
        let after = counters(&h.dataplane)?;
        if let Err(msg) = check_fixture(f, action, &out, &before, &after) {
            failures.push(msg);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures
            .iter()
            .map(|m| m.lines().next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Flow affinity.

const SERVICE_ADDR: &str = "192.0.2.80";
const FLOWS: u16 = 200;

fn affinity_service(servers: &[&str]) -> Vec<DesiredService> {
    let servers: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
    vec![service("sticky", SERVICE_ADDR, PROTO_TCP, 80, &servers)]
}

/// Flow `i` of a batch of [`FLOWS`] flows whose source ports start at `first_port`.
fn affinity_flow(first_port: u16, i: u16) -> Flow {
    Flow::v4(SERVICE_ADDR, PROTO_TCP, first_port + i, 80)
}

/// Sends one packet of each of the flows and returns the outer destination of each.
fn destinations(dp: &Dataplane, ingress: u32, first_port: u16) -> Result<Vec<Ipv4Addr>> {
    let mut dsts = Vec::new();
    for i in 0..FLOWS {
        let flow = affinity_flow(first_port, i);
        let input = client_frame(None, &ip_packet(&flow));
        let (action, out) = run_xdp(dp, ingress, &input)?;
        if action != XDP_TX && action != XDP_REDIRECT {
            bail!(
                "flow {i} ({flow:?}): expected XDP_TX or XDP_REDIRECT, got {}",
                action_name(action)
            );
        }
        if out.len() < 34 || out[12..14] != [0x08, 0x00] || out[14] != 0x45 || out[23] != 4 {
            bail!("flow {i}: not an IPv4-in-IPv4 frame:\n{}", hex(&out));
        }
        dsts.push(Ipv4Addr::new(out[30], out[31], out[32], out[33]));
    }
    Ok(dsts)
}

fn counter(dp: &Dataplane, reason: u32) -> Result<u64> {
    Ok(counters(dp)?[reason as usize])
}

#[test]
fn flows_keep_their_server_when_a_server_is_added() -> Result<()> {
    let mut h = Harness::new()?;
    let three = ["10.9.2.11", "10.9.2.12", "10.9.3.11"];
    let four = ["10.9.2.11", "10.9.2.12", "10.9.3.11", "10.9.2.13"];

    h.dataplane.apply(&affinity_service(&three))?;
    let first = destinations(&h.dataplane, h.fx0, 20000)?;
    let used: BTreeSet<Ipv4Addr> = first.iter().copied().collect();
    assert_eq!(
        used.len(),
        3,
        "the {FLOWS} flows should spread over all three servers, got {used:?}"
    );

    h.dataplane.apply(&affinity_service(&four))?;
    let hits = counter(&h.dataplane, verdict::FLOW_HIT)?;
    let second = destinations(&h.dataplane, h.fx0, 20000)?;
    let moved: Vec<String> = (0..FLOWS as usize)
        .filter(|&i| first[i] != second[i])
        .map(|i| format!("flow {i}: {} -> {}", first[i], second[i]))
        .collect();
    assert!(
        moved.is_empty(),
        "{} of {FLOWS} established flows changed server after a server was added:\n{}",
        moved.len(),
        moved.join("\n")
    );
    assert_eq!(
        counter(&h.dataplane, verdict::FLOW_HIT)? - hits,
        u64::from(FLOWS),
        "every flow of the second round should be a flow-table hit"
    );

    // Control: with no pinned flows, the four-server table sends some of these flows
    // elsewhere, so the assertion above could have failed.
    let mut fresh = new_dataplane(h.fy0)?;
    fresh.apply(&affinity_service(&four))?;
    let unpinned = destinations(&fresh, h.fx0, 20000)?;
    let differ = (0..FLOWS as usize)
        .filter(|&i| unpinned[i] != first[i])
        .count();
    assert!(
        differ > 0,
        "control: a fresh data plane with four servers should route some of the {FLOWS} flows differently"
    );
    assert!(
        unpinned.contains(&"10.9.2.13".parse()?),
        "control: the new server should own part of the fresh table"
    );
    eprintln!("control: {differ} of {FLOWS} flows would go elsewhere without the flow table");
    Ok(())
}

#[test]
fn flows_of_a_removed_server_move_to_a_remaining_one() -> Result<()> {
    let mut h = Harness::new()?;
    let three = ["10.9.2.11", "10.9.2.12", "10.9.2.13"];
    let removed: Ipv4Addr = "10.9.2.12".parse()?;
    let remaining = ["10.9.2.11", "10.9.2.13"];

    h.dataplane.apply(&affinity_service(&three))?;
    let first = destinations(&h.dataplane, h.fx0, 20000)?;
    let on_removed = first.iter().filter(|d| **d == removed).count();
    assert!(
        on_removed > 0,
        "some of the {FLOWS} flows should start on {removed}"
    );

    h.dataplane.apply(&affinity_service(&remaining))?;
    let second = destinations(&h.dataplane, h.fx0, 20000)?;
    let remaining: Vec<Ipv4Addr> = remaining.iter().map(|s| s.parse().unwrap()).collect();
    let mut wrong = Vec::new();
    for i in 0..FLOWS as usize {
        if first[i] == removed {
            if !remaining.contains(&second[i]) {
                wrong.push(format!(
                    "flow {i}: was on the removed {removed}, now on {} (not a remaining server)",
                    second[i]
                ));
            }
        } else if second[i] != first[i] {
            wrong.push(format!(
                "flow {i}: was on {} (still present), moved to {}",
                first[i], second[i]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {FLOWS} flows went wrong after {removed} was removed:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // The moved flows are pinned again: a third round sends them to the same place.
    let third = destinations(&h.dataplane, h.fx0, 20000)?;
    assert_eq!(
        third, second,
        "flows should stay where they moved to after the removal"
    );
    Ok(())
}

#[test]
fn a_draining_server_keeps_its_flows_and_a_down_server_loses_them() -> Result<()> {
    let mut h = Harness::new()?;
    let target: Ipv4Addr = "10.9.2.12".parse()?;
    let others: Vec<Ipv4Addr> = vec!["10.9.2.11".parse()?, "10.9.2.13".parse()?];
    let with_target = |weight: u32, up: bool| {
        let mut svc = affinity_service(&["10.9.2.11", "10.9.2.12", "10.9.2.13"]);
        let s = &mut svc[0].servers[1];
        assert_eq!(s.address, IpAddr::V4(target));
        s.weight = weight;
        s.up = up;
        svc
    };

    h.dataplane.apply(&with_target(1, true))?;
    let first = destinations(&h.dataplane, h.fx0, 20000)?;
    assert!(
        first.contains(&target),
        "some of the {FLOWS} flows should start on {target}"
    );

    // Weight 0: no new flows, established ones stay.
    h.dataplane.apply(&with_target(0, true))?;
    let drained = destinations(&h.dataplane, h.fx0, 20000)?;
    assert_eq!(
        drained, first,
        "established flows should stay on their servers while {target} drains"
    );
    let new_flows = destinations(&h.dataplane, h.fx0, 30000)?;
    assert!(
        !new_flows.contains(&target),
        "no new flow should go to the draining {target}"
    );

    // Down: its flows move to the others, the others' flows stay.
    h.dataplane.apply(&with_target(1, false))?;
    let after = destinations(&h.dataplane, h.fx0, 20000)?;
    let mut wrong = Vec::new();
    for i in 0..FLOWS as usize {
        let ok = if first[i] == target {
            others.contains(&after[i])
        } else {
            after[i] == first[i]
        };
        if !ok {
            wrong.push(format!("flow {i}: {} -> {}", first[i], after[i]));
        }
    }
    assert!(
        wrong.is_empty(),
        "after {target} went down, {} flows went wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Flow aging, TCP close, sweeping.

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

const SERVER_A: &str = "10.9.2.11";
const SERVER_B: &str = "10.9.2.12";
const SERVER_C: &str = "10.9.2.13";
/// Reached through fy0: XDP_REDIRECT.
const SERVER_D: &str = "10.9.3.11";

/// The client's IP packet of a flow; TCP with the given flags.
fn packet_with_flags(flow: &Flow, flags: u8) -> Vec<u8> {
    let l4 = match flow.proto {
        PROTO_TCP => {
            let mut seg = tcp(flow.sport, flow.dport, PAYLOAD);
            seg[13] = flags;
            seg
        }
        _ => l4(flow),
    };
    match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(TOS, DF, flow.proto, s, d, &[], &l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(TCLASS, INNER_LABEL, flow.proto, s, d, &l4),
        _ => panic!("mixed families in {flow:?}"),
    }
}

/// The frame the agent must send for `inner` tunnelled to `server` (fy0's neighbour is
/// redirected there, the others go back out of fx0).
fn expected_frame(server: &str, flow: &Flow, inner: &[u8]) -> (u32, Vec<u8>) {
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
fn send(h: &Harness, flow: &Flow, flags: u8) -> Result<IpAddr> {
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
fn send_all(h: &Harness, flows: &[Flow], flags: u8) -> Result<Vec<IpAddr>> {
    flows.iter().map(|f| send(h, f, flags)).collect()
}

fn flows_from(dst: &str, proto: u8, first_port: u16, n: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            Flow::v4(
                dst,
                proto,
                first_port + i,
                if proto == PROTO_TCP { 80 } else { 53 },
            )
        })
        .collect()
}

fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

/// The flow table's entries by (client, client port, protocol).
fn flow_table(dp: &Dataplane) -> Result<BTreeMap<(IpAddr, u16, String), FlowReport>> {
    Ok(dp
        .flows()?
        .into_iter()
        .map(|f| ((f.client, f.client_port, f.protocol.clone()), f))
        .collect())
}

fn entry<'a>(
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

/// Counter rises over `f`, by verdict index.
fn counting<T>(dp: &Dataplane, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<u64>)> {
    let before = counters(dp)?;
    let t = f()?;
    let after = counters(dp)?;
    Ok((t, after.iter().zip(&before).map(|(a, b)| a - b).collect()))
}

/// After a change of table from `before` servers to `before` + `added`, a re-chosen flow
/// either stays or goes to an added server (the table's minimal disruption); checks that,
/// and that at least one went to an added server. Returns how many moved.
fn check_rechosen(what: &str, old: &[IpAddr], new: &[IpAddr], added: &str) -> usize {
    let added: IpAddr = added.parse().unwrap();
    let mut moved = 0;
    for (i, (o, n)) in old.iter().zip(new).enumerate() {
        if o != n {
            assert_eq!(
                *n, added,
                "{what}: flow {i} moved from {o} to {n}, not to the new server"
            );
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "{what}: no flow went to the new server {added}, so re-choosing is not shown"
    );
    moved
}

/// Waits until the flow clock has passed second `t` (at most about a second).
fn wait_past(t: u32) {
    let start = Instant::now();
    while flow_clock_now() <= t {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the flow clock stands still"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const AGING_ADDR: &str = "192.0.2.90";

fn aging_services(servers: &[&str]) -> Vec<DesiredService> {
    let servers: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
    vec![
        service("aging-tcp", AGING_ADDR, PROTO_TCP, 80, &servers),
        service("aging-udp", AGING_ADDR, PROTO_UDP, 53, &servers),
    ]
}

#[test]
fn idle_flows_past_their_timeout_are_rechosen_and_active_ones_stay() -> Result<()> {
    let mut h = Harness::new()?;
    let three = [SERVER_A, SERVER_B, SERVER_D];
    let four = [SERVER_A, SERVER_B, SERVER_D, SERVER_C];
    let udp = flows_from(AGING_ADDR, PROTO_UDP, 21000, 60);
    let tcp_open = flows_from(AGING_ADDR, PROTO_TCP, 22000, 60);
    let tcp_closing = flows_from(AGING_ADDR, PROTO_TCP, 23000, 60);

    h.dataplane.apply(&aging_services(&three))?;
    let t_before = flow_clock_now();
    let udp_first = send_all(&h, &udp, 0)?;
    let open_first = send_all(&h, &tcp_open, TCP_ACK)?;
    let closing_first = send_all(&h, &tcp_closing, TCP_ACK)?;
    send_all(&h, &tcp_closing, TCP_FIN | TCP_ACK)?;
    let t_after = flow_clock_now();

    // The data path's clock is the one the controller reads.
    let table = flow_table(&h.dataplane)?;
    for f in udp.iter().chain(&tcp_open).chain(&tcp_closing) {
        let e = entry(&table, f).ok_or_else(|| anyhow!("{f:?}: no flow-table entry"))?;
        assert!(
            (t_before..=t_after).contains(&e.last_seen),
            "{f:?}: last_seen {} outside the controller's clock {t_before}..={t_after}",
            e.last_seen
        );
    }

    // A fourth server: pinned flows stay (default timeouts, nothing expires).
    h.dataplane.apply(&aging_services(&four))?;
    let ((udp_second, open_second, closing_second), delta) = counting(&h.dataplane, || {
        Ok((
            send_all(&h, &udp, 0)?,
            send_all(&h, &tcp_open, TCP_ACK)?,
            send_all(&h, &tcp_closing, TCP_ACK)?,
        ))
    })?;
    assert_eq!(udp_second, udp_first, "UDP flows keep their servers");
    assert_eq!(open_second, open_first, "TCP flows keep their servers");
    assert_eq!(
        closing_second, closing_first,
        "closing TCP flows keep their servers"
    );
    assert_eq!(delta[verdict::FLOW_HIT as usize], 180, "all hits");
    assert_eq!(delta[verdict::FLOW_EXPIRED as usize], 0, "none expired");

    // UDP and closing entries time out after 0 s (that is: in the next second), open TCP
    // flows keep 300 s. One tick of the clock later:
    h.dataplane.set_flow_timeouts(FlowTimeouts {
        tcp_idle: 300,
        udp_idle: 0,
        tcp_closing: 0,
    })?;
    let last = flow_table(&h.dataplane)?
        .values()
        .map(|e| e.last_seen)
        .max()
        .unwrap_or(0);
    for e in flow_table(&h.dataplane)?.values() {
        let timeout = match (e.protocol.as_str(), e.closing) {
            ("tcp", false) => 300,
            _ => 0,
        };
        assert_eq!(
            e.expired,
            e.age > timeout,
            "{e:?}: expired means older than the timeout"
        );
    }
    wait_past(last);
    let table = flow_table(&h.dataplane)?;
    for f in &udp {
        assert!(
            entry(&table, f).is_some_and(|e| e.expired),
            "{f:?} is reported expired"
        );
    }
    for f in &tcp_open {
        assert!(
            entry(&table, f).is_some_and(|e| !e.expired),
            "{f:?} is not expired"
        );
    }
    let ((udp_third, open_third, closing_third), delta) = counting(&h.dataplane, || {
        Ok((
            send_all(&h, &udp, 0)?,
            send_all(&h, &tcp_open, TCP_ACK)?,
            send_all(&h, &tcp_closing, TCP_ACK)?,
        ))
    })?;
    assert_eq!(
        delta[verdict::FLOW_EXPIRED as usize],
        120,
        "the UDP and the closing TCP entries ended"
    );
    assert_eq!(
        delta[verdict::FLOW_MISS as usize],
        120,
        "expired entries count as misses"
    );
    assert_eq!(
        delta[verdict::FLOW_HIT as usize],
        60,
        "the open TCP flows are hits"
    );
    assert_eq!(
        open_third, open_first,
        "open TCP flows stay on their servers"
    );
    let moved = check_rechosen("idle UDP flows", &udp_first, &udp_third, SERVER_C);
    eprintln!(
        "{moved} of {} idle UDP flows were re-chosen onto the new server",
        udp.len()
    );
    let moved = check_rechosen("closed TCP flows", &closing_first, &closing_third, SERVER_C);
    eprintln!(
        "{moved} of {} closed TCP flows were re-chosen onto the new server",
        tcp_closing.len()
    );

    // The entries were overwritten (and refreshed): seen in the new second, not closing.
    let table = flow_table(&h.dataplane)?;
    for f in udp.iter().chain(&tcp_open).chain(&tcp_closing) {
        let e = entry(&table, f).ok_or_else(|| anyhow!("{f:?}: no flow-table entry"))?;
        assert!(
            e.last_seen > last,
            "{f:?}: last_seen {} not refreshed past {last}",
            e.last_seen
        );
        assert!(!e.closing, "{f:?}: a re-chosen entry starts open");
    }
    Ok(())
}

#[test]
fn fin_and_rst_close_a_flow_and_a_syn_on_a_closed_flow_starts_a_new_one() -> Result<()> {
    let mut h = Harness::new()?;
    let three = [SERVER_A, SERVER_B, SERVER_D];
    let four = [SERVER_A, SERVER_B, SERVER_D, SERVER_C];
    h.dataplane.apply(&aging_services(&three))?;
    let fin = flows_from(AGING_ADDR, PROTO_TCP, 24000, 40);
    let rst = flows_from(AGING_ADDR, PROTO_TCP, 24100, 40);
    let open = flows_from(AGING_ADDR, PROTO_TCP, 24200, 40);
    let all: Vec<Flow> = fin.iter().chain(&rst).chain(&open).copied().collect();

    let (first, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_SYN))?;
    assert_eq!(
        delta[verdict::FLOW_MISS as usize],
        120,
        "SYNs of new flows are misses"
    );
    let (second, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_ACK))?;
    assert_eq!(second, first);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 120);
    let table = flow_table(&h.dataplane)?;
    assert!(
        all.iter()
            .all(|f| entry(&table, f).is_some_and(|e| !e.closing)),
        "no entry is closing before a FIN or RST"
    );

    let (closed, delta) = counting(&h.dataplane, || {
        let mut v = send_all(&h, &fin, TCP_FIN | TCP_ACK)?;
        v.extend(send_all(&h, &rst, TCP_RST)?);
        Ok(v)
    })?;
    assert_eq!(
        closed,
        first[..80],
        "a FIN or RST goes to the flow's server"
    );
    assert_eq!(delta[verdict::FLOW_HIT as usize], 80);
    let table = flow_table(&h.dataplane)?;
    for f in fin.iter().chain(&rst) {
        assert!(
            entry(&table, f).is_some_and(|e| e.closing),
            "{f:?}: closing after FIN/RST"
        );
    }
    for f in &open {
        assert!(
            entry(&table, f).is_some_and(|e| !e.closing),
            "{f:?}: still open"
        );
    }

    // The closing flows' last packets (the client's final ACK; a SYN-ACK, which no client
    // sends, is not a new connection either) still go to their server, and stay closing.
    let (after_close, delta) = counting(&h.dataplane, || {
        let mut v = send_all(&h, &fin, TCP_ACK)?;
        v.extend(send_all(&h, &rst[..1], TCP_SYN | TCP_ACK)?);
        Ok(v)
    })?;
    assert_eq!(after_close, first[..41]);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 41);
    let table = flow_table(&h.dataplane)?;
    assert!(
        fin.iter()
            .chain(&rst)
            .all(|f| entry(&table, f).is_some_and(|e| e.closing)),
        "closing is kept until the entry ends"
    );

    // A new table, then a SYN on every flow: the closed ones start new flows, chosen by the
    // new table; the open ones keep their servers.
    h.dataplane.apply(&aging_services(&four))?;
    let (reopened, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_SYN))?;
    assert_eq!(
        delta[verdict::FLOW_EXPIRED as usize],
        80,
        "the closed entries ended"
    );
    assert_eq!(delta[verdict::FLOW_MISS as usize], 80);
    assert_eq!(
        delta[verdict::FLOW_HIT as usize],
        40,
        "a SYN on an open entry is a hit"
    );
    assert_eq!(reopened[80..], first[80..], "open flows keep their servers");
    let moved = check_rechosen(
        "SYN on closed flows",
        &first[..80],
        &reopened[..80],
        SERVER_C,
    );
    eprintln!("{moved} of 80 reused 5-tuples went to the new server");
    // Control: with the new table some of the open flows would move too.
    let mut fresh = Harness::new()?;
    fresh.dataplane.apply(&aging_services(&four))?;
    let unpinned = send_all(&fresh, &open, TCP_SYN)?;
    assert_ne!(
        unpinned,
        first[80..],
        "control: the new table moves some open flows"
    );
    drop(fresh);
    let table = flow_table(&h.dataplane)?;
    assert!(
        all.iter()
            .all(|f| entry(&table, f).is_some_and(|e| !e.closing)),
        "new flows start open"
    );

    // A FIN of a flow the table does not know starts its entry closing.
    let stray = Flow::v4(AGING_ADDR, PROTO_TCP, 24300, 80);
    send(&h, &stray, TCP_FIN | TCP_ACK)?;
    let table = flow_table(&h.dataplane)?;
    assert!(
        entry(&table, &stray).is_some_and(|e| e.closing),
        "a stray FIN's entry is closing"
    );
    Ok(())
}

#[test]
fn sweeping_deletes_idle_and_closed_entries_and_keeps_active_ones() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&aging_services(&[SERVER_A, SERVER_B]))?;
    let udp = Flow::v4(AGING_ADDR, PROTO_UDP, 25000, 53);
    let open = Flow::v4(AGING_ADDR, PROTO_TCP, 25001, 80);
    let fin = Flow::v4(AGING_ADDR, PROTO_TCP, 25002, 80);
    let rst = Flow::v4(AGING_ADDR, PROTO_TCP, 25003, 80);
    send(&h, &udp, 0)?;
    send(&h, &open, TCP_PSH | TCP_ACK)?;
    send(&h, &fin, TCP_PSH | TCP_ACK)?;
    send(&h, &fin, TCP_FIN | TCP_ACK)?;
    send(&h, &rst, TCP_RST)?;
    let now = flow_clock_now();
    let listed = |dp: &Dataplane| -> Result<Vec<u16>> {
        let mut ports: Vec<u16> = dp.flows()?.iter().map(|f| f.client_port).collect();
        ports.sort();
        Ok(ports)
    };
    assert_eq!(listed(&h.dataplane)?, [25000, 25001, 25002, 25003]);
    let table = flow_table(&h.dataplane)?;
    let e = entry(&table, &open).expect("listed");
    assert_eq!(e.address, AGING_ADDR.parse::<IpAddr>()?);
    assert_eq!((e.port, e.protocol.as_str()), (80, "tcp"));
    assert_eq!(e.service.as_deref(), Some("aging-tcp"));
    assert!(e
        .server
        .is_some_and(|s| addrs(&[SERVER_A, SERVER_B]).contains(&s)));
    assert!(e.age <= 1 && !e.closing && !e.expired, "{e:?}");

    // Default timeouts: TCP 300 s, UDP 30 s, closing 10 s, in ticks of the flow clock (an
    // entry's last tick may be `now` or, if the clock ticked meanwhile, `now - 1`).
    assert_eq!(
        h.dataplane.sweep_flows(now)?,
        0,
        "nothing is past its timeout yet"
    );
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(10) - 1)?, 0);
    assert_eq!(
        h.dataplane.sweep_flows(now + flow_ticks(10) + 1)?,
        2,
        "the closed entries go after 10 s"
    );
    assert_eq!(listed(&h.dataplane)?, [25000, 25001]);
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(30) - 1)?, 0);
    assert_eq!(
        h.dataplane.sweep_flows(now + flow_ticks(30) + 1)?,
        1,
        "the UDP entry goes after 30 s"
    );
    assert_eq!(listed(&h.dataplane)?, [25001]);
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(300) - 1)?, 0);
    assert_eq!(listed(&h.dataplane)?, [25001]);

    // The sweep follows the timeouts the data path has.
    h.dataplane.set_flow_timeouts(FlowTimeouts {
        tcp_idle: 5,
        ..FlowTimeouts::default()
    })?;
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(5) - 1)?, 0);
    assert_eq!(
        h.dataplane.sweep_flows(now + flow_ticks(5) + 1)?,
        1,
        "TCP idle after 5 s"
    );
    assert!(listed(&h.dataplane)?.is_empty());

    // A swept flow's next packet is a plain miss (there is no entry left to expire).
    let (_, delta) = counting(&h.dataplane, || send(&h, &udp, 0))?;
    assert_eq!(delta[verdict::FLOW_MISS as usize], 1);
    assert_eq!(delta[verdict::FLOW_EXPIRED as usize], 0);
    assert_eq!(listed(&h.dataplane)?, [25000]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Topology preferences.

const PREF_ADDR: &str = "192.0.2.95";
const PREF_ADDR6: &str = "2001:db8::95";

fn prefix(p: &str) -> (IpAddr, u8) {
    let (a, l) = p.split_once('/').expect("a prefix");
    (a.parse().unwrap(), l.parse().unwrap())
}

fn preference(clients: &[&str], servers: &[&str]) -> Preference {
    Preference {
        clients: clients.iter().map(|c| prefix(c)).collect(),
        servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// 192.0.2.95 tcp 80 over A, B, C, D:
/// - 198.51.100.0/24 prefers C,
/// - 198.51.100.128/25 (inside it, so more specific) prefers D,
/// - 203.0.113.0/25 prefers A and B.
fn preferred_service(edit: impl Fn(&mut DesiredService)) -> Vec<DesiredService> {
    let mut svc = service(
        "pref",
        PREF_ADDR,
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1), (SERVER_D, 1)],
    );
    svc.preferences = vec![
        preference(&["198.51.100.0/24"], &[SERVER_C]),
        preference(&["198.51.100.128/25"], &[SERVER_D]),
        preference(&["203.0.113.0/25", "203.0.113.0/26"], &[SERVER_A, SERVER_B]),
    ];
    edit(&mut svc);
    vec![svc]
}

/// `n` flows to the preference service from clients `base.1`, `base.2`, ... (IPv4 /24).
fn clients(base: [u8; 3], first_host: u8, n: u8, first_port: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| Flow {
            src: IpAddr::from([base[0], base[1], base[2], first_host + i]),
            dst: PREF_ADDR.parse().unwrap(),
            proto: PROTO_TCP,
            sport: first_port + u16::from(i),
            dport: 80,
        })
        .collect()
}

fn servers_used(dsts: &[IpAddr]) -> BTreeSet<IpAddr> {
    dsts.iter().copied().collect()
}

#[test]
fn preferred_clients_go_to_their_servers_and_fall_back_when_those_cannot_take_flows() -> Result<()>
{
    let mut h = Harness::new()?;
    h.dataplane.apply(&preferred_service(|_| ()))?;
    let low = clients([198, 51, 100], 1, 100, 30000); // 198.51.100.1-100: C
    let high = clients([198, 51, 100], 129, 100, 30000); // .129-.228: D
    let ab = clients([203, 0, 113], 1, 100, 30000); // 203.0.113.1-100: /25 -> A, B
    let ab_outside = clients([203, 0, 113], 129, 100, 30000); // .129-.228: no preference
    let others = clients([100, 64, 0], 1, 100, 30000); // no preference

    let id = h.dataplane.report()?.services[0].id;
    let entries = h.dataplane.preference_entries()?;
    let mut keys: Vec<(IpAddr, u8)> = entries
        .iter()
        .map(|(k, _)| {
            assert_eq!(k.service, id, "entries are keyed by the service's id");
            k.client(anycast_common::FAMILY_V4)
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "198.51.100.0/24",
            "198.51.100.128/25",
            "203.0.113.0/25",
            "203.0.113.0/26"
        ]
        .map(prefix)
        .to_vec(),
        "one LPM entry per client prefix"
    );

    let c = addrs(&[SERVER_C]);
    let d = addrs(&[SERVER_D]);
    let a_b = addrs(&[SERVER_A, SERVER_B]);
    let all = addrs(&[SERVER_A, SERVER_B, SERVER_C, SERVER_D]);
    assert_eq!(
        servers_used(&send_all(&h, &low, TCP_SYN)?),
        c,
        "198.51.100.0/24 -> C"
    );
    assert_eq!(
        servers_used(&send_all(&h, &high, TCP_SYN)?),
        d,
        "the longer /25 -> D"
    );
    assert_eq!(
        servers_used(&send_all(&h, &ab, TCP_SYN)?),
        a_b,
        "203.0.113.0/25 -> A and B"
    );
    assert_eq!(
        servers_used(&send_all(&h, &ab_outside, TCP_SYN)?),
        all,
        "203.0.113.128/25 has no preference: all four"
    );
    assert_eq!(
        servers_used(&send_all(&h, &others, TCP_SYN)?),
        all,
        "others: all four"
    );

    // C goes down: its clients' flows move, and new ones, to the whole service (C excepted).
    let c_down = preferred_service(|s| s.servers[2].up = false);
    h.dataplane.apply(&c_down)?;
    assert_eq!(
        h.dataplane.preference_entries()?.len(),
        3,
        "a preference whose servers cannot take flows has no LPM entries"
    );
    let rest = addrs(&[SERVER_A, SERVER_B, SERVER_D]);
    let moved = send_all(&h, &low, TCP_ACK)?;
    assert_eq!(
        servers_used(&moved),
        rest,
        "C's clients fall back to A, B and D"
    );
    let new_low = clients([198, 51, 100], 1, 100, 31000);
    assert_eq!(servers_used(&send_all(&h, &new_low, TCP_SYN)?), rest);
    assert_eq!(
        servers_used(&send_all(&h, &high, TCP_ACK)?),
        d,
        "D's clients are unaffected"
    );

    // C back up, but draining (weight 0): no new flows for it, so still no preference;
    // flows pinned to it before would stay (here none are: they moved while it was down).
    h.dataplane
        .apply(&preferred_service(|s| s.servers[2].weight = 0))?;
    assert_eq!(h.dataplane.preference_entries()?.len(), 3);
    let newer_low = clients([198, 51, 100], 1, 100, 32000);
    assert_eq!(servers_used(&send_all(&h, &newer_low, TCP_SYN)?), rest);

    // C able again: new flows of its clients go to it, established ones stay where they are.
    h.dataplane.apply(&preferred_service(|_| ()))?;
    assert_eq!(h.dataplane.preference_entries()?.len(), 4);
    let newest_low = clients([198, 51, 100], 1, 100, 33000);
    assert_eq!(servers_used(&send_all(&h, &newest_low, TCP_SYN)?), c);
    assert_eq!(
        send_all(&h, &low, TCP_ACK)?,
        moved,
        "established flows keep their servers"
    );

    // One of A and B down: the preference shrinks to the other.
    h.dataplane
        .apply(&preferred_service(|s| s.servers[0].up = false))?;
    let ab_new = clients([203, 0, 113], 1, 100, 34000);
    assert_eq!(
        servers_used(&send_all(&h, &ab_new, TCP_SYN)?),
        addrs(&[SERVER_B])
    );

    // Preferences removed (and A up again): every client is hashed over the whole service,
    // the map empties.
    h.dataplane
        .apply(&preferred_service(|s| s.preferences.clear()))?;
    assert!(h.dataplane.preference_entries()?.is_empty());
    let plain = clients([198, 51, 100], 1, 100, 35000);
    assert_eq!(
        servers_used(&send_all(&h, &plain, TCP_SYN)?),
        addrs(&[SERVER_A, SERVER_B, SERVER_C, SERVER_D])
    );
    Ok(())
}

#[test]
fn ipv6_clients_get_their_preference_too() -> Result<()> {
    let mut h = Harness::new()?;
    let mut svc = service(
        "pref6",
        PREF_ADDR6,
        PROTO_TCP,
        443,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
    );
    svc.preferences = vec![preference(&["2001:db8:ffff::/48"], &[SERVER_B])];
    h.dataplane.apply(&[svc])?;
    let flow = |src: Ipv6Addr, i: u16| Flow {
        src: IpAddr::V6(src),
        dst: PREF_ADDR6.parse().unwrap(),
        proto: PROTO_TCP,
        sport: 36000 + i,
        dport: 443,
    };
    let preferred: Vec<Flow> = (0..60)
        .map(|i| flow(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, i, 0, 0, 0, 7), i))
        .collect();
    let others: Vec<Flow> = (0..60)
        .map(|i| flow(Ipv6Addr::new(0x2001, 0xdb8, 0xfffe, i, 0, 0, 0, 7), i))
        .collect();
    assert_eq!(
        servers_used(&send_all(&h, &preferred, TCP_SYN)?),
        addrs(&[SERVER_B])
    );
    assert_eq!(
        servers_used(&send_all(&h, &others, TCP_SYN)?),
        addrs(&[SERVER_A, SERVER_B, SERVER_C])
    );
    Ok(())
}

/// The agent program's `PREFERENCES` map, opened by id behind the data plane's back, so a
/// test can put in an entry the controller would never write.
fn raw_preferences(dp: &Dataplane) -> Result<LpmTrie<MapData, [u32; 5], PreferenceTable>> {
    Ok(LpmTrie::try_from(agent_map(dp, maps::PREFERENCES)?)?)
}

/// One of the agent program's maps, opened by id behind the data plane's back.
fn agent_map(dp: &Dataplane, name: &str) -> Result<Map> {
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

#[test]
fn services_without_preferences_never_consult_the_preference_map() -> Result<()> {
    let mut h = Harness::new()?;
    let plain_addr = "192.0.2.96";
    let plain = |prefs: Vec<Preference>| {
        let mut s = service(
            "plain",
            plain_addr,
            PROTO_TCP,
            80,
            &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
        );
        s.preferences = prefs;
        s
    };
    let plain_flows = |first_port: u16| -> Vec<Flow> {
        clients([198, 51, 100], 1, 100, first_port)
            .into_iter()
            .map(|mut f| {
                f.dst = plain_addr.parse().unwrap();
                f
            })
            .collect()
    };
    let three = addrs(&[SERVER_A, SERVER_B, SERVER_C]);

    // With the map empty.
    h.dataplane.apply(&[plain(vec![])])?;
    assert!(h.dataplane.preference_entries()?.is_empty());
    let alone = send_all(&h, &plain_flows(37000), TCP_SYN)?;
    assert_eq!(servers_used(&alone), three);

    // Another service prefers A for every client (a /0): not for this service.
    let mut greedy = service(
        "greedy",
        PREF_ADDR,
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1)],
    );
    greedy.preferences = vec![preference(&["0.0.0.0/0"], &[SERVER_A])];
    h.dataplane.apply(&[plain(vec![]), greedy.clone()])?;
    let entries = h.dataplane.preference_entries()?;
    assert_eq!(entries.len(), 1);
    let only_a = entries[0].1;
    let greedy_flows = clients([198, 51, 100], 1, 50, 37000);
    assert_eq!(
        servers_used(&send_all(&h, &greedy_flows, TCP_SYN)?),
        addrs(&[SERVER_A])
    );
    assert_eq!(
        servers_used(&send_all(&h, &plain_flows(37100), TCP_SYN)?),
        three
    );

    // Now an entry for this very service, every client, to the A-only table, which the
    // controller would never write for a service without preferences: the data path does
    // not look.
    let id = h
        .dataplane
        .report()?
        .services
        .iter()
        .find(|s| s.name == "plain")
        .expect("installed")
        .id;
    let mut raw = raw_preferences(&h.dataplane)?;
    raw.insert(&LpmKey::new(32, [id, 0, 0, 0, 0]), only_a, 0)?;
    assert_eq!(
        servers_used(&send_all(&h, &plain_flows(37200), TCP_SYN)?),
        three,
        "a service without preferences ignores the map"
    );

    // Control: once the service has a preference (for other clients), the same entry
    // catches these clients.
    h.dataplane.apply(&[
        plain(vec![preference(&["10.0.0.0/8"], &[SERVER_B])]),
        greedy,
    ])?;
    assert_eq!(
        servers_used(&send_all(&h, &plain_flows(37300), TCP_SYN)?),
        addrs(&[SERVER_A]),
        "control: with preferences the map is consulted"
    );
    Ok(())
}

#[test]
fn invalid_or_too_many_preferences_are_refused_before_anything_changes() -> Result<()> {
    let mut h = Harness::new()?;
    let before = preferred_service(|_| ());
    h.dataplane.apply(&before)?;
    let entries = h.dataplane.preference_entries()?.len();
    for (what, bad) in [
        (
            "an IPv6 client prefix on an IPv4 service",
            preferred_service(|s| s.preferences[0].clients.push(prefix("2001:db8::/32"))),
        ),
        (
            "a /33 IPv4 prefix",
            preferred_service(|s| s.preferences[0].clients.push(prefix("10.0.0.0/33"))),
        ),
        (
            "more preference tables than max_preference_tables (16)",
            preferred_service(|s| {
                s.preferences = (0..17u8)
                    .map(|i| preference(&[&format!("10.{i}.0.0/16")], &[SERVER_A]))
                    .collect()
            }),
        ),
    ] {
        let err = h.dataplane.apply(&bad).err();
        assert!(err.is_some(), "{what}: accepted");
        eprintln!("{what}: {:#}", err.unwrap());
        assert_eq!(
            h.dataplane.preference_entries()?.len(),
            entries,
            "{what}: map changed"
        );
    }
    // Still as before.
    let low = clients([198, 51, 100], 1, 20, 38000);
    assert_eq!(
        servers_used(&send_all(&h, &low, TCP_SYN)?),
        addrs(&[SERVER_C])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reverse tunnel, agent side: a server's SYN-ACK, IP-in-IP from its real address to the
// agent, decapsulated and handed to the kernel for the client.

/// The server's MAC in frames it sends to the agent's fx0.
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x0b];
const TCP_SYN_ACK: u8 = 0x12;

/// A TCP segment with `flags`.
fn tcp_with_flags(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut seg = tcp(sport, dport, &[]);
    seg[13] = flags;
    seg
}

/// A server's answer: from the anycast `service` address and `port` to the client.
fn answer(service: &str, proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = if proto == PROTO_TCP {
        tcp_with_flags(sport, dport, flags)
    } else {
        udp(sport, dport, PAYLOAD)
    };
    match service.parse::<IpAddr>().unwrap() {
        IpAddr::V4(s) => ipv4(TOS, DF, proto, s, CLIENT_V4, &[], &l4),
        IpAddr::V6(s) => ipv6(TCLASS, INNER_LABEL, proto, s, CLIENT_V6, &l4),
    }
}

/// `inner` in an outer header from `real` to `agent` (IPv4: DF, TTL 64; IPv6: hop limit
/// 64), in a frame from the server to the agent's fx0.
fn reverse_frame(vlan: Option<u16>, real: &str, agent: IpAddr, inner: &[u8]) -> Vec<u8> {
    let next = if inner[0] >> 4 == 4 { 4u8 } else { 41u8 };
    let outer = match (real.parse::<IpAddr>().unwrap(), agent) {
        (IpAddr::V4(r), IpAddr::V4(a)) => ipv4(0, DF, next, r, a, &[], inner),
        (IpAddr::V6(r), IpAddr::V6(a)) => ipv6(0, 0, next, r, a, inner),
        _ => panic!("mixed outer families"),
    };
    ethernet(FX0_MAC, SERVER_MAC, vlan, ethertype_of(&outer), &outer)
}

/// What the agent passes to the kernel: the inner packet in the same frame.
fn decapsulated(vlan: Option<u16>, inner: &[u8]) -> Vec<u8> {
    ethernet(FX0_MAC, SERVER_MAC, vlan, ethertype_of(inner), inner)
}

/// 192.0.2.10 tcp 80 served by 10.9.2.11; [2001:db8::10] tcp 443 served by 10.9.2.11 and
/// fd09:2::11; 192.0.2.30 udp (every port) served by 10.9.2.11.
fn reverse_services() -> Vec<DesiredService> {
    vec![
        service("web", "192.0.2.10", PROTO_TCP, 80, &[("10.9.2.11", 1)]),
        service(
            "web6",
            "2001:db8::10",
            PROTO_TCP,
            443,
            &[("10.9.2.11", 1), ("fd09:2::11", 1)],
        ),
        service("any-udp", "192.0.2.30", PROTO_UDP, 0, &[("10.9.2.11", 1)]),
    ]
}

fn reverse_fixtures() -> Vec<Fixture> {
    let mut v = Vec::new();
    let a4 = IpAddr::V4(AGENT_V4);
    let a6 = IpAddr::V6(AGENT_V6);
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40100, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40101, TCP_SYN_ACK);
    for (what, vlan, real, agent, inner) in [
        ("IPv4-in-IPv4", None, "10.9.2.11", a4, &syn_ack4),
        ("IPv6-in-IPv4", None, "10.9.2.11", a4, &syn_ack6),
        ("IPv4-in-IPv6", None, "fd09:2::11", a6, &syn_ack4),
        ("IPv6-in-IPv6", None, "fd09:2::11", a6, &syn_ack6),
        (
            "802.1Q VID 7 IPv4-in-IPv4",
            Some(7),
            "10.9.2.11",
            a4,
            &syn_ack4,
        ),
    ] {
        v.push(fixture(
            format!("reverse tunnel: {what} SYN-ACK from server {real} to the agent -> outer header stripped, XDP_PASS"),
            reverse_services(),
            reverse_frame(vlan, real, agent, inner),
            XDP_PASS,
            verdict::REVERSE_TUNNEL,
            decapsulated(vlan, inner),
        ));
    }
    let udp_answer = answer("192.0.2.30", PROTO_UDP, 5353, 40102, 0);
    v.push(fixture(
        "reverse tunnel: UDP answer from 192.0.2.30:5353 (a port-wildcard service) -> stripped, XDP_PASS",
        reverse_services(),
        reverse_frame(None, "10.9.2.11", a4, &udp_answer),
        XDP_PASS,
        verdict::REVERSE_TUNNEL,
        decapsulated(None, &udp_answer),
    ));
    let icmp = ipv4(
        TOS,
        DF,
        1,
        "192.0.2.10".parse().unwrap(),
        CLIENT_V4,
        &[],
        &[0, 0, 0xff, 0xff, 0, 0, 0, 0],
    );
    for (what, real, agent, inner) in [
        (
            "outer destination not the agent (10.9.2.12)",
            "10.9.2.11",
            IpAddr::V4("10.9.2.12".parse().unwrap()),
            syn_ack4.clone(),
        ),
        (
            "outer source 10.9.2.99 is no server of ours",
            "10.9.2.99",
            a4,
            syn_ack4.clone(),
        ),
        (
            "inner source 192.0.2.11 is no service",
            "10.9.2.11",
            a4,
            answer("192.0.2.11", PROTO_TCP, 80, 40103, TCP_SYN_ACK),
        ),
        (
            "inner source port 81 is not the service's",
            "10.9.2.11",
            a4,
            answer("192.0.2.10", PROTO_TCP, 81, 40103, TCP_SYN_ACK),
        ),
        (
            "inner UDP from the TCP service's address and port",
            "10.9.2.11",
            a4,
            answer("192.0.2.10", PROTO_UDP, 80, 40103, 0),
        ),
        ("inner ICMP from the service address", "10.9.2.11", a4, icmp),
    ] {
        v.push(untouched(
            format!("reverse tunnel: {what} -> pass untouched"),
            reverse_services(),
            reverse_frame(None, real, agent, &inner),
            verdict::PASS_NOT_SERVICE,
        ));
    }
    let mut frag = syn_ack4.clone();
    frag[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // MF
    frag[10..12].copy_from_slice(&[0, 0]);
    let sum = inet_checksum(&frag[..20]);
    frag[10..12].copy_from_slice(&sum.to_be_bytes());
    v.push(untouched(
        "reverse tunnel: the inner packet is a fragment -> pass untouched",
        reverse_services(),
        reverse_frame(None, "10.9.2.11", a4, &frag),
        verdict::PASS_FRAGMENT,
    ));
    let full = reverse_frame(None, "10.9.2.11", a4, &syn_ack4);
    for len in 14..full.len() {
        v.push(untouched(
            format!(
                "reverse tunnel: IPv4-in-IPv4 truncated to {len} of {} bytes -> pass untouched",
                full.len()
            ),
            reverse_services(),
            full[..len].to_vec(),
            verdict::PASS_MALFORMED,
        ));
    }
    // The outer IPv4 header says 20 bytes more than the frame holds: the inner header is
    // cut short, so nothing is decapsulated.
    let mut short = full.clone();
    let inner_cut = 14 + 20 + 12;
    short.truncate(inner_cut);
    let outer_total = (short.len() - 14) as u16;
    short[16..18].copy_from_slice(&outer_total.to_be_bytes());
    short[24..26].copy_from_slice(&[0, 0]);
    let sum = inet_checksum(&short[14..34]);
    short[24..26].copy_from_slice(&sum.to_be_bytes());
    v.push(untouched(
        "reverse tunnel: the inner IPv4 header is cut short (12 of 20 bytes) -> pass untouched",
        reverse_services(),
        short,
        verdict::PASS_MALFORMED,
    ));
    v
}

fn reverse_counts(dp: &Dataplane) -> Result<BTreeMap<IpAddr, ReverseCounters>> {
    dp.reverse_counters()
}

#[test]
fn reverse_tunnelled_packets_are_counted_per_server_and_syns_per_server() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&reverse_services())?;
    let a4 = IpAddr::V4(AGENT_V4);
    let a6 = IpAddr::V6(AGENT_V6);
    let s4: IpAddr = "10.9.2.11".parse()?;
    let s6: IpAddr = "fd09:2::11".parse()?;
    let c = reverse_counts(&h.dataplane)?;
    assert_eq!(
        c.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([s4, s6]),
        "one entry per installed server address"
    );
    assert!(
        c.values().all(|x| *x == ReverseCounters::default()),
        "{c:?}"
    );

    // Three reverse packets from 10.9.2.11 (two families inside), one from fd09:2::11.
    let t0 = coarse_clock_ns();
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40200, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40201, TCP_SYN_ACK);
    for (real, agent, inner) in [
        ("10.9.2.11", a4, &syn_ack4),
        ("10.9.2.11", a4, &syn_ack4),
        ("10.9.2.11", a4, &syn_ack6),
        ("fd09:2::11", a6, &syn_ack4),
    ] {
        let (action, _) = run_xdp(
            &h.dataplane,
            h.fx0,
            &reverse_frame(None, real, agent, inner),
        )?;
        assert_eq!(action_name(action), action_name(XDP_PASS));
    }
    // Refused ones count nothing.
    run_xdp(
        &h.dataplane,
        h.fx0,
        &reverse_frame(None, "10.9.2.99", a4, &syn_ack4),
    )?;
    run_xdp(
        &h.dataplane,
        h.fx0,
        &reverse_frame(
            None,
            "10.9.2.11",
            a4,
            &answer("192.0.2.11", PROTO_TCP, 80, 1, TCP_SYN_ACK),
        ),
    )?;
    let c = reverse_counts(&h.dataplane)?;
    assert_eq!(c[&s4].reverse_packets, 3, "{c:?}");
    assert_eq!(c[&s6].reverse_packets, 1, "{c:?}");
    let now = coarse_clock_ns();
    for s in [s4, s6] {
        assert!(
            (t0.saturating_sub(20_000_000)..=now + 20_000_000).contains(&c[&s].last_reverse_ns),
            "{s}: last seen {} not within [{t0}, {now}] (coarse clock)",
            c[&s].last_reverse_ns
        );
    }
    assert_eq!(
        counter(&h.dataplane, verdict::REVERSE_TUNNEL)?,
        4,
        "reverse_tunnel verdicts"
    );

    // SYNs (without ACK) forwarded to a server are counted for its address; other TCP
    // packets and UDP are not.
    let web = Flow::v4("192.0.2.10", PROTO_TCP, 40300, 80);
    send(&h, &web, 0x02)?; // SYN
    send(&h, &web, 0x02)?; // its retransmission
    send(&h, &web, 0x10)?; // ACK
    send(&h, &web, 0x18)?; // PSH ACK
    let other = Flow::v4("192.0.2.10", PROTO_TCP, 40301, 80);
    send(&h, &other, 0x02)?;
    let dns = Flow::v4("192.0.2.30", PROTO_UDP, 40302, 53);
    send(&h, &dns, 0)?;
    let c = reverse_counts(&h.dataplane)?;
    assert_eq!(c[&s4].syns, 3, "{c:?}");
    assert_eq!(c[&s6].syns, 0, "{c:?}");
    let report = h.dataplane.report()?;
    let web_servers = &report
        .services
        .iter()
        .find(|s| s.name == "web")
        .unwrap()
        .servers;
    assert_eq!(web_servers[0].syns, 3, "status shows the SYNs per server");

    // A server that leaves loses its entry; its reverse packets are no longer taken.
    h.dataplane.apply(&[service(
        "web",
        "192.0.2.10",
        PROTO_TCP,
        80,
        &[("10.9.2.11", 1)],
    )])?;
    let c = reverse_counts(&h.dataplane)?;
    assert!(!c.contains_key(&s6), "{c:?}");
    assert_eq!(
        c[&s4].reverse_packets, 3,
        "a server that stays keeps its count"
    );
    let input = reverse_frame(None, "fd09:2::11", a6, &syn_ack4);
    let (action, out) = run_xdp(&h.dataplane, h.fx0, &input)?;
    assert_eq!(
        (action_name(action), out),
        (action_name(XDP_PASS), input),
        "untouched"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reverse tunnel, server side: the TC egress program, run with BPF_PROG_TEST_RUN.

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// The server side's object, its maps and its loaded TC program, in the test namespace
/// (whose forwarding, lo included, is on: the program's FIB lookups need it on lo).
struct ServerSide {
    ebpf: aya::Ebpf,
    /// Held: a map whose last descriptor closes before the program loads is freed.
    _served: aya::maps::HashMap<MapData, AddressKey, u32>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, ReverseConfig>,
    _ns: Netns,
}

impl ServerSide {
    fn new(served: &[&str]) -> Result<Self> {
        let ns = Netns::new()?;
        let mut ebpf = load_object(Sizes {
            ring_size: 1,
            max_services: 1,
            max_flows: 1,
            max_preference_tables: 1,
        })?;
        let mut map: aya::maps::HashMap<MapData, AddressKey, u32> = aya::maps::HashMap::try_from(
            ebpf.take_map(maps::SERVED)
                .ok_or_else(|| anyhow!("no SERVED"))?,
        )?;
        for a in served {
            map.insert(AddressKey::new(a.parse()?), 1, 0)?;
        }
        let stats = PerCpuArray::try_from(
            ebpf.take_map(maps::REVERSE_STATS)
                .ok_or_else(|| anyhow!("no REVERSE_STATS"))?,
        )?;
        let config = Array::try_from(
            ebpf.take_map(maps::REVERSE_CONFIG)
                .ok_or_else(|| anyhow!("no REVERSE_CONFIG"))?,
        )?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(programs::SERVER_REVERSE)
            .ok_or_else(|| anyhow!("no program {}", programs::SERVER_REVERSE))?
            .try_into()?;
        prog.load().context("loading the reverse-tunnel program")?;
        Ok(ServerSide {
            ebpf,
            _served: map,
            stats,
            config,
            _ns: ns,
        })
    }

    fn set_tunnel(&mut self, agent: &str, source: &str) -> Result<()> {
        let (agent, family) = addr_words(agent.parse()?);
        self.config.set(
            0,
            ReverseConfig {
                agent,
                source: addr_words(source.parse()?).0,
                family,
                _pad: [0; 3],
            },
            0,
        )?;
        Ok(())
    }

    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
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

    fn counters(&self) -> Result<Vec<u64>> {
        (0..reverse::COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }
}

/// A frame as the server's stack sends it towards the client (via its router).
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x09, 0x01];

fn server_frame(ip: &[u8]) -> Vec<u8> {
    ethernet(ROUTER_MAC, SERVER_MAC, None, ethertype_of(ip), ip)
}

/// `inner` IP-in-IP from `source` to `agent` as the program builds it: outer IPv4 with the
/// inner DSCP/ECN, DF, TTL 64, id 0; outer IPv6 with the inner traffic class, flow label 0,
/// hop limit 64.
fn tunnelled(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    source: &str,
    agent: &str,
    inner: &[u8],
) -> Vec<u8> {
    let (tos, next) = match inner[0] >> 4 {
        4 => (inner[1], 4u8),
        _ => ((inner[0] << 4) | (inner[1] >> 4), 41u8),
    };
    let outer = match (
        source.parse::<IpAddr>().unwrap(),
        agent.parse::<IpAddr>().unwrap(),
    ) {
        (IpAddr::V4(s), IpAddr::V4(a)) => {
            let mut h = vec![0x45, tos];
            h.extend_from_slice(&(20 + inner.len() as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, next, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&a.octets());
            let sum = inet_checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h.extend_from_slice(inner);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(a)) => {
            let first = (6u32 << 28) | (u32::from(tos) << 20);
            let mut h = first.to_be_bytes().to_vec();
            h.extend_from_slice(&(inner.len() as u16).to_be_bytes());
            h.push(next);
            h.push(64);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&a.octets());
            h.extend_from_slice(inner);
            h
        }
        _ => panic!("mixed outer families"),
    };
    ethernet(dst_mac, src_mac, None, ethertype_of(&outer), &outer)
}

/// Runs the server's program on `input` and compares action, output and the counter that
/// rose; returns a description of what differs.
fn tc_case(
    srv: &ServerSide,
    what: &str,
    input: Vec<u8>,
    rc: u32,
    want: Vec<u8>,
    reason: u32,
) -> Option<String> {
    let outcome = (|| -> Result<Option<String>> {
        let before = srv.counters()?;
        let (got_rc, out) = srv.run(&input)?;
        let after = srv.counters()?;
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let mut want_delta = vec![0; reverse::COUNT as usize];
        want_delta[reason as usize] = 1;
        if got_rc == rc && out == want && delta == want_delta {
            return Ok(None);
        }
        Ok(Some(format!(
            "{what}: action {got_rc} (want {rc}), counters {delta:?} (want {want_delta:?}), {}\nactual:\n{}expected:\n{}",
            first_difference(&out, &want),
            hex(&out),
            hex(&want)
        )))
    })();
    outcome.unwrap_or_else(|e| Some(format!("{what}: {e:#}")))
}

#[test]
fn the_server_tunnels_syn_acks_from_anycast_addresses_to_the_agent_and_nothing_else() -> Result<()>
{
    let mut srv = ServerSide::new(&["192.0.2.10", "2001:db8::10"])?;
    let syn_ack4 = answer("192.0.2.10", PROTO_TCP, 80, 40400, TCP_SYN_ACK);
    let syn_ack6 = answer("2001:db8::10", PROTO_TCP, 443, 40401, TCP_SYN_ACK);

    // Not configured yet: untouched.
    let (rc, out) = srv.run(&server_frame(&syn_ack4))?;
    assert_eq!((rc, out), (TC_ACT_OK, server_frame(&syn_ack4)));

    // The agent 10.9.3.11 is routed via fy0 (a permanent neighbour): the route to the
    // agent, not the client's, gives the egress and the MACs.
    srv.set_tunnel("10.9.3.11", "10.9.2.1")?;
    let agent_mac = neighbour_mac("10.9.3.11");
    let mut failures = Vec::new();
    failures.extend(tc_case(
        &srv,
        "IPv4 SYN-ACK from 192.0.2.10 -> IPv4-in-IPv4 to the agent, redirected",
        server_frame(&syn_ack4),
        TC_ACT_REDIRECT,
        tunnelled(agent_mac, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn_ack4),
        reverse::TUNNELLED,
    ));
    failures.extend(tc_case(
        &srv,
        "IPv6 SYN-ACK from 2001:db8::10 -> IPv6-in-IPv4 (41) to the agent, redirected",
        server_frame(&syn_ack6),
        TC_ACT_REDIRECT,
        tunnelled(agent_mac, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn_ack6),
        reverse::TUNNELLED,
    ));
    for (what, flags) in [
        ("SYN", 0x02u8),
        ("ACK", 0x10),
        ("PSH ACK (data)", 0x18),
        ("FIN ACK", 0x11),
        ("RST ACK", 0x14),
        ("SYN ACK with RST", 0x16),
    ] {
        let p = answer("192.0.2.10", PROTO_TCP, 80, 40402, flags);
        failures.extend(tc_case(
            &srv,
            &format!("{what} from the anycast address -> untouched"),
            server_frame(&p),
            TC_ACT_OK,
            server_frame(&p),
            reverse::PASS_OTHER,
        ));
    }
    let udp_answer = answer("192.0.2.10", PROTO_UDP, 53, 40403, 0);
    failures.extend(tc_case(
        &srv,
        "UDP from the anycast address -> untouched",
        server_frame(&udp_answer),
        TC_ACT_OK,
        server_frame(&udp_answer),
        reverse::PASS_OTHER,
    ));
    let not_served = answer("192.0.2.99", PROTO_TCP, 80, 40404, TCP_SYN_ACK);
    failures.extend(tc_case(
        &srv,
        "SYN-ACK from 192.0.2.99, not an anycast address of ours -> untouched",
        server_frame(&not_served),
        TC_ACT_OK,
        server_frame(&not_served),
        reverse::PASS_NOT_SERVED,
    ));
    failures.extend(tc_case(
        &srv,
        "ARP -> untouched",
        arp_request(),
        TC_ACT_OK,
        arp_request(),
        reverse::PASS_OTHER,
    ));
    // The kernel refuses sched_cls test frames of the IPv4 ether type shorter than an IPv4
    // header (14 + 20 bytes); 46 ends just before the TCP flags.
    for len in [34usize, 40, 46] {
        let cut = server_frame(&syn_ack4)[..len].to_vec();
        failures.extend(tc_case(
            &srv,
            &format!("SYN-ACK truncated to {len} bytes -> untouched"),
            cut.clone(),
            TC_ACT_OK,
            cut,
            reverse::PASS_OTHER,
        ));
    }

    // No neighbour entry for the agent yet: tunnelled and left to bpf_redirect_neigh,
    // MACs untouched.
    srv.set_tunnel("10.9.2.99", "10.9.2.1")?;
    failures.extend(tc_case(
        &srv,
        "agent 10.9.2.99 without a neighbour entry -> tunnelled, redirect_neigh, MACs unchanged",
        server_frame(&syn_ack4),
        TC_ACT_REDIRECT,
        tunnelled(ROUTER_MAC, SERVER_MAC, "10.9.2.1", "10.9.2.99", &syn_ack4),
        reverse::TUNNELLED_RESOLVING,
    ));
    srv.set_tunnel("10.99.0.1", "10.9.2.1")?;
    failures.extend(tc_case(
        &srv,
        "no route to the agent 10.99.0.1 -> untouched, straight to the client",
        server_frame(&syn_ack4),
        TC_ACT_OK,
        server_frame(&syn_ack4),
        reverse::PASS_NO_ROUTE,
    ));

    // An IPv6 agent: IPv4-in-IPv6 and IPv6-in-IPv6 from the server's IPv6 address, via fx0.
    srv.set_tunnel("fd09:2::11", "fd09:2::1")?;
    let agent6_mac = neighbour_mac("fd09:2::11");
    failures.extend(tc_case(
        &srv,
        "IPv4 SYN-ACK, IPv6 agent -> IPv4-in-IPv6 (4), redirected via fx0",
        server_frame(&syn_ack4),
        TC_ACT_REDIRECT,
        tunnelled(agent6_mac, FX0_MAC, "fd09:2::1", "fd09:2::11", &syn_ack4),
        reverse::TUNNELLED,
    ));
    failures.extend(tc_case(
        &srv,
        "IPv6 SYN-ACK, IPv6 agent -> IPv6-in-IPv6 (41), redirected via fx0",
        server_frame(&syn_ack6),
        TC_ACT_REDIRECT,
        tunnelled(agent6_mac, FX0_MAC, "fd09:2::1", "fd09:2::11", &syn_ack6),
        reverse::TUNNELLED,
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The next-hop cache and the address filter.

/// The agent keeps the FIB's answer per server for the current second: a longer packet
/// than any the FIB accepted is checked against the MTU again, a changed neighbour or a
/// neighbour that went away takes effect within the next second, and a failed lookup is
/// never cached.
#[test]
fn the_next_hop_cache_follows_the_fib_and_never_skips_the_mtu_check() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = h.dataplane;
    dp.apply(&web_and_dns())?;
    let flow = Flow::v4("192.0.2.10", PROTO_TCP, 41000, 80);
    let run = |dp: &Dataplane, inner: &[u8]| run_xdp(dp, h.fx0, &client_frame(None, inner));
    let small = ip_packet(&flow);
    let at_mtu = big_packet(&flow, 1480);
    let over_mtu = big_packet(&flow, 1481);
    // Just after a tick of the flow clock, so the next packets meet a cached answer.
    let second = flow_clock_now();
    wait_past(second);
    let (action, out) = run(&dp, &small)?;
    assert_eq!(action, XDP_TX, "a small packet is sent");
    assert_eq!(out, tx_to("10.9.2.11", None, &flow, &small));
    let before = counter(&dp, verdict::DROP_TOO_BIG)?;
    let (action, _) = run(&dp, &over_mtu)?;
    assert_eq!(
        action, XDP_DROP,
        "an outer packet of 1501 bytes after a cached answer for a small one"
    );
    assert_eq!(counter(&dp, verdict::DROP_TOO_BIG)?, before + 1);
    let (action, out) = run(&dp, &at_mtu)?;
    assert_eq!(action, XDP_TX, "an outer packet of exactly the MTU");
    assert_eq!(out, tx_to("10.9.2.11", None, &flow, &at_mtu));
    let (action, _) = run(&dp, &over_mtu)?;
    assert_eq!(
        action, XDP_DROP,
        "1501 bytes after a cached answer for 1500"
    );

    // The neighbour's MAC changes and the controller reports it (the agent does on every
    // routing event): the very next packet asks the FIB again.
    let wait_mac = [0x02, 0, 0, 0, 0x02, 0x7d];
    let second = flow_clock_now();
    wait_past(second);
    run(&dp, &small)?; // a fresh answer cached for this tick
    set_server_a_mac(wait_mac)?;
    dp.fib_changed()?;
    let tick = flow_clock_now();
    let old = encapsulated(wait_mac, FX0_MAC, None, &flow, &small, "10.9.2.11");
    let (action, out) = run(&dp, &small)?;
    assert_eq!(
        (action, &out),
        (XDP_TX, &old),
        "the first packet after a reported change"
    );
    assert_eq!(
        flow_clock_now(),
        tick,
        "(the tick did not change meanwhile)"
    );

    // Unreported, a changed MAC is picked up at the next tick of the flow clock.
    let new_mac = [0x02, 0, 0, 0, 0x02, 0x7e];
    set_server_a_mac(new_mac)?;
    let changed = Instant::now();
    let want = encapsulated(new_mac, FX0_MAC, None, &flow, &small, "10.9.2.11");
    loop {
        let (action, out) = run(&dp, &small)?;
        if action == XDP_TX && out == want {
            break;
        }
        assert_eq!(
            out, old,
            "before the change shows, the old neighbour's frame exactly"
        );
        assert!(
            changed.elapsed() < Duration::from_secs(3),
            "the new neighbour MAC was not used within 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "new neighbour MAC used {:?} after the change",
        changed.elapsed()
    );

    // The neighbour goes away: the packet goes to the kernel (which resolves it) within the
    // next second, and that failure is not cached.
    ip(&["neigh", "del", "10.9.2.11", "dev", "fx0"])?;
    let removed = Instant::now();
    while run(&dp, &small)?.0 != XDP_PASS {
        assert!(
            removed.elapsed() < Duration::from_secs(3),
            "the packet was still sent 3 s after its neighbour went away"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = counter(&dp, verdict::PASS_NO_NEIGH)?;
    run(&dp, &small)?;
    assert_eq!(counter(&dp, verdict::PASS_NO_NEIGH)?, before + 1);
    set_server_a_mac(new_mac)?;
    let (action, out) = run(&dp, &small)?;
    assert_eq!(
        (action, out),
        (XDP_TX, want),
        "the first packet after the neighbour returns is sent (no cached failure)"
    );
    Ok(())
}

/// Points the test namespace's neighbour entry for server A (10.9.2.11) at `mac`.
fn set_server_a_mac(mac: [u8; 6]) -> Result<()> {
    ip(&[
        "neigh",
        "replace",
        "10.9.2.11",
        "lladdr",
        &mac_str(mac),
        "dev",
        "fx0",
        "nud",
        "permanent",
    ])
}

/// The bits of `ADDRESS_FILTER` that are set.
fn filter_bits(dp: &Dataplane) -> Result<BTreeSet<(u32, u64)>> {
    let map: Array<MapData, u64> = Array::try_from(agent_map(dp, maps::ADDRESS_FILTER)?)?;
    let mut bits = BTreeSet::new();
    for i in 0..anycast_common::ADDRESS_FILTER_WORDS {
        let w = map.get(&i, 0)?;
        for b in 0..64 {
            if w & (1u64 << b) != 0 {
                bits.insert((i, 1u64 << b));
            }
        }
    }
    Ok(bits)
}

fn filter_bit(addr: &str) -> (u32, u64) {
    let (words, family) = addr_words(addr.parse().unwrap());
    anycast_common::address_filter_bit(family, &words)
}

/// `ADDRESS_FILTER` holds exactly the bits of the installed services' addresses; an address
/// whose bit is clear passes untouched, and so does one whose bit it shares with a service
/// address (the filter only says "maybe").
#[test]
fn the_address_filter_holds_the_service_addresses_and_only_says_maybe() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = h.dataplane;
    let mut both = web_and_dns();
    both.extend(web6());
    dp.apply(&both)?;
    let want: BTreeSet<_> = [filter_bit("192.0.2.10"), filter_bit("2001:db8::10")].into();
    assert_eq!(filter_bits(&dp)?, want, "two service addresses");
    dp.apply(&web6())?;
    assert_eq!(
        filter_bits(&dp)?,
        [filter_bit("2001:db8::10")].into(),
        "the IPv4 address's bit cleared with its services"
    );
    dp.apply(&web_and_dns())?;
    // An address that shares the service address's bit: looked up, not a service, passed.
    let service_bit = filter_bit("192.0.2.10");
    let twin = (0u32..1 << 24)
        .map(|i| Ipv4Addr::from(0x0a00_0000 | i).to_string())
        .find(|a| a != "192.0.2.10" && filter_bit(a) == service_bit)
        .expect("some 10/8 address shares the bit");
    let clear = (0u32..1 << 24)
        .map(|i| Ipv4Addr::from(0x0a00_0000 | i).to_string())
        .find(|a| !filter_bits(&dp).unwrap().contains(&filter_bit(a)))
        .expect("some 10/8 address has a clear bit");
    for (what, addr) in [("shares the bit", &twin), ("clear bit", &clear)] {
        let inner = ip_packet(&Flow::v4(addr, PROTO_TCP, 41001, 80));
        let input = client_frame(None, &inner);
        let before = counter(&dp, verdict::PASS_NOT_SERVICE)?;
        let (action, out) = run_xdp(&dp, h.fx0, &input)?;
        assert_eq!(
            (action, &out),
            (XDP_PASS, &input),
            "{what} ({addr}): passed untouched"
        );
        assert_eq!(counter(&dp, verdict::PASS_NOT_SERVICE)?, before + 1);
    }
    // The service address itself is still forwarded.
    let flow = Flow::v4("192.0.2.10", PROTO_TCP, 41002, 80);
    let inner = ip_packet(&flow);
    let (action, out) = run_xdp(&dp, h.fx0, &client_frame(None, &inner))?;
    assert_eq!(
        (action, out),
        (XDP_TX, tx_to("10.9.2.11", None, &flow, &inner))
    );
    Ok(())
}

/// Packets and bytes are counted per service and per server whether the flow table hits
/// (the service then comes from the server's slot, not from a lookup) or misses; two
/// services on one address with the same server keep their counts apart.
#[test]
fn traffic_is_counted_per_service_and_server_on_hits_and_misses() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = h.dataplane;
    dp.apply(&web_and_dns())?;
    let web = Flow::v4("192.0.2.10", PROTO_TCP, 41010, 80);
    let dns = Flow::v4("192.0.2.10", PROTO_UDP, 41011, 53);
    let mut sent: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let (hits, misses) = (
        counter(&dp, verdict::FLOW_HIT)?,
        counter(&dp, verdict::FLOW_MISS)?,
    );
    for (name, flow, n) in [("web", &web, 3), ("dns", &dns, 2)] {
        for _ in 0..n {
            let input = client_frame(None, &ip_packet(flow));
            let (action, _) = run_xdp(&dp, h.fx0, &input)?;
            assert_eq!(action, XDP_TX, "{name}");
            let e = sent.entry(name).or_default();
            e.0 += 1;
            e.1 += input.len() as u64;
        }
    }
    assert_eq!(
        counter(&dp, verdict::FLOW_MISS)?,
        misses + 2,
        "one miss per flow"
    );
    assert_eq!(
        counter(&dp, verdict::FLOW_HIT)?,
        hits + 3,
        "the other packets hit"
    );
    let report = dp.report()?;
    for svc in &report.services {
        let want = sent[svc.name.as_str()];
        assert_eq!((svc.packets, svc.bytes), want, "service {}", svc.name);
        assert_eq!(svc.servers.len(), 1);
        let s = &svc.servers[0];
        assert_eq!((s.packets, s.bytes), want, "service {}'s server", svc.name);
    }
    assert_eq!(report.services.len(), 2);
    Ok(())
}

/// This kernel maps `RINGS` into the controller's memory, so tables are written with plain
/// stores; the fixtures and affinity tests above check what the data path then reads.
#[test]
fn tables_are_written_through_a_memory_mapping() -> Result<()> {
    let h = Harness::new()?;
    assert_eq!(h.dataplane.table_write_path(), "memory mapping");
    Ok(())
}

/// IPv4 and IPv6 flows are listed with their addresses, ports and servers, and swept.
#[test]
fn ipv4_and_ipv6_flows_are_listed_and_swept() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = h.dataplane;
    let mut both = web_and_dns();
    both.extend(web6());
    dp.apply(&both)?;
    let v4 = Flow::v4("192.0.2.10", PROTO_TCP, 41020, 80);
    let v6 = Flow::v6("2001:db8::10", PROTO_TCP, 41021, 443);
    for f in [&v4, &v6] {
        let (action, _) = run_xdp(&dp, h.fx0, &client_frame(None, &ip_packet(f)))?;
        assert_eq!(action, XDP_TX, "{f:?}");
    }
    let listed: BTreeMap<u16, (IpAddr, IpAddr, u16, Option<IpAddr>)> = dp
        .flows()?
        .into_iter()
        .map(|f| (f.client_port, (f.client, f.address, f.port, f.server)))
        .collect();
    assert_eq!(
        listed,
        BTreeMap::from([
            (
                41020,
                (
                    IpAddr::V4(CLIENT_V4),
                    "192.0.2.10".parse()?,
                    80,
                    Some("10.9.2.11".parse()?)
                )
            ),
            (
                41021,
                (
                    IpAddr::V6(CLIENT_V6),
                    "2001:db8::10".parse()?,
                    443,
                    Some("fd09:2::11".parse()?)
                )
            ),
        ])
    );
    let now = flow_clock_now();
    assert_eq!(dp.sweep_flows(now)?, 0);
    assert_eq!(
        dp.sweep_flows(now + flow_ticks(300) + 1)?,
        2,
        "one per table"
    );
    assert!(dp.flows()?.is_empty());
    Ok(())
}

/// The flow table is read in batches of 4096 entries: a table of 10 000 flows is listed
/// whole, each flow once, and swept whole.
#[test]
fn large_flow_tables_are_listed_and_swept_whole() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = new_dataplane_with_flows(h.fy0, 16384)?;
    dp.apply(&web_and_dns())?;
    let n: u32 = 10_000;
    for i in 0..n {
        let flow = Flow {
            src: IpAddr::V4(Ipv4Addr::from(0xc633_0000 | (i >> 8))),
            ..Flow::v4("192.0.2.10", PROTO_UDP, 20000 + (i & 0xff) as u16, 53)
        };
        let (action, _) = run_xdp(&dp, h.fx0, &client_frame(None, &ip_packet(&flow)))?;
        assert_eq!(action, XDP_TX);
    }
    let listed: BTreeSet<(IpAddr, u16)> = dp
        .flows()?
        .iter()
        .map(|f| (f.client, f.client_port))
        .collect();
    assert_eq!(listed.len(), n as usize, "every flow listed once");
    assert_eq!(dp.flows()?.len(), n as usize, "and nothing twice");
    let now = flow_clock_now();
    assert_eq!(dp.sweep_flows(now)?, 0);
    assert_eq!(dp.sweep_flows(now + flow_ticks(30) + 1)?, n as usize);
    assert!(dp.flows()?.is_empty());
    Ok(())
}
