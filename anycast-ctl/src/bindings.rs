//! The agent's binding table: servers register themselves with authenticated binding updates
//! (RFC 6275 Mobility Header in DSMIPv6 framing, see `anycast_common::wire`), and the set of
//! live, authorized bindings becomes the services and servers the data path forwards to.
//!
//! This module is pure: it takes datagrams and the time, and returns replies and whether the
//! forwarding state changed. The agent daemon owns the sockets, timers and maps.
//!
//! Reverse-tunnel monitoring (`registration.reverse_tunnel`): servers that run with
//! `--reverse-tunnel` send their SYN-ACKs back through the agent. Per server (identity, over
//! all its real addresses) the agent compares the TCP SYNs it forwarded with the SYN-ACKs
//! that came back ([`Registry::watch_reverse`], fed with the data path's counters):
//!
//! ```text
//!   off --first reverse-tunnelled packet--> ok
//!   ok --new SYNs forwarded, then suspect_after_ms without a reverse packet--> suspect
//!        (a refresh request goes out at once, and again after each miss, until `misses`
//!         in a row make the binding down, as any probe's do)
//!   suspect --it answers the refresh request--> silent (alive, but its SYN-ACKs no
//!        longer come through us: not watched until they do)
//!   suspect, silent --a reverse-tunnelled packet--> ok
//! ```
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anycast_common::{
    wire::{self, status, Body, Key, LoadInfo, Message, Options, ServiceSelector},
    ServiceKey, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Limits, Prefix, RefreshProbe, Registration, ReverseTunnel},
    dataplane::{DesiredService, ReverseCounters},
    selection::{Candidate, Condition, ServicePlan, Smoother},
};

/// BA status for a BU without an Alternate Care-of Address (RFC 6275: reason unspecified).
pub const STATUS_UNSPECIFIED: u8 = 128;
/// Binding Error status: unrecognized MH type value (RFC 6275 6.1.9).
pub const STATUS_UNKNOWN_MH_TYPE: u8 = 2;

/// What a binding is for: one server's real address for one anycast address (and service).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BindingId {
    pub anycast: IpAddr,
    /// Protocol and port, when the server bound one service rather than the whole address.
    pub selector: Option<(u8, u16)>,
    pub server: String,
    pub real: IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingState {
    /// Takes new flows.
    Active,
    /// Deregistered: keeps its open flows until the drain time ends, takes no new ones.
    Draining,
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub seq: u16,
    pub registered: Instant,
    pub updated: Instant,
    pub expires: Instant,
    pub lifetime: Duration,
    pub load: Option<LoadInfo>,
    pub state: BindingState,
    /// Where the last update came from: where refresh requests go.
    pub source: SocketAddr,
    refresh_requested: bool,
    /// Load reports, smoothed into the weight the data path gets.
    pub smoother: Smoother,
    /// Refresh-request probing (health): when the outstanding probe went out, misses in a row.
    probe_sent: Option<Instant>,
    probe_next: Instant,
    pub probe_misses: u32,
    probe_limit: u32,
    /// The reverse-tunnel monitor asked for a refresh request now: after each miss the
    /// next one goes out at once rather than at the probe interval, until the binding
    /// answers or is down.
    probe_urgent: bool,
}

impl Binding {
    /// Up, suspect after one missed probe, down after the configured number in a row.
    pub fn condition(&self) -> Condition {
        match self.probe_misses {
            0 => Condition::Up,
            n if n >= self.probe_limit => Condition::Down,
            _ => Condition::Suspect,
        }
    }
}

struct ServerPolicy {
    spi: u32,
    key: Vec<u8>,
    allow: Vec<Prefix>,
}

/// Token bucket per source address, so a flood from one source cannot starve the others.
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

/// What became of one datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reply: Option<Reply>,
    /// The forwarding state must be rebuilt.
    pub changed: bool,
    /// The counter it was counted under.
    pub counted: String,
}

pub struct Registry {
    port: u16,
    max_lifetime: Duration,
    drain_time: Duration,
    replay_window: u64,
    limits: Limits,
    max_services: usize,
    agent: Vec<Ipv6Addr>,
    servers: HashMap<String, ServerPolicy>,
    bindings: BTreeMap<BindingId, Binding>,
    last_mesg_id: HashMap<String, u64>,
    buckets: HashMap<IpAddr, Bucket>,
    counters: BTreeMap<String, u64>,
    probe: Option<RefreshProbe>,
    reverse_tunnel: Option<ReverseTunnel>,
    /// Reverse-tunnel monitoring, per server identity.
    reverse: BTreeMap<String, ReverseWatch>,
}

/// Whether a server's SYN-ACKs come back through the agent (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseState {
    /// Not watched: no reverse-tunnelled packet seen yet, or monitoring is not configured.
    Off,
    /// Watched: new flows get their SYN-ACKs back through the agent.
    Ok,
    /// Given new TCP flows for `suspect_after_ms` without a SYN-ACK coming back; a refresh
    /// request confirms (answered: silent) or refutes (unanswered: down).
    Suspect,
    /// Answered the refresh request, but its SYN-ACKs no longer come through the agent: not
    /// watched until they do again.
    Silent,
}

/// One server's reverse-tunnel watch.
#[derive(Debug, Clone)]
struct ReverseWatch {
    state: ReverseState,
    /// Sums over the server's real addresses at the last observation.
    syns: u64,
    packets: u64,
    /// Since when the server has been given new TCP flows with no reverse-tunnelled packet
    /// after them.
    waiting_since: Option<Instant>,
}

/// The reverse-tunnel side of a binding in `anycast-ctl bindings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReverseReport {
    /// The server's monitor state (all its bindings share it).
    pub state: ReverseState,
    /// TCP SYNs the agent forwarded to this binding's real address (all services).
    pub syns: u64,
    /// Packets (SYN-ACKs) the server reverse-tunnelled from this real address.
    pub syn_acks: u64,
    /// Seconds since the newest of them; absent: none yet.
    pub last_syn_ack_secs: Option<f64>,
}

/// One line of `anycast-ctl bindings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingReport {
    #[serde(flatten)]
    pub id: BindingId,
    pub state: BindingState,
    pub seq: u16,
    pub age_secs: f64,
    pub lifetime_secs: u64,
    pub lifetime_left_secs: f64,
    pub load: Option<LoadReport>,
    /// Health by refresh requests.
    pub condition: Condition,
    /// Published weight (free capacity, smoothed).
    pub weight: u32,
    /// Reverse-tunnel counters and monitor state.
    #[serde(default)]
    pub reverse: Option<ReverseReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub priority: u16,
    pub sessions_in_use: u32,
    pub max_sessions: u32,
    pub used_capacity: u32,
    pub max_capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingsReport {
    pub bindings: Vec<BindingReport>,
    pub counters: BTreeMap<String, u64>,
}

impl Registry {
    pub fn new(
        reg: &Registration,
        keys: &HashMap<String, Vec<u8>>,
        agent: &[IpAddr],
        max_services: usize,
    ) -> Registry {
        let servers = reg
            .servers
            .iter()
            .map(|s| {
                let policy = ServerPolicy {
                    spi: s.spi,
                    key: keys.get(&s.id).cloned().unwrap_or_default(),
                    allow: s.allow.clone(),
                };
                (s.id.clone(), policy)
            })
            .collect();
        Registry {
            port: reg.port,
            max_lifetime: Duration::from_secs(reg.max_lifetime as u64),
            drain_time: Duration::from_secs(reg.drain_time as u64),
            replay_window: reg.replay_window as u64,
            limits: reg.limits.clone(),
            max_services,
            agent: agent.iter().map(|&a| wire::to_mapped(a)).collect(),
            servers,
            bindings: BTreeMap::new(),
            last_mesg_id: HashMap::new(),
            buckets: HashMap::new(),
            counters: BTreeMap::new(),
            probe: reg.probe,
            reverse_tunnel: reg.reverse_tunnel,
            reverse: BTreeMap::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Takes a new policy (a reload) and keeps the bindings it still allows.
    pub fn update_policy(&mut self, new: Registry) -> bool {
        let bindings = std::mem::take(&mut self.bindings);
        let last = std::mem::take(&mut self.last_mesg_id);
        let counters = std::mem::take(&mut self.counters);
        let reverse = std::mem::take(&mut self.reverse);
        *self = new;
        self.last_mesg_id = last;
        self.counters = counters;
        if self.reverse_tunnel.is_some() {
            self.reverse = reverse;
        }
        let before = bindings.len();
        for (id, b) in bindings {
            let allowed = self
                .servers
                .get(&id.server)
                .is_some_and(|p| p.allow.iter().any(|a| a.contains(id.anycast)));
            if allowed {
                self.bindings.insert(id, b);
            } else {
                tracing::info!(
                    "binding of {} for {} via {} removed: no longer allowed",
                    id.server,
                    id.anycast,
                    id.real
                );
            }
        }
        self.bindings.len() != before
    }

    fn count(&mut self, what: impl Into<String>) -> String {
        let what = what.into();
        *self.counters.entry(what.clone()).or_default() += 1;
        what
    }

    fn allow_rate(&mut self, source: IpAddr, now: Instant) -> bool {
        let rate = self.limits.messages_per_second as f64;
        // Bounded memory: forget idle sources when the table grows large.
        if self.buckets.len() > 65536 {
            self.buckets
                .retain(|_, b| now.duration_since(b.last) < Duration::from_secs(10));
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens: 2.0 * rate,
            last: now,
        });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(2.0 * rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Handles one datagram from `from`. `wall` is the agent's clock as an NTP timestamp.
    pub fn handle(&mut self, payload: &[u8], from: SocketAddr, now: Instant, wall: u64) -> Outcome {
        let none = |counted: String| Outcome {
            reply: None,
            changed: false,
            counted,
        };
        if !self.allow_rate(from.ip(), now) {
            return none(self.count("dropped_rate_limited"));
        }
        let msg = match wire::decode(payload) {
            Ok(m) => m,
            Err(wire::WireError::UnknownMhType) => return self.binding_error(payload, from),
            Err(e) => return none(self.count(format!("dropped_malformed_{}", e.reason()))),
        };
        let Body::BindingUpdate { seq, lifetime, .. } = msg.body else {
            return none(self.count("dropped_not_binding_update"));
        };
        if !self.agent.contains(&msg.dst) {
            return none(self.count("dropped_not_for_this_agent"));
        }
        let home = wire::from_mapped(msg.src);
        // Identify and authenticate before anything else is believed.
        let Some(identity) = msg.options.mn_id.clone() else {
            return self.refuse(&msg, from, status::ID_MISMATCH, seq, None);
        };
        let Some(policy) = self.servers.get(&identity) else {
            tracing::warn!("binding update from {from} for unknown server '{identity}' refused");
            return self.refuse(&msg, from, status::ID_MISMATCH, seq, None);
        };
        let key = Key {
            spi: policy.spi,
            secret: &policy.key,
        };
        let spi_ok = msg.options.auth.is_some_and(|a| a.spi == policy.spi);
        if !spi_ok || !wire::verify(payload, key) {
            tracing::warn!(
                "binding update from {from} claiming to be '{identity}' failed authentication"
            );
            return self.refuse(&msg, from, status::AUTH_FAILED, seq, None);
        }
        let signer = Some(identity.clone());
        // Replay protection: the timestamp must be near our clock and newer than the last one.
        let fresh = msg.options.mesg_id.is_some_and(|ts| {
            let skew = (ts >> 32).abs_diff(wall >> 32);
            skew <= self.replay_window
                && self
                    .last_mesg_id
                    .get(&identity)
                    .is_none_or(|&last| ts > last)
        });
        if !fresh {
            tracing::warn!(
                "binding update from '{identity}' at {from} refused: replayed or stale timestamp"
            );
            return self.refuse(&msg, from, status::MESG_ID_REQUIRED, seq, signer);
        }
        self.last_mesg_id
            .insert(identity.clone(), msg.options.mesg_id.unwrap_or_default());
        let Some(coa) = msg.options.alt_coa else {
            return self.refuse(&msg, from, STATUS_UNSPECIFIED, seq, signer);
        };
        let real = wire::from_mapped(coa);
        let policy = &self.servers[&identity];
        if !policy.allow.iter().any(|p| p.contains(home))
            || real.is_unspecified()
            || real.is_multicast()
        {
            tracing::warn!("'{identity}' is not authorized to bind {home} (via {real}): refused");
            return self.refuse(&msg, from, status::PROHIBITED, seq, signer);
        }
        let id = BindingId {
            anycast: home,
            selector: msg
                .options
                .service
                .map(|s: ServiceSelector| (s.protocol, s.port)),
            server: identity.clone(),
            real,
        };
        if let Some(b) = self.bindings.get(&id) {
            // Sequence numbers compare modulo 2^16 (RFC 6275 9.5.1).
            if (seq.wrapping_sub(b.seq) as i16) <= 0 {
                let last = b.seq;
                return self.refuse(&msg, from, status::SEQUENCE_OUT_OF_WINDOW, last, signer);
            }
        }
        if lifetime == 0 {
            let changed = match self.bindings.get_mut(&id) {
                Some(b) if self.drain_time > Duration::ZERO => {
                    b.seq = seq;
                    let was = b.state;
                    b.state = BindingState::Draining;
                    b.expires = now + self.drain_time;
                    if was == BindingState::Active {
                        tracing::info!(
                            "'{identity}' deregistered {home} via {real}: draining for {:?}",
                            self.drain_time
                        );
                    }
                    was == BindingState::Active
                }
                Some(_) => {
                    self.bindings.remove(&id);
                    tracing::info!("'{identity}' deregistered {home} via {real}");
                    true
                }
                None => false,
            };
            let counted = self.count("deregistered");
            let reply = self.ack(&msg, from, status::ACCEPTED, seq, 0, signer);
            return Outcome {
                reply,
                changed,
                counted,
            };
        }
        let is_new = !self.bindings.contains_key(&id);
        if is_new {
            if let Some(why) = self.over_limit(&id) {
                tracing::warn!("binding of '{identity}' for {home} via {real} refused: {why}");
                return self.refuse(&msg, from, status::INSUFFICIENT_RESOURCES, seq, signer);
            }
        }
        let granted = Duration::from_secs(lifetime as u64 * 4).min(self.max_lifetime);
        let units = (granted.as_secs() / 4) as u16;
        let load = msg.options.load;
        let probe_limit = self.probe.map_or(u32::MAX, |p| p.misses);
        let changed = match self.bindings.get_mut(&id) {
            Some(b) => {
                let was = b.condition();
                let mut changed = b.state != BindingState::Active;
                changed |= b.smoother.update(load.as_ref());
                changed |= b.load.map(|l| l.priority) != load.map(|l| l.priority);
                // Any update answers an outstanding probe.
                b.probe_sent = None;
                b.probe_misses = 0;
                b.probe_urgent = false;
                if was != Condition::Up {
                    tracing::info!(
                        "'{}' for {} via {} is up again",
                        id.server,
                        id.anycast,
                        id.real
                    );
                    changed = true;
                }
                b.seq = seq;
                b.updated = now;
                b.expires = now + granted;
                b.lifetime = granted;
                b.load = load;
                b.state = BindingState::Active;
                b.source = from;
                b.refresh_requested = false;
                changed |= self.reverse_answered(&id);
                changed
            }
            None => {
                tracing::info!("'{identity}' registered {home} via {real} for {granted:?}");
                let mut smoother = Smoother::default();
                smoother.update(load.as_ref());
                let b = Binding {
                    seq,
                    registered: now,
                    updated: now,
                    expires: now + granted,
                    lifetime: granted,
                    load,
                    state: BindingState::Active,
                    source: from,
                    refresh_requested: false,
                    smoother,
                    probe_sent: None,
                    probe_next: now,
                    probe_misses: 0,
                    probe_limit,
                    probe_urgent: false,
                };
                self.bindings.insert(id, b);
                true
            }
        };
        let counted = self.count(if is_new { "registered" } else { "refreshed" });
        let reply = self.ack(&msg, from, status::ACCEPTED, seq, units, signer);
        Outcome {
            reply,
            changed,
            counted,
        }
    }

    /// RFC 6275 9.2: an unknown MH type is answered with a Binding Error, status 2.
    fn binding_error(&mut self, payload: &[u8], from: SocketAddr) -> Outcome {
        let addr = |at: usize| {
            <[u8; 16]>::try_from(&payload[at..at + 16])
                .map(Ipv6Addr::from)
                .ok()
        };
        let (src, dst) = (addr(8), addr(24));
        let counted = self.count("dropped_malformed_unknown_mh_type");
        let reply = match (src, dst) {
            (Some(src), Some(dst)) if self.agent.contains(&dst) => {
                self.count("binding_errors_sent");
                let be = Message {
                    src: dst,
                    dst: src,
                    body: Body::BindingError {
                        status: STATUS_UNKNOWN_MH_TYPE,
                        home: src,
                    },
                    options: Options::default(),
                };
                Some(Reply {
                    to: from,
                    payload: wire::encode(&be, None),
                })
            }
            _ => None,
        };
        Outcome {
            reply,
            changed: false,
            counted,
        }
    }

    fn over_limit(&self, id: &BindingId) -> Option<String> {
        let per_address = self
            .bindings
            .keys()
            .filter(|k| k.anycast == id.anycast)
            .count();
        if per_address >= self.limits.bindings_per_address as usize {
            return Some(format!("{} already has {per_address} bindings", id.anycast));
        }
        let per_server = self
            .bindings
            .keys()
            .filter(|k| k.server == id.server)
            .count();
        if per_server >= self.limits.bindings_per_server as usize {
            return Some(format!("'{}' already has {per_server} bindings", id.server));
        }
        let mut keys: BTreeSet<ServiceKey> = BTreeSet::new();
        for k in self.bindings.keys().chain(std::iter::once(id)) {
            keys.extend(service_keys(k, &[]));
        }
        if keys.len() > self.max_services {
            return Some(format!(
                "the agent holds at most {} services",
                self.max_services
            ));
        }
        None
    }

    fn refuse(
        &mut self,
        msg: &Message,
        from: SocketAddr,
        st: u8,
        seq: u16,
        signer: Option<String>,
    ) -> Outcome {
        let counted = self.count(format!("refused_{st}"));
        let reply = self.ack(msg, from, st, seq, 0, signer);
        Outcome {
            reply,
            changed: false,
            counted,
        }
    }

    /// A Binding Acknowledgement, signed with the server's key when we know who it is.
    fn ack(
        &self,
        msg: &Message,
        from: SocketAddr,
        st: u8,
        seq: u16,
        lifetime: u16,
        signer: Option<String>,
    ) -> Option<Reply> {
        let ba = Message {
            src: msg.dst,
            dst: msg.src,
            body: Body::BindingAck {
                status: st,
                seq,
                lifetime,
            },
            options: Options::default(),
        };
        let key = signer
            .as_ref()
            .and_then(|s| self.servers.get(s))
            .map(|p| Key {
                spi: p.spi,
                secret: &p.key,
            });
        Some(Reply {
            to: from,
            payload: wire::encode(&ba, key),
        })
    }

    /// Removes expired bindings and those whose drain time is over. True if any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let gone: Vec<BindingId> = self
            .bindings
            .iter()
            .filter(|(_, b)| b.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &gone {
            let b = self.bindings.remove(id).expect("listed");
            match b.state {
                BindingState::Active => {
                    tracing::warn!(
                        "binding of '{}' for {} via {} expired",
                        id.server,
                        id.anycast,
                        id.real
                    );
                    self.count("expired");
                }
                BindingState::Draining => {
                    tracing::info!(
                        "'{}' for {} via {} finished draining",
                        id.server,
                        id.anycast,
                        id.real
                    );
                }
            }
        }
        !gone.is_empty()
    }

    /// Binding Refresh Requests for active bindings in the last quarter of their lifetime
    /// (once per lifetime), sent where their last update came from.
    pub fn refresh_requests(&mut self, now: Instant) -> Vec<Reply> {
        let mut out = Vec::new();
        for (id, b) in self.bindings.iter_mut() {
            if b.state != BindingState::Active
                || b.refresh_requested
                || b.expires.saturating_duration_since(now) > b.lifetime / 4
            {
                continue;
            }
            b.refresh_requested = true;
            let Some(policy) = self.servers.get(&id.server) else {
                continue;
            };
            let agent = self
                .agent
                .iter()
                .find(|a| a.to_ipv4_mapped().is_some() == id.anycast.is_ipv4())
                .or(self.agent.first());
            let Some(&agent) = agent else { continue };
            let brr = Message {
                src: agent,
                dst: wire::to_mapped(id.anycast),
                body: Body::BindingRefreshRequest,
                options: Options::default(),
            };
            out.push(Reply {
                to: b.source,
                payload: wire::encode(
                    &brr,
                    Some(Key {
                        spi: policy.spi,
                        secret: &policy.key,
                    }),
                ),
            });
        }
        for _ in 0..out.len() {
            self.count("refresh_requests_sent");
        }
        out
    }

    /// The configured services plus those the bindings bring, with their servers.
    /// Health by refresh requests: asks every active binding for an update each interval;
    /// a probe unanswered within the timeout is a miss. Returns the requests to send and
    /// whether a binding's condition changed.
    pub fn probe(&mut self, now: Instant) -> (Vec<Reply>, bool) {
        let Some(cfg) = self.probe else {
            return (Vec::new(), false);
        };
        let (interval, timeout) = (
            Duration::from_millis(cfg.interval_ms),
            Duration::from_millis(cfg.timeout_ms),
        );
        let mut changed = false;
        let mut misses = 0;
        // One request per server, home address and source: the server answers it with an
        // update for every binding of that home address.
        let mut due: BTreeSet<(String, IpAddr, SocketAddr)> = BTreeSet::new();
        for (id, b) in self.bindings.iter_mut() {
            if b.state != BindingState::Active {
                continue;
            }
            if let Some(sent) = b.probe_sent {
                if now < sent + timeout {
                    continue;
                }
                b.probe_sent = None;
                let before = b.condition();
                b.probe_misses = b.probe_misses.saturating_add(1);
                misses += 1;
                let after = b.condition();
                if b.probe_urgent {
                    if after == Condition::Down {
                        b.probe_urgent = false;
                    } else {
                        // Confirm a reverse-tunnel suspicion at once, not at the interval.
                        b.probe_next = now;
                    }
                }
                if after != before {
                    changed = true;
                    tracing::warn!(
                        "'{}' for {} via {} is {after:?}: {} refresh requests unanswered",
                        id.server,
                        id.anycast,
                        id.real,
                        b.probe_misses
                    );
                }
            }
            if now >= b.probe_next {
                due.insert((id.server.clone(), id.anycast, b.source));
            }
        }
        for (id, b) in self.bindings.iter_mut() {
            if b.state == BindingState::Active
                && due.contains(&(id.server.clone(), id.anycast, b.source))
            {
                b.probe_sent = Some(now);
                b.probe_next = now + interval;
            }
        }
        let mut out = Vec::new();
        for (server, anycast, source) in due {
            let Some(policy) = self.servers.get(&server) else {
                continue;
            };
            let agent = self
                .agent
                .iter()
                .find(|a| a.to_ipv4_mapped().is_some() == anycast.is_ipv4())
                .or(self.agent.first());
            let Some(&agent) = agent else { continue };
            let brr = Message {
                src: agent,
                dst: wire::to_mapped(anycast),
                body: Body::BindingRefreshRequest,
                options: Options::default(),
            };
            out.push(Reply {
                to: source,
                payload: wire::encode(
                    &brr,
                    Some(Key {
                        spi: policy.spi,
                        secret: &policy.key,
                    }),
                ),
            });
        }
        *self.counters.entry("probes_sent".into()).or_default() += out.len() as u64;
        *self.counters.entry("probes_missed".into()).or_default() += misses;
        (out, changed)
    }

    /// Whether reverse-tunnel monitoring is configured.
    pub fn reverse_monitoring(&self) -> bool {
        self.reverse_tunnel.is_some()
    }

    /// Reverse-tunnel monitoring: takes the data path's counters (per real address: SYNs
    /// forwarded, reverse-tunnelled packets received) and moves each server's watch (see the
    /// module documentation). A server that becomes suspect gets refresh requests at once
    /// (sent by the next [`Registry::probe`]). Returns whether a binding's condition changed.
    ///
    /// New flows are seen as rises of the SYN counter between two calls, so a call's
    /// interval (the agent calls every 50 ms) is the resolution of `suspect_after_ms`.
    pub fn watch_reverse(
        &mut self,
        now: Instant,
        counters: &BTreeMap<IpAddr, ReverseCounters>,
    ) -> bool {
        let Some(cfg) = self.reverse_tunnel else {
            return false;
        };
        let window = Duration::from_millis(cfg.suspect_after_ms);
        // Per server: the sums over the distinct real addresses of its active bindings.
        let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut seen: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        for id in self.bindings.keys() {
            let s = sums.entry(id.server.clone()).or_default();
            if self.bindings[id].state == BindingState::Active
                && seen.insert((id.server.clone(), id.real))
            {
                let c = counters.get(&id.real).copied().unwrap_or_default();
                s.0 += c.syns;
                s.1 += c.reverse_packets;
            }
        }
        self.reverse.retain(|server, _| sums.contains_key(server));
        let mut suspects = Vec::new();
        let mut changed = false;
        for (server, (syns, packets)) in sums {
            let w = self.reverse.entry(server.clone()).or_insert(ReverseWatch {
                state: ReverseState::Off,
                syns,
                packets: 0,
                waiting_since: None,
            });
            // A counter that went down was reset (an address left and came back): rebase.
            let new_syns = syns > w.syns;
            let new_packets = packets > w.packets;
            w.syns = syns;
            w.packets = packets;
            let before = w.state;
            if new_packets {
                // Everything forwarded before now counts as answered.
                w.waiting_since = None;
                w.state = ReverseState::Ok;
            } else if w.state == ReverseState::Ok {
                if new_syns && w.waiting_since.is_none() {
                    w.waiting_since = Some(now);
                }
                if w.waiting_since
                    .is_some_and(|t| now.duration_since(t) >= window)
                {
                    w.state = ReverseState::Suspect;
                    w.waiting_since = None;
                    suspects.push(server.clone());
                }
            }
            if w.state == before {
                continue;
            }
            changed |= before == ReverseState::Suspect || w.state == ReverseState::Suspect;
            match (before, w.state) {
                (ReverseState::Off, _) => tracing::info!(
                    "'{server}' reverse-tunnels its SYN-ACKs: watching it (suspect after \
                     {} ms of new flows without one)",
                    cfg.suspect_after_ms
                ),
                (_, ReverseState::Suspect) => tracing::warn!(
                    "'{server}' is suspect: given new TCP flows for {} ms without a \
                     reverse-tunnelled SYN-ACK; sending refresh requests",
                    cfg.suspect_after_ms
                ),
                _ => {
                    tracing::info!("'{server}' reverse-tunnels its SYN-ACKs again (was {before:?})")
                }
            }
        }
        for server in suspects {
            self.count("reverse_suspected");
            for (id, b) in self.bindings.iter_mut() {
                if id.server == server && b.state == BindingState::Active {
                    b.probe_urgent = true;
                    if b.probe_sent.is_none() {
                        b.probe_next = now;
                    }
                }
            }
        }
        changed
    }

    /// An update arrived from `id`'s server: if the reverse-tunnel monitor suspected it,
    /// it is alive but its SYN-ACKs do not come through us. Returns whether its condition
    /// changed.
    fn reverse_answered(&mut self, id: &BindingId) -> bool {
        let Some(w) = self.reverse.get_mut(&id.server) else {
            return false;
        };
        if w.state != ReverseState::Suspect {
            return false;
        }
        w.state = ReverseState::Silent;
        w.waiting_since = None;
        tracing::warn!(
            "'{}' answered the refresh request, but its SYN-ACKs no longer come through the \
             agent: up; reverse-tunnel monitoring of it paused until they do",
            id.server
        );
        self.count("reverse_silent");
        true
    }

    /// The configured services plus those the bindings bring, with every binding as a
    /// candidate server (weight from its load, tier from its priority, probe condition).
    pub fn plan(&self, configured: &[ServicePlan]) -> Vec<ServicePlan> {
        let mut services: BTreeMap<ServiceKey, ServicePlan> =
            configured.iter().map(|s| (s.key, s.clone())).collect();
        let configured_keys: Vec<ServiceKey> = configured.iter().map(|s| s.key).collect();
        for (id, b) in &self.bindings {
            for key in service_keys(id, &configured_keys) {
                let svc = services.entry(key).or_insert_with(|| ServicePlan {
                    name: service_name(&key),
                    key,
                    candidates: Vec::new(),
                    preferences: Vec::new(),
                });
                if svc.candidates.iter().any(|s| s.address == id.real) {
                    continue;
                }
                svc.candidates.push(Candidate {
                    name: id.server.clone(),
                    address: id.real,
                    weight: b.smoother.weight(),
                    priority: b.load.map_or(0, |l| l.priority),
                    condition: self.condition(id, b),
                    draining: b.state == BindingState::Draining,
                });
            }
        }
        services.into_values().collect()
    }

    /// `plan` and selection without health checks or operator drains.
    pub fn desired(&self, configured: &[DesiredService]) -> Vec<DesiredService> {
        let configured: Vec<ServicePlan> =
            configured.iter().map(ServicePlan::from_desired).collect();
        self.plan(&configured)
            .iter()
            .map(ServicePlan::to_desired)
            .collect()
    }

    /// The binding's condition: its probes', made at least suspect while the reverse-tunnel
    /// monitor suspects its server (suspect keeps the share; only probe misses take it).
    fn condition(&self, id: &BindingId, b: &Binding) -> Condition {
        let reverse = match self.reverse.get(&id.server) {
            Some(w) if w.state == ReverseState::Suspect && b.state == BindingState::Active => {
                Condition::Suspect
            }
            _ => Condition::Up,
        };
        b.condition().max(reverse)
    }

    /// The bindings and counters. `reverse`: the data path's reverse-tunnel counters per
    /// real address, if read.
    pub fn report(
        &self,
        now: Instant,
        reverse: Option<&BTreeMap<IpAddr, ReverseCounters>>,
    ) -> BindingsReport {
        let clock = crate::dataplane::coarse_clock_ns();
        let bindings = self
            .bindings
            .iter()
            .map(|(id, b)| BindingReport {
                id: id.clone(),
                state: b.state,
                seq: b.seq,
                age_secs: now.duration_since(b.registered).as_secs_f64(),
                lifetime_secs: b.lifetime.as_secs(),
                lifetime_left_secs: b.expires.saturating_duration_since(now).as_secs_f64(),
                condition: self.condition(id, b),
                weight: b.smoother.weight(),
                reverse: reverse.map(|r| {
                    let c = r.get(&id.real).copied().unwrap_or_default();
                    ReverseReport {
                        state: self
                            .reverse
                            .get(&id.server)
                            .map_or(ReverseState::Off, |w| w.state),
                        syns: c.syns,
                        syn_acks: c.reverse_packets,
                        last_syn_ack_secs: (c.last_reverse_ns > 0)
                            .then(|| clock.saturating_sub(c.last_reverse_ns) as f64 / 1e9),
                    }
                }),
                load: b.load.map(|l| LoadReport {
                    priority: l.priority,
                    sessions_in_use: l.sessions_in_use,
                    max_sessions: l.max_sessions,
                    used_capacity: l.used_capacity,
                    max_capacity: l.max_capacity,
                }),
            })
            .collect();
        BindingsReport {
            bindings,
            counters: self.counters.clone(),
        }
    }
}

/// The services a binding joins: its own (address, protocol, port) when it named one; else
/// every configured service of the address; else the whole address (TCP and UDP, any port).
fn service_keys(id: &BindingId, configured: &[ServiceKey]) -> Vec<ServiceKey> {
    if let Some((proto, port)) = id.selector {
        return vec![ServiceKey::new(id.anycast, proto, port)];
    }
    let of_address: Vec<ServiceKey> = configured
        .iter()
        .filter(|k| k.ip() == id.anycast)
        .copied()
        .collect();
    if !of_address.is_empty() {
        return of_address;
    }
    vec![
        ServiceKey::new(id.anycast, PROTO_TCP, 0),
        ServiceKey::new(id.anycast, PROTO_UDP, 0),
    ]
}

fn service_name(key: &ServiceKey) -> String {
    let proto = match key.proto {
        PROTO_TCP => "tcp".to_string(),
        PROTO_UDP => "udp".to_string(),
        p => p.to_string(),
    };
    if key.port == 0 {
        format!("{}/{proto}", key.ip())
    } else {
        format!("{}/{proto}/{}", key.ip(), key.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RegisteredServer, ReverseTunnel};

    const AGENT: &str = "10.0.0.1";
    const KEY1: &[u8] = b"0123456789abcdef-server-one";
    const KEY2: &[u8] = b"fedcba9876543210-server-two";

    fn registration(limits: Limits, drain: u32) -> Registration {
        let server = |id: &str, spi: u32, allow: &[&str]| RegisteredServer {
            id: id.into(),
            spi,
            key_file: "unused".into(),
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
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
                server("s1", 1, &["192.0.2.1", "2001:db8::/64"]),
                server("s2", 2, &["192.0.2.0/24"]),
            ],
        }
    }

    fn registry(limits: Limits, drain: u32) -> Registry {
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

    struct Bu {
        id: &'static str,
        key: &'static [u8],
        spi: u32,
        home: &'static str,
        real: &'static str,
        seq: u16,
        lifetime: u16,
        ts: u64,
    }

    impl Bu {
        fn new(seq: u16, ts: u64) -> Bu {
            Bu {
                id: "s1",
                key: KEY1,
                spi: 1,
                home: "192.0.2.1",
                real: "10.0.2.11",
                seq,
                lifetime: 5,
                ts,
            }
        }
        fn bytes(&self) -> Vec<u8> {
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
                    load: Some(LoadInfo {
                        sessions_in_use: 3,
                        ..Default::default()
                    }),
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

    const WALL: u64 = 4_000_000_000 << 32;
    fn from() -> SocketAddr {
        "10.0.2.11:5000".parse().unwrap()
    }

    fn ba_status(o: &Outcome, key: Option<&[u8]>, spi: u32) -> (u8, u16, u16) {
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

    #[test]
    fn a_valid_update_registers_and_is_acknowledged() {
        let mut r = registry(Limits::default(), 30);
        let now = Instant::now();
        let o = r.handle(&Bu::new(10, WALL).bytes(), from(), now, WALL);
        assert!(o.changed);
        assert_eq!(o.counted, "registered");
        assert_eq!(ba_status(&o, Some(KEY1), 1), (status::ACCEPTED, 10, 5));
        let services = r.desired(&[]);
        assert_eq!(
            services.len(),
            2,
            "the whole address: tcp and udp, any port"
        );
        assert_eq!(
            services[0].servers[0].address,
            "10.0.2.11".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            services[0].servers[0].weight,
            crate::selection::DEFAULT_WEIGHT,
            "no capacity reported"
        );
        let report = r.report(now, None);
        assert_eq!(report.bindings[0].load.as_ref().unwrap().sessions_in_use, 3);
        // A refresh with a newer sequence number is accepted and changes nothing.
        let o = r.handle(&Bu::new(11, WALL + 1).bytes(), from(), now, WALL);
        assert_eq!((o.counted.as_str(), o.changed), ("refreshed", false));
    }

    #[test]
    fn forged_replayed_unauthorized_and_stale_updates_change_nothing() {
        let mut r = registry(Limits::default(), 30);
        let now = Instant::now();
        let good = Bu::new(10, WALL).bytes();
        assert!(r.handle(&good, from(), now, WALL).changed);
        let before = r.desired(&[]);
        // Wrong key (s2 forging s1).
        let forged = Bu {
            key: KEY2,
            ..Bu::new(11, WALL + 1)
        };
        let o = r.handle(&forged.bytes(), from(), now, WALL);
        assert_eq!(ba_status(&o, None, 0).0, status::AUTH_FAILED);
        // Right key, wrong SPI.
        let o = r.handle(
            &Bu {
                spi: 2,
                ..Bu::new(11, WALL + 2)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        assert_eq!(ba_status(&o, None, 0).0, status::AUTH_FAILED);
        // The same bytes again: a replay.
        let o = r.handle(&good, from(), now, WALL);
        assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::MESG_ID_REQUIRED);
        // A timestamp far from the agent's clock.
        let o = r.handle(&Bu::new(12, WALL + (100 << 32)).bytes(), from(), now, WALL);
        assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::MESG_ID_REQUIRED);
        // An address s1 may not bind.
        let o = r.handle(
            &Bu {
                home: "192.0.2.2",
                ..Bu::new(13, WALL + 3)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        assert_eq!(ba_status(&o, Some(KEY1), 1).0, status::PROHIBITED);
        // An unknown server.
        let o = r.handle(
            &Bu {
                id: "s9",
                ..Bu::new(14, WALL + 4)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        assert_eq!(ba_status(&o, None, 0).0, status::ID_MISMATCH);
        // An old sequence number: refused with the last accepted one.
        let o = r.handle(&Bu::new(9, WALL + 5).bytes(), from(), now, WALL);
        assert_eq!(
            ba_status(&o, Some(KEY1), 1),
            (status::SEQUENCE_OUT_OF_WINDOW, 10, 0)
        );
        // Garbage.
        let o = r.handle(&[0u8; 7], from(), now, WALL);
        assert!(
            o.reply.is_none() && o.counted.starts_with("dropped_malformed_"),
            "{o:?}"
        );
        assert_eq!(r.desired(&[]), before, "nothing changed");
        let c = r.report(now, None).counters;
        assert_eq!(c["refused_146"], 2);
        assert_eq!(c["refused_145"], 2);
        assert_eq!(c["refused_129"], 1);
        assert_eq!(c["refused_144"], 1);
        assert_eq!(c["refused_135"], 1);
    }

    #[test]
    fn an_unknown_message_type_gets_a_binding_error() {
        let mut r = registry(Limits::default(), 30);
        let mut bytes = Bu::new(1, WALL).bytes();
        bytes[40 + 2] = 42; // MH type
                            // Keep the checksum right, so only the type is wrong: the checksum covers the type
                            // byte in the high half of its 16-bit word.
        let sum = u16::from_be_bytes([bytes[44], bytes[45]]) as u32;
        let fixed = (sum + ((5u32) << 8) + 0xffff - (42u32 << 8)) % 0xffff;
        [bytes[44], bytes[45]] = (fixed as u16).to_be_bytes();
        let o = r.handle(&bytes, from(), Instant::now(), WALL);
        assert_eq!(o.counted, "dropped_malformed_unknown_mh_type");
        let reply = o.reply.expect("a binding error");
        let be = wire::decode(&reply.payload).unwrap();
        assert_eq!(
            be.body,
            Body::BindingError {
                status: 2,
                home: wire::to_mapped("192.0.2.1".parse().unwrap())
            }
        );
        assert!(!o.changed);
    }

    #[test]
    fn unanswered_refresh_probes_make_a_binding_suspect_then_down_and_an_update_heals_it() {
        let mut r = registry(Limits::default(), 30);
        let t0 = Instant::now();
        r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
        let (sent, changed) = r.probe(t0);
        assert_eq!((sent.len(), changed), (1, false));
        assert_eq!(
            wire::decode(&sent[0].payload).unwrap().body,
            Body::BindingRefreshRequest
        );
        // Unanswered past the timeout: suspect (keeps its share until confirmed).
        let (_, changed) = r.probe(t0 + Duration::from_millis(600));
        assert!(changed);
        assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Suspect);
        assert!(r.desired(&[])[0].servers[0].up);
        // The next probe goes out at the interval and is missed too: down.
        let (sent, _) = r.probe(t0 + Duration::from_millis(1000));
        assert_eq!(sent.len(), 1);
        let (_, changed) = r.probe(t0 + Duration::from_millis(1600));
        assert!(changed);
        assert!(!r.desired(&[])[0].servers[0].up, "down: its flows move");
        // An update (the answer to a probe) brings it back.
        let o = r.handle(
            &Bu::new(2, WALL + 1).bytes(),
            from(),
            t0 + Duration::from_millis(1700),
            WALL,
        );
        assert!(o.changed);
        let s = &r.desired(&[])[0].servers[0];
        assert!(s.up && s.weight > 0);
    }

    fn reverse_counters(syns: u64, packets: u64) -> BTreeMap<IpAddr, ReverseCounters> {
        BTreeMap::from([(
            "10.0.2.11".parse().unwrap(),
            ReverseCounters {
                syns,
                reverse_packets: packets,
                last_reverse_ns: packets,
            },
        )])
    }

    fn reverse_state(r: &Registry) -> ReverseState {
        r.report(Instant::now(), Some(&reverse_counters(0, 0)))
            .bindings[0]
            .reverse
            .as_ref()
            .unwrap()
            .state
    }

    #[test]
    fn reverse_monitor_suspects_a_silent_server_and_confirms_with_refresh_requests() {
        let mut r = registry(Limits::default(), 30);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
        // The regular probe at registration, answered.
        assert_eq!(r.probe(t0).0.len(), 1);
        r.handle(&Bu::new(2, WALL + 1).bytes(), from(), ms(10), WALL);

        // New flows, but nothing reverse-tunnelled yet: not watched, never suspect.
        assert!(!r.watch_reverse(ms(20), &reverse_counters(5, 0)));
        assert!(!r.watch_reverse(ms(2000), &reverse_counters(50, 0)));
        assert_eq!(reverse_state(&r), ReverseState::Off);
        assert!(r.probe(ms(2000)).0.len() <= 1, "only the regular probe");
        r.handle(&Bu::new(3, WALL + 2).bytes(), from(), ms(2010), WALL);

        // The first SYN-ACK through the agent: watched.
        assert!(!r.watch_reverse(ms(2050), &reverse_counters(50, 1)));
        assert_eq!(reverse_state(&r), ReverseState::Ok);
        // SYNs answered within the window, and idle time, keep it ok.
        assert!(!r.watch_reverse(ms(2100), &reverse_counters(51, 1)));
        assert!(!r.watch_reverse(ms(2300), &reverse_counters(51, 2)));
        assert!(!r.watch_reverse(ms(9000), &reverse_counters(51, 2)));
        assert_eq!(reverse_state(&r), ReverseState::Ok);

        // A new flow at 9050 and no SYN-ACK: suspect once the 300 ms window is over, and a
        // refresh request goes out at once although the regular probe is not due.
        assert!(!r.watch_reverse(ms(9050), &reverse_counters(52, 2)));
        assert!(!r.watch_reverse(ms(9300), &reverse_counters(53, 2)));
        assert_eq!(reverse_state(&r), ReverseState::Ok, "within the window");
        assert!(r.watch_reverse(ms(9350), &reverse_counters(53, 2)));
        assert_eq!(reverse_state(&r), ReverseState::Suspect);
        assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Suspect);
        assert!(r.desired(&[])[0].servers[0].up, "suspect keeps its share");
        assert_eq!(r.report(t0, None).counters["reverse_suspected"], 1);
        let (sent, _) = r.probe(ms(9350));
        assert_eq!(sent.len(), 1);
        assert_eq!(
            wire::decode(&sent[0].payload).unwrap().body,
            Body::BindingRefreshRequest
        );
        // Still silent: no second suspicion while suspect.
        assert!(!r.watch_reverse(ms(9700), &reverse_counters(60, 2)));

        // It answers: up, and no longer watched while its SYN-ACKs go elsewhere.
        let o = r.handle(&Bu::new(4, WALL + 3).bytes(), from(), ms(9400), WALL);
        assert!(o.changed);
        assert_eq!(reverse_state(&r), ReverseState::Silent);
        assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Up);
        assert!(!r.watch_reverse(ms(20000), &reverse_counters(500, 2)));
        assert_eq!(reverse_state(&r), ReverseState::Silent);
        assert_eq!(r.report(t0, None).counters["reverse_silent"], 1);
        // Its SYN-ACKs come back through the agent: watched again.
        assert!(!r.watch_reverse(ms(20050), &reverse_counters(501, 3)));
        assert_eq!(reverse_state(&r), ReverseState::Ok);

        // Now it dies: suspect, then each unanswered refresh request is followed at once by
        // the next, so two misses (the configured `misses`) take 2 x 500 ms, not the 1 s
        // probe interval: down.
        assert!(!r.watch_reverse(ms(21000), &reverse_counters(502, 3)));
        assert!(r.watch_reverse(ms(21300), &reverse_counters(505, 3)));
        assert_eq!(r.probe(ms(21300)).0.len(), 1);
        let (sent, changed) = r.probe(ms(21800));
        assert!(changed, "first miss");
        assert_eq!(sent.len(), 1, "the next request at once");
        assert!(r.desired(&[])[0].servers[0].up);
        let (_, changed) = r.probe(ms(22300));
        assert!(changed, "second miss");
        assert!(!r.desired(&[])[0].servers[0].up, "down: its flows move");
        assert_eq!(r.report(t0, None).bindings[0].condition, Condition::Down);
        let (sent, _) = r.probe(ms(22310));
        assert!(sent.is_empty(), "back to the regular interval once down");
    }

    #[test]
    fn reverse_monitoring_is_off_unless_configured() {
        let mut reg = registration(Limits::default(), 30);
        reg.reverse_tunnel = None;
        let keys = HashMap::from([("s1".to_string(), KEY1.to_vec())]);
        let mut r = Registry::new(&reg, &keys, &[AGENT.parse().unwrap()], 64);
        let t0 = Instant::now();
        r.handle(&Bu::new(1, WALL).bytes(), from(), t0, WALL);
        assert!(!r.reverse_monitoring());
        r.watch_reverse(t0, &reverse_counters(1, 1));
        assert!(!r.watch_reverse(t0 + Duration::from_secs(5), &reverse_counters(9, 1)));
        let report = r.report(t0, Some(&reverse_counters(9, 1)));
        let rev = report.bindings[0].reverse.as_ref().unwrap();
        assert_eq!(
            (rev.state, rev.syns, rev.syn_acks),
            (ReverseState::Off, 9, 1),
            "counters shown, not watched"
        );
    }

    #[test]
    fn load_reports_set_the_weight() {
        let mut r = registry(Limits::default(), 30);
        let now = Instant::now();
        let with_load = |seq: u16, used: u32| {
            let mut m = wire::decode(&Bu::new(seq, WALL + seq as u64).bytes()).unwrap();
            m.options.load = Some(LoadInfo {
                used_capacity: used,
                max_capacity: 1000,
                ..Default::default()
            });
            wire::encode(
                &m,
                Some(Key {
                    spi: 1,
                    secret: KEY1,
                }),
            )
        };
        r.handle(&with_load(1, 0), from(), now, WALL);
        assert_eq!(r.desired(&[])[0].servers[0].weight, 1000);
        for seq in 2..30 {
            r.handle(&with_load(seq, 800), from(), now, WALL);
        }
        let w = r.desired(&[])[0].servers[0].weight;
        assert!(
            (200..=230).contains(&w),
            "weight follows free capacity: {w}"
        );
    }

    #[test]
    fn sequence_numbers_compare_modulo_2_16() {
        let mut r = registry(Limits::default(), 30);
        let now = Instant::now();
        assert!(
            r.handle(&Bu::new(65535, WALL).bytes(), from(), now, WALL)
                .changed
        );
        let o = r.handle(&Bu::new(2, WALL + 1).bytes(), from(), now, WALL);
        assert_eq!(o.counted, "refreshed", "2 is after 65535");
    }

    #[test]
    fn deregistration_drains_then_removes_and_expiry_removes() {
        let mut r = registry(Limits::default(), 10);
        let now = Instant::now();
        r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL);
        r.handle(
            &Bu {
                real: "10.0.2.12",
                ..Bu::new(1, WALL + 1)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        let o = r.handle(
            &Bu {
                lifetime: 0,
                ..Bu::new(2, WALL + 2)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        assert!(o.changed);
        assert_eq!(ba_status(&o, Some(KEY1), 1), (status::ACCEPTED, 2, 0));
        let svc = &r.desired(&[])[0];
        let w: Vec<(IpAddr, u32)> = svc.servers.iter().map(|s| (s.address, s.weight)).collect();
        assert!(
            w.contains(&("10.0.2.11".parse().unwrap(), 0)),
            "draining: no new flows: {w:?}"
        );
        assert!(w.contains(&(
            "10.0.2.12".parse().unwrap(),
            crate::selection::DEFAULT_WEIGHT
        )));
        assert!(!r.expire(now + Duration::from_secs(9)));
        assert!(r.expire(now + Duration::from_secs(10)), "drain time over");
        assert_eq!(r.desired(&[])[0].servers.len(), 1);
        // The other binding (lifetime 5 units = 20 s) expires by itself.
        assert!(r.expire(now + Duration::from_secs(20)));
        assert!(r.desired(&[]).is_empty());
        assert_eq!(r.report(now, None).counters["expired"], 1);
    }

    #[test]
    fn limits_refuse_with_insufficient_resources() {
        let limits = Limits {
            bindings_per_server: 1,
            ..Limits::default()
        };
        let mut r = registry(limits, 30);
        let now = Instant::now();
        assert!(
            r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL)
                .changed
        );
        let o = r.handle(
            &Bu {
                real: "10.0.2.12",
                ..Bu::new(1, WALL + 1)
            }
            .bytes(),
            from(),
            now,
            WALL,
        );
        assert_eq!(
            ba_status(&o, Some(KEY1), 1).0,
            status::INSUFFICIENT_RESOURCES
        );
        assert!(!o.changed);
    }

    #[test]
    fn a_flooding_source_is_rate_limited() {
        let limits = Limits {
            messages_per_second: 5,
            ..Limits::default()
        };
        let mut r = registry(limits, 30);
        let now = Instant::now();
        let outcomes: Vec<String> = (0..20)
            .map(|i| {
                r.handle(&Bu::new(i, WALL + i as u64).bytes(), from(), now, WALL)
                    .counted
            })
            .collect();
        let limited = outcomes
            .iter()
            .filter(|c| *c == "dropped_rate_limited")
            .count();
        assert_eq!(
            limited, 10,
            "a burst of twice the rate passes: {outcomes:?}"
        );
        // Another source is not affected.
        let other: SocketAddr = "10.0.2.99:5000".parse().unwrap();
        assert_ne!(
            r.handle(&Bu::new(100, WALL + 100).bytes(), other, now, WALL)
                .counted,
            "dropped_rate_limited"
        );
        // Tokens come back with time.
        let later = now + Duration::from_secs(1);
        assert_ne!(
            r.handle(&Bu::new(101, WALL + 101).bytes(), from(), later, WALL)
                .counted,
            "dropped_rate_limited"
        );
    }

    #[test]
    fn refresh_requests_go_out_once_in_the_last_quarter() {
        let mut r = registry(Limits::default(), 30);
        let now = Instant::now();
        r.handle(&Bu::new(1, WALL).bytes(), from(), now, WALL); // 20 s
        assert!(r.refresh_requests(now + Duration::from_secs(10)).is_empty());
        let brr = r.refresh_requests(now + Duration::from_secs(16));
        assert_eq!(brr.len(), 1);
        assert_eq!(brr[0].to, from());
        assert!(
            wire::verify(
                &brr[0].payload,
                Key {
                    spi: 1,
                    secret: KEY1
                }
            ),
            "BRR signed"
        );
        assert_eq!(
            wire::decode(&brr[0].payload).unwrap().body,
            Body::BindingRefreshRequest
        );
        assert!(
            r.refresh_requests(now + Duration::from_secs(17)).is_empty(),
            "once"
        );
    }

    #[test]
    fn a_selector_binds_one_service_and_configured_services_take_address_bindings() {
        let mut r = registry(Limits::default(), 30);
        let now = Instant::now();
        let mut bu = Bu::new(1, WALL);
        bu.home = "2001:db8::10";
        bu.real = "2001:db8:2::11";
        let mut msg = wire::decode(&bu.bytes()).unwrap();
        msg.options.service = Some(ServiceSelector {
            protocol: PROTO_TCP,
            port: 443,
        });
        msg.options.auth = None;
        let bytes = wire::encode(
            &msg,
            Some(Key {
                spi: 1,
                secret: KEY1,
            }),
        );
        assert!(r.handle(&bytes, from(), now, WALL).changed);
        let d = r.desired(&[]);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].key,
            ServiceKey::new("2001:db8::10".parse().unwrap(), PROTO_TCP, 443)
        );
        // An address binding joins the configured service of that address only.
        r.handle(&Bu::new(2, WALL + 1).bytes(), from(), now, WALL);
        let configured = DesiredService {
            name: "web".into(),
            key: ServiceKey::new("192.0.2.1".parse().unwrap(), PROTO_TCP, 80),
            servers: vec![],
            preferences: Vec::new(),
        };
        let d = r.desired(std::slice::from_ref(&configured));
        assert_eq!(d.len(), 2);
        let web = d.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.servers.len(), 1);
    }
}
