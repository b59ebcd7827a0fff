//! The anycast controller. Folders by role:
//! - `agent/`: the agent daemon (start-up, the owner task, control-socket and routing tasks);
//! - `registration/`: the binding protocol, the agent's registry (`agent/`) and the server's
//!   registration client (`server/`);
//! - `health/`: active health checks of the servers;
//! - `dataplane/`: the BPF maps: loading, writing tables, the flow sweeper, reports;
//! - `config/`, `model.rs`, `selection.rs`: what is wanted, and how servers are chosen;
//! - `server.rs`: `anycast-ctl server`; `cli.rs`, `control_socket.rs`: the operator's side;
//!   `control_server.rs`: a control socket's daemon side (the agent's and the client's);
//!   `manual.rs`: the agent's signals, files and systemd use, for `--help` and the man page;
//!   `service_manager.rs`: readiness for systemd (`Type=notify`);
//!   `top/`: `anycast-ctl top`, the live view.
//! - `pki/`: the operator's trust anchor (keys, server certificates, revocation lists);
//! - `client/`: route optimization's client side (checking the servers' bindings).
pub mod agent;
pub mod cli;
pub mod client;
pub mod config;
pub mod control_server;
pub mod control_socket;
pub mod dataplane;
pub mod files;
pub mod health;
pub mod host;
pub mod manual;
pub mod model;
pub mod pki;
pub mod registration;
pub mod relay;
pub mod routing;
pub mod selection;
pub mod server;
pub mod server_binding;
pub mod service_manager;
pub mod top;
