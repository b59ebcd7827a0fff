//! Envelope kind 6 byte by byte, its refusals, and the sender's rounds.
use super::*;
use crate::relay::{decode, encode, Body, Envelope};

const KEY: &[u8] = b"the key a and b share, 32 bytes!";

fn pin(client: &str, anycast: &str, proto: u8, port: u16, server: &str) -> FlowPin {
    FlowPin {
        key: FlowKey::new(
            client.parse().unwrap(),
            anycast.parse().unwrap(),
            proto,
            port,
            80,
        ),
        server: server.parse().unwrap(),
        closing: false,
        idle_left_secs: 299,
    }
}

fn envelope(pins: Vec<FlowPin>, sender: &str, receiver: &str) -> Envelope {
    Envelope {
        sender: sender.into(),
        receiver: receiver.into(),
        timestamp: 0x1234_5678_9abc_def0,
        body: Body::FlowPins { pins },
    }
}

#[test]
fn flow_pins_round_trip_in_both_families() {
    let mut closing = pin("2001:db8::7", "2001:db8::1", PROTO_UDP, 5353, "10.1.0.2");
    closing.closing = true;
    closing.idle_left_secs = 9;
    let pins = vec![
        pin("192.0.2.7", "10.0.0.1", PROTO_TCP, 40000, "10.1.0.1"),
        closing,
        pin("192.0.2.8", "10.0.0.1", PROTO_TCP, 1, "fd00::5"),
    ];
    let env = envelope(pins, "a", "b");
    let bytes = encode(&env, KEY);
    assert_eq!(bytes[5], 6, "kind");
    assert_eq!(bytes.len(), 8 + 2 + 8 + 1 + 3 * PIN_LEN + 16);
    assert_eq!(decode(&bytes, KEY), Ok(env));
}

#[test]
fn the_pin_entry_layout_is_fixed() {
    let mut p = pin("192.0.2.7", "10.0.0.1", PROTO_TCP, 0x1234, "fd00::5");
    p.closing = true;
    p.idle_left_secs = 0x0102;
    let mut out = Vec::new();
    put(&mut out, &[p]);
    assert_eq!(out.len(), 1 + PIN_LEN);
    assert_eq!(&out[..4], &[1, 4, 6, 1]);
    assert_eq!(
        &out[4..20],
        &wire::to_mapped("192.0.2.7".parse().unwrap()).octets()
    );
    assert_eq!(&out[20..22], &[0x12, 0x34]);
    assert_eq!(
        &out[22..38],
        &wire::to_mapped("10.0.0.1".parse().unwrap()).octets()
    );
    assert_eq!(&out[38..40], &[0, 80]);
    assert_eq!(
        &out[40..56],
        &"fd00::5".parse::<Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(&out[56..58], &[1, 2]);
}

#[test]
fn twenty_pins_with_the_longest_identities_fit_a_datagram() {
    let pins: Vec<FlowPin> = (0..MAX_PINS_PER_ENVELOPE as u16)
        .map(|i| pin("2001:db8::7", "2001:db8::1", PROTO_TCP, i, "2001:db8:1::1"))
        .collect();
    let long = "x".repeat(64);
    let bytes = encode(&envelope(pins, &long, &long), KEY);
    assert!(bytes.len() <= 1400, "{}", bytes.len());
    assert!(decode(&bytes, KEY).is_ok());
}

/// A kind-6 envelope around `body` (the MAC is right: what is refused is the body).
fn raw(body: &[u8]) -> Vec<u8> {
    let mut out = b"ACRL\x01\x06\x01\x01ab".to_vec();
    out.extend_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
    out.extend_from_slice(body);
    let tag = super::super::mac(KEY, &out);
    out.extend_from_slice(&tag);
    out
}

fn body_of(pins: &[FlowPin]) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, pins);
    out
}

#[test]
fn malformed_pin_bodies_are_refused() {
    let good = pin("192.0.2.7", "10.0.0.1", PROTO_TCP, 1, "10.1.0.1");
    let ok = body_of(&[good]);
    assert!(decode(&raw(&ok), KEY).is_ok());
    let with = |at: usize, value: u8| {
        let mut b = ok.clone();
        b[at] = value;
        b
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("no pins", vec![0]),
        ("empty", vec![]),
        ("family 5", with(1, 5)),
        ("protocol 1", with(2, 1)),
        ("unknown flag", with(3, 2)),
        ("IPv4 client not mapped", with(4 + 10, 0)),
        ("IPv6 family, mapped addresses", with(1, 6)),
        ("truncated", ok[..ok.len() - 1].to_vec()),
        ("trailing", [ok.clone(), vec![0]].concat()),
        ("count beyond the entries", with(0, 2)),
    ];
    let mut many = body_of(&vec![good; MAX_PINS_PER_ENVELOPE + 1]);
    assert_eq!(many[0] as usize, MAX_PINS_PER_ENVELOPE + 1);
    cases.push(("21 pins", many.clone()));
    many.truncate(1 + MAX_PINS_PER_ENVELOPE * PIN_LEN);
    many[0] = MAX_PINS_PER_ENVELOPE as u8;
    assert!(decode(&raw(&many), KEY).is_ok(), "20 pins");
    for (what, body) in cases {
        assert_eq!(decode(&raw(&body), KEY), Err(Refused::Malformed), "{what}");
    }
    // A forged MAC is refused before the body is read.
    let mut forged = raw(&ok);
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(decode(&forged, KEY), Err(Refused::Auth));
}

fn exceptions(n: u16) -> Vec<FlowPin> {
    (0..n)
        .map(|i| pin("192.0.2.7", "10.0.0.1", PROTO_TCP, i, "10.1.0.1"))
        .collect()
}

#[test]
fn new_exceptions_go_at_once_and_all_again_every_few_seconds() {
    let mut s = PinSender::default();
    let t0 = Instant::now();
    assert_eq!(s.round(exceptions(30), t0).len(), 30, "all new");
    let t1 = t0 + Duration::from_millis(100);
    assert!(s.round(exceptions(30), t1).is_empty(), "nothing new");
    // Two new ones and one whose server changed.
    let mut found = exceptions(32);
    found[3].server = "10.1.0.2".parse().unwrap();
    let t2 = t1 + Duration::from_millis(100);
    let sent = s.round(found.clone(), t2);
    assert_eq!(sent.len(), 3, "{sent:?}");
    let t3 = t0 + RESEND_EVERY;
    assert_eq!(s.round(found.clone(), t3).len(), 32, "everything again");
    // Ended exceptions are forgotten: one coming back is new again.
    let t4 = t3 + Duration::from_millis(100);
    assert!(s.round(found[..10].to_vec(), t4).is_empty());
    assert_eq!(s.round(found[..11].to_vec(), t4).len(), 1);
    assert_eq!(s.round(Vec::new(), t4).len(), 0);
}

#[test]
fn sending_is_bounded_and_a_cut_round_continues_where_it_stopped() {
    let mut s = PinSender::default();
    let t0 = Instant::now();
    let n = SEND_PER_SECOND as u16 + 5000;
    let first = s.round(exceptions(n), t0);
    assert_eq!(first.len(), SEND_PER_SECOND as usize);
    // Half a second later: half the budget, for the rest (still new).
    let t1 = t0 + Duration::from_millis(500);
    let second = s.round(exceptions(n), t1);
    assert_eq!(second.len(), 5000);
    let mut all: Vec<u16> = first.iter().chain(&second).map(|p| p.key.sport).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n as usize, "each sent once");
}

#[test]
fn the_bucket_refills_at_its_rate() {
    let mut b = Bucket::new(100.0);
    let t0 = Instant::now();
    assert_eq!(b.take(150, t0), 100);
    assert_eq!(b.take(10, t0), 0);
    assert_eq!(b.take(100, t0 + Duration::from_millis(250)), 25);
    assert_eq!(b.take(1000, t0 + Duration::from_secs(60)), 100, "capped");
}
