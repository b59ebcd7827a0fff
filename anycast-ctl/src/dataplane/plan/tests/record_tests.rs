//! Adopting an earlier controller's record: a new controller keeps every slot and service
//! id, writes each table into the half the data path is not reading (as the maps say), and
//! never gives a slot a generation a flow could already carry.
use super::*;

/// What the maps would hold after carrying out `installed`'s plans.
fn truth_of(installed: &Installed) -> MapTruth {
    let ring = installed.sizes.ring_size;
    let mut servers = vec![ServerInfo::default(); MAX_SERVERS as usize];
    for svc in installed.services.values() {
        for s in &svc.servers {
            servers[s.slot as usize].generation = installed.generations[s.slot as usize];
        }
    }
    MapTruth {
        services: installed
            .services
            .iter()
            .map(|(k, s)| (*k, s.info(ring, 0)))
            .collect(),
        servers,
        preferences: Vec::new(),
    }
}

fn through_json(record: InstalledRecord) -> InstalledRecord {
    serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap()
}

fn table_halves(ops: &[Op], ring: u32) -> Vec<u32> {
    ops.iter()
        .filter_map(|op| match op {
            Op::WriteTable(w) => w.entries().next().map(|(i, _)| (i / ring) % 2),
            _ => None,
        })
        .collect()
}

#[test]
fn an_adopted_record_keeps_slots_and_ids_and_writes_the_half_not_read() {
    let desired = vec![
        web(vec![
            server("a", "10.1.0.1", true),
            server("b", "10.1.0.2", true),
        ]),
        service("dns", "10.0.0.2", vec![server("c", "10.1.0.3", true)]),
    ];
    let mut old = Installed::new(sizes());
    old.plan(&desired).unwrap();
    // A second change, so one service's live half is 1 and the other's 0.
    let mut changed = desired.clone();
    changed[0].servers[1].weight = 50;
    old.plan(&changed).unwrap();
    let truth = truth_of(&old);
    let (mut adopted, strays) =
        Installed::adopt(sizes(), through_json(old.record()), &truth).unwrap();
    assert!(strays.is_empty());
    for (key, svc) in &old.services {
        let a = &adopted.services[key];
        assert_eq!(a.id, svc.id, "service id kept");
        assert_eq!(
            a.area.live_half, svc.area.live_half,
            "live half as the map says"
        );
        for s in &svc.servers {
            assert_eq!(
                slot_of(&adopted, key, &s.address.to_string()),
                s.slot,
                "slot kept"
            );
        }
    }
    let ops = adopted.plan(&changed).unwrap();
    assert!(
        !ops.iter().any(|op| matches!(
            op,
            Op::ResetServerCounters { .. } | Op::ResetServiceCounters { .. }
        )),
        "no slot or id taken anew, no counter reset: {ops:#?}"
    );
    // Every table goes whole into the half the data path is not reading, then switches.
    let ring = sizes().ring_size;
    let web_key = changed[0].key;
    let web_half = old.services[&web_key].area.live_half;
    let halves = table_halves(&ops, ring);
    assert_eq!(halves.len(), 2, "both services' tables rewritten: {ops:#?}");
    assert!(halves.contains(&(1 - web_half)));
    for op in &ops {
        if let Op::WriteTable(w) = op {
            assert_eq!(w.len() as u32, ring, "written whole");
        }
    }
    assert!(first(&ops, "a table", is_table) < first(&ops, "a switch", is_publish));
    // The same servers, generations unchanged: flows keep their servers.
    for op in &ops {
        if let Op::WriteServer { slot, info } = op {
            if info.family != 0 {
                assert_eq!(info.generation, old.generations[*slot as usize]);
            }
        }
    }
}

#[test]
fn the_maps_win_where_the_record_is_behind() {
    let desired = vec![web(vec![server("a", "10.1.0.1", true)])];
    let mut old = Installed::new(sizes());
    old.plan(&desired).unwrap();
    let record = old.record();
    // After the record was saved: the table switched, slot 7 was taken (generation 5) and
    // a service appeared that the record does not know.
    let mut truth = truth_of(&old);
    let key = desired[0].key;
    let ring = sizes().ring_size;
    let live = old.services[&key].area.live_half;
    truth.services[0].1.ring_base = (old.services[&key].id * 2 + (1 - live)) * ring;
    truth.servers[7].generation = 5;
    let stray = ServiceKey::new("10.0.0.9".parse().unwrap(), anycast_common::PROTO_UDP, 53);
    truth.services.push((stray, ServiceInfo::default()));
    let (mut adopted, strays) = Installed::adopt(sizes(), record, &truth).unwrap();
    assert_eq!(adopted.services[&key].area.live_half, 1 - live);
    assert_eq!(strays, vec![stray]);
    assert_eq!(adopted.generations[7], 5);
    // The next table goes into the half the data path is not reading now.
    let mut changed = desired.clone();
    changed[0].servers.push(server("b", "10.1.0.2", true));
    let ops = adopted.plan(&changed).unwrap();
    assert_eq!(table_halves(&ops, ring), vec![live]);
}

#[test]
fn a_record_for_other_sizes_or_format_is_refused() {
    let mut old = Installed::new(sizes());
    old.plan(&[web(vec![server("a", "10.1.0.1", true)])])
        .unwrap();
    let truth = truth_of(&old);
    let bigger = Sizes {
        max_preference_tables: 4,
        ..Sizes::new(RING, 16, 1024)
    };
    let e = Installed::adopt(bigger, old.record(), &truth)
        .err()
        .expect("refused");
    assert!(format!("{e:#}").contains("max_services"), "{e:#}");
    let mut json: serde_json::Value = serde_json::to_value(old.record()).unwrap();
    json["format"] = serde_json::json!(99);
    let e = Installed::adopt(sizes(), serde_json::from_value(json).unwrap(), &truth)
        .err()
        .expect("refused");
    assert!(format!("{e:#}").contains("format 99"), "{e:#}");
    // A service id in the map other than the record's: refused, not guessed.
    let mut wrong = truth;
    wrong.services[0].1.id += 1;
    assert!(Installed::adopt(sizes(), old.record(), &wrong).is_err());
}
