use std::time::Duration;

use super::*;
use crate::dataplane::{DataplaneReport, ServerReport, ServiceReport, SweepReport};

/// A status with one service of two servers, with these counters.
pub(crate) fn status(s1: (u64, u64, u64), s2: (u64, u64, u64), tx: u64) -> Status {
    let server = |name: &str, slot, (packets, bytes, flows): (u64, u64, u64)| ServerReport {
        name: name.into(),
        address: "10.0.0.1".parse().unwrap(),
        weight: 100,
        state: "up".into(),
        slot,
        table_entries: 50,
        packets,
        bytes,
        syns: flows,
        flows,
    };
    let servers = vec![server("s1", 0, s1), server("s2", 1, s2)];
    Status {
        config: "/etc/anycast.json".into(),
        interfaces: vec![],
        agent_v4: None,
        agent_v6: None,
        dataplane: DataplaneReport {
            services: vec![ServiceReport {
                name: "web".into(),
                address: "10.9.0.1".parse().unwrap(),
                protocol: "tcp".into(),
                port: 80,
                id: 0,
                ring_size: 100,
                table_digest: String::new(),
                packets: s1.0 + s2.0,
                bytes: s1.1 + s2.1,
                syns: s1.2 + s2.2,
                flows: s1.2 + s2.2,
                servers,
            }],
            verdicts: vec![("tx".into(), tx), ("pass_not_service".into(), 7)],
            flow_table: SweepReport::default(),
            table_write_path: String::new(),
        },
        health: vec![],
        drained: vec![],
        instance: None,
        routing: None,
        relay: None,
    }
}

fn sample(secs: u64, status: Status) -> Sample {
    Sample {
        at: Duration::from_secs(secs),
        status,
    }
}

#[test]
fn rates_are_deltas_over_the_time_between_answers() {
    let a = sample(10, status((100, 10_000, 4), (0, 0, 0), 100));
    let b = sample(12, status((300, 30_000, 10), (50, 5_000, 2), 350));
    let v = view(Some(&a), &b);
    assert_eq!(v.over, 2.0);
    let web = &v.services[0];
    assert_eq!(
        web.rates,
        Some(Rates {
            packets: 125.0,
            bytes: 12_500.0,
            flows: 4.0,
            syns: 4.0
        })
    );
    assert_eq!(web.servers[0].rates.unwrap().packets, 100.0);
    assert_eq!(web.servers[1].rates.unwrap().flows, 1.0);
    assert_eq!(web.servers[0].share, 50.0);
    // Only verdicts that moved, highest first.
    assert_eq!(v.verdicts, vec![("tx".to_string(), 125.0)]);
}

#[test]
fn the_first_answer_has_no_rates_and_a_counter_that_went_back_counts_from_zero() {
    let a = sample(1, status((500, 50_000, 9), (0, 0, 0), 500));
    let v = view(None, &a);
    assert_eq!(v.services[0].rates, None);
    assert!(v.verdicts.is_empty());
    let text = lines(&v, 120).join("\n");
    assert!(text.contains("(after the next refresh)"), "{text}");
    // The agent started afresh: its counters are below the last answer's.
    let b = sample(2, status((20, 2_000, 1), (0, 0, 0), 20));
    let v = view(Some(&a), &b);
    assert_eq!(v.services[0].servers[0].rates.unwrap().packets, 20.0);
}

#[test]
fn lines_show_services_servers_and_verdicts_within_the_width() {
    let a = sample(0, status((0, 0, 0), (0, 0, 0), 0));
    let b = sample(1, status((1_500, 2_000_000, 30), (0, 0, 0), 1_500));
    let l = lines(&view(Some(&a), &b), 100);
    assert!(l.iter().all(|x| x.chars().count() <= 100));
    let text = l.join("\n");
    assert!(text.contains("web 10.9.0.1 tcp/80"), "{text}");
    assert!(text.contains("  s1"), "{text}");
    assert!(text.contains("1.5k"), "{text}");
    assert!(text.contains("2.0MB"), "{text}");
    assert!(text.contains("verdicts/s: tx 1.5k"), "{text}");
}

#[test]
fn si_suffixes() {
    assert_eq!(si(0.0), "0");
    assert_eq!(si(12.34), "12.3");
    assert_eq!(si(999.0), "999");
    assert_eq!(si(1234.0), "1.2k");
    assert_eq!(si(2.5e6), "2.5M");
    assert_eq!(si(3e9), "3.0G");
}
