//! `cargo xtask demo`: the built-in default topology in network namespaces (two clients, one
//! agent, three servers that register themselves), real connections through the anycast
//! address, the agent's bindings and status. Client c1 runs the route optimization daemon
//! (`anycast-ctl client`, trusting the demo operator's key; the servers hold certificates)
//! and is bound to its server directly after its first connection; c2 does not and stays
//! on the agent's path. Everything is removed at the end. `--hold` keeps it running until Ctrl-C.
//! `--agents N` (2-4) runs the multi-agent demo instead (`agents.rs`).
mod agents;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context as _};

use anycast_tests::{
    route_opt,
    topology::{http_get, udp_ask, ServerMode, Topology, HTTP_PORT, UDP_PORT},
    wait_until,
};

fn main() -> anyhow::Result<()> {
    let hold = std::env::args().any(|a| a == "--hold");
    let setup_only = std::env::args().any(|a| a == "--setup-only");
    let args: Vec<String> = std::env::args().collect();
    let agents = match args.iter().position(|a| a == "--agents") {
        Some(i) => Some(
            args.get(i + 1)
                .and_then(|n| n.parse::<usize>().ok())
                .context("--agents N: a number")?,
        ),
        None => None,
    };
    // Ctrl-C must not skip the teardown: note it and stop at the next step.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Some(n) = agents {
        if !(2..=4).contains(&n) {
            bail!("--agents: 2 to 4 agents");
        }
        return agents::run(n, hold, stopped, wait_for_stop);
    }
    println!(
        "== building the demo topology (namespaces acdemo*: 2 clients, agent, router, 3 servers)"
    );
    let mut topo = Topology::build(
        "acdemo",
        2,
        3,
        ServerMode::Registering { lifetime_secs: 20 },
    )?;
    // The operator's trust anchor and a certificate per server, for route optimization.
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 3)?;
    topo.server_args = route_opt::server_args(&dir, 60);
    // No server is configured on the agent: it only knows who may register for what.
    topo.start_agent(0)?;
    println!("== agent running in native XDP mode, no servers configured; starting the servers");
    for i in 0..topo.servers.len() {
        topo.start_server(i)?;
    }
    wait_until(
        "all three servers registered",
        Duration::from_secs(30),
        || Ok(topo.active_servers()?.len() == 3),
    )?;
    println!("== the servers registered themselves (authenticated binding updates):\n");
    println!("{}", topo.ctl(&["bindings"])?);
    // c1 takes part in route optimization; c2 does not.
    let mut daemon = route_opt::start_client(&topo.clients[0], &dir, 1, &[])?;
    println!(
        "== client c1 runs `anycast-ctl client --trust operator.pub` (route optimization); \
         c2 does not"
    );
    for (i, client) in topo
        .clients
        .iter()
        .enumerate()
        .filter(|_| !setup_only && !stopped())
    {
        for v6 in [false, true] {
            let addr = Topology::anycast(v6, HTTP_PORT);
            if i == 0 {
                // c1: its first connection goes through the agent; its server sees a new
                // client and sends it a signed binding; the rest go straight to the server.
                let first = client.in_ns(move || http_get(addr))?;
                let service = format!("{} tcp/{HTTP_PORT}", addr.ip());
                let asked = std::time::Instant::now();
                let mut bound = None;
                wait_until("c1 bound to a server", Duration::from_secs(10), || {
                    let s = route_opt::client_status(&dir, 1)?;
                    bound = s["bindings"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|b| b["service"] == service.as_str())
                        .map(|b| {
                            (
                                b["server"].as_str().unwrap_or("?").to_string(),
                                b["real"].as_str().unwrap_or("?").to_string(),
                            )
                        });
                    Ok(bound.is_some())
                })?;
                let (server, real) = bound.unwrap_or_default();
                let took = asked.elapsed();
                let via_agent = route_opt::agent_packets(&topo, None)?;
                let seen = client.in_ns(move || {
                    let mut seen = BTreeMap::<String, u32>::new();
                    for _ in 0..29 {
                        *seen.entry(http_get(addr)?).or_default() += 1;
                    }
                    Ok(seen)
                })?;
                let through_agent = route_opt::agent_packets(&topo, None)? - via_agent;
                let spread: Vec<String> = seen.iter().map(|(s, n)| format!("{s}: {n}")).collect();
                println!(
                    "client c1 (route-optimized): the first GET to {addr} went through the agent \
                     (answered by {first}); {server} bound c1 to its real address {real} \
                     within {took:.1?}; the next 29 GETs answered by {}, the agent forwarding \
                     {through_agent} packets of them",
                    spread.join(", ")
                );
                continue;
            }
            let answers = client.in_ns(move || {
                let mut seen = BTreeMap::<String, u32>::new();
                for _ in 0..30 {
                    *seen.entry(http_get(addr)?).or_default() += 1;
                }
                let (udp_server, from) = udp_ask(Topology::anycast(v6, UDP_PORT))?;
                Ok((seen, udp_server, from))
            })?;
            let (seen, udp_server, from) = answers;
            let spread: Vec<String> = seen.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!(
                "client c{} (through the agent): 30 HTTP GETs to {addr} answered by {}; UDP to port {UDP_PORT} answered by {udp_server} from {from}",
                i + 1,
                spread.join(", ")
            );
        }
    }
    let c1 = route_opt::client_status(&dir, 1)?;
    println!(
        "\n== client c1's bindings (taken from its servers, checked against the operator's key):"
    );
    for b in c1["bindings"].as_array().into_iter().flatten() {
        println!(
            "  {} -> {} at its real address {}",
            b["service"].as_str().unwrap_or("?"),
            b["server"].as_str().unwrap_or("?"),
            b["real"].as_str().unwrap_or("?")
        );
    }
    let t = &c1["tunnel"];
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    println!(
        "  c1's packets sent straight to a server: {}; left to the agent: {} (not bound yet) + \
         {} (connections opened before the binding)",
        n("tunnelled") + n("tunnelled_resolving"),
        n("pass_not_bound"),
        n("pass_opened_before")
    );
    println!("  c2 runs no daemon: every one of its packets went through the agent.");
    println!("\n== anycast-ctl status\n{}", topo.ctl(&["status"])?);
    if hold && !stopped() {
        println!("== holding; namespaces: acdemonet, acdemoag, acdemoc1, acdemoc2, acdemos1..3. Ctrl-C to stop.");
        wait_for_stop();
    }
    println!("== tearing down");
    let _ = daemon.stop_with(libc::SIGTERM, Duration::from_secs(5));
    drop(topo);
    Ok(())
}

fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Waits for SIGINT/SIGTERM (a handler, not a blocked mask, which children would inherit).
fn wait_for_stop() {
    while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
}
