//! One model, agent-wide. Before selection: each service's candidates (built once from the
//! configuration, the live bindings, health and drains) with their weights, tiers and
//! conditions ([`ServicePlan`]). After selection (`selection.rs`): what the data plane
//! consumes ([`DesiredService`]: servers with a weight and whether they are up).
use std::{fmt, net::IpAddr};

use anycast_common::ServiceKey;

/// A server's condition, from its health checks and its binding's refresh requests (the
/// worst of them): the one state the agent reasons with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Up,
    /// A check failed once; confirmed down after `fall` failures in a row.
    Suspect,
    /// Confirmed failed: its flows move to other servers.
    Down,
}

/// A server of a service before selection.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub address: IpAddr,
    /// Free capacity (or configured weight).
    pub weight: u32,
    pub priority: u16,
    pub condition: Condition,
    /// Deregistered or drained by the operator: keeps open flows, takes no new ones.
    pub draining: bool,
}

/// A service before selection: its candidates with their weights, tiers and conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    pub name: String,
    pub key: ServiceKey,
    pub candidates: Vec<Candidate>,
    pub preferences: Vec<Preference>,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Condition::Up => "up",
            Condition::Suspect => "suspect",
            Condition::Down => "down",
        })
    }
}

/// A service as the control plane wants it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredService {
    pub name: String,
    pub key: ServiceKey,
    pub servers: Vec<DesiredServer>,
    /// Topology preferences: clients in these prefixes go to these servers first.
    pub preferences: Vec<Preference>,
}

/// Clients whose source address is in one of `clients` are sent to `servers` (real
/// addresses among the service's servers) while any of those can take new flows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Preference {
    pub clients: Vec<(IpAddr, u8)>,
    pub servers: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredServer {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
    pub up: bool,
}
