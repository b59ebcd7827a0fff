//! Round trips, known answers, alignment, authentication, rejections, and a fuzz-style
//! property test of the decoder.
use super::decode::{addr, be16};
use super::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

const SECRET: &[u8] = b"a shared secret of some length";
pub(super) const KEY: Key = Key {
    spi: 0x0102_0304,
    secret: SECRET,
};

pub(super) fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

pub(super) fn mapped(s: &str) -> Ipv6Addr {
    to_mapped(IpAddr::V4(s.parse::<Ipv4Addr>().unwrap()))
}

fn bodies(home: Ipv6Addr) -> Vec<Body> {
    vec![
        Body::BindingRefreshRequest,
        Body::BindingUpdate {
            seq: 0xbeef,
            ack: true,
            lifetime: 75,
        },
        Body::BindingUpdate {
            seq: 0,
            ack: false,
            lifetime: 0,
        },
        Body::BindingAck {
            status: status::AUTH_FAILED,
            seq: 65535,
            lifetime: 0x1234,
        },
        Body::BindingError { status: 1, home },
        Body::DiscoveryRequest,
        Body::DiscoveryReply {
            lifetime: 150,
            agents: agents(),
        },
    ]
}

/// Two agents, one with both families and one with IPv6 only.
pub(super) fn agents() -> Vec<AgentEntry> {
    vec![
        AgentEntry {
            id: "a".into(),
            v4: Some(Ipv4Addr::new(10, 71, 1, 2)),
            v6: Some(v6("fd71:1::2")),
        },
        AgentEntry {
            id: "agent-b.example".into(),
            v4: None,
            v6: Some(v6("fd71:2::3")),
        },
    ]
}

/// Every subset of the five options we encode (AUTH comes from the key).
fn option_sets(coa: Ipv6Addr) -> Vec<Options> {
    (0..32u32)
        .map(|bits| Options {
            alt_coa: (bits & 1 != 0).then_some(coa),
            mn_id: (bits & 2 != 0).then(|| "server-17@anycast.example".to_owned()),
            mesg_id: (bits & 4 != 0).then_some(0xe9a1_b2c3_8000_0000),
            load: (bits & 8 != 0).then_some(LoadInfo {
                priority: 7,
                sessions_in_use: 1,
                max_sessions: 0xffff_fffe,
                used_capacity: 300,
                max_capacity: 1000,
            }),
            service: (bits & 16 != 0).then_some(ServiceSelector {
                protocol: 6,
                port: 443,
            }),
            ..Options::default()
        })
        .collect()
}

/// (home/anycast, agent, real address) triples: IPv6 and IPv4-mapped.
fn address_sets() -> Vec<(Ipv6Addr, Ipv6Addr, Ipv6Addr)> {
    vec![
        (v6("fd71:100::1"), v6("fd71:1::2"), v6("fd71:2::11")),
        (
            mapped("10.71.100.1"),
            mapped("10.71.1.2"),
            mapped("10.71.2.11"),
        ),
        (mapped("10.71.100.1"), v6("fd71:1::2"), v6("fd71:2::11")),
    ]
}

/// Offsets (from the MH start) and types of the options, found by walking the bytes here,
/// independently of `parse_options`.
pub(super) fn walk_options(payload: &[u8]) -> Vec<(usize, u8)> {
    let mh = &payload[40..];
    let start = match mh[2] {
        0 => 8,
        5 | 6 => 12,
        7 => 24,
        11 if mh[6] == 1 => 8,
        11 => 12,
        t => panic!("type {t}"),
    };
    let mut out = Vec::new();
    let mut i = start;
    while i < mh.len() {
        out.push((i, mh[i]));
        i += if mh[i] == 0 {
            1
        } else {
            2 + mh[i + 1] as usize
        };
    }
    assert_eq!(i, mh.len(), "options end exactly at the MH end");
    out
}

#[test]
fn round_trip_every_type_and_option_set() {
    let mut count = 0;
    for (home, agent, real) in address_sets() {
        for body in bodies(home) {
            for options in option_sets(real) {
                for key in [None, Some(KEY)] {
                    // BU from the home address to the agent, the rest the other way.
                    let (src, dst) = match body {
                        Body::BindingUpdate { .. } | Body::DiscoveryRequest => (home, agent),
                        _ => (agent, home),
                    };
                    let msg = Message {
                        src,
                        dst,
                        body: body.clone(),
                        options: options.clone(),
                    };
                    let bytes = encode(&msg, key);
                    assert_eq!(bytes.len() % 8, 0);
                    assert_eq!((usize::from(bytes[41]) + 1) * 8, bytes.len() - 40);
                    let got = decode(&bytes).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
                    let mut want = msg.clone();
                    if key.is_some() {
                        let auth = got.options.auth.expect("auth decoded");
                        assert_eq!(auth.spi, KEY.spi);
                        want.options.auth = Some(auth);
                        assert!(verify(&bytes, KEY));
                    } else {
                        assert!(!verify(&bytes, KEY));
                    }
                    assert_eq!(got, want);
                    // The auth field is ignored by encode.
                    assert_eq!(encode(&want, key), bytes);
                    count += 1;
                }
            }
        }
    }
    assert_eq!(count, 3 * 7 * 32 * 2);
}

#[test]
fn bu_flags_and_header_fields() {
    let msg = Message {
        src: mapped("10.0.0.1"),
        dst: mapped("10.0.0.2"),
        body: Body::BindingUpdate {
            seq: 1,
            ack: true,
            lifetime: 16,
        },
        options: Options::default(),
    };
    let b = encode(&msg, None);
    assert_eq!(
        &b[..4],
        &[0x60, 0, 0, 0],
        "version 6, no class, no flow label"
    );
    assert_eq!(be16(&b, 4), 16, "payload length");
    assert_eq!((b[6], b[7]), (135, 255), "next header MH, hop limit 255");
    assert_eq!(&b[40..44], &[59, 1, 5, 0]);
    assert_eq!(be16(&b, 48), 0xc000, "A and H");
    let no_ack = Body::BindingUpdate {
        seq: 1,
        ack: false,
        lifetime: 16,
    };
    let b = encode(
        &Message {
            body: no_ack,
            ..msg
        },
        None,
    );
    assert_eq!(be16(&b, 48), 0x4000, "H only");
}

#[test]
fn checksum_known_answers() {
    // BRR from ::1 to ::2, no options. By hand, 16-bit words of:
    //   pseudo-header: src ::1 -> 0x0001; dst ::2 -> 0x0002; length 8 -> 0x0000 0x0008;
    //                  zero + next header -> 0x0000 0x0087
    //   MH: 3b00 (proto 59, hlen 0), 0000 (type 0, reserved), checksum 0000, 0000
    //   sum = 0x0001 + 0x0002 + 0x0008 + 0x0087 + 0x3b00 = 0x3b92; !0x3b92 = 0xc46d
    let msg = Message {
        src: v6("::1"),
        dst: v6("::2"),
        body: Body::BindingRefreshRequest,
        options: Options::default(),
    };
    let mut want = vec![0x60, 0, 0, 0, 0, 8, 135, 255];
    want.extend_from_slice(&v6("::1").octets());
    want.extend_from_slice(&v6("::2").octets());
    want.extend_from_slice(&[0x3b, 0, 0, 0, 0xc4, 0x6d, 0, 0]);
    assert_eq!(encode(&msg, None), want);

    // BU seq 1, A|H, lifetime 16, from ::ffff:10.0.0.1 to ::ffff:10.0.0.2, no options:
    //   src words ffff 0a00 0001 -> 0x10a00; dst ffff 0a00 0002 -> 0x10a01;
    //   length 16 -> 0x0010; next header 0x0087;
    //   MH 3b01 0500 [cksum] 0001 c000 0010, then PadN of 4: 0102 0000 -> 0x10114
    //   total 0x315ac -> fold 0x15ac + 0x3 = 0x15af; !0x15af = 0xea50
    let msg = Message {
        src: mapped("10.0.0.1"),
        dst: mapped("10.0.0.2"),
        body: Body::BindingUpdate {
            seq: 1,
            ack: true,
            lifetime: 16,
        },
        options: Options::default(),
    };
    let b = encode(&msg, None);
    assert_eq!(
        &b[40..],
        &[0x3b, 1, 5, 0, 0xea, 0x50, 0, 1, 0xc0, 0, 0, 0x10, 1, 2, 0, 0]
    );

    // Any single flipped bit of the MH or of the addresses is a bad checksum (except the
    // MH's first two bytes, whose own checks come first).
    for byte in (8..40).chain(42..b.len()) {
        for bit in 0..8 {
            let mut m = b.clone();
            m[byte] ^= 1 << bit;
            assert_eq!(
                decode(&m),
                Err(WireError::BadChecksum),
                "byte {byte} bit {bit}"
            );
        }
    }
}

#[test]
fn alignment_and_padding() {
    for n in 1..=40 {
        let id: String = "abcdefghijklmnopqrstuvwxyz0123456789.-@_"
            .chars()
            .take(n)
            .collect();
        for options in option_sets(v6("2001:db8::5")) {
            let options = Options {
                mn_id: options.mn_id.map(|_| id.clone()),
                ..options
            };
            for body in bodies(v6("2001:db8::1")) {
                for key in [None, Some(KEY)] {
                    let msg = Message {
                        src: v6("2001:db8::1"),
                        dst: v6("2001:db8::2"),
                        body: body.clone(),
                        options: options.clone(),
                    };
                    let b = encode(&msg, key);
                    let mh_len = b.len() - 40;
                    assert_eq!(mh_len % 8, 0);
                    let walked = walk_options(&b);
                    for (i, &(at, kind)) in walked.iter().enumerate() {
                        match kind {
                            option::ALT_COA => assert_eq!(at % 8, 6),
                            option::MESG_ID => assert_eq!(at % 8, 2),
                            option::VENDOR => assert_eq!(at % 4, 2),
                            option::LOAD_INFO => assert_eq!(at % 4, 0),
                            option::AUTH => {
                                assert_eq!(at % 8, 1);
                                assert_eq!(i, walked.len() - 1, "AUTH last");
                                assert_eq!(at + 23, mh_len, "nothing after AUTH");
                            }
                            option::PAD1 | option::PADN | option::MN_ID => {}
                            other => panic!("unexpected option {other}"),
                        }
                    }
                    // Padding is never longer than needed: at most 7 bytes in a row.
                    let mut run = 0;
                    for &(at, kind) in &walked {
                        run = match kind {
                            option::PAD1 => run + 1,
                            option::PADN => run + 2 + b[40 + at + 1] as usize,
                            _ => 0,
                        };
                        assert!(run <= 7, "padding run {run} in {walked:?}");
                    }
                    assert!(decode(&b).is_ok());
                }
            }
        }
    }
}

fn full_bu() -> Message {
    Message {
        src: mapped("192.0.2.10"),
        dst: v6("2001:db8::a"),
        body: Body::BindingUpdate {
            seq: 42,
            ack: true,
            lifetime: 30,
        },
        options: option_sets(v6("2001:db8::99"))[31].clone(),
    }
}

/// Rewrites the IPv6 payload length, MH header length and checksum after an edit.
fn fix_up(b: &mut [u8]) {
    let mh_len = b.len() - 40;
    b[4..6].copy_from_slice(&(mh_len as u16).to_be_bytes());
    if mh_len >= 8 {
        b[41] = (mh_len / 8).saturating_sub(1) as u8;
    }
    if mh_len >= 6 {
        b[44] = 0;
        b[45] = 0;
        let sum = checksum(&addr(b, 8), &addr(b, 24), &b[40..]);
        b[44..46].copy_from_slice(&sum.to_be_bytes());
    }
}

#[test]
fn auth_verify() {
    let msg = full_bu();
    let b = encode(&msg, Some(KEY));
    assert!(verify(&b, KEY));
    let other_secret = Key {
        spi: KEY.spi,
        secret: b"another secret",
    };
    assert!(!verify(&b, other_secret));
    let other_spi = Key {
        spi: KEY.spi + 1,
        secret: SECRET,
    };
    assert!(!verify(&b, other_spi));
    let empty = Key {
        spi: KEY.spi,
        secret: b"",
    };
    assert!(!verify(&b, empty));
    // Any single flipped byte of the inner addresses or the MH, checksum included.
    for i in 8..b.len() {
        let mut m = b.clone();
        m[i] ^= 0xff;
        assert!(!verify(&m, KEY), "flipped byte {i}");
        // Even with the checksum made right again, the HMAC catches it (fix_up rewrites
        // the header length and the checksum field, hence skipped here).
        if i != 41 && !(44..46).contains(&i) {
            fix_up(&mut m);
            assert!(!verify(&m, KEY), "flipped byte {i}, checksum fixed");
        }
    }
    // A different home address with the same options.
    let moved = Message {
        src: mapped("192.0.2.11"),
        ..msg.clone()
    };
    let m = encode(&moved, Some(KEY));
    let mut spliced = b.clone();
    spliced[40..].copy_from_slice(&m[40..]);
    assert!(!verify(&spliced, KEY));
}

#[test]
fn auth_must_be_last() {
    let b = encode(&full_bu(), Some(KEY));
    // Append a PadN of 8 bytes after the AUTH option.
    let mut m = b.clone();
    m.extend_from_slice(&[1, 6, 0, 0, 0, 0, 0, 0]);
    fix_up(&mut m);
    assert_eq!(decode(&m), Err(WireError::AuthNotLast));
    assert!(!verify(&m, KEY));
    // Pad1s after it.
    let mut m = b.clone();
    m.extend_from_slice(&[0; 8]);
    fix_up(&mut m);
    assert_eq!(decode(&m), Err(WireError::AuthNotLast));
    // An AUTH option before the others, with the padding rearranged to keep alignment.
    let walked = walk_options(&b);
    let (auth_at, _) = *walked.last().unwrap();
    let opts_start = walked[0].0;
    let mh = &b[40..];
    let mut new_mh = mh[..opts_start].to_vec(); // fixed part, 12 bytes
    new_mh.push(option::PAD1); // AUTH at 13 = 4n+1
    new_mh.extend_from_slice(&mh[auth_at..]);
    new_mh.extend_from_slice(&mh[opts_start..auth_at]);
    // Pad the tail with PadN so the length is a multiple of 8 again; the alignment of
    // later options is off, but AuthNotLast is checked first.
    while !new_mh.len().is_multiple_of(8) {
        new_mh.push(option::PAD1);
    }
    let mut m = b[..40].to_vec();
    m.extend_from_slice(&new_mh);
    fix_up(&mut m);
    assert_eq!(decode(&m), Err(WireError::AuthNotLast));
    assert!(!verify(&m, KEY));
}

/// Builds an MH with the given fixed part and option bytes (padded to 8 with Pad1s), and
/// returns the complete payload with correct lengths and checksum.
pub(super) fn craft(fixed: &[u8], options: &[u8]) -> Vec<u8> {
    let mut b = vec![0x60, 0, 0, 0, 0, 0, 135, 255];
    b.extend_from_slice(&v6("2001:db8::1").octets());
    b.extend_from_slice(&v6("2001:db8::2").octets());
    b.extend_from_slice(fixed);
    b.extend_from_slice(options);
    while !(b.len() - 40).is_multiple_of(8) {
        b.push(0);
    }
    fix_up(&mut b);
    b
}

const BU_FIXED: [u8; 12] = [59, 0, 5, 0, 0, 0, 0, 1, 0xc0, 0, 0, 1];

#[test]
fn option_rejections() {
    let coa = v6("2001:db8::5").octets();
    let ok = |opts: &[u8]| decode(&craft(&BU_FIXED, opts));
    // Alt-CoA at 12 + 2 = 14 = 8n+6: fine; at 12 (8n+4): misaligned.
    let mut good = vec![1, 0];
    good.extend_from_slice(&[3, 16]);
    good.extend_from_slice(&coa);
    assert_eq!(ok(&good).unwrap().options.alt_coa, Some(v6("2001:db8::5")));
    let mut bad = vec![3, 16];
    bad.extend_from_slice(&coa);
    assert_eq!(ok(&bad), Err(WireError::BadAlignment));
    // Wrong length of a known option.
    let mut bad = vec![1, 0, 3, 15];
    bad.extend_from_slice(&coa[..15]);
    assert_eq!(ok(&bad), Err(WireError::BadOptionLength));
    // Twice.
    let mut twice = good.clone(); // ends at 32
    twice.extend_from_slice(&[1, 4, 0, 0, 0, 0, 3, 16]); // the second one at 38 = 8n+6
    twice.extend_from_slice(&coa);
    assert_eq!(ok(&twice), Err(WireError::DuplicateOption));
    // Running past the end: a PadN claiming 200 bytes.
    assert_eq!(ok(&[1, 200]), Err(WireError::OptionTruncated));
    // MN-ID with another subtype, or not UTF-8.
    assert_eq!(ok(&[8, 3, 2, b'a', b'b']), Err(WireError::BadMnId));
    assert_eq!(ok(&[8, 3, 1, 0xff, 0xfe]), Err(WireError::BadMnId));
    assert_eq!(ok(&[8, 1, 1]), Err(WireError::BadOptionLength));
    // MESG-ID at 12+2 = 14: not 8n+2.
    assert_eq!(
        ok(&[1, 0, 10, 8, 0, 0, 0, 0, 0, 0, 0, 1]),
        Err(WireError::BadAlignment)
    );
    // AUTH with subtype 2 (MN-AAA), at 12+1 = 13 = 4n+1.
    let mut auth = vec![0, 9, 21, 2, 0, 0, 0, 1];
    auth.extend_from_slice(&[0; 16]);
    assert_eq!(ok(&auth), Err(WireError::BadAuthSubtype));
    // Unknown options and foreign vendor options are skipped.
    let skipped = [
        77, 2, 0xaa, 0xbb, // unknown type 77
        19, 6, 0, 0, 0x7f, 0xff, 1, 9, // vendor 32767 at 16 = 4n (not ours: no alignment)
    ];
    // Vendor options must be at 4n+2 whoever the vendor is: shift by 2 with a PadN.
    let mut shifted = vec![1, 0];
    shifted.extend_from_slice(&skipped);
    let got = ok(&shifted).unwrap();
    assert_eq!(got.options, Options::default());
    assert_eq!(ok(&skipped), Err(WireError::BadAlignment));
    // Our vendor sub-type with a wrong length.
    assert_eq!(
        ok(&[1, 0, 19, 7, 0, 0, 0, 0, 1, 6, 0]),
        Err(WireError::BadOptionLength)
    );
    // Load information: exact length, anywhere.
    let mut load = vec![48, 18];
    load.extend_from_slice(&[0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5]);
    let got = ok(&load).unwrap();
    assert_eq!(
        got.options.load,
        Some(LoadInfo {
            priority: 1,
            sessions_in_use: 2,
            max_sessions: 3,
            used_capacity: 4,
            max_capacity: 5
        })
    );
}

#[test]
fn header_rejections() {
    let b = encode(&full_bu(), Some(KEY));
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut m = b.clone();
        f(&mut m);
        decode(&m)
    };
    assert_eq!(edit(&|m| m.truncate(47)), Err(WireError::Truncated));
    assert_eq!(edit(&|m| m[0] = 0x40), Err(WireError::BadIpVersion));
    assert_eq!(edit(&|m| m[6] = 17), Err(WireError::BadNextHeader));
    assert_eq!(edit(&|m| m.push(0)), Err(WireError::BadPayloadLength));
    assert_eq!(
        edit(&|m| m.truncate(m.len() - 8)),
        Err(WireError::BadPayloadLength)
    );
    assert_eq!(edit(&|m| m[40] = 6), Err(WireError::BadPayloadProto));
    assert_eq!(edit(&|m| m[41] += 1), Err(WireError::BadHeaderLength));
    assert_eq!(edit(&|m| m[45] ^= 1), Err(WireError::BadChecksum));
    assert_eq!(
        edit(&|m| {
            m[42] = 1; // Home Test Init: not ours
            fix_up(m);
        }),
        Err(WireError::UnknownMhType)
    );
    // A BE needs 24 bytes of MH; 16 is too short.
    let short_be = craft(&[59, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(decode(&short_be), Err(WireError::MessageTooShort));
    // Traffic class, flow label and hop limit are not checked.
    assert!(edit(&|m| {
        m[1] = 0xff;
        m[7] = 1;
    })
    .is_ok());
}

#[test]
fn reasons_are_distinct_snake_case() {
    let mut seen = std::collections::HashSet::new();
    for e in WireError::ALL {
        let r = e.reason();
        assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
        assert!(seen.insert(r), "{r} twice");
        assert!(e.to_string().contains(r));
    }
}

#[test]
fn mn_id_limits() {
    let mut msg = full_bu();
    msg.options.mn_id = Some("x".repeat(MAX_MN_ID_LEN));
    let b = encode(&msg, Some(KEY));
    assert_eq!(decode(&b).unwrap().options.mn_id, msg.options.mn_id);
    msg.options.mn_id = Some("x".repeat(MAX_MN_ID_LEN + 1));
    assert_eq!(
        try_encode(&msg, None),
        Err(EncodeError::MnIdTooLong(MAX_MN_ID_LEN + 1))
    );
    msg.options.mn_id = Some(String::new());
    assert_eq!(try_encode(&msg, None), Err(EncodeError::EmptyMnId));
    // Multi-byte UTF-8 survives.
    msg.options.mn_id = Some("serveur-é-東京".to_owned());
    assert_eq!(
        decode(&encode(&msg, None)).unwrap().options.mn_id,
        msg.options.mn_id
    );
}

#[test]
fn mapped_addresses() {
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 71, 100, 1));
    assert_eq!(to_mapped(v4), v6("::ffff:10.71.100.1"));
    assert_eq!(from_mapped(to_mapped(v4)), v4);
    let a = IpAddr::V6(v6("fd71::1"));
    assert_eq!(to_mapped(a), v6("fd71::1"));
    assert_eq!(from_mapped(v6("fd71::1")), a);
    // IPv4-compatible (deprecated) addresses stay IPv6.
    assert_eq!(from_mapped(v6("::10.0.0.1")), IpAddr::V6(v6("::10.0.0.1")));
}

#[test]
fn ntp_timestamps() {
    // 2024-01-01T00:00:00Z = Unix 1704067200 = NTP 3913056000.
    assert_eq!(ntp_to_unix_secs(3_913_056_000u64 << 32), 1_704_067_200);
    assert_eq!(
        ntp_to_unix_secs((3_913_056_000u64 << 32) | 0xffff_ffff),
        1_704_067_200
    );
    // The Unix epoch.
    assert_eq!(ntp_to_unix_secs(2_208_988_800u64 << 32), 0);
    // Era 1: NTP second 1 is 2036-02-07T06:28:17Z = Unix 2085978497.
    assert_eq!(ntp_to_unix_secs(1u64 << 32), 2_085_978_497);
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let got = ntp_to_unix_secs(ntp_now());
    assert!((got - unix_now).abs() <= 1, "{got} vs {unix_now}");
}

mod fuzz;
