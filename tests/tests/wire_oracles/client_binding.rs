//! tshark reads the servers' bindings for clients (route optimization): a Binding Update
//! with H clear, the certificate in vendor options of sub-type 3 and the signature in one of
//! sub-type 4, to the client's port 4193.
use super::*;
use anycast_common::pki::{CertPrefix, Certificate, CertificateBody, SigningKey};

fn certificate(prefixes: usize) -> Vec<u8> {
    let p = |s: &str, len| CertPrefix::new(s.parse().unwrap(), len).unwrap();
    let body = CertificateBody {
        serial: 42,
        not_before: 1_717_200_000,
        not_after: 1_717_300_000,
        subject_key: server_key().verifying_key().to_bytes(),
        identity: "s1".into(),
        real: (0..prefixes)
            .map(|i| p(&format!("fd71:2:{i:x}::11"), 128))
            .chain([p("192.0.2.0", 24)])
            .take(16)
            .collect(),
        anycast: vec![p("10.71.100.1", 32), p("fd71:100::", 64)],
    };
    Certificate::issue(body, &SigningKey::from_bytes(&[1; 32]))
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn server_key() -> SigningKey {
    SigningKey::from_bytes(&[2; 32])
}

fn binding(src: Ipv6Addr, dst: Ipv6Addr, real: Ipv6Addr, lifetime: u16, cert: Vec<u8>) -> Message {
    Message {
        src,
        dst,
        body: Body::ClientBindingUpdate {
            seq: 0x0203,
            lifetime,
        },
        options: Options {
            alt_coa: Some(real),
            mesg_id: Some(MESG_ID),
            service: Some(ServiceSelector {
                protocol: 6,
                port: 80,
            }),
            certificate: Some(cert),
            ..Options::default()
        },
    }
}

#[test]
fn tshark_decodes_client_bindings() {
    require_tshark();
    let mut msgs = [
        // One certificate part.
        binding(
            mapped("10.71.100.1"),
            mapped("192.0.2.21"),
            mapped("192.0.2.11"),
            15,
            certificate(0),
        ),
        // A certificate of 16 real prefixes: several parts.
        binding(
            v6("fd71:100::1"),
            v6("fd71::21"),
            v6("fd71:2:1::11"),
            150,
            certificate(15),
        ),
        // A withdrawal (lifetime 0).
        binding(
            mapped("10.71.100.1"),
            mapped("192.0.2.21"),
            mapped("192.0.2.11"),
            0,
            certificate(1),
        ),
    ];
    // The client's connections the binding moves with it (sub-type 5).
    msgs[1].options.connections = vec![(40_001, 80), (40_002, 80), (51_000, 443)];
    let payloads: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| wire::encode_signed(m, &server_key()).unwrap())
        .collect();
    let packets: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| {
            ipv4_udp(
                Ipv4Addr::new(192, 0, 2, 11),
                Ipv4Addr::new(192, 0, 2, 21),
                SERVER_PORT,
                wire::CLIENT_PORT,
                p,
            )
        })
        .collect();
    let capture = Capture::from_packets(&packets);
    let fields = [
        "frame.protocols",
        "udp.checksum.status",
        "ipv6.src",
        "ipv6.dst",
        "mip6.mhtype",
        "mip6.bu.seqnr",
        "mip6.bu.a_flag",
        "mip6.bu.h_flag",
        "mip6.bu.lifetime",
        "mip6.acoa.acoa",
        "mip6.vsm.vendorId",
        "mip6.vsm.subtype",
        "mip6.mobility_opt.len",
        "mip6.vsm.data",
    ];
    let mut args: Vec<&str> = vec!["-T", "fields", "-E", "occurrence=a", "-E", "aggregator=;"];
    for f in fields {
        args.extend(["-e", f]);
    }
    let out = capture.tshark(&args);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), msgs.len(), "{out}");
    for ((msg, bytes), row) in msgs.iter().zip(&payloads).zip(&rows) {
        let ctx = format!("{row:?}");
        let Body::ClientBindingUpdate { seq, lifetime } = msg.body else {
            unreachable!()
        };
        assert_eq!(row[0], "raw:ip:udp:ipv6:mipv6", "{ctx}");
        assert_eq!(row[1], "1", "{ctx}: UDP checksum good");
        assert_eq!(v6(row[2]), msg.src, "{ctx}");
        assert_eq!(v6(row[3]), msg.dst, "{ctx}");
        assert_eq!(row[4], "5", "{ctx}: a Binding Update");
        assert_eq!(row[5], seq.to_string(), "{ctx}");
        assert_eq!(row[6], "0", "{ctx}: A clear");
        assert_eq!(row[7], "0", "{ctx}: H clear, a correspondent registration");
        assert_eq!(row[8], lifetime.to_string(), "{ctx}");
        assert_eq!(v6(row[9]), msg.options.alt_coa.unwrap(), "{ctx}");
        // Our vendor options in order: the service, the named connections, the certificate's
        // parts, the signature.
        let parts = msg
            .options
            .certificate
            .as_ref()
            .unwrap()
            .len()
            .div_ceil(wire::CERT_PART_MAX);
        let mut subtypes = vec!["1".to_string()];
        if !msg.options.connections.is_empty() {
            subtypes.push("5".into());
        }
        subtypes.extend(std::iter::repeat_n("3".to_string(), parts));
        subtypes.push("4".into());
        assert_eq!(row[11], subtypes.join(";"), "{ctx}");
        assert!(
            row[10].split(';').all(|v| v == "0"),
            "{ctx}: vendor id 0 for each"
        );
        // Every option's length byte as tshark read it, padding included, in order.
        let mh = &bytes[40..];
        let mut lens = Vec::new();
        let mut i = 12;
        while i < mh.len() {
            if mh[i] == 0 {
                i += 1;
                continue;
            }
            lens.push(mh[i + 1].to_string());
            i += 2 + usize::from(mh[i + 1]);
        }
        assert_eq!(row[12], lens.join(";"), "{ctx}");
        // The signature option's data as tshark shows it: 2 bytes short (its offset
        // arithmetic, see the module doc of `wire`): algorithm 1, reserved, the signature
        // but its last two bytes.
        let sig_data = row[13].split(';').next_back().unwrap().replace(':', "");
        assert_eq!(sig_data, hex(&mh[mh.len() - 71..mh.len() - 2]), "{ctx}");
    }
    let expert = capture.tshark(&["-q", "-z", "expert"]);
    for bad in ["Malformed", "Errors", "Warns", "Error", "Warning"] {
        assert!(
            !expert.contains(bad),
            "tshark expert info mentions {bad}:\n{expert}"
        );
    }
    let verbose = capture.tshark(&["-V"]);
    if std::env::var_os("ACRO_SHOW").is_some() {
        eprintln!("{verbose}");
    }
    for bad in [
        "Malformed",
        "Expert Info",
        "Invalid",
        "Bogus",
        "not dissected",
        "Undecoded",
    ] {
        assert!(!verbose.contains(bad), "tshark -V says {bad}:\n{verbose}");
    }
    // Our messages also decode and verify with our own decoder.
    for p in &payloads {
        assert!(wire::verify_signed(p, &server_key().verifying_key()));
    }
}
