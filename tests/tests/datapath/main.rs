//! The data path's programs, run with `BPF_PROG_TEST_RUN` against hand-built packets: the
//! agent's XDP forwarder, the server's XDP decapsulation and TC SYN-ACK tunnel.
//!
//! Each test gets a network namespace of its own (veth pairs, addresses, permanent
//! neighbours, forwarding on) and moves its thread into it, because the kernel does the
//! data path's FIB lookups in the namespace of the thread that runs the test
//! ([`harness`]). Inputs and expected outputs are built byte by byte with the tests
//! library's packet builder, independently of the programs' code; the only value borrowed
//! from the project is the flow hash that becomes the outer IPv6 flow label. Per-packet
//! behaviour is written as fixture tables ([`fixtures`]); what needs a sequence of packets
//! and map changes is written as plain tests, one module per feature.
//!
//! Needs root. Run with `cargo xtask test -- --test datapath` (or `cargo test --release -p
//! anycast-tests --test datapath -- --test-threads=1`).

mod fixtures;
mod harness;

mod address_filter;
mod affinity;
mod aging;
mod client_tunnel;
mod counters;
mod decap;
mod forward;
mod icmp;
mod icmp_flows;
mod malformed;
mod next_hop;
mod preferences;
mod reverse_tunnel;
mod sweep;
mod sweep_under_traffic;
mod syn_ack_tunnel;
mod syn_flood;
mod too_big;
mod udp_flows;
