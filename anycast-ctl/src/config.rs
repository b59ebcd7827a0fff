//! The agent's configuration file: JSON, read whole and validated before anything changes.
//! Errors name the field (`services[1].servers[0].address`) and the reason.
use std::{collections::HashSet, fmt, net::IpAddr, path::Path};

use anycast_common::{
    table, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE, MAX_SERVERS,
};
use serde::{Deserialize, Serialize};

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
    /// Topology preference, for every service: clients in these prefixes go to these servers
    /// (by name) first, while any of them can take new flows.
    #[serde(default)]
    pub preferences: Vec<PreferenceConfig>,
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
    /// Binding messages accepted per second from one source address (a burst of twice that).
    pub messages_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bindings_per_address: 256,
            bindings_per_server: 16,
            messages_per_second: 50,
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
}

/// An address prefix, written `ADDR/LEN` or a bare address (a host prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(a) => u32::from(a) as u128,
                IpAddr::V6(a) => u128::from(a),
            }
        };
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        if self.len == 0 {
            return true;
        }
        let shift = width - self.len as u32;
        bits(self.addr) >> shift == bits(ip) >> shift
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("'/{l}' is not a prefix length 0-{max}"))?,
            None => max,
        };
        Ok(Prefix { addr, len })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
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
fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}
fn default_max_preference_tables() -> u32 {
    anycast_common::DEFAULT_MAX_PREFERENCE_TABLES
}
fn default_weight() -> u32 {
    1
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

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            serde_json::from_str(text).map_err(|e| err("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that does not need the running system (interfaces are checked when
    /// attaching).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(err("interfaces", "at least one interface is needed"));
        }
        let mut seen = HashSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains('/') {
                return Err(err(
                    format!("interfaces[{i}]"),
                    format!("'{name}' is not a valid interface name"),
                ));
            }
            if !seen.insert(name) {
                return Err(err(
                    format!("interfaces[{i}]"),
                    format!("'{name}' is listed twice"),
                ));
            }
        }
        match self.agent_address.v4 {
            Some(IpAddr::V6(a)) => {
                return Err(err(
                    "agent_address.v4",
                    format!("{a} is not an IPv4 address"),
                ))
            }
            Some(a) if a.is_unspecified() || a.is_multicast() => {
                return Err(err(
                    "agent_address.v4",
                    format!("{a} cannot be a tunnel source"),
                ))
            }
            _ => {}
        }
        match self.agent_address.v6 {
            Some(IpAddr::V4(a)) => {
                return Err(err(
                    "agent_address.v6",
                    format!("{a} is not an IPv6 address"),
                ))
            }
            Some(a) if a.is_unspecified() || a.is_multicast() => {
                return Err(err(
                    "agent_address.v6",
                    format!("{a} cannot be a tunnel source"),
                ))
            }
            _ => {}
        }
        if self.agent_address.v4.is_none() && self.agent_address.v6.is_none() {
            return Err(err("agent_address", "give at least one of v4 and v6"));
        }
        if !(2..=MAX_RING_SIZE).contains(&self.ring_size) || !table::is_prime(self.ring_size) {
            return Err(err(
                "ring_size",
                format!(
                    "{} is not a prime between 2 and {MAX_RING_SIZE}",
                    self.ring_size
                ),
            ));
        }
        if self.max_services == 0 {
            return Err(err("max_services", "must be at least 1"));
        }
        if self.max_services > 65536 {
            // A server slot names its service in 16 bits.
            return Err(err("max_services", "must be at most 65536"));
        }
        let ring_entries = 2u64 * self.max_services as u64 * self.ring_size as u64;
        if ring_entries > u32::MAX as u64 {
            return Err(err(
                "max_services",
                "max_services * ring_size * 2 exceeds the map's index range",
            ));
        }
        if self.max_flows == 0 {
            return Err(err("max_flows", "must be at least 1"));
        }
        if self.services.len() > self.max_services as usize {
            return Err(err(
                "services",
                format!(
                    "{} services but max_services is {}",
                    self.services.len(),
                    self.max_services
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        let mut server_count = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let f = |field: &str| format!("services[{i}].{field}");
            if s.name.is_empty() {
                return Err(err(f("name"), "must not be empty"));
            }
            if !names.insert(s.name.as_str()) {
                return Err(err(
                    f("name"),
                    format!("'{}' is used by another service", s.name),
                ));
            }
            if s.address.is_unspecified() || s.address.is_multicast() || s.address.is_loopback() {
                return Err(err(
                    f("address"),
                    format!("{} cannot be an anycast address", s.address),
                ));
            }
            if !keys.insert((s.address, s.protocol, s.port)) {
                return Err(err(
                    f("address"),
                    format!(
                        "{} {} port {} is already another service",
                        s.address, s.protocol, s.port
                    ),
                ));
            }
            let mut server_names = HashSet::new();
            let mut server_addrs = HashSet::new();
            for (j, srv) in s.servers.iter().enumerate() {
                let g = |field: &str| format!("services[{i}].servers[{j}].{field}");
                if srv.name.is_empty() {
                    return Err(err(g("name"), "must not be empty"));
                }
                if !server_names.insert(srv.name.as_str()) {
                    return Err(err(
                        g("name"),
                        format!("'{}' is used by another server of this service", srv.name),
                    ));
                }
                if srv.address.is_unspecified()
                    || srv.address.is_multicast()
                    || srv.address.is_loopback()
                {
                    return Err(err(
                        g("address"),
                        format!("{} cannot be a server's real address", srv.address),
                    ));
                }
                if !server_addrs.insert(srv.address) {
                    return Err(err(
                        g("address"),
                        format!("{} is already another server of this service", srv.address),
                    ));
                }
                let (family, have) = match srv.address {
                    IpAddr::V4(_) => ("v4", self.agent_address.v4.is_some()),
                    IpAddr::V6(_) => ("v6", self.agent_address.v6.is_some()),
                };
                if !have {
                    return Err(err(
                        g("address"),
                        format!("{} needs an IP{family} tunnel source, but agent_address.{family} is not set", srv.address),
                    ));
                }
                if srv.weight > MAX_WEIGHT {
                    return Err(err(
                        g("weight"),
                        format!("{} is above the maximum {MAX_WEIGHT}", srv.weight),
                    ));
                }
            }
            for (j, c) in s.health_checks.iter().flatten().enumerate() {
                c.validate(&format!("services[{i}].health_checks[{j}]"))
                    .map_err(|e| match e.split_once(": ") {
                        Some((f, why)) => err(f, why),
                        None => err(format!("services[{i}].health_checks[{j}]"), e),
                    })?;
                let needs_port = matches!(
                    c.kind,
                    crate::health::CheckKind::Tcp { port: None }
                        | crate::health::CheckKind::Http { port: None, .. }
                );
                if needs_port && s.port == 0 {
                    return Err(err(
                        format!("services[{i}].health_checks[{j}].port"),
                        "a TCP or HTTP check of an every-port service needs a port",
                    ));
                }
            }
            server_count += s.servers.len();
        }
        if server_count > MAX_SERVERS as usize {
            return Err(err(
                "services",
                format!("{server_count} servers in all, the maximum is {MAX_SERVERS}"),
            ));
        }
        let t = &self.flow_timeouts;
        for (name, v) in [
            ("tcp_idle", t.tcp_idle),
            ("udp_idle", t.udp_idle),
            ("tcp_closing", t.tcp_closing),
        ] {
            if v == 0 {
                return Err(err(
                    format!("flow_timeouts.{name}"),
                    "must be at least 1 second",
                ));
            }
        }
        for (i, p) in self.preferences.iter().enumerate() {
            if p.clients.is_empty() || p.servers.is_empty() {
                return Err(err(
                    format!("preferences[{i}]"),
                    "needs at least one client prefix and one server",
                ));
            }
        }
        if self.preferences.len() > self.max_preference_tables as usize {
            return Err(err(
                "preferences",
                format!(
                    "{} preferences but max_preference_tables is {}",
                    self.preferences.len(),
                    self.max_preference_tables
                ),
            ));
        }
        let entries = 2u64
            * (self.max_services as u64 + self.max_preference_tables as u64)
            * self.ring_size as u64;
        if entries > u32::MAX as u64 {
            return Err(err("max_services", "2 * (max_services + max_preference_tables) * ring_size exceeds the map's index range"));
        }
        for (i, c) in self.health_checks.iter().enumerate() {
            c.validate(&format!("health_checks[{i}]"))
                .map_err(|e| match e.split_once(": ") {
                    Some((f, why)) => err(f, why),
                    None => err(format!("health_checks[{i}]"), e),
                })?;
        }
        if let Some(r) = &self.registration {
            r.validate()?;
        }
        Ok(())
    }
}

impl Config {
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

impl Registration {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(err("registration.port", "must not be 0"));
        }
        // Lifetimes travel in 4-second units in a 16-bit field.
        if self.max_lifetime < 4 || self.max_lifetime > 65535 * 4 {
            return Err(err(
                "registration.max_lifetime",
                format!(
                    "{} is not between 4 and {} seconds",
                    self.max_lifetime,
                    65535 * 4
                ),
            ));
        }
        if self.replay_window == 0 {
            return Err(err(
                "registration.replay_window",
                "must be at least 1 second",
            ));
        }
        let l = &self.limits;
        for (name, v) in [
            ("bindings_per_address", l.bindings_per_address),
            ("bindings_per_server", l.bindings_per_server),
            ("messages_per_second", l.messages_per_second),
        ] {
            if v == 0 {
                return Err(err(
                    format!("registration.limits.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if let Some(p) = self.probe {
            if p.interval_ms < 10
                || p.timeout_ms == 0
                || p.timeout_ms >= p.interval_ms
                || p.misses == 0
            {
                return Err(err(
                    "registration.probe",
                    "needs interval_ms >= 10, 0 < timeout_ms < interval_ms and misses >= 1",
                ));
            }
        }
        if let Some(r) = self.reverse_tunnel {
            if !(MIN_SUSPECT_AFTER_MS..=3_600_000).contains(&r.suspect_after_ms) {
                return Err(err(
                    "registration.reverse_tunnel.suspect_after_ms",
                    format!(
                        "{} is not between {MIN_SUSPECT_AFTER_MS} and 3600000",
                        r.suspect_after_ms
                    ),
                ));
            }
            if self.probe.is_none() {
                return Err(err(
                    "registration.reverse_tunnel",
                    "needs registration.probe: its refresh requests confirm a suspicion",
                ));
            }
        }
        let mut ids = HashSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let f = |field: &str| format!("registration.servers[{i}].{field}");
            if s.id.is_empty() || s.id.len() > 254 {
                return Err(err(f("id"), "must be 1-254 characters"));
            }
            if !ids.insert(s.id.as_str()) {
                return Err(err(f("id"), format!("'{}' is listed twice", s.id)));
            }
            if s.allow.is_empty() {
                return Err(err(
                    f("allow"),
                    "lists no address: the server could bind nothing",
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads every registered server's key file (relative paths from the config file's
    /// directory). A missing or bad key names its field.
    pub fn load_keys(
        &self,
        config_path: &Path,
    ) -> Result<std::collections::HashMap<String, Vec<u8>>, ConfigError> {
        let mut keys = std::collections::HashMap::new();
        let Some(r) = &self.registration else {
            return Ok(keys);
        };
        let dir = config_path.parent().unwrap_or(Path::new("."));
        for (i, s) in r.servers.iter().enumerate() {
            let path = dir.join(&s.key_file);
            let key = crate::keys::read_key(&path).map_err(|e| {
                err(
                    format!("registration.servers[{i}].key_file"),
                    format!("{e:#}"),
                )
            })?;
            keys.insert(s.id.clone(), key);
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
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
            r#""registration": {"servers": [{"id": "s1", "spi": 1, "key_file": "k", "allow": ["192.0.2.10/32"]}]},
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
                r#""allow": ["192.0.2.10/32"]}]"#,
                r#""allow": ["192.0.2.10/32"]}, {"id": "s1", "spi": 2, "key_file": "k", "allow": ["192.0.2.10"]}]"#
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
}
