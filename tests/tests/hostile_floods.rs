//! Floods at the registration port, end to end in network namespaces: 20 s each of garbage
//! and of well-formed forged binding updates (signed with the wrong key), from one source,
//! from 1 000 spoofed sources and spoofing the servers' own addresses, at 100 000 datagrams
//! a second, while a client connects continuously and a server (the test itself, as s3)
//! refreshes every 200 ms. Every datagram reaches the agent's socket (correct UDP checksums)
//! and is counted; every refresh is acknowledged; no binding is lost or flaps, no refresh
//! request goes unanswered, no client connection fails, the agent's memory stays bounded.
//! Prints the rates reached, the agent's CPU and memory and the refresh round trips.
//!
//! The topology, the floods and the measurements are `anycast_tests::floods`, which the
//! bench's floods part reports from. Runs as root.
use std::time::{Duration, Instant};

use anycast_tests::floods::{FloodedAgent, AT_LEAST, PACE};

const FLOOD: Duration = Duration::from_secs(20);

#[test]
fn registration_floods_lose_no_binding_refresh_or_connection() -> anyhow::Result<()> {
    // s1 and s2 run the server daemon; the test itself is s3, refreshing every 200 ms and
    // timing each acknowledgement.
    let agent = FloodedAgent::start("acfl")?;
    for flood in agent.kinds() {
        let what = flood.what;
        let f = agent.measure(flood, PACE, FLOOD)?;
        println!("{f}");
        for now in &f.changed_states {
            assert_eq!(now, &agent.states, "{what}: no binding lost or flapping");
        }
        if let Some(e) = f.unanswered.first() {
            panic!("{what}: a refresh of s3 was not acknowledged: {e}");
        }
        assert!(
            f.round_trips.len() >= 50,
            "{what}: s3 refreshed: {}",
            f.round_trips.len()
        );
        assert!(
            f.rate() >= AT_LEAST,
            "{what}: the flood reached {:.0}/s",
            f.rate()
        );
        assert_eq!(
            f.probes_missed, 0,
            "{what}: every refresh request was answered"
        );
        assert!(
            f.counted as f64 >= f.sent as f64 * 0.99,
            "{what}: the agent counted {} of {} datagrams",
            f.counted,
            f.sent
        );
        assert!(
            f.probes >= 2 * 20,
            "{what}: refresh requests went out: {}",
            f.probes
        );
        assert!(
            f.rss_max_kib < 200 * 1024,
            "{what}: agent memory stays bounded: {} KiB",
            f.rss_max_kib
        );
    }
    let connections = agent.load.since(Instant::now() - Duration::from_secs(200));
    let failed: Vec<_> = connections.iter().filter(|(_, r)| r.is_err()).collect();
    println!(
        "client connections: {} ({} failed)",
        connections.len(),
        failed.len()
    );
    assert!(connections.len() > 100, "the client connected throughout");
    assert!(failed.is_empty(), "no client connection failed: {failed:?}");
    Ok(())
}
