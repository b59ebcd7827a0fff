//! Traffic counters per service and per server.
use std::collections::BTreeMap;

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anyhow::Result;

use crate::harness::*;

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
