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
        ..Options::default()
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
        Capture::from_packets(&packets)
    }

    /// A capture of IPv4/UDP packets built by the caller.
    fn from_packets(packets: &[Vec<u8>]) -> Capture {
        let path = std::env::temp_dir().join(format!(
            "anycast-wire-oracle-{}-{:?}.pcap",
            std::process::id(),
            std::thread::current().id()
        ));
        write_pcap(&path, packets);
        Capture(path)
    }

    fn tshark(&self, extra: &[&str]) -> String {
        let mut cmd = Command::new("tshark");
        cmd.arg("-r")
            .arg(&self.0)
            .args(["-d", &format!("udp.port=={DEFAULT_PORT},ipv6")])
            .args(["-d", &format!("udp.port=={},ipv6", wire::CLIENT_PORT)])
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

mod client_binding;
mod scapy;
mod tshark;
