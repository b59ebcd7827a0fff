//! Part 3: how the per-packet cost grows with the number of flows, services and servers.
use super::*;

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
        let row = Row::new(format!("hit, {n} flow(s) in the table"), a, "ns")
            .baseline("xdp_tx_swap", s)
            .other("agent at 1 flow", base);
        // The goal for hits spread over a million flows: own cost (less xdp_tx_swap).
        section.rows.push(if n == 1_000_000 {
            row.target("own cost <= 300 ns", a - s <= 300.0)
        } else {
            row
        });
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
