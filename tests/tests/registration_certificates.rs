//! Servers register with certificates instead of keys, end to end in network namespaces
//! (`acac*`): the agent holds the operator's public key, a revocation list and no key for
//! any server (`registration.servers` is empty); its four services take certificate-signed
//! registrations. Three servers run `anycast-ctl server --certificate --signing-key`
//! without `--key` (a wrapper drops the topology's `--key` and `--spi`):
//!
//! 1. s1's certificate is the operator's: it registers, and the clients' connections and
//!    datagrams are all answered by it;
//! 2. s2's certificate names s2 and its key but is signed by another operator (forged), and
//!    s3's is on the revocation list: both are refused and counted
//!    (`refused_certificate_untrusted`, `refused_certificate_revoked`), hold no binding and
//!    get no packet;
//! 3. a flood of 20 000 forged certificate-signed updates (s2's forged certificate, from
//!    s2's own address, so every cheap check passes and only the signature checks can
//!    refuse them) is checked only within the budget (`checks_per_second`), the rest
//!    dropped and counted; s1's refreshes go on and every client request is still answered;
//! 4. the operator revokes s1 too and the agent is reloaded: s1's binding ends at once, its
//!    next update is refused as revoked, and nothing is served any more.
//!
//! Runs as root.
use std::{collections::BTreeMap, fs, os::unix::fs::PermissionsExt as _, time::Duration};

use anycast_common::{
    pki::SigningKey,
    wire::{self, Body, LoadInfo, Message, Options},
};
use anycast_tests::{
    route_opt,
    topology::{http_get, udp_ask, ServerMode, Topology, ANYCAST_V4, ANYCAST_V6, HTTP_PORT},
    wait_until, workspace_bin,
};

const LIFETIME: u64 = 8;

fn counter(topo: &Topology, name: &str) -> anyhow::Result<u64> {
    Ok(topo.bindings()?["counters"][name].as_u64().unwrap_or(0))
}

/// A certificate-signed binding update of s2 with its forged certificate.
fn forged_update(dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let read = |name: &str| -> anyhow::Result<Vec<u8>> {
        anycast_tests::unhex(fs::read_to_string(dir.join(name))?.trim())
    };
    let key = SigningKey::from_bytes(&read("ro-s2.key")?.as_slice().try_into()?);
    let msg = Message {
        src: wire::to_mapped(ANYCAST_V4.into()),
        dst: wire::to_mapped("10.71.1.2".parse()?),
        body: Body::BindingUpdate {
            seq: 1,
            ack: true,
            lifetime: 2,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped("10.71.2.12".parse()?)),
            mn_id: Some("s2".into()),
            mesg_id: Some(wire::ntp_now()),
            load: Some(LoadInfo::default()),
            certificate: Some(read("ro-s2.cert")?),
            ..Options::default()
        },
    };
    Ok(wire::encode_registration_signed(&msg, &key)?)
}

fn path(dir: &std::path::Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// A wrapper around `anycast-ctl` that drops `--key FILE` and `--spi N`: the server then
/// registers with its certificate.
fn without_key_wrapper(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let ctl = workspace_bin("anycast-ctl")?;
    let script = format!(
        "#!/bin/sh\n\
         skip=0\n\
         for a do\n  shift\n  if [ $skip = 1 ]; then skip=0; continue; fi\n  \
         case \"$a\" in --key|--spi) skip=1; continue;; esac\n  set -- \"$@\" \"$a\"\n\
         done\n\
         exec '{}' \"$@\"\n",
        ctl.display()
    );
    let p = dir.join("server-by-certificate.sh");
    fs::write(&p, script)?;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// `n` HTTP connections and `n` datagrams from every client, to both address families;
/// answers per server.
fn served(topo: &Topology, n: usize) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut total = BTreeMap::new();
    for c in &topo.clients {
        let counts = c.in_ns(move || {
            let mut counts = BTreeMap::<String, u32>::new();
            for v6 in [false, true] {
                for _ in 0..n {
                    *counts
                        .entry(http_get(Topology::anycast(v6, HTTP_PORT))?)
                        .or_default() += 1;
                    let (who, _) =
                        udp_ask(Topology::anycast(v6, anycast_tests::topology::UDP_PORT))?;
                    *counts.entry(who).or_default() += 1;
                }
            }
            Ok(counts)
        })?;
        for (k, v) in counts {
            *total.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

#[test]
fn servers_register_with_certificates_and_forged_or_revoked_ones_are_refused() -> anyhow::Result<()>
{
    let mut topo = Topology::build(
        "acac",
        2,
        3,
        ServerMode::Registering {
            lifetime_secs: LIFETIME,
        },
    )?;
    let dir = topo.dir.clone();
    route_opt::make_pki(&dir, 3)?;
    // s2's certificate re-issued by an operator the agent does not trust.
    route_opt::pki(&["keygen", "--out", &path(&dir, "rogue")])?;
    route_opt::pki(&[
        "issue",
        "--operator-key",
        &path(&dir, "rogue.key"),
        "--server-pub",
        &path(&dir, "ro-s2.pub"),
        "--id",
        "s2",
        "--real",
        "10.71.2.12",
        "--real",
        "fd71:2::12",
        "--anycast",
        &ANYCAST_V4.to_string(),
        "--anycast",
        &ANYCAST_V6.to_string(),
        "--serial",
        "2",
        "--out",
        &path(&dir, "ro-s2.cert"),
    ])?;
    // s3's certificate (serial 3) revoked.
    route_opt::pki(&[
        "revoke",
        "--operator-key",
        &path(&dir, "operator.key"),
        "--serial",
        "3",
        "--out",
        &path(&dir, "revoked.crl"),
    ])?;
    let service = |name: &str, address: String, protocol: &str, port: u16| {
        serde_json::json!({"name": name, "address": address, "protocol": protocol,
            "port": port, "servers": []})
    };
    topo.config_extra = serde_json::json!({"services": [
        service("web4", ANYCAST_V4.to_string(), "tcp", HTTP_PORT),
        service("web6", ANYCAST_V6.to_string(), "tcp", HTTP_PORT),
        service("udp4", ANYCAST_V4.to_string(), "udp", 0),
        service("udp6", ANYCAST_V6.to_string(), "udp", 0),
    ]});
    topo.registration_extra = serde_json::json!({
        "servers": [],
        "certificates": {
            "trust": ["operator.pub"],
            "revocations": "revoked.crl",
            "services": ["web4", "web6", "udp4", "udp6"],
        },
    });
    topo.server_ctl = Some(without_key_wrapper(&dir)?);
    topo.server_args = route_opt::server_args(&dir, 60);
    topo.start_agent(0)?;
    for i in 0..3 {
        topo.start_server(i)?;
    }

    // 1. s1 registers (both families, a binding per real address) and serves everything.
    wait_until("s1's bindings", Duration::from_secs(20), || {
        Ok(topo.active_servers()?.contains("s1")
            && topo.bindings()?["bindings"]
                .as_array()
                .is_some_and(|b| b.iter().filter(|x| x["server"] == "s1").count() >= 2))
    })?;
    // 2. The forged and the revoked certificates are refused and counted.
    wait_until("s2 and s3 refused", Duration::from_secs(20), || {
        Ok(counter(&topo, "refused_certificate_untrusted")? >= 1
            && counter(&topo, "refused_certificate_revoked")? >= 1)
    })?;
    let counts = served(&topo, 10)?;
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["s1"],
        "every connection and datagram answered by s1: {counts:?}"
    );
    assert_eq!(counts["s1"], 2 * 2 * 2 * 10);
    assert_eq!(
        topo.active_servers()?.into_iter().collect::<Vec<_>>(),
        ["s1"]
    );
    for s in ["s2", "s3"] {
        assert_eq!(
            route_opt::agent_packets(&topo, Some(s))?,
            0,
            "{s} got traffic"
        );
    }
    assert!(route_opt::agent_packets(&topo, Some("s1"))? > 0);
    eprintln!(
        "agent counters: {}",
        serde_json::to_string(&topo.bindings()?["counters"])?
    );

    // 3. A flood of forged certificate-signed updates, bounded in count and time.
    const FLOOD: u32 = 20_000;
    let payload = forged_update(&dir)?;
    let (untrusted, dropped, refreshed) = (
        counter(&topo, "refused_certificate_untrusted")?,
        counter(&topo, "dropped_certificate_rate_limited")?,
        counter(&topo, "refreshed")?,
    );
    let took = topo.servers[1].ns.in_ns(move || {
        let sock = std::net::UdpSocket::bind("10.71.2.12:0")?;
        let start = std::time::Instant::now();
        for _ in 0..FLOOD {
            if start.elapsed() > Duration::from_secs(10) {
                break;
            }
            // A full send buffer is not an error worth stopping for.
            let _ = sock.send_to(&payload, "10.71.1.2:4191");
        }
        Ok(start.elapsed())
    })?;
    // Served during the flood's aftermath: the agent works through its receive queue.
    let counts = served(&topo, 5)?;
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["s1"],
        "{counts:?}"
    );
    // Handled when the counters stop moving (the kernel may drop some of the flood when
    // the socket's buffer is full: those are not the agent's to count).
    let mut last = u64::MAX;
    wait_until("the flood handled", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        let handled = counter(&topo, "refused_certificate_untrusted")?
            + counter(&topo, "dropped_certificate_rate_limited")?;
        let settled = handled == last;
        last = handled;
        Ok(settled)
    })?;
    let checked = counter(&topo, "refused_certificate_untrusted")? - untrusted;
    let flood_dropped = counter(&topo, "dropped_certificate_rate_limited")? - dropped;
    eprintln!(
        "flood of {FLOOD} forged updates sent in {took:?}: {checked} checked, {flood_dropped} \
         dropped unchecked"
    );
    // The budget: a burst of 400, then 200 a second (generously, over 20 s).
    assert!(checked <= 400 + 200 * 20, "{checked} signature checks");
    assert!(flood_dropped > 0);
    wait_until(
        "s1 refreshed after the flood",
        Duration::from_secs(2 * LIFETIME),
        || Ok(counter(&topo, "refreshed")? > refreshed),
    )?;
    assert_eq!(
        topo.active_servers()?.into_iter().collect::<Vec<_>>(),
        ["s1"]
    );
    assert_eq!(
        counter(&topo, "probes_missed")?,
        0,
        "every refresh-request probe of s1 answered through the flood"
    );

    // 4. s1 revoked too: a reload re-reads the list and ends its binding at once.
    route_opt::pki(&[
        "revoke",
        "--operator-key",
        &path(&dir, "operator.key"),
        "--list",
        &path(&dir, "revoked.crl"),
        "--serial",
        "1",
        "--out",
        &path(&dir, "revoked.crl"),
    ])?;
    let revoked_before = counter(&topo, "refused_certificate_revoked")?;
    topo.ctl(&["reload"])?;
    wait_until("s1's bindings ended", Duration::from_secs(5), || {
        Ok(topo.active_servers()?.is_empty())
    })?;
    // Its next update (a refresh at half its lifetime) is refused as revoked.
    wait_until(
        "s1 refused as revoked",
        Duration::from_secs(3 * LIFETIME),
        || {
            Ok(
                counter(&topo, "refused_certificate_revoked")? > revoked_before
                    && topo.active_servers()?.is_empty(),
            )
        },
    )?;
    let c = &topo.clients[0];
    let answered = c.in_ns(|| {
        Ok(anycast_tests::topology::http_get_within(
            Topology::anycast(false, HTTP_PORT),
            Duration::from_secs(2),
        )
        .is_ok())
    })?;
    assert!(
        !answered,
        "nothing serves once every certificate is revoked"
    );
    Ok(())
}
