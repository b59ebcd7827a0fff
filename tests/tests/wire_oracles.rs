//! Independent oracles for the binding wire format (`anycast_common::wire`).
//!
//! * **tshark** (Wireshark's `mip6` dissector) reads our BU, BA, BRR and BE, each in an
//!   IPv4/UDP packet to port 4191 of a pcap file written here byte by byte, and must show the
//!   fields we meant, with no Malformed packet and no expert warning or error.
//! * **scapy** (`tests/oracles/build_bu.py`) builds an authenticated BU with its own MIPv6
//!   layers, checksum and Python's `hmac`; we must decode and verify it, and produce the very
//!   same bytes for the same message.
//! * **scapy** (`tests/oracles/dissect.py`) dissects what we encode, recomputes the checksum
//!   and the authenticator, and reports the fields and option offsets.
//!
//! tshark, python3 and scapy are installed by `cargo xtask setup`; a test that lacks one fails
//! and says so. Run with `cargo test --release -p anycast-tests --test wire_oracles`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anycast_common::wire::{
    self, status, Body, Key, LoadInfo, Message, Options, ServiceSelector, DEFAULT_PORT,
};
use serde_json::Value;

const SECRET: &[u8] = b"the oracle's shared secret";
const SPI: u32 = 0x00c0_ffee;
const KEY: Key = Key {
    spi: SPI,
    secret: SECRET,
};
/// 2024-06-01T12:00:00Z as NTP seconds (Unix 1717243200 + 2208988800), half a second.
const MESG_ID: u64 = (3_926_232_000u64 << 32) | 0x8000_0000;
const SERVER_PORT: u16 = 40_000;

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn mapped(s: &str) -> Ipv6Addr {
    wire::to_mapped(IpAddr::V4(s.parse::<Ipv4Addr>().unwrap()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    assert!(s.len().is_multiple_of(2), "odd hex: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| panic!("{s}: {e}")))
        .collect()
}

fn oracle(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("oracles")
        .join(name)
}

/// Runs `cmd`, returns its stdout; panics with its stderr if it cannot start or fails.
fn run(cmd: &mut Command, install_hint: &str) -> String {
    let what = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what}: {e}. {install_hint} is installed by `cargo xtask setup`")
    });
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn require_tshark() {
    run(
        Command::new("tshark").arg("--version"),
        "tshark (Debian package tshark)",
    );
}

fn require_scapy() {
    let hint = "scapy (python3 -m pip install scapy, pinned in xtask)";
    let version = run(
        Command::new("python3").args(["-c", "import scapy; print(scapy.VERSION)"]),
        hint,
    );
    assert!(!version.trim().is_empty(), "scapy has no version");
}

// ---------------------------------------------------------------------------------------------
// The messages under test

struct Case {
    name: &'static str,
    msg: Message,
    keyed: bool,
}

fn full_options(coa: Ipv6Addr, id: &str) -> Options {
    Options {
        alt_coa: Some(coa),
        mn_id: Some(id.to_owned()),
        mesg_id: Some(MESG_ID),
        load: Some(LoadInfo {
            priority: 3,
            sessions_in_use: 17,
            max_sessions: 100_000,
            used_capacity: 2_500,
            max_capacity: 0xfedc_ba98,
        }),
        service: Some(ServiceSelector {
            protocol: 6,
            port: 443,
        }),
        auth: None,
    }
}

fn cases() -> Vec<Case> {
    let (home6, agent6, real6) = (v6("fd71:100::1"), v6("fd71:1::2"), v6("fd71:2::11"));
    let (home4, agent4, real4) = (
        mapped("10.71.100.1"),
        mapped("10.71.1.2"),
        mapped("10.71.2.12"),
    );
    vec![
        Case {
            name: "bu_v6",
            msg: Message {
                src: home6,
                dst: agent6,
                body: Body::BindingUpdate {
                    seq: 0x1234,
                    ack: true,
                    lifetime: 75,
                },
                options: full_options(real6, "server-1.v6@anycast.test"),
            },
            keyed: true,
        },
        Case {
            name: "bu_v4",
            msg: Message {
                src: home4,
                dst: agent4,
                body: Body::BindingUpdate {
                    seq: 65535,
                    ack: false,
                    lifetime: 1,
                },
                options: Options {
                    service: Some(ServiceSelector {
                        protocol: 17,
                        port: 53,
                    }),
                    // tshark 4.0 shows an identifier only from 3 bytes on (the offset
                    // mix-up of its AUTH and vendor dissectors again); scapy covers 1 byte.
                    ..full_options(real4, "s-2@v4")
                },
            },
            keyed: true,
        },
        Case {
            name: "ba_v6",
            msg: Message {
                src: agent6,
                dst: home6,
                body: Body::BindingAck {
                    status: status::ACCEPTED,
                    seq: 0x1234,
                    lifetime: 75,
                },
                options: Options {
                    mesg_id: Some(MESG_ID),
                    ..Options::default()
                },
            },
            keyed: true,
        },
        Case {
            name: "ba_v4",
            msg: Message {
                src: agent4,
                dst: home4,
                body: Body::BindingAck {
                    status: status::AUTH_FAILED,
                    seq: 7,
                    lifetime: 0,
                },
                options: Options::default(),
            },
            keyed: false,
        },
        Case {
            name: "brr_v4",
            msg: Message {
                src: agent4,
                dst: home4,
                body: Body::BindingRefreshRequest,
                options: Options::default(),
            },
            keyed: true,
        },
        Case {
            name: "be_v6",
            msg: Message {
                src: agent6,
                dst: home6,
                body: Body::BindingError {
                    status: 2,
                    home: home6,
                },
                options: Options::default(),
            },
            keyed: false,
        },
        Case {
            name: "be_v4",
            msg: Message {
                src: agent4,
                dst: home4,
                body: Body::BindingError {
                    status: 1,
                    home: home4,
                },
                options: Options::default(),
            },
            keyed: false,
        },
    ]
}

fn payload(case: &Case) -> Vec<u8> {
    wire::encode(&case.msg, case.keyed.then_some(KEY))
}

// ---------------------------------------------------------------------------------------------
// pcap writing: LINKTYPE_RAW (101), each packet IPv4 | UDP | payload, checksums computed here.

fn ones_complement_sum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for c in chunks {
        for pair in c.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u64::from);
            sum += hi | lo;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let udp_len = 8 + data.len();
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]); // id, DF, TTL 64, UDP
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let ip_sum = ones_complement_sum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let mut udp_sum = ones_complement_sum(&[&pseudo, &udp]);
    if udp_sum == 0 {
        udp_sum = 0xffff;
    }
    udp[6..8].copy_from_slice(&udp_sum.to_be_bytes());

    ip.extend_from_slice(&udp);
    ip
}

fn write_pcap(path: &Path, packets: &[Vec<u8>]) {
    let mut f = Vec::new();
    f.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes()); // magic, microseconds
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&4u16.to_le_bytes());
    f.extend_from_slice(&0i32.to_le_bytes()); // thiszone
    f.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
    f.extend_from_slice(&65_535u32.to_le_bytes()); // snaplen
    f.extend_from_slice(&101u32.to_le_bytes()); // LINKTYPE_RAW
    for (i, p) in packets.iter().enumerate() {
        f.extend_from_slice(&(1_717_243_200u32 + i as u32).to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&(p.len() as u32).to_le_bytes());
        f.extend_from_slice(&(p.len() as u32).to_le_bytes());
        f.extend_from_slice(p);
    }
    std::fs::write(path, f).unwrap();
}

/// A temporary pcap of the cases: the BUs from server to agent, the rest the other way.
struct Capture(PathBuf);

impl Capture {
    fn new(cases: &[Case]) -> Capture {
        let server = Ipv4Addr::new(192, 0, 2, 10);
        let agent = Ipv4Addr::new(192, 0, 2, 1);
        let packets: Vec<Vec<u8>> = cases
            .iter()
            .map(|c| {
                let data = payload(c);
                if matches!(c.msg.body, Body::BindingUpdate { .. }) {
                    ipv4_udp(server, agent, SERVER_PORT, DEFAULT_PORT, &data)
                } else {
                    ipv4_udp(agent, server, DEFAULT_PORT, SERVER_PORT, &data)
                }
            })
            .collect();
        let path = std::env::temp_dir().join(format!(
            "anycast-wire-oracle-{}-{:?}.pcap",
            std::process::id(),
            std::thread::current().id()
        ));
        write_pcap(&path, &packets);
        Capture(path)
    }

    fn tshark(&self, extra: &[&str]) -> String {
        let mut cmd = Command::new("tshark");
        cmd.arg("-r")
            .arg(&self.0)
            .args(["-d", &format!("udp.port=={DEFAULT_PORT},ipv6")])
            .args([
                "-o",
                "ip.check_checksum:TRUE",
                "-o",
                "udp.check_checksum:TRUE",
            ])
            .args(extra);
        run(&mut cmd, "tshark (Debian package tshark)")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

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

// ---------------------------------------------------------------------------------------------
// scapy

struct BuParams<'a> {
    home: Ipv6Addr,
    agent: Ipv6Addr,
    coa: Ipv6Addr,
    mn_id: &'a str,
    seq: u16,
    lifetime: u16,
    spi: u32,
    secret: &'a [u8],
    mesg_id: Option<u64>,
    load: Option<LoadInfo>,
    service: Option<ServiceSelector>,
    ack: bool,
}

fn scapy_build_bu(p: &BuParams) -> Vec<u8> {
    let mut cmd = Command::new("python3");
    cmd.arg(oracle("build_bu.py"))
        .args(["--home", &p.home.to_string()])
        .args(["--agent", &p.agent.to_string()])
        .args(["--coa", &p.coa.to_string()])
        .args(["--mn-id", p.mn_id])
        .args(["--seq", &p.seq.to_string()])
        .args(["--lifetime", &p.lifetime.to_string()])
        .args(["--spi", &p.spi.to_string()])
        .args(["--secret-hex", &hex(p.secret)]);
    if let Some(ts) = p.mesg_id {
        cmd.args(["--mesg-id", &ts.to_string()]);
    }
    if let Some(l) = p.load {
        let v = format!(
            "{},{},{},{},{}",
            l.priority, l.sessions_in_use, l.max_sessions, l.used_capacity, l.max_capacity
        );
        cmd.args(["--load", &v]);
    }
    if let Some(s) = p.service {
        cmd.args(["--service", &format!("{}:{}", s.protocol, s.port)]);
    }
    if !p.ack {
        cmd.arg("--no-ack");
    }
    unhex(&run(&mut cmd, "scapy (python3 -m pip install scapy)"))
}

#[test]
fn scapy_built_bu_decodes_and_verifies() {
    require_scapy();
    let load = LoadInfo {
        priority: 9,
        sessions_in_use: 123,
        max_sessions: 456,
        used_capacity: 789,
        max_capacity: 1_000_000,
    };
    let web = ServiceSelector {
        protocol: 6,
        port: 80,
    };
    let secret: Vec<u8> = (0u8..=40).map(|i| i.wrapping_mul(37)).collect();
    let addresses = [
        (v6("fd71:100::1"), v6("fd71:1::2"), v6("fd71:2::11")),
        (
            mapped("10.71.100.1"),
            mapped("10.71.1.2"),
            mapped("10.71.2.11"),
        ),
    ];
    let ids = [
        "a",
        "server-1@anycast.test",
        "a-rather-long-server-identity-0042@dc7.example",
    ];
    let mut n = 0;
    for (home, agent, coa) in addresses {
        for id in ids {
            for (mesg_id, load, service, ack) in [
                (Some(MESG_ID), Some(load), Some(web), true),
                (None, None, None, false),
                (Some(wire::ntp_now()), None, Some(web), true),
            ] {
                let p = BuParams {
                    home,
                    agent,
                    coa,
                    mn_id: id,
                    seq: 4242 + n,
                    lifetime: 60,
                    spi: 0x8000_0001,
                    secret: &secret,
                    mesg_id,
                    load,
                    service,
                    ack,
                };
                let bytes = scapy_build_bu(&p);
                let ctx = format!("{id} {home} {mesg_id:?}: {}", hex(&bytes));
                let msg = wire::decode(&bytes).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(msg.src, home, "{ctx}");
                assert_eq!(msg.dst, agent, "{ctx}");
                assert_eq!(
                    msg.body,
                    Body::BindingUpdate {
                        seq: p.seq,
                        ack,
                        lifetime: 60
                    },
                    "{ctx}"
                );
                let o = &msg.options;
                assert_eq!(o.alt_coa, Some(coa), "{ctx}");
                assert_eq!(o.mn_id.as_deref(), Some(id), "{ctx}");
                assert_eq!(o.mesg_id, mesg_id, "{ctx}");
                assert_eq!(o.load, load, "{ctx}");
                assert_eq!(o.service, service, "{ctx}");
                assert_eq!(o.auth.map(|a| a.spi), Some(p.spi), "{ctx}");

                let key = Key {
                    spi: p.spi,
                    secret: &secret,
                };
                assert!(
                    wire::verify(&bytes, key),
                    "{ctx}: our verify rejects scapy's AUTH"
                );
                let wrong = Key {
                    spi: p.spi,
                    secret: b"some other secret",
                };
                assert!(
                    !wire::verify(&bytes, wrong),
                    "{ctx}: another secret accepted"
                );
                let wrong_spi = Key {
                    spi: p.spi ^ 1,
                    secret: &secret,
                };
                assert!(
                    !wire::verify(&bytes, wrong_spi),
                    "{ctx}: another SPI accepted"
                );

                // Same rules, same bytes: our encoder lays the message out exactly as scapy.
                let ours = wire::encode(
                    &Message {
                        options: Options {
                            auth: None,
                            ..msg.options.clone()
                        },
                        ..msg.clone()
                    },
                    Some(key),
                );
                assert_eq!(hex(&ours), hex(&bytes), "{ctx}: our encoding differs");
                n += 1;
            }
        }
    }
    assert_eq!(n, 18);
}

#[test]
fn scapy_dissects_our_messages() {
    require_scapy();
    let cases = cases();
    let payloads: Vec<Vec<u8>> = cases.iter().map(payload).collect();
    let mut cmd = Command::new("python3");
    cmd.arg(oracle("dissect.py"))
        .args(["--secret-hex", &hex(SECRET)])
        .args(payloads.iter().map(|p| hex(p)));
    let out = run(&mut cmd, "scapy (python3 -m pip install scapy)");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), cases.len());
    for ((case, bytes), row) in cases.iter().zip(&payloads).zip(&rows) {
        let ctx = format!("{}: {row}", case.name);
        let msg = &case.msg;
        let u = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{ctx}: {k}"));
        assert_eq!(u("version"), 6, "{ctx}");
        assert_eq!((u("tc"), u("fl")), (0, 0), "{ctx}");
        assert_eq!(u("nh"), 135, "{ctx}");
        assert_eq!(u("hlim"), 255, "{ctx}");
        assert_eq!(u("plen") as usize, bytes.len() - 40, "{ctx}");
        assert_eq!(v6(row["src"].as_str().unwrap()), msg.src, "{ctx}");
        assert_eq!(v6(row["dst"].as_str().unwrap()), msg.dst, "{ctx}");
        assert_eq!(u("mh_proto"), 59, "{ctx}");
        assert_eq!(u("mh_len_bytes") % 8, 0, "{ctx}");
        assert_eq!((u("hlen") + 1) * 8, u("mh_len_bytes"), "{ctx}");
        assert_eq!(u("mh_type"), u64::from(msg.body.mh_type()), "{ctx}");
        assert_eq!(
            u("cksum"),
            u("cksum_computed"),
            "{ctx}: scapy computes another checksum"
        );
        let layer = row["layer"].as_str().unwrap();
        match msg.body {
            Body::BindingRefreshRequest => assert!(layer.contains("Binding Refresh"), "{ctx}"),
            Body::BindingUpdate { seq, ack, lifetime } => {
                assert!(layer.contains("Binding Update"), "{ctx}");
                assert_eq!(u("seq"), u64::from(seq), "{ctx}");
                assert_eq!(u("lifetime"), u64::from(lifetime), "{ctx}");
                let flags = row["flags"].as_str().unwrap();
                assert_eq!(flags, if ack { "HA" } else { "H" }, "{ctx}");
            }
            Body::BindingAck {
                status,
                seq,
                lifetime,
            } => {
                assert!(layer.contains("Binding ACK"), "{ctx}");
                assert_eq!(u("status"), u64::from(status), "{ctx}");
                assert_eq!(u("seq"), u64::from(seq), "{ctx}");
                assert_eq!(u("lifetime"), u64::from(lifetime), "{ctx}");
                assert_eq!(row["flags"].as_str().unwrap(), "", "{ctx}: no K flag");
            }
            Body::BindingError { status, home } => {
                assert!(layer.contains("Binding Error"), "{ctx}");
                assert_eq!(u("status"), u64::from(status), "{ctx}");
                assert_eq!(v6(row["home"].as_str().unwrap()), home, "{ctx}");
            }
            Body::DiscoveryRequest | Body::DiscoveryReply { .. } => {
                unreachable!("see tshark_shows_discovery_messages")
            }
        }
        let options = row["options"].as_array().unwrap();
        let real: Vec<&Value> = options
            .iter()
            .filter(|o| o["type"].as_u64() > Some(1))
            .collect();
        let mut auth_seen = false;
        for o in &real {
            let at = o["offset"].as_u64().unwrap();
            match o["type"].as_u64().unwrap() {
                3 => {
                    assert_eq!(at % 8, 6, "{ctx}: Alt-CoA alignment");
                    assert_eq!(
                        v6(o["alt_coa"].as_str().unwrap()),
                        msg.options.alt_coa.unwrap()
                    );
                }
                8 => {
                    assert_eq!(o["subtype"], 1, "{ctx}");
                    assert_eq!(o["id"].as_str(), msg.options.mn_id.as_deref(), "{ctx}");
                }
                10 => {
                    assert_eq!(at % 8, 2, "{ctx}: MESG-ID alignment");
                    assert_eq!(o["timestamp"].as_u64(), msg.options.mesg_id, "{ctx}");
                }
                48 => {
                    let l = msg.options.load.unwrap();
                    let want = [
                        u64::from(l.priority),
                        u64::from(l.sessions_in_use),
                        u64::from(l.max_sessions),
                        u64::from(l.used_capacity),
                        u64::from(l.max_capacity),
                    ];
                    let got: Vec<u64> = o["load"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap())
                        .collect();
                    assert_eq!(got, want, "{ctx}");
                }
                19 => {
                    assert_eq!(at % 4, 2, "{ctx}: vendor option alignment");
                    let s = msg.options.service.unwrap();
                    assert_eq!(o["vendor_id"], 0, "{ctx}");
                    assert_eq!(o["subtype"], 1, "{ctx}");
                    assert_eq!(o["protocol"].as_u64(), Some(u64::from(s.protocol)), "{ctx}");
                    assert_eq!(o["port"].as_u64(), Some(u64::from(s.port)), "{ctx}");
                }
                9 => {
                    assert_eq!(at % 4, 1, "{ctx}: AUTH alignment");
                    assert_eq!(o["spi"].as_u64(), Some(u64::from(SPI)), "{ctx}");
                    assert_eq!(o["auth_ok"], true, "{ctx}: Python's HMAC disagrees");
                    assert!(
                        std::ptr::eq(*o, options.last().unwrap()),
                        "{ctx}: AUTH last"
                    );
                    auth_seen = true;
                }
                other => panic!("{ctx}: unexpected option {other}"),
            }
        }
        assert_eq!(auth_seen, case.keyed, "{ctx}");
    }
}
