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
        let wall_delta = median(&m[0].wall) - median(&m[2].wall);
        cross.push(
            Row::new(
                format!("wall-clock cost above xdp_pass: {}", case.name),
                wall_delta,
                "ns",
            )
            .baseline("kernel-reported difference", a - p),
        );
        data.push(json!({
            "case": case.name,
            "verdict_checked": verdict::NAMES[case.counted as usize],
            "verdict_count": counted,
            "calls": calls,
            "programs": m.iter().map(Measured::json).collect::<Vec<_>>(),
        }));
    }
    section.rows.extend(cross);
    section.notes.push(
        "The wall-clock rows measure the same loops by the clock (syscall included) and \
         subtract the xdp_pass loop: they should agree with the difference of the kernel \
         medians within the noise of this shared machine."
            .into(),
    );
    section.data = json!({ "cases": data });
    Ok(section)
}

/// Profile: program sizes from the kernel and `bpf_stats` run time per run.
pub fn profile(effort: Effort) -> Result<Section> {
    let mut section = Section::new("profile", "Profile of the per-packet path");
    section.method = "Program sizes as loaded (bpf_prog_info: xlated instructions = \
        xlated bytes / 8, JIT bytes, instructions the verifier processed). Run time: \
        kernel.bpf_stats_enabled (BPF_ENABLE_STATS) around the same BPF_PROG_TEST_RUN \
        calls, run_time_ns / run_cnt per program (the stats add two clock reads per run, \
        for every program alike)."
        .into();
    let services = vec![service(
        "v4",
        IpAddr::V4(SVC_V4),
        &[server_v4(1), server_v4(2), server_v4(3)],
    )];
    let dp = dataplane(Sizes::default(), &services)?;
    let ingress = ifindex("fx0")?;
    let agent = program(&dp, programs::AGENT)?;
    let pass = program(&dp, programs::PASS)?;
    let swap = program(&dp, TX_SWAP)?;
    let ai = agent.info()?;
    let si = swap.info()?;
    let pi = pass.info()?;
    let insns = |i: &aya::programs::ProgramInfo| i.size_translated().unwrap_or(0) as f64 / 8.0;
    section.rows.push(
        Row::new("anycast_agent: xlated instructions", insns(&ai), "insns")
            .baseline("xdp_tx_swap", insns(&si))
            .other("xdp_pass", insns(&pi)),
    );
    section.rows.push(
        Row::new(
            "anycast_agent: JIT-compiled size",
            ai.size_jitted() as f64,
            "bytes",
        )
        .baseline("xdp_tx_swap", si.size_jitted() as f64)
        .other("xdp_pass", pi.size_jitted() as f64),
    );
    if let (Some(a), Some(s)) = (
        ai.verified_instruction_count(),
        si.verified_instruction_count(),
    ) {
        section.rows.push(
            Row::new("anycast_agent: instructions verified", a as f64, "insns")
                .baseline("xdp_tx_swap", s as f64),
        );
    }
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("enabling BPF run-time stats: {e}"))?;
    let calls = effort.rounds * effort.batch / 2;
    let v4 = |flags: u8| packets::v4_tcp(CLIENT_V4, 40000, SVC_V4, 80, flags);
    let mut fresh = Source::new(v4(TCP_SYN), vec![], Pick::Fresh, 3);
    fresh.next = 20_000_000;
    let prime = v4(TCP_ACK);
    run_once(agent, &prime, ingress)?;
    let mut cases = [
        (
            "IPv4 hit",
            Source::new(v4(TCP_ACK), vec![], Pick::Same, 0),
            XDP_TX,
        ),
        ("IPv4 new flow", fresh, XDP_TX),
        (
            "non-service",
            Source::new(
                packets::v4_tcp(CLIENT_V4, 40000, NOT_A_SERVICE, 80, TCP_ACK),
                vec![],
                Pick::Same,
                0,
            ),
            XDP_PASS,
        ),
    ];
    for (name, src, want) in cases.iter_mut() {
        let mut per_run = Vec::new();
        for (prog, want) in [(agent, *want), (swap, XDP_TX)] {
            let b = prog.info()?;
            for _ in 0..calls {
                let f = src.frame();
                let (a, _) = run_once(prog, f, ingress)?;
                if a != want {
                    bail!("profile {name}: action {a}, expected {want}");
                }
            }
            let e = prog.info()?;
            let runs = e.run_count() - b.run_count();
            let ns = (e.run_time() - b.run_time()).as_nanos() as f64;
            per_run.push(ns / runs.max(1) as f64);
        }
        section.rows.push(
            Row::new(
                format!("bpf_stats run_time/run_cnt: {name}"),
                per_run[0],
                "ns",
            )
            .baseline("xdp_tx_swap", per_run[1]),
        );
    }
    drop(stats);
    section.data = json!({
        "anycast_agent": {
            "xlated_bytes": ai.size_translated(),
            "jited_bytes": ai.size_jitted(),
            "verified_insns": ai.verified_instruction_count(),
        },
        "xdp_tx_swap": {
            "xlated_bytes": si.size_translated(),
            "jited_bytes": si.size_jitted(),
            "verified_insns": si.verified_instruction_count(),
        },
    });
    Ok(section)
}

/// Installs flows `0..n` of `src` by running the agent on them (each a miss that pins the
/// flow). Returns how many the agent counted as misses.
fn fill(dp: &Dataplane, src: &mut Source, n: u64, ingress: u32) -> Result<u64> {
    let agent = program(dp, programs::AGENT)?;
    let before = verdicts(dp)?;
    for k in 0..n {
        let f = src.flow(k);
        let (a, _) = run_once(agent, f, ingress)?;
        if a != XDP_TX {
            bail!("filling the flow table: flow {k} got action {a}");
        }
    }
    Ok(delta(&verdicts(dp)?, &before, verdict::FLOW_MISS))
}

/// Hit (random among `flows` installed flows) and/or miss (fresh flows) costs, agent
/// beside xdp_tx_swap. Returns ((agent, swap) hit, (agent, swap) miss) medians.
type HitMiss = ((f64, f64), Option<(f64, f64)>, Vec<String>);

fn hit_and_miss(
    dp: &Dataplane,
    mut src: Source,
    flows: u64,
    miss: bool,
    ingress: u32,
    effort: Effort,
    what: &str,
) -> Result<HitMiss> {
    let mut notes = Vec::new();
    let agent = program(dp, programs::AGENT)?;
    let swap = program(dp, TX_SWAP)?;
    let installed = fill(dp, &mut src, flows, ingress)?;
    if installed != flows {
        notes.push(format!(
            "check failed: {what}: filling {flows} flows counted {installed} misses"
        ));
    }
    src.pick = Pick::Random(flows);
    let before = verdicts(dp)?;
    let m = compare(
        &[
            ("anycast_agent", agent, XDP_TX),
            ("xdp_tx_swap", swap, XDP_TX),
        ],
        &mut src,
        ingress,
        effort,
        what,
    )?;
    let hits = delta(&verdicts(dp)?, &before, verdict::FLOW_HIT);
    let calls = (effort.rounds * effort.batch) as u64;
    if hits != calls {
        notes.push(format!(
            "check failed: {what}: {hits} of {calls} calls were flow-table hits (evictions?)"
        ));
    }
    let hit = (m[0].median(), m[1].median());
    let miss = if miss {
        src.pick = Pick::Fresh;
        src.next = 1 << 40;
        let m = compare(
            &[
                ("anycast_agent", agent, XDP_TX),
                ("xdp_tx_swap", swap, XDP_TX),
            ],
            &mut src,
            ingress,
            effort,
            what,
        )?;
        Some((m[0].median(), m[1].median()))
    } else {
        None
    };
    Ok((hit, miss, notes))
}

/// Part 3: cost as the flow table, the services and the servers grow.
pub fn scale(effort: Effort) -> Result<Section> {
    let mut section = Section::new("scale", "3. Cost as work grows (BPF_PROG_TEST_RUN)");
    section.method = format!(
        "As in part 1 ({} rounds x {} calls per program and point). Flows: the table is \
         filled through the program (one miss per flow), then each call hits a flow drawn \
         at random from all of them; flow map of 1.2M entries for every point. Services: \
         every service 3 servers, 4096 installed flows spread over the services, hits at \
         random among them, misses round-robin over the services; a 4099-entry table for \
         every point of this series (1024 services x 65537-entry tables would need 545 MB \
         of RINGS). Servers: one service with that many servers, 65537-entry table, 4096 \
         flows. Baseline: xdp_tx_swap on the same frames; the 'agent at ...' column \
         compares the agent with itself at the smallest point. Sweep: \
         Dataplane::sweep_flows over the filled table (batch reads of 4096 entries), beside \
         the agent's 1 s sweep interval.",
        effort.rounds, effort.batch
    );
    let ingress = ifindex("fx0")?;
    let template = packets::v4_tcp(CLIENT_V4, 40000, SVC_V4, 80, TCP_ACK);
    let three = [server_v4(1), server_v4(2), server_v4(3)];
    let mut notes = Vec::new();
    let mut data = Vec::new();

    // Flows.
    let flow_points: &[u64] = if effort.quick {
        &[1, 100, 10_000]
    } else {
        &[1, 100, 10_000, 1_000_000]
    };
    let mut first = None;
    for &n in flow_points {
        let sizes = Sizes {
            max_flows: 1_200_000,
            ..Sizes::default()
        };
        let mut dp = dataplane(sizes, &[service("v4", IpAddr::V4(SVC_V4), &three)])?;
        let src = Source::new(template.clone(), vec![], Pick::Same, 7);
        let what = format!("{n} flows");
        let ((a, s), _, n2) = hit_and_miss(&dp, src, n, false, ingress, effort, &what)?;
        notes.extend(n2);
        let base = *first.get_or_insert(a);
        section.rows.push(
            Row::new(format!("hit, {n} flow(s) in the table"), a, "ns")
                .baseline("xdp_tx_swap", s)
                .other("agent at 1 flow", base),
        );
        data.push(json!({"series": "flows", "n": n, "agent_ns": a, "xdp_tx_swap_ns": s}));
        if n >= 10_000 {
            // The agent's sweeper reads the whole table every second (on its own thread).
            let t = Instant::now();
            let removed = dp.sweep_flows(anycast_ctl::dataplane::flow_clock_now())?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if removed != 0 {
                notes.push(format!(
                    "check failed: the sweep of {n} fresh flows removed {removed}"
                ));
            }
            section.rows.push(
                Row::new(
                    format!("sweep of the flow table with {n} flows (nothing expired)"),
                    ms,
                    "ms",
                )
                .baseline("the sweep interval", 1000.0),
            );
        }
    }

    // Services.
    let service_points: &[u32] = if effort.quick {
        &[1, 64]
    } else {
        &[1, 64, 1024]
    };
    let mut first = None;
    for &n in service_points {
        let sizes = Sizes {
            ring_size: 4099,
            max_services: n,
            ..Sizes::default()
        };
        let addrs: Vec<Ipv4Addr> = (0..n)
            .map(|i| Ipv4Addr::new(10, 10, (i >> 8) as u8, (i & 0xff) as u8))
            .collect();
        let services: Vec<DesiredService> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| service(&format!("svc{i}"), IpAddr::V4(*a), &three))
            .collect();
        let t = Instant::now();
        let dp = dataplane(sizes, &services)?;
        let load_secs = t.elapsed().as_secs_f64();
        let dsts = addrs.iter().map(|a| packets::v4_bytes(*a)).collect();
        let src = Source::new(template.clone(), dsts, Pick::Same, 11);
        let what = format!("{n} services");
        let ((ha, hs), miss, n2) = hit_and_miss(&dp, src, 4096, true, ingress, effort, &what)?;
        notes.extend(n2);
        let (ma, ms) = miss.expect("asked for misses");
        let (bh, bm) = *first.get_or_insert((ha, ma));
        section.rows.push(
            Row::new(format!("hit, {n} service(s)"), ha, "ns")
                .baseline("xdp_tx_swap", hs)
                .other("agent at 1 service", bh),
        );
        section.rows.push(
            Row::new(format!("new flow, {n} service(s)"), ma, "ns")
                .baseline("xdp_tx_swap", ms)
                .other("agent at 1 service", bm),
        );
        data.push(
            json!({"series": "services", "n": n, "hit_agent_ns": ha, "hit_swap_ns": hs,
            "miss_agent_ns": ma, "miss_swap_ns": ms, "load_and_install_secs": load_secs}),
        );
    }

    // Servers.
    let server_points: &[u32] = if effort.quick {
        &[3, 100]
    } else {
        &[3, 100, 4096]
    };
    let mut first = None;
    for &n in server_points {
        let servers: Vec<IpAddr> = (1..=n).map(server_v4).collect();
        let dp = dataplane(
            Sizes::default(),
            &[service("v4", IpAddr::V4(SVC_V4), &servers)],
        )?;
        let src = Source::new(template.clone(), vec![], Pick::Same, 13);
        let what = format!("{n} servers");
        let ((ha, hs), miss, n2) = hit_and_miss(&dp, src, 4096, true, ingress, effort, &what)?;
        notes.extend(n2);
        let (ma, ms) = miss.expect("asked for misses");
        let (bh, bm) = *first.get_or_insert((ha, ma));
        section.rows.push(
            Row::new(format!("hit, {n} servers"), ha, "ns")
                .baseline("xdp_tx_swap", hs)
                .other("agent at 3 servers", bh),
        );
        section.rows.push(
            Row::new(format!("new flow, {n} servers"), ma, "ns")
                .baseline("xdp_tx_swap", ms)
                .other("agent at 3 servers", bm),
        );
        data.push(
            json!({"series": "servers", "n": n, "hit_agent_ns": ha, "hit_swap_ns": hs,
            "miss_agent_ns": ma, "miss_swap_ns": ms}),
        );
    }
    section.notes = notes;
    section.data = json!({ "points": data });
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
