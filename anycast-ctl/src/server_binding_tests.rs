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
        real: vec![host("10.71.2.11")],
        anycast: vec![host("10.71.100.1")],
    };
    Binder::new(BindingOptions {
        certificate: Certificate::issue(body, &operator()).unwrap(),
        key,
        anycast: vec!["10.71.100.1:tcp:80".parse().unwrap()],
        real: vec![ip("10.71.2.11"), ip("fd71:2::11")],
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
    let one = [(seen, (40_000, 80))];
    let sent = b.poll(&one, t0);
    assert_eq!(sent.len(), 1);
    let r = client.check(&sent[0].1, ip("10.71.2.11"), now_secs);
    assert!(matches!(r, Ok(Accepted::Bound { .. })), "{r:?}");
    // Seen again before a third of the lifetime: nothing sent.
    assert!(b.poll(&one, t0 + Duration::from_secs(1)).is_empty());
    // After a third: a refresh the client takes.
    let sent = b.poll(&one, t0 + Duration::from_secs(4));
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
    let many: Vec<Connection> = (0..MAX_CLIENTS as u32 + 10)
        .map(|i| {
            let s = Seen {
                client: IpAddr::from((0x0a47_0000u32 + i).to_be_bytes()),
                anycast: ip("10.71.100.1"),
                service: (PROTO_TCP, 80),
            };
            (s, (40_000, 80))
        })
        .collect();
    let sent = b.poll(&many, t0);
    assert_eq!(sent.len(), MAX_SENDS_PER_POLL, "sends per poll are bounded");
    assert_eq!(b.clients.len(), MAX_CLIENTS);
    assert_eq!(b.counters["clients_over_limit"], 10);
    // Gone for a lifetime: forgotten, nothing to withdraw.
    assert!(b.poll(&[], t0 + Duration::from_secs(13)).is_empty());
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

#[test]
fn a_binding_names_the_clients_connections_and_a_new_one_is_named_at_once() {
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
