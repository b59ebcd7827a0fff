//! The agent's configuration file: JSON (with `//` comments), read whole and validated before anything changes.
//! Errors name the field (`services[1].servers[0].address`) and the reason.
use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anycast_common::{
    table, ServiceKey, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE, MAX_SERVERS,
};
use serde::{Deserialize, Serialize};

use crate::model::{Candidate, Condition, ServicePlan};

pub use certificates::{default_checks_per_second, CertificateRegistration};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces the XDP program is attached to (clients' packets arrive there, tunnelled
    /// packets leave there).
    pub interfaces: Vec<String>,
    /// `native` (driver mode, the default), `generic` (skb mode) or `auto` (kernel's choice).
    #[serde(default)]
    pub xdp_mode: XdpModeName,
    /// The agent's own addresses: source of the tunnels.
    pub agent_address: AgentAddress,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default = "default_max_services")]
    pub max_services: u32,
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// Consistent-hash tables for topology preferences, over all services.
    #[serde(default = "default_max_preference_tables")]
    pub max_preference_tables: u32,
    /// Statically configured services (and their static servers, if any).
    #[serde(default)]
    pub services: Vec<Service>,
    /// Servers that register themselves with binding updates. Absent: static servers only.
    #[serde(default)]
    pub registration: Option<Registration>,
    /// Active health checks of every server's real address (ICMP echo, TCP connect, HTTP GET,
    /// an operator's command). TCP and HTTP checks connect to the service port unless they
    /// name one; services on every port (port 0) need a port in the check.
    #[serde(default)]
    pub health_checks: Vec<crate::health::CheckConfig>,
    /// How long a flow keeps its server without packets (seconds): TCP, UDP, and TCP after
    /// the client's FIN or RST.
    #[serde(default)]
    pub flow_timeouts: crate::dataplane::FlowTimeouts,
    /// The data path answers ICMP echo requests (ping) to the services' anycast addresses
    /// itself. Off: they go to the agent's kernel, as before.
    #[serde(default = "default_true")]
    pub answer_ping: bool,
    /// ICMP errors about services' replies (fragmentation needed and other destination
    /// unreachables, packet too big), which routers send to the anycast address, are
    /// tunnelled to the server that sent the reply, so its path MTU discovery works. Off:
    /// they go to the agent's kernel, which has no use for them.
    #[serde(default = "default_true")]
    pub forward_icmp_errors: bool,
    /// Client packets too big for the tunnel (longer than the egress MTU less the outer
    /// header) are answered with ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6
    /// "packet too big" from the anycast address. Off: dropped silently.
    #[serde(default = "default_true")]
    pub answer_too_big: bool,
    /// At most this many of those answers per second from each CPU (a burst of as many).
    #[serde(default = "default_too_big_answers_per_second")]
    pub too_big_answers_per_second: u32,
    /// At most this many flows not seen opening (TCP packets other than a SYN with no
    /// handshake before them, UDP flows' first packets) are pinned per second by each CPU
    /// (a burst of as many); beyond it they go by the table unpinned, so a flood of them
    /// cannot evict pinned flows faster. SYNs are never pinned, their handshakes always.
    #[serde(default = "default_unseen_pins_per_second")]
    pub unseen_pins_per_second: u32,
    /// Topology preference, for every service: clients in these prefixes go to these servers
    /// (by name) first, while any of them can take new flows.
    #[serde(default)]
    pub preferences: Vec<PreferenceConfig>,
    /// Who may use the control socket besides root: `group` reads, `admin_group` also
    /// drains and reloads.
    #[serde(default)]
    pub control: Control,
    /// The name of this agent's state outside the process (pinned BPF objects, state
    /// files). Default: derived from the control socket's path, which is one per agent.
    #[serde(default)]
    pub instance: Option<String>,
    /// Where the instance keeps its files (bindings, the record of the maps, the original
    /// sysctl values). Default: `/run/anycast/INSTANCE`.
    #[serde(default)]
    pub state_directory: Option<PathBuf>,
    /// The bpffs directory of the instance's pinned maps and links. Default:
    /// `/sys/fs/bpf/anycast/INSTANCE`.
    #[serde(default)]
    pub pin_directory: Option<PathBuf>,
    /// The BGP speaker (BIRD 2) that announces the anycast addresses for this agent.
    /// Absent: the agent announces nothing (routes are the operator's business).
    #[serde(default)]
    pub routing: Option<Routing>,
    /// The Prometheus endpoint. Absent: no metrics are served.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

/// `metrics`: where `/metrics` is served (Prometheus text format).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ADDRESS:PORT` to listen on, e.g. `127.0.0.1:9464` (`[::1]:9464` for IPv6).
    pub listen: String,
}

impl MetricsConfig {
    /// The listen address, checked: an address and a non-zero port.
    pub fn address(&self) -> Result<std::net::SocketAddr, ConfigError> {
        let a: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            err(
                "metrics.listen",
                format!(
                    "'{}' is not ADDRESS:PORT (e.g. 127.0.0.1:9464, [::1]:9464)",
                    self.listen
                ),
            )
        })?;
        if a.port() == 0 {
            return Err(err("metrics.listen", "port 0: give the port to listen on"));
        }
        Ok(a)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreferenceConfig {
    pub clients: Vec<Prefix>,
    pub servers: Vec<String>,
}

/// The binding protocol's settings and its policy: which server may bind which addresses.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// UDP port the agent listens on, on its agent addresses.
    #[serde(default = "default_registration_port")]
    pub port: u16,
    /// Longest lifetime granted, in seconds; longer requests are cut to this.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: u32,
    /// After a server deregisters, its open flows stay on it this long (seconds); no new ones.
    #[serde(default = "default_drain_time")]
    pub drain_time: u32,
    /// A binding update's timestamp (MESG-ID) may differ from the agent's clock by this much.
    #[serde(default = "default_replay_window")]
    pub replay_window: u32,
    #[serde(default)]
    pub limits: Limits,
    /// Health by refresh requests: every binding is asked for a fresh update at this interval
    /// and must answer within the timeout; `misses` in a row make it down (one: suspect).
    /// `null` turns probing off (lifetime expiry still applies).
    #[serde(default = "default_probe")]
    pub probe: Option<RefreshProbe>,
    /// Reverse-tunnel monitoring: a server that sends its SYN-ACKs back through the agent
    /// (`anycast-ctl server --reverse-tunnel`) and then, while it is given new TCP flows,
    /// sends none for `suspect_after_ms`, is suspect and gets a refresh request at once (the
    /// probe's misses make it down). Absent: off (reverse-tunnelled packets are still
    /// forwarded and counted).
    #[serde(default)]
    pub reverse_tunnel: Option<ReverseTunnel>,
    /// Every server that may register: its identity, key and the addresses it may bind.
    pub servers: Vec<RegisteredServer>,
    /// Binding sync with peer agents serving the same anycast addresses: every binding
    /// message this agent accepts is relayed to them (see `crate::relay`). Absent: off.
    #[serde(default)]
    pub relay: Option<RelayConfig>,
    /// Agent discovery: an address every agent answers on (in production routed by anycast
    /// to the nearest agent). A server given only this address asks it for the list of
    /// agents (itself and its relay peers) and may send its binding updates to it. Absent:
    /// off.
    #[serde(default)]
    pub discovery_address: Option<AgentAddress>,
    /// Allow-list prefixes wider than this (IPv4, IPv6 prefix lengths) are warned about;
    /// `/0` is refused.
    #[serde(default = "security::default_widest_allow_v4")]
    pub widest_allow_v4: u8,
    #[serde(default = "security::default_widest_allow_v6")]
    pub widest_allow_v6: u8,
    /// Certificate-signed registration: servers with a certificate from the operator may
    /// register without a key. Absent: off.
    #[serde(default)]
    pub certificates: Option<CertificateRegistration>,
}

/// Binding sync between agents: this agent's identity, the UDP port of the relay channel
/// (on its agent addresses) and its peers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// This agent's identity, as its peers list it (1-64 bytes).
    pub id: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    /// How often digests of the binding table go to every peer (ms).
    #[serde(default = "default_digest_interval_ms")]
    pub digest_interval_ms: u64,
    pub peers: Vec<RelayPeer>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayPeer {
    /// The peer agent's identity (its `relay.id`).
    pub id: String,
    /// Where the peer's relay socket is (the port is `relay.port`); relay messages are
    /// taken only from this address.
    pub address: IpAddr,
    /// The key this agent and this peer share (hex, same rules as servers' keys), one per
    /// pair of agents: a key shared by more would let one agent pose as another.
    pub key_file: PathBuf,
    /// The peer's registration addresses: the servers' messages it relays are addressed to
    /// them. Default: `address`.
    #[serde(default)]
    pub agent_addresses: Vec<IpAddr>,
}

impl RelayPeer {
    pub fn registration_addresses(&self) -> Vec<IpAddr> {
        if self.agent_addresses.is_empty() {
            vec![self.address]
        } else {
            self.agent_addresses.clone()
        }
    }
}

pub const DEFAULT_RELAY_PORT: u16 = 4192;

fn default_relay_port() -> u16 {
    DEFAULT_RELAY_PORT
}

fn default_digest_interval_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefreshProbe {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub misses: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReverseTunnel {
    /// How long a monitored server may be given new TCP flows without a SYN-ACK coming back
    /// through the agent before it is suspect.
    #[serde(default = "default_suspect_after_ms")]
    pub suspect_after_ms: u64,
}

pub const DEFAULT_SUSPECT_AFTER_MS: u64 = 1000;
/// The agent reads the counters every 50 ms; a shorter window could not be measured.
pub const MIN_SUSPECT_AFTER_MS: u64 = 100;

fn default_suspect_after_ms() -> u64 {
    DEFAULT_SUSPECT_AFTER_MS
}

fn default_probe() -> Option<RefreshProbe> {
    Some(RefreshProbe {
        interval_ms: 1000,
        timeout_ms: 500,
        misses: 2,
    })
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub bindings_per_address: u32,
    pub bindings_per_server: u32,
    /// Authenticated binding messages handled per second from one server identity (a burst
    /// of twice that). Checked after authentication, so spoofed or forged messages cannot
    /// use up a server's budget.
    pub messages_per_second: u32,
    /// Answers (refusals, binding errors) per second, over all senders together, to
    /// messages that did not authenticate (a burst of twice that); the rest are counted and
    /// not answered.
    pub unauthenticated_replies_per_second: u32,
    /// Receive and send buffer of each registration socket, in bytes (set beyond
    /// `net.core.rmem_max`/`wmem_max`). Receiving: room for a burst while the agent works
    /// through it. Sending: room for answers that wait for a neighbour that may never
    /// answer (a spoofed source), so that they do not hold up refresh requests and
    /// acknowledgements to the servers.
    pub socket_buffer_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bindings_per_address: 256,
            bindings_per_server: 16,
            messages_per_second: 50,
            unauthenticated_replies_per_second: 100,
            socket_buffer_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisteredServer {
    /// The server's identity (MN-ID), e.g. `s1`.
    pub id: String,
    /// Security parameter index the server's messages carry.
    pub spi: u32,
    /// File with the server's secret key (hex); relative paths are relative to the config file.
    pub key_file: std::path::PathBuf,
    /// Anycast addresses or prefixes this server may bind (`10.71.100.1`, `fd71:100::/64`).
    pub allow: Vec<Prefix>,
    /// The server's own real addresses or prefixes: the only care-of addresses it may bind
    /// through, and the only sources its updates may come from (RFC 6275 section 6.1.8:
    /// anything else is an invalid care-of address, status 174).
    pub real: Vec<Prefix>,
}

fn default_registration_port() -> u16 {
    anycast_common::wire::DEFAULT_PORT
}
fn default_max_lifetime() -> u32 {
    600
}
fn default_drain_time() -> u32 {
    30
}
fn default_replay_window() -> u32 {
    30
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeName {
    #[default]
    Native,
    Generic,
    Auto,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentAddress {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// The anycast address.
    pub address: IpAddr,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// 1-65535, or 0 for every port of the address and protocol.
    pub port: u16,
    pub servers: Vec<Server>,
    /// This service's own health checks, instead of the top-level `health_checks`
    /// (`[]`: none). Absent: the top-level ones.
    #[serde(default)]
    pub health_checks: Option<Vec<crate::health::CheckConfig>>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => anycast_common::PROTO_TCP,
            Protocol::Udp => anycast_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub name: String,
    /// The server's real address: where tunnelled packets go.
    pub address: IpAddr,
    /// Share of new flows relative to the service's other servers; 0 drains the server.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}
fn default_max_services() -> u32 {
    DEFAULT_MAX_SERVICES
}
fn default_true() -> bool {
    true
}
fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}
fn default_max_preference_tables() -> u32 {
    anycast_common::DEFAULT_MAX_PREFERENCE_TABLES
}
fn default_weight() -> u32 {
    1
}
fn default_too_big_answers_per_second() -> u32 {
    crate::dataplane::DEFAULT_TOO_BIG_ANSWERS_PER_SECOND
}
fn default_unseen_pins_per_second() -> u32 {
    crate::dataplane::DEFAULT_UNSEEN_PINS_PER_SECOND
}

/// A configuration error: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}
impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Largest ring the map layout allows (the map holds two tables per service).
pub const MAX_RING_SIZE: u32 = 1 << 20;
pub const MAX_WEIGHT: u32 = 1_000_000;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text)
    }

    /// JSON with `//` comments (see comments.rs).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_json::from_str(&comments::strip(text))
            .map_err(|e| err("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// The services this configuration lists itself, as plans: their static servers are
    /// primary candidates, up, with their configured weights.
    pub fn service_plans(&self) -> Vec<ServicePlan> {
        self.services
            .iter()
            .map(|s| ServicePlan {
                name: s.name.clone(),
                key: ServiceKey::new(s.address, s.protocol.number(), s.port),
                candidates: s
                    .servers
                    .iter()
                    .map(|srv| Candidate {
                        name: srv.name.clone(),
                        address: srv.address,
                        weight: srv.weight,
                        priority: 0,
                        condition: Condition::Up,
                        draining: false,
                    })
                    .collect(),
                preferences: Vec::new(),
            })
            .collect()
    }

    /// Every health check: the top-level ones, then each service's own, in order; what the
    /// checker runs and what `Target::check` indexes.
    pub fn all_checks(&self) -> Vec<crate::health::CheckConfig> {
        let mut all = self.health_checks.clone();
        for s in &self.services {
            all.extend(s.health_checks.iter().flatten().cloned());
        }
        all
    }

    /// The indexes (into `all_checks`) of the checks that apply to a service: its own if it
    /// is configured with some, else the top-level ones.
    pub fn checks_of(&self, address: IpAddr, protocol: u8, port: u16) -> Vec<usize> {
        let mut next = self.health_checks.len();
        for s in &self.services {
            let own = s.health_checks.as_ref().map_or(0, Vec::len);
            if s.address == address && s.protocol.number() == protocol && s.port == port {
                if let Some(list) = &s.health_checks {
                    return (next..next + list.len()).collect();
                }
                break;
            }
            next += own;
        }
        (0..self.health_checks.len()).collect()
    }
}

impl Config {
    /// Reads every registered server's key file (relative paths from the config file's
    /// directory). A missing, bad, shared or unprotected key (see `registration::keys`)
    /// names its field.
    pub fn load_keys(
        &self,
        config_path: &Path,
    ) -> Result<std::collections::HashMap<String, Vec<u8>>, ConfigError> {
        let mut keys = std::collections::HashMap::new();
        let Some(r) = &self.registration else {
            return Ok(keys);
        };
        let dir = config_path.parent().unwrap_or(Path::new("."));
        let mut owners: std::collections::HashMap<Vec<u8>, &str> = Default::default();
        for (i, s) in r.servers.iter().enumerate() {
            let path = dir.join(&s.key_file);
            let key = crate::registration::keys::read_key(&path).map_err(|e| {
                err(
                    format!("registration.servers[{i}].key_file"),
                    format!("{e:#}"),
                )
            })?;
            // One key per identity: a key two identities share lets either forge the other's
            // bindings.
            if let Some(other) = owners.insert(key.clone(), s.id.as_str()) {
                return Err(err(
                    format!("registration.servers[{i}].key_file"),
                    format!(
                        "{} holds the same key as '{other}'s: each identity needs its own",
                        path.display()
                    ),
                ));
            }
            keys.insert(s.id.clone(), key);
        }
        Ok(keys)
    }

    /// The relay peers' keys, by peer identity: read like the servers' keys (private,
    /// owned by root or the reader), each pair of agents its own, none a server's.
    pub fn load_relay_keys(
        &self,
        config_path: &Path,
    ) -> Result<std::collections::HashMap<String, Vec<u8>>, ConfigError> {
        let mut keys = std::collections::HashMap::new();
        let Some(relay) = self.registration.as_ref().and_then(|r| r.relay.as_ref()) else {
            return Ok(keys);
        };
        let servers = self.load_keys(config_path)?;
        let dir = config_path.parent().unwrap_or(Path::new("."));
        let mut owners: std::collections::HashMap<Vec<u8>, String> = servers
            .into_iter()
            .map(|(id, k)| (k, format!("server '{id}'")))
            .collect();
        for (i, p) in relay.peers.iter().enumerate() {
            let field = format!("registration.relay.peers[{i}].key_file");
            let path = dir.join(&p.key_file);
            let key = crate::registration::keys::read_key(&path)
                .map_err(|e| err(field.clone(), format!("{e:#}")))?;
            if let Some(other) = owners.insert(key.clone(), format!("peer '{}'", p.id)) {
                return Err(err(
                    field,
                    format!(
                        "{} holds the same key as {other}: each peer and each server needs its own",
                        path.display()
                    ),
                ));
            }
            keys.insert(p.id.clone(), key);
        }
        Ok(keys)
    }
}

mod certificates;
mod comments;
mod prefix;
mod routing;
mod security;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod too_big_tests;
mod validate;
pub use validate::valid_instance_name;

pub use prefix::Prefix;
pub use routing::{Bfd, Neighbor, OnHandoff, Routing};
pub use security::{group_id, Control, ControlAccess};
