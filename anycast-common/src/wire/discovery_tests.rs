//! Agent discovery's request and reply: their layout byte by byte, the agent list's limits
//! and every malformed agent option refused with its reason.
use super::decode::addr;
use super::tests::{agents, craft, mapped, v6, walk_options, KEY};
use super::*;
use std::net::Ipv4Addr;

#[test]
fn discovery_messages_byte_by_byte() {
    let server = mapped("10.71.2.11");
    let discovery = mapped("10.71.9.9");
    let request = Message {
        src: server,
        dst: discovery,
        body: Body::DiscoveryRequest,
        options: Options {
            mn_id: Some("s1".into()),
            mesg_id: Some(0x0102_0304_0506_0708),
            ..Options::default()
        },
    };
    let b = encode(&request, Some(KEY));
    let mh = &b[40..];
    // Payload proto, header length, MH type 11, reserved; kind 1 (request), reserved.
    assert_eq!(&mh[..4], &[59, (mh.len() / 8 - 1) as u8, 11, 0]);
    assert_eq!(&mh[6..8], &[1, 0]);
    // MN-ID at 8, MESG-ID at 8n+2, AUTH last at 8n+1.
    assert_eq!(&mh[8..13], &[option::MN_ID, 3, MN_ID_NAI, b's', b'1']);
    assert_eq!(
        walk_options(&b)
            .into_iter()
            .filter(|(_, t)| *t > option::PADN)
            .collect::<Vec<_>>(),
        vec![
            (8, option::MN_ID),
            (18, option::MESG_ID),
            (33, option::AUTH)
        ]
    );
    assert!(verify(&b, KEY));
    assert_eq!(b.len(), 40 + 56);
    let got = decode(&b).unwrap();
    assert_eq!(got.body, Body::DiscoveryRequest);

    let reply = Message {
        src: discovery,
        dst: server,
        body: Body::DiscoveryReply {
            lifetime: 0x1234,
            agents: agents(),
        },
        options: Options {
            mesg_id: Some(0x0102_0304_0506_0708),
            ..Options::default()
        },
    };
    let b = encode(&reply, Some(KEY));
    let mh = &b[40..];
    assert_eq!(mh[2], mh_type::EXPERIMENTAL);
    // Kind 2 (reply), reserved, lifetime, reserved.
    assert_eq!(&mh[6..12], &[2, 0, 0x12, 0x34, 0, 0]);
    let vendor: Vec<usize> = walk_options(&b)
        .into_iter()
        .filter(|(_, t)| *t == option::VENDOR)
        .map(|(at, _)| at)
        .collect();
    assert_eq!(vendor.len(), 2);
    let first = vendor[0];
    assert_eq!(first % 4, 2, "vendor options at 4n+2");
    // Type, length 37 + 1, vendor id 0, sub-type 2, IPv4 as IPv4-mapped, IPv6, identity.
    assert_eq!(&mh[first..first + 7], &[19, 38, 0, 0, 0, 0, VENDOR_AGENT]);
    assert_eq!(addr(mh, first + 7), mapped("10.71.1.2"));
    assert_eq!(addr(mh, first + 23), v6("fd71:1::2"));
    assert_eq!(mh[first + 39], b'a');
    let second = vendor[1];
    assert_eq!(mh[second + 1] as usize, 37 + "agent-b.example".len());
    assert_eq!(
        addr(mh, second + 7),
        Ipv6Addr::UNSPECIFIED,
        "no IPv4 address"
    );
    let got = decode(&b).unwrap();
    assert_eq!(got.body, reply.body);
    assert_eq!(got.options.mesg_id, reply.options.mesg_id);
    assert!(verify(&b, KEY));
    // Agent options outside a reply are skipped.
    let mut not_reply = reply.clone();
    not_reply.body = Body::DiscoveryRequest;
    assert_eq!(
        decode(&encode(&not_reply, None)).unwrap().body,
        Body::DiscoveryRequest
    );
}

#[test]
fn discovery_reply_limits_and_rejections() {
    let reply = |agents: Vec<AgentEntry>| Message {
        src: v6("fd71:9::9"),
        dst: v6("fd71:2::11"),
        body: Body::DiscoveryReply {
            lifetime: 1,
            agents,
        },
        options: Options::default(),
    };
    let agent = |i: usize| AgentEntry {
        id: "x".repeat(MAX_AGENT_ID_LEN - 2) + &format!("{i:02}"),
        v4: Some(Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
        v6: Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1)),
    };
    // The largest reply encodes, fits an MH and decodes.
    let most: Vec<AgentEntry> = (0..MAX_DISCOVERY_AGENTS).map(agent).collect();
    let b = encode(&reply(most.clone()), Some(KEY));
    assert!(b.len() - 40 <= 2048, "{} bytes", b.len());
    assert!(
        matches!(decode(&b).unwrap().body, Body::DiscoveryReply { agents, .. } if agents == most)
    );
    // Encoding refuses what decoding would.
    let too_many: Vec<AgentEntry> = (0..=MAX_DISCOVERY_AGENTS).map(agent).collect();
    let refused = [
        too_many,
        vec![AgentEntry {
            id: String::new(),
            ..agent(0)
        }],
        vec![AgentEntry {
            id: "y".repeat(MAX_AGENT_ID_LEN + 1),
            ..agent(0)
        }],
        vec![AgentEntry {
            v4: None,
            v6: None,
            ..agent(0)
        }],
        vec![AgentEntry {
            v6: Some(mapped("10.0.0.1")),
            ..agent(0)
        }],
        vec![AgentEntry {
            v4: Some(Ipv4Addr::UNSPECIFIED),
            ..agent(0)
        }],
    ];
    for agents in refused {
        assert_eq!(
            try_encode(&reply(agents.clone()), None),
            Err(EncodeError::BadAgent),
            "{agents:?}"
        );
    }
    // Crafted bytes: each malformed agent option is refused with its reason.
    const REPLY_FIXED: [u8; 12] = [59, 0, 11, 0, 0, 0, 2, 0, 0, 1, 0, 0];
    let option = |v4: Ipv6Addr, v6: Ipv6Addr, id: &[u8]| {
        // At 12: 4n, so two PadN... Pad1 Pad1 put it at 4n+2.
        let mut o = vec![
            option::PAD1,
            option::PAD1,
            option::VENDOR,
            (37 + id.len()) as u8,
        ];
        o.extend_from_slice(&[0, 0, 0, 0, VENDOR_AGENT]);
        o.extend_from_slice(&v4.octets());
        o.extend_from_slice(&v6.octets());
        o.extend_from_slice(id);
        o
    };
    let good = option(mapped("10.1.1.1"), v6("fd00::1"), b"a");
    assert!(decode(&craft(&REPLY_FIXED, &good)).is_ok());
    let z = Ipv6Addr::UNSPECIFIED;
    for (what, bytes) in [
        ("v6 in the IPv4 field", option(v6("fd00::2"), z, b"a")),
        (
            "IPv4-mapped in the IPv6 field",
            option(z, mapped("10.1.1.1"), b"a"),
        ),
        ("no address", option(z, z, b"a")),
        ("::ffff:0.0.0.0", option(mapped("0.0.0.0"), z, b"a")),
        ("empty identity", option(mapped("10.1.1.1"), z, b"")),
        ("not UTF-8", option(mapped("10.1.1.1"), z, &[0xff, 0xfe])),
        (
            "identity too long",
            option(mapped("10.1.1.1"), z, &[b'a'; MAX_AGENT_ID_LEN + 1]),
        ),
    ] {
        assert_eq!(
            decode(&craft(&REPLY_FIXED, &bytes)),
            Err(WireError::BadAgentOption),
            "{what}"
        );
    }
    // One agent too many, crafted (the encoder would not).
    let mut many = Vec::new();
    for i in 0..=MAX_DISCOVERY_AGENTS {
        let mut o = option(mapped("10.1.1.1"), z, &[b'a' + i as u8]);
        if i > 0 {
            // Each option is 2 + 38 = 40 bytes: the next one is at 4n+2 again.
            o.drain(..2);
        }
        many.extend(o);
    }
    assert_eq!(
        decode(&craft(&REPLY_FIXED, &many)),
        Err(WireError::BadAgentOption)
    );
    many.truncate(many.len() - 40);
    assert!(matches!(decode(&craft(&REPLY_FIXED, &many)).unwrap().body,
        Body::DiscoveryReply { agents, .. } if agents.len() == MAX_DISCOVERY_AGENTS));
    // Unknown kinds and a reply too short for its fixed part.
    for kind in [0u8, 3, 255] {
        let fixed = [59, 0, 11, 0, 0, 0, kind, 0];
        assert_eq!(
            decode(&craft(&fixed, &[])),
            Err(WireError::UnknownMhType),
            "{kind}"
        );
    }
    assert_eq!(
        decode(&craft(&[59, 0, 11, 0, 0, 0, 2, 0], &[])),
        Err(WireError::MessageTooShort)
    );
}
