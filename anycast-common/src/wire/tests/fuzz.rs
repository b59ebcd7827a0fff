//! Fuzz-style property test of the decoder: a fixed-seed xorshift PRNG, no extra crate.
use super::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// How a random message is closed: by AUTH (or nothing), or by the signature option.
enum Sealing {
    Hmac(Option<Key<'static>>),
    Signed,
}

fn seal(msg: &Message, sealing: &Sealing) -> Vec<u8> {
    match sealing {
        Sealing::Hmac(key) => encode(msg, *key),
        Sealing::Signed => encode_signed(msg, &super::super::client_tests::signer()).unwrap(),
    }
}

fn random_message(rng: &mut Rng) -> (Message, Sealing) {
    if rng.below(4) == 0 {
        // A client binding, its certificate of any size (in one part or several).
        let mut msg = super::super::client_tests::client_binding(1 + rng.below(700));
        if rng.below(2) == 0 {
            msg.options.certificate = None;
        }
        if rng.below(2) == 0 {
            // Few enough that the options repeated still fit an MH (2048 bytes).
            let n = 1 + rng.below(16);
            msg.options.connections = (0..n)
                .map(|_| (rng.next() as u16, rng.next() as u16))
                .collect();
        }
        return (msg, Sealing::Signed);
    }
    let addrs = address_sets();
    let (home, agent, real) = addrs[rng.below(addrs.len())];
    let all = bodies(home);
    let body = all[rng.below(all.len())].clone();
    let mut options = option_sets(real)[rng.below(32)].clone();
    if matches!(body, Body::DiscoveryReply { .. }) {
        // A reply always echoes the request's MESG-ID (and a repeated option list is then
        // a duplicate MESG-ID, as the repeat mutation expects).
        options.mesg_id = Some(0xe9a1_b2c3_8000_0001);
    }
    if options.mn_id.is_some() {
        let n = 1 + rng.below(60);
        options.mn_id = Some((0..n).map(|_| (b'a' + rng.byte() % 26) as char).collect());
    }
    let key = (rng.below(2) == 0).then_some(KEY);
    let (src, dst) = if matches!(body, Body::BindingUpdate { .. } | Body::DiscoveryRequest) {
        (home, agent)
    } else {
        (agent, home)
    };
    let msg = Message {
        src,
        dst,
        body,
        options,
    };
    (msg, Sealing::Hmac(key))
}

/// What a mutation did, and (for some) the only acceptable outcome.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>) -> (&'static str, Option<Result<(), WireError>>) {
    match rng.below(11) {
        0 => {
            // One bit of the MH checksum field.
            b[44 + rng.below(2)] ^= 1 << rng.below(8);
            ("checksum_bit", Some(Err(WireError::BadChecksum)))
        }
        1 => {
            // One bit anywhere from the addresses on, except the MH's first two bytes.
            let at = loop {
                let at = 8 + rng.below(b.len() - 8);
                if at != 40 && at != 41 {
                    break at;
                }
            };
            b[at] ^= 1 << rng.below(8);
            ("covered_bit", Some(Err(WireError::BadChecksum)))
        }
        2 => {
            // Truncation.
            let n = rng.below(b.len());
            b.truncate(n);
            let want = if n < 48 {
                WireError::Truncated
            } else {
                WireError::BadPayloadLength
            };
            ("truncate", Some(Err(want)))
        }
        3 => {
            // Extension with random bytes.
            for _ in 0..1 + rng.below(24) {
                b.push(rng.byte());
            }
            ("extend", Some(Err(WireError::BadPayloadLength)))
        }
        4 => {
            // IPv6 payload length edit.
            let old = be16(b, 4);
            let new = loop {
                let v = rng.next() as u16;
                if v != old {
                    break v;
                }
            };
            b[4..6].copy_from_slice(&new.to_be_bytes());
            ("payload_length", Some(Err(WireError::BadPayloadLength)))
        }
        5 => {
            // MH header length edit.
            let old = b[41];
            b[41] = loop {
                let v = rng.byte();
                if v != old {
                    break v;
                }
            };
            ("header_length", Some(Err(WireError::BadHeaderLength)))
        }
        6 => {
            // Random bytes of the MH after its header, then lengths and checksum made
            // right: reaches the option parser.
            for _ in 0..1 + rng.below(4) {
                let at = 46 + rng.below(b.len() - 46);
                b[at] = rng.byte();
            }
            fix_up(b);
            ("fixed_byte_edit", None)
        }
        7 => {
            // Insert or remove 8 bytes after the MH header, fix up.
            let at = 48 + rng.below(b.len() - 47);
            if rng.below(2) == 0 {
                let junk: Vec<u8> = (0..8).map(|_| rng.byte() % 52).collect();
                b.splice(at..at, junk);
            } else if at + 8 <= b.len() {
                b.drain(at..at + 8);
            }
            fix_up(b);
            ("fixed_splice", None)
        }
        8 => {
            // An option length byte edited (option walk here), fix up.
            let walked = walk_options(b);
            let lens: Vec<usize> = walked
                .iter()
                .filter(|(_, t)| *t != option::PAD1)
                .map(|(at, _)| 40 + at + 1)
                .collect();
            if let Some(&at) = lens.get(rng.below(lens.len().max(1))) {
                b[at] = rng.byte();
            }
            fix_up(b);
            ("option_length", None)
        }
        9 => {
            // Header bytes (version, next header, MH proto, MH type), fix up.
            let at = [0, 6, 40, 42][rng.below(4)];
            b[at] = if at == 42 {
                [0, 1, 5, 6, 7, rng.byte()][rng.below(6)]
            } else {
                rng.byte()
            };
            fix_up(b);
            ("fixed_header_byte", None)
        }
        _ => {
            // The options repeated after themselves, alignment kept (fix up): a duplicate
            // of each option, or something after the AUTH option.
            let start = 40 + walk_options(b).first().map_or(b.len() - 40, |o| o.0);
            let has_option = walk_options(b)
                .iter()
                .any(|(_, t)| *t != option::PAD1 && *t != option::PADN);
            let has_auth = walk_options(b).iter().any(|(_, t)| *t == option::AUTH);
            let has_signature = walk_options(b)
                .iter()
                .any(|&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_SIGNATURE);
            let copy = b[start..].to_vec();
            if (start - 40) % 8 == 4 {
                b.extend_from_slice(&[option::PADN, 2, 0, 0]);
            }
            b.extend_from_slice(&copy);
            fix_up(b);
            let want = if has_auth {
                Err(WireError::AuthNotLast)
            } else if has_signature {
                Err(WireError::SignatureNotLast)
            } else if has_option {
                Err(WireError::DuplicateOption)
            } else {
                Ok(())
            };
            ("repeat_options", Some(want))
        }
    }
}

#[test]
fn fuzz_decode_never_panics_and_rejections_have_reasons() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_mutation: BTreeMap<&str, usize> = BTreeMap::new();
    let mut total = 0usize;

    // Random bytes, some behind a plausible IPv6 + MH header.
    const RANDOM: usize = 40_000;
    for i in 0..RANDOM {
        let n = rng.below(160);
        let mut b: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
        if i.is_multiple_of(2) && b.len() >= 48 {
            b[0] = 0x60;
            b[6] = 135;
            b[40] = 59;
            fix_up(&mut b);
        }
        let key = match decode(&b) {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        assert!(!verify(&b, KEY) || key == "ok");
        *outcomes.entry(key).or_default() += 1;
        total += 1;
    }

    // Valid messages, mutated.
    const MUTATED: usize = 200_000;
    for _ in 0..MUTATED {
        let (msg, sealing) = random_message(&mut rng);
        let mut b = seal(&msg, &sealing);
        let (what, expected) = mutate(&mut rng, &mut b);
        *by_mutation.entry(what).or_default() += 1;
        let got = decode(&b);
        if let Some(want) = expected {
            assert_eq!(got.as_ref().map(|_| ()).map_err(|e| *e), want, "{what}");
        }
        match &got {
            Ok(decoded) => {
                // Whatever decodes re-encodes to something that decodes to the same.
                let again = decode(&encode(decoded, None)).expect("re-encoded decodes");
                let mut want = decoded.clone();
                want.options.auth = None;
                want.options.signature = None;
                assert_eq!(again, want);
                *outcomes.entry("ok").or_default() += 1;
            }
            Err(e) => {
                assert!(!verify(&b, KEY));
                assert!(!verify_signed(&b, &signer_key()));
                *outcomes.entry(e.reason()).or_default() += 1;
            }
        }
        total += 1;
    }

    // Certificate parts whose length byte is edited to a small value (an empty part, a part
    // cut short, a misparse of what follows), in client bindings of every size.
    const CERT_EDITS: usize = 5_000;
    for _ in 0..CERT_EDITS {
        let msg = super::super::client_tests::client_binding(1 + rng.below(700));
        let mut b = seal(&msg, &Sealing::Signed);
        let parts: Vec<usize> = walk_options(&b)
            .iter()
            .filter(|&&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_CERTIFICATE)
            .map(|&(at, _)| 40 + at + 1)
            .collect();
        let at = parts[rng.below(parts.len())];
        let old = b[at];
        b[at] = rng.below(8) as u8;
        fix_up(&mut b);
        let key = match decode(&b) {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        assert!(b[at] == old || !verify_signed(&b, &signer_key()));
        *outcomes.entry(key).or_default() += 1;
        total += 1;
    }

    // The connections option's length byte edited (no pair, pairs cut short, a misparse of
    // what follows).
    const CONNECTION_EDITS: usize = 5_000;
    for _ in 0..CONNECTION_EDITS {
        let mut msg = super::super::client_tests::client_binding(1 + rng.below(700));
        let n = 1 + rng.below(MAX_NAMED_CONNECTIONS);
        msg.options.connections = (0..n).map(|i| (40_000 + i as u16, 80)).collect();
        let mut b = seal(&msg, &Sealing::Signed);
        let (at, _) = *walk_options(&b)
            .iter()
            .find(|&&(at, t)| t == option::VENDOR && b[40 + at + 6] == VENDOR_CONNECTIONS)
            .expect("the connections option");
        let at = 40 + at + 1;
        let old = b[at];
        b[at] = 5 + rng.below(4 * n) as u8;
        fix_up(&mut b);
        let key = match decode(&b) {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        assert!(b[at] == old || !verify_signed(&b, &signer_key()));
        *outcomes.entry(key).or_default() += 1;
        total += 1;
    }

    eprintln!("mutations: {by_mutation:?}");
    eprintln!("outcomes: {outcomes:?}");
    assert_eq!(total, RANDOM + MUTATED + CERT_EDITS + CONNECTION_EDITS);
    assert_eq!(
        outcomes.values().sum::<usize>(),
        total,
        "every input decoded or rejected"
    );
    assert_eq!(by_mutation.values().sum::<usize>(), MUTATED);
    for key in outcomes.keys() {
        assert!(
            *key == "ok" || WireError::ALL.iter().any(|e| e.reason() == *key),
            "{key}"
        );
    }
    // The mutations reach deep into the parser: nearly every rejection is seen.
    for e in WireError::ALL {
        assert!(
            outcomes.contains_key(e.reason()),
            "never saw {}",
            e.reason()
        );
    }
    assert!(outcomes["ok"] > 1000);
}

fn signer_key() -> crate::pki::VerifyingKey {
    super::super::client_tests::signer().verifying_key()
}
