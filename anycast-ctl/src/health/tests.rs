use std::net::{Ipv4Addr, Ipv6Addr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
    task::LocalSet,
};

use super::probes::icmp::*;
use super::*;

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

fn config(kind: CheckKind, interval_ms: u64, timeout_ms: u64, fall: u32, rise: u32) -> CheckConfig {
    CheckConfig {
        kind,
        interval_ms,
        timeout_ms,
        fall,
        rise,
    }
}

fn target(server: &str, real: IpAddr, port: u16, check: usize) -> Target {
    Target {
        server: server.into(),
        real,
        port,
        check,
    }
}

/// A checker running on the current LocalSet, and its transitions.
fn start(
    checks: Vec<CheckConfig>,
    targets: Vec<Target>,
) -> (
    Rc<RefCell<Checker>>,
    mpsc::UnboundedReceiver<Transition>,
    JoinHandle<()>,
) {
    let checker = Rc::new(RefCell::new(Checker::new(checks)));
    checker.borrow_mut().set_targets(targets);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = spawn(&checker, tx);
    (checker, rx, task)
}

/// The next transition of `target` within `within`, skipping the others' (kept in `seen`).
async fn next_of(
    rx: &mut mpsc::UnboundedReceiver<Transition>,
    target: &Target,
    within: Duration,
    seen: &mut Vec<Transition>,
) -> Option<Transition> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let t = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if &t.target == target {
            return Some(t);
        }
        seen.push(t);
    }
}

/// Polls `done` until it holds or `within` passes; whether it held.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn detail_of(checker: &Rc<RefCell<Checker>>, t: &Target) -> String {
    let report = checker.borrow().report();
    let (_, _, detail) = report.into_iter().find(|(x, _, _)| x == t).unwrap();
    detail
}

/// Accepts and drops connections until aborted.
fn serve_tcp(listener: TcpListener) -> JoinHandle<()> {
    tokio::task::spawn_local(async move {
        loop {
            let _ = listener.accept().await;
        }
    })
}

#[test]
fn state_machine_fall_rise_suspect() {
    let mut t = Tracker::default();
    assert_eq!(t.health, Condition::Up);
    assert_eq!(t.observe(true, 3, 2), None);
    // Up -1 failure-> Suspect, then a success brings it back.
    assert_eq!(
        t.observe(false, 3, 2),
        Some((Condition::Up, Condition::Suspect))
    );
    assert_eq!(
        t.observe(true, 3, 2),
        Some((Condition::Suspect, Condition::Up))
    );
    // fall failures in a row: Suspect, Suspect (no transition), Down.
    assert_eq!(
        t.observe(false, 3, 2),
        Some((Condition::Up, Condition::Suspect))
    );
    assert_eq!(t.observe(false, 3, 2), None);
    assert_eq!(t.health, Condition::Suspect);
    assert_eq!(
        t.observe(false, 3, 2),
        Some((Condition::Suspect, Condition::Down))
    );
    assert_eq!(t.observe(false, 3, 2), None);
    // rise successes in a row; a failure in between restarts the count.
    assert_eq!(t.observe(true, 3, 2), None);
    assert_eq!(t.observe(false, 3, 2), None);
    assert_eq!(t.observe(true, 3, 2), None);
    assert_eq!(t.health, Condition::Down);
    assert_eq!(
        t.observe(true, 3, 2),
        Some((Condition::Down, Condition::Up))
    );
    // Failures before the success do not count towards the next fall.
    assert_eq!(
        t.observe(false, 3, 2),
        Some((Condition::Up, Condition::Suspect))
    );
    assert_eq!(t.observe(false, 3, 2), None);
    assert_eq!(
        t.observe(true, 3, 2),
        Some((Condition::Suspect, Condition::Up))
    );
    assert_eq!(
        t.observe(false, 3, 2),
        Some((Condition::Up, Condition::Suspect))
    );
    assert_eq!(t.observe(false, 3, 2), None);
    assert_eq!(t.health, Condition::Suspect);

    // fall 1: straight down; rise 1: straight up.
    let mut t = Tracker::default();
    assert_eq!(
        t.observe(false, 1, 1),
        Some((Condition::Up, Condition::Down))
    );
    assert_eq!(
        t.observe(true, 1, 1),
        Some((Condition::Down, Condition::Up))
    );
    // The defaults: fall 2, rise 2.
    let mut t = Tracker::default();
    let seq: Vec<_> = [false, false, true, true]
        .into_iter()
        .map(|ok| t.observe(ok, DEFAULT_FALL, DEFAULT_RISE))
        .collect();
    assert_eq!(
        seq,
        [
            Some((Condition::Up, Condition::Suspect)),
            Some((Condition::Suspect, Condition::Down)),
            None,
            Some((Condition::Down, Condition::Up)),
        ]
    );
}

#[test]
fn config_parses_with_defaults_and_denies_unknown_fields() {
    let c: CheckConfig = serde_json::from_str(r#"{"type": "tcp"}"#).unwrap();
    assert_eq!(c, CheckConfig::new(CheckKind::Tcp { port: None }));
    assert_eq!(
        (c.interval_ms, c.timeout_ms, c.fall, c.rise),
        (200, 150, 2, 2)
    );
    let c: CheckConfig = serde_json::from_str(
        r#"{"type": "http", "port": 8080, "path": "/health", "host": "example.test",
                "expect": "200-299", "interval_ms": 100, "timeout_ms": 80, "fall": 3, "rise": 1}"#,
    )
    .unwrap();
    assert_eq!(
        c.kind,
        CheckKind::Http {
            port: Some(8080),
            path: "/health".into(),
            host: Some("example.test".into()),
            expect: Some("200-299".into()),
        }
    );
    assert_eq!(
        (c.interval_ms, c.timeout_ms, c.fall, c.rise),
        (100, 80, 3, 1)
    );
    // What is written reads back the same.
    for c in [
        c,
        CheckConfig::new(CheckKind::Icmp),
        CheckConfig::new(CheckKind::Command {
            command: "true".into(),
        }),
    ] {
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            serde_json::from_str::<CheckConfig>(&text).unwrap(),
            c,
            "{text}"
        );
    }
    for (text, needle) in [
        (r#"{"type": "icmp", "port": 1}"#, "unknown field `port`"),
        (
            r#"{"type": "tcp", "intervall_ms": 1}"#,
            "unknown field `intervall_ms`",
        ),
        (
            r#"{"type": "http", "path": "/", "bogus": 1}"#,
            "unknown field `bogus`",
        ),
        (r#"{"type": "ping"}"#, "unknown variant `ping`"),
        (r#"{"interval_ms": 100}"#, "missing field `type`"),
        (r#"{"type": "http"}"#, "missing field `path`"),
        (r#"{"type": "command"}"#, "missing field `command`"),
    ] {
        let e = serde_json::from_str::<CheckConfig>(text)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{text}: {e}");
    }
}

#[test]
fn validation_names_the_field() {
    let f = "services[1].check";
    assert_eq!(CheckConfig::new(CheckKind::Icmp).validate(f), Ok(()));
    let http = |path: &str, host: Option<&str>, expect: Option<&str>| CheckKind::Http {
        port: None,
        path: path.into(),
        host: host.map(Into::into),
        expect: expect.map(Into::into),
    };
    assert_eq!(
        config(
            http("/", Some("a.test"), Some("200,301-302")),
            200,
            150,
            2,
            2
        )
        .validate(f),
        Ok(())
    );
    for (c, want) in [
        (
            config(CheckKind::Icmp, 200, 200, 2, 2),
            "timeout_ms: must be at least 1 and less than interval_ms (200) (is 200)",
        ),
        (
            config(CheckKind::Icmp, 200, 0, 2, 2),
            "timeout_ms: must be at least 1 and less than interval_ms (200) (is 0)",
        ),
        (
            config(CheckKind::Icmp, 5, 1, 2, 2),
            "interval_ms: must be between 10 and 3600000 (is 5)",
        ),
        (
            config(CheckKind::Icmp, 200, 150, 0, 2),
            "fall: must be at least 1",
        ),
        (
            config(CheckKind::Icmp, 200, 150, 2, 0),
            "rise: must be at least 1",
        ),
        (
            config(CheckKind::Tcp { port: Some(0) }, 200, 150, 2, 2),
            "port: must be 1-65535 (or absent: the service port)",
        ),
        (
            config(http("health", None, None), 200, 150, 2, 2),
            "path: must start with '/', without spaces or controls (is \"health\")",
        ),
        (
            config(http("/a b", None, None), 200, 150, 2, 2),
            "path: must start with '/', without spaces or controls (is \"/a b\")",
        ),
        (
            config(http("/", Some("a\r\nX: y"), None), 200, 150, 2, 2),
            "host: must be non-empty, without spaces or controls (is \"a\\r\\nX: y\")",
        ),
        (
            config(http("/", None, Some("2xx")), 200, 150, 2, 2),
            "expect: \"2xx\" is not a status 100-599 \
                 (write e.g. \"200\", \"200-299\", \"200,302\")",
        ),
        (
            config(http("/", None, Some("399-200")), 200, 150, 2, 2),
            "expect: \"399-200\" is an empty range",
        ),
        (
            config(
                CheckKind::Command {
                    command: " ".into(),
                },
                200,
                150,
                2,
                2,
            ),
            "command: must not be empty",
        ),
    ] {
        assert_eq!(c.validate(f), Err(format!("{f}.{want}")));
    }
    assert_eq!(
        parse_expect("200, 204,300-302"),
        Ok(vec![(200, 200), (204, 204), (300, 302)])
    );
}

#[test]
fn targets_start_up_and_removed_ones_are_forgotten() {
    let mut c = Checker::new(vec![CheckConfig::new(CheckKind::Icmp)]);
    let a = target("a", LO4, 80, 0);
    let b = target("b", LO6, 80, 0);
    let bad = target("c", LO4, 80, 7);
    c.set_targets([a.clone(), b.clone(), bad.clone()]);
    assert_eq!(c.health(&a), Some(Condition::Up));
    assert_eq!(c.health(&b), Some(Condition::Up));
    assert_eq!(c.health(&bad), None, "no check config 7");
    // The first checks are spread over the first interval.
    let now = Instant::now();
    let (starts, next) = c.take_due(now + Duration::from_millis(200));
    assert_eq!(starts.len(), 2);
    assert!(next.is_none(), "both in flight");
    let (gen_a, gen_b) = (starts[0].generation, starts[1].generation);
    // A result makes a transition; a stale generation is ignored.
    let t = c
        .record(&a, gen_a, false, "connection refused".into(), now)
        .unwrap();
    assert_eq!(
        (t.from, t.to, t.detail.as_str()),
        (Condition::Up, Condition::Suspect, "connection refused")
    );
    assert_eq!(c.record(&b, gen_b + 100, false, "x".into(), now), None);
    assert_eq!(c.health(&b), Some(Condition::Up));
    // Removed, then added again: forgotten, so up again.
    c.set_targets([b.clone()]);
    assert_eq!(c.health(&a), None);
    c.set_targets([a.clone(), b.clone()]);
    assert_eq!(c.health(&a), Some(Condition::Up));
    assert_eq!(
        c.record(&a, gen_a, false, "late".into(), now),
        None,
        "old generation"
    );
    let report = c.report();
    assert_eq!(report.len(), 2);
    assert_eq!(
        report[0],
        (a.clone(), Condition::Up, "not checked yet".to_string())
    );
    // Changed configs: the target keeps its health; an index that went away is dropped.
    c.set_checks(vec![]);
    assert!(c.report().is_empty());
}

#[test]
fn echo_replies_are_matched_by_identifier_cookie_and_sequence() {
    let (ident, cookie) = (0x1234, 0x0102_0304_0506_0708);
    // An IPv4 reply as the raw socket reads it: IP header, then the ICMP message.
    let reply4 = |ident: u16, seq: u16, cookie: u64| {
        let mut icmp = echo_request(false, ident, seq, cookie);
        icmp[0] = ICMP_ECHO_REPLY;
        icmp[2..4].fill(0);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut p = vec![
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
        ];
        p.extend_from_slice(&icmp);
        p
    };
    assert_eq!(
        parse_echo_reply(false, &reply4(ident, 7, cookie), ident, cookie),
        Some(7)
    );
    assert_eq!(
        parse_echo_reply(false, &reply4(ident + 1, 7, cookie), ident, cookie),
        None
    );
    assert_eq!(
        parse_echo_reply(false, &reply4(ident, 7, cookie + 1), ident, cookie),
        None
    );
    let mut corrupt = reply4(ident, 7, cookie);
    corrupt[30] ^= 1;
    assert_eq!(
        parse_echo_reply(false, &corrupt, ident, cookie),
        None,
        "bad checksum"
    );
    let mut request = reply4(ident, 7, cookie);
    request[20] = ICMP_ECHO_REQUEST;
    assert_eq!(
        parse_echo_reply(false, &request, ident, cookie),
        None,
        "our own request"
    );
    assert_eq!(
        parse_echo_reply(false, &reply4(ident, 7, cookie)[..30], ident, cookie),
        None
    );
    // The request's checksum is right.
    assert_eq!(checksum(&echo_request(false, ident, 9, cookie)), 0);
    // ICMPv6: the message alone.
    let mut reply6 = echo_request(true, ident, 0xfffe, cookie);
    reply6[0] = ICMP6_ECHO_REPLY;
    assert_eq!(parse_echo_reply(true, &reply6, ident, cookie), Some(0xfffe));
    assert_eq!(parse_echo_reply(true, &reply6, ident ^ 1, cookie), None);
    reply6[0] = ICMP6_ECHO_REQUEST;
    assert_eq!(parse_echo_reply(true, &reply6, ident, cookie), None);
}

/// A reply from another address than the one pinged does not answer the ping (root).
#[tokio::test]
async fn echo_reply_must_come_from_the_pinged_address() {
    let (ident, cookie) = (0x4321, 42);
    let p = Pinger::open(true, ident, cookie).unwrap();
    let (tx, mut rx) = oneshot::channel();
    p.waiting.borrow_mut().insert(5, (LO6, tx));
    let mut reply = echo_request(true, ident, 5, cookie);
    reply[0] = ICMP6_ECHO_REPLY;
    p.dispatch(&reply, Some("fd00::9".parse().unwrap()));
    assert!(rx.try_recv().is_err(), "wrong source");
    p.dispatch(&reply, Some(LO6));
    assert!(rx.try_recv().is_ok());
    assert!(p.waiting.borrow().is_empty());
}

#[tokio::test]
async fn tcp_check_down_when_the_listener_closes_and_up_when_it_returns() {
    LocalSet::new()
        .run_until(async {
            let listener = TcpListener::bind((LO4, 0)).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = serve_tcp(listener);
            let t = target("s1", LO4, port, 0);
            let check = config(CheckKind::Tcp { port: None }, 100, 80, 2, 2);
            let (checker, mut rx, task) = start(vec![check], vec![t.clone()]);
            let mut seen = Vec::new();
            assert_eq!(
                next_of(&mut rx, &t, Duration::from_millis(400), &mut seen).await,
                None
            );
            assert_eq!(checker.borrow().health(&t), Some(Condition::Up));
            let detail = detail_of(&checker, &t);
            assert!(detail.starts_with("connected in "), "{detail}");

            let mut server = server;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let wait = Duration::from_secs(2);
            for round in 1..=3 {
                // Close the listener (at some other point of the check period each round):
                // suspect at the first failure, down at the second.
                tokio::time::sleep(Duration::from_millis(37 * round)).await;
                let closed = Instant::now();
                server.abort();
                let _ = server.await;
                let s = next_of(&mut rx, &t, wait, &mut seen).await.unwrap();
                let refused = "connection refused";
                // A check whose connection the listener had queued but not accepted when it
                // closed is reset instead of refused: the same failure, seen one step later.
                let reset = "connect: Connection reset by peer (os error 104)";
                assert_eq!((s.from, s.to), (Condition::Up, Condition::Suspect));
                assert!(
                    [refused, reset].contains(&s.detail.as_str()),
                    "{}",
                    s.detail
                );
                let d = next_of(&mut rx, &t, wait, &mut seen).await.unwrap();
                assert_eq!(
                    (d.from, d.to, d.detail.as_str()),
                    (Condition::Suspect, Condition::Down, refused)
                );
                assert_eq!(checker.borrow().health(&t), Some(Condition::Down));
                println!(
                    "TCP check, interval 100 ms, timeout 80 ms, fall 2, rise 2, round {round}: \
                         listener closed -> suspect {:.1} ms, down {:.1} ms",
                    ms(s.at - closed),
                    ms(d.at - closed)
                );

                // Back: up after rise successes in a row.
                let listener = TcpListener::bind((LO4, port)).await.unwrap();
                server = serve_tcp(listener);
                let back = Instant::now();
                let u = next_of(&mut rx, &t, wait, &mut seen).await.unwrap();
                assert_eq!((u.from, u.to), (Condition::Down, Condition::Up));
                assert!(u.detail.starts_with("connected in "), "{}", u.detail);
                println!(
                    "TCP check, round {round}: listener back -> up {:.1} ms",
                    ms(u.at - back)
                );
            }
            assert!(seen.is_empty());
            task.abort();
            server.abort();
        })
        .await;
}

/// A tiny HTTP server answering every request with the current status; records requests.
fn serve_http(
    listener: TcpListener,
    status: Rc<Cell<u16>>,
    requests: Rc<RefCell<Vec<String>>>,
) -> JoinHandle<()> {
    tokio::task::spawn_local(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let status = status.get();
            let requests = requests.clone();
            tokio::task::spawn_local(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                requests
                    .borrow_mut()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let body = "hello\n";
                let answer = format!(
                    "HTTP/1.0 {status} Whatever\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    })
}

#[tokio::test]
async fn http_check_judges_the_status() {
    LocalSet::new()
        .run_until(async {
            let listener = TcpListener::bind((LO6, 0)).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let status = Rc::new(Cell::new(200));
            let requests = Rc::new(RefCell::new(Vec::new()));
            let server = serve_http(listener, status.clone(), requests.clone());
            let checks = vec![
                config(
                    CheckKind::Http {
                        port: None,
                        path: "/health".into(),
                        host: None,
                        expect: None,
                    },
                    100,
                    80,
                    2,
                    2,
                ),
                config(
                    CheckKind::Http {
                        port: Some(port),
                        path: "/x?y=1".into(),
                        host: Some("example.test".into()),
                        expect: Some("500".into()),
                    },
                    100,
                    80,
                    2,
                    2,
                ),
            ];
            let ok = target("s1", LO6, port, 0);
            let want500 = target("s1", LO6, 1, 1);
            let (checker, mut rx, task) = start(checks, vec![ok.clone(), want500.clone()]);
            let mut seen = Vec::new();
            // 200: the first check stays up, the second (expects 500) goes down.
            let s = next_of(&mut rx, &want500, Duration::from_secs(2), &mut seen)
                .await
                .unwrap();
            assert_eq!(
                (s.to, s.detail.as_str()),
                (Condition::Suspect, "HTTP 200 (expected 500)")
            );
            let d = next_of(&mut rx, &want500, Duration::from_secs(2), &mut seen)
                .await
                .unwrap();
            assert_eq!(d.to, Condition::Down);
            assert!(seen.is_empty(), "{seen:?}");
            let detail = detail_of(&checker, &ok);
            assert!(detail.starts_with("HTTP 200 in "), "{detail}");
            {
                let requests = requests.borrow();
                let want = format!("GET /health HTTP/1.0\r\nHost: [::1]:{port}\r\n");
                assert!(
                    requests.iter().any(|r| r.starts_with(&want)),
                    "{requests:?}"
                );
                let want = "GET /x?y=1 HTTP/1.0\r\nHost: example.test\r\n";
                assert!(requests.iter().any(|r| r.starts_with(want)), "{requests:?}");
            }

            // 500: the other way round.
            status.set(500);
            let s = next_of(&mut rx, &ok, Duration::from_secs(2), &mut seen)
                .await
                .unwrap();
            assert_eq!(
                (s.to, s.detail.as_str()),
                (Condition::Suspect, "HTTP 500 (expected 200-399)")
            );
            let d = next_of(&mut rx, &ok, Duration::from_secs(2), &mut seen)
                .await
                .unwrap();
            assert_eq!(d.to, Condition::Down);
            let u = next_of(&mut rx, &want500, Duration::from_secs(2), &mut seen).await;
            let u = u.or_else(|| seen.pop()).unwrap();
            assert_eq!(
                (u.target, u.from, u.to),
                (want500.clone(), Condition::Down, Condition::Up)
            );
            assert!(u.detail.starts_with("HTTP 500 in "), "{}", u.detail);
            task.abort();
            server.abort();
        })
        .await;
}

fn processes_with_argument(arg: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
        .count()
}

#[tokio::test]
async fn command_check_exit_status_environment_and_timeout() {
    LocalSet::new()
        .run_until(async {
            let cmd = |command: &str, interval_ms, timeout_ms| {
                config(
                    CheckKind::Command {
                        command: command.into(),
                    },
                    interval_ms,
                    timeout_ms,
                    2,
                    2,
                )
            };
            let env = r#"test "$ANYCAST_REAL_ADDRESS" = ::1 && test "$ANYCAST_PORT" = 8080 \
                             && test "$ANYCAST_SERVER" = web-1"#;
            // A sleep whose argument only this test process uses, so the count of its
            // processes sees no other run's.
            let nap = format!("3.{}", 100_000 + std::process::id());
            let sleeper = format!("sleep {nap}");
            let checks = vec![
                cmd("true", 300, 250),
                cmd("false", 200, 150),
                cmd(env, 300, 250),
                cmd(&sleeper, 200, 100),
                cmd(
                    "echo out; echo >&2 oops; echo >&2 no backend; exit 3",
                    200,
                    150,
                ),
                cmd(r#"test "$ANYCAST_SERVER" = someone-else"#, 200, 150),
            ];
            let targets: Vec<Target> = (0..checks.len())
                .map(|i| target("web-1", LO6, 8080, i))
                .collect();
            let (checker, mut rx, task) = start(checks, targets.clone());
            let failing = [
                (1, "exit 1"),
                (3, "timeout 100ms"),
                (4, "exit 3: no backend"),
                (5, "exit 1"),
            ];
            let mut seen = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let all_down = |seen: &[Transition]| {
                failing.iter().all(|(i, _)| {
                    seen.iter()
                        .any(|t| t.target.check == *i && t.to == Condition::Down)
                })
            };
            while !all_down(&seen) {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(t)) => seen.push(t),
                    _ => panic!("not all failing commands went down: {seen:?}"),
                }
            }
            for t in &seen {
                let want = failing.iter().find(|(i, _)| *i == t.target.check);
                let want = want.map(|(_, d)| *d);
                assert_eq!(Some(t.detail.as_str()), want, "{t:?}");
            }
            for i in [0, 2] {
                let ok = || detail_of(&checker, &targets[i]).starts_with("exit 0 in ");
                assert!(
                    eventually(Duration::from_secs(2), ok).await,
                    "{i}: {}",
                    detail_of(&checker, &targets[i])
                );
                assert_eq!(checker.borrow().health(&targets[i]), Some(Condition::Up));
            }
            // Each timed-out command was killed: at most the current one is running.
            assert!(processes_with_argument(&nap) <= 1);
            task.abort();
            let _ = task.await;
            // The timed-out commands were killed with their process group (gone within a
            // bound: a loaded machine takes a while to end a killed process).
            assert!(
                eventually(Duration::from_secs(3), || processes_with_argument(&nap)
                    == 0)
                .await,
                "{} sleeps left",
                processes_with_argument(&nap)
            );
        })
        .await;
}

#[tokio::test]
async fn icmp_echo_to_loopback_v4_and_v6() {
    LocalSet::new()
        .run_until(async {
            let check = config(CheckKind::Icmp, 100, 90, 3, 1);
            let targets = vec![target("a", LO4, 0, 0), target("a", LO6, 0, 0)];
            // Two checkers at once: each must take only its own replies.
            let (one, mut rx1, task1) = start(vec![check.clone()], targets.clone());
            let (two, mut rx2, task2) = start(vec![check], targets.clone());
            for checker in [&one, &two] {
                let answered = || {
                    let report = checker.borrow().report();
                    report
                        .iter()
                        .all(|(_, _, d)| d.starts_with("echo reply in "))
                };
                let report = checker.borrow().report();
                assert!(
                    eventually(Duration::from_secs(2), answered).await,
                    "{report:?}"
                );
                for (t, health, detail) in checker.borrow().report() {
                    assert_eq!(health, Condition::Up, "{t}");
                    println!("ICMP {}: {detail}", t.real);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            for rx in [&mut rx1, &mut rx2] {
                while let Ok(t) = rx.try_recv() {
                    assert_ne!(t.to, Condition::Down, "{t:?}");
                }
            }
            assert_ne!(one.borrow().ident, two.borrow().ident);
            task1.abort();
            task2.abort();
        })
        .await;
}
