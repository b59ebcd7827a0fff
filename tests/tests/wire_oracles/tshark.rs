//! tshark (Wireshark's `mip6` dissector) reads what we encode.
use super::*;

const FIELDS: &[&str] = &[
    "frame.protocols",
    "ip.checksum.status",
    "udp.checksum.status",
    "ipv6.version",
    "ipv6.tclass",
    "ipv6.flow",
    "ipv6.plen",
    "ipv6.nxt",
    "ipv6.hlim",
    "ipv6.src",
    "ipv6.dst",
    "mip6.proto",
    "mip6.hlen",
    "mip6.mhtype",
    "mip6.csum",
    "mip6.bu.seqnr",
    "mip6.bu.a_flag",
    "mip6.bu.h_flag",
    "mip6.bu.k_flag",
    "mip6.bu.lifetime",
    "mip6.ba.status",
    "mip6.ba.k_flag",
    "mip6.ba.seqnr",
    "mip6.ba.lifetime",
    "mip6.be.status",
    "mip6.be.haddr",
    "mip6.mobility_opt.len",
    "mip6.acoa.acoa",
    "mip6.mnid.subtype",
    "mip6.mnid.identifier",
    "mip6.mseg_id.timestamp",
    "mip6.load_inf.priority",
    "mip6.load_inf.sessions_in_use",
    "mip6.load_inf.maximum_sessions",
    "mip6.load_inf.used_capacity",
    "mip6.load_inf.maximum_capacity",
    "mip6.vsm.vendorId",
    "mip6.vsm.subtype",
    "mip6.vsm.data",
    "mip6.auth.subtype",
    "mip6.auth.mobility_spi",
    "mip6.auth.auth_data",
];

/// The numeric value of a tshark field printed in decimal or 0x-hex.
fn num(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap_or_else(|e| panic!("{s}: {e}")),
        None => s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}")),
    }
}

fn flag(s: &str) -> bool {
    match s {
        "1" | "True" => true,
        "0" | "False" => false,
        other => panic!("not a boolean: {other:?}"),
    }
}

#[test]
fn tshark_decodes_our_messages() {
    require_tshark();
    let cases = cases();
    let capture = Capture::new(&cases);
    let mut args: Vec<&str> = vec!["-T", "fields", "-E", "occurrence=a", "-E", "aggregator=;"];
    for f in FIELDS {
        args.extend(["-e", f]);
    }
    // tshark prints absolute times in the local zone unless told otherwise.
    let out = capture.tshark(&args);
    let rows: Vec<HashMap<&str, &str>> = out
        .lines()
        .map(|l| FIELDS.iter().copied().zip(l.split('\t')).collect())
        .collect();
    assert_eq!(rows.len(), cases.len(), "one line per packet:\n{out}");

    for (case, row) in cases.iter().zip(&rows) {
        let ctx = format!("{}: {row:?}", case.name);
        let msg = &case.msg;
        let bytes = payload(case);
        let get = |f: &str| *row.get(f).unwrap_or_else(|| panic!("{ctx}: no {f}"));
        assert_eq!(get("frame.protocols"), "raw:ip:udp:ipv6:mipv6", "{ctx}");
        // Checksum status 1 is "Good" (0 bad, 2 unverified).
        assert_eq!(get("ip.checksum.status"), "1", "{ctx}: IPv4 checksum good");
        assert_eq!(get("udp.checksum.status"), "1", "{ctx}: UDP checksum good");
        assert_eq!(num(get("ipv6.version")), 6, "{ctx}");
        assert_eq!(num(get("ipv6.tclass")), 0, "{ctx}");
        assert_eq!(num(get("ipv6.flow")), 0, "{ctx}");
        assert_eq!(num(get("ipv6.plen")) as usize, bytes.len() - 40, "{ctx}");
        assert_eq!(num(get("ipv6.nxt")), 135, "{ctx}");
        assert_eq!(num(get("ipv6.hlim")), 255, "{ctx}");
        assert_eq!(v6(get("ipv6.src")), msg.src, "{ctx}");
        assert_eq!(v6(get("ipv6.dst")), msg.dst, "{ctx}");
        assert_eq!(num(get("mip6.proto")), 59, "{ctx}");
        assert_eq!(
            (num(get("mip6.hlen")) as usize + 1) * 8,
            bytes.len() - 40,
            "{ctx}"
        );
        assert_eq!(
            num(get("mip6.mhtype")),
            u64::from(msg.body.mh_type()),
            "{ctx}"
        );
        assert_eq!(
            num(get("mip6.csum")),
            u64::from(u16::from_be_bytes([bytes[44], bytes[45]]))
        );
        match msg.body {
            Body::BindingUpdate { seq, ack, lifetime } => {
                assert_eq!(num(get("mip6.bu.seqnr")), u64::from(seq), "{ctx}");
                assert_eq!(flag(get("mip6.bu.a_flag")), ack, "{ctx}");
                assert!(flag(get("mip6.bu.h_flag")), "{ctx}");
                assert!(!flag(get("mip6.bu.k_flag")), "{ctx}");
                assert_eq!(num(get("mip6.bu.lifetime")), u64::from(lifetime), "{ctx}");
            }
            Body::BindingAck {
                status,
                seq,
                lifetime,
            } => {
                assert_eq!(num(get("mip6.ba.status")), u64::from(status), "{ctx}");
                assert!(!flag(get("mip6.ba.k_flag")), "{ctx}");
                assert_eq!(num(get("mip6.ba.seqnr")), u64::from(seq), "{ctx}");
                assert_eq!(num(get("mip6.ba.lifetime")), u64::from(lifetime), "{ctx}");
            }
            Body::BindingError { status, home } => {
                assert_eq!(num(get("mip6.be.status")), u64::from(status), "{ctx}");
                assert_eq!(v6(get("mip6.be.haddr")), home, "{ctx}");
            }
            Body::BindingRefreshRequest => {}
            Body::DiscoveryRequest | Body::DiscoveryReply { .. } => {
                unreachable!("see tshark_shows_discovery_messages")
            }
            Body::ClientBindingUpdate { .. } => {
                unreachable!("see tshark_decodes_client_bindings")
            }
        }

        // The length byte of every option but Pad1, as tshark read them, in order.
        let seen: Vec<u64> = get("mip6.mobility_opt.len")
            .split(';')
            .filter(|s| !s.is_empty())
            .map(num)
            .collect();
        let want: Vec<u64> = option_walk(&bytes)
            .into_iter()
            .filter(|&(_, t, _)| t != 0)
            .map(|(_, _, len)| len as u64)
            .collect();
        assert_eq!(seen, want, "{ctx}: option lengths");
        let o = &msg.options;

        if let Some(coa) = o.alt_coa {
            assert_eq!(v6(get("mip6.acoa.acoa")), coa, "{ctx}");
        }
        if let Some(id) = &o.mn_id {
            assert_eq!(num(get("mip6.mnid.subtype")), 1, "{ctx}");
            assert_eq!(get("mip6.mnid.identifier"), id, "{ctx}");
        }
        if o.mesg_id.is_some() {
            // Our 2024-06-01 12:00:00.5 UTC in NTP format (RFC 4285). tshark 4.0's dissector
            // reads these 8 bytes as Unix seconds and nanoseconds (ENC_BIG_ENDIAN on an
            // absolute time), so it shows NTP second 3926232000 as 2094 and the fraction as
            // a negative nanosecond count: the seconds are where they belong.
            let ts = get("mip6.mseg_id.timestamp");
            assert!(ts.starts_with("Jun  1, 2094 12:00:00."), "{ctx}: {ts}");
        }
        if let Some(l) = o.load {
            assert_eq!(num(get("mip6.load_inf.priority")), u64::from(l.priority));
            assert_eq!(
                num(get("mip6.load_inf.sessions_in_use")),
                u64::from(l.sessions_in_use)
            );
            assert_eq!(
                num(get("mip6.load_inf.maximum_sessions")),
                u64::from(l.max_sessions)
            );
            assert_eq!(
                num(get("mip6.load_inf.used_capacity")),
                u64::from(l.used_capacity)
            );
            assert_eq!(
                num(get("mip6.load_inf.maximum_capacity")),
                u64::from(l.max_capacity)
            );
        }
        if let Some(s) = o.service {
            assert_eq!(
                num(get("mip6.vsm.vendorId")),
                u64::from(wire::VENDOR_ID),
                "{ctx}"
            );
            assert_eq!(num(get("mip6.vsm.subtype")), 1, "{ctx}");
            // tshark 4.0 shows the data as `option length - offset`, its offset counting the
            // type and length bytes: 2 bytes short, so only the protocol byte of our three.
            let data = get("mip6.vsm.data").replace(':', "");
            assert_eq!(data, hex(&[s.protocol]), "{ctx}");
        }
        if case.keyed {
            assert_eq!(num(get("mip6.auth.subtype")), 1, "{ctx}");
            assert_eq!(num(get("mip6.auth.mobility_spi")), u64::from(SPI), "{ctx}");
            // The same 2-byte shortfall as the vendor data: 14 of the 16 bytes.
            let tag = wire::decode(&bytes)
                .unwrap()
                .options
                .auth
                .unwrap()
                .authenticator;
            let data = get("mip6.auth.auth_data").replace(':', "");
            assert_eq!(data, hex(&tag[..14]), "{ctx}");
        }
    }
}

/// Agent discovery's request and reply (RFC 5096's Experimental Mobility Header, type 11):
/// tshark shows the MH header and the message data as opaque bytes (as RFC 5096 says they
/// are), with nothing malformed and no expert warning.
#[test]
fn tshark_shows_discovery_messages() {
    require_tshark();
    let (server6, discovery6) = (v6("fd71:2::11"), v6("fd71:9::9"));
    let (server4, discovery4) = (mapped("10.71.2.11"), mapped("10.71.9.9"));
    let agents = vec![
        wire::AgentEntry {
            id: "a".into(),
            v4: Some("10.71.1.2".parse().unwrap()),
            v6: Some(v6("fd71:1::2")),
        },
        wire::AgentEntry {
            id: "agent-b".into(),
            v4: None,
            v6: Some(v6("fd71:2::3")),
        },
    ];
    let request = |src, dst| Message {
        src,
        dst,
        body: Body::DiscoveryRequest,
        options: Options {
            mn_id: Some("server-1".into()),
            mesg_id: Some(MESG_ID),
            ..Options::default()
        },
    };
    let reply = |src, dst| Message {
        src,
        dst,
        body: Body::DiscoveryReply {
            lifetime: 150,
            agents: agents.clone(),
        },
        options: Options {
            mesg_id: Some(MESG_ID),
            ..Options::default()
        },
    };
    let cases = vec![
        Case {
            name: "discovery_request_v4",
            msg: request(server4, discovery4),
            keyed: true,
        },
        Case {
            name: "discovery_reply_v4",
            msg: reply(discovery4, server4),
            keyed: true,
        },
        Case {
            name: "discovery_request_v6",
            msg: request(server6, discovery6),
            keyed: true,
        },
        Case {
            name: "discovery_reply_v6",
            msg: reply(discovery6, server6),
            keyed: false,
        },
    ];
    let capture = Capture::new(&cases);
    let fields = [
        "frame.protocols",
        "udp.checksum.status",
        "ipv6.plen",
        "ipv6.src",
        "ipv6.dst",
        "mip6.proto",
        "mip6.hlen",
        "mip6.mhtype",
        "mip6.csum",
        "mip6.em.data",
    ];
    let mut args: Vec<&str> = vec!["-T", "fields"];
    for f in fields {
        args.extend(["-e", f]);
    }
    let out = capture.tshark(&args);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), cases.len(), "{out}");
    for (case, row) in cases.iter().zip(&rows) {
        let ctx = format!("{}: {row:?}", case.name);
        let bytes = payload(case);
        assert_eq!(row[0], "raw:ip:udp:ipv6:mipv6", "{ctx}");
        assert_eq!(row[1], "1", "{ctx}: UDP checksum good");
        assert_eq!(num(row[2]) as usize, bytes.len() - 40, "{ctx}");
        assert_eq!(v6(row[3]), case.msg.src, "{ctx}");
        assert_eq!(v6(row[4]), case.msg.dst, "{ctx}");
        assert_eq!(num(row[5]), 59, "{ctx}");
        assert_eq!((num(row[6]) as usize + 1) * 8, bytes.len() - 40, "{ctx}");
        assert_eq!(num(row[7]), 11, "{ctx}: Experimental Mobility Header");
        assert_eq!(
            num(row[8]),
            u64::from(u16::from_be_bytes([bytes[44], bytes[45]])),
            "{ctx}"
        );
        // The message data: everything after the 6-byte MH header, as we wrote it.
        assert_eq!(row[9].replace(':', ""), hex(&bytes[46..]), "{ctx}");
    }
    let expert = capture.tshark(&["-q", "-z", "expert"]);
    for bad in ["Malformed", "Errors", "Warns", "Error", "Warning"] {
        assert!(
            !expert.contains(bad),
            "tshark expert info mentions {bad}:\n{expert}"
        );
    }
    let verbose = capture.tshark(&["-V"]);
    assert_eq!(
        verbose
            .matches("Mobility Header Type: Experimental Mobility Header (11)")
            .count(),
        cases.len(),
        "{verbose}"
    );
    for bad in ["Malformed", "Expert Info", "Unknown", "Invalid", "Bogus"] {
        assert!(!verbose.contains(bad), "tshark -V says {bad}:\n{verbose}");
    }
}

/// (offset in the MH, type, length byte or 0 for Pad1) of each option, walked here.
fn option_walk(payload: &[u8]) -> Vec<(usize, u8, usize)> {
    let mh = &payload[40..];
    let mut i = match mh[2] {
        0 => 8,
        5 | 6 => 12,
        7 => 24,
        t => panic!("MH type {t}"),
    };
    let mut out = Vec::new();
    while i < mh.len() {
        if mh[i] == 0 {
            out.push((i, 0, 0));
            i += 1;
        } else {
            out.push((i, mh[i], usize::from(mh[i + 1])));
            i += 2 + usize::from(mh[i + 1]);
        }
    }
    assert_eq!(i, mh.len());
    out
}

#[test]
fn tshark_finds_nothing_wrong() {
    require_tshark();
    let cases = cases();
    let capture = Capture::new(&cases);
    let expert = capture.tshark(&["-q", "-z", "expert"]);
    for bad in ["Malformed", "Errors", "Warns", "Error", "Warning"] {
        assert!(
            !expert.contains(bad),
            "tshark expert info mentions {bad}:\n{expert}"
        );
    }
    let verbose = capture.tshark(&["-V"]);
    // Labels tshark 4.0 lacks, not faults: its AUTH subtype names are another registry's
    // (it has no name for RFC 4285's MN-HA, 1), and vendor 0 has no sub-type names.
    let benign = |line: &str| {
        let line = line.trim();
        line == "Subtype: Unknown (1)"
            || line.starts_with("Status: Unknown binding for Home Address destination option")
    };
    for bad in [
        "Malformed",
        "Expert Info",
        "Unknown",
        "Invalid",
        "Bogus",
        "not dissected",
        "Undecoded",
    ] {
        for line in verbose.lines() {
            assert!(
                !line.contains(bad) || benign(line),
                "tshark -V says {line:?}:\n{verbose}"
            );
        }
    }
    // Each frame's options, by tshark's names, padding aside.
    let frames: Vec<&str> = verbose.split("\nFrame ").collect();
    assert_eq!(frames.len(), cases.len(), "{verbose}");
    for (case, frame) in cases.iter().zip(&frames) {
        assert_eq!(
            frame.matches("    Mobile IPv6\n").count(),
            1,
            "{}: {frame}",
            case.name
        );
        let names: Vec<&str> = frame
            .lines()
            .filter_map(|l| l.trim().strip_prefix("MIPv6 Option - "))
            .map(|n| n.split(':').next().unwrap())
            .filter(|n| *n != "PadN" && *n != "Pad1")
            .collect();
        let o = &case.msg.options;
        let mut want = Vec::new();
        o.alt_coa
            .is_some()
            .then(|| want.push("Alternate Care-of Address"));
        o.mn_id
            .is_some()
            .then(|| want.push("Mobile Node Identifier"));
        o.mesg_id
            .is_some()
            .then(|| want.push("MESG-ID-OPTION-TYPE"));
        o.load.is_some().then(|| want.push("Load Information"));
        o.service.is_some().then(|| want.push("Vendor Specific"));
        case.keyed.then(|| want.push("AUTH-OPTION-TYPE"));
        assert_eq!(names, want, "{}: {frame}", case.name);
    }
}
