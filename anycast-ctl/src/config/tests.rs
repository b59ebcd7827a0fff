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
