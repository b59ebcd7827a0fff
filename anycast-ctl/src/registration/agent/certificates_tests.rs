//! Certificate-signed registration: a good server's life (registered, refreshed, lifetime
//! cut to its certificate, revoked by a reload), every refusal counted and changing nothing,
//! and a flood of forged updates that cannot make the agent check more signatures than its
//! budget.
use anycast_common::pki::{CertPrefix, Certificate, CertificateBody, SigningKey};

use super::{test_support::*, *};

/// The agent's clock in Unix seconds (test_support's WALL).
const UNIX: u64 = (WALL >> 32) - 2_208_988_800;
const SERVICE: &str = "192.0.2.10";
/// Configured, but not taking certificates.
const OTHER_SERVICE: &str = "192.0.2.20";
const C1_REAL: &str = "10.0.5.11";

fn operator() -> SigningKey {
    SigningKey::from_bytes(&[0x31; 32])
}

fn c1_key() -> SigningKey {
    SigningKey::from_bytes(&[0x41; 32])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn prefix(s: &str) -> CertPrefix {
    let p: Prefix = s.parse().unwrap();
    CertPrefix::new(p.addr, p.len).unwrap()
}

#[derive(Clone)]
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

fn c1_cert() -> Cert {
    Cert {
        serial: 7,
        identity: "c1",
        key: c1_key(),
        real: vec!["10.0.5.0/24"],
        anycast: vec!["192.0.2.0/24"],
        not_before: UNIX - 86_400,
        not_after: UNIX + 86_400,
        issuer: operator(),
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
            real: self.real.iter().map(|s| prefix(s)).collect(),
            anycast: self.anycast.iter().map(|s| prefix(s)).collect(),
        };
        Certificate::issue(body, &self.issuer)
            .unwrap()
            .as_bytes()
            .to_vec()
    }
}

/// A certificate-signed update as a server sends it; fields changed by the refusal cases.
#[derive(Clone)]
struct CertBu {
    id: &'static str,
    cert: Option<Vec<u8>>,
    signer: SigningKey,
    home: &'static str,
    real: Option<&'static str>,
    seq: u16,
    lifetime: u16,
    ts: u64,
    service: Option<(u8, u16)>,
}

fn cert_bu(cert: &Cert, seq: u16, ts: u64) -> CertBu {
    CertBu {
        id: cert.identity,
        cert: Some(cert.bytes()),
        signer: cert.key.clone(),
        home: SERVICE,
        real: Some(C1_REAL),
        seq,
        lifetime: 15,
        ts,
        service: Some((PROTO_TCP, 80)),
    }
}

impl CertBu {
    fn message(&self) -> Message {
        Message {
            src: wire::to_mapped(ip(self.home)),
            dst: wire::to_mapped(ip(AGENT)),
            body: Body::BindingUpdate {
                seq: self.seq,
                ack: true,
                lifetime: self.lifetime,
            },
            options: Options {
                alt_coa: self.real.map(|r| wire::to_mapped(ip(r))),
                mn_id: Some(self.id.into()),
                mesg_id: Some(self.ts),
                load: Some(LoadInfo::default()),
                service: self
                    .service
                    .map(|(protocol, port)| ServiceSelector { protocol, port }),
                certificate: self.cert.clone(),
                ..Default::default()
            },
        }
    }

    fn bytes(&self) -> Vec<u8> {
        wire::encode_registration_signed(&self.message(), &self.signer).unwrap()
    }
}

fn c1_from() -> SocketAddr {
    SocketAddr::new(ip(C1_REAL), 5000)
}

fn policy() -> CertificatePolicy {
    CertificatePolicy {
        anchors: vec![operator().verifying_key()],
        revoked: anycast_common::pki::RevocationList::default(),
        accepting: [ServiceKey::new(ip(SERVICE), PROTO_TCP, 80)].into(),
        configured: vec![
            ServiceKey::new(ip(SERVICE), PROTO_TCP, 80),
            ServiceKey::new(ip(SERVICE), PROTO_UDP, 53),
            ServiceKey::new(ip(OTHER_SERVICE), PROTO_TCP, 80),
        ],
        checks_per_second: 1000,
        keyed_identities: false,
    }
}

fn cert_registry(policy: CertificatePolicy) -> Registry {
    registry(Limits::default(), 30).with_certificates(Some(policy))
}

fn refused(r: &mut Registry, bytes: &[u8], from: SocketAddr, now: Instant) -> (String, u8) {
    let before = r.selected(&[]);
    let o = r.handle(bytes, from, now, WALL);
    assert!(!o.changed, "{}", o.counted);
    assert_eq!(r.selected(&[]), before, "a refusal changes nothing");
    let status = o.reply.as_ref().map_or(0, |_| ba_status(&o, None, 0).0);
    if let Some(reply) = &o.reply {
        assert!(
            wire::decode(&reply.payload).unwrap().options.auth.is_none(),
            "refusals to a certificate-signed update are unsigned"
        );
    }
    (o.counted, status)
}

#[test]
fn a_certified_server_registers_refreshes_and_gets_no_signed_answers() {
    let mut r = cert_registry(policy());
    let now = Instant::now();
    let o = r.handle(&cert_bu(&c1_cert(), 10, WALL).bytes(), c1_from(), now, WALL);
    assert_eq!((o.counted.as_str(), o.changed), ("registered", true));
    assert_eq!(ba_status(&o, None, 0), (status::ACCEPTED, 10, 15));
    let ba = wire::decode(&o.reply.unwrap().payload).unwrap();
    assert!(ba.options.auth.is_none(), "no key to sign the answer with");
    let services = r.selected(&[]);
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].servers[0].address, ip(C1_REAL));
    let o = r.handle(
        &cert_bu(&c1_cert(), 11, WALL + 1).bytes(),
        c1_from(),
        now,
        WALL,
    );
    assert_eq!((o.counted.as_str(), o.changed), ("refreshed", false));
    // Refresh requests to it are unsigned too.
    let later = now + Duration::from_secs(50);
    let brr = r.refresh_requests(later);
    assert_eq!(brr.len(), 1);
    let m = wire::decode(&brr[0].payload).unwrap();
    assert_eq!(m.body, Body::BindingRefreshRequest);
    assert!(m.options.auth.is_none());
}

#[test]
fn the_lifetime_granted_never_runs_past_the_certificate() {
    let mut r = cert_registry(policy());
    let cert = Cert {
        not_after: UNIX + 10,
        ..c1_cert()
    };
    let o = r.handle(
        &cert_bu(&cert, 10, WALL).bytes(),
        c1_from(),
        Instant::now(),
        WALL,
    );
    assert_eq!(o.counted, "registered");
    // 15 units (60 s) asked, 10 s left: 2 units.
    assert_eq!(ba_status(&o, None, 0), (status::ACCEPTED, 10, 2));
}

#[test]
fn a_binding_without_a_service_needs_every_service_of_its_address_to_take_certificates() {
    let p = policy();
    assert!(p.accepts(ip(SERVICE), Some((PROTO_TCP, 80))));
    assert!(!p.accepts(ip(SERVICE), Some((PROTO_UDP, 53))));
    assert!(!p.accepts(ip(SERVICE), None), "udp/53 does not take them");
    assert!(
        !p.accepts(ip("192.0.2.99"), None),
        "not a configured address"
    );
    let mut all = policy();
    all.accepting
        .insert(ServiceKey::new(ip(SERVICE), PROTO_UDP, 53));
    assert!(all.accepts(ip(SERVICE), None));
}

#[test]
fn every_refusal_is_counted_by_its_reason_and_changes_nothing() {
    let mut r = cert_registry(policy());
    let now = Instant::now();
    let good = cert_bu(&c1_cert(), 10, WALL);
    let other_operator = SigningKey::from_bytes(&[0x99; 32]);
    let mut ts = WALL;
    let mut next = || {
        ts += 1;
        ts
    };
    let cases: Vec<(&str, CertBu, SocketAddr, u8)> = vec![
        (
            "untrusted",
            CertBu {
                cert: Some(
                    Cert {
                        issuer: other_operator.clone(),
                        ..c1_cert()
                    }
                    .bytes(),
                ),
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "expired",
            cert_bu(
                &Cert {
                    not_after: UNIX - 1,
                    not_before: UNIX - 100,
                    ..c1_cert()
                },
                10,
                next(),
            ),
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "not_yet_valid",
            cert_bu(
                &Cert {
                    not_before: UNIX + 100,
                    not_after: UNIX + 200,
                    ..c1_cert()
                },
                10,
                next(),
            ),
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "anycast_not_certified",
            CertBu {
                home: "198.51.100.1",
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::PROHIBITED,
        ),
        (
            "service_not_accepting",
            CertBu {
                home: OTHER_SERVICE,
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::PROHIBITED,
        ),
        (
            "service_not_accepting",
            CertBu {
                service: None,
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::PROHIBITED,
        ),
        (
            "real_not_certified",
            CertBu {
                real: Some("10.0.6.11"),
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::INVALID_COA,
        ),
        (
            "source_not_certified",
            CertBu {
                ts: next(),
                ..good.clone()
            },
            "10.0.6.11:5000".parse().unwrap(),
            status::INVALID_COA,
        ),
        (
            "identity_mismatch",
            CertBu {
                id: "c2",
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "identity_has_key",
            cert_bu(
                &Cert {
                    identity: "s1",
                    ..c1_cert()
                },
                10,
                next(),
            ),
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "bad_signature",
            CertBu {
                signer: other_operator.clone(),
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "missing_option",
            CertBu {
                real: None,
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "bad_certificate_truncated",
            CertBu {
                cert: Some(c1_cert().bytes()[..100].to_vec()),
                ts: next(),
                ..good.clone()
            },
            c1_from(),
            status::AUTH_FAILED,
        ),
        (
            "stale",
            CertBu {
                ts: WALL + (31 << 32),
                ..good.clone()
            },
            c1_from(),
            status::ID_MISMATCH,
        ),
    ];
    for (reason, bu, from, st) in cases {
        let (counted, got) = refused(&mut r, &bu.bytes(), from, now);
        assert_eq!(counted, format!("refused_certificate_{reason}"));
        assert_eq!(got, st, "{reason}");
    }
    // A signature over a client binding's context is not one over a registration's.
    let as_client_binding = wire::encode_signed(&good.message(), &good.signer).unwrap();
    let (counted, _) = refused(&mut r, &as_client_binding, c1_from(), now);
    assert_eq!(counted, "refused_certificate_bad_signature");
    // The good one, then its replay (and an older timestamp).
    let o = r.handle(&good.bytes(), c1_from(), now, WALL);
    assert_eq!(o.counted, "registered");
    let (counted, st) = refused(&mut r, &good.bytes(), c1_from(), now);
    assert_eq!(
        (counted.as_str(), st),
        ("refused_certificate_replayed", 144)
    );
    // Malformed: a byte of the signature changed in transit (the checksum catches it), and
    // a certificate part with nothing after it (the signature option missing: an update
    // with neither AUTH nor a signature is unauthenticated).
    let mut bad = CertBu {
        ts: WALL + 100,
        seq: 11,
        ..good.clone()
    }
    .bytes();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let o = r.handle(&bad, c1_from(), now, WALL);
    assert_eq!(o.counted, "dropped_malformed_bad_checksum");
    let unsigned = wire::encode(&good.message(), None);
    let (counted, _) = refused(&mut r, &unsigned, c1_from(), now);
    assert_eq!(counted, "refused_146");
    // Revoked: after a reload with a list naming serial 7, the binding is gone and a new
    // update is refused.
    let mut p = policy();
    p.revoked = anycast_common::pki::RevocationList::new(1, UNIX, vec![7]).unwrap();
    assert!(r.update_policy(cert_registry(p)));
    assert!(
        r.selected(&[]).is_empty(),
        "the revoked server's binding ended"
    );
    let (counted, _) = refused(
        &mut r,
        &CertBu {
            ts: WALL + 200,
            seq: 12,
            ..good.clone()
        }
        .bytes(),
        c1_from(),
        now,
    );
    assert_eq!(counted, "refused_certificate_revoked");
    for reason in [
        "untrusted",
        "expired",
        "revoked",
        "replayed",
        "bad_signature",
        "identity_mismatch",
    ] {
        assert!(
            r.counters()
                .contains_key(&format!("refused_certificate_{reason}")),
            "{reason} counted"
        );
    }
}

#[test]
fn an_identity_known_by_certificate_cannot_be_taken_with_an_empty_key() {
    let mut r = cert_registry(policy());
    let now = Instant::now();
    assert_eq!(
        r.handle(&cert_bu(&c1_cert(), 10, WALL).bytes(), c1_from(), now, WALL)
            .counted,
        "registered"
    );
    // An HMAC update with the empty key and SPI 0 of the certificate's policy.
    let forged = Bu {
        id: "c1",
        key: b"",
        spi: 0,
        home: SERVICE,
        real: C1_REAL,
        service: Some((PROTO_TCP, 80)),
        ..Bu::new(11, WALL + 1)
    };
    let (counted, st) = refused(&mut r, &forged.bytes(), c1_from(), now);
    assert_eq!((counted.as_str(), st), ("refused_146", status::AUTH_FAILED));
}

#[test]
fn a_keyed_identity_uses_a_certificate_only_when_configured_and_within_both_policies() {
    let s1 = Cert {
        identity: "s1",
        real: vec!["10.0.2.0/24"],
        ..c1_cert()
    };
    let from: SocketAddr = "10.0.2.11:5000".parse().unwrap();
    let bu = CertBu {
        real: Some("10.0.2.11"),
        home: "192.0.2.1",
        service: None,
        ..cert_bu(&s1, 10, WALL)
    };
    let mut p = policy();
    p.configured
        .push(ServiceKey::new(ip("192.0.2.1"), PROTO_TCP, 0));
    p.accepting
        .insert(ServiceKey::new(ip("192.0.2.1"), PROTO_TCP, 0));
    let mut r = cert_registry(p.clone());
    let (counted, _) = refused(&mut r, &bu.bytes(), from, Instant::now());
    assert_eq!(counted, "refused_certificate_identity_has_key");
    p.keyed_identities = true;
    let mut r = cert_registry(p);
    let o = r.handle(&bu.bytes(), from, Instant::now(), WALL);
    assert_eq!(o.counted, "registered");
    // The configured policy still applies: s1 may not bind 192.0.2.10 (its allow list),
    // though the certificate covers it (the refusal is signed with s1's key).
    let o = r.handle(
        &CertBu {
            home: SERVICE,
            service: Some((PROTO_TCP, 80)),
            seq: 11,
            ts: WALL + 1,
            ..bu.clone()
        }
        .bytes(),
        from,
        Instant::now(),
        WALL,
    );
    assert_eq!(o.counted, format!("refused_{}", status::PROHIBITED));
    assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::PROHIBITED);
}

#[test]
fn without_certificates_configured_a_signed_update_is_refused() {
    let mut r = registry(Limits::default(), 30);
    let (counted, _) = refused(
        &mut r,
        &cert_bu(&c1_cert(), 10, WALL).bytes(),
        c1_from(),
        Instant::now(),
    );
    assert_eq!(counted, "refused_certificate_not_accepted");
}

#[test]
fn a_reload_with_an_older_revocation_list_keeps_the_newer_one() {
    let mut p = policy();
    p.revoked = anycast_common::pki::RevocationList::new(5, UNIX, vec![7]).unwrap();
    let mut r = cert_registry(p);
    let mut older = policy();
    older.revoked = anycast_common::pki::RevocationList::new(4, UNIX, vec![]).unwrap();
    r.update_policy(cert_registry(older));
    assert_eq!(r.revocation_list_number(), Some(5));
    assert_eq!(r.counters()["revocation_list_refused_older"], 1);
    let (counted, _) = refused(
        &mut r,
        &cert_bu(&c1_cert(), 10, WALL).bytes(),
        c1_from(),
        Instant::now(),
    );
    assert_eq!(counted, "refused_certificate_revoked");
}

/// A flood of forged certificate-signed updates (each a well-formed certificate that
/// passes every cheap check, by an operator the agent does not trust, or with a bad
/// signature) costs at most the budget's signature checks; the rest are dropped after the
/// cheap checks, and a keyed server still registers meanwhile.
#[test]
fn a_flood_of_forged_certificates_is_checked_only_within_its_budget() {
    let mut p = policy();
    p.checks_per_second = 100;
    let mut r = cert_registry(p);
    let now = Instant::now();
    let forged = Cert {
        issuer: SigningKey::from_bytes(&[0x99; 32]),
        ..c1_cert()
    };
    const FLOOD: u64 = 20_000;
    let payloads: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| cert_bu(&forged, i as u16, WALL + i + 1).bytes())
        .collect();
    let started = std::time::Instant::now();
    for p in &payloads {
        r.handle(p, c1_from(), now, WALL);
    }
    let took = started.elapsed();
    let c = r.counters();
    let checked = c.get("refused_certificate_untrusted").copied().unwrap_or(0);
    let dropped = c
        .get("dropped_certificate_rate_limited")
        .copied()
        .unwrap_or(0);
    // The burst is twice the rate, and the clock does not move in this test.
    assert_eq!(checked, 200);
    assert_eq!(checked + dropped, FLOOD);
    let per_message = took / FLOOD as u32;
    eprintln!("{FLOOD} forged certificate updates handled in {took:?} ({per_message:?} each)");
    assert!(
        per_message < Duration::from_micros(100),
        "a forged update costs {per_message:?}: the cheap checks must stay cheap"
    );
    // A keyed server is not affected.
    let o = r.handle(&Bu::new(10, WALL).bytes(), from(), now, WALL);
    assert_eq!(o.counted, "registered");
}

/// The largest certificate (identity of 64 bytes, 16 IPv6 prefixes of each kind) fits a
/// binding update the agent takes (its receive buffer is 2048 bytes).
#[test]
fn the_largest_certificate_signed_update_fits_the_agents_buffer() {
    let v6: Vec<&'static str> = (0..16)
        .map(|i| &*Box::leak(format!("2001:db8:{i:x}::/48").into_boxed_str()))
        .collect();
    let cert = Cert {
        identity: Box::leak("x".repeat(64).into_boxed_str()),
        real: v6.clone(),
        anycast: v6,
        ..c1_cert()
    };
    let bytes = cert.bytes();
    assert_eq!(bytes.len(), anycast_common::pki::MAX_CERT_LEN);
    let bu = CertBu {
        id: cert.identity,
        home: "2001:db8::1",
        real: Some("2001:db8:1::1"),
        ..cert_bu(&cert, 1, WALL)
    };
    let payload = bu.bytes();
    eprintln!(
        "largest certificate-signed binding update: {} bytes",
        payload.len()
    );
    assert!(payload.len() <= 2048, "{} bytes", payload.len());
    assert!(wire::verify_registration_signed(
        &payload,
        &cert.key.verifying_key()
    ));
    assert_eq!(
        wire::decode(&payload).unwrap().options.certificate,
        Some(bytes)
    );
}

/// The README's byte-by-byte example: identity `s1`, IPv4 addresses, a service selector and
/// a 199-byte certificate.
#[test]
fn the_readme_example_layout_holds() {
    let cert = Cert {
        identity: "s1",
        real: vec![
            "10.71.2.11/32",
            "fd71:2::11/128",
            "10.71.3.11/32",
            "fd71:3::11/128",
        ],
        anycast: vec!["10.71.100.1/32", "fd71:100::1/128"],
        ..c1_cert()
    };
    assert_eq!(cert.bytes().len(), 199);
    let payload = CertBu {
        home: "10.71.100.1",
        real: Some("10.71.2.11"),
        ..cert_bu(&cert, 1, WALL)
    }
    .bytes();
    assert_eq!(payload.len(), 416);
    let mh = &payload[40..];
    assert_eq!(mh[1], 46, "header length");
    assert_eq!(&mh[14..16], &[3, 16], "Alt-CoA");
    assert_eq!(&mh[32..37], &[8, 3, 1, b's', b'1'], "MN-ID");
    assert_eq!(&mh[42..44], &[10, 8], "MESG-ID");
    assert_eq!(&mh[52..54], &[48, 18], "load");
    assert_eq!(&mh[74..81], &[19, 8, 0, 0, 0, 0, 1], "service");
    assert_eq!(&mh[86..93], &[19, 204, 0, 0, 0, 0, 3], "certificate part");
    assert_eq!(&mh[298..306], &[19, 76, 0, 0, 0, 0, 4, 1], "signature");
    assert_eq!(mh.len(), 376);
}
