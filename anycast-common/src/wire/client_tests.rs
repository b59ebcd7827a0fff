//! Client bindings (route optimization): the H-clear Binding Update, the certificate parts
//! and the signature option: known layout, round trips, what the signature covers, and
//! every refusal of the new options.
use super::decode::be16;
use super::tests::{mapped, v6, walk_options, KEY};
use super::*;
use crate::pki::{SigningKey, MAX_CERT_LEN};

pub(super) fn signer() -> SigningKey {
    SigningKey::from_bytes(&[0x33; 32])
}

/// A client binding with a certificate of `cert_len` bytes (their values are the wire's
/// business only here: the pki module parses them).
pub(super) fn client_binding(cert_len: usize) -> Message {
    Message {
        src: mapped("10.71.100.1"),
        dst: mapped("10.71.0.21"),
        body: Body::ClientBindingUpdate {
            seq: 0x0102,
            lifetime: 15,
        },
        options: Options {
            alt_coa: Some(mapped("10.71.2.11")),
            mesg_id: Some(0xe9a1_b2c3_8000_0000),
            service: Some(ServiceSelector {
                protocol: 6,
                port: 80,
            }),
            certificate: Some((0..cert_len).map(|i| (i * 7) as u8).collect()),
            ..Options::default()
        },
    }
}

/// Payload length, header length and checksum made right after an edit.
fn fix_up(b: &mut [u8]) {
    let mh_len = b.len() - 40;
    b[4..6].copy_from_slice(&(mh_len as u16).to_be_bytes());
    b[41] = (mh_len / 8 - 1) as u8;
    b[44] = 0;
    b[45] = 0;
    let sum = checksum(&decode::addr(b, 8), &decode::addr(b, 24), &b[40..]);
    b[44..46].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn client_binding_layout_is_as_documented() {
    let msg = client_binding(100);
    let b = encode_signed(&msg, &signer()).unwrap();
    let mh = &b[40..];
    assert_eq!(mh[2], 5, "a Binding Update");
    assert_eq!(be16(mh, 6), 0x0102, "sequence");
    assert_eq!(
        be16(mh, 8),
        0,
        "no flag: H clear (correspondent registration), A clear"
    );
    assert_eq!(be16(mh, 10), 15, "lifetime");
    let opts = walk_options(&b);
    let real: Vec<(usize, u8)> = opts
        .iter()
        .copied()
        .filter(|&(_, t)| t != option::PAD1 && t != option::PADN)
        .collect();
    let types: Vec<u8> = real.iter().map(|&(_, t)| t).collect();
    assert_eq!(
        types,
        [
            option::ALT_COA,
            option::MESG_ID,
            option::VENDOR,
            option::VENDOR,
            option::VENDOR
        ]
    );
    let (cert_at, sig_at) = (real[3].0, real[4].0);
    assert_eq!(cert_at % 4, 2, "vendor options at 4n+2");
    assert_eq!(&mh[cert_at..cert_at + 7], &[19, 105, 0, 0, 0, 0, 3]);
    assert_eq!(
        &mh[cert_at + 7..cert_at + 107],
        msg.options.certificate.as_deref().unwrap()
    );
    assert_eq!(sig_at % 8, 2, "signature option at 8n+2");
    assert_eq!(
        &mh[sig_at..sig_at + 14],
        &[19, 76, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0, 0],
        "type, length, vendor 0, sub-type 4, Ed25519, reserved"
    );
    assert_eq!(sig_at + 78, mh.len(), "the signature ends the MH");
    // The signature: over the context, the inner addresses and the MH up to it, checksum
    // as zero.
    let mut m = crate::pki::BINDING_CONTEXT.to_vec();
    m.extend_from_slice(&b[8..40]);
    m.extend_from_slice(&mh[..4]);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&mh[6..sig_at + 14]);
    let sig = crate::pki::Signature::from_bytes(mh[sig_at + 14..].try_into().unwrap());
    signer().verifying_key().verify_strict(&m, &sig).unwrap();
}

#[test]
fn client_bindings_round_trip_at_every_certificate_size() {
    for len in [
        1,
        2,
        CERT_PART_MAX - 1,
        CERT_PART_MAX,
        CERT_PART_MAX + 1,
        500,
        MAX_CERT_LEN,
    ] {
        let msg = client_binding(len);
        let b = encode_signed(&msg, &signer()).unwrap();
        assert!(b.len() - 40 <= 2048);
        let d = decode(&b).unwrap();
        assert!(d.options.signature.is_some(), "{len}");
        let mut want = msg.clone();
        want.options.signature = d.options.signature;
        assert_eq!(d, want, "{len}");
        assert!(verify_signed(&b, &signer().verifying_key()), "{len}");
        let parts = walk_options(&b)
            .iter()
            .filter(|&&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_CERTIFICATE)
            .count();
        assert_eq!(parts, len.div_ceil(CERT_PART_MAX), "{len}");
    }
    // Withdrawal (lifetime 0) and no certificate: still a well-formed signed message.
    let mut msg = client_binding(1);
    msg.body = Body::ClientBindingUpdate {
        seq: 9,
        lifetime: 0,
    };
    msg.options.certificate = None;
    let b = encode_signed(&msg, &signer()).unwrap();
    assert!(verify_signed(&b, &signer().verifying_key()));
    // IPv6 throughout.
    let mut msg = client_binding(300);
    (msg.src, msg.dst) = (v6("fd71:100::1"), v6("fd71::21"));
    msg.options.alt_coa = Some(v6("fd71:2::11"));
    let b = encode_signed(&msg, &signer()).unwrap();
    assert_eq!(decode(&b).unwrap().options.alt_coa, msg.options.alt_coa);
    assert!(verify_signed(&b, &signer().verifying_key()));
}

#[test]
fn home_and_client_binding_updates_are_told_apart_by_h() {
    let home = Message {
        src: mapped("10.71.100.1"),
        dst: mapped("10.71.1.2"),
        body: Body::BindingUpdate {
            seq: 1,
            ack: true,
            lifetime: 2,
        },
        options: Options::default(),
    };
    let mut b = encode(&home, Some(KEY));
    assert_eq!(decode(&b).unwrap().body, home.body);
    // H cleared (A kept): a correspondent registration, never a home one.
    b[48] &= !0x40;
    fix_up(&mut b);
    assert_eq!(
        decode(&b).unwrap().body,
        Body::ClientBindingUpdate {
            seq: 1,
            lifetime: 2
        }
    );
    assert!(!verify(&b, KEY), "and its AUTH no longer verifies");
}

#[test]
fn the_signature_covers_every_byte_and_only_its_key_verifies() {
    let msg = client_binding(120);
    let b = encode_signed(&msg, &signer()).unwrap();
    let good = signer().verifying_key();
    assert!(!verify_signed(
        &b,
        &SigningKey::from_bytes(&[0x44; 32]).verifying_key()
    ));
    // An HMAC-sealed message has no signature; a signed one no AUTH.
    assert!(!verify_signed(&encode(&msg, Some(KEY)), &good));
    assert!(!verify(&b, KEY));
    // Every bit of the inner addresses and of the MH (checksum made right again so the
    // signature, not the checksum, refuses it), one bit per byte.
    for at in 8..b.len() {
        // The header length and the checksum are made right again by fix_up.
        if at == 41 || at == 44 || at == 45 {
            continue;
        }
        let mut x = b.clone();
        x[at] ^= 1 << (at % 8);
        fix_up(&mut x);
        assert!(!verify_signed(&x, &good), "byte {at}");
    }
}

#[test]
fn malformed_client_options_are_refused_with_their_reason() {
    let b = encode_signed(&client_binding(40), &signer()).unwrap();
    let opts = walk_options(&b);
    let sig_at = 40 + opts.last().unwrap().0;
    let cert_at = 40
        + opts
            .iter()
            .find(|&&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_CERTIFICATE)
            .unwrap()
            .0;
    let edited = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut x = b.clone();
        f(&mut x);
        fix_up(&mut x);
        decode(&x).map(|_| ())
    };
    // Something after the signature: padding, or an option.
    assert_eq!(
        edited(&|x| x.extend_from_slice(&[1, 6, 0, 0, 0, 0, 0, 0])),
        Err(WireError::SignatureNotLast)
    );
    // Another algorithm, reserved bytes set.
    assert_eq!(
        edited(&|x| x[sig_at + 7] = 2),
        Err(WireError::BadSignatureOption)
    );
    assert_eq!(
        edited(&|x| x[sig_at + 13] = 1),
        Err(WireError::BadSignatureOption)
    );
    // A shorter signature option (the MH shortened with it, so it is still last).
    assert_eq!(
        edited(&|x| {
            x[sig_at + 1] = 68;
            x.truncate(x.len() - 8);
        }),
        Err(WireError::BadSignatureOption)
    );
    // An empty certificate part (the rest of the old part as PadN).
    assert_eq!(
        edited(&|x| {
            x[cert_at + 1] = 5;
            x[cert_at + 7] = option::PADN;
            x[cert_at + 8] = 40 - 2;
            for i in 0..38 {
                x[cert_at + 9 + i] = 0;
            }
        }),
        Err(WireError::BadCertificateOption)
    );
    // Parts adding up to more than a certificate can be.
    let big = encode_signed(&client_binding(MAX_CERT_LEN), &signer()).unwrap();
    let first = 40
        + walk_options(&big)
            .iter()
            .find(|&&(at, t)| t == option::VENDOR && big[40 + at + 6] == VENDOR_CERTIFICATE)
            .unwrap()
            .0;
    let mut x = big.clone();
    // One more 8-byte part in front of the first (8n+2 stays 4n+2).
    x.splice(first..first, [option::VENDOR, 6, 0, 0, 0, 0, 3, 0xaa]);
    fix_up(&mut x);
    assert_eq!(decode(&x).map(|_| ()), Err(WireError::BadCertificateOption));
    // Encoding refuses what decoding would.
    let mut msg = client_binding(1);
    msg.options.certificate = Some(vec![]);
    assert_eq!(
        encode_signed(&msg, &signer()),
        Err(EncodeError::BadCertificate(0))
    );
    msg.options.certificate = Some(vec![0; MAX_CERT_LEN + 1]);
    assert_eq!(
        encode_signed(&msg, &signer()),
        Err(EncodeError::BadCertificate(MAX_CERT_LEN + 1))
    );
}

#[test]
fn named_connections_round_trip_and_are_signed() {
    for n in [1, 2, MAX_NAMED_CONNECTIONS] {
        let mut msg = client_binding(120);
        msg.options.connections = (0..n as u16).map(|i| (40_000 + i, 80 + i % 3)).collect();
        let b = encode_signed(&msg, &signer()).unwrap();
        let back = decode(&b).unwrap();
        assert_eq!(
            back.options.connections, msg.options.connections,
            "{n} pairs"
        );
        assert!(verify_signed(&b, &signer().verifying_key()));
        // The option as documented: vendor id 0, sub-type 5, then the pairs.
        let (at, _) = *walk_options(&b)
            .iter()
            .find(|&&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_CONNECTIONS)
            .unwrap();
        let o = 40 + at;
        assert_eq!(at % 4, 2, "at 4n+2");
        assert_eq!(b[o + 1] as usize, 5 + 4 * n);
        assert_eq!(be16(&b, o + 7), 40_000);
        assert_eq!(be16(&b, o + 9), 80);
        // Changing a named port breaks the signature: an attacker cannot add connections.
        let mut x = b.clone();
        x[o + 8] ^= 1;
        fix_up(&mut x);
        assert_eq!(decode(&x).unwrap().options.connections[0].0, 40_000 ^ 1);
        assert!(!verify_signed(&x, &signer().verifying_key()));
    }
    let mut msg = client_binding(10);
    msg.options.connections = vec![(1, 2); MAX_NAMED_CONNECTIONS + 1];
    assert_eq!(
        encode_signed(&msg, &signer()),
        Err(EncodeError::TooManyConnections(MAX_NAMED_CONNECTIONS + 1))
    );
}

#[test]
fn malformed_connection_options_are_refused() {
    let mut msg = client_binding(120);
    msg.options.connections = vec![(40_000, 80), (40_001, 80)];
    let b = encode_signed(&msg, &signer()).unwrap();
    let (at, _) = *walk_options(&b)
        .iter()
        .find(|&&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_CONNECTIONS)
        .unwrap();
    let o = 40 + at;
    // Not whole pairs: one pair and 2 bytes, the rest PadN-free (the option is 13 bytes,
    // then a Pad1 keeps the following offsets).
    let mut x = b.clone();
    x[o + 1] = 11;
    x[o + 13] = option::PAD1;
    x[o + 14] = option::PAD1;
    fix_up(&mut x);
    assert_eq!(decode(&x).map(|_| ()), Err(WireError::BadConnectionsOption));
    // Empty: no pair (the pairs' 8 bytes become a PadN).
    let mut x = b.clone();
    x[o + 1] = 5;
    x[o + 7] = option::PADN;
    x[o + 8] = 6;
    for i in 0..6 {
        x[o + 9 + i] = 0;
    }
    fix_up(&mut x);
    assert_eq!(decode(&x).map(|_| ()), Err(WireError::BadConnectionsOption));
    // Twice.
    let mut x = b.clone();
    let copy: Vec<u8> = x[o..o + 13].to_vec();
    x.splice(o..o, copy.iter().copied().chain([0, 0, 0]));
    // 16 more bytes: the option (13) and a PadN of 3 keep 4n+2 for the next.
    x[o + 13] = option::PADN;
    x[o + 14] = 1;
    fix_up(&mut x);
    assert_eq!(decode(&x).map(|_| ()), Err(WireError::BadConnectionsOption));
}
