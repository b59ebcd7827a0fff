use super::load::parse_usage;
use super::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(super) const SPI: u32 = 0x0051_5100;
pub(super) const KEY: &[u8] = b"0123456789abcdef-binding-test-key";
pub(super) const OTHER_KEY: &[u8] = b"fedcba9876543210-not-the-right-key";

/// The client's log lines, shown for failing tests (or with `--nocapture`).
pub(super) fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("anycast_ctl=debug")
        .with_test_writer()
        .try_init();
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn seq_after(a: u16, b: u16) -> bool {
    (a.wrapping_sub(b) as i16) > 0
}

pub(super) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// An agent stand-in: a UDP socket speaking the wire format with the server's key.
pub(super) struct FakeAgent {
    pub(super) sock: UdpSocket,
}

/// A binding update as the fake agent received it.
pub(super) struct Bu {
    msg: Message,
    seq: u16,
    pub(super) lifetime: u16,
    from: SocketAddr,
}

impl FakeAgent {
    async fn new(addr: &str) -> FakeAgent {
        FakeAgent {
            sock: UdpSocket::bind((ip(addr), 0)).await.unwrap(),
        }
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// The next datagram if one arrives within `within`; it must be a well-formed binding
    /// update signed with the server's key.
    pub(super) async fn next_bu(&self, within: Duration) -> Option<Bu> {
        let mut buf = vec![0u8; 65536];
        let (n, from) = tokio::time::timeout(within, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        let raw = &buf[..n];
        let msg = wire::decode(raw).expect("a decodable message");
        assert!(
            wire::verify(
                raw,
                Key {
                    spi: SPI,
                    secret: KEY
                }
            ),
            "AUTH verifies"
        );
        assert!(!wire::verify(
            raw,
            Key {
                spi: SPI,
                secret: OTHER_KEY
            }
        ));
        let Body::BindingUpdate { seq, ack, lifetime } = msg.body else {
            panic!("not a binding update");
        };
        assert!(ack, "A flag set");
        assert_eq!(msg.options.auth.as_ref().map(|a| a.spi), Some(SPI));
        assert_eq!(msg.options.mn_id.as_deref(), Some("s1"));
        assert!(msg.options.mesg_id.is_some(), "MESG-ID present");
        assert!(msg.options.load.is_some(), "load present");
        assert!(msg.options.alt_coa.is_some(), "Alt-CoA present");
        assert_eq!(msg.dst, wire::to_mapped(self.addr().ip()));
        Some(Bu {
            msg,
            seq,
            lifetime,
            from,
        })
    }

    pub(super) async fn expect_bu(&self, within: Duration) -> Bu {
        self.next_bu(within)
            .await
            .unwrap_or_else(|| panic!("no binding update within {within:?}"))
    }

    async fn send(&self, to: SocketAddr, home: Ipv6Addr, body: Body, key: Option<&[u8]>) {
        let msg = Message {
            src: wire::to_mapped(self.addr().ip()),
            dst: home,
            body,
            options: Options::default(),
        };
        let payload = wire::encode(&msg, key.map(|secret| Key { spi: SPI, secret }));
        self.sock.send_to(&payload, to).await.unwrap();
    }

    pub(super) async fn ack(&self, bu: &Bu, code: u8, lifetime: u16, key: Option<&[u8]>) {
        let body = Body::BindingAck {
            status: code,
            seq: bu.seq,
            lifetime,
        };
        self.send(bu.from, bu.msg.src, body, key).await;
    }

    async fn refresh_request(&self, bu: &Bu, key: Option<&[u8]>) {
        self.send(bu.from, bu.msg.src, Body::BindingRefreshRequest, key)
            .await;
    }
}

pub(super) fn config(agent: SocketAddr, real: &str, anycast: &str) -> ClientConfig {
    ClientConfig {
        certificate: None,
        agents: vec![agent],
        discovery: None,
        identity: "s1".into(),
        spi: SPI,
        key: KEY.to_vec(),
        bindings: vec![AnycastBinding {
            anycast: ip(anycast),
            selector: Some(ServiceSelector {
                protocol: PROTO_TCP,
                port: 80,
            }),
        }],
        real_addresses: vec![ip(real)],
        lifetime: secs(400.0),
        priority: 7,
        load: LoadSource::Sockets { max_sessions: 1000 },
        initial_timeout: secs(10.0),
        max_timeout: secs(20.0),
    }
}

pub(super) struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<usize>>,
}

impl Running {
    pub(super) async fn start(cfg: ClientConfig, deregister_timeout: Duration) -> Running {
        let client = Client::new(cfg).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
        };
        Running {
            stop: Some(tx),
            task: tokio::spawn(client.run(stop, deregister_timeout)),
        }
    }

    pub(super) fn stop(&mut self) {
        self.stop.take().unwrap().send(()).unwrap();
    }

    pub(super) async fn finish(self, within: Duration) -> usize {
        tokio::time::timeout(within, self.task)
            .await
            .expect("the client returns in time")
            .unwrap()
            .unwrap()
    }
}

#[tokio::test]
async fn registers_refreshes_and_deregisters_over_ipv4() {
    let agent = FakeAgent::new("127.0.0.1").await;
    let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
    cfg.lifetime = secs(3.5); // rounded up to one unit, 4 s
    cfg.initial_timeout = secs(1.0);
    let mut client = Running::start(cfg, secs(5.0)).await;

    let bu = agent.expect_bu(secs(3.0)).await;
    assert_eq!(bu.lifetime, 1);
    assert_eq!(bu.msg.src, wire::to_mapped(ip("192.0.2.80")));
    assert_eq!(bu.msg.src, "::ffff:192.0.2.80".parse::<Ipv6Addr>().unwrap());
    assert_eq!(
        bu.msg.options.alt_coa,
        Some(wire::to_mapped(ip("127.0.0.1")))
    );
    assert_eq!(bu.from.ip(), ip("127.0.0.1"), "sent from the real address");
    let sel = bu.msg.options.service.as_ref().expect("a service selector");
    assert_eq!((sel.protocol, sel.port), (PROTO_TCP, 80));
    let load = bu.msg.options.load.as_ref().unwrap();
    assert_eq!(load.priority, 7);
    assert_eq!(load.max_sessions, 1000);
    assert_eq!((load.used_capacity, load.max_capacity), (0, 0));

    // Granted 4 s: refreshed after half of it, with a later sequence number.
    let acked = Instant::now();
    agent.ack(&bu, status::ACCEPTED, 1, Some(KEY)).await;
    let refresh = agent.expect_bu(secs(4.0)).await;
    let waited = acked.elapsed();
    assert!(waited >= secs(1.5), "refreshed after {waited:?}");
    assert!(seq_after(refresh.seq, bu.seq));
    assert_eq!(refresh.lifetime, 1);
    assert_eq!(refresh.msg.src, bu.msg.src);
    agent.ack(&refresh, status::ACCEPTED, 1, Some(KEY)).await;

    client.stop();
    let dereg = agent.expect_bu(secs(2.0)).await;
    assert_eq!(dereg.lifetime, 0);
    assert!(seq_after(dereg.seq, refresh.seq));
    assert_eq!(dereg.msg.src, bu.msg.src);
    agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
    assert_eq!(client.finish(secs(2.0)).await, 1);
}

#[tokio::test]
async fn answers_a_signed_refresh_request_at_once_over_ipv6() {
    let agent = FakeAgent::new("::1").await;
    let mut cfg = config(agent.addr(), "::1", "2001:db8::80");
    cfg.bindings[0].selector = None;
    cfg.load = LoadSource::Command("echo 3 10".into());
    let mut client = Running::start(cfg, secs(5.0)).await;

    let bu = agent.expect_bu(secs(5.0)).await;
    assert_eq!(bu.from.ip(), ip("::1"), "sent from the real address");
    assert_eq!(bu.msg.src, "2001:db8::80".parse::<Ipv6Addr>().unwrap());
    assert_eq!(bu.msg.options.alt_coa, Some(Ipv6Addr::LOCALHOST));
    assert!(bu.msg.options.service.is_none());
    assert_eq!(bu.lifetime, 100);
    let load = bu.msg.options.load.as_ref().unwrap();
    assert_eq!((load.used_capacity, load.max_capacity), (3, 10));
    assert_eq!((load.sessions_in_use, load.max_sessions), (0, 0));
    agent.ack(&bu, status::ACCEPTED, 100, Some(KEY)).await;

    // Unsigned, wrongly signed, or for another address: no answer.
    agent.refresh_request(&bu, None).await;
    agent.refresh_request(&bu, Some(OTHER_KEY)).await;
    let other = wire::to_mapped(ip("2001:db8::81"));
    let body = Body::BindingRefreshRequest;
    agent.send(bu.from, other, body, Some(KEY)).await;
    assert!(agent.next_bu(secs(0.5)).await.is_none());

    // Signed: answered at once (the refresh would be 200 s away).
    agent.refresh_request(&bu, Some(KEY)).await;
    let again = agent.expect_bu(secs(2.0)).await;
    assert!(seq_after(again.seq, bu.seq));
    assert_eq!((again.lifetime, again.msg.src), (100, bu.msg.src));
    agent.ack(&again, status::ACCEPTED, 100, Some(KEY)).await;

    client.stop();
    let dereg = agent.expect_bu(secs(2.0)).await;
    assert_eq!(dereg.lifetime, 0);
    agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
    assert_eq!(client.finish(secs(2.0)).await, 1);
}

#[tokio::test]
async fn sequence_out_of_window_continues_from_the_agents_number() {
    logs();
    let agent = FakeAgent::new("127.0.0.1").await;
    let cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
    let mut client = Running::start(cfg, secs(5.0)).await;
    let bu = agent.expect_bu(secs(3.0)).await;

    // Ahead of ours: resent at once (the retransmission timeout is 10 s) with X+1.
    let x = bu.seq.wrapping_add(1000);
    let body = Body::BindingAck {
        status: status::SEQUENCE_OUT_OF_WINDOW,
        seq: x,
        lifetime: 0,
    };
    agent.send(bu.from, bu.msg.src, body, Some(KEY)).await;
    let again = agent.expect_bu(secs(2.0)).await;
    assert_eq!(again.seq, x.wrapping_add(1));

    // The agent's number is what counts, even behind ours.
    let y = again.seq.wrapping_sub(30000);
    let body = Body::BindingAck {
        status: status::SEQUENCE_OUT_OF_WINDOW,
        seq: y,
        lifetime: 0,
    };
    agent.send(again.from, again.msg.src, body, Some(KEY)).await;
    let third = agent.expect_bu(secs(2.0)).await;
    assert_eq!(third.seq, y.wrapping_add(1));

    // An unsigned one changes nothing.
    let body = Body::BindingAck {
        status: status::SEQUENCE_OUT_OF_WINDOW,
        seq: 7,
        lifetime: 0,
    };
    agent.send(third.from, third.msg.src, body, None).await;
    assert!(agent.next_bu(secs(0.5)).await.is_none());

    agent.ack(&third, status::ACCEPTED, 100, Some(KEY)).await;
    client.stop();
    let dereg = agent.expect_bu(secs(2.0)).await;
    assert_eq!((dereg.lifetime, dereg.seq), (0, y.wrapping_add(2)));
    agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
    assert_eq!(client.finish(secs(2.0)).await, 1);
}

/// RFC 4285 section 6: a signed MIPV6-ID-MISMATCH (144) answer to our update carries the
/// agent's time; the client resynchronizes its MESG-IDs to it and resends at once. An
/// unsigned one changes nothing.
#[tokio::test]
async fn a_timestamp_mismatch_resynchronizes_to_the_agents_clock() {
    logs();
    let agent = FakeAgent::new("127.0.0.1").await;
    let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
    cfg.initial_timeout = secs(1.5);
    let mut client = Running::start(cfg, secs(5.0)).await;
    let agent_time = |bu: &Bu, at: u64| Message {
        src: wire::to_mapped(agent.addr().ip()),
        dst: bu.msg.src,
        body: Body::BindingAck {
            status: status::ID_MISMATCH,
            seq: bu.seq,
            lifetime: 0,
        },
        options: Options {
            mesg_id: Some(at),
            ..Options::default()
        },
    };
    let hour = 3600u64 << 32;
    let bu1 = agent.expect_bu(secs(3.0)).await;
    // Unsigned: ignored (the retransmission comes at the backoff, with our own clock).
    let forged = wire::encode(&agent_time(&bu1, wire::ntp_now() + hour), None);
    agent.sock.send_to(&forged, bu1.from).await.unwrap();
    assert!(
        agent.next_bu(secs(0.5)).await.is_none(),
        "no resend at once"
    );
    let bu2 = agent.expect_bu(secs(2.0)).await;
    let ts2 = bu2.msg.options.mesg_id.unwrap();
    assert!(
        ts2.abs_diff(wire::ntp_now()) < (5 << 32),
        "still our own clock"
    );
    // Signed, with the agent an hour ahead: resent at once, an hour ahead.
    let signed = wire::encode(
        &agent_time(&bu2, wire::ntp_now() + hour),
        Some(Key {
            spi: SPI,
            secret: KEY,
        }),
    );
    agent.sock.send_to(&signed, bu2.from).await.unwrap();
    let bu3 = agent.expect_bu(secs(0.5)).await;
    assert!(seq_after(bu3.seq, bu2.seq));
    let ts3 = bu3.msg.options.mesg_id.unwrap();
    let ahead = ts3.wrapping_sub(wire::ntp_now()) as i64;
    assert!(
        (ahead - hour as i64).abs() < (5 << 32),
        "the agent's clock: {}",
        ahead >> 32
    );
    agent.ack(&bu3, status::ACCEPTED, 100, Some(KEY)).await;
    client.stop();
    let dereg = agent.expect_bu(secs(2.0)).await;
    assert_eq!(dereg.lifetime, 0);
    assert!(
        dereg.msg.options.mesg_id.unwrap() > ts3,
        "still resynchronized"
    );
    agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
    assert_eq!(client.finish(secs(2.0)).await, 1);
}

#[tokio::test]
async fn unsigned_or_wrongly_signed_acks_are_ignored() {
    logs();
    let agent = FakeAgent::new("127.0.0.1").await;
    let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
    cfg.initial_timeout = secs(0.2);
    cfg.max_timeout = secs(0.4);
    let mut client = Running::start(cfg, secs(5.0)).await;

    // Unsigned, then signed with another key: the client keeps retransmitting.
    let bu1 = agent.expect_bu(secs(3.0)).await;
    agent.ack(&bu1, status::ACCEPTED, 100, None).await;
    let bu2 = agent.expect_bu(secs(2.0)).await;
    assert!(seq_after(bu2.seq, bu1.seq));
    assert_eq!(bu2.lifetime, 100);
    agent
        .ack(&bu2, status::ACCEPTED, 100, Some(OTHER_KEY))
        .await;
    let bu3 = agent.expect_bu(secs(2.0)).await;
    assert!(seq_after(bu3.seq, bu2.seq));
    // An unsigned refusal is only logged; a signed one is retried with the backoff.
    agent.ack(&bu3, status::AUTH_FAILED, 0, None).await;
    let bu4 = agent.expect_bu(secs(2.0)).await;
    agent.ack(&bu4, status::PROHIBITED, 0, Some(KEY)).await;
    let bu5 = agent.expect_bu(secs(2.0)).await;
    assert!(seq_after(bu5.seq, bu4.seq));

    // Properly signed: registered, no more retransmissions.
    agent.ack(&bu5, status::ACCEPTED, 100, Some(KEY)).await;
    assert!(agent.next_bu(secs(1.2)).await.is_none());

    // Deregistration: a forged acknowledgement does not count; retransmitted every
    // initial_timeout until the real one.
    client.stop();
    let d1 = agent.expect_bu(secs(2.0)).await;
    assert_eq!(d1.lifetime, 0);
    agent.ack(&d1, status::ACCEPTED, 0, Some(OTHER_KEY)).await;
    let d2 = agent.expect_bu(secs(2.0)).await;
    assert_eq!(d2.lifetime, 0);
    assert!(seq_after(d2.seq, d1.seq));
    agent.ack(&d2, status::ACCEPTED, 0, Some(KEY)).await;
    assert_eq!(client.finish(secs(2.0)).await, 1);
}

#[tokio::test]
async fn deregistration_gives_up_after_its_timeout() {
    logs();
    let agent = FakeAgent::new("127.0.0.1").await;
    let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
    cfg.initial_timeout = secs(0.1);
    cfg.max_timeout = secs(0.1);
    let mut client = Running::start(cfg, secs(0.55)).await;
    agent.expect_bu(secs(3.0)).await;
    client.stop();
    let mut deregs = 0;
    while let Some(bu) = agent.next_bu(secs(1.0)).await {
        deregs += usize::from(bu.lifetime == 0);
    }
    assert!(deregs >= 3, "{deregs} deregistration attempts");
    assert_eq!(client.finish(secs(1.0)).await, 0);
}

#[tokio::test]
async fn one_binding_per_agent_and_real_address() {
    logs();
    let a4 = FakeAgent::new("127.0.0.1").await;
    let a6 = FakeAgent::new("::1").await;
    let mut cfg = config(a4.addr(), "127.0.0.1", "192.0.2.80");
    cfg.agents.push(a6.addr());
    cfg.real_addresses.push(ip("::1"));
    let mut client = Running::start(cfg, secs(5.0)).await;

    let mut client_addrs = Vec::new();
    for (agent, from) in [(&a4, "127.0.0.1"), (&a6, "::1")] {
        let b1 = agent.expect_bu(secs(3.0)).await;
        client_addrs.push(b1.from);
        let b2 = agent.expect_bu(secs(3.0)).await;
        assert_eq!(b1.from.ip(), ip(from));
        assert_ne!(b1.seq, b2.seq);
        let mut coas = [b1.msg.options.alt_coa, b2.msg.options.alt_coa];
        coas.sort();
        let mut want = [
            Some(wire::to_mapped(ip("127.0.0.1"))),
            Some(Ipv6Addr::LOCALHOST),
        ];
        want.sort();
        assert_eq!(coas, want);
        agent.ack(&b1, status::ACCEPTED, 100, Some(KEY)).await;
        agent.ack(&b2, status::ACCEPTED, 100, Some(KEY)).await;
    }
    // A refresh request refreshes both real addresses toward that agent only.
    let home = wire::to_mapped(ip("192.0.2.80"));
    a4.send(
        client_addrs[0],
        home,
        Body::BindingRefreshRequest,
        Some(KEY),
    )
    .await;
    let r1 = a4.expect_bu(secs(2.0)).await;
    let r2 = a4.expect_bu(secs(2.0)).await;
    assert_ne!(r1.msg.options.alt_coa, r2.msg.options.alt_coa);
    a4.ack(&r1, status::ACCEPTED, 100, Some(KEY)).await;
    a4.ack(&r2, status::ACCEPTED, 100, Some(KEY)).await;
    assert!(a6.next_bu(secs(0.3)).await.is_none());
    client.stop();
    let mut removed = 0;
    for agent in [&a4, &a6] {
        for _ in 0..2 {
            let d = agent.expect_bu(secs(2.0)).await;
            assert_eq!(d.lifetime, 0);
            agent.ack(&d, status::ACCEPTED, 0, Some(KEY)).await;
            removed += 1;
        }
    }
    assert_eq!(client.finish(secs(2.0)).await, removed);
}

#[tokio::test]
async fn bad_configurations_are_refused_with_the_field() {
    let agent: SocketAddr = "127.0.0.1:4191".parse().unwrap();
    type Breaker = Box<dyn Fn(&mut ClientConfig)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("agents", Box::new(|c| c.agents.clear())),
        ("agents[1]", Box::new(move |c| c.agents.push(agent))),
        (
            "agents[0]",
            Box::new(|c| c.agents[0] = "127.0.0.1:0".parse().unwrap()),
        ),
        ("identity", Box::new(|c| c.identity.clear())),
        ("identity", Box::new(|c| c.identity = "x".repeat(300))),
        ("key", Box::new(|c| c.key.truncate(8))),
        ("bindings", Box::new(|c| c.bindings.clear())),
        (
            "bindings[0]",
            Box::new(|c| c.bindings[0].anycast = ip("0.0.0.0")),
        ),
        (
            "bindings[0]: protocol 1",
            Box::new(|c| c.bindings[0].selector.as_mut().unwrap().protocol = 1),
        ),
        (
            "bindings[1]",
            Box::new(|c| {
                c.bindings.push(AnycastBinding {
                    anycast: ip("192.0.2.80"),
                    selector: Some(ServiceSelector {
                        protocol: PROTO_TCP,
                        port: 80,
                    }),
                })
            }),
        ),
        ("real_addresses", Box::new(|c| c.real_addresses.clear())),
        (
            "real_addresses[1]",
            Box::new(|c| c.real_addresses.push(ip("127.0.0.1"))),
        ),
        ("lifetime", Box::new(|c| c.lifetime = secs(300_000.0))),
        (
            "initial_timeout",
            Box::new(|c| c.initial_timeout = secs(0.0)),
        ),
        ("max_timeout", Box::new(|c| c.max_timeout = secs(1.0))),
        (
            "load",
            Box::new(|c| c.load = LoadSource::Command(" ".into())),
        ),
    ];
    for (field, break_it) in cases {
        let mut cfg = config(agent, "127.0.0.1", "192.0.2.80");
        break_it(&mut cfg);
        let err = match Client::new(cfg).await {
            Ok(_) => panic!("{field}: accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&format!("{field}:")), "{field}: {err}");
    }
    // The lifetime is rounded up to 4 s units, at least one.
    let mut cfg = config(agent, "127.0.0.1", "192.0.2.80");
    for (lifetime, units) in [(0.0, 1), (4.0, 1), (4.001, 2), (262_140.0, 65535)] {
        cfg.lifetime = secs(lifetime);
        assert_eq!(validate(&cfg).unwrap(), units, "{lifetime}");
    }
}

/// The kernel's text for 192.0.2.80, 2001:db8::80 and ::ffff:192.0.2.80 on a
/// little-endian machine, in ESTABLISHED (01) and other states.
#[cfg(target_endian = "little")]
#[test]
fn proc_net_tcp_lines_are_counted_by_state_and_local_address() {
    let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 500200C0:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 500200C0:0050 0B01A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 500200C0:0050 0C01A8C0:D432 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 500200C0:0050 0D01A8C0:D433 06 00000000:00000000 03:00000A3B 00000000     0        0 0 3 0000000000000000
   4: 0100007F:1F90 0100007F:D434 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 30 10 -1
   5: 510200C0:0050 0E01A8C0:D435 01 00000000:00000000 00:00000000 00000000     0        0 1005 1 0000000000000000 20 4 30 10 -1
";
    let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: B80D0120000000000000000080000000:0050 B80D0120000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 20 4 30 10 -1
   2: B80D0120000000000000000080000000:0050 B80D0120000000000000000002000000:C351 08 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 20 4 30 10 -1
   3: 0000000000000000FFFF0000500200C0:0050 0000000000000000FFFF00000F01A8C0:C352 01 00000000:00000000 00:00000000 00000000     0        0 2004 1 0000000000000000 20 4 30 10 -1
   4: 00000000000000000000000001000000:0050 00000000000000000000000001000000:C353 01 00000000:00000000 00:00000000 00000000     0        0 2005 1 0000000000000000 20 4 30 10 -1
";
    let v4 = ip("192.0.2.80");
    let v6 = ip("2001:db8::80");
    assert_eq!(count_established(tcp, &[v4]), 2);
    assert_eq!(count_established(tcp, &[v4, ip("192.0.2.81")]), 3);
    assert_eq!(count_established(tcp, &[v6]), 0);
    assert_eq!(count_established(tcp6, &[v6]), 1);
    assert_eq!(
        count_established(tcp6, &[v4]),
        1,
        "IPv4-mapped counts as IPv4"
    );
    assert_eq!(count_established(tcp6, &[v4, v6, ip("::1")]), 3);
    assert_eq!(count_established(tcp6, &[ip("127.0.0.1")]), 0);
    assert_eq!(count_established("", &[v4]), 0);
    assert_eq!(count_established("garbage\n 1: zz:0050 x 01\n", &[v4]), 0);
}

#[tokio::test]
async fn established_sessions_sees_a_live_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conn, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (_conn, _accepted) = (conn.unwrap(), accepted.unwrap());
    // Both ends have 127.0.0.1 as their local address.
    assert!(established_sessions(&[ip("127.0.0.1")]) >= 2);
}

#[tokio::test]
async fn load_commands_are_run_and_parsed() {
    assert_eq!(parse_usage("12 100\n").unwrap(), (12, 100));
    assert!(parse_usage("12\n").is_err());
    assert!(parse_usage("12 lots").is_err());
    assert!(parse_usage("-1 100").is_err());
    assert_eq!(command_usage("echo 3 10").await.unwrap(), (3, 10));
    let err = command_usage("echo broken >&2; exit 3").await.unwrap_err();
    assert!(format!("{err:#}").contains("broken"), "{err:#}");
    assert!(command_usage("echo nothing useful").await.is_err());
}

#[tokio::test]
async fn sockets_are_bound_to_a_real_address() {
    let s = bind_socket(Some(ip("127.0.0.1")), true).await.unwrap();
    assert_eq!(s.local_addr().unwrap().ip(), ip("127.0.0.1"));
    let s = bind_socket(None, false).await.unwrap();
    assert_eq!(s.local_addr().unwrap().ip(), ip("::"));
    // Not on this host: an IPv4 address is an error, an IPv6 one may still be tentative.
    let err = bind_socket(Some(ip("192.0.2.1")), true).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("not an address of this host"),
        "{err:#}"
    );
    let s = bind_socket(Some(ip("2001:db8::1")), false).await.unwrap();
    assert_eq!(s.local_addr().unwrap().ip(), ip("2001:db8::1"));
}

#[test]
fn status_names() {
    assert_eq!(
        status_name(status::SEQUENCE_OUT_OF_WINDOW),
        "sequence number out of window"
    );
    assert_eq!(status_name(status::AUTH_FAILED), "authentication failed");
    assert_eq!(status_name(200), "refused (unknown code)");
}
