//! What the registry's tests share: a policy with two identities, and binding updates.
use super::*;
use crate::config::{RegisteredServer, ReverseTunnel};

pub(super) const AGENT: &str = "10.0.0.1";
pub(super) const KEY1: &[u8] = b"0123456789abcdef-server-one";
pub(super) const KEY2: &[u8] = b"fedcba9876543210-server-two";

pub(super) fn registration(limits: Limits, drain: u32) -> Registration {
    let server = |id: &str, spi: u32, allow: &[&str], real: &[&str]| RegisteredServer {
        id: id.into(),
        spi,
        key_file: "unused".into(),
        allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        real: real.iter().map(|a| a.parse().unwrap()).collect(),
    };
    Registration {
        port: 4191,
        max_lifetime: 60,
        drain_time: drain,
        replay_window: 30,
        limits,
        probe: Some(RefreshProbe {
            interval_ms: 1000,
            timeout_ms: 500,
            misses: 2,
        }),
        reverse_tunnel: Some(ReverseTunnel {
            suspect_after_ms: 300,
        }),
        servers: vec![
            server(
                "s1",
                1,
                &["192.0.2.1", "2001:db8::/64"],
                &["10.0.2.0/24", "2001:db8:2::/64"],
            ),
            server("s2", 2, &["192.0.2.0/24"], &["10.0.3.0/24", "10.0.2.50"]),
        ],
        widest_allow_v4: 24,
        widest_allow_v6: 48,
        relay: None,
        discovery_address: None,
        certificates: None,
    }
}

pub(super) fn registry(limits: Limits, drain: u32) -> Registry {
    let keys = HashMap::from([
        ("s1".to_string(), KEY1.to_vec()),
        ("s2".to_string(), KEY2.to_vec()),
    ]);
    Registry::new(
        &registration(limits, drain),
        &keys,
        &[AGENT.parse().unwrap()],
        64,
    )
}

pub(super) struct Bu {
    pub(super) id: &'static str,
    pub(super) key: &'static [u8],
    pub(super) spi: u32,
    pub(super) home: &'static str,
    pub(super) real: &'static str,
    pub(super) seq: u16,
    pub(super) lifetime: u16,
    pub(super) ts: u64,
    pub(super) load: LoadInfo,
    /// Protocol and port, for a binding of one service.
    pub(super) service: Option<(u8, u16)>,
}

impl Bu {
    pub(super) fn new(seq: u16, ts: u64) -> Bu {
        Bu {
            id: "s1",
            key: KEY1,
            spi: 1,
            home: "192.0.2.1",
            real: "10.0.2.11",
            seq,
            lifetime: 5,
            ts,
            load: LoadInfo {
                sessions_in_use: 3,
                ..Default::default()
            },
            service: None,
        }
    }
    pub(super) fn bytes(&self) -> Vec<u8> {
        let msg = Message {
            src: wire::to_mapped(self.home.parse().unwrap()),
            dst: wire::to_mapped(AGENT.parse().unwrap()),
            body: Body::BindingUpdate {
                seq: self.seq,
                ack: true,
                lifetime: self.lifetime,
            },
            options: Options {
                alt_coa: Some(wire::to_mapped(self.real.parse().unwrap())),
                mn_id: Some(self.id.into()),
                mesg_id: Some(self.ts),
                load: Some(self.load),
                service: self
                    .service
                    .map(|(protocol, port)| ServiceSelector { protocol, port }),
                ..Default::default()
            },
        };
        wire::encode(
            &msg,
            Some(Key {
                spi: self.spi,
                secret: self.key,
            }),
        )
    }
}

pub(super) const WALL: u64 = 4_000_000_000 << 32;
pub(super) fn from() -> SocketAddr {
    "10.0.2.11:5000".parse().unwrap()
}

pub(super) fn ba_status(o: &Outcome, key: Option<&[u8]>, spi: u32) -> (u8, u16, u16) {
    let r = o.reply.as_ref().expect("a BA");
    if let Some(k) = key {
        assert!(
            wire::verify(&r.payload, Key { spi, secret: k }),
            "BA signed with the server's key"
        );
    }
    match wire::decode(&r.payload).unwrap().body {
        Body::BindingAck {
            status,
            seq,
            lifetime,
        } => (status, seq, lifetime),
        b => panic!("not a BA: {b:?}"),
    }
}
