use super::*;

fn good() -> String {
    r#"{
          "interfaces": ["eth0"],
          "agent_address": {"v4": "10.0.0.1", "v6": "fd00::1"},
          "services": [
            {"name": "web", "address": "192.0.2.10", "protocol": "tcp", "port": 80,
             "servers": [{"name": "a", "address": "10.0.2.11"}, {"name": "b", "address": "fd00:2::12", "weight": 3}]},
            {"name": "dns", "address": "2001:db8::53", "protocol": "udp", "port": 0,
             "servers": [{"name": "a", "address": "10.0.2.11"}]}
          ]
        }"#
        .to_string()
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(&good()).unwrap();
    assert_eq!(c.ring_size, 65537);
    assert_eq!(c.xdp_mode, XdpModeName::Native);
    assert_eq!(c.services[0].servers[0].weight, 1);
    assert_eq!(c.services[1].port, 0);
    assert!(
        c.answer_ping,
        "ping of the anycast addresses is answered by default"
    );
    assert!(
        c.forward_icmp_errors,
        "ICMP errors reach the servers by default"
    );
    let off = good().replace(
        "\"interfaces\"",
        "\"answer_ping\": false, \"forward_icmp_errors\": false, \"interfaces\"",
    );
    let c = Config::parse(&off).unwrap();
    assert!(!c.answer_ping && !c.forward_icmp_errors);
}

fn field_of(text: &str) -> String {
    Config::parse(text).unwrap_err().field
}

#[test]
fn registration_errors_name_the_field() {
    let base = good().replace(
            "\"services\": [",
            r#""registration": {"servers": [{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.10/32"], "real": ["198.51.100.0/24"]}]},
            "services": ["#,
        );
    assert!(Config::parse(&base).is_ok(), "{:?}", Config::parse(&base));
    let case = |from: &str, to: &str| field_of(&base.replace(from, to));
    assert_eq!(case("\"spi\": 1,", "\"spi\": 1, \"extra\": 2,"), "config");
    assert_eq!(
        case("[\"192.0.2.10/32\"]", "[]"),
        "registration.servers[0].allow"
    );
    assert_eq!(case("[\"192.0.2.10/32\"]", "[\"192.0.2.10/33\"]"), "config");
    assert_eq!(
        case("[\"198.51.100.0/24\"]", "[]"),
        "registration.servers[0].real"
    );
    // `real` is required: which addresses an identity owns is never guessed.
    assert_eq!(case(", \"real\": [\"198.51.100.0/24\"]", ""), "config");
    assert_eq!(
        case("\"registration\": {", "\"registration\": {\"port\": 0, "),
        "registration.port"
    );
    for bytes in [0, 65_535, (1 << 30) + 1] {
        assert_eq!(
            case(
                "\"registration\": {",
                &format!("\"registration\": {{\"limits\": {{\"socket_buffer_bytes\": {bytes}}}, ")
            ),
            "registration.limits.socket_buffer_bytes"
        );
    }
    assert_eq!(
        case(
            "\"registration\": {",
            "\"registration\": {\"max_lifetime\": 1, "
        ),
        "registration.max_lifetime"
    );
    assert_eq!(
            case("\"registration\": {", "\"registration\": {\"probe\": {\"interval_ms\": 100, \"timeout_ms\": 100, \"misses\": 1}, "),
            "registration.probe"
        );
    assert_eq!(
        case(
            "\"registration\": {",
            "\"registration\": {\"reverse_tunnel\": {\"suspect_after_ms\": 20}, "
        ),
        "registration.reverse_tunnel.suspect_after_ms"
    );
    assert_eq!(
        case(
            "\"registration\": {",
            "\"registration\": {\"probe\": null, \"reverse_tunnel\": {}, "
        ),
        "registration.reverse_tunnel"
    );
    assert_eq!(
        case(
            "\"registration\": {",
            "\"registration\": {\"reverse_tunnel\": {\"after\": 1}, "
        ),
        "config"
    );
    let on = Config::parse(&base.replace(
        "\"registration\": {",
        "\"registration\": {\"reverse_tunnel\": {}, ",
    ))
    .unwrap();
    assert_eq!(
        on.registration.unwrap().reverse_tunnel,
        Some(ReverseTunnel {
            suspect_after_ms: DEFAULT_SUSPECT_AFTER_MS
        }),
        "an empty object turns monitoring on with the default window"
    );
    assert_eq!(
        case(
            "\"registration\": {",
            "\"registration\": {\"limits\": {\"bindings_per_server\": 0}, "
        ),
        "registration.limits.bindings_per_server"
    );
    assert_eq!(
        case(
            r#""allow": ["192.0.2.10/32"], "real": ["198.51.100.0/24"]}]"#,
            r#""allow": ["192.0.2.10/32"], "real": ["198.51.100.0/24"]}, {"id": "s1", "spi": 2, "key_file": "k", "allow": ["192.0.2.10"], "real": ["198.51.100.0/24"]}]"#
        ),
        "registration.servers[1].id"
    );
    let checks = base.replace("\"services\": [", r#""health_checks": [{"type": "tcp", "interval_ms": 100, "timeout_ms": 200}], "services": ["#);
    assert_eq!(field_of(&checks), "health_checks[0].timeout_ms");
}

#[test]
fn a_service_can_have_its_own_health_checks() {
    let text = good()
        .replace(
            "\"services\": [",
            r#""health_checks": [{"type": "icmp"}], "services": ["#,
        )
        .replace(
            "\"port\": 80,",
            r#""port": 80, "health_checks": [{"type": "tcp"}, {"type": "http", "path": "/"}],"#,
        );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.all_checks().len(), 3);
    let web = c.checks_of("192.0.2.10".parse().unwrap(), 6, 80);
    assert_eq!(web, vec![1, 2], "the web service's own checks");
    let dns = c.checks_of("2001:db8::53".parse().unwrap(), 17, 0);
    assert_eq!(dns, vec![0], "the top-level checks");
    assert_eq!(
        c.checks_of("198.51.100.1".parse().unwrap(), 6, 80),
        vec![0],
        "a registered service"
    );
    // A TCP check without a port on an every-port service is refused.
    let bad = text.replace(
        "\"port\": 0,",
        r#""port": 0, "health_checks": [{"type": "tcp"}],"#,
    );
    assert_eq!(field_of(&bad), "services[1].health_checks[0].port");
}

#[test]
fn errors_name_the_field() {
    let g = good();
    assert_eq!(
        field_of(&g.replace("10.0.2.11\"}, {", "10.0.2.x\"}, {")),
        "config"
    );
    assert!(
        Config::parse(&g.replace("10.0.2.11\"}, {", "10.0.2.x\"}, {"))
            .unwrap_err()
            .reason
            .contains("invalid IP address")
    );
    assert_eq!(
        field_of(&g.replace("\"eth0\"", "\"eth0\", \"eth0\"")),
        "interfaces[1]"
    );
    assert_eq!(
        field_of(&g.replace("\"dns\"", "\"web\"")),
        "services[1].name"
    );
    assert_eq!(
        field_of(&g.replace("\"weight\": 3", "\"weight\": 3000000")),
        "services[0].servers[1].weight"
    );
    assert_eq!(
        field_of(&g.replace(", \"v6\": \"fd00::1\"", "")),
        "services[0].servers[1].address"
    );
    assert_eq!(
        field_of(&g.replace("\"v4\": \"10.0.0.1\"", "\"v4\": \"fd00::2\"")),
        "agent_address.v4"
    );
    assert_eq!(
        field_of(&g.replace("\"port\": 80", "\"port\": 80, \"ring_size\": 1")),
        "config"
    );
    assert_eq!(
        field_of(&g.replace("\"interfaces\"", "\"ring_size\": 65536, \"interfaces\"")),
        "ring_size"
    );
    assert_eq!(
        field_of(&g.replace("\"name\": \"b\"", "\"name\": \"a\"")),
        "services[0].servers[1].name"
    );
    assert_eq!(
        field_of(&g.replace("fd00:2::12", "10.0.2.11")),
        "services[0].servers[1].address"
    );
    assert_eq!(
        field_of(&g.replace("\"port\": 80", "\"port\": 70000")),
        "config"
    );
    assert_eq!(
        field_of(&g.replace("\"protocol\": \"tcp\"", "\"protocol\": \"sctp\"")),
        "config"
    );
    assert_eq!(field_of(&g.replace("[\"eth0\"]", "[]")), "interfaces");
    assert_eq!(
        field_of(&g.replace("2001:db8::53", "192.0.2.10\", \"x\": \"")),
        "config"
    );
    assert_eq!(
        field_of(&g.replace("\"interfaces\"", "\"max_services\": 1, \"interfaces\"")),
        "services"
    );
    assert_eq!(
        field_of(&g.replace(
            "\"interfaces\"",
            "\"max_services\": 70000, \"ring_size\": 7, \"interfaces\""
        )),
        "max_services"
    );
}

/// A configuration with registration; `allow` and `extra` are spliced in.
/// A configuration with these registered servers; each gets a `real` prefix of its own
/// unless the test gives one.
fn with_registration(servers: &str) -> String {
    let servers = if servers.contains("\"real\"") {
        servers.to_string()
    } else {
        servers.replace("\"spi\":", "\"real\": [\"203.0.113.0/24\"], \"spi\":")
    };
    good().replace(
        "\"services\": [",
        &format!(r#""registration": {{"servers": [{servers}]}}, "services": ["#),
    )
}

fn refusal(text: &str) -> ConfigError {
    Config::parse(text).unwrap_err()
}

#[test]
fn host_bits_are_refused_with_the_prefix_to_write() {
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.10/32", "198.51.100.7/24"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[0].allow[1]");
    assert!(e.reason.contains("write 198.51.100.0/24"), "{e}");
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["2001:db8::1/64"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[0].allow[0]");
    assert!(e.reason.contains("write 2001:db8::/64"), "{e}");
    let e = refusal(&good().replace(
        "\"services\": [",
        r#""preferences": [{"clients": ["10.1.2.3/16"], "servers": ["a"]}], "services": ["#,
    ));
    assert_eq!(e.field, "preferences[0].clients[0]");
    // Without host bits, and single addresses, are fine.
    assert!(Config::parse(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["198.51.100.0/24", "192.0.2.10", "2001:db8:1::/48"]}"#
    ))
    .is_ok());
    let p: Prefix = "10.1.2.3/0".parse().unwrap();
    assert_eq!(p.without_host_bits().unwrap().to_string(), "0.0.0.0/0");
    let p: Prefix = "::1/0".parse().unwrap();
    assert_eq!(p.without_host_bits().unwrap().to_string(), "::/0");
}

#[test]
fn the_agents_own_address_is_neither_a_service_nor_a_real_address() {
    let e = refusal(&good().replace("192.0.2.10", "10.0.0.1"));
    assert_eq!(e.field, "services[0].address");
    assert!(
        e.reason.contains("agent's own address (agent_address.v4)"),
        "{e}"
    );
    let e = refusal(&good().replace("2001:db8::53", "fd00::1"));
    assert_eq!(e.field, "services[1].address");
    let e = refusal(&good().replace("fd00:2::12", "fd00::1"));
    assert_eq!(e.field, "services[0].servers[1].address");
    // An allow list holding the agent's address would let a member bind it.
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["10.0.0.0/24"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[0].allow[0]");
    assert!(e.reason.contains("agent's own address 10.0.0.1"), "{e}");
}

#[test]
fn a_real_address_must_not_be_an_anycast_address() {
    // A static server on another service's address.
    let e = refusal(&good().replace(
        "\"address\": \"10.0.2.11\"}, {",
        "\"address\": \"2001:db8::53\"}, {",
    ));
    assert_eq!(e.field, "services[0].servers[0].address");
    assert!(e.reason.contains("is an anycast address"), "{e}");
    // A static server on an address a registered server may bind.
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["10.0.2.0/24"]}"#,
    ));
    assert_eq!(e.field, "services[0].servers[0].address");
    // A registered server's real prefix holding a service's address, an address another
    // identity may bind, or the agent's own address.
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["198.51.100.7"], "real": ["203.0.113.0/24", "192.0.2.0/24"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[0].real[1]");
    assert!(e.reason.contains("anycast address 192.0.2.10"), "{e}");
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["198.51.100.7"], "real": ["203.0.113.0/24"]}, {"id": "s2", "spi": 2, "key_file": "k2", "allow": ["192.0.2.10"], "real": ["198.51.100.0/24"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[1].real[0]");
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["198.51.100.7"], "real": ["10.0.0.0/30"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[0].real[0]");
    assert!(e.reason.contains("agent's own address 10.0.0.1"), "{e}");
}

#[test]
fn two_identities_must_not_share_an_spi() {
    let e = refusal(&with_registration(
        r#"{"id": "s1", "spi": 7, "key_file": "k1", "allow": ["192.0.2.10"]},
           {"id": "s2", "spi": 7, "key_file": "k2", "allow": ["192.0.2.10"]}"#,
    ));
    assert_eq!(e.field, "registration.servers[1].spi");
    assert!(e.reason.contains("already the SPI of 's1'"), "{e}");
}

#[test]
fn allow_lists_of_everything_are_refused_and_wide_ones_warned_about() {
    for all in ["0.0.0.0/0", "::/0"] {
        let e = refusal(&with_registration(&format!(
            r#"{{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.10", "{all}"]}}"#
        )));
        assert_eq!(e.field, "registration.servers[0].allow[1]");
        assert!(e.reason.contains("allows every address"), "{e}");
    }
    let c = Config::parse(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.0/24", "198.0.0.0/8", "2001:db8::/32", "2001:db8:1::/48"]}"#,
    ))
    .unwrap();
    let w = c.warnings();
    let fields: Vec<_> = w.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "registration.servers[0].allow[1]",
            "registration.servers[0].allow[2]"
        ]
    );
    assert!(
        w[0].reason
            .contains("wider than /24 (registration.widest_allow_v4)"),
        "{}",
        w[0]
    );
    assert!(
        w[1].reason
            .contains("wider than /48 (registration.widest_allow_v6)"),
        "{}",
        w[1]
    );
    // The bound is configurable.
    let c = Config::parse(
        &with_registration(
            r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.0/24", "198.0.0.0/8"]}"#,
        )
        .replace(
            "\"registration\": {",
            "\"registration\": {\"widest_allow_v4\": 32, ",
        ),
    )
    .unwrap();
    assert_eq!(c.warnings().len(), 2);
    let e = refusal(
        &with_registration(r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.10"]}"#)
            .replace(
                "\"registration\": {",
                "\"registration\": {\"widest_allow_v6\": 0, ",
            ),
    );
    assert_eq!(e.field, "registration.widest_allow_v6");
    assert!(Config::parse(&good()).unwrap().warnings().is_empty());
}

#[test]
fn control_groups_resolve_or_name_the_field() {
    let c = Config::parse(&good().replace(
        "\"services\": [",
        r#""control": {"group": "root", "admin_group": "4242"}, "services": ["#,
    ))
    .unwrap();
    assert_eq!(
        c.control_access().unwrap(),
        ControlAccess {
            group: Some(0),
            admin_group: Some(4242)
        }
    );
    let c = Config::parse(&good().replace(
        "\"services\": [",
        r#""control": {"admin_group": "no-such-group-anycast"}, "services": ["#,
    ))
    .unwrap();
    assert_eq!(c.control_access().unwrap_err().field, "control.admin_group");
    assert_eq!(
        field_of(&good().replace(
            "\"services\": [",
            r#""control": {"groups": "x"}, "services": ["#
        )),
        "config"
    );
}

/// Key files as `check` and the agent read them: missing, empty, short, non-hex, shared and
/// unprotected keys name their field.
#[test]
fn key_files_are_checked_naming_the_field() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("anycast-config-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("good1.key", "00112233445566778899aabbccddeeff", 0o600);
    write("good2.key", "ffeeddccbbaa99887766554433221100", 0o600);
    write("same.key", "0011223344556677 8899aabbccddeeff\n", 0o600);
    write("empty.key", "", 0o600);
    write("short.key", "0011", 0o600);
    write("nothex.key", "zz112233445566778899aabbccddeeff", 0o600);
    write("open.key", "ffeeddccbbaa99887766554433221100", 0o644);
    let config = |second: &str| {
        Config::parse(&with_registration(&format!(
            r#"{{"id": "s1", "spi": 1, "key_file": "good1.key", "allow": ["192.0.2.10"]}},
               {{"id": "s2", "spi": 2, "key_file": "{second}", "allow": ["192.0.2.10"]}}"#
        )))
        .unwrap()
    };
    let path = dir.join("agent.json");
    assert_eq!(config("good2.key").load_keys(&path).unwrap().len(), 2);
    for (file, why) in [
        ("missing.key", "missing.key"),
        ("empty.key", "empty"),
        ("short.key", "2 bytes"),
        ("nothex.key", "not hex"),
        ("same.key", "same key as 's1'"),
        (
            "open.key",
            "is mode 0644: readable by group, readable by others; run chmod 600",
        ),
    ] {
        let e = config(file).load_keys(&path).unwrap_err();
        assert_eq!(e.field, "registration.servers[1].key_file", "{file}");
        assert!(e.reason.contains(why), "{file}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn routing_defaults_and_errors_name_the_field() {
    let base = good().replace(
        "\"services\": [",
        r#""routing": {"local_as": 65001, "neighbors": [{"address": "10.0.1.1", "as": 65000}, {"address": "fd00:1::1", "as": 65000}]},
            "services": ["#,
    );
    let c = Config::parse(&base).unwrap();
    let r = c.routing.as_ref().unwrap();
    assert_eq!(
        r.bfd,
        Bfd {
            interval_ms: 100,
            multiplier: 3
        }
    );
    assert_eq!(r.bird_socket, Path::new("/run/bird/bird.ctl"));
    assert_eq!(
        r.bird_include,
        Path::new("/etc/bird/anycast.d/anycast.conf")
    );
    assert_eq!(r.liveness_device, "aclive0");
    assert_eq!(r.on_handoff, OnHandoff::Withdraw);
    assert_eq!(r.withdraw_grace_ms, 500);
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let case = |from: &str, to: &str| field_of(&base.replace(from, to));
    assert_eq!(
        case("\"local_as\": 65001", "\"local_as\": 0"),
        "routing.local_as"
    );
    assert_eq!(
        case("\"local_as\": 65001", "\"local_as\": 65001, \"bogus\": 1"),
        "config"
    );
    assert_eq!(
        case(
            r#"[{"address": "10.0.1.1", "as": 65000}, {"address": "fd00:1::1", "as": 65000}]"#,
            "[]"
        ),
        "routing.neighbors"
    );
    for (from, to, field) in [
        (
            "\"10.0.1.1\"",
            "\"0.0.0.0\"",
            "routing.neighbors[0].address",
        ),
        (
            "\"10.0.1.1\"",
            "\"10.0.0.1\"",
            "routing.neighbors[0].address",
        ),
        (
            "\"10.0.1.1\"",
            "\"192.0.2.10\"",
            "routing.neighbors[0].address",
        ),
        (
            "\"fd00:1::1\"",
            "\"fe80::1\"",
            "routing.neighbors[1].address",
        ),
        (
            "\"fd00:1::1\"",
            "\"10.0.1.1\"",
            "routing.neighbors[1].address",
        ),
        (
            "\"as\": 65000}, {",
            "\"as\": 0}, {",
            "routing.neighbors[0].as",
        ),
    ] {
        assert_eq!(case(from, to), field, "{from} -> {to}");
    }
    let with = |extra: &str| {
        field_of(&base.replace(
            "\"local_as\": 65001",
            &format!("\"local_as\": 65001, {extra}"),
        ))
    };
    assert_eq!(
        with(r#""bfd": {"interval_ms": 5}"#),
        "routing.bfd.interval_ms"
    );
    assert_eq!(
        with(r#""bfd": {"multiplier": 0}"#),
        "routing.bfd.multiplier"
    );
    assert_eq!(with(r#""bird_socket": "bird.ctl""#), "routing.bird_socket");
    assert_eq!(with(r#""bird_include": "x.conf""#), "routing.bird_include");
    assert_eq!(
        with(r#""liveness_device": "eth0""#),
        "routing.liveness_device"
    );
    assert_eq!(
        with(r#""liveness_device": "a-name-far-too-long""#),
        "routing.liveness_device"
    );
    assert_eq!(with(r#""on_handoff": "maybe""#), "config");
    assert_eq!(with(r#""poll_ms": 10"#), "routing.poll_ms");
    assert_eq!(
        with(r#""withdraw_grace_ms": 60001"#),
        "routing.withdraw_grace_ms"
    );
    let keep = base.replace(
        "\"local_as\": 65001",
        "\"local_as\": 65001, \"on_handoff\": \"keep\"",
    );
    assert_eq!(
        Config::parse(&keep).unwrap().routing.unwrap().on_handoff,
        OnHandoff::Keep
    );
    // No IPv6 neighbour while an IPv6 anycast address is served: warned, not refused.
    let v4_only = base.replace(r#", {"address": "fd00:1::1", "as": 65000}"#, "");
    let w = Config::parse(&v4_only).unwrap().warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].field, "routing.neighbors");
    assert!(w[0].reason.contains("IPv6"), "{}", w[0].reason);
}

#[test]
fn relay_errors_name_the_field_and_peer_keys_follow_the_key_rules() {
    use std::os::unix::fs::PermissionsExt as _;
    let base = good().replace(
            "\"services\": [",
            r#""registration": {"servers": [{"id": "s1", "spi": 1, "key_file": "s1.key", "allow": ["192.0.2.10/32"], "real": ["198.51.100.0/24"]}],
              "relay": {"id": "a", "peers": [{"id": "b", "address": "10.0.0.2", "key_file": "ab.key"}]}},
            "services": ["#,
        );
    let c = Config::parse(&base).unwrap();
    let relay = c.registration.as_ref().unwrap().relay.as_ref().unwrap();
    assert_eq!((relay.port, relay.digest_interval_ms), (4192, 1000));
    assert_eq!(
        relay.peers[0].registration_addresses(),
        vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
    );
    let case = |from: &str, to: &str| field_of(&base.replace(from, to));
    assert_eq!(
        case("\"id\": \"a\"", "\"id\": \"\""),
        "registration.relay.id"
    );
    assert_eq!(
        case("\"id\": \"a\"", "\"id\": \"a\", \"port\": 4191"),
        "registration.relay.port"
    );
    assert_eq!(
        case("\"id\": \"b\"", "\"id\": \"a\""),
        "registration.relay.peers[0].id"
    );
    assert_eq!(
        case("\"10.0.0.2\"", "\"10.0.0.1\""),
        "registration.relay.peers[0].address"
    );
    assert_eq!(
        case(
            "\"key_file\": \"ab.key\"}",
            "\"key_file\": \"ab.key\"}, {\"id\": \"c\", \"address\": \"10.0.0.2\", \"key_file\": \"ac.key\"}"
        ),
        "registration.relay.peers[1].address"
    );
    assert_eq!(
        case("\"peers\": [{", "\"peers\": [], \"x\": [{"),
        "config",
        "unknown fields are refused"
    );
    // Keys: read as servers' keys are, none shared with a server or another peer.
    let dir = std::env::temp_dir().join(format!("anycast-relay-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("s1.key", "00112233445566778899aabbccddeeff", 0o600);
    write("ab.key", "ffeeddccbbaa99887766554433221100", 0o600);
    write("open.key", "ffeeddccbbaa99887766554433221101", 0o644);
    write("same.key", "00112233445566778899aabbccddeeff", 0o600);
    let path = dir.join("agent.json");
    assert_eq!(c.load_relay_keys(&path).unwrap().len(), 1);
    for (file, why) in [
        ("open.key", "is mode 0644"),
        ("same.key", "same key as server 's1'"),
        ("missing.key", "missing.key"),
    ] {
        let c = Config::parse(&base.replace("ab.key", file)).unwrap();
        let e = c.load_relay_keys(&path).unwrap_err();
        assert_eq!(e.field, "registration.relay.peers[0].key_file", "{file}");
        assert!(e.reason.contains(why), "{file}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn discovery_address_errors_name_the_field() {
    let base = good().replace(
        "\"services\": [",
        r#""registration": {"servers": [{"id": "s1", "spi": 1, "key_file": "s1.key", "allow": ["192.0.2.10/32"], "real": ["198.51.100.0/24"]}],
          "discovery_address": {"v4": "10.9.9.9", "v6": "fd09::9"}},
        "services": ["#,
    );
    let c = Config::parse(&base).unwrap();
    let d = c.registration.as_ref().unwrap().discovery_address.clone();
    assert_eq!(d.unwrap().v4, Some("10.9.9.9".parse().unwrap()));
    // Absent by default.
    let plain = Config::parse(&with_registration(
        r#"{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.10/32"]}"#,
    ))
    .unwrap();
    assert!(plain.registration.unwrap().discovery_address.is_none());
    let case = |from: &str, to: &str| refusal(&base.replace(from, to));
    for (from, to, field) in [
        (
            r#"{"v4": "10.9.9.9", "v6": "fd09::9"}"#,
            "{}",
            "registration.discovery_address",
        ),
        (
            "\"10.9.9.9\"",
            "\"fd09::8\"",
            "registration.discovery_address.v4",
        ),
        (
            "\"fd09::9\"",
            "\"10.9.9.8\"",
            "registration.discovery_address.v6",
        ),
        (
            "\"10.9.9.9\"",
            "\"224.0.0.9\"",
            "registration.discovery_address.v4",
        ),
        (
            "\"fd09::9\"",
            "\"::1\"",
            "registration.discovery_address.v6",
        ),
        (
            "\"10.9.9.9\"",
            "\"10.0.0.1\"",
            "registration.discovery_address.v4",
        ),
        // Shared by every agent, it is an agent address: never a service, an allowed
        // anycast address or a real address.
        (
            "\"192.0.2.10\", \"protocol\"",
            "\"10.9.9.9\", \"protocol\"",
            "services[0].address",
        ),
        (
            "\"192.0.2.10/32\"",
            "\"10.9.9.0/24\"",
            "registration.servers[0].allow[0]",
        ),
        (
            "\"198.51.100.0/24\"",
            "\"10.9.9.0/24\"",
            "registration.servers[0].real[0]",
        ),
    ] {
        let e = case(from, to);
        assert_eq!(e.field, field, "{from} -> {to}: {e}");
    }
    let e = case("\"192.0.2.10/32\"", "\"10.9.9.0/24\"");
    assert!(
        e.reason.contains("registration.discovery_address.v4"),
        "{e}"
    );
    // At most 15 peers: the reply lists 16 agents.
    let peers: Vec<String> = (0..16)
        .map(|i| {
            format!(
                r#"{{"id": "p{i}", "address": "10.0.1.{}", "key_file": "p{i}.key"}}"#,
                i + 1
            )
        })
        .collect();
    let many = base.replace(
        "\"discovery_address\"",
        &format!(
            r#""relay": {{"id": "a", "peers": [{}]}}, "discovery_address""#,
            peers.join(", ")
        ),
    );
    assert_eq!(refusal(&many).field, "registration.discovery_address");
    let fifteen = base.replace(
        "\"discovery_address\"",
        &format!(
            r#""relay": {{"id": "a", "peers": [{}]}}, "discovery_address""#,
            peers[..15].join(", ")
        ),
    );
    assert!(
        Config::parse(&fifteen).is_ok(),
        "{:?}",
        Config::parse(&fifteen).err()
    );
}
