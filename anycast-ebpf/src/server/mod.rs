//! The server side: the decapsulator (XDP) strips the agent's tunnel from packets for the
//! anycast addresses this server answers for (`SERVED`); the SYN-ACK tunnel (TC egress)
//! sends each connection's SYN-ACK back through the agent.
pub mod decap;
pub mod syn_ack_tunnel;
