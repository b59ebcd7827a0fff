//! What the control plane wants the data plane to forward: services, their servers and
//! topology preferences. Built from configuration, bindings, health and drains (see
//! `selection`), consumed by `dataplane`.
use std::net::IpAddr;

use anycast_common::ServiceKey;

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
