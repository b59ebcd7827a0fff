//! The client's checks: a good binding's life (bound, refreshed, moved to another link,
//! withdrawn, expired, revoked) and every impostor refused and counted, changing nothing.
use anycast_common::{
    pki::{CertPrefix, CertificateBody, SigningKey},
    wire::{Message, Options, ServiceSelector},
};

use super::*;

const NOW: u64 = 1_750_000_000;
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

fn operator() -> SigningKey {
    SigningKey::from_bytes(&[0x10; 32])
}

fn s1_key() -> SigningKey {
    SigningKey::from_bytes(&[0x21; 32])
}

fn s2_key() -> SigningKey {
    SigningKey::from_bytes(&[0x22; 32])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host(s: &str) -> CertPrefix {
    let a = ip(s);
    CertPrefix::new(a, if a.is_ipv4() { 32 } else { 128 }).unwrap()
}

const ANYCAST: &str = "10.71.100.1";
const CLIENT: &str = "10.71.0.21";
/// s1's two links (a multi-homed server).
const S1_REAL: &str = "10.71.2.11";
const S1_REAL_2: &str = "10.71.3.11";
const S2_REAL: &str = "10.71.2.12";

struct Cert {
    serial: u64,
    identity: &'static str,
    key: SigningKey,
    real: Vec<&'static str>,
    anycast: Vec<&'static str>,
    not_before: u64,
    not_after: u64,
    issuer: SigningKey,
}

fn s1_cert() -> Cert {
    Cert {
        serial: 1,
        identity: "s1",
        key: s1_key(),
        real: vec![S1_REAL, S1_REAL_2],
        anycast: vec![ANYCAST],
        not_before: NOW - 86_400,
        not_after: NOW + 86_400,
        issuer: operator(),
    }
}

fn s2_cert() -> Cert {
    Cert {
        serial: 2,
        identity: "s2",
        key: s2_key(),
        real: vec![S2_REAL],
        ..s1_cert()
    }
}

impl Cert {
    fn bytes(&self) -> Vec<u8> {
        let body = CertificateBody {
            serial: self.serial,
            not_before: self.not_before,
            not_after: self.not_after,
            subject_key: self.key.verifying_key().to_bytes(),
            identity: self.identity.into(),
            real: self.real.iter().map(|s| host(s)).collect(),
            anycast: self.anycast.iter().map(|s| host(s)).collect(),
        };
        Certificate::issue(body, &self.issuer)
            .unwrap()
            .as_bytes()
            .to_vec()
    }
}

/// A binding as a server sends it; fields changed by the impostor cases.
struct Bu {
    cert: Option<Vec<u8>>,
    signer: SigningKey,
    anycast: &'static str,
    client: &'static str,
    real: &'static str,
    seq: u16,
    lifetime: u16,
    sent: u64,
    frac: u32,
    connections: Vec<(u16, u16)>,
}

fn bu(cert: &Cert, real: &'static str, seq: u16) -> Bu {
    Bu {
        cert: Some(cert.bytes()),
        signer: cert.key.clone(),
        anycast: ANYCAST,
        client: CLIENT,
        real,
        seq,
        lifetime: 15,
        sent: NOW,
        frac: u32::from(seq),
        connections: vec![],
    }
}

impl Bu {
    fn bytes(&self) -> Vec<u8> {
        let msg = Message {
            src: wire::to_mapped(ip(self.anycast)),
            dst: wire::to_mapped(ip(self.client)),
            body: Body::ClientBindingUpdate {
                seq: self.seq,
                lifetime: self.lifetime,
            },
            options: Options {
                alt_coa: Some(wire::to_mapped(ip(self.real))),
                mesg_id: Some(((self.sent + NTP_UNIX_OFFSET) << 32) | u64::from(self.frac)),
                service: Some(ServiceSelector {
                    protocol: 6,
                    port: 80,
                }),
                certificate: self.cert.clone(),
                connections: self.connections.clone(),
                ..Options::default()
            },
        };
        wire::encode_signed(&msg, &self.signer).unwrap()
    }
}

fn verifier() -> Verifier {
    Verifier::new(Settings {
        anchors: vec![operator().verifying_key()],
        addresses: vec![ip(CLIENT), ip("fd71::21")],
        window: 30,
        max_lifetime: 600,
    })
}

fn key() -> ServiceKey {
    ServiceKey {
        anycast: ip(ANYCAST),
        protocol: 6,
        port: 80,
    }
}

#[test]
fn a_servers_binding_is_taken_refreshed_moved_and_withdrawn() {
    let mut v = verifier();
    let first = v.check(&bu(&s1_cert(), S1_REAL, 1).bytes(), ip(S1_REAL), NOW);
    assert_eq!(
        first,
        Ok(Accepted::Bound {
            key: key(),
            binding: Binding {
                server: "s1".into(),
                serial: 1,
                real: ip(S1_REAL),
                seq: 1,
                expires: NOW + 60,
                generation: 1,
            },
            named: Named {
                client: Some(ip(CLIENT)),
                protocol: 6,
                ports: vec![],
            },
        })
    );
    // A refresh: same server and real address, later.
    let mut r = bu(&s1_cert(), S1_REAL, 2);
    r.sent = NOW + 30;
    assert_eq!(
        v.check(&r.bytes(), ip(S1_REAL), NOW + 30),
        Ok(Accepted::Refreshed {
            key: key(),
            expires: NOW + 90,
            generation: 1,
            named: Named {
                client: Some(ip(CLIENT)),
                protocol: 6,
                ports: vec![],
            },
        })
    );
    // One of s1's links fails: it binds its other real address, from it (claims 5, 10).
    let mut m = bu(&s1_cert(), S1_REAL_2, 3);
    m.sent = NOW + 31;
    let moved = v.check(&m.bytes(), ip(S1_REAL_2), NOW + 31).unwrap();
    assert!(matches!(moved, Accepted::Bound { ref binding, .. } if binding.real == ip(S1_REAL_2)));
    // The same server's move keeps the generation: its connections follow it.
    assert_eq!(v.bindings()[&key()].generation, 1);
    assert_eq!(v.bindings()[&key()].real, ip(S1_REAL_2));
    // s1 goes down: lifetime 0 (claim 15), and the client is back on the agent.
    let mut w = bu(&s1_cert(), S1_REAL_2, 4);
    (w.sent, w.lifetime) = (NOW + 32, 0);
    assert_eq!(
        v.check(&w.bytes(), ip(S1_REAL_2), NOW + 32),
        Ok(Accepted::Withdrawn { key: key() })
    );
    assert!(v.bindings().is_empty());
    // Now another server may bind the service.
    let mut s2 = bu(&s2_cert(), S2_REAL, 1);
    s2.sent = NOW + 33;
    assert!(matches!(
        v.check(&s2.bytes(), ip(S2_REAL), NOW + 33),
        Ok(Accepted::Bound { .. })
    ));
    // Another server's binding: a new generation, so s1's connections do not follow it.
    assert_eq!(v.bindings()[&key()].generation, 2);
    let c = v.counters();
    assert_eq!(
        (c["bound"], c["refreshed"], c["withdrawn"]),
        (3, 1, 1),
        "{c:?}"
    );
    assert!(c.keys().all(|k| !k.starts_with("refused")), "{c:?}");
}

#[test]
fn lifetimes_are_capped_and_bindings_expire() {
    let mut v = verifier();
    let mut long = bu(&s1_cert(), S1_REAL, 1);
    long.lifetime = 0xffff;
    v.check(&long.bytes(), ip(S1_REAL), NOW).unwrap();
    assert_eq!(v.bindings()[&key()].expires, NOW + 600, "max_lifetime");
    // Never beyond the certificate.
    let mut short_cert = s1_cert();
    short_cert.not_after = NOW + 10;
    let mut v = verifier();
    v.check(&bu(&short_cert, S1_REAL, 1).bytes(), ip(S1_REAL), NOW)
        .unwrap();
    assert_eq!(v.bindings()[&key()].expires, NOW + 10);
    assert_eq!(v.expire(NOW + 9), vec![]);
    assert_eq!(v.expire(NOW + 10), vec![key()]);
    assert!(v.bindings().is_empty());
    assert_eq!(v.counters()["ended_expired"], 1);
    // The server stopped answering: the data path's timeout ends the binding.
    let mut s2 = bu(&s2_cert(), S2_REAL, 1);
    s2.sent = NOW + 11;
    v.check(&s2.bytes(), ip(S2_REAL), NOW + 11).unwrap();
    assert!(v.forget(&key()));
    assert!(!v.forget(&key()));
    assert_eq!(v.counters()["ended_unanswered"], 1);
}

#[test]
fn a_revocation_list_ends_the_bindings_it_revokes_and_an_older_one_is_refused() {
    let mut v = verifier();
    v.check(&bu(&s1_cert(), S1_REAL, 1).bytes(), ip(S1_REAL), NOW)
        .unwrap();
    let list = RevocationList::new(5, NOW, vec![7, 1]).unwrap();
    assert_eq!(v.set_revocation_list(list), Ok(vec![key()]));
    assert!(v.bindings().is_empty());
    let older = RevocationList::new(4, NOW, vec![]).unwrap();
    assert!(v.set_revocation_list(older).is_err());
    assert!(v.revocation_list().is_revoked(1), "the newer list stays");
    let same = RevocationList::new(5, NOW, vec![]).unwrap();
    assert!(v.set_revocation_list(same).is_err());
    assert_eq!(v.counters()["ended_revoked"], 1);
    assert_eq!(v.counters()["revocation_list_refused_older"], 2);
}

/// An impostor on the client's link (or anyone who can send it a datagram) tries each
/// attack below; each is refused for its reason, counted, and the client's bindings are
/// unchanged, so its traffic keeps going through the agent.
#[test]
fn impostors_bindings_are_refused_and_counted() {
    // s1 holds the binding; the impostor cases try to take it over or add their own.
    let mut v = verifier();
    let good = bu(&s1_cert(), S1_REAL, 10);
    v.check(&good.bytes(), ip(S1_REAL), NOW).unwrap();
    let before = v.bindings().clone();

    let impostor = SigningKey::from_bytes(&[0x66; 32]);
    let self_signed = Cert {
        key: impostor.clone(),
        issuer: impostor.clone(),
        identity: "s1",
        ..s1_cert()
    };
    let other_operator = Cert {
        issuer: SigningKey::from_bytes(&[0x77; 32]),
        ..s1_cert()
    };
    let expired = Cert {
        not_before: NOW - 100,
        not_after: NOW - 1,
        ..s1_cert()
    };
    let not_yet = Cert {
        not_before: NOW + 1,
        not_after: NOW + 100,
        ..s1_cert()
    };
    let revoked = Cert {
        serial: 99,
        ..s1_cert()
    };
    let mut bad_sig = bu(&s1_cert(), S1_REAL, 11);
    bad_sig.signer = impostor.clone();
    let mut flipped = bu(&s1_cert(), S1_REAL, 11).bytes();
    // Two 16-bit words of the signature swapped: the checksum still holds (an attacker
    // fixes it anyway), the signature does not.
    let n = flipped.len();
    assert_ne!(flipped[n - 4..n - 2], flipped[n - 2..]);
    flipped[n - 4..].rotate_left(2);
    let mut other_anycast = bu(&s1_cert(), S1_REAL, 11);
    other_anycast.anycast = "10.71.100.2";
    let outside_real = bu(&s1_cert(), "10.71.9.9", 11);
    let mut stale = bu(&s1_cert(), S1_REAL, 11);
    stale.sent = NOW - 31;
    let mut future = bu(&s1_cert(), S1_REAL, 11);
    future.sent = NOW + 31;
    let mut elsewhere = bu(&s1_cert(), S1_REAL, 11);
    elsewhere.client = "10.71.0.22";
    let mut no_cert = bu(&s1_cert(), S1_REAL, 11);
    no_cert.cert = None;
    let mut truncated_cert = bu(&s1_cert(), S1_REAL, 11);
    truncated_cert.cert.as_mut().unwrap().truncate(80);
    let mut old_seq = bu(&s1_cert(), S1_REAL, 10);
    old_seq.frac = 1000;
    let mut s2_takeover = bu(&s2_cert(), S2_REAL, 50);
    s2_takeover.frac = 1001;
    let home_bu = wire::encode(
        &Message {
            src: wire::to_mapped(ip(ANYCAST)),
            dst: wire::to_mapped(ip(CLIENT)),
            body: Body::BindingUpdate {
                seq: 1,
                ack: true,
                lifetime: 1,
            },
            options: Options::default(),
        },
        None,
    );

    let cases: Vec<(&str, Vec<u8>, IpAddr, Refusal)> = vec![
        ("replayed", good.bytes(), ip(S1_REAL), Refusal::Replayed),
        (
            "self-signed",
            bu(&self_signed, S1_REAL, 11).bytes(),
            ip(S1_REAL),
            Refusal::UntrustedCertificate,
        ),
        (
            "another operator",
            bu(&other_operator, S1_REAL, 11).bytes(),
            ip(S1_REAL),
            Refusal::UntrustedCertificate,
        ),
        (
            "expired",
            bu(&expired, S1_REAL, 11).bytes(),
            ip(S1_REAL),
            Refusal::CertificateExpired,
        ),
        (
            "not yet valid",
            bu(&not_yet, S1_REAL, 11).bytes(),
            ip(S1_REAL),
            Refusal::CertificateNotYetValid,
        ),
        (
            "revoked",
            bu(&revoked, S1_REAL, 11).bytes(),
            ip(S1_REAL),
            Refusal::CertificateRevoked,
        ),
        (
            "another anycast address",
            other_anycast.bytes(),
            ip(S1_REAL),
            Refusal::AnycastNotCertified,
        ),
        (
            "real address outside",
            outside_real.bytes(),
            ip("10.71.9.9"),
            Refusal::RealNotCertified,
        ),
        (
            "sent from outside",
            bu(&s1_cert(), S1_REAL, 11).bytes(),
            ip("10.71.0.66"),
            Refusal::SourceNotCertified,
        ),
        (
            "signed by another key",
            bad_sig.bytes(),
            ip(S1_REAL),
            Refusal::BadSignature,
        ),
        (
            "signature changed",
            flipped,
            ip(S1_REAL),
            Refusal::BadSignature,
        ),
        ("stale", stale.bytes(), ip(S1_REAL), Refusal::Stale),
        (
            "from the future",
            future.bytes(),
            ip(S1_REAL),
            Refusal::Stale,
        ),
        (
            "for another client",
            elsewhere.bytes(),
            ip(S1_REAL),
            Refusal::NotForUs,
        ),
        (
            "no certificate",
            no_cert.bytes(),
            ip(S1_REAL),
            Refusal::MissingOption,
        ),
        (
            "certificate cut short",
            truncated_cert.bytes(),
            ip(S1_REAL),
            Refusal::BadCertificate(PkiError::Truncated),
        ),
        (
            "old sequence number",
            old_seq.bytes(),
            ip(S1_REAL),
            Refusal::OldSequence,
        ),
        (
            "a second server",
            s2_takeover.bytes(),
            ip(S2_REAL),
            Refusal::OtherServerBound,
        ),
        (
            "a home binding update",
            home_bu,
            ip(S1_REAL),
            Refusal::NotClientBinding,
        ),
        (
            "garbage",
            vec![0x60; 30],
            ip(S1_REAL),
            Refusal::Malformed(WireError::Truncated),
        ),
    ];
    v.set_revocation_list(RevocationList::new(1, NOW, vec![99]).unwrap())
        .unwrap();
    let n = cases.len();
    for (what, bytes, source, want) in cases {
        assert_eq!(v.check(&bytes, source, NOW), Err(want), "{what}");
        assert_eq!(v.bindings(), &before, "{what}: the bindings are unchanged");
    }
    let c = v.counters();
    let refused: u64 = c
        .iter()
        .filter(|(k, _)| k.starts_with("refused_"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(refused, n as u64, "every refusal counted: {c:?}");
    for name in [
        "refused_replayed",
        "refused_certificate_revoked",
        "refused_anycast_not_certified",
        "refused_real_not_certified",
        "refused_bad_signature",
        "refused_malformed_truncated",
        "refused_bad_certificate_truncated",
    ] {
        assert!(c.get(name).is_some_and(|&n| n >= 1), "{name}: {c:?}");
    }
    assert_eq!(c["refused_untrusted_certificate"], 2);
    assert_eq!(c["bound"], 1);
    // s1 itself still refreshes: none of this cost it its binding or its replay state.
    let mut next = bu(&s1_cert(), S1_REAL, 11);
    next.frac = 5000;
    assert!(matches!(
        v.check(&next.bytes(), ip(S1_REAL), NOW),
        Ok(Accepted::Refreshed { .. })
    ));
}

#[test]
fn ipv6_bindings_and_mapped_sources_are_checked_alike() {
    let cert = Cert {
        real: vec!["fd71:2::11", S1_REAL],
        anycast: vec!["fd71:100::1"],
        ..s1_cert()
    };
    let mut v = verifier();
    let mut b = bu(&cert, "fd71:2::11", 1);
    (b.anycast, b.client) = ("fd71:100::1", "fd71::21");
    assert!(v.check(&b.bytes(), ip("fd71:2::11"), NOW).is_ok());
    // An IPv4 source as a dual-stack socket reports it.
    let mut v = verifier();
    let mut b4 = bu(&cert, S1_REAL, 1);
    b4.anycast = "fd71:100::1";
    assert!(v.check(&b4.bytes(), ip("::ffff:10.71.2.11"), NOW).is_ok());
}

#[test]
fn a_binding_becomes_the_tunnel_maps_entry_with_a_source_of_the_real_addresss_family() {
    let b = |real: &str| Binding {
        server: "s1".into(),
        serial: 1,
        real: ip(real),
        seq: 1,
        expires: NOW,
        generation: 7,
    };
    let own = [ip("fd71::21"), ip(CLIENT)];
    let (k, v) = datapath_entry(&key(), &b(S1_REAL), &own).unwrap();
    assert_eq!(k, anycast_common::ServiceKey::new(ip(ANYCAST), 6, 80));
    assert_eq!(
        (v.real, v.source, v.family),
        (
            anycast_common::addr_words(ip(S1_REAL)).0,
            anycast_common::addr_words(ip(CLIENT)).0,
            anycast_common::FAMILY_V4
        )
    );
    assert_eq!(v.generation, 7);
    // An IPv4 service bound to an IPv6 real address: the client's IPv6 address is the
    // outer source.
    let (_, v6) = datapath_entry(&key(), &b("fd71:2::11"), &own).unwrap();
    assert_eq!(v6.source, anycast_common::addr_words(ip("fd71::21")).0);
    assert_eq!(v6.family, anycast_common::FAMILY_V6);
    // No address of that family: no entry (the agent's path).
    assert_eq!(
        datapath_entry(&key(), &b("fd71:2::11"), &[ip(CLIENT)]),
        None
    );
    // A binding of the whole address: protocol 0, any port.
    let whole = ServiceKey {
        anycast: ip(ANYCAST),
        protocol: 0,
        port: 0,
    };
    let (k, _) = datapath_entry(&whole, &b(S1_REAL), &own).unwrap();
    assert_eq!((k.proto, k.port), (0, anycast_common::ANY_PORT));
}

/// What a check costs (two Ed25519 verifications and the rest), printed for the README; it
/// asserts only that every one of the bindings was taken in order.
#[test]
fn checks_cost_is_measured() {
    const N: u32 = 500;
    let msgs: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let mut b = bu(&s1_cert(), S1_REAL, 1 + i as u16);
            b.frac = i;
            b.bytes()
        })
        .collect();
    let mut v = verifier();
    let start = std::time::Instant::now();
    for m in &msgs {
        v.check(m, ip(S1_REAL), NOW).unwrap();
    }
    let per = start.elapsed() / N;
    eprintln!("client binding check (accepted): {per:?} each over {N}");
    assert_eq!(
        v.counters()["bound"] + v.counters()["refreshed"],
        u64::from(N)
    );
}

#[test]
fn named_connections_outside_the_service_are_dropped_and_counted() {
    let mut v = verifier();
    let mut b = bu(&s1_cert(), S1_REAL, 1);
    b.connections = vec![(40_000, 80), (40_001, 443), (40_002, 80)];
    let Ok(Accepted::Bound { named, binding, .. }) = v.check(&b.bytes(), ip(S1_REAL), NOW) else {
        panic!("not bound");
    };
    assert_eq!(named.ports, vec![(40_000, 80), (40_002, 80)]);
    assert_eq!(v.counters()["named_connection_outside_service"], 1);
    // The tunnel's key of a named connection: from this client to the anycast address.
    let k = flow_key(
        named.client.unwrap(),
        40_000,
        ip(ANYCAST),
        80,
        named.protocol,
    );
    assert_eq!(k.src, anycast_common::addr_words(ip(CLIENT)).0);
    assert_eq!(k.dst, anycast_common::addr_words(ip(ANYCAST)).0);
    assert_eq!((k.sport, k.dport, k.proto), (40_000, 80, 6));
    assert_eq!(k.family, anycast_common::FAMILY_V4);
    assert_eq!(binding.generation, 1);
    // Sent to our IPv6 address for an IPv4 service: no connection can be named.
    let mut b6 = bu(&s1_cert(), S1_REAL, 2);
    (b6.client, b6.sent, b6.connections) = ("fd71::21", NOW + 1, vec![(40_003, 80)]);
    let Ok(Accepted::Refreshed { named, .. }) = v.check(&b6.bytes(), ip(S1_REAL), NOW + 1) else {
        panic!("not refreshed");
    };
    assert_eq!(named, Named::default());
    assert_eq!(v.counters()["named_connections_of_other_family"], 1);
}

#[test]
fn connected_udp_sockets_to_a_service_are_found_in_the_socket_table() {
    // /proc/net/udp: 10.71.1.11:40000 -> 10.71.100.1:53, 10.71.1.11:40001 unconnected,
    // 10.71.1.11:40002 -> 10.71.100.2:53 (another address).
    let text = "  sl  local_address rem_address   st\n\
    0: 0B01470A:9C40 0164470A:0035 01\n\
    1: 0B01470A:9C41 00000000:0000 07\n\
    2: 0B01470A:9C42 0264470A:0035 01\n";
    let udp = ServiceKey {
        anycast: ip(ANYCAST),
        protocol: 17,
        port: 53,
    };
    assert_eq!(
        connected_udp(text, &udp),
        vec![(ip("10.71.1.11"), 40_000, 53)]
    );
    let other_port = ServiceKey { port: 54, ..udp };
    assert!(connected_udp(text, &other_port).is_empty());
    let whole = ServiceKey {
        protocol: 0,
        port: 0,
        ..udp
    };
    assert_eq!(
        connected_udp(text, &whole),
        vec![(ip("10.71.1.11"), 40_000, 53)]
    );
}

#[path = "control_tests.rs"]
mod control_tests;
