//! The binding protocol's two ends: the agent's registry of servers' bindings (`agent`) and
//! the server's registration client (`server`), plus the keys both sides sign with.
pub mod agent;
pub mod keys;
pub mod server;
