//! Agent discovery at the agent: only a configured server, signed, from its own address,
//! fresh and within its budget learns the list; everything else is counted, unanswered.
//! Binding updates sent to the discovery address bind here and, relayed, at the peers.
use std::net::Ipv4Addr;

use super::{test_support::*, *};

const DISCOVERY: &str = "10.0.9.9";

fn agents() -> Vec<wire::AgentEntry> {
    vec![
        wire::AgentEntry {
            id: "a".into(),
            v4: Some(AGENT.parse().unwrap()),
            v6: Some("2001:db8:1::1".parse().unwrap()),
        },
        wire::AgentEntry {
            id: "b".into(),
            v4: Some(Ipv4Addr::new(10, 0, 0, 9)),
            v6: None,
        },
    ]
}

fn with_discovery(r: Registry) -> Registry {
    r.with_discovery(DiscoveryConfig {
        addresses: vec![DISCOVERY.parse().unwrap()],
        agents: agents(),
    })
}

/// A discovery request of `id` signed with `key`, from s1's real address to `dst`.
fn request(id: &str, key: &[u8], spi: u32, ts: Option<u64>, dst: &str) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped("10.0.2.11".parse().unwrap()),
        dst: wire::to_mapped(dst.parse().unwrap()),
        body: Body::DiscoveryRequest,
        options: Options {
            mn_id: Some(id.into()),
            mesg_id: ts,
            ..Options::default()
        },
    };
    wire::encode(&msg, Some(Key { spi, secret: key }))
}

fn s1_request(ts: u64) -> Vec<u8> {
    request("s1", KEY1, 1, Some(ts), DISCOVERY)
}

#[test]
fn a_signed_request_is_answered_with_the_signed_list_echoing_its_nonce() {
    let mut r = with_discovery(registry(Limits::default(), 30));
    let o = r.handle(&s1_request(WALL), from(), Instant::now(), WALL);
    assert_eq!(o.counted, "discovery_answered");
    assert!(!o.changed);
    let reply = o.reply.expect("an answer");
    assert_eq!(reply.to, from());
    assert!(wire::verify(
        &reply.payload,
        Key {
            spi: 1,
            secret: KEY1
        }
    ));
    let msg = wire::decode(&reply.payload).unwrap();
    assert_eq!(msg.src, wire::to_mapped(DISCOVERY.parse().unwrap()));
    assert_eq!(msg.options.mesg_id, Some(WALL), "the nonce echoed");
    // max_lifetime 60 s: 15 units.
    assert_eq!(
        msg.body,
        Body::DiscoveryReply {
            lifetime: 15,
            agents: agents()
        }
    );
    // Reply size: bounded, and not much larger than the request for two agents.
    assert!(reply.payload.len() <= 2 * s1_request(WALL).len() + 64);
    // Also on the agent's own address.
    let o = r.handle(
        &request("s1", KEY1, 1, Some(WALL + 1), AGENT),
        from(),
        Instant::now(),
        WALL,
    );
    assert_eq!(o.counted, "discovery_answered");
}

#[test]
fn forged_unknown_replayed_stale_and_misplaced_requests_learn_nothing() {
    let mut r = with_discovery(registry(Limits::default(), 30));
    let now = Instant::now();
    let window = 30u64 << 32;
    let cases: Vec<(&str, Vec<u8>, SocketAddr, &str)> = vec![
        (
            "s2's key for s1",
            request("s1", KEY2, 1, Some(WALL), DISCOVERY),
            from(),
            "discovery_refused_auth",
        ),
        (
            "wrong SPI",
            request("s1", KEY1, 2, Some(WALL), DISCOVERY),
            from(),
            "discovery_refused_auth",
        ),
        (
            "unknown identity",
            request("s9", KEY1, 1, Some(WALL), DISCOVERY),
            from(),
            "discovery_refused_auth",
        ),
        (
            "unsigned",
            {
                let msg = wire::decode(&s1_request(WALL)).unwrap();
                wire::encode(&msg, None)
            },
            from(),
            "discovery_refused_auth",
        ),
        (
            "from an address not its own (a reflection)",
            s1_request(WALL),
            "10.0.3.7:5000".parse().unwrap(),
            "discovery_refused_source",
        ),
        (
            "no MESG-ID",
            request("s1", KEY1, 1, None, DISCOVERY),
            from(),
            "discovery_refused_replay",
        ),
        (
            "too old",
            s1_request(WALL - window - (1 << 32)),
            from(),
            "discovery_refused_replay",
        ),
        (
            "too new",
            s1_request(WALL + window + (1 << 32)),
            from(),
            "discovery_refused_replay",
        ),
        (
            "to another agent",
            request("s1", KEY1, 1, Some(WALL), "10.0.0.77"),
            from(),
            "dropped_not_for_this_agent",
        ),
    ];
    for (what, bytes, src, counted) in cases {
        let o = r.handle(&bytes, src, now, WALL);
        assert_eq!(o.counted, counted, "{what}");
        assert!(o.reply.is_none(), "{what}: answered");
    }
    // The genuine one, then the same again: a replay.
    assert_eq!(
        r.handle(&s1_request(WALL), from(), now, WALL).counted,
        "discovery_answered"
    );
    let again = r.handle(&s1_request(WALL), from(), now, WALL);
    assert_eq!(again.counted, "discovery_refused_replay");
    assert!(again.reply.is_none());
    // Before the agent's start (a request captured before a restart).
    let mut r = with_discovery(registry(Limits::default(), 30)).refusing_mesg_ids_before(WALL);
    assert_eq!(
        r.handle(&s1_request(WALL - (1 << 32)), from(), now, WALL)
            .counted,
        "discovery_refused_replay"
    );
    let report = r.report(now, None);
    assert_eq!(report.counters.get("discovery_refused_replay"), Some(&1));
}

#[test]
fn requests_are_rate_limited_per_identity_and_off_without_a_discovery_address() {
    let mut r = with_discovery(registry(Limits::default(), 30));
    let now = Instant::now();
    let burst = 2 * Limits::default().messages_per_second as u64;
    let answered = (0..burst + 10)
        .filter(|i| {
            r.handle(&s1_request(WALL + i), from(), now, WALL).counted == "discovery_answered"
        })
        .count() as u64;
    assert_eq!(answered, burst);
    assert_eq!(
        r.handle(&s1_request(WALL + 1000), from(), now, WALL)
            .counted,
        "discovery_dropped_rate_limited"
    );
    // s1's discovery budget is not its binding updates' budget.
    let bu = Bu::new(1, WALL).bytes();
    assert_eq!(r.handle(&bu, from(), now, WALL).counted, "registered");

    let mut off = registry(Limits::default(), 30);
    let o = off.handle(&s1_request(WALL), from(), now, WALL);
    assert_eq!(o.counted, "discovery_dropped_off");
    assert!(o.reply.is_none());
}

#[test]
fn an_update_to_the_discovery_address_binds_and_its_relayed_copy_binds_at_the_peer() {
    let mut a = with_discovery(registry(Limits::default(), 30));
    let now = Instant::now();
    let mut msg = wire::decode(&Bu::new(10, WALL).bytes()).unwrap();
    msg.dst = wire::to_mapped(DISCOVERY.parse().unwrap());
    msg.options.auth = None;
    let bu = wire::encode(
        &msg,
        Some(Key {
            spi: 1,
            secret: KEY1,
        }),
    );
    let at_a = a.handle(&bu, from(), now, WALL);
    assert_eq!(at_a.counted, "registered");
    let ba = wire::decode(&at_a.reply.unwrap().payload).unwrap();
    assert_eq!(ba.src, msg.dst, "answered from the discovery address");
    // Refresh requests and probes go from there too (the server takes answers only from
    // the address it sends to); to a binding made through the agent's own address, from it.
    let requests = a.refresh_all(now);
    assert_eq!(requests.len(), 1);
    assert_eq!(wire::decode(&requests[0].payload).unwrap().src, msg.dst);
    let mut direct = with_discovery(registry(Limits::default(), 30));
    direct.handle(&Bu::new(10, WALL).bytes(), from(), now, WALL);
    let requests = direct.refresh_all(now);
    assert_eq!(
        wire::decode(&requests[0].payload).unwrap().src,
        wire::to_mapped(AGENT.parse().unwrap())
    );

    // Peer B, relayed by A: B takes it when B shares the discovery address, not otherwise.
    let keys = HashMap::from([
        ("s1".to_string(), KEY1.to_vec()),
        ("s2".to_string(), KEY2.to_vec()),
    ]);
    let peer = || {
        Registry::new(
            &registration(Limits::default(), 30),
            &keys,
            &["10.0.0.9".parse().unwrap()],
            64,
        )
    };
    let via = Relayed {
        peer: "a".into(),
        peer_addresses: vec![wire::to_mapped(AGENT.parse().unwrap())],
        snapshot: None,
    };
    let mut b = with_discovery(peer());
    let at_b = b.handle_relayed(&bu, from(), &via, now, WALL);
    assert_eq!(at_b.counted, "relayed_registered");
    assert!(at_b.reply.is_none());
    let mut c = peer();
    assert_eq!(
        c.handle_relayed(&bu, from(), &via, now, WALL).counted,
        "relayed_dropped_not_for_this_agent"
    );
    // A discovery request relayed by a peer is not answered (never relayed in the first place).
    let relayed_request = b.handle_relayed(&s1_request(WALL), from(), &via, now, WALL);
    assert_eq!(
        relayed_request.counted,
        "relayed_dropped_not_binding_update"
    );
}
