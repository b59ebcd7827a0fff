//! Parts 1 and 3: the per-packet cost of the agent's XDP program with `BPF_PROG_TEST_RUN`,
//! beside two trivial programs run on the same frames, and how it grows with the number of
//! flows, services and servers; plus the program's size and run-time statistics (profile).
//!
//! Every call runs the program once (`repeat = 1`) on a fresh copy of its input: the
//! kernel's repeat count would re-run the program on its own output, which is wrong for a
//! program that rewrites the packet. The figure is the median of the per-call durations the
//! kernel reports; the programs are interleaved in batches so that drift on this shared
//! machine hits them alike.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use crate::netns::Netns;
use anycast_common::{programs, verdict, ServiceKey, PROTO_TCP};
use anycast_ctl::dataplane::{Dataplane, DesiredServer, DesiredService, Sizes};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use serde_json::json;

use super::packets::{self, Pick, Source};
use super::report::{median, percentile, ratio, Row, Section};
use crate::packet::{TCP_ACK, TCP_SYN};

pub const TX_SWAP: &str = anycast_common::programs::TX_SWAP;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 2, 1);
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 2, 0, 0, 0, 0, 0, 1);
const GW_V4: &str = "10.9.2.254";
const GW_V6: &str = "fd09:2::fe";
const GW_MAC: &str = "02:00:00:00:02:fe";
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
const SVC_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 100, 1);
const SVC_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x100, 0, 0, 0, 0, 0, 1);
/// A service whose servers have IPv6 real addresses: IPv4 in IPv6.
const SVC_4IN6: Ipv4Addr = Ipv4Addr::new(10, 9, 100, 2);
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 9, 50, 50);

/// Server `i` (from 1): IPv4 real addresses in 10.9.128.0/17, IPv6 in fd09:80::/32, both
/// behind one gateway, so every server has a next hop.
pub fn server_v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 9, 128, 0)) + i))
}
fn server_v6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd09, 0x80, 0, 0, 0, 0, 0, i as u16))
}

#[derive(Clone, Copy)]
pub struct Effort {
    pub rounds: usize,
    pub batch: usize,
    pub quick: bool,
}

/// The namespace the programs run in: the kernel does their FIB lookups in the namespace of
/// the calling thread, against the interface named as ingress.
pub fn namespace(name: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    ns.ip(&["link", "add", "fx0", "type", "veth", "peer", "name", "fx1"])?;
    ns.ip(&["link", "set", "fx0", "address", "02:00:00:00:01:01"])?;
    ns.ip(&["link", "set", "fx0", "up"])?;
    ns.ip(&["link", "set", "fx1", "up"])?;
    ns.ip(&["addr", "add", &format!("{AGENT_V4}/24"), "dev", "fx0"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{AGENT_V6}/64"),
        "dev",
        "fx0",
        "nodad",
    ])?;
    for gw in [GW_V4, GW_V6] {
        ns.ip(&[
            "neigh",
            "add",
            gw,
            "lladdr",
            GW_MAC,
            "dev",
            "fx0",
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&["route", "add", "10.9.128.0/17", "via", GW_V4])?;
    ns.ip(&["-6", "route", "add", "fd09:80::/32", "via", GW_V6])?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    Ok(ns)
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} here");
    }
    Ok(i)
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub fn service(name: &str, addr: IpAddr, servers: &[IpAddr]) -> DesiredService {
    DesiredService {
        name: name.into(),
        key: ServiceKey::new(addr, PROTO_TCP, 80),
        servers: servers
            .iter()
            .enumerate()
            .map(|(i, a)| DesiredServer {
                name: format!("{name}-s{i}"),
                address: *a,
                weight: 100,
                up: true,
            })
            .collect(),
        preferences: Vec::new(),
    }
}

/// A data plane with the agent program and the two baselines loaded.
pub fn dataplane(sizes: Sizes, services: &[DesiredService]) -> Result<Dataplane> {
    let mut dp = Dataplane::new(sizes)?;
    dp.set_agent_addresses(Some(IpAddr::V4(AGENT_V4)), Some(IpAddr::V6(AGENT_V6)))?;
    dp.apply(services)?;
    for name in [programs::AGENT, programs::PASS, TX_SWAP] {
        let p: &mut Xdp = dp
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(dp)
}

pub fn program<'a>(dp: &'a Dataplane, name: &str) -> Result<&'a Xdp> {
    Ok(dp
        .ebpf
        .program(name)
        .ok_or_else(|| anyhow!("no program {name}"))?
        .try_into()?)
}

fn ctx(ingress: u32, len: usize) -> [u8; 24] {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, len as u32, 0, ingress, 0, 0];
    let mut c = [0u8; 24];
    for (i, w) in md.iter().enumerate() {
        c[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    c
}

/// One run of `prog` on `frame`: (action, kernel-reported duration in ns).
pub fn run_once(prog: &Xdp, frame: &[u8], ingress: u32) -> Result<(u32, u64)> {
    let c = ctx(ingress, frame.len());
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&c),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

/// Per-program results of [`compare`].
pub struct Measured {
    pub name: String,
    /// Kernel-reported duration of each call.
    pub kernel: Vec<f64>,
    /// Wall time per call of each batch (syscall included).
    pub wall: Vec<f64>,
    /// The kernel-reported duration per call of each batch (its mean): what `wall` is
    /// compared with, batch for batch.
    pub kernel_batch: Vec<f64>,
}

impl Measured {
    pub fn median(&self) -> f64 {
        median(&self.kernel)
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "program": self.name,
            "calls": self.kernel.len(),
            "kernel_ns_median": median(&self.kernel),
            "kernel_ns_p10": percentile(&self.kernel, 10.0),
            "kernel_ns_p90": percentile(&self.kernel, 90.0),
            "wall_ns_per_call_median_batch": median(&self.wall),
            "kernel_ns_per_call_median_batch": median(&self.kernel_batch),
        })
    }
}

/// Runs each program `rounds x batch` times on frames from `src`, interleaved batch by batch
/// (the order rotates every round). Every call must return the program's expected action.
pub fn compare(
    progs: &[(&str, &Xdp, u32)],
    src: &mut Source,
    ingress: u32,
    effort: Effort,
    what: &str,
) -> Result<Vec<Measured>> {
    let mut out: Vec<Measured> = progs
        .iter()
        .map(|(n, _, _)| Measured {
            name: n.to_string(),
            kernel: Vec::with_capacity(effort.rounds * effort.batch),
            wall: Vec::new(),
            kernel_batch: Vec::new(),
        })
        .collect();
    for r in 0..effort.rounds {
        for j in 0..progs.len() {
            let i = (j + r) % progs.len();
            let (name, prog, want) = progs[i];
            let t0 = Instant::now();
            for _ in 0..effort.batch {
                let frame = src.frame();
                let (action, ns) = run_once(prog, frame, ingress)?;
                if action != want {
                    bail!("{what}: {name} returned action {action}, expected {want}");
                }
                out[i].kernel.push(ns as f64);
            }
            out[i]
                .wall
                .push(t0.elapsed().as_nanos() as f64 / effort.batch as f64);
            let batch = &out[i].kernel[out[i].kernel.len() - effort.batch..];
            let mean = batch.iter().sum::<f64>() / effort.batch as f64;
            out[i].kernel_batch.push(mean);
        }
    }
    Ok(out)
}

/// The `VERDICTS` counters, summed over CPUs, by name.
pub fn verdicts(dp: &Dataplane) -> Result<Vec<u64>> {
    Ok(dp.report()?.verdicts.into_iter().map(|(_, c)| c).collect())
}

fn delta(after: &[u64], before: &[u64], which: u32) -> u64 {
    after[which as usize] - before[which as usize]
}

struct Case {
    name: &'static str,
    src: Source,
    /// Run the agent once on the template first (installs the flow: the hit path).
    prime: bool,
    agent_action: u32,
    /// Verdict counter that must count every agent call.
    counted: u32,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Hit,
    Miss,
    Pass,
}

/// The services of part 1 and of `--spin`: IPv4, IPv6 and IPv4-in-IPv6, three servers each.
fn case_services() -> Vec<DesiredService> {
    vec![
        service(
            "v4",
            IpAddr::V4(SVC_V4),
            &[server_v4(1), server_v4(2), server_v4(3)],
        ),
        service(
            "v6",
            IpAddr::V6(SVC_V6),
            &[server_v6(1), server_v6(2), server_v6(3)],
        ),
        service(
            "4in6",
            IpAddr::V4(SVC_4IN6),
            &[server_v6(0x11), server_v6(0x12), server_v6(0x13)],
        ),
    ]
}

/// Part 1: the per-packet cases (hits, new flows, IPv6, IPv4 in IPv6, not a service), each
/// beside xdp_tx_swap and xdp_pass.
pub fn per_packet(effort: Effort) -> Result<Section> {
    let mut section = Section::new("per_packet", "1. Per-packet cost (BPF_PROG_TEST_RUN)");
    section.method = format!(
        "BPF_PROG_TEST_RUN with repeat=1 and a fresh copy of the input on every call \
         ({} rounds x {} calls per program and case, programs interleaved batch by batch, \
         thread pinned to one CPU, in a namespace whose FIB sends the tunnelled packet back \
         out of the ingress port: XDP_TX). Figure: median of the kernel-reported duration \
         per call (it includes the test-run machinery's own per-call floor, clock reads \
         and bottom-half toggling, for every program alike: the trivial programs measure \
         about that floor). \
         Baselines on the same frames: xdp_tx_swap (swaps MACs, XDP_TX; the target's \
         reference) and xdp_pass. Hits: one installed flow; new flows: a never-seen 5-tuple \
         per call (SYN). Default map sizes (65537-entry tables, 1M flows). Cross-check: wall \
         time per call of the same loops, minus the xdp_pass loop.",
        effort.rounds, effort.batch
    );
    let dp = dataplane(Sizes::default(), &case_services())?;
    let ingress = ifindex("fx0")?;
    let agent = program(&dp, programs::AGENT)?;
    let pass = program(&dp, programs::PASS)?;
    let swap = program(&dp, TX_SWAP)?;

    let v4 = |dst: Ipv4Addr, flags: u8| packets::v4_tcp(CLIENT_V4, 40000, dst, 80, flags);
    let v6 = |flags: u8| packets::v6_tcp(CLIENT_V6, 40000, SVC_V6, 80, flags);
    let mut fresh_v4 = Source::new(v4(SVC_V4, TCP_SYN), vec![], Pick::Fresh, 1);
    fresh_v4.next = 10_000_000;
    let mut fresh_v6 = Source::new(v6(TCP_SYN), vec![], Pick::Fresh, 2);
    fresh_v6.next = 10_000_000;
    let cases = vec![
        Case {
            name: "IPv4 TCP, flow-table hit",
            src: Source::new(v4(SVC_V4, TCP_ACK), vec![], Pick::Same, 0),
            prime: true,
            agent_action: XDP_TX,
            counted: verdict::FLOW_HIT,
            kind: Kind::Hit,
        },
        Case {
            name: "IPv4 TCP, new flow (SYN, miss)",
            src: fresh_v4,
            prime: false,
            agent_action: XDP_TX,
            counted: verdict::FLOW_MISS,
            kind: Kind::Miss,
        },
        Case {
            name: "IPv6 TCP, flow-table hit",
            src: Source::new(v6(TCP_ACK), vec![], Pick::Same, 0),
            prime: true,
            agent_action: XDP_TX,
            counted: verdict::FLOW_HIT,
            kind: Kind::Hit,
        },
        Case {
            name: "IPv6 TCP, new flow (SYN, miss)",
            src: fresh_v6,
            prime: false,
            agent_action: XDP_TX,
            counted: verdict::FLOW_MISS,
            kind: Kind::Miss,
        },
        Case {
            name: "IPv4 in IPv6, flow-table hit",
            src: Source::new(v4(SVC_4IN6, TCP_ACK), vec![], Pick::Same, 0),
            prime: true,
            agent_action: XDP_TX,
            counted: verdict::FLOW_HIT,
            kind: Kind::Hit,
        },
        Case {
            name: "non-service IPv4 TCP (pass-through)",
            src: Source::new(v4(NOT_A_SERVICE, TCP_ACK), vec![], Pick::Same, 0),
            prime: false,
            agent_action: XDP_PASS,
            counted: verdict::PASS_NOT_SERVICE,
            kind: Kind::Pass,
        },
    ];
    let mut data = Vec::new();
    let mut cross = Vec::new();
    let mut own = Vec::new();
    for mut case in cases {
        if case.prime {
            let f = case.src.frame().to_vec();
            let (a, _) = run_once(agent, &f, ingress)?;
            if a != case.agent_action {
                bail!("{}: priming run returned {a}", case.name);
            }
        }
        let before = verdicts(&dp)?;
        let m = compare(
            &[
                ("anycast_agent", agent, case.agent_action),
                ("xdp_tx_swap", swap, XDP_TX),
                ("xdp_pass", pass, XDP_PASS),
            ],
            &mut case.src,
            ingress,
            effort,
            case.name,
        )?;
        let after = verdicts(&dp)?;
        let calls = (effort.rounds * effort.batch) as u64;
        let counted = delta(&after, &before, case.counted);
        if counted != calls {
            section.notes.push(format!(
                "check failed: {}: {} of {calls} agent calls counted as {}",
                case.name,
                counted,
                verdict::NAMES[case.counted as usize]
            ));
        }
        let (a, s, p) = (m[0].median(), m[1].median(), m[2].median());
        let (target, limit) = match case.kind {
            Kind::Hit => ("<= 2.4x xdp_tx_swap", 2.4),
            Kind::Miss => ("<= 8x xdp_tx_swap", 8.0),
            Kind::Pass => ("<= 1.3x xdp_tx_swap", 1.3),
        };
        section.rows.push(
            Row::new(case.name, a, "ns")
                .baseline("xdp_tx_swap", s)
                .other("xdp_pass", p)
                .target(target, ratio(a, s) <= limit),
        );
        // The data path's own cost goals: the figure less xdp_tx_swap's, same run.
        let goal = match case.name {
            "IPv4 TCP, flow-table hit" => Some(75.0),
            "IPv6 TCP, flow-table hit" => Some(85.0),
            "IPv4 TCP, new flow (SYN, miss)" | "IPv6 TCP, new flow (SYN, miss)" => Some(300.0),
            _ => None,
        };
        if let Some(goal) = goal {
            own.push(
                Row::new(
                    format!("own cost (less xdp_tx_swap): {}", case.name),
                    a - s,
                    "ns",
                )
                .baseline("xdp_tx_swap", s)
                .target(format!("<= {goal} ns"), a - s <= goal),
            );
        }
        let wall_delta = median(&m[0].wall) - median(&m[2].wall);
        cross.push(
            Row::new(
                format!("wall-clock cost above xdp_pass: {}", case.name),
                wall_delta,
                "ns",
            )
            .baseline("kernel-reported difference", a - p)
            .other(
                "kernel-reported difference of the batch means",
                median(&m[0].kernel_batch) - median(&m[2].kernel_batch),
            ),
        );
        data.push(json!({
            "case": case.name,
            "verdict_checked": verdict::NAMES[case.counted as usize],
            "verdict_count": counted,
            "calls": calls,
            "programs": m.iter().map(Measured::json).collect::<Vec<_>>(),
        }));
    }
    section.rows.extend(own);
    section.rows.extend(cross);
    section.notes.push(
        "The wall-clock rows measure the same loops by the clock (syscall included) and \
         subtract the xdp_pass loop (median over batches of the wall time per call). The \
         baseline is the difference of the kernel's medians per call; the other column, \
         the difference of the kernel's means per call, batch by batch as the wall clock \
         is taken: what the wall clock adds beyond that is spent outside the kernel's \
         timed window."
            .into(),
    );
    section.data = json!({ "cases": data });
    Ok(section)
}

/// Runs only the agent program, on one case, for `secs` seconds: a steady load for an
/// outside profiler (`perf record -e cpu-clock -C CPU`). Cases: `hit4`, `miss4`, `hit6`,
/// `miss6`, `4in6`, `pass`.
pub fn spin(case: &str, secs: f64) -> Result<String> {
    let dp = dataplane(Sizes::default(), &case_services())?;
    let ingress = ifindex("fx0")?;
    let agent = program(&dp, programs::AGENT)?;
    let v4 = |dst: Ipv4Addr, flags: u8| packets::v4_tcp(CLIENT_V4, 40000, dst, 80, flags);
    let v6 = |flags: u8| packets::v6_tcp(CLIENT_V6, 40000, SVC_V6, 80, flags);
    let (mut src, want) = match case {
        "hit4" => (
            Source::new(v4(SVC_V4, TCP_ACK), vec![], Pick::Same, 0),
            XDP_TX,
        ),
        "miss4" => (
            Source::new(v4(SVC_V4, TCP_SYN), vec![], Pick::Fresh, 0),
            XDP_TX,
        ),
        "hit6" => (Source::new(v6(TCP_ACK), vec![], Pick::Same, 0), XDP_TX),
        "miss6" => (Source::new(v6(TCP_SYN), vec![], Pick::Fresh, 0), XDP_TX),
        "4in6" => (
            Source::new(v4(SVC_4IN6, TCP_ACK), vec![], Pick::Same, 0),
            XDP_TX,
        ),
        "pass" => (
            Source::new(v4(NOT_A_SERVICE, TCP_ACK), vec![], Pick::Same, 0),
            XDP_PASS,
        ),
        other => bail!("unknown case {other}: hit4, miss4, hit6, miss6, 4in6 or pass"),
    };
    let t = Instant::now();
    let mut calls = 0u64;
    let mut kernel = Vec::new();
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let (a, ns) = run_once(agent, src.frame(), ingress)?;
            if a != want {
                bail!("{case}: action {a}, expected {want}");
            }
            kernel.push(ns as f64);
        }
        calls += 1000;
    }
    Ok(format!(
        "{case}: {calls} runs in {:.1} s, median {} ns (kernel-reported)",
        t.elapsed().as_secs_f64(),
        median(&kernel)
    ))
}

mod profile;
mod scale;
pub use profile::profile;
pub use scale::scale;
