//! Agent discovery, the server's end, against a fake discovery address and fake agents.
use super::tests::{config, ip, logs, secs, FakeAgent, Running, KEY, OTHER_KEY, SPI};
use super::*;

/// The discovery address's end of agent discovery, for the client under test.
struct FakeDiscovery {
    sock: UdpSocket,
}

impl FakeDiscovery {
    /// The next discovery request: signed with the server's key; its MESG-ID and sender.
    async fn expect_request(&self, within: Duration) -> (Message, SocketAddr) {
        let mut buf = vec![0u8; 65536];
        let (n, from) = tokio::time::timeout(within, self.sock.recv_from(&mut buf))
            .await
            .expect("a discovery request in time")
            .unwrap();
        let msg = wire::decode(&buf[..n]).unwrap();
        assert_eq!(msg.body, Body::DiscoveryRequest);
        assert_eq!(msg.options.mn_id.as_deref(), Some("s1"));
        assert!(wire::verify(
            &buf[..n],
            Key {
                spi: SPI,
                secret: KEY
            }
        ));
        (msg, from)
    }

    async fn reply(&self, req: &(Message, SocketAddr), nonce: u64, agents: &[&str], key: &[u8]) {
        let msg = Message {
            src: req.0.dst,
            dst: req.0.src,
            body: Body::DiscoveryReply {
                lifetime: 1,
                agents: agents
                    .iter()
                    .map(|a| wire::AgentEntry {
                        id: format!("agent {a}"),
                        v4: Some(a.parse().unwrap()),
                        v6: None,
                    })
                    .collect(),
            },
            options: Options {
                mesg_id: Some(nonce),
                ..Options::default()
            },
        };
        let payload = wire::encode(
            &msg,
            Some(Key {
                spi: SPI,
                secret: key,
            }),
        );
        self.sock.send_to(&payload, req.1).await.unwrap();
    }
}

#[tokio::test]
async fn discovers_the_agents_registers_with_each_and_finds_one_added_later() {
    logs();
    let discovery = FakeDiscovery {
        sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let port = discovery.sock.local_addr().unwrap().port();
    let at = |a: &'static str| async move {
        FakeAgent {
            sock: UdpSocket::bind((ip(a), port)).await.unwrap(),
        }
    };
    let (a2, a3, a4) = (
        at("127.0.0.2").await,
        at("127.0.0.3").await,
        at("127.0.0.4").await,
    );
    let mut cfg = config(a2.addr(), "127.0.0.1", "192.0.2.80");
    cfg.agents.clear();
    cfg.discovery = Some(discovery.sock.local_addr().unwrap());
    cfg.initial_timeout = secs(1.0);
    cfg.lifetime = secs(60.0);
    let mut client = Running::start(cfg, secs(3.0)).await;

    let req = discovery.expect_request(secs(2.0)).await;
    let nonce = req.0.options.mesg_id.expect("a nonce");
    // A reply signed with another key, and one to no outstanding request: ignored.
    discovery
        .reply(&req, nonce, &["127.0.0.4"], OTHER_KEY)
        .await;
    discovery.reply(&req, nonce + 1, &["127.0.0.4"], KEY).await;
    // The genuine one: lifetime 4 s, so asked again after 2 s.
    discovery
        .reply(&req, nonce, &["127.0.0.2", "127.0.0.3"], KEY)
        .await;
    let answered = Instant::now();
    for agent in [&a2, &a3] {
        let bu = agent.expect_bu(secs(2.0)).await;
        agent.ack(&bu, status::ACCEPTED, 15, Some(KEY)).await;
    }
    assert!(
        a4.next_bu(secs(0.5)).await.is_none(),
        "a forged or stale reply added an agent"
    );
    // Asked again at half the list's lifetime, with a newer nonce; an agent added since
    // is registered with too.
    let again = discovery.expect_request(secs(4.0)).await;
    let waited = answered.elapsed();
    assert!(waited >= secs(1.5), "asked again after {waited:?}");
    let nonce2 = again.0.options.mesg_id.unwrap();
    assert!(nonce2 > nonce);
    discovery
        .reply(
            &again,
            nonce2,
            &["127.0.0.2", "127.0.0.3", "127.0.0.4"],
            KEY,
        )
        .await;
    let bu = a4.expect_bu(secs(2.0)).await;
    a4.ack(&bu, status::ACCEPTED, 15, Some(KEY)).await;
    // Nothing new for the agents already known.
    assert!(a2.next_bu(secs(0.3)).await.is_none());

    client.stop();
    for agent in [&a2, &a3, &a4] {
        let dereg = agent.expect_bu(secs(2.0)).await;
        assert_eq!(dereg.lifetime, 0);
        agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
    }
    assert_eq!(client.finish(secs(2.0)).await, 3);
}

#[tokio::test]
async fn an_unanswered_discovery_request_is_sent_again_anew() {
    let discovery = FakeDiscovery {
        sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    };
    let mut cfg = config("127.0.0.1:9".parse().unwrap(), "127.0.0.1", "192.0.2.80");
    cfg.agents.clear();
    cfg.discovery = Some(discovery.sock.local_addr().unwrap());
    cfg.initial_timeout = secs(0.3);
    let mut client = Running::start(cfg, secs(0.5)).await;
    let first = discovery.expect_request(secs(1.0)).await;
    let second = discovery.expect_request(secs(1.0)).await;
    assert!(second.0.options.mesg_id > first.0.options.mesg_id);
    client.stop();
    assert_eq!(client.finish(secs(2.0)).await, 0);
}
