//! The agent's control socket: one JSON request per line, one JSON answer per line (the
//! daemon's side: `control_server.rs`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::dataplane::DataplaneReport;

pub const DEFAULT_SOCKET: &str = "/run/anycast/agent.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// The binding table and the registration counters.
    Bindings,
    /// Re-read the configuration file (as SIGHUP does).
    Reload,
    /// The flow table: which client flow is pinned to which server.
    Flows,
    /// Operator drain: the server (by name) takes no new flows, keeps its open ones.
    Drain {
        server: String,
        undo: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Bindings(crate::registration::agent::BindingsReport),
    Reloaded,
    Drained {
        server: String,
        drained: Vec<String>,
    },
    Flows {
        flows: Vec<crate::dataplane::FlowReport>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub config: PathBuf,
    pub interfaces: Vec<InterfaceStatus>,
    pub agent_v4: Option<std::net::IpAddr>,
    pub agent_v6: Option<std::net::IpAddr>,
    #[serde(flatten)]
    pub dataplane: DataplaneReport,
    /// Every health-check target and its state.
    #[serde(default)]
    pub health: Vec<HealthStatus>,
    /// Servers the operator drained.
    #[serde(default)]
    pub drained: Vec<String>,
    /// Where the agent's state outlives it, and what it adopted at start.
    #[serde(default)]
    pub instance: Option<InstanceStatus>,
    /// The anycast prefixes' announcement and the BGP and BFD sessions, when the agent
    /// drives a BGP speaker.
    #[serde(default)]
    pub routing: Option<crate::routing::RoutingStatus>,
    /// Binding sync with peer agents, when configured: digests, peers, counters.
    #[serde(default)]
    pub relay: Option<crate::relay::RelayReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub name: String,
    pub state_directory: PathBuf,
    pub pin_directory: PathBuf,
    /// Flows in the flow table an earlier controller left, when this one adopted its maps.
    pub adopted_flows: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthStatus {
    pub server: String,
    pub real: std::net::IpAddr,
    pub port: u16,
    pub check: String,
    pub health: crate::model::Condition,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub xdp_mode: String,
}

/// Sends one request to the agent and returns its answer.
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    call_daemon(socket, request, "the agent", "anycast-ctl agent").await
}

/// Sends one request line to a daemon's control socket (`who`, started by `command`) and
/// returns its answer line.
pub async fn call_daemon<Q: Serialize, A: DeserializeOwned>(
    socket: &Path,
    request: &Q,
    who: &str,
    command: &str,
) -> Result<A> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to {who} at {} (is `{command}` running?)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    if answer.is_empty() {
        bail!("{who} closed the connection without answering");
    }
    serde_json::from_str(&answer).with_context(|| format!("{who}'s answer is not valid JSON"))
}
