//! `cargo xtask demo`: the built-in default topology in network namespaces (two clients, one
//! agent, three servers that register themselves), real connections through the anycast
//! address, the agent's bindings and status. Everything is removed at the end. `--hold` keeps it running until Ctrl-C.
//! `--agents N` (2-4) runs the multi-agent demo instead (`agents.rs`).
mod agents;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context as _};

use anycast_tests::{
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
    for (i, client) in topo
        .clients
        .iter()
        .enumerate()
        .filter(|_| !setup_only && !stopped())
    {
        for v6 in [false, true] {
            let addr = Topology::anycast(v6, HTTP_PORT);
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
                "client c{}: 30 HTTP GETs to {addr} answered by {}; UDP to port {UDP_PORT} answered by {udp_server} from {from}",
                i + 1,
                spread.join(", ")
            );
        }
    }
    println!("\n== anycast-ctl status\n{}", topo.ctl(&["status"])?);
    if hold && !stopped() {
        println!("== holding; namespaces: acdemonet, acdemoag, acdemoc1, acdemoc2, acdemos1..3. Ctrl-C to stop.");
        wait_for_stop();
    }
    println!("== tearing down");
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
