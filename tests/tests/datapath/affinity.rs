//! Flow affinity: established flows keep their server when servers are added, drained or
//! removed; the consistent-hash tables the data path reads.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use anycast_common::{verdict, PROTO_TCP};
use anycast_ctl::dataplane::{Dataplane, DesiredService};
use anycast_tests::packet::hex;
use anyhow::{bail, Result};

use crate::harness::*;

const SERVICE_ADDR: &str = "192.0.2.80";
const FLOWS: u16 = 200;

fn affinity_service(servers: &[&str]) -> Vec<DesiredService> {
    let servers: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
    vec![service("sticky", SERVICE_ADDR, PROTO_TCP, 80, &servers)]
}

/// Flow `i` of a batch of [`FLOWS`] flows whose source ports start at `first_port`.
fn affinity_flow(first_port: u16, i: u16) -> Flow {
    Flow::v4(SERVICE_ADDR, PROTO_TCP, first_port + i, 80)
}

/// Sends one packet of each of the flows and returns the outer destination of each.
fn destinations(dp: &Dataplane, ingress: u32, first_port: u16) -> Result<Vec<Ipv4Addr>> {
    let mut dsts = Vec::new();
    for i in 0..FLOWS {
        let flow = affinity_flow(first_port, i);
        let input = client_frame(None, &ip_packet(&flow));
        let (action, out) = run_xdp(dp, ingress, &input)?;
        if action != XDP_TX && action != XDP_REDIRECT {
            bail!(
                "flow {i} ({flow:?}): expected XDP_TX or XDP_REDIRECT, got {}",
                action_name(action)
            );
        }
        if out.len() < 34 || out[12..14] != [0x08, 0x00] || out[14] != 0x45 || out[23] != 4 {
            bail!("flow {i}: not an IPv4-in-IPv4 frame:\n{}", hex(&out));
        }
        dsts.push(Ipv4Addr::new(out[30], out[31], out[32], out[33]));
    }
    Ok(dsts)
}

#[test]
fn flows_keep_their_server_when_a_server_is_added() -> Result<()> {
    let mut h = Harness::new()?;
    let three = ["10.9.2.11", "10.9.2.12", "10.9.3.11"];
    let four = ["10.9.2.11", "10.9.2.12", "10.9.3.11", "10.9.2.13"];

    h.dataplane.apply(&affinity_service(&three))?;
    let first = destinations(&h.dataplane, h.fx0, 20000)?;
    let used: BTreeSet<Ipv4Addr> = first.iter().copied().collect();
    assert_eq!(
        used.len(),
        3,
        "the {FLOWS} flows should spread over all three servers, got {used:?}"
    );

    h.dataplane.apply(&affinity_service(&four))?;
    let hits = counter(&h.dataplane, verdict::FLOW_HIT)?;
    let second = destinations(&h.dataplane, h.fx0, 20000)?;
    let moved: Vec<String> = (0..FLOWS as usize)
        .filter(|&i| first[i] != second[i])
        .map(|i| format!("flow {i}: {} -> {}", first[i], second[i]))
        .collect();
    assert!(
        moved.is_empty(),
        "{} of {FLOWS} established flows changed server after a server was added:\n{}",
        moved.len(),
        moved.join("\n")
    );
    assert_eq!(
        counter(&h.dataplane, verdict::FLOW_HIT)? - hits,
        u64::from(FLOWS),
        "every flow of the second round should be a flow-table hit"
    );

    // Control: with no pinned flows, the four-server table sends some of these flows
    // elsewhere, so the assertion above could have failed.
    let mut fresh = new_dataplane(h.fy0)?;
    fresh.apply(&affinity_service(&four))?;
    let unpinned = destinations(&fresh, h.fx0, 20000)?;
    let differ = (0..FLOWS as usize)
        .filter(|&i| unpinned[i] != first[i])
        .count();
    assert!(
        differ > 0,
        "control: a fresh data plane with four servers should route some of the {FLOWS} flows differently"
    );
    assert!(
        unpinned.contains(&"10.9.2.13".parse()?),
        "control: the new server should own part of the fresh table"
    );
    eprintln!("control: {differ} of {FLOWS} flows would go elsewhere without the flow table");
    Ok(())
}

#[test]
fn flows_of_a_removed_server_move_to_a_remaining_one() -> Result<()> {
    let mut h = Harness::new()?;
    let three = ["10.9.2.11", "10.9.2.12", "10.9.2.13"];
    let removed: Ipv4Addr = "10.9.2.12".parse()?;
    let remaining = ["10.9.2.11", "10.9.2.13"];

    h.dataplane.apply(&affinity_service(&three))?;
    let first = destinations(&h.dataplane, h.fx0, 20000)?;
    let on_removed = first.iter().filter(|d| **d == removed).count();
    assert!(
        on_removed > 0,
        "some of the {FLOWS} flows should start on {removed}"
    );

    h.dataplane.apply(&affinity_service(&remaining))?;
    let second = destinations(&h.dataplane, h.fx0, 20000)?;
    let remaining: Vec<Ipv4Addr> = remaining.iter().map(|s| s.parse().unwrap()).collect();
    let mut wrong = Vec::new();
    for i in 0..FLOWS as usize {
        if first[i] == removed {
            if !remaining.contains(&second[i]) {
                wrong.push(format!(
                    "flow {i}: was on the removed {removed}, now on {} (not a remaining server)",
                    second[i]
                ));
            }
        } else if second[i] != first[i] {
            wrong.push(format!(
                "flow {i}: was on {} (still present), moved to {}",
                first[i], second[i]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {FLOWS} flows went wrong after {removed} was removed:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // The moved flows are pinned again: a third round sends them to the same place.
    let third = destinations(&h.dataplane, h.fx0, 20000)?;
    assert_eq!(
        third, second,
        "flows should stay where they moved to after the removal"
    );
    Ok(())
}

#[test]
fn a_draining_server_keeps_its_flows_and_a_down_server_loses_them() -> Result<()> {
    let mut h = Harness::new()?;
    let target: Ipv4Addr = "10.9.2.12".parse()?;
    let others: Vec<Ipv4Addr> = vec!["10.9.2.11".parse()?, "10.9.2.13".parse()?];
    let with_target = |weight: u32, up: bool| {
        let mut svc = affinity_service(&["10.9.2.11", "10.9.2.12", "10.9.2.13"]);
        let s = &mut svc[0].servers[1];
        assert_eq!(s.address, IpAddr::V4(target));
        s.weight = weight;
        s.up = up;
        svc
    };

    h.dataplane.apply(&with_target(1, true))?;
    let first = destinations(&h.dataplane, h.fx0, 20000)?;
    assert!(
        first.contains(&target),
        "some of the {FLOWS} flows should start on {target}"
    );

    // Weight 0: no new flows, established ones stay.
    h.dataplane.apply(&with_target(0, true))?;
    let drained = destinations(&h.dataplane, h.fx0, 20000)?;
    assert_eq!(
        drained, first,
        "established flows should stay on their servers while {target} drains"
    );
    let new_flows = destinations(&h.dataplane, h.fx0, 30000)?;
    assert!(
        !new_flows.contains(&target),
        "no new flow should go to the draining {target}"
    );

    // Down: its flows move to the others, the others' flows stay.
    h.dataplane.apply(&with_target(1, false))?;
    let after = destinations(&h.dataplane, h.fx0, 20000)?;
    let mut wrong = Vec::new();
    for i in 0..FLOWS as usize {
        let ok = if first[i] == target {
            others.contains(&after[i])
        } else {
            after[i] == first[i]
        };
        if !ok {
            wrong.push(format!("flow {i}: {} -> {}", first[i], after[i]));
        }
    }
    assert!(
        wrong.is_empty(),
        "after {target} went down, {} flows went wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// This kernel maps `RINGS` into the controller's memory, so tables are written with plain
/// stores; the fixtures and affinity tests above check what the data path then reads.
#[test]
fn tables_are_written_through_a_memory_mapping() -> Result<()> {
    let h = Harness::new()?;
    assert_eq!(h.dataplane.table_write_path(), "memory mapping");
    Ok(())
}
