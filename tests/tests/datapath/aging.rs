//! Flow aging and TCP close: idle flows past their timeout, and closed ones, are chosen
//! again by the current table; active ones stay.
use std::net::IpAddr;

use anycast_common::{verdict, PROTO_TCP, PROTO_UDP};
use anycast_ctl::dataplane::{flow_clock_now, DesiredService, FlowTimeouts};
use anycast_tests::packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use anyhow::{anyhow, Result};

use crate::harness::*;

fn flows_from(dst: &str, proto: u8, first_port: u16, n: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            Flow::v4(
                dst,
                proto,
                first_port + i,
                if proto == PROTO_TCP { 80 } else { 53 },
            )
        })
        .collect()
}

/// After a change of table from `before` servers to `before` + `added`, a re-chosen flow
/// either stays or goes to an added server (the table's minimal disruption); checks that,
/// and that at least one went to an added server. Returns how many moved.
fn check_rechosen(what: &str, old: &[IpAddr], new: &[IpAddr], added: &str) -> usize {
    let added: IpAddr = added.parse().unwrap();
    let mut moved = 0;
    for (i, (o, n)) in old.iter().zip(new).enumerate() {
        if o != n {
            assert_eq!(
                *n, added,
                "{what}: flow {i} moved from {o} to {n}, not to the new server"
            );
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "{what}: no flow went to the new server {added}, so re-choosing is not shown"
    );
    moved
}

pub const AGING_ADDR: &str = "192.0.2.90";

pub fn aging_services(servers: &[&str]) -> Vec<DesiredService> {
    let servers: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
    vec![
        service("aging-tcp", AGING_ADDR, PROTO_TCP, 80, &servers),
        service("aging-udp", AGING_ADDR, PROTO_UDP, 53, &servers),
    ]
}

#[test]
fn idle_flows_past_their_timeout_are_rechosen_and_active_ones_stay() -> Result<()> {
    let mut h = Harness::new()?;
    let three = [SERVER_A, SERVER_B, SERVER_D];
    let four = [SERVER_A, SERVER_B, SERVER_D, SERVER_C];
    let udp = flows_from(AGING_ADDR, PROTO_UDP, 21000, 60);
    let tcp_open = flows_from(AGING_ADDR, PROTO_TCP, 22000, 60);
    let tcp_closing = flows_from(AGING_ADDR, PROTO_TCP, 23000, 60);

    h.dataplane.apply(&aging_services(&three))?;
    let t_before = flow_clock_now();
    let udp_first = send_all(&h, &udp, 0)?;
    let open_first = send_all(&h, &tcp_open, TCP_ACK)?;
    let closing_first = send_all(&h, &tcp_closing, TCP_ACK)?;
    send_all(&h, &tcp_closing, TCP_FIN | TCP_ACK)?;
    let t_after = flow_clock_now();

    // The data path's clock is the one the controller reads.
    let table = flow_table(&h.dataplane)?;
    for f in udp.iter().chain(&tcp_open).chain(&tcp_closing) {
        let e = entry(&table, f).ok_or_else(|| anyhow!("{f:?}: no flow-table entry"))?;
        assert!(
            (t_before..=t_after).contains(&e.last_seen),
            "{f:?}: last_seen {} outside the controller's clock {t_before}..={t_after}",
            e.last_seen
        );
    }

    // A fourth server: pinned flows stay (default timeouts, nothing expires).
    h.dataplane.apply(&aging_services(&four))?;
    let ((udp_second, open_second, closing_second), delta) = counting(&h.dataplane, || {
        Ok((
            send_all(&h, &udp, 0)?,
            send_all(&h, &tcp_open, TCP_ACK)?,
            send_all(&h, &tcp_closing, TCP_ACK)?,
        ))
    })?;
    assert_eq!(udp_second, udp_first, "UDP flows keep their servers");
    assert_eq!(open_second, open_first, "TCP flows keep their servers");
    assert_eq!(
        closing_second, closing_first,
        "closing TCP flows keep their servers"
    );
    assert_eq!(delta[verdict::FLOW_HIT as usize], 180, "all hits");
    assert_eq!(delta[verdict::FLOW_EXPIRED as usize], 0, "none expired");

    // UDP and closing entries time out after 0 s (that is: in the next second), open TCP
    // flows keep 300 s. One tick of the clock later:
    h.dataplane.set_flow_timeouts(FlowTimeouts {
        tcp_idle: 300,
        udp_idle: 0,
        tcp_closing: 0,
    })?;
    let last = flow_table(&h.dataplane)?
        .values()
        .map(|e| e.last_seen)
        .max()
        .unwrap_or(0);
    for e in flow_table(&h.dataplane)?.values() {
        let timeout = match (e.protocol.as_str(), e.closing) {
            ("tcp", false) => 300,
            _ => 0,
        };
        assert_eq!(
            e.expired,
            e.age > timeout,
            "{e:?}: expired means older than the timeout"
        );
    }
    wait_past(last);
    let table = flow_table(&h.dataplane)?;
    for f in &udp {
        assert!(
            entry(&table, f).is_some_and(|e| e.expired),
            "{f:?} is reported expired"
        );
    }
    for f in &tcp_open {
        assert!(
            entry(&table, f).is_some_and(|e| !e.expired),
            "{f:?} is not expired"
        );
    }
    let ((udp_third, open_third, closing_third), delta) = counting(&h.dataplane, || {
        Ok((
            send_all(&h, &udp, 0)?,
            send_all(&h, &tcp_open, TCP_ACK)?,
            send_all(&h, &tcp_closing, TCP_ACK)?,
        ))
    })?;
    assert_eq!(
        delta[verdict::FLOW_EXPIRED as usize],
        120,
        "the UDP and the closing TCP entries ended"
    );
    assert_eq!(
        delta[verdict::FLOW_MISS as usize],
        120,
        "expired entries count as misses"
    );
    assert_eq!(
        delta[verdict::FLOW_HIT as usize],
        60,
        "the open TCP flows are hits"
    );
    assert_eq!(
        open_third, open_first,
        "open TCP flows stay on their servers"
    );
    let moved = check_rechosen("idle UDP flows", &udp_first, &udp_third, SERVER_C);
    eprintln!(
        "{moved} of {} idle UDP flows were re-chosen onto the new server",
        udp.len()
    );
    let moved = check_rechosen("closed TCP flows", &closing_first, &closing_third, SERVER_C);
    eprintln!(
        "{moved} of {} closed TCP flows were re-chosen onto the new server",
        tcp_closing.len()
    );

    // The entries were overwritten (and refreshed): seen in the new second, not closing.
    let table = flow_table(&h.dataplane)?;
    for f in udp.iter().chain(&tcp_open).chain(&tcp_closing) {
        let e = entry(&table, f).ok_or_else(|| anyhow!("{f:?}: no flow-table entry"))?;
        assert!(
            e.last_seen > last,
            "{f:?}: last_seen {} not refreshed past {last}",
            e.last_seen
        );
        assert!(!e.closing, "{f:?}: a re-chosen entry starts open");
    }
    Ok(())
}

#[test]
fn fin_and_rst_close_a_flow_and_a_syn_on_a_closed_flow_starts_a_new_one() -> Result<()> {
    let mut h = Harness::new()?;
    let three = [SERVER_A, SERVER_B, SERVER_D];
    let four = [SERVER_A, SERVER_B, SERVER_D, SERVER_C];
    h.dataplane.apply(&aging_services(&three))?;
    let fin = flows_from(AGING_ADDR, PROTO_TCP, 24000, 40);
    let rst = flows_from(AGING_ADDR, PROTO_TCP, 24100, 40);
    let open = flows_from(AGING_ADDR, PROTO_TCP, 24200, 40);
    let all: Vec<Flow> = fin.iter().chain(&rst).chain(&open).copied().collect();

    let (first, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_SYN))?;
    assert_eq!(
        delta[verdict::FLOW_MISS as usize],
        120,
        "SYNs of new flows are misses"
    );
    // SYNs are not pinned (a SYN flood must not evict pinned flows): the first ACK pins
    // each flow to its SYN's server.
    let (second, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_ACK))?;
    assert_eq!(second, first);
    assert_eq!(delta[verdict::FLOW_PROMOTED as usize], 120);
    let (third, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_ACK))?;
    assert_eq!(third, first);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 120);
    let table = flow_table(&h.dataplane)?;
    assert!(
        all.iter()
            .all(|f| entry(&table, f).is_some_and(|e| !e.closing)),
        "no entry is closing before a FIN or RST"
    );

    let (closed, delta) = counting(&h.dataplane, || {
        let mut v = send_all(&h, &fin, TCP_FIN | TCP_ACK)?;
        v.extend(send_all(&h, &rst, TCP_RST)?);
        Ok(v)
    })?;
    assert_eq!(
        closed,
        first[..80],
        "a FIN or RST goes to the flow's server"
    );
    assert_eq!(delta[verdict::FLOW_HIT as usize], 80);
    let table = flow_table(&h.dataplane)?;
    for f in fin.iter().chain(&rst) {
        assert!(
            entry(&table, f).is_some_and(|e| e.closing),
            "{f:?}: closing after FIN/RST"
        );
    }
    for f in &open {
        assert!(
            entry(&table, f).is_some_and(|e| !e.closing),
            "{f:?}: still open"
        );
    }

    // The closing flows' last packets (the client's final ACK; a SYN-ACK, which no client
    // sends, is not a new connection either) still go to their server, and stay closing.
    let (after_close, delta) = counting(&h.dataplane, || {
        let mut v = send_all(&h, &fin, TCP_ACK)?;
        v.extend(send_all(&h, &rst[..1], TCP_SYN | TCP_ACK)?);
        Ok(v)
    })?;
    assert_eq!(after_close, first[..41]);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 41);
    let table = flow_table(&h.dataplane)?;
    assert!(
        fin.iter()
            .chain(&rst)
            .all(|f| entry(&table, f).is_some_and(|e| e.closing)),
        "closing is kept until the entry ends"
    );

    // A new table, then a SYN on every flow. SYNs never read the flow table: all go by the
    // new table and are remembered in `EMBRYOS`; the closing entries are still there.
    h.dataplane.apply(&aging_services(&four))?;
    let (reopened, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_SYN))?;
    assert_eq!(delta[verdict::FLOW_MISS as usize], 120);
    assert_eq!(delta[verdict::FLOW_EMBRYO as usize], 120);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 0, "a SYN reads no entry");
    let moved = check_rechosen(
        "SYN on closed flows",
        &first[..80],
        &reopened[..80],
        SERVER_C,
    );
    eprintln!("{moved} of 80 reused 5-tuples went to the new server");
    let table = flow_table(&h.dataplane)?;
    assert!(
        fin.iter()
            .chain(&rst)
            .all(|f| entry(&table, f).is_some_and(|e| e.closing)),
        "the SYNs left the closing entries alone"
    );

    // The ACKs: on a closing entry with a new handshake in its slot, the entry ends and the
    // flow is pinned to its SYN's server; open entries are hits on their old servers.
    let (acked, delta) = counting(&h.dataplane, || send_all(&h, &all, TCP_ACK))?;
    assert_eq!(
        acked[..80],
        reopened[..80],
        "the handshakes complete on their SYNs' servers"
    );
    assert_eq!(acked[80..], first[80..], "open flows keep their servers");
    assert_eq!(
        delta[verdict::FLOW_EXPIRED as usize],
        80,
        "the closed entries ended"
    );
    assert_eq!(delta[verdict::FLOW_PROMOTED as usize], 80);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 40);
    // Control: with the new table some of the open flows would move.
    let mut fresh = Harness::new()?;
    fresh.dataplane.apply(&aging_services(&four))?;
    let unpinned = send_all(&fresh, &open, TCP_ACK)?;
    assert_ne!(
        unpinned,
        first[80..],
        "control: the new table moves some open flows"
    );
    drop(fresh);
    let table = flow_table(&h.dataplane)?;
    assert!(
        all.iter()
            .all(|f| entry(&table, f).is_some_and(|e| !e.closing)),
        "new flows start open"
    );
    // The promotion consumed the slots: the next FIN closes the new flows, and their last
    // ACKs stay on their servers (no stale handshake ends the entries again).
    send_all(&h, &fin, TCP_FIN | TCP_ACK)?;
    let (last, delta) = counting(&h.dataplane, || send_all(&h, &fin, TCP_ACK))?;
    assert_eq!(last, reopened[..40]);
    assert_eq!(delta[verdict::FLOW_EXPIRED as usize], 0);
    assert_eq!(delta[verdict::FLOW_HIT as usize], 40);

    // A FIN of a flow the table does not know starts its entry closing.
    let stray = Flow::v4(AGING_ADDR, PROTO_TCP, 24300, 80);
    send(&h, &stray, TCP_FIN | TCP_ACK)?;
    let table = flow_table(&h.dataplane)?;
    assert!(
        entry(&table, &stray).is_some_and(|e| e.closing),
        "a stray FIN's entry is closing"
    );
    Ok(())
}
