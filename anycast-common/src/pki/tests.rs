//! Certificates and revocation lists: known bytes, round trips, every refusal, signatures
//! that do not carry over between objects or keys, and a fuzz-style test of both parsers.
use super::*;

pub(crate) fn operator() -> SigningKey {
    SigningKey::from_bytes(&[0x11; 32])
}

pub(crate) fn server_key() -> SigningKey {
    SigningKey::from_bytes(&[0x22; 32])
}

fn p(s: &str) -> CertPrefix {
    let (a, l) = s.split_once('/').unwrap();
    CertPrefix::new(a.parse().unwrap(), l.parse().unwrap()).unwrap()
}

pub(crate) fn body() -> CertificateBody {
    CertificateBody {
        serial: 0x0102_0304_0506_0708,
        not_before: 1_700_000_000,
        not_after: 1_800_000_000,
        subject_key: server_key().verifying_key().to_bytes(),
        identity: "s1".into(),
        real: vec![p("10.71.2.11/32"), p("fd71:2::/64")],
        anycast: vec![p("10.71.100.1/32")],
    }
}

#[test]
fn certificate_bytes_are_as_documented() {
    let cert = Certificate::issue(body(), &operator()).unwrap();
    let b = cert.as_bytes();
    assert_eq!(&b[..2], &[1, 0], "version, reserved");
    assert_eq!(&b[2..10], &0x0102_0304_0506_0708u64.to_be_bytes());
    assert_eq!(&b[10..18], &1_700_000_000u64.to_be_bytes());
    assert_eq!(&b[18..26], &1_800_000_000u64.to_be_bytes());
    assert_eq!(&b[26..58], &server_key().verifying_key().to_bytes());
    assert_eq!(&b[58..61], &[2, b's', b'1']);
    // Two real prefixes: 10.71.2.11/32 (6 bytes), fd71:2::/64 (18 bytes).
    assert_eq!(&b[61..68], &[2, 4, 32, 10, 71, 2, 11]);
    assert_eq!(&b[68..70], &[6, 64]);
    assert_eq!(
        &b[70..86],
        &"fd71:2::".parse::<Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(&b[86..93], &[1, 4, 32, 10, 71, 100, 1]);
    assert_eq!(b.len(), 93 + SIGNATURE_LEN);
    // The signature: over the context and every byte before it.
    let mut signed = CERT_CONTEXT.to_vec();
    signed.extend_from_slice(&b[..93]);
    let sig = Signature::from_bytes(b[93..].try_into().unwrap());
    operator()
        .verifying_key()
        .verify_strict(&signed, &sig)
        .unwrap();
    assert_eq!(Certificate::decode(b).unwrap(), cert);
    assert!(cert.issued_by(&operator().verifying_key()));
}

#[test]
fn certificates_round_trip_at_every_size_limit() {
    let v6 = |i: u16| p(&format!("fd71:{i:x}::/48"));
    let mut big = body();
    big.identity = "x".repeat(MAX_IDENTITY_LEN);
    big.real = (0..MAX_PREFIXES as u16)
        .map(|i| v6(i).with_len(128))
        .collect();
    big.anycast = (0..MAX_PREFIXES as u16)
        .map(|i| v6(0x100 + i).with_len(128))
        .collect();
    let mut tiny = body();
    tiny.identity = "a".into();
    tiny.real = vec![p("0.0.0.0/0")];
    tiny.anycast = vec![p("::/0")];
    tiny.not_after = tiny.not_before;
    for b in [body(), big, tiny] {
        let c = Certificate::issue(b.clone(), &operator()).unwrap();
        assert!(c.as_bytes().len() <= MAX_CERT_LEN);
        let d = Certificate::decode(c.as_bytes()).unwrap();
        assert_eq!(d.body, b);
        assert!(d.issued_by(&operator().verifying_key()));
    }
    let mut big = body();
    big.identity = "x".repeat(MAX_IDENTITY_LEN);
    big.real = vec![p("fd71::1/128"); MAX_PREFIXES];
    big.anycast = vec![p("fd71::2/128"); MAX_PREFIXES];
    let c = Certificate::issue(big, &operator()).unwrap();
    assert_eq!(c.as_bytes().len(), MAX_CERT_LEN, "the documented maximum");
}

impl CertPrefix {
    fn with_len(self, len: u8) -> CertPrefix {
        CertPrefix::new(self.addr, len).unwrap()
    }
}

#[test]
fn prefixes_contain_what_they_should() {
    assert!(p("10.71.2.0/24").contains("10.71.2.200".parse().unwrap()));
    assert!(!p("10.71.2.0/24").contains("10.71.3.1".parse().unwrap()));
    assert!(p("10.71.2.11/32").contains("10.71.2.11".parse().unwrap()));
    assert!(!p("10.71.2.11/32").contains("10.71.2.12".parse().unwrap()));
    assert!(p("0.0.0.0/0").contains("192.0.2.1".parse().unwrap()));
    assert!(!p("0.0.0.0/0").contains("::1".parse().unwrap()), "family");
    assert!(!p("::/0").contains("10.0.0.1".parse().unwrap()), "family");
    assert!(p("fd71:2::/64").contains("fd71:2::ffff".parse().unwrap()));
    assert!(!p("fd71:2::/64").contains("fd71:2:0:1::".parse().unwrap()));
    // An IPv4-mapped address is IPv6 here: the wire module converts it back first.
    assert!(!p("10.71.2.11/32").contains("::ffff:10.71.2.11".parse().unwrap()));
    // Host bits and lengths beyond the width are refused.
    assert_eq!(CertPrefix::new("10.71.2.1".parse().unwrap(), 24), None);
    assert_eq!(CertPrefix::new("10.71.2.0".parse().unwrap(), 33), None);
    assert_eq!(CertPrefix::new("fd71::1".parse().unwrap(), 64), None);
    assert_eq!(CertPrefix::new("fd71::".parse().unwrap(), 129), None);
}

/// Certificate bytes with the signature made right again after an edit of the body, so a
/// refusal is the body's and not the signature's.
fn resigned(mut signed_part: Vec<u8>) -> Vec<u8> {
    let mut m = CERT_CONTEXT.to_vec();
    m.extend_from_slice(&signed_part);
    signed_part.extend_from_slice(&operator().sign(&m).to_bytes());
    signed_part
}

#[test]
fn malformed_certificates_are_refused_with_their_reason() {
    let good = Certificate::issue(body(), &operator()).unwrap();
    let b = good.as_bytes().to_vec();
    let tbs = b[..b.len() - SIGNATURE_LEN].to_vec();
    let edit = |at: usize, v: u8| {
        let mut t = tbs.clone();
        t[at] = v;
        resigned(t)
    };
    let weak = {
        // The identity point (a weak key of small order).
        let mut t = tbs.clone();
        t[26..58].copy_from_slice(&{
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        });
        resigned(t)
    };
    let mut trailing = b.clone();
    trailing.push(0);
    let mut swapped = body();
    swapped.not_after = swapped.not_before - 1;
    let cases: Vec<(&str, Vec<u8>, PkiError)> = vec![
        ("empty", vec![], PkiError::Truncated),
        ("short", b[..b.len() - 1].to_vec(), PkiError::Truncated),
        ("trailing", trailing, PkiError::TrailingBytes),
        ("version 2", edit(0, 2), PkiError::BadVersion),
        ("reserved", edit(1, 1), PkiError::BadVersion),
        ("identity length 0", edit(58, 0), PkiError::BadIdentity),
        ("identity length 65", edit(58, 65), PkiError::BadIdentity),
        ("identity not UTF-8", edit(59, 0xff), PkiError::BadIdentity),
        ("no real prefix", edit(61, 0), PkiError::BadPrefix),
        ("17 real prefixes", edit(61, 17), PkiError::BadPrefix),
        ("family 5", edit(62, 5), PkiError::BadPrefix),
        ("IPv4 /33", edit(63, 33), PkiError::BadPrefix),
        ("host bits", edit(63, 24), PkiError::BadPrefix),
        ("no anycast prefix", edit(86, 0), PkiError::BadPrefix),
        ("weak subject key", weak, PkiError::BadSubjectKey),
    ];
    for (what, bytes, want) in cases {
        assert_eq!(Certificate::decode(&bytes), Err(want), "{what}");
        // `peek` checks the same but the subject key.
        if want == PkiError::BadSubjectKey {
            assert!(Certificate::peek(&bytes).is_ok(), "{what}");
        } else {
            assert_eq!(Certificate::peek(&bytes), Err(want), "peek: {what}");
        }
    }
    assert_eq!(Certificate::peek(&b), Ok(body()));
    assert_eq!(
        Certificate::issue(swapped, &operator()),
        Err(PkiError::BadValidity)
    );
    let mut t = tbs.clone();
    t[18..26].copy_from_slice(&1u64.to_be_bytes());
    assert_eq!(
        Certificate::decode(&resigned(t)),
        Err(PkiError::BadValidity)
    );
}

#[test]
fn only_the_operator_key_issues_and_every_byte_is_signed() {
    let cert = Certificate::issue(body(), &operator()).unwrap();
    let anchor = operator().verifying_key();
    // Self-signed: the server's own key is no anchor.
    let self_signed = Certificate::issue(body(), &server_key()).unwrap();
    assert!(!self_signed.issued_by(&anchor));
    assert!(self_signed.issued_by(&server_key().verifying_key()));
    // Any bit flipped in what is signed, or in the signature, and it no longer verifies
    // (or no longer parses).
    let b = cert.as_bytes();
    for at in 0..b.len() {
        for bit in [0, 3, 7] {
            let mut x = b.to_vec();
            x[at] ^= 1 << bit;
            if let Ok(c) = Certificate::decode(&x) {
                assert!(!c.issued_by(&anchor), "byte {at} bit {bit}");
            }
        }
    }
    // A revocation list's signature is not a certificate's (context strings differ): the
    // operator's signature over the same bytes in the other context does not verify.
    let tbs = &b[..b.len() - SIGNATURE_LEN];
    let mut m = REVOCATION_CONTEXT.to_vec();
    m.extend_from_slice(tbs);
    let mut other = tbs.to_vec();
    other.extend_from_slice(&operator().sign(&m).to_bytes());
    assert!(!Certificate::decode(&other).unwrap().issued_by(&anchor));
}

#[test]
fn certificate_checks_answer_for_validity_real_and_anycast() {
    let c = Certificate::issue(body(), &operator()).unwrap();
    assert!(!c.valid_at(1_699_999_999));
    assert!(c.valid_at(1_700_000_000));
    assert!(c.valid_at(1_800_000_000));
    assert!(!c.valid_at(1_800_000_001));
    assert!(c.allows_real("10.71.2.11".parse().unwrap()));
    assert!(c.allows_real("fd71:2::99".parse().unwrap()));
    assert!(!c.allows_real("10.71.2.12".parse().unwrap()));
    assert!(c.allows_anycast("10.71.100.1".parse().unwrap()));
    assert!(!c.allows_anycast("10.71.100.2".parse().unwrap()));
    assert_eq!(c.subject_key(), server_key().verifying_key());
}

#[test]
fn revocation_lists_round_trip_and_refuse_forgeries() {
    let anchor = operator().verifying_key();
    let list = RevocationList::new(3, 1_750_000_000, vec![9, 2, 2, 700]).unwrap();
    assert_eq!(list.serials(), &[2, 9, 700]);
    let b = list.sign(&operator());
    assert_eq!(&b[..8], b"ACRV\x01\0\0\0");
    assert_eq!(&b[8..16], &3u64.to_be_bytes());
    assert_eq!(&b[16..24], &1_750_000_000u64.to_be_bytes());
    assert_eq!(&b[24..28], &3u32.to_be_bytes());
    assert_eq!(&b[28..36], &2u64.to_be_bytes());
    assert_eq!(b.len(), 28 + 3 * 8 + SIGNATURE_LEN);
    let back = RevocationList::decode_verified(&b, &[anchor]).unwrap();
    assert_eq!(back, list);
    assert!(back.is_revoked(9) && !back.is_revoked(10));
    // An empty list is a list.
    let empty = RevocationList::new(1, 1, vec![]).unwrap().sign(&operator());
    assert!(RevocationList::decode_verified(&empty, &[anchor]).is_ok());

    // Signed by someone else, or by nobody we trust.
    let forged = list.sign(&server_key());
    assert_eq!(
        RevocationList::decode_verified(&forged, &[anchor]),
        Err(PkiError::BadSignature)
    );
    assert_eq!(
        RevocationList::decode_verified(&b, &[]),
        Err(PkiError::BadSignature)
    );
    // A serial taken out (count fixed): the signature no longer covers it.
    let mut shorter = b.clone();
    shorter.drain(28..36);
    shorter[24..28].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(
        RevocationList::decode_verified(&shorter, &[anchor]),
        Err(PkiError::BadSignature)
    );
    // Form errors.
    let resign = |mut t: Vec<u8>| {
        let mut m = REVOCATION_CONTEXT.to_vec();
        m.extend_from_slice(&t);
        t.extend_from_slice(&operator().sign(&m).to_bytes());
        t
    };
    let tbs = b[..b.len() - SIGNATURE_LEN].to_vec();
    let mut unsorted = tbs.clone();
    unsorted[28..36].copy_from_slice(&9u64.to_be_bytes());
    let mut magic = tbs.clone();
    magic[0] = b'X';
    let mut huge = tbs.clone();
    huge[24..28].copy_from_slice(&(MAX_REVOKED as u32 + 1).to_be_bytes());
    let mut trailing = b.clone();
    trailing.push(0);
    for (what, bytes, want) in [
        ("unsorted", resign(unsorted), PkiError::BadSerials),
        ("magic", resign(magic), PkiError::BadVersion),
        ("too many", resign(huge), PkiError::BadSerials),
        ("truncated", b[..40].to_vec(), PkiError::Truncated),
        ("trailing", trailing, PkiError::TrailingBytes),
        (
            "a certificate",
            Certificate::issue(body(), &operator())
                .unwrap()
                .as_bytes()
                .to_vec(),
            PkiError::BadVersion,
        ),
    ] {
        assert_eq!(
            RevocationList::decode_verified(&bytes, &[anchor]),
            Err(want),
            "{what}"
        );
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzz_certificate_and_list_parsers_never_panic_and_give_reasons() {
    let mut rng = Rng(0x005e_ed0f_ce47);
    let anchor = operator().verifying_key();
    let cert = Certificate::issue(body(), &operator()).unwrap();
    let list = RevocationList::new(1, 2, vec![1, 5, 9])
        .unwrap()
        .sign(&operator());
    let mut outcomes: std::collections::BTreeMap<&str, usize> = Default::default();
    const N: usize = 20_000;
    for i in 0..N {
        let base: &[u8] = if i % 2 == 0 { cert.as_bytes() } else { &list };
        let mut b = base.to_vec();
        match rng.below(4) {
            0 => {
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            }
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    b[at] = rng.next() as u8;
                }
            }
            2 => {
                let at = rng.below(b.len());
                b.insert(at, rng.next() as u8);
            }
            _ => b = (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        }
        let outcome = if i % 2 == 0 {
            match Certificate::decode(&b) {
                // A changed certificate that still parses must not verify.
                Ok(c) if b != cert.as_bytes() => {
                    assert!(!c.issued_by(&anchor));
                    "parsed_unsigned"
                }
                Ok(_) => "ok",
                Err(e) => e.reason(),
            }
        } else {
            match RevocationList::decode_verified(&b, &[anchor]) {
                Ok(_) => {
                    assert_eq!(b, list, "only the signed list verifies");
                    "ok"
                }
                Err(e) => e.reason(),
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    assert_eq!(outcomes.values().sum::<usize>(), N);
    for key in outcomes.keys() {
        assert!(
            ["ok", "parsed_unsigned"].contains(key)
                || PkiError::ALL.iter().any(|e| e.reason() == *key),
            "{key}"
        );
    }
    for e in [
        PkiError::Truncated,
        PkiError::TrailingBytes,
        PkiError::BadVersion,
        PkiError::BadSignature,
    ] {
        assert!(
            outcomes.contains_key(e.reason()),
            "never saw {}",
            e.reason()
        );
    }
}
