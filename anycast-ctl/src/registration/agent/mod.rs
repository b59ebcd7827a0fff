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
    dataplane::ReverseCounters,
    model::{Candidate, Condition, DesiredService, ServicePlan},
    selection::Smoother,
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

/// What the refresh-request probes came to, for the metrics: each answered probe's round
/// trip (at most [`ProbeOutcomes::KEPT`] between two takes; more are counted, not kept) and
/// the probes missed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeOutcomes {
    pub round_trips: Vec<Duration>,
    /// Answered beyond `KEPT` (no round trip kept).
    pub answered_unkept: u64,
    pub missed: u64,
}

impl ProbeOutcomes {
    pub const KEPT: usize = 4096;

    fn answered(&mut self, round_trip: Duration) {
        if self.round_trips.len() < Self::KEPT {
            self.round_trips.push(round_trip);
        } else {
            self.answered_unkept += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// The peer agent whose relay brought the last accepted update, or None when the server
    /// sent it to this agent. Only an agent a server talks to directly answers, asks for
    /// refreshes and probes it; the others keep the binding by the relayed refreshes.
    pub relayed_by: Option<String>,
    /// The last accepted message, verbatim, with the outer source it came from: what a
    /// snapshot sends to a peer, which re-verifies it as if the server had sent it.
    pub message: Option<StoredMessage>,
}

/// A server's signed message as it arrived, for relaying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub payload: Vec<u8>,
    /// The outer source of the datagram it came in (for a relayed one, the source the
    /// relaying agent vouched for).
    pub from: SocketAddr,
    /// Its MESG-ID timestamp (NTP).
    pub mesg_id: u64,
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
    /// The identity's own real addresses: its only possible care-of addresses and sources.
    real: Vec<Prefix>,
    /// Set when the policy is a certificate's (a certificate-signed registration, see
    /// `certificates`): no key (`key` is empty and never used), and `allow` and `real`
    /// are the certificate's prefixes.
    certificate: Option<CertHeld>,
}

/// A token bucket: one per server identity (after authentication, so a flood from one
/// server cannot starve the others and spoofers cannot use up its budget), and one for the
/// answers to messages that did not authenticate.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: 2.0 * rate,
            last: now,
        }
    }

    /// Takes a token if there is one; `rate` per second, a burst of twice that.
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(2.0 * rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Warnings of one kind: the first of each second is logged, the rest are summed up in one
/// line when the second is over.
struct LogWindow {
    start: Instant,
    suppressed: u64,
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
    /// The configured services' addresses: never a care-of address.
    anycast: BTreeSet<IpAddr>,
    servers: HashMap<String, ServerPolicy>,
    bindings: BTreeMap<BindingId, Binding>,
    last_mesg_id: HashMap<String, u64>,
    /// The agent's clock (NTP format) when it started: MESG-IDs older than this are refused,
    /// so an update captured before a restart cannot be replayed after it (the replay state
    /// itself survives a restart only through a state file, see `persist`).
    started: u64,
    buckets: HashMap<String, Bucket>,
    /// Answers to messages that did not authenticate, all senders together.
    unauthenticated: Option<Bucket>,
    logs: BTreeMap<&'static str, LogWindow>,
    counters: BTreeMap<String, u64>,
    probe: Option<RefreshProbe>,
    /// Refresh-request probes answered (round trips) and missed since the metrics last took
    /// them.
    probe_outcomes: ProbeOutcomes,
    reverse_tunnel: Option<ReverseTunnel>,
    /// Reverse-tunnel monitoring, per server identity.
    reverse: BTreeMap<String, ReverseWatch>,
    /// Something the state file holds changed since [`Registry::take_dirty`] last said so.
    dirty: bool,
    /// Prepended to counter names while a relayed message is handled (`relayed_...`).
    counter_prefix: &'static str,
    /// Agent discovery (see `discovery`): the addresses all agents share (IPv4-mapped; also
    /// in `agent`), the agents a reply lists, and each identity's newest request MESG-ID.
    discovery: Vec<Ipv6Addr>,
    discovery_agents: Vec<wire::AgentEntry>,
    last_discovery: HashMap<String, u64>,
    /// Certificate-signed registration (None: off), and the budget of its signature checks.
    certificates: Option<CertificatePolicy>,
    certificate_checks: Option<Bucket>,
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
                    real: s.real.clone(),
                    certificate: None,
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
            anycast: BTreeSet::new(),
            servers,
            bindings: BTreeMap::new(),
            last_mesg_id: HashMap::new(),
            started: 0,
            buckets: HashMap::new(),
            unauthenticated: None,
            logs: BTreeMap::new(),
            counters: BTreeMap::new(),
            probe: reg.probe,
            probe_outcomes: ProbeOutcomes::default(),
            reverse_tunnel: reg.reverse_tunnel,
            reverse: BTreeMap::new(),
            dirty: false,
            counter_prefix: "",
            discovery: Vec::new(),
            discovery_agents: Vec::new(),
            last_discovery: HashMap::new(),
            certificates: None,
            certificate_checks: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The configured services' addresses, which no server may use as its care-of address.
    pub fn with_service_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.anycast = addresses.into_iter().collect();
        self
    }

    /// Refuse MESG-IDs older than `wall` (the agent's start, NTP format): without a state
    /// file the replay state is not kept across restarts, so this is what stops a replay of
    /// an update captured before one.
    pub fn refusing_mesg_ids_before(mut self, wall: u64) -> Self {
        self.started = wall;
        self
    }

    /// Takes a new policy (a reload) and keeps the bindings it still allows.
    pub fn update_policy(&mut self, new: Registry) -> bool {
        let bindings = std::mem::take(&mut self.bindings);
        let last = std::mem::take(&mut self.last_mesg_id);
        let counters = std::mem::take(&mut self.counters);
        let reverse = std::mem::take(&mut self.reverse);
        let last_discovery = std::mem::take(&mut self.last_discovery);
        let servers = std::mem::take(&mut self.servers);
        let old_revoked = self.certificates.as_ref().map(|c| c.revoked.clone());
        let started = self.started;
        let dirty = self.dirty;
        *self = new;
        self.started = started;
        self.dirty = dirty;
        self.last_mesg_id = last;
        self.last_discovery = last_discovery;
        self.counters = counters;
        if self.reverse_tunnel.is_some() {
            self.reverse = reverse;
        }
        self.keep_newer_revocation_list(old_revoked);
        self.keep_certificate_identities(servers);
        let before = bindings.len();
        for (id, b) in bindings {
            let allowed = self.servers.get(&id.server).is_some_and(|p| {
                p.allow.iter().any(|a| a.contains(id.anycast))
                    && p.real.iter().any(|r| r.contains(id.real))
                    && (p.certificate.is_none()
                        || self
                            .certificates
                            .as_ref()
                            .is_some_and(|c| c.accepts(id.anycast, id.selector)))
            });
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
        let removed = self.bindings.len() != before;
        self.dirty |= removed;
        removed
    }

    /// A reply (acknowledgement, refusal, binding error or refresh request) was dropped
    /// because the registration socket's send queue was full: counted, never waited for.
    pub fn count_reply_dropped(&mut self) {
        self.count("replies_dropped_queue_full");
    }

    fn count(&mut self, what: impl Into<String>) -> String {
        let what = format!("{}{}", self.counter_prefix, what.into());
        *self.counters.entry(what.clone()).or_default() += 1;
        what
    }

    /// The per-identity budget (one bucket per configured identity: bounded memory).
    fn allow_rate(&mut self, identity: &str, now: Instant) -> bool {
        let rate = self.limits.messages_per_second as f64;
        self.buckets
            .entry(identity.to_string())
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// The global budget of answers to messages that did not authenticate.
    fn allow_unauthenticated_reply(&mut self, now: Instant) -> bool {
        let rate = self.limits.unauthenticated_replies_per_second as f64;
        let allowed = self
            .unauthenticated
            .get_or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now);
        if !allowed {
            self.count("replies_suppressed_unauthenticated");
        }
        allowed
    }

    /// Logs a warning of kind `reason` unless one of that kind was logged less than a second
    /// ago; those are counted and summed up once the second is over ([`Self::flush_logs`]).
    fn warn(&mut self, reason: &'static str, now: Instant, line: impl FnOnce() -> String) {
        match self.logs.get_mut(reason) {
            Some(w) if now.saturating_duration_since(w.start) < Duration::from_secs(1) => {
                w.suppressed += 1;
                self.count("log_lines_suppressed");
            }
            _ => {
                self.flush_log(reason);
                tracing::warn!("{}", line());
                self.logs.insert(
                    reason,
                    LogWindow {
                        start: now,
                        suppressed: 0,
                    },
                );
            }
        }
    }

    fn flush_log(&mut self, reason: &'static str) {
        if let Some(w) = self.logs.remove(reason) {
            if w.suppressed > 0 {
                tracing::warn!(
                    "{} more binding update(s) refused in the last second: {reason}",
                    w.suppressed
                );
            }
        }
    }

    /// Writes the summary line of every kind of warning whose second is over.
    pub fn flush_logs(&mut self, now: Instant) {
        let over: Vec<&'static str> = self
            .logs
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.start) >= Duration::from_secs(1))
            .map(|(&r, _)| r)
            .collect();
        for reason in over {
            self.flush_log(reason);
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

mod certificates;
#[cfg(test)]
mod certificates_tests;
mod discovery;
#[cfg(test)]
mod discovery_tests;
mod handle;
mod liveness;
mod persist;
#[cfg(test)]
mod persist_tests;
mod plan;
mod relayed;
#[cfg(test)]
mod relayed_tests;
mod report;
mod reverse_watch;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use certificates::CertHeld;
pub use certificates::{CertRefusal, CertificatePolicy};
pub use discovery::DiscoveryConfig;
pub use persist::{read_state_file, write_state_file, RegistryState, RestoreReport, STATE_FORMAT};
pub use relayed::{Relayed, SnapshotEntry, SnapshotExtra};
pub use report::{BindingReport, BindingsReport, LoadReport, ReverseReport};
pub use reverse_watch::ReverseState;
use reverse_watch::ReverseWatch;
