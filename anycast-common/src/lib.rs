//! The contract between the data path (anycast-ebpf) and the controller (anycast-ctl): one
//! definition of everything both sides must agree on, byte for byte.
//!
//! - [`net`]: address families, IP protocols, header lengths, TCP flags, the IPv4 checksum;
//! - [`maps`]: map names, every `#[repr(C)]` key and value, their flags and bounds;
//! - [`counters`]: the counter indexes and their names ([`verdict`], [`decap`],
//!   [`syn_ack_tunnel`]);
//! - [`flow`]: the flow hash, the flow clock and the idle timeouts;
//! - with the `user` feature: [`table`] (the consistent-hash table builder), [`wire`]
//!   (the binding protocol between servers, agents and clients) and [`pki`] (the operator's
//!   certificates and revocation list, which clients check).
//!
//! The items of `net`, `maps`, `counters` and `flow` are re-exported here, so
//! `anycast_common::ServiceKey` and `anycast_common::maps::ServiceKey` are the same.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod counters;
pub mod flow;
pub mod maps;
pub mod net;
#[cfg(feature = "user")]
pub mod pki;
#[cfg(feature = "user")]
pub mod table;
#[cfg(feature = "user")]
pub mod wire;

pub use counters::{client_tunnel, decap, syn_ack_tunnel, verdict};
pub use flow::*;
pub use maps::{
    address_filter_bit, AddressKey, AgentInfo, FlowKey, FlowValue, NextHop, PreferenceKey,
    PreferenceTable, ReverseStats, ServerInfo, ServerTraffic, ServiceInfo, ServiceKey,
    SynAckTunnelConfig, Traffic, ADDRESS_FILTER_WORDS, AGENT_ANSWER_PING,
    AGENT_FORWARD_ICMP_ERRORS, AGENT_HAS_V4, AGENT_HAS_V6, AGENT_REVERSE_TUNNEL, ANY_PORT,
    DEFAULT_MAX_FLOWS, DEFAULT_MAX_PREFERENCE_TABLES, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE,
    FLOW_CLOSING, MAX_PREFERENCE_PREFIXES, MAX_SERVED, MAX_SERVERS, MAX_TX_PORTS, NO_SERVER,
    PREFERENCE_KEY_BITS, SERVER_UP, SERVICE_HAS_PREFERENCES,
};
pub use maps::{ClientBinding, MAX_CLIENT_BINDINGS, MAX_CLIENT_FLOWS};
pub use maps::{EmbryoSlot, EMBRYO_SLOTS, EMBRYO_TICKS};
pub use maps::{
    TokenBucket, AGENT_ANSWER_TOO_BIG, BUCKET_BURST_NS, BUCKET_TOO_BIG, BUCKET_UNSEEN_PINS,
    RATE_BUCKET_COUNT,
};
pub use maps::{UdpSeen, MAX_SERVER_UDP_FLOWS, UDP_SEEN_REFRESH_NS};
pub use net::*;

/// Program names, as they appear in the eBPF object.
pub mod programs {
    /// The agent's forwarder (XDP).
    pub const AGENT: &str = "anycast_agent";
    /// Server side: the decapsulator (XDP).
    pub const SERVER_DECAP: &str = "anycast_decap";
    /// Server side, TC egress: the SYN-ACK tunnel (SYN-ACKs from the anycast addresses,
    /// IP-in-IP to the agent). The object's name predates the program's; `tc filter show`
    /// lists it.
    pub const SERVER_REVERSE: &str = "anycast_reverse";
    /// Client side (route optimization), TC egress: packets for bound services, IP-in-IP
    /// to their server's real address.
    pub const CLIENT_TUNNEL: &str = "anycast_client";
    /// Lets frames through (for veth peers of native-mode XDP).
    pub const PASS: &str = "xdp_pass";
    /// Benchmark baseline: swaps the MAC addresses and sends the frame back (XDP_TX).
    pub const TX_SWAP: &str = "xdp_tx_swap";
    /// Benchmark sink: XDP_DROP.
    pub const BENCH_SINK: &str = "bench_sink";
    /// Benchmark generator: writes `BENCH_FRAME` and transmits it (XDP_TX).
    pub const BENCH_GEN: &str = "bench_gen";
    /// As [`BENCH_GEN`], with a random IPv4 source address and L4 source port per frame.
    pub const BENCH_GEN_NEW: &str = "bench_gen_new";
}
