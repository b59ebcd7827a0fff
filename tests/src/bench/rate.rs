//! Part 2a: forwarding rate on veth between two namespaces, on one core.
//!
//! ```text
//!   namespace acbrg                              namespace acbra
//!   generator: live frames on acbg0 ── veth ──── acba0: the agent (or the trivial XDP_TX
//!   sink: XDP_DROP on acbg0, counted                forwarder), native XDP; the FIB sends
//!   by acbg0's rx_packets                           the tunnelled packet back out of acba0
//! ```
//! The generator runs an XDP program (`bench_gen`, of the project's eBPF object) with
//! `BPF_PROG_TEST_RUN` in live-frames mode on acbg0: each frame it writes is transmitted (XDP_TX) to acba0, whose XDP program forwards
//! it back out to acbg0, where the sink drops and counts it. Everything runs on one CPU: a
//! veth schedules its peer's NAPI on the sending CPU, so after each batch the agent's and
//! the sink's NAPI polls run in softirq on the generator's CPU. (Threaded NAPI on a CPU of
//! its own was tried: on this 2-vCPU VM the wake-ups of the NAPI thread made the rates vary
//! by 2x from run to run.) The agent's cost per packet above the trivial forwarder is the
//! difference of the inverse rates, which removes the generator's and the sink's share.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::netns::{veth, Netns};
use anycast_common::programs;
use anycast_ctl::dataplane::Sizes;
use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::ProgramFd;
use serde_json::json;

use super::capture::enter_ns;
use super::live;
use super::packets;
use super::perpacket::{self, dataplane, ifindex, pin_to_cpu, server_v4, service, TX_SWAP};
use super::report::{median, Row, Section};
use crate::packet::{TCP_ACK, TCP_SYN};

const GEN_NS: &str = "acbrg";
const AGENT_NS: &str = "acbra";
const GEN_DEV: &str = "acbg0";
const AGENT_DEV: &str = "acba0";
const GEN_MAC: &str = "02:00:00:00:02:fe";

fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = crate::netns::run("ip", &["-n", ns, "-s", "-j", "link", "show", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("no rx packets counter for {dev}"))
}

struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    started: Instant,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Generator {
    fn start(prog: Arc<ProgramFd>, frame: Vec<u8>, cpu: usize) -> Generator {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            enter_ns(GEN_NS)?;
            pin_to_cpu(cpu);
            let ifindex = ifindex(GEN_DEV)?;
            const REPEAT: u32 = 1 << 14;
            while !s.load(Ordering::Relaxed) {
                live::run_live(prog.as_fd().as_raw_fd(), &frame, ifindex, REPEAT, 64)?;
                n.fetch_add(u64::from(REPEAT), Ordering::Relaxed);
            }
            Ok(())
        });
        Generator {
            stop,
            sent,
            started: Instant::now(),
            thread: Some(thread),
        }
    }

    /// Stops the generator; returns the frames it offered per second.
    fn finish(mut self) -> Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow!("the generator panicked"))??;
        }
        Ok(self.sent.load(Ordering::Relaxed) as f64 / secs)
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn forwarding_rate(quick: bool) -> Result<Section> {
    let gen = Netns::new(GEN_NS)?;
    let ag = Netns::new(AGENT_NS)?;
    veth(&gen, GEN_DEV, &ag, AGENT_DEV, 1500)?;
    gen.ip(&["link", "set", GEN_DEV, "address", GEN_MAC])?;
    ag.ip(&["link", "set", AGENT_DEV, "address", "02:00:00:00:01:01"])?;
    ag.ip(&["addr", "add", "10.9.2.1/24", "dev", AGENT_DEV])?;
    ag.ip(&[
        "neigh",
        "add",
        "10.9.2.254",
        "lladdr",
        GEN_MAC,
        "dev",
        AGENT_DEV,
        "nud",
        "permanent",
    ])?;
    ag.ip(&["route", "add", "10.9.128.0/17", "via", "10.9.2.254"])?;
    ag.sysctl("net.ipv4.ip_forward", "1")?;
    let result = std::thread::spawn(move || measure(quick))
        .join()
        .map_err(|_| anyhow!("the forwarding-rate thread panicked"))?;
    drop(ag);
    drop(gen);
    result
}

fn measure(quick: bool) -> Result<Section> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gen_cpu = cpus - 1;
    // The data plane, in the agent's namespace.
    enter_ns(AGENT_NS)?;
    let three = [server_v4(1), server_v4(2), server_v4(3)];
    let svc_addr = std::net::Ipv4Addr::new(10, 9, 100, 1);
    let mut dp = dataplane(
        Sizes::default(),
        &[service("v4", std::net::IpAddr::V4(svc_addr), &three)],
    )?;
    let agent_fd = perpacket::program(&dp, programs::AGENT)?
        .fd()?
        .try_clone()?;
    let swap_fd = perpacket::program(&dp, TX_SWAP)?.fd()?.try_clone()?;
    let a0 = ifindex(AGENT_DEV)?;
    let link = live::attach_xdp(agent_fd.as_fd().as_raw_fd(), a0, live::XDP_FLAGS_DRV_MODE)?;
    // The sink and the generators, in the generator's namespace.
    enter_ns(GEN_NS)?;
    let g0 = ifindex(GEN_DEV)?;
    let sink = live::load(&mut dp, live::SINK)?;
    let _sink_link = live::attach_xdp(sink.as_fd().as_raw_fd(), g0, live::XDP_FLAGS_DRV_MODE)?;
    let frame = packets::v4_tcp(
        std::net::Ipv4Addr::new(198, 51, 100, 7),
        40000,
        svc_addr,
        80,
        TCP_ACK,
    );
    let syn_frame = packets::v4_tcp(
        std::net::Ipv4Addr::new(198, 51, 100, 7),
        40000,
        svc_addr,
        80,
        TCP_SYN,
    );
    let gen_same = Arc::new(live::load(&mut dp, live::GEN)?);
    let gen_new = Arc::new(live::load(&mut dp, live::GEN_NEW_FLOW)?);
    let mut notes = Vec::new();
    let (rounds, window) = if quick {
        (1, Duration::from_millis(500))
    } else {
        (5, Duration::from_secs(2))
    };
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for (workload, gen_prog, frame) in [
        ("flow-table hit (one flow)", &gen_same, &frame),
        (
            "new flow every packet (random source, ACKs: flows not seen opening)",
            &gen_new,
            &frame,
        ),
        (
            "new flow every packet (random source, SYNs: a SYN flood)",
            &gen_new,
            &syn_frame,
        ),
    ] {
        live::set_frame(&mut dp, frame)?;
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut offered: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for r in 0..rounds {
            for j in 0..2 {
                let v = (j + r) % 2;
                let prog = if v == 0 { &agent_fd } else { &swap_fd }
                    .as_fd()
                    .as_raw_fd();
                live::update_link(&link, prog)?;
                let before = perpacket::verdicts(&dp)?;
                let g = Generator::start(gen_prog.clone(), frame.clone(), gen_cpu);
                std::thread::sleep(Duration::from_millis(if quick { 200 } else { 500 }));
                let (c0, t0) = (rx_packets(GEN_NS, GEN_DEV)?, Instant::now());
                std::thread::sleep(window);
                let (c1, t1) = (rx_packets(GEN_NS, GEN_DEV)?, Instant::now());
                offered[v].push(g.finish()?);
                let rate = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
                rates[v].push(rate);
                let after = perpacket::verdicts(&dp)?;
                let tx = after[anycast_common::verdict::TX as usize]
                    - before[anycast_common::verdict::TX as usize];
                if v == 0 && tx == 0 {
                    bail!("the agent forwarded nothing ({workload}): check the setup");
                }
                let stats = |ns: &str, dev: &str| -> serde_json::Value {
                    crate::netns::run("ip", &["-n", ns, "-s", "-j", "link", "show", dev])
                        .ok()
                        .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                        .map(|v| v[0]["stats64"].clone())
                        .unwrap_or_default()
                };
                data.push(json!({"workload": workload,
                    "link_stats": {"gen": stats(GEN_NS, GEN_DEV), "agent": stats(AGENT_NS, AGENT_DEV)},
                    "program": if v == 0 { "anycast_agent" } else { "xdp_tx_swap" },
                    "delivered_pps": rate, "offered_pps": offered[v].last(),
                    "agent_tx_verdicts": tx}));
            }
        }
        let (a, s) = (median(&rates[0]), median(&rates[1]));
        let (oa, os) = (median(&offered[0]), median(&offered[1]));
        rows.push(
            Row::new(format!("packets/s through the agent, {workload}"), a, "pps")
                .baseline("trivial XDP_TX forwarder (xdp_tx_swap)", s),
        );
        let extra = 1e9 / a - 1e9 / s;
        rows.push(
            Row::new(
                format!("agent's cost per packet above the trivial forwarder, {workload}"),
                extra,
                "ns",
            )
            .baseline(
                "whole one-core pipeline per packet with the trivial forwarder",
                1e9 / s,
            ),
        );
        notes.push(format!(
            "{workload}: the generator offered {:.2} Mpps with the agent and {:.2} Mpps with \
             the trivial forwarder (it shares the core, so it slows down as the forwarder \
             costs more); per-round rates in the JSON",
            oa / 1e6,
            os / 1e6
        ));
    }
    drop(link);
    let mut section = Section::new("rate", "2. Forwarding rate and TCP throughput");
    section.method = format!(
        "Forwarding rate: veth acbg0 (namespace acbrg) <-> acba0 (acbra). An XDP \
         program on acbg0 (bench_gen), run with BPF_PROG_TEST_RUN in live-frames mode (batches of 64), \
         writes a 78-byte IPv4 TCP frame to the anycast service and transmits it to acba0; \
         acba0 runs the agent (native XDP; the FIB sends the tunnelled packet back out of \
         acba0: XDP_TX) or, as the baseline, xdp_tx_swap, swapped in place on the same XDP \
         link; acbg0 drops what comes back (XDP_DROP) and its rx_packets counter gives the \
         rate over {} s windows after a warm-up; {} round(s) alternating agent and \
         baseline, median. One core for everything: generator, agent and sink run on CPU \
         {gen_cpu} (a veth runs its peer's NAPI on the sending CPU), so the rates are those \
         of the whole pipeline; the agent's own cost is the difference of the inverse rates. \
         The new-flow workloads randomize the client address and port of every frame: with \
         ACKs, each is a flow not seen opening, pinned within the per-CPU budget \
         (`unseen_pins_per_second`, 20 000 by default) and forwarded unpinned beyond it; with \
         SYNs, none is pinned (each overwrites an `EMBRYOS` slot).",
        window.as_secs_f64(),
        rounds
    );
    section.rows = rows;
    section.notes = notes;
    section.data = json!({"forwarding": data});
    Ok(section)
}
