//! scapy builds and dissects binding messages with its own MIPv6 layers.
use super::*;

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
            Body::ClientBindingUpdate { .. } => {
                unreachable!("see tshark_decodes_client_bindings")
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
