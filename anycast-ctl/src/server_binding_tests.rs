//! The server's side of route optimization: clients found in the socket table, bindings a
//! client takes, refreshes, bounds, and the withdrawals at exit.
use anycast_common::pki::{CertPrefix, CertificateBody};

use super::*;
use crate::client::{Accepted, Settings, Verifier};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host(s: &str) -> CertPrefix {
    let a = ip(s);
    CertPrefix::new(a, if a.is_ipv4() { 32 } else { 128 }).unwrap()
}

fn operator() -> SigningKey {
    SigningKey::from_bytes(&[0x10; 32])
}

fn binder(lifetime: u64) -> Binder {
    binder_with(lifetime, &["10.71.2.11"], &["10.71.2.11", "fd71:2::11"])
}

/// A binder whose certificate covers `certified` and that may use `real`, in that order.
fn binder_with(lifetime: u64, certified: &[&str], real: &[&str]) -> Binder {
    let key = SigningKey::from_bytes(&[0x21; 32]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = CertificateBody {
        serial: 1,
        not_before: now - 60,
        not_after: now + 86_400,
        subject_key: key.verifying_key().to_bytes(),
        identity: "s1".into(),
        real: certified.iter().map(|r| host(r)).collect(),
        anycast: vec![host("10.71.100.1"), host("fd71:100::1")],
    };
    Binder::new(BindingOptions {
        certificate: Certificate::issue(body, &operator()).unwrap(),
        key,
        anycast: vec![
            "10.71.100.1:tcp:80".parse().unwrap(),
            "[fd71:100::1]:tcp:80".parse().unwrap(),
        ],
        real: real.iter().map(|r| ip(r)).collect(),
        lifetime: Duration::from_secs(lifetime),
        port: wire::CLIENT_PORT,
    })
    .unwrap()
}

// Two sockets on 10.71.100.1:80 (ESTABLISHED, SYN-RECV) from 10.71.1.11, one LISTEN, one
// on another port, one from another local address, one in TIME-WAIT from 10.71.1.14 (a
// connection shorter than a poll).
const PROC_TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0164470A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0164470A:0050 0B01470A:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0164470A:0050 0B01470A:C351 03 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0164470A:0051 0C01470A:C351 01 00000000:00000000 00:00000000 00000000     0        0 4 1
   4: 0B02470A:0050 0D01470A:C351 01 00000000:00000000 00:00000000 00000000     0        0 5 1
   5: 0164470A:0050 0E01470A:C352 06 00000000:00000000 00:00000000 00000000     0        0 0 1
";

#[test]
fn clients_of_our_services_are_read_from_the_socket_table() {
    let specs: Vec<AnycastSpec> = vec!["10.71.100.1:tcp:80".parse().unwrap()];
    let seen = clients_in(PROC_TCP, &specs);
    let seen_of = |c: &str| Seen {
        client: ip(c),
        anycast: ip("10.71.100.1"),
        service: (PROTO_TCP, 80),
    };
    assert_eq!(seen, vec![seen_of("10.71.1.11"), seen_of("10.71.1.14")]);
    // A whole address: each local port is its own service.
    let whole: Vec<AnycastSpec> = vec!["10.71.100.1".parse().unwrap()];
    let seen = clients_in(PROC_TCP, &whole);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen
        .iter()
        .any(|s| s.service.1 == 81 && s.client == ip("10.71.1.12")));
    // A UDP-only spec binds nothing (UDP has no per-client socket to see).
    let udp: Vec<AnycastSpec> = vec!["10.71.100.1:udp:80".parse().unwrap()];
    assert!(clients_in(PROC_TCP, &udp).is_empty());
}

#[test]
fn a_new_client_is_sent_a_binding_it_takes_then_refreshes_then_a_withdrawal() {
    let mut b = binder(12);
    let seen = Seen {
        client: ip("10.71.1.11"),
        anycast: ip("10.71.100.1"),
        service: (PROTO_TCP, 80),
    };
    let mut client = Verifier::new(Settings {
        anchors: vec![operator().verifying_key()],
        addresses: vec![ip("10.71.1.11")],
        window: 30,
        max_lifetime: 600,
    });
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t0 = Instant::now();
    let sent = b.poll(&conns(&[seen]), t0);
    assert_eq!(sent.len(), 1);
    let r = client.check(&sent[0].1, ip("10.71.2.11"), now_secs);
    assert!(matches!(r, Ok(Accepted::Bound { .. })), "{r:?}");
    // Seen again before a third of the lifetime: nothing sent.
    assert!(b
        .poll(&conns(&[seen]), t0 + Duration::from_secs(1))
        .is_empty());
    // After a third: a refresh the client takes.
    let sent = b.poll(&conns(&[seen]), t0 + Duration::from_secs(4));
    assert_eq!(sent.len(), 1);
    let r = client.check(&sent[0].1, ip("10.71.2.11"), now_secs);
    assert!(matches!(r, Ok(Accepted::Refreshed { .. })), "{r:?}");
    // Exit: lifetime 0, taken as a withdrawal.
    let w = b.withdrawals(t0 + Duration::from_secs(5));
    assert_eq!(w.len(), 1);
    let r = client.check(&w[0].1, ip("10.71.2.11"), now_secs);
    assert!(matches!(r, Ok(Accepted::Withdrawn { .. })), "{r:?}");
    assert_eq!(b.counters["bindings_sent"], 1);
    assert_eq!(b.counters["refreshes_sent"], 1);
    assert_eq!(b.counters["withdrawals_sent"], 1);
}

#[test]
fn clients_are_bounded_and_forgotten_after_a_lifetime() {
    let mut b = binder(12);
    let t0 = Instant::now();
    let many: Vec<Seen> = (0..MAX_CLIENTS as u32 + 10)
        .map(|i| Seen {
            client: IpAddr::from((0x0a47_0000u32 + i).to_be_bytes()),
            anycast: ip("10.71.100.1"),
            service: (PROTO_TCP, 80),
        })
        .collect();
    let sent = b.poll(&conns(&many), t0);
    assert_eq!(sent.len(), MAX_SENDS_PER_POLL, "sends per poll are bounded");
    assert_eq!(b.clients.len(), MAX_CLIENTS);
    assert_eq!(b.counters["clients_over_limit"], 10);
    // Gone for a lifetime: forgotten, nothing to withdraw.
    assert!(b.poll(&conns(&[]), t0 + Duration::from_secs(13)).is_empty());
    assert!(b.clients.is_empty());
    assert!(b.withdrawals(t0 + Duration::from_secs(13)).is_empty());
}

#[test]
fn a_certificate_for_another_key_is_refused() {
    let opts_cert = binder(12).opts.certificate.clone();
    let r = Binder::new(BindingOptions {
        certificate: opts_cert,
        key: SigningKey::from_bytes(&[0x22; 32]),
        anycast: vec![],
        real: vec![ip("10.71.2.11")],
        lifetime: Duration::from_secs(12),
        port: wire::CLIENT_PORT,
    });
    assert!(r.is_err());
}

fn client_of(client: &str) -> Seen {
    let c = ip(client);
    Seen {
        client: c,
        anycast: ip(if c.is_ipv4() {
            "10.71.100.1"
        } else {
            "fd71:100::1"
        }),
        service: (PROTO_TCP, 80),
    }
}

fn verifier_for(client: &str) -> Verifier {
    Verifier::new(Settings {
        anchors: vec![operator().verifying_key()],
        addresses: vec![ip(client)],
        window: 30,
        max_lifetime: 600,
    })
}

/// (sequence number, lifetime, real address) of a binding the binder sent.
fn fields(payload: &[u8]) -> (u16, u16, IpAddr) {
    let m = wire::decode(payload).unwrap();
    let Body::ClientBindingUpdate { seq, lifetime } = m.body else {
        panic!("not a client binding: {:?}", m.body);
    };
    (seq, lifetime, wire::from_mapped(m.options.alt_coa.unwrap()))
}

// Every real address the certificate covers: s1's two links (IPv4 and IPv6); 10.71.9.9 is
// the host's but outside the certificate.
const CERTIFIED: &[&str] = &["10.71.2.11", "10.71.3.11", "fd71:2::11", "fd71:3::11"];
const REAL: &[&str] = &[
    "10.71.2.11",
    "fd71:2::11",
    "10.71.9.9",
    "10.71.3.11",
    "fd71:3::11",
];

#[test]
fn a_failed_link_moves_held_bindings_to_the_next_usable_real_address() {
    let mut b = binder_with(12, CERTIFIED, REAL);
    let all: Vec<IpAddr> = REAL.iter().map(|r| ip(r)).collect();
    let (c4, c6, late) = (
        client_of("10.71.1.11"),
        client_of("fd71:1::11"),
        client_of("10.71.1.12"),
    );
    let mut client = verifier_for("10.71.1.11");
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t0 = Instant::now();
    assert!(b.addresses_changed(&all, t0).is_empty(), "all usable");
    let sent = b.poll(&conns(&[c4, c6]), t0);
    assert_eq!(sent.len(), 2);
    let first = sent.iter().find(|(s, _)| *s == c4).unwrap();
    assert_eq!(fields(&first.1), (1, 3, ip("10.71.2.11")));
    let r = client.check(&first.1, ip("10.71.2.11"), now_secs);
    assert!(matches!(r, Ok(Accepted::Bound { .. })), "{r:?}");

    // s1's first IPv4 link fails: 10.71.9.9 is usable but not certified, 10.71.3.11 is next.
    let t1 = t0 + Duration::from_secs(1);
    let usable: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|a| *a != ip("10.71.2.11"))
        .collect();
    let moved = b.addresses_changed(&usable, t1);
    assert_eq!(moved.len(), 1, "only the IPv4 client moves");
    assert_eq!(moved[0].0, c4);
    assert_eq!(
        fields(&moved[0].1),
        (2, 3, ip("10.71.3.11")),
        "seq + 1, the same lifetime, the other link's address"
    );
    assert_eq!(b.in_use(true), Some(ip("10.71.3.11")));
    assert_eq!(b.in_use(false), Some(ip("fd71:2::11")));
    // The client takes the move, sent from the new address (claims 5 and 10).
    let r = client.check(&moved[0].1, ip("10.71.3.11"), now_secs);
    assert!(
        matches!(r, Ok(Accepted::Bound { ref binding, .. }) if binding.real == ip("10.71.3.11")),
        "{r:?}"
    );
    assert_eq!(b.counters["real_address_moves"], 1);
    assert_eq!(b.counters["moves_sent"], 1);
    // Nothing again while it stays down; a move counts as the client's refresh.
    assert!(b.addresses_changed(&usable, t1).is_empty());
    assert!(b
        .poll(&conns(&[c4, c6]), t1 + Duration::from_secs(1))
        .is_empty());
    // The first link returns: no move back.
    assert!(b
        .addresses_changed(&all, t1 + Duration::from_secs(2))
        .is_empty());
    assert_eq!(b.in_use(true), Some(ip("10.71.3.11")));
    // Refreshes and new clients carry the address in use.
    let sent = b.poll(&conns(&[c4, c6, late]), t1 + Duration::from_secs(4));
    let of = |s: &Seen| fields(&sent.iter().find(|(x, _)| x == s).unwrap().1);
    assert_eq!(of(&c4), (3, 3, ip("10.71.3.11")));
    assert_eq!(of(&late), (1, 3, ip("10.71.3.11")));
    let r = client.check(
        &sent.iter().find(|(x, _)| *x == c4).unwrap().1,
        ip("10.71.3.11"),
        now_secs,
    );
    assert!(matches!(r, Ok(Accepted::Refreshed { .. })), "{r:?}");
    // The second link fails in turn: back to the first, the only other one.
    let t2 = t1 + Duration::from_secs(5);
    let usable: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|a| *a != ip("10.71.3.11"))
        .collect();
    let moved = b.addresses_changed(&usable, t2);
    assert_eq!(moved.len(), 2, "both IPv4 clients");
    assert!(moved.iter().all(|(_, m)| fields(m).2 == ip("10.71.2.11")));
    assert_eq!(b.counters["real_address_moves"], 2);
    assert_eq!(b.counters["moves_sent"], 3);
    assert!(!b.counters.contains_key("no_usable_real_address"));
}

#[test]
fn nothing_is_sent_when_no_other_real_address_is_usable() {
    // IPv6: only fd71:2::11 is certified (fd71:3::11 is not).
    let mut b = binder_with(12, &["10.71.2.11", "10.71.3.11", "fd71:2::11"], REAL);
    let all: Vec<IpAddr> = REAL.iter().map(|r| ip(r)).collect();
    let (c4, c6) = (client_of("10.71.1.11"), client_of("fd71:1::11"));
    let t0 = Instant::now();
    assert_eq!(b.poll(&conns(&[c4, c6]), t0).len(), 2);
    let usable: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|a| *a != ip("fd71:2::11"))
        .collect();
    for i in 0..3 {
        assert!(b
            .addresses_changed(&usable, t0 + Duration::from_secs(i))
            .is_empty());
    }
    assert_eq!(b.in_use(false), Some(ip("fd71:2::11")), "kept");
    assert_eq!(b.counters["no_usable_real_address"], 1, "counted once");
    // Both IPv4 links down (the uncertified 10.71.9.9 left): nothing either.
    assert!(b
        .addresses_changed(&[ip("10.71.9.9")], t0 + Duration::from_secs(3))
        .is_empty());
    assert_eq!(b.counters["no_usable_real_address"], 2);
    assert!(!b.counters.contains_key("real_address_moves"));
    // The second IPv4 link comes up: the IPv4 client moves to it.
    let moved = b.addresses_changed(&[ip("10.71.3.11")], t0 + Duration::from_secs(4));
    assert_eq!(moved.len(), 1);
    assert_eq!(fields(&moved[0].1), (2, 3, ip("10.71.3.11")));
    // A client whose binding has ended on its own (not seen nor sent to for a lifetime) is
    // not sent a move.
    let t5 = t0 + Duration::from_secs(30);
    assert!(b.poll(&conns(&[]), t5).is_empty());
    assert!(b.addresses_changed(&[ip("10.71.2.11")], t5).is_empty());
    assert_eq!(b.counters["real_address_moves"], 2);
}

#[test]
fn a_move_reaches_every_held_client_at_once() {
    let mut b = binder_with(600, CERTIFIED, REAL);
    let t0 = Instant::now();
    let many: Vec<Seen> = (0..MAX_CLIENTS as u32)
        .map(|i| Seen {
            client: IpAddr::from((0x0a47_0000u32 + i).to_be_bytes()),
            anycast: ip("10.71.100.1"),
            service: (PROTO_TCP, 80),
        })
        .collect();
    // Bound over 16 polls (256 sends each).
    let mut bound = 0;
    for i in 0..16 {
        bound += b.poll(&conns(&many), t0 + POLL * i).len();
    }
    assert_eq!(bound, MAX_CLIENTS);
    let usable = [ip("10.71.3.11"), ip("fd71:2::11")];
    let started = Instant::now();
    let moved = b.addresses_changed(&usable, t0 + POLL * 16);
    let took = started.elapsed();
    println!("a move of {} clients signed in {took:?}", moved.len());
    // Not bounded per poll as the first bindings are: every one of them at once.
    assert_eq!(moved.len(), MAX_CLIENTS);
    assert!(moved.iter().all(|(_, m)| fields(m).2 == ip("10.71.3.11")));
    assert_eq!(b.counters["moves_sent"], MAX_CLIENTS as u64);
    assert_eq!(b.counters["real_address_moves"], 1);
}

#[test]
fn a_binding_names_the_clients_connections_and_a_new_one_is_named_at_once() {
    let mut b = binder(12);
    let seen = client_of("10.71.1.11");
    let mut client = verifier_for("10.71.1.11");
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t0 = Instant::now();
    let sent = b.poll(&[(seen, (40_000, 80)), (seen, (40_001, 80))], t0);
    assert_eq!(sent.len(), 1);
    let Ok(Accepted::Bound { named, .. }) = client.check(&sent[0].1, ip("10.71.2.11"), now_secs)
    else {
        panic!("not bound");
    };
    assert_eq!(named.client, Some(ip("10.71.1.11")));
    assert_eq!(named.protocol, PROTO_TCP);
    assert_eq!(named.ports, vec![(40_000, 80), (40_001, 80)]);
    // The same connections at the next poll: nothing new to say.
    let both = [(seen, (40_000, 80)), (seen, (40_001, 80))];
    assert!(b.poll(&both, t0 + Duration::from_millis(200)).is_empty());
    // A third connection (opened before the client took the binding, through the agent,
    // which gave it to us): named at the next poll, not at the refresh.
    let three = [
        (seen, (40_000, 80)),
        (seen, (40_001, 80)),
        (seen, (40_002, 80)),
    ];
    let sent = b.poll(&three, t0 + Duration::from_millis(400));
    assert_eq!(sent.len(), 1);
    let Ok(Accepted::Refreshed { named, .. }) =
        client.check(&sent[0].1, ip("10.71.2.11"), now_secs)
    else {
        panic!("not refreshed");
    };
    assert_eq!(named.ports[0], (40_002, 80), "the new connection first");
    assert_eq!(named.ports.len(), 3);
    // More connections than a message names: the rest wait (at most one send a second).
    let many: Vec<Connection> = (0..200u16).map(|i| (seen, (41_000 + i, 80))).collect();
    let sent = b.poll(&many, t0 + Duration::from_millis(600));
    assert_eq!(sent.len(), 1);
    assert_eq!(b.counters["connections_not_named"], 1);
    assert!(b.poll(&many, t0 + Duration::from_millis(800)).is_empty());
    assert_eq!(b.poll(&many, t0 + Duration::from_millis(1700)).len(), 1);
}

/// One connection (client port 40000 to port 80) for each client.
fn conns(clients: &[Seen]) -> Vec<Connection> {
    clients.iter().map(|s| (*s, (40_000, 80))).collect()
}

/// A `SERVER_UDP_FLOWS` entry: `client:port` to `anycast:service_port`, first seen at
/// `first` and last at `last` (milliseconds).
fn udp_flow(
    client: &str,
    port: u16,
    anycast: &str,
    service_port: u16,
    first: u64,
    last: u64,
) -> (FlowKey, UdpSeen) {
    (
        FlowKey::new(ip(client), ip(anycast), PROTO_UDP, port, service_port),
        UdpSeen {
            first_ns: first * 1_000_000,
            last_ns: last * 1_000_000,
        },
    )
}

#[test]
fn udp_clients_are_read_from_the_decapsulators_flows() {
    let specs: Vec<AnycastSpec> = vec![
        "10.71.100.1:udp:53".parse().unwrap(),
        "fd71:100::1".parse().unwrap(),
        "10.71.100.2:tcp:53".parse().unwrap(),
    ];
    let now = 100_000; // ms
    let entries = [
        // Lasted 600 ms, seen just now: a client of 10.71.100.1 udp/53.
        udp_flow(
            "10.71.1.11",
            40_000,
            "10.71.100.1",
            53,
            now - 700,
            now - 100,
        ),
        // Lasted exactly the refresh interval: a client too.
        udp_flow("10.71.1.12", 40_001, "10.71.100.1", 53, now - 500, now),
        // Another port of an address served for udp/53 only.
        udp_flow("10.71.1.11", 40_002, "10.71.100.1", 54, now - 700, now),
        // Seen once, or within less than the refresh interval: no client yet (a spoofed
        // source sends once).
        udp_flow("10.71.1.13", 40_003, "10.71.100.1", 53, now, now),
        udp_flow("10.71.1.14", 40_004, "10.71.100.1", 53, now - 499, now),
        // A whole address: the service is UDP and the flow's port.
        udp_flow(
            "fd71:1::11",
            40_005,
            "fd71:100::1",
            5353,
            now - 2000,
            now - 1000,
        ),
        // An address served for TCP only, and one not served.
        udp_flow("10.71.1.11", 40_006, "10.71.100.2", 53, now - 2000, now),
        udp_flow("10.71.1.11", 40_007, "10.71.100.9", 53, now - 2000, now),
        // Idle for longer than UDP_IDLE: deleted, not a connection.
        udp_flow(
            "10.71.1.15",
            40_008,
            "10.71.100.1",
            53,
            now - 40_000,
            now - 30_001,
        ),
    ];
    let (conns, stale) = udp_connections_in(&entries, &specs, now * 1_000_000);
    let udp = |client: &str, anycast: &str, port: u16, cport: u16| {
        (
            Seen {
                client: ip(client),
                anycast: ip(anycast),
                service: (PROTO_UDP, port),
            },
            (cport, port),
        )
    };
    assert_eq!(
        conns,
        vec![
            udp("10.71.1.11", "10.71.100.1", 53, 40_000),
            udp("10.71.1.12", "10.71.100.1", 53, 40_001),
            udp("fd71:1::11", "fd71:100::1", 5353, 40_005),
        ]
    );
    assert_eq!(stale, vec![entries[8].0]);
    // A flow idle for exactly UDP_IDLE still counts.
    let edge = [udp_flow(
        "10.71.1.11",
        40_000,
        "10.71.100.1",
        53,
        now - 31_000,
        now - 30_000,
    )];
    assert_eq!(
        udp_connections_in(&edge, &specs, now * 1_000_000).0.len(),
        1
    );
}

#[test]
fn a_udp_client_is_sent_a_binding_naming_its_flow_that_it_takes() {
    let mut b = binder_with(12, CERTIFIED, REAL);
    let specs: Vec<AnycastSpec> = vec![
        "10.71.100.1:udp:53".parse().unwrap(),
        "fd71:100::1".parse().unwrap(),
    ];
    let entries = [
        udp_flow("10.71.1.11", 40_000, "10.71.100.1", 53, 1000, 1600),
        udp_flow("fd71:1::11", 40_001, "fd71:100::1", 5353, 1000, 1600),
    ];
    let (conns, _) = udp_connections_in(&entries, &specs, 2_000_000_000);
    let sent = b.poll(&conns, Instant::now());
    assert_eq!(sent.len(), 2);
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for ((seen, payload), (anycast, port, cport)) in sent
        .iter()
        .zip([("10.71.100.1", 53, 40_000), ("fd71:100::1", 5353, 40_001)])
    {
        let mut client = verifier_for(&seen.client.to_string());
        let real = if seen.client.is_ipv4() {
            "10.71.2.11"
        } else {
            "fd71:2::11"
        };
        let r = client.check(payload, ip(real), now_secs);
        let Ok(Accepted::Bound { key, named, .. }) = r else {
            panic!("not bound: {r:?}");
        };
        // The client's key: the UDP service (a whole address's flow: its port), so its
        // tunnel looks the datagrams up as (address, 17, port).
        assert_eq!(
            (key.anycast, key.protocol, key.port),
            (ip(anycast), PROTO_UDP, port)
        );
        assert_eq!(named.protocol, PROTO_UDP);
        assert_eq!(named.ports, vec![(cport, port)]);
    }
}

/// A spoofed-source UDP flood through the agent: one datagram from each of 20 000 sources
/// binds nobody; an attacker who sends each spoofed source twice, far enough apart, gets at
/// most MAX_SENDS_PER_POLL bindings a poll sent, and MAX_CLIENTS remembered.
#[test]
fn a_spoofed_udp_flood_is_not_sent_bindings_beyond_the_bounds() {
    let mut b = binder(60);
    let specs: Vec<AnycastSpec> = vec!["10.71.100.1:udp:53".parse().unwrap()];
    let spoofed = |i: u32, lasted: u64| {
        let a = std::net::Ipv4Addr::from(0x0a80_0000 + i);
        udp_flow(
            &a.to_string(),
            1024 + (i % 60_000) as u16,
            "10.71.100.1",
            53,
            1000,
            1000 + lasted,
        )
    };
    let once: Vec<(FlowKey, UdpSeen)> = (0..20_000).map(|i| spoofed(i, 0)).collect();
    let (conns, _) = udp_connections_in(&once, &specs, 2_000_000_000);
    assert!(conns.is_empty());
    let t0 = Instant::now();
    assert!(b.poll(&conns, t0).is_empty());
    // Twice each, 500 ms apart: bounded per poll and in all.
    let twice: Vec<(FlowKey, UdpSeen)> = (0..20_000).map(|i| spoofed(i, 500)).collect();
    let (conns, _) = udp_connections_in(&twice, &specs, 2_000_000_000);
    assert_eq!(conns.len(), 20_000);
    let mut total = 0;
    for i in 0..40 {
        let sent = b.poll(&conns, t0 + POLL * i);
        assert!(
            sent.len() <= MAX_SENDS_PER_POLL,
            "{} in one poll",
            sent.len()
        );
        total += sent.len();
    }
    assert_eq!(total, MAX_CLIENTS, "each remembered client bound once");
    assert_eq!(b.counters["bindings_sent"], MAX_CLIENTS as u64);
    assert!(b.counters["clients_over_limit"] > 0);
}
