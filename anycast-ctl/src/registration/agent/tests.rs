use super::{test_support::*, *};

#[test]
fn a_valid_update_registers_and_is_acknowledged() {
    let mut r = registry(Limits::default(), 30);
    let now = Instant::now();
    let o = r.handle(&Bu::new(10, WALL).bytes(), from(), now, WALL);
    assert!(o.changed);
    assert_eq!(o.counted, "registered");
    assert_eq!(ba_status(&o, Some(KEY1), 1), (status::ACCEPTED, 10, 5));
    let services = r.selected(&[]);
    assert_eq!(
        services.len(),
        2,
        "the whole address: tcp and udp, any port"
    );
    assert_eq!(
        services[0].servers[0].address,
        "10.0.2.11".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        services[0].servers[0].weight,
        crate::selection::DEFAULT_WEIGHT,
        "no capacity reported"
    );
    let report = r.report(now, None);
    assert_eq!(report.bindings[0].load.as_ref().unwrap().sessions_in_use, 3);
    // A refresh with a newer sequence number is accepted and changes nothing.
    let o = r.handle(&Bu::new(11, WALL + 1).bytes(), from(), now, WALL);
    assert_eq!((o.counted.as_str(), o.changed), ("refreshed", false));
}

#[test]
fn forged_replayed_unauthorized_and_stale_updates_change_nothing() {
    let mut r = registry(Limits::default(), 30);
    let now = Instant::now();
    let good = Bu::new(10, WALL).bytes();
    assert!(r.handle(&good, from(), now, WALL).changed);
    let before = r.selected(&[]);
    // Wrong key (s2 forging s1).
    let forged = Bu {
        key: KEY2,
        ..Bu::new(11, WALL + 1)
    };
    let o = r.handle(&forged.bytes(), from(), now, WALL);
    assert_eq!(ba_status(&o, None, 0).0, status::AUTH_FAILED);
    // Right key, wrong SPI.
    let o = r.handle(
        &Bu {
            spi: 2,
            ..Bu::new(11, WALL + 2)
        }
        .bytes(),
        from(),
        now,
        WALL,
    );
    assert_eq!(ba_status(&o, None, 0).0, status::AUTH_FAILED);
    // The same bytes again: a replay.
    let o = r.handle(&good, from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ID_MISMATCH);
    // A timestamp far from the agent's clock: the answer carries the agent's time
    // (RFC 4285 section 6), signed, so the server can resynchronize.
    let o = r.handle(&Bu::new(12, WALL + (100 << 32)).bytes(), from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ID_MISMATCH);
    let ba = wire::decode(&o.reply.as_ref().unwrap().payload).unwrap();
    assert_eq!(
        ba.options.mesg_id,
        Some(WALL + 1),
        "the agent's time, or just past the last accepted one"
    );
    // No MESG-ID at all.
    let mut msg = wire::decode(&Bu::new(12, WALL + 1).bytes()).unwrap();
    msg.options.mesg_id = None;
    let no_id = wire::encode(
        &msg,
        Some(Key {
            spi: 1,
            secret: KEY1,
        }),
    );
    let o = r.handle(&no_id, from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::MESG_ID_REQUIRED);
    // An address s1 may not bind.
    let o = r.handle(
        &Bu {
            home: "192.0.2.2",
            ..Bu::new(13, WALL + 3)
        }
        .bytes(),
        from(),
        now,
        WALL,
    );
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::PROHIBITED);
    // An unknown server.
    let o = r.handle(
        &Bu {
            id: "s9",
            ..Bu::new(14, WALL + 4)
        }
        .bytes(),
        from(),
        now,
        WALL,
    );
    assert_eq!(ba_status(&o, None, 0).0, status::AUTH_FAILED);
    // An old sequence number: refused with the last accepted one.
    let o = r.handle(&Bu::new(9, WALL + 5).bytes(), from(), now, WALL);
    assert_eq!(
        ba_status(&o, Some(KEY1), 1),
        (status::SEQUENCE_OUT_OF_WINDOW, 10, 0)
    );
    // Garbage.
    let o = r.handle(&[0u8; 7], from(), now, WALL);
    assert!(
        o.reply.is_none() && o.counted.starts_with("dropped_malformed_"),
        "{o:?}"
    );
    assert_eq!(r.selected(&[]), before, "nothing changed");
    let c = r.report(now, None).counters;
    assert_eq!(c["refused_146"], 3);
    assert_eq!(c["refused_144"], 2);
    assert_eq!(c["refused_145"], 1);
    assert_eq!(c["refused_129"], 1);
    assert_eq!(c["refused_135"], 1);
}

#[test]
fn an_unknown_message_type_gets_a_binding_error() {
    let mut r = registry(Limits::default(), 30);
    let mut bytes = Bu::new(1, WALL).bytes();
    bytes[40 + 2] = 42; // MH type
                        // Keep the checksum right, so only the type is wrong: the checksum covers the type
                        // byte in the high half of its 16-bit word.
    let sum = u16::from_be_bytes([bytes[44], bytes[45]]) as u32;
    let fixed = (sum + ((5u32) << 8) + 0xffff - (42u32 << 8)) % 0xffff;
    [bytes[44], bytes[45]] = (fixed as u16).to_be_bytes();
    let o = r.handle(&bytes, from(), Instant::now(), WALL);
    assert_eq!(o.counted, "dropped_malformed_unknown_mh_type");
    let reply = o.reply.expect("a binding error");
    let be = wire::decode(&reply.payload).unwrap();
    assert_eq!(
        be.body,
        Body::BindingError {
            status: 2,
            home: wire::to_mapped("192.0.2.1".parse().unwrap())
        }
    );
    assert!(!o.changed);
}

#[test]
fn unanswered_refresh_probes_make_a_binding_suspect_then_down_and_an_update_heals_it() {
    let mut r = registry(Limits::default(), 30);
    let t0 = Instant::now();
    r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
    let (sent, changed) = r.probe(t0);
    assert_eq!((sent.len(), changed), (1, false));
    assert_eq!(
        wire::decode(&sent[0].payload).unwrap().body,
        Body::BindingRefreshRequest
    );
    // Unanswered past the timeout: suspect (keeps its share until confirmed).
    let (_, changed) = r.probe(t0 + Duration::from_millis(600));
    assert!(changed);
    assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Suspect);
    assert!(r.selected(&[])[0].servers[0].up);
    // The next probe goes out at the interval and is missed too: down.
    let (sent, _) = r.probe(t0 + Duration::from_millis(1000));
    assert_eq!(sent.len(), 1);
    let (_, changed) = r.probe(t0 + Duration::from_millis(1600));
    assert!(changed);
    assert!(!r.selected(&[])[0].servers[0].up, "down: its flows move");
    // An update (the answer to a probe) brings it back.
    let o = r.handle(
        &Bu::new(2, WALL + 1).bytes(),
        from(),
        t0 + Duration::from_millis(1700),
        WALL,
    );
    assert!(o.changed);
    let s = &r.selected(&[])[0].servers[0];
    assert!(s.up && s.weight > 0);
}

fn reverse_counters(syns: u64, packets: u64) -> BTreeMap<IpAddr, ReverseCounters> {
    BTreeMap::from([(
        "10.0.2.11".parse().unwrap(),
        ReverseCounters {
            syns,
            reverse_packets: packets,
            last_reverse_ns: packets,
        },
    )])
}

fn reverse_state(r: &Registry) -> ReverseState {
    r.report(Instant::now(), Some(&reverse_counters(0, 0)))
        .bindings[0]
        .reverse
        .as_ref()
        .unwrap()
        .state
}

#[test]
fn reverse_monitor_suspects_a_silent_server_and_confirms_with_refresh_requests() {
    let mut r = registry(Limits::default(), 30);
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
    // The regular probe at registration, answered.
    assert_eq!(r.probe(t0).0.len(), 1);
    r.handle(&Bu::new(2, WALL + 1).bytes(), from(), ms(10), WALL);

    // New flows, but nothing reverse-tunnelled yet: not watched, never suspect.
    assert!(!r.watch_reverse(ms(20), &reverse_counters(5, 0)));
    assert!(!r.watch_reverse(ms(2000), &reverse_counters(50, 0)));
    assert_eq!(reverse_state(&r), ReverseState::Off);
    assert!(r.probe(ms(2000)).0.len() <= 1, "only the regular probe");
    r.handle(&Bu::new(3, WALL + 2).bytes(), from(), ms(2010), WALL);

    // The first SYN-ACK through the agent: watched.
    assert!(!r.watch_reverse(ms(2050), &reverse_counters(50, 1)));
    assert_eq!(reverse_state(&r), ReverseState::Ok);
    // SYNs answered within the window, and idle time, keep it ok.
    assert!(!r.watch_reverse(ms(2100), &reverse_counters(51, 1)));
    assert!(!r.watch_reverse(ms(2300), &reverse_counters(51, 2)));
    assert!(!r.watch_reverse(ms(9000), &reverse_counters(51, 2)));
    assert_eq!(reverse_state(&r), ReverseState::Ok);

    // A new flow at 9050 and no SYN-ACK: suspect once the 300 ms window is over, and a
    // refresh request goes out at once although the regular probe is not due.
    assert!(!r.watch_reverse(ms(9050), &reverse_counters(52, 2)));
    assert!(!r.watch_reverse(ms(9300), &reverse_counters(53, 2)));
    assert_eq!(reverse_state(&r), ReverseState::Ok, "within the window");
    assert!(r.watch_reverse(ms(9350), &reverse_counters(53, 2)));
    assert_eq!(reverse_state(&r), ReverseState::Suspect);
    assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Suspect);
    assert!(r.selected(&[])[0].servers[0].up, "suspect keeps its share");
    assert_eq!(r.report(t0, None).counters["reverse_suspected"], 1);
    let (sent, _) = r.probe(ms(9350));
    assert_eq!(sent.len(), 1);
    assert_eq!(
        wire::decode(&sent[0].payload).unwrap().body,
        Body::BindingRefreshRequest
    );
    // Still silent: no second suspicion while suspect.
    assert!(!r.watch_reverse(ms(9700), &reverse_counters(60, 2)));

    // It answers: up, and no longer watched while its SYN-ACKs go elsewhere.
    let o = r.handle(&Bu::new(4, WALL + 3).bytes(), from(), ms(9400), WALL);
    assert!(o.changed);
    assert_eq!(reverse_state(&r), ReverseState::Silent);
    assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Up);
    assert!(!r.watch_reverse(ms(20000), &reverse_counters(500, 2)));
    assert_eq!(reverse_state(&r), ReverseState::Silent);
    assert_eq!(r.report(t0, None).counters["reverse_silent"], 1);
    // Its SYN-ACKs come back through the agent: watched again.
    assert!(!r.watch_reverse(ms(20050), &reverse_counters(501, 3)));
    assert_eq!(reverse_state(&r), ReverseState::Ok);

    // Now it dies: suspect, then each unanswered refresh request is followed at once by
    // the next, so two misses (the configured `misses`) take 2 x 500 ms, not the 1 s
    // probe interval: down.
    assert!(!r.watch_reverse(ms(21000), &reverse_counters(502, 3)));
    assert!(r.watch_reverse(ms(21300), &reverse_counters(505, 3)));
    assert_eq!(r.probe(ms(21300)).0.len(), 1);
    let (sent, changed) = r.probe(ms(21800));
    assert!(changed, "first miss");
    assert_eq!(sent.len(), 1, "the next request at once");
    assert!(r.selected(&[])[0].servers[0].up);
    let (_, changed) = r.probe(ms(22300));
    assert!(changed, "second miss");
    assert!(!r.selected(&[])[0].servers[0].up, "down: its flows move");
    assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Down);
    let (sent, _) = r.probe(ms(22310));
    assert!(sent.is_empty(), "back to the regular interval once down");
}

#[test]
fn reverse_monitoring_is_off_unless_configured() {
    let mut reg = registration(Limits::default(), 30);
    reg.reverse_tunnel = None;
    let keys = HashMap::from([("s1".to_string(), KEY1.to_vec())]);
    let mut r = Registry::new(&reg, &keys, &[AGENT.parse().unwrap()], 64);
    let t0 = Instant::now();
    r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
    assert!(!r.reverse_monitoring());
    r.watch_reverse(t0, &reverse_counters(1, 1));
    assert!(!r.watch_reverse(t0 + Duration::from_secs(5), &reverse_counters(9, 1)));
    let report = r.report(t0, Some(&reverse_counters(9, 1)));
    let rev = report.bindings[0].reverse.as_ref().unwrap();
    assert_eq!(
        (rev.state, rev.syns, rev.syn_acks),
        (ReverseState::Off, 9, 1),
        "counters shown, not watched"
    );
}

#[test]
fn load_reports_set_the_weight() {
    let mut r = registry(Limits::default(), 30);
    let now = Instant::now();
    let with_load = |seq: u16, used: u32| {
        let mut m = wire::decode(&Bu::new(seq, WALL + seq as u64).bytes()).unwrap();
        m.options.load = Some(LoadInfo {
            used_capacity: used,
            max_capacity: 1000,
            ..Default::default()
        });
        wire::encode(
            &m,
            Some(Key {
                spi: 1,
                secret: KEY1,
            }),
        )
    };
    r.handle(&with_load(1, 0), from(), now, WALL);
    assert_eq!(r.selected(&[])[0].servers[0].weight, 1000);
    for seq in 2..30 {
        r.handle(&with_load(seq, 800), from(), now, WALL);
    }
    let w = r.selected(&[])[0].servers[0].weight;
    assert!(
        (200..=230).contains(&w),
        "weight follows free capacity: {w}"
    );
}

#[test]
fn sequence_numbers_compare_modulo_2_16() {
    let mut r = registry(Limits::default(), 30);
    let now = Instant::now();
    assert!(
        r.handle(&Bu::new(65535, WALL).bytes(), from(), now, WALL)
            .changed
    );
    let o = r.handle(&Bu::new(2, WALL + 1).bytes(), from(), now, WALL);
    assert_eq!(o.counted, "refreshed", "2 is after 65535");
}

#[test]
fn deregistration_drains_then_removes_and_expiry_removes() {
    let mut r = registry(Limits::default(), 10);
    let now = Instant::now();
    r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL);
    r.handle(
        &Bu {
            real: "10.0.2.12",
            ..Bu::new(1, WALL + 1)
        }
        .bytes(),
        from(),
        now,
        WALL,
    );
    let o = r.handle(
        &Bu {
            lifetime: 0,
            ..Bu::new(2, WALL + 2)
        }
        .bytes(),
        from(),
        now,
        WALL,
    );
    assert!(o.changed);
    assert_eq!(ba_status(&o, Some(KEY1), 1), (status::ACCEPTED, 2, 0));
    let svc = &r.selected(&[])[0];
    let w: Vec<(IpAddr, u32)> = svc.servers.iter().map(|s| (s.address, s.weight)).collect();
    assert!(
        w.contains(&("10.0.2.11".parse().unwrap(), 0)),
        "draining: no new flows: {w:?}"
    );
    assert!(w.contains(&(
        "10.0.2.12".parse().unwrap(),
        crate::selection::DEFAULT_WEIGHT
    )));
    assert!(!r.expire(now + Duration::from_secs(9)));
    assert!(r.expire(now + Duration::from_secs(10)), "drain time over");
    assert_eq!(r.selected(&[])[0].servers.len(), 1);
    // The other binding (lifetime 5 units = 20 s) expires by itself.
    assert!(r.expire(now + Duration::from_secs(20)));
    assert!(r.selected(&[]).is_empty());
    assert_eq!(r.report(now, None).counters["expired"], 1);
}

#[test]
fn limits_refuse_with_insufficient_resources() {
    let limits = Limits {
        bindings_per_server: 1,
        ..Limits::default()
    };
    let mut r = registry(limits, 30);
    let now = Instant::now();
    assert!(
        r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL)
            .changed
    );
    let o = r.handle(
        &Bu {
            real: "10.0.2.12",
            ..Bu::new(1, WALL + 1)
        }
        .bytes(),
        from(),
        now,
        WALL,
    );
    assert_eq!(
        ba_status(&o, Some(KEY1), 1).0,
        status::INSUFFICIENT_RESOURCES
    );
    assert!(!o.changed);
}

#[test]
fn a_flooding_identity_is_rate_limited_after_authentication() {
    let limits = Limits {
        messages_per_second: 5,
        ..Limits::default()
    };
    let mut r = registry(limits, 30);
    let now = Instant::now();
    let outcomes: Vec<String> = (0..20)
        .map(|i| {
            r.handle(&Bu::new(i, WALL + i as u64).bytes(), from(), now, WALL)
                .counted
        })
        .collect();
    let limited = outcomes
        .iter()
        .filter(|c| *c == "dropped_rate_limited")
        .count();
    assert_eq!(
        limited, 10,
        "a burst of twice the rate passes: {outcomes:?}"
    );
    // Another identity is not affected.
    let s2 = Bu {
        id: "s2",
        key: KEY2,
        spi: 2,
        home: "192.0.2.5",
        real: "10.0.3.1",
        ..Bu::new(100, WALL + 100)
    };
    let o = r.handle(&s2.bytes(), "10.0.3.1:5000".parse().unwrap(), now, WALL);
    assert_eq!(o.counted, "registered");
    // Tokens come back with time.
    let later = now + Duration::from_secs(1);
    assert_ne!(
        r.handle(&Bu::new(101, WALL + 101).bytes(), from(), later, WALL)
            .counted,
        "dropped_rate_limited"
    );
}

/// Authentication comes first: forged updates claiming s1, from s1's own address, do not use
/// up s1's budget; refusals to senders that did not authenticate are answered within a small
/// global budget and never more; their warnings are summed up rather than logged each.
#[test]
fn spoofed_and_forged_floods_cannot_use_up_a_servers_budget() {
    let limits = Limits {
        messages_per_second: 5,
        unauthenticated_replies_per_second: 3,
        ..Limits::default()
    };
    let mut r = registry(limits, 30);
    let now = Instant::now();
    let forged = Bu {
        key: KEY2,
        ..Bu::new(1, WALL)
    };
    let mut answered = 0;
    for _ in 0..100 {
        let o = r.handle(&forged.bytes(), from(), now, WALL);
        assert_eq!(o.counted, "refused_146");
        assert!(!o.changed);
        answered += usize::from(o.reply.is_some());
    }
    // Garbage and unknown identities, too.
    for _ in 0..50 {
        r.handle(&[0u8; 40], from(), now, WALL);
        let o = r.handle(
            &Bu {
                id: "nobody",
                ..Bu::new(1, WALL)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        answered += usize::from(o.reply.is_some());
    }
    assert_eq!(answered, 6, "a burst of twice the global answer rate");
    let c = r.report(now, None).counters;
    assert_eq!(c["refused_146"], 150);
    assert_eq!(c["replies_suppressed_unauthenticated"], 144);
    assert_eq!(
        c["log_lines_suppressed"], 148,
        "one line per kind of refusal per second"
    );
    assert!(!c.contains_key("dropped_rate_limited"), "{c:?}");
    // s1's own updates: its whole burst still passes.
    for i in 0..10u16 {
        let o = r.handle(
            &Bu::new(10 + i, WALL + 1 + i as u64).bytes(),
            from(),
            now,
            WALL,
        );
        assert!(
            o.counted == "registered" || o.counted == "refreshed",
            "update {i}: {o:?}"
        );
    }
    // A second later the summaries are written and the next warning is logged again.
    r.expire(now + Duration::from_secs(1));
    r.handle(&forged.bytes(), from(), now + Duration::from_secs(1), WALL);
    assert_eq!(r.report(now, None).counters["log_lines_suppressed"], 148);
}

#[test]
fn refresh_requests_go_out_once_in_the_last_quarter() {
    let mut r = registry(Limits::default(), 30);
    let now = Instant::now();
    r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL); // 20 s
    assert!(r.refresh_requests(now + Duration::from_secs(10)).is_empty());
    let brr = r.refresh_requests(now + Duration::from_secs(16));
    assert_eq!(brr.len(), 1);
    assert_eq!(brr[0].to, from());
    assert!(
        wire::verify(
            &brr[0].payload,
            Key {
                spi: 1,
                secret: KEY1
            }
        ),
        "BRR signed"
    );
    assert_eq!(
        wire::decode(&brr[0].payload).unwrap().body,
        Body::BindingRefreshRequest
    );
    assert!(
        r.refresh_requests(now + Duration::from_secs(17)).is_empty(),
        "once"
    );
}

#[test]
fn a_selector_binds_one_service_and_configured_services_take_address_bindings() {
    let mut r = registry(Limits::default(), 30);
    let now = Instant::now();
    let mut bu = Bu::new(1, WALL);
    bu.home = "2001:db8::10";
    bu.real = "2001:db8:2::11";
    let mut msg = wire::decode(&bu.bytes()).unwrap();
    msg.options.service = Some(ServiceSelector {
        protocol: PROTO_TCP,
        port: 443,
    });
    msg.options.auth = None;
    let bytes = wire::encode(
        &msg,
        Some(Key {
            spi: 1,
            secret: KEY1,
        }),
    );
    assert!(r.handle(&bytes, from(), now, WALL).changed);
    let d = r.selected(&[]);
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].key,
        ServiceKey::new("2001:db8::10".parse().unwrap(), PROTO_TCP, 443)
    );
    // An address binding joins the configured service of that address only.
    r.handle(&Bu::new(2, WALL + 1).bytes(), from(), now, WALL);
    let configured = ServicePlan {
        name: "web".into(),
        key: ServiceKey::new("192.0.2.1".parse().unwrap(), PROTO_TCP, 80),
        candidates: vec![],
        preferences: Vec::new(),
    };
    let d = r.selected(std::slice::from_ref(&configured));
    assert_eq!(d.len(), 2);
    let web = d.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.servers.len(), 1);
}

/// Every care-of address an identity does not own is refused with RFC 6275's "invalid care-of
/// address" (174), counted, and changes nothing: another identity's real address (bound or
/// not), the agent's own, an anycast address (configured service or bindable), loopback,
/// unspecified, multicast, broadcast; and an update whose source is not one of its own.
#[test]
fn care_of_addresses_an_identity_does_not_own_are_refused() {
    let mut r =
        registry(Limits::default(), 30).with_service_addresses(["198.51.100.7".parse().unwrap()]);
    let now = Instant::now();
    // s2 registers through its real address 10.0.2.50 (inside s1's prefix, too).
    let s2_real: SocketAddr = "10.0.2.50:5000".parse().unwrap();
    let s2 = Bu {
        id: "s2",
        key: KEY2,
        spi: 2,
        real: "10.0.2.50",
        ..Bu::new(1, WALL)
    };
    assert_eq!(
        r.handle(&s2.bytes(), s2_real, now, WALL).counted,
        "registered"
    );
    assert!(
        r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL)
            .changed
    );
    let before = r.selected(&[]);
    let bindings = r.report(now, None).bindings.len();
    let mut ts = WALL;
    let mut refusals = 0;
    for (real, source, why) in [
        (
            "10.0.3.1",
            from(),
            "s2's address, outside s1's real prefixes",
        ),
        (
            "10.0.2.50",
            from(),
            "s2's bound address, inside s1's real prefix",
        ),
        (AGENT, from(), "the agent's own address"),
        ("192.0.2.1", from(), "an anycast address s1 may bind"),
        (
            "192.0.2.77",
            from(),
            "an anycast address another identity may bind",
        ),
        ("198.51.100.7", from(), "a configured service's address"),
        ("127.0.0.1", from(), "loopback"),
        ("0.0.0.0", from(), "unspecified"),
        ("224.0.0.1", from(), "multicast"),
        ("255.255.255.255", from(), "broadcast"),
        ("::1", from(), "IPv6 loopback"),
        ("ff02::1", from(), "IPv6 multicast"),
        (
            "10.0.2.11",
            "10.0.9.9:5000".parse().unwrap(),
            "sent from elsewhere",
        ),
        (
            "10.0.2.11",
            "127.0.0.1:5000".parse().unwrap(),
            "sent from loopback",
        ),
    ] {
        ts += 1;
        let bu = Bu {
            real,
            ..Bu::new(2, ts)
        };
        let o = r.handle(&bu.bytes(), source, now, WALL);
        refusals += 1;
        assert_eq!(
            ba_status(&o, Some(KEY1), 1),
            (status::INVALID_COA, 2, 0),
            "{why}"
        );
        assert!(!o.changed, "{why}");
        assert_eq!(o.counted, "refused_174", "{why}");
        assert_eq!(
            o.reply.as_ref().unwrap().to,
            source,
            "{why}: answered where it came from"
        );
        assert_eq!(r.selected(&[]), before, "{why}: nothing changed");
        assert_eq!(r.report(now, None).bindings.len(), bindings, "{why}");
    }
    assert_eq!(r.report(now, None).counters["refused_174"], refusals);
    // s2's binding is untouched and still s2's.
    let report = r.report(now, None);
    let b = report
        .bindings
        .iter()
        .find(|b| b.id.real == "10.0.2.50".parse::<IpAddr>().unwrap())
        .unwrap();
    assert_eq!(b.id.server, "s2");
    // Its own real address is still accepted.
    let o = r.handle(&Bu::new(3, ts + 1).bytes(), from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ACCEPTED);
}

/// Refresh requests (lifetime's last quarter, and probes) go only to where the binding's
/// accepted updates came from, which is always one of the identity's own real addresses: a
/// refused update, even one that authenticates, never moves them.
#[test]
fn refresh_requests_never_follow_a_refused_update() {
    let mut r = registry(Limits::default(), 30);
    let t0 = Instant::now();
    r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
    // A replay of a fresh, authentic update from an address s1 does not own.
    let attacker: SocketAddr = "10.9.9.9:4000".parse().unwrap();
    let fresh = Bu::new(2, WALL + 1).bytes();
    let o = r.handle(&fresh, attacker, t0, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::INVALID_COA);
    let (probes, _) = r.probe(t0 + Duration::from_secs(2));
    assert!(!probes.is_empty());
    assert!(probes.iter().all(|p| p.to == from()), "{probes:?}");
    let brr = r.refresh_requests(t0 + Duration::from_secs(16));
    assert_eq!(brr.len(), 1);
    assert_eq!(brr[0].to, from());
}

/// The replay state lives in memory; MESG-IDs older than the agent's start are refused, so
/// an update captured before a restart cannot be replayed after it (RFC 4285 section 6's
/// MIPV6-ID-MISMATCH, with the agent's time).
#[test]
fn updates_older_than_the_agents_start_are_refused() {
    let now = Instant::now();
    let captured = Bu::new(1, WALL - (2 << 32)).bytes();
    // Before the restart it was fresh.
    let mut before = registry(Limits::default(), 30);
    assert_eq!(
        before.handle(&captured, from(), now, WALL).counted,
        "registered"
    );
    // The restarted agent, started at WALL - 1 s.
    let mut r = registry(Limits::default(), 30).refusing_mesg_ids_before(WALL - (1 << 32));
    let o = r.handle(&captured, from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ID_MISMATCH);
    let ba = wire::decode(&o.reply.as_ref().unwrap().payload).unwrap();
    assert_eq!(ba.options.mesg_id, Some(WALL));
    assert!(!o.changed);
    assert!(r.report(now, None).bindings.is_empty(), "nothing bound");
    // A reload keeps the start.
    let reloaded = registry(Limits::default(), 30);
    r.update_policy(reloaded);
    let o = r.handle(&captured, from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ID_MISMATCH);
    // A fresh update is accepted.
    let o = r.handle(&Bu::new(2, WALL).bytes(), from(), now, WALL);
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::ACCEPTED);
}
