//! The anycast controller: configuration, BPF maps, the agent daemon, the server side and
//! the CLI's rendering. The binary (`main.rs`) is a thin clap front end over these.
pub mod agent;
pub mod api;
pub mod bindings;
pub mod client;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod keys;
pub mod route_events;
pub mod selection;
pub mod server;
pub mod status;
pub mod sys;
