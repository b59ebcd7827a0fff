//! The flow table as the controller sees it: listed (in batches), and swept of idle and
//! closed entries.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use anycast_common::{flow_ticks, verdict, PROTO_TCP, PROTO_UDP};
use anycast_ctl::dataplane::{flow_clock_now, Dataplane, FlowTimeouts};
use anycast_tests::packet::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST};
use anyhow::Result;

use crate::aging::{aging_services, AGING_ADDR};
use crate::harness::*;

#[test]
fn sweeping_deletes_idle_and_closed_entries_and_keeps_active_ones() -> Result<()> {
    let mut h = Harness::new()?;
    h.dataplane.apply(&aging_services(&[SERVER_A, SERVER_B]))?;
    let udp = Flow::v4(AGING_ADDR, PROTO_UDP, 25000, 53);
    let open = Flow::v4(AGING_ADDR, PROTO_TCP, 25001, 80);
    let fin = Flow::v4(AGING_ADDR, PROTO_TCP, 25002, 80);
    let rst = Flow::v4(AGING_ADDR, PROTO_TCP, 25003, 80);
    send(&h, &udp, 0)?;
    send(&h, &open, TCP_PSH | TCP_ACK)?;
    send(&h, &fin, TCP_PSH | TCP_ACK)?;
    send(&h, &fin, TCP_FIN | TCP_ACK)?;
    send(&h, &rst, TCP_RST)?;
    let now = flow_clock_now();
    let listed = |dp: &Dataplane| -> Result<Vec<u16>> {
        let mut ports: Vec<u16> = dp.flows()?.iter().map(|f| f.client_port).collect();
        ports.sort();
        Ok(ports)
    };
    assert_eq!(listed(&h.dataplane)?, [25000, 25001, 25002, 25003]);
    let table = flow_table(&h.dataplane)?;
    let e = entry(&table, &open).expect("listed");
    assert_eq!(e.address, AGING_ADDR.parse::<IpAddr>()?);
    assert_eq!((e.port, e.protocol.as_str()), (80, "tcp"));
    assert_eq!(e.service.as_deref(), Some("aging-tcp"));
    assert!(e
        .server
        .is_some_and(|s| addrs(&[SERVER_A, SERVER_B]).contains(&s)));
    assert!(e.age <= 1 && !e.closing && !e.expired, "{e:?}");

    // A sweep whose clock reading is older than the entries' last packets (a sweep spans
    // ticks; the data path refreshes entries meanwhile) deletes none of them.
    assert_eq!(
        h.dataplane.sweep_flows(now.wrapping_sub(1))?,
        0,
        "entries seen after the sweep's clock reading are live"
    );
    assert_eq!(listed(&h.dataplane)?, [25000, 25001, 25002, 25003]);

    // Default timeouts: TCP 300 s, UDP 30 s, closing 10 s, in ticks of the flow clock (an
    // entry's last tick may be `now` or, if the clock ticked meanwhile, `now - 1`).
    assert_eq!(
        h.dataplane.sweep_flows(now)?,
        0,
        "nothing is past its timeout yet"
    );
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(10) - 1)?, 0);
    assert_eq!(
        h.dataplane.sweep_flows(now + flow_ticks(10) + 1)?,
        2,
        "the closed entries go after 10 s"
    );
    assert_eq!(listed(&h.dataplane)?, [25000, 25001]);
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(30) - 1)?, 0);
    assert_eq!(
        h.dataplane.sweep_flows(now + flow_ticks(30) + 1)?,
        1,
        "the UDP entry goes after 30 s"
    );
    assert_eq!(listed(&h.dataplane)?, [25001]);
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(300) - 1)?, 0);
    assert_eq!(listed(&h.dataplane)?, [25001]);

    // The sweep follows the timeouts the data path has.
    h.dataplane.set_flow_timeouts(FlowTimeouts {
        tcp_idle: 5,
        ..FlowTimeouts::default()
    })?;
    assert_eq!(h.dataplane.sweep_flows(now + flow_ticks(5) - 1)?, 0);
    assert_eq!(
        h.dataplane.sweep_flows(now + flow_ticks(5) + 1)?,
        1,
        "TCP idle after 5 s"
    );
    assert!(listed(&h.dataplane)?.is_empty());

    // A swept flow's next packet is a plain miss (there is no entry left to expire).
    let (_, delta) = counting(&h.dataplane, || send(&h, &udp, 0))?;
    assert_eq!(delta[verdict::FLOW_MISS as usize], 1);
    assert_eq!(delta[verdict::FLOW_EXPIRED as usize], 0);
    assert_eq!(listed(&h.dataplane)?, [25000]);
    Ok(())
}

/// IPv4 and IPv6 flows are listed with their addresses, ports and servers, and swept.
#[test]
fn ipv4_and_ipv6_flows_are_listed_and_swept() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = h.dataplane;
    let mut both = web_and_dns();
    both.extend(web6());
    dp.apply(&both)?;
    let v4 = Flow::v4("192.0.2.10", PROTO_TCP, 41020, 80);
    let v6 = Flow::v6("2001:db8::10", PROTO_TCP, 41021, 443);
    for f in [&v4, &v6] {
        let (action, _) = run_xdp(&dp, h.fx0, &client_frame(None, &ip_packet(f)))?;
        assert_eq!(action, XDP_TX, "{f:?}");
    }
    let listed: BTreeMap<u16, (IpAddr, IpAddr, u16, Option<IpAddr>)> = dp
        .flows()?
        .into_iter()
        .map(|f| (f.client_port, (f.client, f.address, f.port, f.server)))
        .collect();
    assert_eq!(
        listed,
        BTreeMap::from([
            (
                41020,
                (
                    IpAddr::V4(CLIENT_V4),
                    "192.0.2.10".parse()?,
                    80,
                    Some("10.9.2.11".parse()?)
                )
            ),
            (
                41021,
                (
                    IpAddr::V6(CLIENT_V6),
                    "2001:db8::10".parse()?,
                    443,
                    Some("fd09:2::11".parse()?)
                )
            ),
        ])
    );
    let now = flow_clock_now();
    assert_eq!(dp.sweep_flows(now)?, 0);
    assert_eq!(
        dp.sweep_flows(now + flow_ticks(300) + 1)?,
        2,
        "one per table"
    );
    assert!(dp.flows()?.is_empty());
    Ok(())
}

/// The flow table is read in batches of 4096 entries: a table of 10 000 flows is listed
/// whole, each flow once, and swept whole.
#[test]
fn large_flow_tables_are_listed_and_swept_whole() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = new_dataplane_with_flows(h.fy0, 16384)?;
    dp.apply(&web_and_dns())?;
    let n: u32 = 10_000;
    for i in 0..n {
        let flow = Flow {
            src: IpAddr::V4(Ipv4Addr::from(0xc633_0000 | (i >> 8))),
            ..Flow::v4("192.0.2.10", PROTO_UDP, 20000 + (i & 0xff) as u16, 53)
        };
        let (action, _) = run_xdp(&dp, h.fx0, &client_frame(None, &ip_packet(&flow)))?;
        assert_eq!(action, XDP_TX);
    }
    let listed: BTreeSet<(IpAddr, u16)> = dp
        .flows()?
        .iter()
        .map(|f| (f.client, f.client_port))
        .collect();
    assert_eq!(listed.len(), n as usize, "every flow listed once");
    assert_eq!(dp.flows()?.len(), n as usize, "and nothing twice");
    let now = flow_clock_now();
    assert_eq!(dp.sweep_flows(now)?, 0);
    assert_eq!(dp.sweep_flows(now + flow_ticks(30) + 1)?, n as usize);
    assert!(dp.flows()?.is_empty());
    Ok(())
}
