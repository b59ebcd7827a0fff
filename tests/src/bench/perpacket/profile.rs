//! The program's size and run-time statistics (`bpf_stats`): part of the per-packet profile.
use super::*;

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
