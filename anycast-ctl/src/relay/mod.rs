//! Binding sync between agents that serve the same anycast addresses (several agents serve
//! one anycast address; an agent that receives a server's binding synchronizes it with the
//! others).
//!
//! Every binding message an agent accepts from a server (bound, refreshed, deregistered) is
//! relayed, verbatim, with the outer source it came from, to every configured peer over UDP
//! (`registration.relay.port`, 4192). Each datagram is an envelope, MAC'd with the key the
//! two agents share (one per pair), carrying the sender's and the receiver's identity and a
//! timestamp that only grows. The receiving agent re-verifies the server's own message as if
//! the server had sent it (see `registration::agent::relayed`): a relaying agent vouches
//! only for the outer source, and can neither forge nor replay a server's message.
//!
//! Envelope (all integers big-endian):
//!
//! ```text
//! offset  size  field
//! 0       4     magic "ACRL"
//! 4       1     version (1)
//! 5       1     kind: 1 relay, 2 snapshot entry, 3 digest, 4 hello, 5 health, 6 flow pins
//! 6       1     s: sender identity length (1-64)
//! 7       1     r: receiver identity length (1-64)
//! 8       s     sender identity (its relay.id)
//! 8+s     r     receiver identity
//! 8+s+r   8     timestamp (NTP: 32 bits seconds since 1900, 32 bits fraction), strictly
//!               increasing per sender
//! 16+s+r  ...   body (below)
//! end-16  16    HMAC-SHA-256 over every byte before it, truncated to 128 bits
//!
//! relay (1):    16 original outer source address (IPv4 as ::ffff:a.b.c.d), 2 its port,
//!               2 n, n bytes: the server's UDP payload as received
//! snapshot (2): as relay, then 4 the binding's time left at the sender (ms), 1 flags (bit 0:
//!               a smoothed load follows), 8 smoothed load (IEEE 754 double, 0 if none),
//!               4 the published weight
//! digest (3):   4 number of bindings, 32 SHA-256 of the binding table's inputs
//! hello (4):    nothing: "send me a snapshot"
//! health (5):   2 n, then n entries of 35 bytes: 16 anycast address, 1 protocol, 2 port,
//!               16 real address: every real address the sender holds down (see `health`)
//! pins (6):     1 n (1-20), then n flow pins of 57 bytes each (see `pins.rs`)
//! ```
//!
//! A receiver takes an envelope only if its source address is the configured address of the
//! peer it names, the receiver is itself, the MAC verifies with that pair's key, and the
//! timestamp is newer than the last one taken from that peer, within `replay_window` of
//! its own clock and not older than its own start; everything else is refused and counted.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anycast_common::wire;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{
    config::RelayConfig,
    registration::agent::{Reply, SnapshotExtra},
};

pub const MAGIC: &[u8; 4] = b"ACRL";
pub const VERSION: u8 = 1;
pub const MAC_LEN: usize = 16;
pub const MAX_ID: usize = 64;
/// Snapshot answers to one peer at most this often: a peer asking again and again cannot
/// make this agent send its whole table in a loop.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Digests in a row that differ before the agents are said to disagree: one can differ
/// while a relayed update is on its way.
const MISMATCHES_TO_ALARM: u32 = 3;

mod health;
pub use health::{HealthEntry, HeldDown, LAPSE_INTERVALS, MAX_HEALTH_ENTRIES};

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Relay {
        from: SocketAddr,
        message: Vec<u8>,
    },
    Snapshot {
        from: SocketAddr,
        message: Vec<u8>,
        extra: SnapshotExtra,
    },
    Digest {
        bindings: u32,
        digest: [u8; 32],
    },
    Hello,
    /// Every real address the sender holds down by its own observation.
    Health {
        down: Vec<HealthEntry>,
    },
    /// Flows the sender pinned to a server that is not their table's choice (`pins.rs`).
    FlowPins {
        pins: Vec<crate::dataplane::FlowPin>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub sender: String,
    pub receiver: String,
    pub timestamp: u64,
    pub body: Body,
}

/// Why an envelope was refused: the counter it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    /// The source is not the configured address of the peer it names, or it names none.
    UnknownPeer,
    NotForUs,
    /// The MAC does not verify with the pair's key.
    Auth,
    /// Not newer than the last one taken from that peer, too far from our clock, or older
    /// than our start.
    Replay,
}

impl Refused {
    pub fn counter(self) -> &'static str {
        match self {
            Refused::Malformed => "relay_refused_malformed",
            Refused::UnknownPeer => "relay_refused_unknown_peer",
            Refused::NotForUs => "relay_refused_not_for_us",
            Refused::Auth => "relay_refused_auth",
            Refused::Replay => "relay_refused_replay",
        }
    }
}

fn mac(key: &[u8], bytes: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(bytes);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

fn put_source(out: &mut Vec<u8>, from: SocketAddr, message: &[u8]) {
    out.extend_from_slice(&wire::to_mapped(from.ip()).octets());
    out.extend_from_slice(&from.port().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// The envelope's bytes, MAC'd with `key`. Identities longer than [`MAX_ID`] and messages
/// longer than 65535 bytes are not sent (configuration and the 2048-byte receive buffer
/// keep them far below).
pub fn encode(env: &Envelope, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(match env.body {
        Body::Relay { .. } => 1,
        Body::Snapshot { .. } => 2,
        Body::Digest { .. } => 3,
        Body::Hello => 4,
        Body::Health { .. } => 5,
        Body::FlowPins { .. } => 6,
    });
    out.push(env.sender.len() as u8);
    out.push(env.receiver.len() as u8);
    out.extend_from_slice(env.sender.as_bytes());
    out.extend_from_slice(env.receiver.as_bytes());
    out.extend_from_slice(&env.timestamp.to_be_bytes());
    match &env.body {
        Body::Relay { from, message } => put_source(&mut out, *from, message),
        Body::Snapshot {
            from,
            message,
            extra,
        } => {
            put_source(&mut out, *from, message);
            let ms = extra.expires_in.as_millis().min(u32::MAX as u128) as u32;
            out.extend_from_slice(&ms.to_be_bytes());
            out.push(extra.smoothed_load.is_some() as u8);
            out.extend_from_slice(&extra.smoothed_load.unwrap_or(0.0).to_bits().to_be_bytes());
            out.extend_from_slice(&extra.weight.to_be_bytes());
        }
        Body::Digest { bindings, digest } => {
            out.extend_from_slice(&bindings.to_be_bytes());
            out.extend_from_slice(digest);
        }
        Body::Hello => {}
        Body::Health { down } => health::put_health(&mut out, down),
        Body::FlowPins { pins: p } => pins::put(&mut out, p),
    }
    let tag = mac(key, &out);
    out.extend_from_slice(&tag);
    out
}

/// The header's identities, before the MAC is checked (to find the key): (sender, receiver).
pub fn identities(bytes: &[u8]) -> Result<(&str, &str), Refused> {
    if bytes.len() < 8 + 8 + MAC_LEN || &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return Err(Refused::Malformed);
    }
    let (s, r) = (bytes[6] as usize, bytes[7] as usize);
    if !(1..=MAX_ID).contains(&s)
        || !(1..=MAX_ID).contains(&r)
        || bytes.len() < 16 + s + r + MAC_LEN
    {
        return Err(Refused::Malformed);
    }
    let sender = std::str::from_utf8(&bytes[8..8 + s]).map_err(|_| Refused::Malformed)?;
    let receiver = std::str::from_utf8(&bytes[8 + s..8 + s + r]).map_err(|_| Refused::Malformed)?;
    Ok((sender, receiver))
}

/// Reads a body front to back; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refused> {
        if self.0.len() < n {
            return Err(Refused::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Refused> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn source(&mut self) -> Result<(SocketAddr, Vec<u8>), Refused> {
        let addr = Ipv6Addr::from(self.array::<16>()?);
        let port = u16::from_be_bytes(self.array()?);
        let n = u16::from_be_bytes(self.array()?) as usize;
        let message = self.take(n)?.to_vec();
        Ok((SocketAddr::new(wire::from_mapped(addr), port), message))
    }
}

/// Checks the MAC with `key`, then decodes. Nothing of the body is believed before the MAC.
pub fn decode(bytes: &[u8], key: &[u8]) -> Result<Envelope, Refused> {
    let (sender, receiver) = identities(bytes)?;
    let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(signed);
    // Constant time: a forger learns nothing from how long a refusal took.
    m.verify_truncated_left(tag).map_err(|_| Refused::Auth)?;
    let at = 8 + sender.len() + receiver.len();
    let mut c = Cursor(&signed[at..]);
    let timestamp = u64::from_be_bytes(c.array()?);
    let body = match bytes[5] {
        1 => {
            let (from, message) = c.source()?;
            Body::Relay { from, message }
        }
        2 => {
            let (from, message) = c.source()?;
            let ms = u32::from_be_bytes(c.array()?);
            let flags = c.array::<1>()?[0];
            let load = f64::from_bits(u64::from_be_bytes(c.array()?));
            let weight = u32::from_be_bytes(c.array()?);
            Body::Snapshot {
                from,
                message,
                extra: SnapshotExtra {
                    expires_in: Duration::from_millis(ms as u64),
                    smoothed_load: (flags & 1 == 1).then_some(load),
                    weight,
                },
            }
        }
        3 => Body::Digest {
            bindings: u32::from_be_bytes(c.array()?),
            digest: c.array()?,
        },
        4 => Body::Hello,
        5 => Body::Health {
            down: health::take_health(&mut c)?,
        },
        6 => {
            let (pins, used) = pins::take(c.0)?;
            c.take(used)?;
            Body::FlowPins { pins }
        }
        _ => return Err(Refused::Malformed),
    };
    // Trailing bytes: not an envelope this version writes.
    if !c.0.is_empty() {
        return Err(Refused::Malformed);
    }
    Ok(Envelope {
        sender: sender.to_string(),
        receiver: receiver.to_string(),
        timestamp,
        body,
    })
}

/// One peer agent, as this agent sees it.
struct Peer {
    id: String,
    address: IpAddr,
    key: Vec<u8>,
    /// Its registration addresses (IPv4-mapped): what the messages it relays are sent to.
    registration: Vec<Ipv6Addr>,
    /// The newest timestamp taken from it.
    last_timestamp: u64,
    last_heard: Option<Instant>,
    last_hello: Option<Instant>,
    last_snapshot: Option<Instant>,
    /// Its last digest, and how many in a row differed from ours.
    digest: Option<(u32, [u8; 32])>,
    mismatches_in_row: u32,
    /// None until a digest was compared.
    in_sync: Option<bool>,
    /// What it holds down, as its last health envelope said.
    marks: health::PeerMarks,
}

/// What `anycast-ctl bindings` (and `status`) shows of the relay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayReport {
    pub id: String,
    pub port: u16,
    /// This agent's digest of its binding table's inputs (hex) and its number of bindings.
    pub digest: String,
    pub bindings: u32,
    /// Every peer that has sent a digest agrees with ours (false also while one is unheard).
    pub in_sync: bool,
    pub peers: Vec<PeerReport>,
    pub counters: BTreeMap<String, u64>,
    /// Real addresses held down here or by a peer, and by whom.
    #[serde(default)]
    pub held_down: Vec<HeldDown>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub id: String,
    pub address: IpAddr,
    /// Seconds since an envelope from it was taken; None: never.
    pub heard_secs_ago: Option<f64>,
    /// Its last digest (hex) and number of bindings.
    pub digest: Option<String>,
    pub bindings: Option<u32>,
    /// Whether its digests agree with ours; None: not compared yet.
    pub in_sync: Option<bool>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The relay's state: peers, their keys and replay state, digests. Pure: it takes bytes and
/// times and returns datagrams to send, like the registry.
pub struct Relay {
    id: String,
    port: u16,
    interval: Duration,
    peers: Vec<Peer>,
    /// Our clock (NTP) at start: envelopes older than this are refused, so one captured
    /// before a restart cannot be replayed after it.
    started: u64,
    replay_window: u64,
    last_sent: u64,
    last_digest_round: Option<Instant>,
    counters: BTreeMap<String, u64>,
    /// This agent's own list as last announced; None before the first.
    own_down: Option<std::collections::BTreeSet<HealthEntry>>,
}

impl Relay {
    /// `keys`: per peer identity, the key that pair shares. `started`: our clock (NTP).
    pub fn new(
        cfg: &RelayConfig,
        keys: &std::collections::HashMap<String, Vec<u8>>,
        replay_window: u64,
        started: u64,
    ) -> Relay {
        Relay {
            id: cfg.id.clone(),
            port: cfg.port,
            interval: Duration::from_millis(cfg.digest_interval_ms),
            peers: cfg
                .peers
                .iter()
                .map(|p| Peer {
                    id: p.id.clone(),
                    address: p.address,
                    key: keys.get(&p.id).cloned().unwrap_or_default(),
                    registration: p
                        .registration_addresses()
                        .into_iter()
                        .map(wire::to_mapped)
                        .collect(),
                    last_timestamp: 0,
                    last_heard: None,
                    last_hello: None,
                    last_snapshot: None,
                    digest: None,
                    mismatches_in_row: 0,
                    in_sync: None,
                    marks: Default::default(),
                })
                .collect(),
            started,
            replay_window,
            last_sent: 0,
            last_digest_round: None,
            counters: BTreeMap::new(),
            own_down: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn count(&mut self, what: &str) {
        self.add(what, 1);
    }

    pub fn add(&mut self, what: &str, n: u64) {
        *self.counters.entry(what.to_string()).or_default() += n;
    }

    /// Takes an envelope from `from` if it passes every check (see the module's header);
    /// returns the peer's identity, its registration addresses and the envelope. Refusals
    /// are counted here.
    pub fn receive(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        now: Instant,
        wall: u64,
    ) -> Result<(String, Vec<Ipv6Addr>, Envelope), Refused> {
        let result = self.check(from, bytes, wall);
        match &result {
            Ok((i, env)) => {
                let peer = &mut self.peers[*i];
                peer.last_timestamp = env.timestamp;
                peer.last_heard = Some(now);
                let kind = match env.body {
                    Body::Relay { .. } => "relay_received_relay",
                    Body::Snapshot { .. } => "relay_received_snapshot",
                    Body::Digest { .. } => "relay_received_digest",
                    Body::Hello => "relay_received_hello",
                    Body::Health { .. } => "relay_received_health",
                    Body::FlowPins { .. } => "relay_received_pin_envelopes",
                };
                self.count(kind);
            }
            Err(why) => self.count(why.counter()),
        }
        let (i, env) = result?;
        let peer = &self.peers[i];
        Ok((peer.id.clone(), peer.registration.clone(), env))
    }

    fn check(
        &self,
        from: SocketAddr,
        bytes: &[u8],
        wall: u64,
    ) -> Result<(usize, Envelope), Refused> {
        let (sender, receiver) = identities(bytes)?;
        // Who may send is decided by address first: a host that is no peer gets no MAC
        // computed for it.
        let i = self
            .peers
            .iter()
            .position(|p| p.id == sender && p.address == from.ip().to_canonical())
            .ok_or(Refused::UnknownPeer)?;
        if receiver != self.id {
            return Err(Refused::NotForUs);
        }
        let env = decode(bytes, &self.peers[i].key)?;
        let skew = (env.timestamp >> 32).abs_diff(wall >> 32);
        if env.timestamp <= self.peers[i].last_timestamp
            || env.timestamp < self.started
            || skew > self.replay_window
        {
            return Err(Refused::Replay);
        }
        Ok((i, env))
    }

    /// An envelope to peer `i`, stamped with a time that only grows.
    fn stamped_for(&mut self, i: usize, body: Body, wall: u64) -> Reply {
        self.last_sent = wall.max(self.last_sent + 1);
        let peer = &self.peers[i];
        let env = Envelope {
            sender: self.id.clone(),
            receiver: peer.id.clone(),
            timestamp: self.last_sent,
            body,
        };
        Reply {
            to: SocketAddr::new(peer.address, self.port),
            payload: encode(&env, &peer.key),
        }
    }

    /// A server's message this agent accepted, to every peer.
    pub fn relay(&mut self, message: &[u8], from: SocketAddr, wall: u64) -> Vec<Reply> {
        (0..self.peers.len())
            .map(|i| {
                self.stamped_for(
                    i,
                    Body::Relay {
                        from,
                        message: message.to_vec(),
                    },
                    wall,
                )
            })
            .collect()
    }

    /// Flow pins to every peer, [`pins::MAX_PINS_PER_ENVELOPE`] to an envelope.
    pub fn flow_pins(&mut self, all: &[crate::dataplane::FlowPin], wall: u64) -> Vec<Reply> {
        let mut out = Vec::new();
        for chunk in all.chunks(pins::MAX_PINS_PER_ENVELOPE) {
            for i in 0..self.peers.len() {
                out.push(self.stamped_for(
                    i,
                    Body::FlowPins {
                        pins: chunk.to_vec(),
                    },
                    wall,
                ));
            }
        }
        self.add("relay_sent_pins", all.len() as u64);
        out
    }

    fn index(&self, peer: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.id == peer)
    }

    /// A snapshot for `peer` (it said hello): every stored message, then our digest. At
    /// most one a second per peer.
    pub fn snapshot(
        &mut self,
        peer: &str,
        entries: Vec<crate::registration::agent::SnapshotEntry>,
        digest: (u32, [u8; 32]),
        now: Instant,
        wall: u64,
    ) -> Vec<Reply> {
        let Some(i) = self.index(peer) else {
            return Vec::new();
        };
        if self.peers[i]
            .last_snapshot
            .is_some_and(|t| now.saturating_duration_since(t) < SNAPSHOT_EVERY)
        {
            self.count("relay_snapshots_suppressed");
            return Vec::new();
        }
        self.peers[i].last_snapshot = Some(now);
        self.count("relay_snapshots_sent");
        let mut out: Vec<Reply> = entries
            .into_iter()
            .map(|e| {
                self.stamped_for(
                    i,
                    Body::Snapshot {
                        from: e.message.from,
                        message: e.message.payload,
                        extra: e.extra,
                    },
                    wall,
                )
            })
            .collect();
        out.push(self.stamped_for(
            i,
            Body::Digest {
                bindings: digest.0,
                digest: digest.1,
            },
            wall,
        ));
        out
    }

    /// A peer's digest against ours (taken after everything it sent before). Differing
    /// [`MISMATCHES_TO_ALARM`] times in a row raises the alarm (a log line, the counter
    /// `relay_digest_mismatch`, `in_sync` false) and asks the peer for a snapshot, then
    /// again every few intervals while they differ. Returns the hello to send, if any.
    pub fn compare(
        &mut self,
        peer: &str,
        theirs: (u32, [u8; 32]),
        ours: (u32, [u8; 32]),
        now: Instant,
        wall: u64,
    ) -> Option<Reply> {
        let i = self.index(peer)?;
        let interval = self.interval;
        let p = &mut self.peers[i];
        p.digest = Some(theirs);
        if theirs == ours {
            if p.in_sync == Some(false) {
                tracing::info!("relay: bindings agree with peer '{}' again", p.id);
            }
            p.in_sync = Some(true);
            p.mismatches_in_row = 0;
            return None;
        }
        p.mismatches_in_row += 1;
        if p.mismatches_in_row < MISMATCHES_TO_ALARM {
            return None;
        }
        if p.in_sync != Some(false) {
            tracing::warn!(
                "relay: bindings differ from peer '{}' ({} here, {} there; digests {} and {}): \
                 asking it for a snapshot",
                p.id,
                ours.0,
                theirs.0,
                &hex(&ours.1)[..16],
                &hex(&theirs.1)[..16]
            );
            p.in_sync = Some(false);
            self.count("relay_digest_mismatch");
        }
        let p = &self.peers[i];
        let due = p
            .last_hello
            .is_none_or(|t| now.saturating_duration_since(t) >= interval * 5);
        due.then(|| self.hello(i, now, wall))
    }

    fn hello(&mut self, i: usize, now: Instant, wall: u64) -> Reply {
        self.peers[i].last_hello = Some(now);
        self.count("relay_hellos_sent");
        self.stamped_for(i, Body::Hello, wall)
    }

    /// Every interval: our digest to every peer, and a hello (asking for a snapshot) to every
    /// peer not heard from within three intervals: at start, and when a peer comes back.
    /// Our health list goes again while it is not empty.
    pub fn tick(&mut self, digest: (u32, [u8; 32]), now: Instant, wall: u64) -> Vec<Reply> {
        if self
            .last_digest_round
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            return Vec::new();
        }
        self.last_digest_round = Some(now);
        let mut out = Vec::new();
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            let silent = p
                .last_heard
                .is_none_or(|t| now.saturating_duration_since(t) >= self.interval * 3);
            if silent {
                out.push(self.hello(i, now, wall));
            }
            out.push(self.stamped_for(
                i,
                Body::Digest {
                    bindings: digest.0,
                    digest: digest.1,
                },
                wall,
            ));
        }
        if self.own_down.as_ref().is_some_and(|d| !d.is_empty()) {
            out.extend(self.health_envelopes(wall));
        }
        out
    }

    pub fn report(&self, digest: (u32, [u8; 32]), now: Instant) -> RelayReport {
        let peers: Vec<PeerReport> = self
            .peers
            .iter()
            .map(|p| PeerReport {
                id: p.id.clone(),
                address: p.address,
                heard_secs_ago: p
                    .last_heard
                    .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                digest: p.digest.map(|d| hex(&d.1)),
                bindings: p.digest.map(|d| d.0),
                in_sync: p.in_sync,
            })
            .collect();
        RelayReport {
            id: self.id.clone(),
            port: self.port,
            digest: hex(&digest.1),
            bindings: digest.0,
            in_sync: peers.iter().all(|p| p.in_sync == Some(true)),
            peers,
            counters: self.counters.clone(),
            held_down: Vec::new(),
        }
    }
}

#[cfg(test)]
mod health_tests;
pub mod pins;
#[cfg(test)]
mod tests;
