//! ICMP errors and the flow table: an error goes to the server its quoted flow is pinned
//! to, even when the consistent-hash table would choose another, else to the hash choice;
//! it makes no entry and refreshes none. The two switches (`answer_ping`,
//! `forward_icmp_errors`) and the service address set that echo replies are limited to.
use std::net::IpAddr;

use anycast_common::{maps, verdict, FlowKey, FlowValue, PROTO_TCP};
use anycast_tests::packet::{hex, TCP_ACK, TCP_SYN};
use anyhow::{bail, Result};
use aya::maps::HashMap as BpfHashMap;

use crate::harness::*;
use crate::icmp::{echo_request, icmp_harness, quote, reply_of, too_big_error};

/// Two servers behind 192.0.2.10:80.
fn two_servers() -> Vec<anycast_ctl::dataplane::DesiredService> {
    vec![service(
        "web",
        "192.0.2.10",
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1)],
    )]
}

/// Runs the error about `flow`'s reply; checks the whole output frame against the error
/// tunnelled to the server it names, and returns that server.
fn send_error(h: &Harness, flow: &Flow) -> Result<IpAddr> {
    let error = too_big_error(flow, &quote(&reply_of(flow)));
    let (action, out) = run_xdp(&h.dataplane, h.fx0, &client_frame(None, &error))?;
    if action != XDP_TX || out.len() < 34 {
        bail!("{flow:?}: {} \n{}", action_name(action), hex(&out));
    }
    let server = IpAddr::from([out[30], out[31], out[32], out[33]]);
    assert_eq!(
        hex(&out),
        hex(&tx_to(&server.to_string(), None, flow, &error)),
        "{flow:?}: the error, tunnelled to {server}"
    );
    Ok(server)
}

fn key(flow: &Flow) -> FlowKey {
    FlowKey::new(flow.src, flow.dst, flow.proto, flow.sport, flow.dport)
}

#[test]
fn an_error_follows_the_pin_else_the_hash_and_makes_no_entry() -> Result<()> {
    let mut h = icmp_harness()?;
    h.dataplane.apply(&two_servers())?;
    let flows: Vec<Flow> = (0..16)
        .map(|i| Flow::v4("192.0.2.10", PROTO_TCP, 41000 + i, 80))
        .collect();

    // Not pinned: the hash choice, the same server the flow's first packet then goes to;
    // the error made no entry.
    let mut by_hash = Vec::new();
    for f in &flows {
        let before = counter(&h.dataplane, verdict::ICMP_TO_SERVER)?;
        let server = send_error(&h, f)?;
        assert_eq!(
            counter(&h.dataplane, verdict::ICMP_TO_SERVER)?,
            before + 1,
            "counted"
        );
        assert!(
            entry(&flow_table(&h.dataplane)?, f).is_none(),
            "{f:?}: the error made a flow entry"
        );
        assert_eq!(
            send(&h, f, TCP_SYN)?,
            server,
            "{f:?}: the error went to another server than the flow's first packet"
        );
        // A SYN is not pinned; the ACK after it pins the flow (to the SYN's server).
        assert_eq!(
            send(&h, f, TCP_ACK)?,
            server,
            "{f:?}: the ACK follows the SYN"
        );
        by_hash.push(server);
    }
    assert_eq!(
        servers_used(&by_hash),
        addrs(&[SERVER_A, SERVER_B]),
        "16 flows over two servers use both"
    );

    // Pinned to the other server (the entry of a flow that went there, copied): the pin
    // wins over the hash.
    let mut flows_map: BpfHashMap<_, FlowKey, FlowValue> =
        BpfHashMap::try_from(agent_map(&h.dataplane, maps::FLOWS)?)?;
    let value_of = |server: IpAddr| -> Result<FlowValue> {
        let f = flows[by_hash.iter().position(|s| *s == server).expect("used")];
        Ok(flows_map.get(&key(&f), 0)?)
    };
    let (to_a, to_b) = (value_of(SERVER_A.parse()?)?, value_of(SERVER_B.parse()?)?);
    for (f, hashed) in flows.iter().zip(&by_hash) {
        let other = if *hashed == SERVER_A.parse::<IpAddr>()? {
            to_b
        } else {
            to_a
        };
        let pinned = FlowValue {
            last_seen: flows_map.get(&key(f), 0)?.last_seen,
            ..other
        };
        flows_map.insert(key(f), pinned, 0)?;
        let server = send_error(&h, f)?;
        assert_ne!(server, *hashed, "{f:?}: the pin was not followed");
        assert_eq!(
            flows_map.get(&key(f), 0)?,
            pinned,
            "{f:?}: the error changed the entry"
        );
    }
    Ok(())
}

#[test]
fn switched_off_icmp_passes_as_before() -> Result<()> {
    let mut h = icmp_harness()?;
    h.dataplane.apply(&web_and_dns())?;
    let flow = Flow::v4("192.0.2.10", PROTO_TCP, 41100, 80);
    let error = client_frame(None, &too_big_error(&flow, &quote(&reply_of(&flow))));
    let ping = client_frame(
        None,
        &echo_request(IpAddr::V4(CLIENT_V4), "192.0.2.10".parse()?),
    );
    let run = |h: &Harness, frame: &[u8]| -> Result<(u32, u32)> {
        let ((action, out), delta) =
            counting(&h.dataplane, || run_xdp(&h.dataplane, h.fx0, frame))?;
        let reasons: Vec<u32> = (0..delta.len() as u32)
            .filter(|&i| delta[i as usize] > 0)
            .collect();
        assert_eq!(reasons.len(), 1, "one counter: {delta:?}");
        if action == XDP_PASS {
            assert_eq!(out, frame, "passed untouched");
        }
        Ok((action, reasons[0]))
    };
    assert_eq!(run(&h, &error)?, (XDP_TX, verdict::ICMP_TO_SERVER));
    assert_eq!(run(&h, &ping)?, (XDP_TX, verdict::ECHO_REPLY));
    h.dataplane.set_icmp(true, false)?;
    assert_eq!(run(&h, &error)?, (XDP_PASS, verdict::PASS_NOT_SERVICE));
    assert_eq!(run(&h, &ping)?, (XDP_TX, verdict::ECHO_REPLY));
    h.dataplane.set_icmp(false, true)?;
    assert_eq!(run(&h, &error)?, (XDP_TX, verdict::ICMP_TO_SERVER));
    assert_eq!(run(&h, &ping)?, (XDP_PASS, verdict::PASS_NOT_SERVICE));
    // The agent's addresses are written again (as at a start): the switches stay.
    h.dataplane
        .set_agent_addresses(Some(IpAddr::V4(AGENT_V4)), Some(IpAddr::V6(AGENT_V6)))?;
    assert_eq!(run(&h, &error)?, (XDP_TX, verdict::ICMP_TO_SERVER));
    assert_eq!(run(&h, &ping)?, (XDP_PASS, verdict::PASS_NOT_SERVICE));
    Ok(())
}

/// Echo replies are limited to the services' addresses, which follow every apply.
#[test]
fn echo_replies_follow_the_service_addresses() -> Result<()> {
    let mut h = icmp_harness()?;
    let ping = |h: &Harness, to: &str| -> Result<u32> {
        let frame = client_frame(None, &echo_request(IpAddr::V4(CLIENT_V4), to.parse()?));
        Ok(run_xdp(&h.dataplane, h.fx0, &frame)?.0)
    };
    h.dataplane.apply(&web_and_dns())?;
    assert_eq!(
        h.dataplane.service_addresses()?,
        addrs(&["192.0.2.10"]),
        "one address for two services"
    );
    assert_eq!(ping(&h, "192.0.2.10")?, XDP_TX);
    let mut both = web_and_dns();
    both.extend(web6());
    h.dataplane.apply(&both)?;
    assert_eq!(
        h.dataplane.service_addresses()?,
        addrs(&["192.0.2.10", "2001:db8::10"])
    );
    h.dataplane.apply(&web6())?;
    assert_eq!(h.dataplane.service_addresses()?, addrs(&["2001:db8::10"]));
    assert_eq!(
        ping(&h, "192.0.2.10")?,
        XDP_PASS,
        "a removed service's address is not answered"
    );
    Ok(())
}

/// An error about a SYN-ACK (the flow's handshake in progress, not pinned yet) goes to the
/// server the SYN went to, also when the table changed since; it pins nothing.
#[test]
fn an_error_during_a_handshake_follows_the_syn() -> Result<()> {
    let mut h = icmp_harness()?;
    h.dataplane.apply(&two_servers())?;
    let flows: Vec<Flow> = (0..64)
        .map(|i| Flow::v4("192.0.2.10", PROTO_TCP, 41200 + i, 80))
        .collect();
    let syn_servers = send_all(&h, &flows, TCP_SYN)?;
    // A third server: some handshakes would now hash elsewhere.
    h.dataplane.apply(&[service(
        "web",
        "192.0.2.10",
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
    )])?;
    for (f, syn_server) in flows.iter().zip(&syn_servers) {
        assert_eq!(
            send_error(&h, f)?,
            *syn_server,
            "{f:?}: the error follows the SYN"
        );
        assert!(
            entry(&flow_table(&h.dataplane)?, f).is_none(),
            "{f:?}: the error pinned the flow"
        );
    }
    drop(h);
    // Control: without the handshakes, the new table sends some of the errors elsewhere.
    let mut fresh = icmp_harness()?;
    fresh.dataplane.apply(&[service(
        "web",
        "192.0.2.10",
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
    )])?;
    let mut moved = 0;
    for (f, syn_server) in flows.iter().zip(&syn_servers) {
        if send_error(&fresh, f)? != *syn_server {
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "control: the new table moves some of the 64 flows"
    );
    eprintln!("control: without the handshakes, {moved} of 64 errors would go elsewhere");
    Ok(())
}
