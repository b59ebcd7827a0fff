//! Routing: the agent drives a BIRD 2 speaker that announces the anycast addresses to the
//! routers in front of the agents.
//!
//! - `include.rs` (pure): the file the agent writes for BIRD: prefix sets of what may ever
//!   be exported, BFD and BGP protocols, and one static route per announced address,
//!   pointing at the liveness device.
//! - `bird.rs`: BIRD's control-socket line protocol (client and reply parsing).
//! - `tun.rs`: the liveness device, a TUN device that lives as long as the agent's
//!   descriptor: the routes go with the agent's process, also on SIGKILL.
//!
//! The task that talks to BIRD is `agent/routing.rs`.
pub mod bird;
pub mod include;
pub mod tun;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What the owner wants BIRD to announce, with the reason for each address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// What the export filters let through: every configured anycast address (a host
    /// prefix) and every registration `allow` prefix (and anything inside it).
    pub exportable: Vec<crate::config::Prefix>,
    /// Every anycast address the agent serves, announced or not.
    pub prefixes: Vec<PrefixWant>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PrefixWant {
    pub address: IpAddr,
    pub announce: bool,
    pub why: String,
}

impl Desired {
    pub fn announced(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.prefixes
            .iter()
            .filter(|p| p.announce)
            .map(|p| p.address)
    }
}

/// The routing part of `anycast-ctl status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RoutingStatus {
    pub bird_socket: std::path::PathBuf,
    pub bird_include: std::path::PathBuf,
    /// `connected (BIRD 2.0.12)` or why not.
    pub bird: String,
    /// The answer to the last `configure`, or why it could not be sent.
    pub last_configure: String,
    pub prefixes: Vec<PrefixStatus>,
    pub protocols: Vec<ProtocolStatus>,
    pub bfd_sessions: Vec<BfdSession>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrefixStatus {
    pub prefix: String,
    /// `announced`, `withdrawn` or `pending` (wanted, BIRD not yet told).
    pub state: String,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProtocolStatus {
    pub name: String,
    pub proto: String,
    /// The neighbour, for the BGP sessions the agent configured.
    #[serde(default)]
    pub neighbor: Option<IpAddr>,
    pub state: String,
    pub info: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BfdSession {
    pub address: String,
    pub interface: String,
    pub state: String,
    pub interval: String,
    pub timeout: String,
}
