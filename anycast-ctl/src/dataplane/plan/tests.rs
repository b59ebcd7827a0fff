//! The plan's ordering rules, without a kernel: each test asks for a change and checks the
//! order of the operations against what packets in flight need.
use super::*;

mod record_tests;

const RING: u32 = 97;

fn sizes() -> Sizes {
    Sizes {
        max_preference_tables: 4,
        ..Sizes::new(RING, 8, 1024)
    }
}

fn server(name: &str, address: &str, up: bool) -> DesiredServer {
    DesiredServer {
        name: name.into(),
        address: address.parse().unwrap(),
        weight: 100,
        up,
    }
}

fn service(name: &str, address: &str, servers: Vec<DesiredServer>) -> DesiredService {
    DesiredService {
        name: name.into(),
        key: ServiceKey::new(address.parse().unwrap(), anycast_common::PROTO_TCP, 80),
        servers,
        preferences: Vec::new(),
    }
}

fn web(servers: Vec<DesiredServer>) -> DesiredService {
    service("web", "10.0.0.1", servers)
}

/// Index of the first operation that `is` picks; panics with the plan if there is none.
fn first(ops: &[Op], what: &str, is: impl Fn(&Op) -> bool) -> usize {
    ops.iter()
        .position(is)
        .unwrap_or_else(|| panic!("no {what} in the plan: {ops:#?}"))
}

fn last(ops: &[Op], what: &str, is: impl Fn(&Op) -> bool) -> usize {
    ops.iter()
        .rposition(is)
        .unwrap_or_else(|| panic!("no {what} in the plan: {ops:#?}"))
}

fn is_table(op: &Op) -> bool {
    matches!(op, Op::WriteTable(_))
}

fn is_publish(op: &Op) -> bool {
    matches!(op, Op::PublishService { .. })
}

fn server_write(slot: u32, up: bool) -> impl Fn(&Op) -> bool {
    move |op| {
        matches!(op, Op::WriteServer { slot: s, info }
            if *s == slot && (info.flags & SERVER_UP != 0) == up && info.family != 0)
    }
}

fn slot_freed(slot: u32) -> impl Fn(&Op) -> bool {
    move |op| matches!(op, Op::WriteServer { slot: s, info } if *s == slot && *info == ServerInfo::default())
}

fn filter_word(set: bool) -> impl Fn(&Op) -> bool {
    move |op| matches!(op, Op::WriteFilterWord { value, .. } if (*value != 0) == set)
}

fn slot_of(installed: &Installed, key: &ServiceKey, address: &str) -> u32 {
    let address: IpAddr = address.parse().unwrap();
    installed.services[key]
        .servers
        .iter()
        .find(|s| s.address == address)
        .expect("installed")
        .slot
}

#[test]
fn adding_a_service_writes_counters_servers_table_and_filter_before_the_switch() {
    let mut installed = Installed::new(sizes());
    let want = web(vec![
        server("a", "10.1.0.1", true),
        server("b", "10.1.0.2", true),
    ]);
    let ops = installed.plan(std::slice::from_ref(&want)).unwrap();
    let publish = first(&ops, "service switch", is_publish);
    let table = first(&ops, "table write", is_table);
    let filter = first(&ops, "filter bit", filter_word(true));
    let counters = first(&ops, "service counters", |o| {
        matches!(o, Op::ResetServiceCounters { .. })
    });
    assert!(
        counters < publish && filter < publish && table < publish,
        "{ops:#?}"
    );
    for address in ["10.1.0.1", "10.1.0.2"] {
        let slot = slot_of(&installed, &want.key, address);
        let reset = first(
            &ops,
            "server counters",
            |o| matches!(o, Op::ResetServerCounters { slot: s } if *s == slot),
        );
        let write = first(&ops, "server write", server_write(slot, true));
        assert!(reset < write && write < table, "{address}: {ops:#?}");
    }
    // Reverse-tunnel entries for both real addresses, after the switch.
    let reverse = first(&ops, "reverse entry", |o| {
        matches!(o, Op::AddReverseAddress { .. })
    });
    assert!(reverse > publish);
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::AddReverseAddress { .. }))
            .count(),
        2
    );
    // Nothing changed: nothing to do.
    assert_eq!(installed.plan(&[want]).unwrap(), Vec::new());
}

#[test]
fn removing_a_service_switches_nothing_and_clears_its_filter_bit_after_removal() {
    let mut installed = Installed::new(sizes());
    let keep = service("keep", "10.0.0.9", vec![server("c", "10.1.0.3", true)]);
    let gone = web(vec![server("a", "10.1.0.1", true)]);
    installed.plan(&[keep.clone(), gone.clone()]).unwrap();
    let slot = slot_of(&installed, &gone.key, "10.1.0.1");
    let ops = installed.plan(std::slice::from_ref(&keep)).unwrap();
    let removed = first(
        &ops,
        "service removal",
        |o| matches!(o, Op::RemoveService { key } if *key == gone.key),
    );
    let freed = first(&ops, "slot freed", slot_freed(slot));
    let cleared = first(&ops, "filter cleared", filter_word(false));
    let reverse = first(&ops, "reverse removal", |o| {
        matches!(o, Op::RemoveReverseAddress { .. })
    });
    assert!(
        removed < freed,
        "the service goes before its slots: {ops:#?}"
    );
    assert!(
        removed < cleared,
        "the filter bit is cleared after the service: {ops:#?}"
    );
    assert_eq!(reverse, ops.len() - 1, "reverse entries go last: {ops:#?}");
    assert!(
        !ops.iter().any(is_table) && !ops.iter().any(is_publish),
        "the service that stays is left alone: {ops:#?}"
    );
    assert!(!installed.services.contains_key(&gone.key));
}

#[test]
fn a_server_going_down_is_written_before_any_table_of_any_service() {
    let mut installed = Installed::new(sizes());
    let both = |up: bool| {
        vec![
            web(vec![
                server("a", "10.1.0.1", up),
                server("b", "10.1.0.2", true),
            ]),
            service("other", "10.0.0.2", vec![server("c", "10.1.0.3", true)]),
        ]
    };
    installed.plan(&both(true)).unwrap();
    let key = both(true)[0].key;
    let slot = slot_of(&installed, &key, "10.1.0.1");
    // "other" also changes (a new server), so both services get new tables.
    let mut next = both(false);
    next[1].servers.push(server("d", "10.1.0.4", true));
    let ops = installed.plan(&next).unwrap();
    let down = first(&ops, "server down", server_write(slot, false));
    let table = first(&ops, "table write", is_table);
    assert!(down < table, "{ops:#?}");
    assert_eq!(
        ops.iter().filter(|o| is_publish(o)).count(),
        2,
        "both services switch to new tables: {ops:#?}"
    );
}

#[test]
fn a_leaving_server_keeps_its_slot_until_the_switch_away_from_it() {
    let mut installed = Installed::new(sizes());
    let want = web(vec![
        server("a", "10.1.0.1", true),
        server("b", "10.1.0.2", true),
    ]);
    installed.plan(std::slice::from_ref(&want)).unwrap();
    let slot_a = slot_of(&installed, &want.key, "10.1.0.1");
    let slot_b = slot_of(&installed, &want.key, "10.1.0.2");
    let ops = installed
        .plan(&[web(vec![
            server("b", "10.1.0.2", true),
            server("e", "10.1.0.5", true),
        ])])
        .unwrap();
    let table = first(&ops, "table write", is_table);
    let publish = first(&ops, "service switch", is_publish);
    let freed = first(&ops, "slot freed", slot_freed(slot_a));
    assert!(table < publish && publish < freed, "{ops:#?}");
    let new_slot = slot_of(&installed, &want.key, "10.1.0.5");
    assert_ne!(new_slot, slot_a, "a freed slot is not reused at once");
    assert!(first(&ops, "new server", server_write(new_slot, true)) < table);
    assert!(
        !ops.iter().any(server_write(slot_b, true)),
        "a server that stays unchanged is not rewritten: {ops:#?}"
    );
    // The table is written into the half the data path does not read: the switch points
    // at the other half.
    let Op::PublishService { info, .. } = &ops[publish] else {
        unreachable!()
    };
    let Op::WriteTable(w) = &ops[table] else {
        unreachable!()
    };
    assert!(w
        .entries()
        .all(|(i, _)| i >= info.ring_base && i < info.ring_base + RING));
}

#[test]
fn preference_tables_and_prefixes_are_written_before_the_switch_and_removed_after() {
    let mut installed = Installed::new(sizes());
    let mut want = web(vec![
        server("a", "10.1.0.1", true),
        server("b", "10.1.0.2", true),
    ]);
    want.preferences = vec![Preference {
        clients: vec![("192.168.0.0".parse().unwrap(), 16)],
        servers: vec!["10.1.0.1".parse().unwrap()],
    }];
    let ops = installed.plan(std::slice::from_ref(&want)).unwrap();
    let publish = first(&ops, "service switch", is_publish);
    let prefix = first(&ops, "preference prefix", |o| {
        matches!(o, Op::WritePreference { .. })
    });
    let tables = ops.iter().filter(|o| is_table(o)).count();
    assert_eq!(
        tables, 2,
        "the service's table and the preference's: {ops:#?}"
    );
    assert!(last(&ops, "table write", is_table) < prefix && prefix < publish);
    let Op::PublishService { info, .. } = &ops[publish] else {
        unreachable!()
    };
    assert_eq!(
        info.flags & SERVICE_HAS_PREFERENCES,
        SERVICE_HAS_PREFERENCES
    );

    // The preference goes: the service switches off preferences first, then the prefix goes.
    want.preferences.clear();
    let ops = installed.plan(&[want]).unwrap();
    let publish = first(&ops, "service switch", is_publish);
    let removed = first(&ops, "prefix removal", |o| {
        matches!(o, Op::RemovePreference { .. })
    });
    assert!(publish < removed, "{ops:#?}");
    let Op::PublishService { info, .. } = &ops[publish] else {
        unreachable!()
    };
    assert_eq!(info.flags & SERVICE_HAS_PREFERENCES, 0);
}

#[test]
fn refused_plans_change_nothing() {
    let mut installed = Installed::new(Sizes {
        max_preference_tables: 1,
        ..Sizes::new(RING, 2, 1024)
    });
    let a = service("a", "10.0.0.1", vec![server("a", "10.1.0.1", true)]);
    installed.plan(std::slice::from_ref(&a)).unwrap();
    let before = installed.plan(std::slice::from_ref(&a)).unwrap();
    assert!(before.is_empty());
    // Three services where two fit.
    let too_many = [
        a.clone(),
        service("b", "10.0.0.2", vec![]),
        service("c", "10.0.0.3", vec![]),
    ];
    let mut copy = installed.clone();
    let e = copy.plan(&too_many).unwrap_err();
    assert!(format!("{e:#}").contains("max_services is 2"), "{e:#}");
    // A prefix of the wrong family.
    let mut bad = a.clone();
    bad.preferences = vec![Preference {
        clients: vec![("fd00::".parse().unwrap(), 8)],
        servers: vec!["10.1.0.1".parse().unwrap()],
    }];
    let e = installed.clone().plan(&[bad]).unwrap_err();
    assert!(format!("{e:#}").contains("family"), "{e:#}");
    // The state the refusals were planned on still says what is installed.
    assert!(installed.plan(&[a]).unwrap().is_empty());
}

#[test]
fn after_a_failed_write_everything_is_written_again() {
    let mut installed = Installed::new(sizes());
    let want = web(vec![server("a", "10.1.0.1", true)]);
    installed.plan(std::slice::from_ref(&want)).unwrap();
    installed.forget_written();
    let ops = installed.plan(&[want]).unwrap();
    assert!(ops.iter().any(is_table), "{ops:#?}");
    assert!(ops.iter().any(is_publish), "{ops:#?}");
    assert!(ops.iter().any(server_write(0, true)), "{ops:#?}");
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::WriteFilterWord { .. }))
            .count(),
        ADDRESS_FILTER_WORDS as usize,
        "every filter word is written again"
    );
}
