//! The optional `routing` section: the BGP speaker (BIRD 2) this agent drives, its
//! neighbours and timers, and how the agent's liveness reaches the routes.
use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{err, Config, ConfigError};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// The agent's AS. The same on every agent of an anycast address: a router merges
    /// routes into one multipath route only when their attributes are identical.
    pub local_as: u32,
    /// The routers this agent announces the anycast addresses to: one BGP session each,
    /// carrying the neighbour's address family.
    pub neighbors: Vec<Neighbor>,
    /// BFD on every session: a silent agent is withdrawn after `interval_ms * multiplier`,
    /// not after the BGP hold time (minutes).
    #[serde(default)]
    pub bfd: Bfd,
    /// BIRD's control socket (`bird -s PATH`; Debian's service uses the default).
    #[serde(default = "default_bird_socket")]
    pub bird_socket: PathBuf,
    /// The file the agent writes for BIRD: prefix sets, the BFD and BGP protocols and the
    /// static routes of the announced addresses. BIRD's own configuration includes it
    /// with a pattern (`include "/etc/bird/anycast.d/*.conf";`), which BIRD accepts while
    /// the directory holds no file yet.
    #[serde(default = "default_bird_include")]
    pub bird_include: PathBuf,
    /// The agent's liveness device: a TUN device only the agent's open descriptor keeps
    /// alive. The static routes point at it, so the routes go with the agent's process.
    #[serde(default = "default_liveness_device")]
    pub liveness_device: String,
    /// What a handoff (SIGUSR2) does with the routes: `withdraw` (several agents: the
    /// others take the traffic while no controller follows health) or `keep` (a single
    /// agent: forwarding continues with the last tables until the next agent takes over).
    #[serde(default)]
    pub on_handoff: OnHandoff,
    /// On a planned exit that withdraws, how long the data path keeps forwarding after
    /// BIRD took the withdrawal (ms): the routers' time to move the traffic elsewhere.
    #[serde(default = "default_withdraw_grace_ms")]
    pub withdraw_grace_ms: u64,
    /// How often the sessions' states are read from BIRD, and how soon an unreachable
    /// BIRD is tried again (ms).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub address: IpAddr,
    #[serde(rename = "as")]
    pub asn: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Bfd {
    /// Both the minimal receive and transmit intervals (ms).
    pub interval_ms: u32,
    /// Packets missed in a row before the session (and the BGP session) is down.
    pub multiplier: u32,
}

impl Default for Bfd {
    fn default() -> Self {
        Bfd {
            interval_ms: 100,
            multiplier: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnHandoff {
    #[default]
    Withdraw,
    Keep,
}

fn default_bird_socket() -> PathBuf {
    "/run/bird/bird.ctl".into()
}
fn default_bird_include() -> PathBuf {
    "/etc/bird/anycast.d/anycast.conf".into()
}
fn default_liveness_device() -> String {
    "aclive0".into()
}
fn default_withdraw_grace_ms() -> u64 {
    500
}
fn default_poll_ms() -> u64 {
    1000
}

impl Config {
    pub(super) fn validate_routing(&self) -> Result<(), ConfigError> {
        let Some(r) = &self.routing else {
            return Ok(());
        };
        if r.local_as == 0 {
            return Err(err("routing.local_as", "AS 0 is reserved (RFC 7607)"));
        }
        if r.neighbors.is_empty() {
            return Err(err("routing.neighbors", "at least one neighbour is needed"));
        }
        let anycast = |a: IpAddr| {
            self.services.iter().any(|s| s.address == a)
                || self
                    .registration
                    .iter()
                    .flat_map(|r| &r.servers)
                    .flat_map(|s| &s.allow)
                    .any(|p| p.contains(a))
        };
        for (i, n) in r.neighbors.iter().enumerate() {
            let f = |field: &str| format!("routing.neighbors[{i}].{field}");
            let a = n.address;
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(err(f("address"), format!("{a} cannot be a BGP neighbour")));
            }
            if let IpAddr::V6(v6) = a {
                if v6.segments()[0] & 0xffc0 == 0xfe80 {
                    // A link-local neighbour needs an interface BIRD is not told here.
                    return Err(err(
                        f("address"),
                        format!("{a} is link-local: give the neighbour's global address"),
                    ));
                }
            }
            if [self.agent_address.v4, self.agent_address.v6].contains(&Some(a)) {
                return Err(err(
                    f("address"),
                    format!("{a} is this agent's own address"),
                ));
            }
            if anycast(a) {
                return Err(err(
                    f("address"),
                    format!("{a} is an anycast address (a service's, or in an allow prefix)"),
                ));
            }
            if r.neighbors[..i].iter().any(|o| o.address == a) {
                return Err(err(f("address"), format!("{a} is listed twice")));
            }
            if n.asn == 0 {
                return Err(err(f("as"), "AS 0 is reserved (RFC 7607)"));
            }
        }
        if !(10..=10_000).contains(&r.bfd.interval_ms) {
            return Err(err(
                "routing.bfd.interval_ms",
                format!("{} is not between 10 and 10000", r.bfd.interval_ms),
            ));
        }
        if !(1..=255).contains(&r.bfd.multiplier) {
            return Err(err(
                "routing.bfd.multiplier",
                format!("{} is not between 1 and 255", r.bfd.multiplier),
            ));
        }
        for (field, path) in [
            ("routing.bird_socket", &r.bird_socket),
            ("routing.bird_include", &r.bird_include),
        ] {
            if !path.is_absolute() {
                return Err(err(field, "must be an absolute path"));
            }
        }
        if r.bird_include.file_name().is_none() {
            return Err(err("routing.bird_include", "must name a file"));
        }
        let dev = &r.liveness_device;
        if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ', '"']) {
            return Err(err(
                "routing.liveness_device",
                format!("'{dev}' is not a valid interface name"),
            ));
        }
        if self.interfaces.contains(dev) {
            return Err(err(
                "routing.liveness_device",
                format!("'{dev}' is one of `interfaces`: the agent creates this device itself"),
            ));
        }
        if r.withdraw_grace_ms > 60_000 {
            return Err(err(
                "routing.withdraw_grace_ms",
                format!("{} is more than 60000", r.withdraw_grace_ms),
            ));
        }
        if !(100..=60_000).contains(&r.poll_ms) {
            return Err(err(
                "routing.poll_ms",
                format!("{} is not between 100 and 60000", r.poll_ms),
            ));
        }
        Ok(())
    }

    /// Routing warnings: anycast addresses of a family no neighbour carries are never
    /// announced.
    pub(super) fn routing_warnings(&self) -> Vec<ConfigError> {
        let Some(r) = &self.routing else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (v4, name) in [(true, "IPv4"), (false, "IPv6")] {
            let carried = r.neighbors.iter().any(|n| n.address.is_ipv4() == v4);
            let wanted = self.services.iter().any(|s| s.address.is_ipv4() == v4)
                || self
                    .registration
                    .iter()
                    .flat_map(|r| &r.servers)
                    .flat_map(|s| &s.allow)
                    .any(|p| p.addr.is_ipv4() == v4);
            if wanted && !carried {
                out.push(err(
                    "routing.neighbors",
                    format!("no {name} neighbour, so no {name} anycast address is announced"),
                ));
            }
        }
        out
    }
}
