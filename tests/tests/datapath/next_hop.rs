//! The next-hop cache: the FIB's answer per server for the current tick of the flow clock.
use std::time::{Duration, Instant};

use anycast_common::{verdict, PROTO_TCP};
use anycast_ctl::dataplane::{flow_clock_now, Dataplane};
use anycast_tests::packet::mac_str;
use anyhow::Result;

use crate::harness::*;

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
    // Without DF, so that it is dropped rather than answered (too_big.rs).
    let over_mtu = big_packet_no_df(&flow, 1481);
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
