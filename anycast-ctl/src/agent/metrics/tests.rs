use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use super::{snapshot::classify, snapshot::RegistrationCounter, *};
use crate::{
    control_socket::HealthStatus,
    model::Condition,
    registration::agent::BindingState,
    routing::{BfdSession, PrefixStatus, ProtocolStatus, RoutingStatus},
};

fn full_snapshot() -> Snapshot {
    let mut status = crate::top::tests::status((10, 1000, 2), (5, 500, 1), 15);
    status.health.push(HealthStatus {
        server: "s1".into(),
        real: "10.0.0.1".parse().unwrap(),
        port: 80,
        check: "tcp".into(),
        health: Condition::Up,
        detail: "connected".into(),
    });
    status.routing = Some(RoutingStatus {
        bird: "connected (BIRD 2.0.12)".into(),
        prefixes: vec![PrefixStatus {
            prefix: "10.9.0.1/32".into(),
            state: "announced".into(),
            why: "s1 up".into(),
        }],
        protocols: vec![ProtocolStatus {
            name: "anycast_bgp0".into(),
            proto: "BGP".into(),
            neighbor: Some("10.8.0.1".parse().unwrap()),
            state: "up".into(),
            info: "Established".into(),
        }],
        bfd_sessions: vec![BfdSession {
            address: "10.8.0.1".into(),
            interface: "eth0".into(),
            state: "Up".into(),
            interval: "0.100".into(),
            timeout: "0.300".into(),
        }],
        ..Default::default()
    });
    let mut s = Snapshot {
        status: Some(status),
        flow_capacity: 1000,
        ..Default::default()
    };
    s.bindings.insert((BindingState::Active, Condition::Up), 3);
    for (k, v) in [
        ("registered", 3),
        ("refreshed", 40),
        ("refused_146", 7),
        ("dropped_rate_limited", 2),
        ("relayed_registered", 1),
        ("expired", 1),
        ("probes_sent", 9),
        ("discovery_answered", 2),
    ] {
        s.registration.insert(k.into(), v);
    }
    s
}

fn encoded(publisher: &mut Publisher, registry: &prometheus_client::registry::Registry) -> String {
    publisher.publish(full_snapshot());
    publisher
        .live
        .check_done("tcp", true, Duration::from_millis(3));
    publisher.live.health_transition("tcp", "down");
    publisher.live.probes_done(
        &crate::registration::agent::ProbeOutcomes {
            round_trips: vec![Duration::from_millis(2)],
            answered_unkept: 4,
            missed: 1,
        },
        Duration::from_millis(500),
    );
    publisher.live.table_built(Duration::from_micros(300));
    publisher.live.table_published(Duration::from_micros(800));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
    out
}

#[test]
fn registration_counters_become_labelled_families() {
    let m = |message, via, result, reason: &str| RegistrationCounter::Message {
        message,
        via,
        result,
        reason: reason.into(),
    };
    assert_eq!(
        classify("registered"),
        m("binding_update", "direct", "accepted", "registered")
    );
    assert_eq!(
        classify("relayed_refreshed"),
        m("binding_update", "relayed", "accepted", "refreshed")
    );
    assert_eq!(
        classify("refused_146"),
        m("binding_update", "direct", "refused", "auth_failed")
    );
    assert_eq!(
        classify("refused_201"),
        m("binding_update", "direct", "refused", "status_201")
    );
    assert_eq!(
        classify("dropped_malformed_short"),
        m("binding_update", "direct", "dropped", "malformed_short")
    );
    assert_eq!(
        classify("discovery_refused_auth"),
        m("discovery_request", "direct", "refused", "auth")
    );
    assert_eq!(
        classify("expired"),
        RegistrationCounter::Transition {
            via: "direct",
            reason: "expired".into()
        }
    );
    assert_eq!(
        classify("probes_missed"),
        RegistrationCounter::Event("probes_missed".into())
    );
}

#[test]
fn the_text_has_every_family_with_conventional_names() {
    let (registry, mut publisher) = registry();
    let text = encoded(&mut publisher, &registry);
    for line in [
        "anycast_service_packets_total{service=\"web\"} 15",
        "anycast_service_bytes_total{service=\"web\"} 1500",
        "anycast_service_new_flows_total{service=\"web\"} 3",
        "anycast_server_packets_total{service=\"web\",server=\"s1\"} 10",
        "anycast_server_bytes_total{service=\"web\",server=\"s2\"} 500",
        "anycast_server_syns_total{service=\"web\",server=\"s1\"} 2",
        "anycast_server_new_flows_total{service=\"web\",server=\"s2\"} 1",
        "anycast_server_weight{service=\"web\",server=\"s1\"} 100",
        "anycast_server_up{service=\"web\",server=\"s1\"} 1",
        "anycast_service_info{service=\"web\",address=\"10.9.0.1\",protocol=\"tcp\",port=\"80\"} 1",
        "anycast_verdicts_total{reason=\"tx\"} 15",
        "anycast_flow_table_capacity 1000",
        "anycast_bindings{state=\"active\",condition=\"up\"} 3",
        "anycast_bindings{state=\"draining\",condition=\"down\"} 0",
        "anycast_registration_messages_total{message=\"binding_update\",via=\"direct\",result=\"refused\",reason=\"auth_failed\"} 7",
        "anycast_registration_messages_total{message=\"discovery_request\",via=\"direct\",result=\"accepted\",reason=\"answered\"} 2",
        "anycast_binding_transitions_total{via=\"direct\",reason=\"expired\"} 1",
        "anycast_binding_transitions_total{via=\"relayed\",reason=\"registered\"} 1",
        "anycast_registration_events_total{event=\"probes_sent\"} 9",
        "anycast_health_targets{method=\"tcp\",state=\"up\"} 1",
        "anycast_health_checks_total{method=\"tcp\",result=\"success\"} 1",
        "anycast_health_check_duration_seconds_bucket{method=\"tcp\",le=\"0.005\"} 1",
        "anycast_health_transitions_total{method=\"tcp\",to=\"down\"} 1",
        "anycast_health_checks_total{method=\"refresh_request\",result=\"success\"} 5",
        "anycast_health_checks_total{method=\"refresh_request\",result=\"failure\"} 1",
        "anycast_health_check_duration_seconds_count{method=\"refresh_request\"} 2",
        "anycast_table_build_duration_seconds_count 1",
        "anycast_table_publish_duration_seconds_bucket{le=\"0.001\"} 1",
        "anycast_bgp_prefix_announced{prefix=\"10.9.0.1/32\"} 1",
        "anycast_bgp_session_established{protocol=\"anycast_bgp0\",neighbor=\"10.8.0.1\"} 1",
        "anycast_bfd_session_up{address=\"10.8.0.1\",interface=\"eth0\"} 1",
        "anycast_bird_connected 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line}\n{text}"
        );
    }
    // Counters end in _total, durations in _seconds, byte counts in _bytes_total; one TYPE
    // line per family.
    let mut seen = std::collections::BTreeSet::new();
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut w = l.split(' ').skip(2);
        let (name, kind) = (w.next().unwrap(), w.next().unwrap());
        assert!(seen.insert(name.to_string()), "{name} twice");
        assert!(name.starts_with("anycast_"), "{name}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        if name.contains("duration") || name.contains("_age") {
            assert!(name.ends_with("_seconds"), "{name}");
        }
    }
}

/// promtool (Debian `prometheus`) finds nothing to say about the text.
#[test]
fn promtool_accepts_the_text() {
    let (registry, mut publisher) = registry();
    let text = encoded(&mut publisher, &registry);
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus; `cargo xtask setup` does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{said}\n{text}"
    );
}

fn endpoint() -> (SocketAddr, Publisher) {
    let (registry, mut publisher) = registry();
    publisher.publish(full_snapshot());
    let addr = http::spawn(
        "127.0.0.1:0".parse().unwrap(),
        registry,
        publisher.live.clone(),
    )
    .unwrap();
    (addr, publisher)
}

/// Sends `request` on a new connection and reads until the server closes it.
fn ask(addr: SocketAddr, request: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn refused(publisher: &Publisher, reason: &str) -> u64 {
    publisher
        .live
        .refused
        .get_or_create(&ReasonLabels {
            reason: reason.into(),
        })
        .get()
}

/// Waits (at most 2 s) for `n` refusals for `reason`: a connection's end is counted after
/// the client has seen it.
fn wait_refused(publisher: &Publisher, reason: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while refused(publisher, reason) < n {
        assert!(
            Instant::now() < deadline,
            "{reason}: {} of {n}",
            refused(publisher, reason)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(refused(publisher, reason), n, "{reason}");
}

#[test]
fn the_endpoint_answers_get_and_refuses_the_rest() {
    let (addr, publisher) = endpoint();
    let ok = ask(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("content-type: text/plain; version=0.0.4"),
        "{ok}"
    );
    assert!(ok.contains("anycast_server_packets_total{service=\"web\",server=\"s1\"} 10"));
    let post = ask(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let other = ask(
        addr,
        b"GET /secrets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    // A head larger than the limit is answered 431 and the connection closed.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 3 * http::MAX_REQUEST_HEAD));
    big.extend_from_slice(b"\r\n\r\n");
    let answer = ask(addr, &big);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    wait_refused(&publisher, "too_large", 1);
    let garbage = ask(addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    wait_refused(&publisher, "malformed", 1);
}

/// Slow clients hold at most the connection limit, for at most the head timeout; beyond the
/// limit connections are closed at once; a scrape gets through once the slow ones are cut.
#[test]
fn the_endpoint_bounds_slow_and_surplus_clients() {
    let (addr, publisher) = endpoint();
    let started = Instant::now();
    let slow: Vec<TcpStream> = (0..http::MAX_CONNECTIONS)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    // Give the endpoint time to take them all.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        // Closed at once, nothing written.
        if matches!(c.read(&mut b), Ok(0)) && refused(&publisher, "connection_limit") > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "surplus connection not closed");
    }
    // The slow ones are cut at the head timeout; then a scrape is answered.
    let deadline = Instant::now() + http::HEAD_TIMEOUT + Duration::from_secs(5);
    loop {
        let ok = ask(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if ok.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape answered after the slow clients"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.elapsed() >= http::HEAD_TIMEOUT - Duration::from_millis(500));
    assert!(refused(&publisher, "timeout") >= 1, "slow heads counted");
    drop(slow);
}

#[test]
fn a_bad_listen_address_is_refused_with_the_field() {
    for bad in ["localhost:9464", "127.0.0.1", "127.0.0.1:0", "[::1]:http"] {
        let e = crate::config::MetricsConfig { listen: bad.into() }
            .address()
            .unwrap_err();
        assert_eq!(e.field, "metrics.listen", "{bad}");
        assert!(
            e.reason.contains(bad) || e.reason.contains("port 0"),
            "{}",
            e.reason
        );
    }
    assert!(crate::config::MetricsConfig {
        listen: "[::1]:9464".into()
    }
    .address()
    .is_ok());
}

/// The agent and `check` refuse a bad `metrics.listen` before anything starts, and warn
/// about one that listens everywhere.
#[test]
fn the_configuration_checks_metrics_listen() {
    let config = |listen: &str| {
        format!(
            r#"{{"interfaces": ["eth0"], "agent_address": {{"v4": "10.0.0.1"}},
                "metrics": {{"listen": "{listen}"}}}}"#
        )
    };
    let e = crate::config::Config::parse(&config("127.0.0.1:http")).unwrap_err();
    assert_eq!(e.field, "metrics.listen");
    let e = crate::config::Config::parse(
        r#"{"interfaces": ["eth0"], "agent_address": {"v4": "10.0.0.1"},
            "metrics": {"listen": "127.0.0.1:9464", "port": 1}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field"), "{e}");
    let ok = crate::config::Config::parse(&config("127.0.0.1:9464")).unwrap();
    assert!(ok.warnings().iter().all(|w| w.field != "metrics.listen"));
    let wide = crate::config::Config::parse(&config("0.0.0.0:9464")).unwrap();
    assert!(
        wide.warnings().iter().any(|w| w.field == "metrics.listen"),
        "{:?}",
        wide.warnings()
    );
}
