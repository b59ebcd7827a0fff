//! Topology preferences: clients in a preferred prefix go to their servers, and fall back
//! to the whole service when those cannot take flows.
use std::net::{IpAddr, Ipv6Addr};

use anycast_common::{maps, PreferenceTable, PROTO_TCP};
use anycast_ctl::dataplane::{Dataplane, DesiredService, Preference};
use anycast_tests::packet::{TCP_ACK, TCP_SYN};
use anyhow::Result;
use aya::maps::{lpm_trie::Key as LpmKey, LpmTrie, MapData};

use crate::harness::*;

const PREF_ADDR: &str = "192.0.2.95";
const PREF_ADDR6: &str = "2001:db8::95";

fn prefix(p: &str) -> (IpAddr, u8) {
    let (a, l) = p.split_once('/').expect("a prefix");
    (a.parse().unwrap(), l.parse().unwrap())
}

fn preference(clients: &[&str], servers: &[&str]) -> Preference {
    Preference {
        clients: clients.iter().map(|c| prefix(c)).collect(),
        servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// 192.0.2.95 tcp 80 over A, B, C, D:
/// - 198.51.100.0/24 prefers C,
/// - 198.51.100.128/25 (inside it, so more specific) prefers D,
/// - 203.0.113.0/25 prefers A and B.
fn preferred_service(edit: impl Fn(&mut DesiredService)) -> Vec<DesiredService> {
    let mut svc = service(
        "pref",
        PREF_ADDR,
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1), (SERVER_D, 1)],
    );
    svc.preferences = vec![
        preference(&["198.51.100.0/24"], &[SERVER_C]),
        preference(&["198.51.100.128/25"], &[SERVER_D]),
        preference(&["203.0.113.0/25", "203.0.113.0/26"], &[SERVER_A, SERVER_B]),
    ];
    edit(&mut svc);
    vec![svc]
}

/// `n` flows to the preference service from clients `base.1`, `base.2`, ... (IPv4 /24).
fn clients(base: [u8; 3], first_host: u8, n: u8, first_port: u16) -> Vec<Flow> {
    (0..n)
        .map(|i| Flow {
            src: IpAddr::from([base[0], base[1], base[2], first_host + i]),
            dst: PREF_ADDR.parse().unwrap(),
            proto: PROTO_TCP,
            sport: first_port + u16::from(i),
            dport: 80,
        })
        .collect()
}

#[test]
fn preferred_clients_go_to_their_servers_and_fall_back_when_those_cannot_take_flows() -> Result<()>
{
    let mut h = Harness::new()?;
    h.dataplane.apply(&preferred_service(|_| ()))?;
    let low = clients([198, 51, 100], 1, 100, 30000); // 198.51.100.1-100: C
    let high = clients([198, 51, 100], 129, 100, 30000); // .129-.228: D
    let ab = clients([203, 0, 113], 1, 100, 30000); // 203.0.113.1-100: /25 -> A, B
    let ab_outside = clients([203, 0, 113], 129, 100, 30000); // .129-.228: no preference
    let others = clients([100, 64, 0], 1, 100, 30000); // no preference

    let id = h.dataplane.report()?.services[0].id;
    let entries = h.dataplane.preference_entries()?;
    let mut keys: Vec<(IpAddr, u8)> = entries
        .iter()
        .map(|(k, _)| {
            assert_eq!(k.service, id, "entries are keyed by the service's id");
            k.client(anycast_common::FAMILY_V4)
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "198.51.100.0/24",
            "198.51.100.128/25",
            "203.0.113.0/25",
            "203.0.113.0/26"
        ]
        .map(prefix)
        .to_vec(),
        "one LPM entry per client prefix"
    );

    let c = addrs(&[SERVER_C]);
    let d = addrs(&[SERVER_D]);
    let a_b = addrs(&[SERVER_A, SERVER_B]);
    let all = addrs(&[SERVER_A, SERVER_B, SERVER_C, SERVER_D]);
    assert_eq!(
        servers_used(&send_all(&h, &low, TCP_SYN)?),
        c,
        "198.51.100.0/24 -> C"
    );
    assert_eq!(
        servers_used(&send_all(&h, &high, TCP_SYN)?),
        d,
        "the longer /25 -> D"
    );
    assert_eq!(
        servers_used(&send_all(&h, &ab, TCP_SYN)?),
        a_b,
        "203.0.113.0/25 -> A and B"
    );
    assert_eq!(
        servers_used(&send_all(&h, &ab_outside, TCP_SYN)?),
        all,
        "203.0.113.128/25 has no preference: all four"
    );
    assert_eq!(
        servers_used(&send_all(&h, &others, TCP_SYN)?),
        all,
        "others: all four"
    );

    // C goes down: its clients' flows move, and new ones, to the whole service (C excepted).
    let c_down = preferred_service(|s| s.servers[2].up = false);
    h.dataplane.apply(&c_down)?;
    assert_eq!(
        h.dataplane.preference_entries()?.len(),
        3,
        "a preference whose servers cannot take flows has no LPM entries"
    );
    let rest = addrs(&[SERVER_A, SERVER_B, SERVER_D]);
    let moved = send_all(&h, &low, TCP_ACK)?;
    assert_eq!(
        servers_used(&moved),
        rest,
        "C's clients fall back to A, B and D"
    );
    let new_low = clients([198, 51, 100], 1, 100, 31000);
    assert_eq!(servers_used(&send_all(&h, &new_low, TCP_SYN)?), rest);
    assert_eq!(
        servers_used(&send_all(&h, &high, TCP_ACK)?),
        d,
        "D's clients are unaffected"
    );

    // C back up, but draining (weight 0): no new flows for it, so still no preference;
    // flows pinned to it before would stay (here none are: they moved while it was down).
    h.dataplane
        .apply(&preferred_service(|s| s.servers[2].weight = 0))?;
    assert_eq!(h.dataplane.preference_entries()?.len(), 3);
    let newer_low = clients([198, 51, 100], 1, 100, 32000);
    assert_eq!(servers_used(&send_all(&h, &newer_low, TCP_SYN)?), rest);

    // C able again: new flows of its clients go to it, established ones stay where they are.
    h.dataplane.apply(&preferred_service(|_| ()))?;
    assert_eq!(h.dataplane.preference_entries()?.len(), 4);
    let newest_low = clients([198, 51, 100], 1, 100, 33000);
    assert_eq!(servers_used(&send_all(&h, &newest_low, TCP_SYN)?), c);
    assert_eq!(
        send_all(&h, &low, TCP_ACK)?,
        moved,
        "established flows keep their servers"
    );

    // One of A and B down: the preference shrinks to the other.
    h.dataplane
        .apply(&preferred_service(|s| s.servers[0].up = false))?;
    let ab_new = clients([203, 0, 113], 1, 100, 34000);
    assert_eq!(
        servers_used(&send_all(&h, &ab_new, TCP_SYN)?),
        addrs(&[SERVER_B])
    );

    // Preferences removed (and A up again): every client is hashed over the whole service,
    // the map empties.
    h.dataplane
        .apply(&preferred_service(|s| s.preferences.clear()))?;
    assert!(h.dataplane.preference_entries()?.is_empty());
    let plain = clients([198, 51, 100], 1, 100, 35000);
    assert_eq!(
        servers_used(&send_all(&h, &plain, TCP_SYN)?),
        addrs(&[SERVER_A, SERVER_B, SERVER_C, SERVER_D])
    );
    Ok(())
}

#[test]
fn ipv6_clients_get_their_preference_too() -> Result<()> {
    let mut h = Harness::new()?;
    let mut svc = service(
        "pref6",
        PREF_ADDR6,
        PROTO_TCP,
        443,
        &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
    );
    svc.preferences = vec![preference(&["2001:db8:ffff::/48"], &[SERVER_B])];
    h.dataplane.apply(&[svc])?;
    let flow = |src: Ipv6Addr, i: u16| Flow {
        src: IpAddr::V6(src),
        dst: PREF_ADDR6.parse().unwrap(),
        proto: PROTO_TCP,
        sport: 36000 + i,
        dport: 443,
    };
    let preferred: Vec<Flow> = (0..60)
        .map(|i| flow(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, i, 0, 0, 0, 7), i))
        .collect();
    let others: Vec<Flow> = (0..60)
        .map(|i| flow(Ipv6Addr::new(0x2001, 0xdb8, 0xfffe, i, 0, 0, 0, 7), i))
        .collect();
    assert_eq!(
        servers_used(&send_all(&h, &preferred, TCP_SYN)?),
        addrs(&[SERVER_B])
    );
    assert_eq!(
        servers_used(&send_all(&h, &others, TCP_SYN)?),
        addrs(&[SERVER_A, SERVER_B, SERVER_C])
    );
    Ok(())
}

/// The agent program's `PREFERENCES` map, opened by id behind the data plane's back, so a
/// test can put in an entry the controller would never write.
fn raw_preferences(dp: &Dataplane) -> Result<LpmTrie<MapData, [u32; 5], PreferenceTable>> {
    Ok(LpmTrie::try_from(agent_map(dp, maps::PREFERENCES)?)?)
}

#[test]
fn services_without_preferences_never_consult_the_preference_map() -> Result<()> {
    let mut h = Harness::new()?;
    let plain_addr = "192.0.2.96";
    let plain = |prefs: Vec<Preference>| {
        let mut s = service(
            "plain",
            plain_addr,
            PROTO_TCP,
            80,
            &[(SERVER_A, 1), (SERVER_B, 1), (SERVER_C, 1)],
        );
        s.preferences = prefs;
        s
    };
    let plain_flows = |first_port: u16| -> Vec<Flow> {
        clients([198, 51, 100], 1, 100, first_port)
            .into_iter()
            .map(|mut f| {
                f.dst = plain_addr.parse().unwrap();
                f
            })
            .collect()
    };
    let three = addrs(&[SERVER_A, SERVER_B, SERVER_C]);

    // With the map empty.
    h.dataplane.apply(&[plain(vec![])])?;
    assert!(h.dataplane.preference_entries()?.is_empty());
    let alone = send_all(&h, &plain_flows(37000), TCP_SYN)?;
    assert_eq!(servers_used(&alone), three);

    // Another service prefers A for every client (a /0): not for this service.
    let mut greedy = service(
        "greedy",
        PREF_ADDR,
        PROTO_TCP,
        80,
        &[(SERVER_A, 1), (SERVER_B, 1)],
    );
    greedy.preferences = vec![preference(&["0.0.0.0/0"], &[SERVER_A])];
    h.dataplane.apply(&[plain(vec![]), greedy.clone()])?;
    let entries = h.dataplane.preference_entries()?;
    assert_eq!(entries.len(), 1);
    let only_a = entries[0].1;
    let greedy_flows = clients([198, 51, 100], 1, 50, 37000);
    assert_eq!(
        servers_used(&send_all(&h, &greedy_flows, TCP_SYN)?),
        addrs(&[SERVER_A])
    );
    assert_eq!(
        servers_used(&send_all(&h, &plain_flows(37100), TCP_SYN)?),
        three
    );

    // Now an entry for this very service, every client, to the A-only table, which the
    // controller would never write for a service without preferences: the data path does
    // not look.
    let id = h
        .dataplane
        .report()?
        .services
        .iter()
        .find(|s| s.name == "plain")
        .expect("installed")
        .id;
    let mut raw = raw_preferences(&h.dataplane)?;
    raw.insert(&LpmKey::new(32, [id, 0, 0, 0, 0]), only_a, 0)?;
    assert_eq!(
        servers_used(&send_all(&h, &plain_flows(37200), TCP_SYN)?),
        three,
        "a service without preferences ignores the map"
    );

    // Control: once the service has a preference (for other clients), the same entry
    // catches these clients.
    h.dataplane.apply(&[
        plain(vec![preference(&["10.0.0.0/8"], &[SERVER_B])]),
        greedy,
    ])?;
    assert_eq!(
        servers_used(&send_all(&h, &plain_flows(37300), TCP_SYN)?),
        addrs(&[SERVER_A]),
        "control: with preferences the map is consulted"
    );
    Ok(())
}

#[test]
fn invalid_or_too_many_preferences_are_refused_before_anything_changes() -> Result<()> {
    let mut h = Harness::new()?;
    let before = preferred_service(|_| ());
    h.dataplane.apply(&before)?;
    let entries = h.dataplane.preference_entries()?.len();
    for (what, bad) in [
        (
            "an IPv6 client prefix on an IPv4 service",
            preferred_service(|s| s.preferences[0].clients.push(prefix("2001:db8::/32"))),
        ),
        (
            "a /33 IPv4 prefix",
            preferred_service(|s| s.preferences[0].clients.push(prefix("10.0.0.0/33"))),
        ),
        (
            "more preference tables than max_preference_tables (16)",
            preferred_service(|s| {
                s.preferences = (0..17u8)
                    .map(|i| preference(&[&format!("10.{i}.0.0/16")], &[SERVER_A]))
                    .collect()
            }),
        ),
    ] {
        let err = h.dataplane.apply(&bad).err();
        assert!(err.is_some(), "{what}: accepted");
        eprintln!("{what}: {:#}", err.unwrap());
        assert_eq!(
            h.dataplane.preference_entries()?.len(),
            entries,
            "{what}: map changed"
        );
    }
    // Still as before.
    let low = clients([198, 51, 100], 1, 20, 38000);
    assert_eq!(
        servers_used(&send_all(&h, &low, TCP_SYN)?),
        addrs(&[SERVER_C])
    );
    Ok(())
}
