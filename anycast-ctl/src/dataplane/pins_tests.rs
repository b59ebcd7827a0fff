//! Exceptions against constructed tables, and the install rule, without a kernel.
use super::*;

const RING: u32 = 97;
const CONFIG: FlowConfig = FlowConfig::new(300, 30, 10);
const NOW: u32 = 1000;

fn sizes() -> Sizes {
    Sizes {
        max_preference_tables: 4,
        ..Sizes::new(RING, 8, 1024)
    }
}

fn server(name: &str, address: &str, weight: u32, up: bool) -> DesiredServer {
    DesiredServer {
        name: name.into(),
        address: address.parse().unwrap(),
        weight,
        up,
    }
}

fn web(servers: Vec<DesiredServer>) -> DesiredService {
    DesiredService {
        name: "web".into(),
        key: ServiceKey::new("10.0.0.1".parse().unwrap(), anycast_common::PROTO_TCP, 80),
        servers,
        preferences: Vec::new(),
    }
}

fn two() -> Vec<DesiredServer> {
    vec![
        server("s1", "10.1.0.1", 100, true),
        server("s2", "10.1.0.2", 100, true),
    ]
}

fn installed(desired: &[DesiredService]) -> Installed {
    let mut i = Installed::new(sizes());
    i.plan(desired).expect("plan");
    i
}

/// Client flows to the web service from many ports.
fn flows(n: u16) -> Vec<FlowKey> {
    (0..n)
        .map(|p| {
            FlowKey::new(
                "192.0.2.7".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
                anycast_common::PROTO_TCP,
                10_000 + p,
                80,
            )
        })
        .collect()
}

/// The entry the data path writes for `key` under `view`'s tables, seen at `NOW`.
fn chosen(view: &PinView, key: &FlowKey) -> FlowValue {
    let (_, svc) = view.service_of(key).expect("service");
    let slot = view.table_choice(svc, key).expect("a table");
    FlowValue {
        server: slot,
        generation: view.slots[&slot].generation,
        last_seen: NOW,
        flags: 0,
    }
}

fn address_of(view: &PinView, slot: u32) -> IpAddr {
    view.slots[&slot].address
}

#[test]
fn adding_a_server_makes_exactly_the_flows_it_takes_exceptions() {
    let mut inst = installed(&[web(two())]);
    let before = PinView::of(&inst);
    let keys = flows(400);
    let entries: Vec<(FlowKey, FlowValue)> =
        keys.iter().map(|k| (*k, chosen(&before, k))).collect();
    // Nothing is an exception under the table that chose them.
    assert!(entries
        .iter()
        .all(|(k, v)| before.exception(&CONFIG, NOW, k, v).is_none()));
    let mut three = two();
    three.push(server("s3", "10.1.0.3", 100, true));
    inst.plan(&[web(three)]).expect("plan");
    let after = PinView::of(&inst);
    let mut moved = 0;
    for (k, v) in &entries {
        let now_choice = chosen(&after, k).server;
        let pin = after.exception(&CONFIG, NOW, k, v);
        if now_choice == v.server {
            assert_eq!(pin, None, "{k:?} stays on its server");
        } else {
            moved += 1;
            // Minimal disruption: only the new server takes entries.
            assert_eq!(
                address_of(&after, now_choice),
                "10.1.0.3".parse::<IpAddr>().unwrap()
            );
            let pin = pin.expect("an exception");
            assert_eq!(pin.key, *k);
            assert_eq!(pin.server, address_of(&before, v.server));
            assert!(!pin.closing);
            assert_eq!(pin.idle_left_secs, 300);
        }
    }
    // About a third of the flows.
    assert!((90..180).contains(&moved), "{moved} of 400");
}

#[test]
fn a_drained_server_s_flows_are_exceptions_a_down_server_s_are_not() {
    let mut inst = installed(&[web(two())]);
    let before = PinView::of(&inst);
    let entries: Vec<(FlowKey, FlowValue)> = flows(200)
        .iter()
        .map(|k| (*k, chosen(&before, k)))
        .collect();
    let s1: IpAddr = "10.1.0.1".parse().unwrap();
    let on_s1 = entries
        .iter()
        .filter(|(_, v)| address_of(&before, v.server) == s1)
        .count();
    assert!(on_s1 > 50);
    // Drained: weight 0, still up.
    inst.plan(&[web(vec![
        server("s1", "10.1.0.1", 0, true),
        server("s2", "10.1.0.2", 100, true),
    ])])
    .unwrap();
    let drained = PinView::of(&inst);
    let pins: Vec<FlowPin> = entries
        .iter()
        .filter_map(|(k, v)| drained.exception(&CONFIG, NOW, k, v))
        .collect();
    assert_eq!(pins.len(), on_s1);
    assert!(pins.iter().all(|p| p.server == s1));
    // Down: its flows are re-chosen anyway, nothing to pin.
    inst.plan(&[web(vec![
        server("s1", "10.1.0.1", 100, false),
        server("s2", "10.1.0.2", 100, true),
    ])])
    .unwrap();
    let down = PinView::of(&inst);
    assert!(entries
        .iter()
        .all(|(k, v)| down.exception(&CONFIG, NOW, k, v).is_none()));
}

#[test]
fn learned_expired_and_reused_slot_entries_are_not_exceptions() {
    let mut inst = installed(&[web(two())]);
    let before = PinView::of(&inst);
    let (k, v) = flows(200)
        .iter()
        .map(|k| (*k, chosen(&before, k)))
        .find(|(_, v)| address_of(&before, v.server) == "10.1.0.1".parse::<IpAddr>().unwrap())
        .unwrap();
    inst.plan(&[web(vec![
        server("s1", "10.1.0.1", 0, true),
        server("s2", "10.1.0.2", 100, true),
    ])])
    .unwrap();
    let view = PinView::of(&inst);
    assert!(view.exception(&CONFIG, NOW, &k, &v).is_some());
    let learned = FlowValue {
        flags: FLOW_LEARNED,
        ..v
    };
    assert_eq!(view.exception(&CONFIG, NOW, &k, &learned), None);
    let timeout = CONFIG.timeout(k.proto, 0);
    let old = FlowValue {
        last_seen: NOW - timeout - 1,
        ..v
    };
    assert_eq!(view.exception(&CONFIG, NOW, &k, &old), None);
    let other_generation = FlowValue {
        generation: v.generation + 1,
        ..v
    };
    assert_eq!(view.exception(&CONFIG, NOW, &k, &other_generation), None);
    // Closing, idle for 4 ticks: the closing timeout's rest.
    let closing = FlowValue {
        flags: FLOW_CLOSING,
        last_seen: NOW - 4,
        ..v
    };
    let pin = view.exception(&CONFIG, NOW, &k, &closing).unwrap();
    assert!(pin.closing);
    let rest = anycast_common::flow_ticks_as_secs(CONFIG.timeout(k.proto, FLOW_CLOSING) - 4);
    assert_eq!(pin.idle_left_secs as u32, rest);
}

#[test]
fn a_preferred_client_is_judged_by_its_preference_s_table() {
    let s3: IpAddr = "10.1.0.3".parse().unwrap();
    let mut servers = two();
    servers.push(server("s3", "10.1.0.3", 100, true));
    let mut svc = web(servers.clone());
    svc.preferences = vec![Preference {
        clients: vec![("192.0.2.0".parse().unwrap(), 24)],
        servers: vec![s3],
    }];
    let inst = installed(&[svc]);
    let view = PinView::of(&inst);
    // Every preferred client's table choice is s3 (the only preferred server): pinned to
    // s3 is no exception, pinned to s1 is.
    let s3_slot = view.services.values().next().unwrap().servers[&s3];
    let s1_slot = view.services.values().next().unwrap().servers[&"10.1.0.1".parse().unwrap()];
    for k in flows(50) {
        let on = |slot| FlowValue {
            server: slot,
            generation: view.slots[&slot].generation,
            last_seen: NOW,
            flags: 0,
        };
        assert_eq!(view.exception(&CONFIG, NOW, &k, &on(s3_slot)), None);
        assert!(view.exception(&CONFIG, NOW, &k, &on(s1_slot)).is_some());
    }
    // A client outside the prefix uses the service's table: some flows pinned to s3 are
    // exceptions there (s3 has a third of that table).
    let outside = flows(60).into_iter().map(|mut k| {
        k.src = anycast_common::addr_words("198.51.100.9".parse().unwrap()).0;
        k
    });
    let exceptions = outside
        .filter(|k| {
            let v = FlowValue {
                server: s3_slot,
                generation: view.slots[&s3_slot].generation,
                last_seen: NOW,
                flags: 0,
            };
            view.exception(&CONFIG, NOW, k, &v).is_some()
        })
        .count();
    assert!((20..60).contains(&exceptions), "{exceptions}");
}

fn pin_to(server: &str, key: FlowKey) -> FlowPin {
    FlowPin {
        key,
        server: server.parse().unwrap(),
        closing: false,
        idle_left_secs: 120,
    }
}

#[test]
fn a_pin_takes_the_receiver_s_own_slot_or_is_refused() {
    // The receiver took its slots in another order: s2 first.
    let inst = installed(&[web(vec![
        server("s2", "10.1.0.2", 100, true),
        server("s1", "10.1.0.1", 100, false),
    ])]);
    let view = PinView::of(&inst);
    let key = flows(1)[0];
    let s2_slot = view.services.values().next().unwrap().servers[&"10.1.0.2".parse().unwrap()];
    let v = view
        .pin_value(&CONFIG, NOW, &pin_to("10.1.0.2", key))
        .unwrap();
    assert_eq!(v.server, s2_slot);
    assert_eq!(v.generation, view.slots[&s2_slot].generation);
    assert_eq!(v.flags, FLOW_LEARNED);
    // Expires when the sender's would: 120 of 300 s left.
    let timeout = CONFIG.timeout(key.proto, 0);
    assert_eq!(NOW - v.last_seen, timeout - anycast_common::flow_ticks(120));
    assert!(!CONFIG.expired(key.proto, &v, NOW));
    assert_eq!(
        view.pin_value(&CONFIG, NOW, &pin_to("10.1.0.9", key)),
        Err(PinOutcome::UnknownServer)
    );
    assert_eq!(
        view.pin_value(&CONFIG, NOW, &pin_to("10.1.0.1", key)),
        Err(PinOutcome::ServerDown)
    );
    let mut elsewhere = key;
    elsewhere.dport = 81;
    assert_eq!(
        view.pin_value(&CONFIG, NOW, &pin_to("10.1.0.2", elsewhere)),
        Err(PinOutcome::UnknownService)
    );
    // A pin of an IPv6 flow for an IPv4 service's address is no service here either.
    let v6 = FlowKey::new(
        "2001:db8::7".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
        anycast_common::PROTO_TCP,
        1234,
        80,
    );
    assert_eq!(
        view.pin_value(&CONFIG, NOW, &pin_to("10.1.0.2", v6)),
        Err(PinOutcome::UnknownService)
    );
    // A huge idle time left is held to the receiver's own timeout.
    let long = FlowPin {
        idle_left_secs: u16::MAX,
        ..pin_to("10.1.0.2", key)
    };
    assert_eq!(view.pin_value(&CONFIG, NOW, &long).unwrap().last_seen, NOW);
}

#[test]
fn the_receiver_s_own_live_choice_wins_a_learned_or_dead_entry_does_not() {
    let inst = installed(&[web(two())]);
    let view = PinView::of(&inst);
    let key = flows(1)[0];
    let wanted = view
        .pin_value(&CONFIG, NOW, &pin_to("10.1.0.2", key))
        .unwrap();
    let s1 = view.services.values().next().unwrap().servers[&"10.1.0.1".parse().unwrap()];
    let own = |server: u32, last_seen: u32, flags: u32| FlowValue {
        server,
        generation: view.slots[&server].generation,
        last_seen,
        flags,
    };
    let decide =
        |existing: Option<FlowValue>| decide(&view, &CONFIG, NOW, &key, existing.as_ref(), wanted);
    assert_eq!(decide(None), Ok(Some(wanted)));
    // Its own live entry to another server: kept.
    assert_eq!(decide(Some(own(s1, NOW, 0))), Err(PinOutcome::Local));
    // Its own entry to the same server: kept.
    assert_eq!(
        decide(Some(own(wanted.server, NOW, 0))),
        Err(PinOutcome::Kept)
    );
    // Its own entry, expired: replaced.
    assert_eq!(decide(Some(own(s1, NOW - 400, 0))), Ok(Some(wanted)));
    // Its own entry on a slot given to another server since: replaced.
    let reused = FlowValue {
        generation: view.slots[&s1].generation + 1,
        ..own(s1, NOW, 0)
    };
    assert_eq!(decide(Some(reused)), Ok(Some(wanted)));
    // Learned from a peer: the newer word wins.
    assert_eq!(decide(Some(own(s1, NOW, FLOW_LEARNED))), Ok(Some(wanted)));
    assert_eq!(
        decide(Some(own(wanted.server, wanted.last_seen - 5, FLOW_LEARNED))),
        Ok(Some(wanted))
    );
    assert_eq!(
        decide(Some(own(wanted.server, wanted.last_seen, FLOW_LEARNED))),
        Err(PinOutcome::Kept)
    );
}

#[test]
fn a_view_compares_tables_by_identity_and_changes_with_a_publish() {
    let mut inst = installed(&[web(two())]);
    let a = PinView::of(&inst);
    assert_eq!(a, PinView::of(&inst));
    // The same desired state again: nothing rebuilt, the same view.
    inst.plan(&[web(two())]).unwrap();
    assert_eq!(a, PinView::of(&inst));
    inst.plan(&[web(vec![server("s1", "10.1.0.1", 100, true)])])
        .unwrap();
    assert_ne!(a, PinView::of(&inst));
}

#[test]
fn a_new_view_is_scanned_at_once_then_at_most_a_tenth_of_the_time() {
    let (handle, end) = pins_channel(Box::new(|_| {}));
    let mut w = end.worker;
    assert_eq!(w.pending_scan(), None, "no view yet");
    let inst = installed(&[web(two())]);
    handle.publish(PinView::of(&inst));
    let now = std::time::Instant::now();
    assert!(w
        .pending_scan()
        .is_some_and(|t| t <= std::time::Instant::now()));
    // Scanned: nothing waits until the next view.
    w.scanned = 1;
    w.last_scan = Some((now, std::time::Duration::from_millis(50)));
    assert_eq!(w.pending_scan(), None);
    // The same view again is no new view.
    handle.publish(PinView::of(&inst));
    assert_eq!(w.pending_scan(), None);
    let mut changed = inst.clone();
    changed
        .plan(&[web(vec![server("s1", "10.1.0.1", 100, true)])])
        .unwrap();
    handle.publish(PinView::of(&changed));
    assert_eq!(
        w.pending_scan(),
        Some(now + std::time::Duration::from_millis(50)),
        "waits its turn"
    );
}
