//! The data path's counters: per-CPU arrays indexed by reason. Each set is written as one
//! table by [`counters!`]: every row gives the index constant (its position in the table)
//! and the name userspace shows, so the two cannot drift apart.

/// Declares a module of counter indexes: `NAME = "text",` rows become `pub const NAME: u32`
/// (0, 1, 2, ... in row order), plus `COUNT` and `NAMES` (the texts, by index).
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub mod $module:ident {
            $( $(#[$doc:meta])* $name:ident = $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        pub mod $module {
            counters!(@index 0u32; $( $(#[$doc])* $name, )*);
            /// Number of counters: the length of the per-CPU array.
            pub const COUNT: u32 = NAMES.len() as u32;
            /// Each counter's name, by index.
            pub const NAMES: [&str; [$($text),*].len()] = [$($text),*];
        }
    };
    (@index $i:expr; ) => {};
    (@index $i:expr; $(#[$doc:meta])* $name:ident, $($rest:tt)*) => {
        $(#[$doc])*
        pub const $name: u32 = $i;
        counters!(@index $i + 1; $($rest)*);
    };
}

counters! {
    /// Why the agent did what it did; the index into the `VERDICTS` per-CPU array.
    pub mod verdict {
        /// Encapsulated and sent back out of the ingress interface (`XDP_TX`).
        TX = "tx",
        /// Encapsulated and redirected to another interface.
        REDIRECT = "redirect",
        /// Encapsulated, but the next hop's MAC is not known yet: handed to the kernel to
        /// resolve.
        PASS_NO_NEIGH = "pass_no_neigh",
        /// Encapsulated, but no route to the server: handed to the kernel, which will drop it.
        PASS_NO_ROUTE = "pass_no_route",
        /// Encapsulated, the egress interface is not in the device map: handed to the kernel.
        PASS_NOT_TX_PORT = "pass_not_tx_port",
        /// Not addressed to an anycast service (including non-IP frames).
        PASS_NOT_SERVICE = "pass_not_service",
        /// An IP fragment: the ports are unknown, so it is left to the kernel.
        PASS_FRAGMENT = "pass_fragment",
        /// Truncated or malformed headers.
        PASS_MALFORMED = "pass_malformed",
        /// A service with no server able to take the flow.
        DROP_NO_SERVER = "drop_no_server",
        /// The frame could not be grown for the outer header.
        DROP_ENCAP = "drop_encap",
        /// The agent has no address of the family the server's real address needs.
        DROP_NO_AGENT_ADDR = "drop_no_agent_addr",
        /// The tunnelled packet exceeds the egress MTU and is not answered (answers turned
        /// off, IPv4 without DF, a source no error may be sent to, or a path too small for the
        /// family's minimum MTU): dropped.
        DROP_TOO_BIG = "drop_too_big",
        /// A flow table hit (not a verdict; counted beside them).
        FLOW_HIT = "flow_hit",
        /// A flow table miss (not a verdict; counted beside them).
        FLOW_MISS = "flow_miss",
        /// Part of `FLOW_MISS`: an entry was found but had ended (idle past its timeout, or
        /// closing and reused by a new SYN), so the flow was chosen anew.
        FLOW_EXPIRED = "flow_expired",
        /// A server's SYN-ACK relayed to its client: IP-in-IP from a known server's real
        /// address to the agent's own address, inner source an anycast service. Counted per
        /// server, outer header stripped, inner packet handed to the kernel to forward.
        REVERSE_TUNNEL = "reverse_tunnel",
        /// IP-in-IP to the agent's own address while reverse tunnelling is not configured
        /// (`AGENT_REVERSE_TUNNEL` clear): not decapsulated, passed untouched.
        PASS_REVERSE_OFF = "pass_reverse_off",
        /// IP-in-IP to the agent's own address whose outer source is not the real address of
        /// an installed server (no `REVERSE` entry): not decapsulated, passed untouched.
        PASS_REVERSE_STRANGER = "pass_reverse_stranger",
        /// IP-in-IP from an installed server's real address that arrived on another interface
        /// than the one the FIB names for reaching that address (or the FIB has no route to
        /// it): a spoofed source, not decapsulated, passed untouched.
        PASS_REVERSE_WRONG_IFACE = "pass_reverse_wrong_iface",
        /// An ICMP error about a service's reply (ICMPv4 destination unreachable, e.g.
        /// fragmentation needed; ICMPv6 packet too big or destination unreachable) to an
        /// anycast address: tunnelled whole to the server that owns the quoted flow (its
        /// flow-table entry, else the consistent-hash choice; no entry is made) and sent.
        ICMP_TO_SERVER = "icmp_to_server",
        /// An ICMP error to an anycast address whose quote is too short (less than the
        /// quoted IP header and 8 bytes of its transport header) or inconsistent (another IP
        /// version than the error's, bad lengths, a later fragment): passed untouched.
        PASS_ICMP_MALFORMED = "pass_icmp_malformed",
        /// An ICMP error to an anycast address whose quoted packet is not from a service
        /// (quoted source not that address, protocol or source port not a service's):
        /// passed untouched.
        PASS_ICMP_NOT_SERVICE = "pass_icmp_not_service",
        /// An ICMP echo request (ICMPv6 too) to an anycast service address, answered by the
        /// agent: addresses and MACs swapped, echo reply, sent back out (`XDP_TX`).
        ECHO_REPLY = "echo_reply",
        /// A client packet too big for the tunnel (as `drop_too_big`), answered: ICMP
        /// "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big", from the anycast
        /// address, with the MTU left for the client's packet; sent back out of the ingress
        /// port (`XDP_TX`).
        TOO_BIG_ANSWERED = "too_big_answered",
        /// A client packet too big for the tunnel that would have been answered, but this
        /// CPU's answers for the last second are used up: dropped.
        TOO_BIG_RATE_LIMITED = "too_big_rate_limited",
        /// Part of `FLOW_MISS`: a TCP SYN without ACK of a flow the flow table does not
        /// hold, sent by the consistent-hash choice and remembered in `EMBRYOS` (its slot
        /// overwritten), not pinned: a flood of SYNs cannot evict pinned flows.
        FLOW_EMBRYO = "flow_embryo",
        /// Part of `FLOW_MISS`: the first packet after a SYN pinned to the server the SYN
        /// went to, found in `EMBRYOS` (the table may have changed in between).
        FLOW_PROMOTED = "flow_promoted",
        /// Part of `FLOW_MISS`: a flow not seen opening (a TCP packet other than a SYN with
        /// no handshake in `EMBRYOS`, or a UDP flow's first packet) sent by the table's
        /// choice without being pinned: this CPU's budget of such pins for the last second
        /// (`unseen_pins_per_second`) is used up. Its next packet tries again.
        FLOW_UNPINNED = "flow_unpinned",
    }
}

counters! {
    /// Server side: what the SYN-ACK tunnel (TC egress) did with a packet; the index into
    /// `REVERSE_STATS`.
    pub mod syn_ack_tunnel {
        /// A SYN-ACK encapsulated to the agent and redirected to the egress the FIB chose.
        TUNNELLED = "tunnelled",
        /// Encapsulated, the next hop's MAC is not known yet: handed to `bpf_redirect_neigh`,
        /// which resolves it.
        TUNNELLED_RESOLVING = "tunnelled_resolving",
        /// A SYN-ACK whose source is not an anycast address of this server: untouched.
        PASS_NOT_SERVED = "pass_not_served",
        /// No route to the agent (or forwarding lookups disabled): sent untouched, directly.
        PASS_NO_ROUTE = "pass_no_route",
        /// The tunnel packet would exceed the egress MTU: sent untouched.
        PASS_TOO_BIG = "pass_too_big",
        /// The packet could not be grown for the outer header: sent untouched.
        PASS_ENCAP_FAILED = "pass_encap_failed",
        /// No tunnel configured.
        PASS_DISABLED = "pass_disabled",
        /// Everything else (not a SYN-ACK, not TCP, not IP): untouched.
        PASS_OTHER = "pass_other",
        /// Grown, but the outer header could not be written: dropped rather than sent half
        /// rewritten (the client retransmits its SYN).
        DROP_WRITE_FAILED = "drop_write_failed",
    }
}

counters! {
    /// Client side (route optimization): what the client's tunnel (TC egress) did with a
    /// packet; the index into `CLIENT_STATS`.
    pub mod client_tunnel {
        /// A packet for a bound service encapsulated to the server's real address and
        /// redirected to the egress the FIB chose.
        TUNNELLED = "tunnelled",
        /// Encapsulated, the next hop's MAC is not known yet: handed to
        /// `bpf_redirect_neigh`, which resolves it.
        TUNNELLED_RESOLVING = "tunnelled_resolving",
        /// TCP or UDP to no bound service: untouched, through the agent as without a client
        /// daemon.
        PASS_NOT_BOUND = "pass_not_bound",
        /// No route to the server's real address: untouched, through the agent.
        PASS_NO_ROUTE = "pass_no_route",
        /// The tunnel packet would exceed the egress MTU: untouched, through the agent.
        PASS_TOO_BIG = "pass_too_big",
        /// The packet could not be grown for the outer header: untouched.
        PASS_ENCAP_FAILED = "pass_encap_failed",
        /// Everything else (not TCP or UDP over IP, a fragment, truncated): untouched.
        PASS_OTHER = "pass_other",
        /// Grown, but the outer header could not be written: dropped rather than sent half
        /// rewritten.
        DROP_WRITE_FAILED = "drop_write_failed",
        /// A packet of a connection to a bound service that was opened before the binding
        /// (or with another server's binding) and that the server did not name: untouched,
        /// through the agent, which keeps it on the server it chose.
        PASS_OPENED_BEFORE = "pass_opened_before",
    }
}

counters! {
    /// Server side: what the decapsulator (XDP) did with a packet; the index into
    /// `DECAP_STATS`.
    pub mod decap {
        /// An IP-in-IP packet for an anycast address of this server: outer header stripped.
        DECAPSULATED = "decapsulated",
        /// Not IP-in-IP (or a fragment of it): untouched.
        PASS_NOT_TUNNEL = "pass_not_tunnel",
        /// IP-in-IP, but the inner destination is not an anycast address of this server.
        PASS_NOT_SERVED = "pass_not_served",
        /// Truncated or malformed headers.
        PASS_MALFORMED = "pass_malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_follow_the_tables() {
        assert_eq!(verdict::COUNT, 28);
        assert_eq!(verdict::TX, 0);
        assert_eq!(verdict::NAMES[verdict::FLOW_HIT as usize], "flow_hit");
        assert_eq!(
            verdict::NAMES[verdict::REVERSE_TUNNEL as usize],
            "reverse_tunnel"
        );
        assert_eq!(
            verdict::NAMES[verdict::PASS_REVERSE_WRONG_IFACE as usize],
            "pass_reverse_wrong_iface"
        );
        assert_eq!(verdict::NAMES[verdict::ECHO_REPLY as usize], "echo_reply");
        assert_eq!(
            verdict::NAMES[verdict::FLOW_PROMOTED as usize],
            "flow_promoted"
        );
        assert_eq!(
            verdict::NAMES[verdict::TOO_BIG_RATE_LIMITED as usize],
            "too_big_rate_limited"
        );
        assert_eq!(syn_ack_tunnel::COUNT, 9);
        assert_eq!(
            syn_ack_tunnel::NAMES[syn_ack_tunnel::DROP_WRITE_FAILED as usize],
            "drop_write_failed"
        );
        assert_eq!(decap::COUNT, 4);
        assert_eq!(
            decap::NAMES[decap::PASS_MALFORMED as usize],
            "pass_malformed"
        );
    }

    /// Names are distinct snake_case within a set (they become JSON keys and metric labels).
    #[test]
    fn names_are_distinct_snake_case() {
        for names in [
            &verdict::NAMES[..],
            &syn_ack_tunnel::NAMES,
            &decap::NAMES,
            &client_tunnel::NAMES,
        ] {
            for (i, n) in names.iter().enumerate() {
                assert!(
                    n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{n}"
                );
                assert!(!names[..i].contains(n), "{n} twice");
            }
        }
    }
}
