//! The contract between the XDP data path and the controller: map names, keys and values,
//! verdict counters, the flow hash, and (with the `user` feature) the consistent-hash table.
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
#![cfg_attr(not(feature = "user"), no_std)]

#[cfg(feature = "user")]
pub mod table;
#[cfg(feature = "user")]
pub mod wire;

/// Address family tags used in keys (values of `AF_INET`/`AF_INET6` on Linux).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// IP protocol numbers of the tunnels we build.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

/// Port value in a [`ServiceKey`] that matches every port of the address and protocol.
pub const ANY_PORT: u16 = 0;

/// Map names, as they appear in the eBPF object.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const RINGS: &str = "RINGS";
    pub const SERVERS: &str = "SERVERS";
    pub const FLOWS: &str = "FLOWS";
    pub const AGENT: &str = "AGENT";
    /// Flow idle timeouts ([`FlowConfig`](super::FlowConfig)), one entry.
    pub const FLOW_CONFIG: &str = "FLOW_CONFIG";
    /// Topology preferences: LPM trie of [`PreferenceKey`](super::PreferenceKey) ->
    /// [`PreferenceTable`](super::PreferenceTable).
    pub const PREFERENCES: &str = "PREFERENCES";
    pub const TX_PORTS: &str = "TX_PORTS";
    /// A bitmap of the anycast addresses in `SERVICES` ([`address_filter_bit`](super::address_filter_bit)),
    /// so traffic for any other address passes after one array read, without a hash lookup.
    pub const ADDRESS_FILTER: &str = "ADDRESS_FILTER";
    /// Per CPU, per server slot: the last FIB answer for the server's real address
    /// ([`NextHop`](super::NextHop)), reused within the same tick of the flow clock.
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const SERVER_STATS: &str = "SERVER_STATS";
    /// Server side: anycast addresses this server answers for.
    pub const SERVED: &str = "SERVED";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// Agent: the installed servers' real addresses ([`RealKey`](super::RealKey)) -> their
    /// reverse-tunnelled packets ([`ReverseStats`](super::ReverseStats)), per CPU. Written
    /// (keys) by the controller; the data path only counts into existing entries.
    pub const REVERSE: &str = "REVERSE";
    /// Server side: where reverse-tunnelled SYN-ACKs go ([`ReverseConfig`](super::ReverseConfig)).
    pub const REVERSE_CONFIG: &str = "REVERSE_CONFIG";
    /// Server side: what the reverse-tunnel program did ([`reverse`](super::reverse)), per CPU.
    pub const REVERSE_STATS: &str = "REVERSE_STATS";
}

/// Program names, as they appear in the eBPF object.
pub mod programs {
    pub const AGENT: &str = "anycast_agent";
    pub const SERVER_DECAP: &str = "anycast_decap";
    /// Server side, TC egress: SYN-ACKs from the anycast addresses, IP-in-IP to the agent.
    pub const SERVER_REVERSE: &str = "anycast_reverse";
    pub const PASS: &str = "xdp_pass";
}

/// Default and compiled-in upper bounds. The ring and flow maps are sized at load time
/// from the agent's configuration; these are the defaults.
pub const DEFAULT_MAX_SERVICES: u32 = 64;
pub const MAX_SERVERS: u32 = 4096;
pub const DEFAULT_RING_SIZE: u32 = 65537;
pub const DEFAULT_MAX_FLOWS: u32 = 1_000_000;
pub const MAX_SERVED: u32 = 1024;
/// Consistent-hash tables for topology preferences (each with two areas in `RINGS`, after
/// the services' areas), default.
pub const DEFAULT_MAX_PREFERENCE_TABLES: u32 = 16;
/// Client prefixes in `PREFERENCES`, over all services (the trie allocates per entry, so
/// the bound costs nothing until used).
pub const MAX_PREFERENCE_PREFIXES: u32 = 4096;
pub const MAX_TX_PORTS: u32 = 64;

/// Marks a ring entry with no server (a service whose servers all have weight 0).
pub const NO_SERVER: u32 = u32::MAX;

/// An anycast service: address, protocol and port. IPv4 addresses occupy `addr[0]`, the rest
/// is zero. Addresses are kept in network byte order exactly as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Host byte order; [`ANY_PORT`] for a port wildcard.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// What the data path needs to choose a server for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    /// Index into the per-service counters.
    pub id: u32,
    /// First entry of this service's live consistent-hash table in `RINGS`. The controller
    /// writes a whole new table into the other half of the service's area and then flips
    /// this one value, so a lookup never sees a half-written table.
    pub ring_base: u32,
    /// Entries in the table (a prime).
    pub ring_size: u32,
    /// [`SERVICE_HAS_PREFERENCES`].
    pub flags: u32,
}

/// `ServiceInfo::flags`: some clients of this service have a preferred table in
/// `PREFERENCES`. Without it the data path never looks there.
pub const SERVICE_HAS_PREFERENCES: u32 = 1;

/// Key of the `PREFERENCES` LPM trie, laid out as the kernel's `struct bpf_lpm_trie_key`:
/// the prefix length first, then the data matched bit by bit from its first byte. The data
/// is the service id followed by the client address (network order words, IPv4 in
/// `addr[0]`, the rest zero), so `prefixlen` is 32 (the service id, always matched whole) +
/// the client prefix length. The data path looks up with [`PREFERENCE_KEY_BITS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PreferenceKey {
    pub prefixlen: u32,
    /// [`ServiceInfo::id`], host byte order.
    pub service: u32,
    pub addr: [u32; 4],
}

/// Bits of data in a [`PreferenceKey`]: the service id and a whole IPv6 address.
pub const PREFERENCE_KEY_BITS: u32 = 32 + 128;

impl PreferenceKey {
    /// The key's data, as the trie sees it after `prefixlen`.
    #[inline(always)]
    pub fn data(&self) -> [u32; 5] {
        [
            self.service,
            self.addr[0],
            self.addr[1],
            self.addr[2],
            self.addr[3],
        ]
    }
}

/// Value of `PREFERENCES`: the preferred consistent-hash table, somewhere in `RINGS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PreferenceTable {
    pub ring_base: u32,
    pub ring_size: u32,
}

/// A server's real address, where tunnelled packets go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerInfo {
    pub addr: [u32; 4],
    pub family: u8,
    pub flags: u8,
    /// The service this slot serves (every service has slots of its own), so a flow-table
    /// hit needs no service lookup.
    pub service: u16,
    /// Bumped each time the slot is given to another server, so a flow pinned to an earlier
    /// holder of the slot is not sent to the new one.
    pub generation: u32,
}

/// `ServerInfo::flags`: the server may receive packets (new and existing flows).
pub const SERVER_UP: u8 = 1;

/// The 5-tuple of a client flow. 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The server a flow is pinned to, and when the flow was last seen. 16 bytes, so key +
/// value is 56 bytes per flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub server: u32,
    pub generation: u32,
    /// Tick of the flow clock (see [`FlowConfig`]) when the flow last sent a packet; for
    /// a closing flow, at least when it sent its FIN or RST.
    pub last_seen: u32,
    /// [`FLOW_CLOSING`].
    pub flags: u32,
}

/// `FlowValue::flags`: the client sent a TCP FIN or RST; the entry lives only
/// `tcp_closing` seconds after the last packet, and a SYN (without ACK) starts a new flow.
pub const FLOW_CLOSING: u32 = 1;

/// Flow idle timeouts in ticks of the flow clock (`FLOW_CONFIG`, one entry).
///
/// The flow clock is `CLOCK_MONOTONIC_COARSE` in ticks of 2^30 ns (about 1.07 s): in the
/// data path `bpf_ktime_get_coarse_ns() >> 30` (a shift, where whole seconds would cost a
/// 64-bit division per packet), in userspace the same of `clock_gettime
/// (CLOCK_MONOTONIC_COARSE)` (the same kernel clock, so the same tick). An entry is expired
/// when `now - last_seen > timeout`; [`FlowConfig::new`] rounds timeouts in seconds up to
/// whole ticks, so an entry lives at least its timeout after its last packet, at most about
/// 1.07 s more (plus the rounding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowConfig {
    /// Indexed by [`timeout_index`]: TCP idle, UDP idle, TCP closing, UDP "closing" (never
    /// set for UDP; the controller writes the UDP idle timeout there).
    pub timeouts: [u32; 4],
}

pub const DEFAULT_TCP_IDLE: u32 = 300;
pub const DEFAULT_UDP_IDLE: u32 = 30;
pub const DEFAULT_TCP_CLOSING: u32 = 10;

/// The flow clock's tick: `CLOCK_MONOTONIC_COARSE` nanoseconds shifted right by this.
pub const FLOW_CLOCK_SHIFT: u32 = 30;

/// The flow clock's tick at `ns` of `CLOCK_MONOTONIC_COARSE`.
#[inline(always)]
pub const fn flow_tick(ns: u64) -> u32 {
    (ns >> FLOW_CLOCK_SHIFT) as u32
}

/// `secs` seconds in ticks of the flow clock, rounded up.
pub const fn flow_ticks(secs: u32) -> u32 {
    ((secs as u64 * 1_000_000_000).div_ceil(1 << FLOW_CLOCK_SHIFT)) as u32
}

/// `ticks` ticks of the flow clock in whole seconds, rounded down.
pub const fn flow_ticks_as_secs(ticks: u32) -> u32 {
    (((ticks as u64) << FLOW_CLOCK_SHIFT) / 1_000_000_000) as u32
}

impl FlowConfig {
    /// Timeouts given in seconds.
    pub const fn new(tcp_idle: u32, udp_idle: u32, tcp_closing: u32) -> Self {
        let (tcp_idle, udp_idle, tcp_closing) = (
            flow_ticks(tcp_idle),
            flow_ticks(udp_idle),
            flow_ticks(tcp_closing),
        );
        FlowConfig {
            timeouts: [tcp_idle, udp_idle, tcp_closing, udp_idle],
        }
    }

    /// The timeout of an entry of protocol `proto` with flags `flags`.
    #[inline(always)]
    pub fn timeout(&self, proto: u8, flags: u32) -> u32 {
        self.timeouts[timeout_index(proto, flags)]
    }

    /// Whether the entry is past its timeout at `now` (the same rule in the data path and
    /// in the controller's sweep).
    #[inline(always)]
    pub fn expired(&self, proto: u8, value: &FlowValue, now: u32) -> bool {
        now.wrapping_sub(value.last_seen) > self.timeout(proto, value.flags)
    }
}

/// Index into [`FlowConfig::timeouts`], without branches: closing << 1 | is UDP.
#[inline(always)]
pub fn timeout_index(proto: u8, flags: u32) -> usize {
    ((((flags & FLOW_CLOSING) << 1) | (proto == PROTO_UDP) as u32) & 3) as usize
}

/// The agent's own addresses: outer source of the tunnels it builds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentInfo {
    pub v6: [u32; 4],
    pub v4: u32,
    pub flags: u32,
    /// Bumped by the controller whenever the kernel reports a route, neighbour, address or
    /// link change: cached next hops ([`NextHop`]) of an older generation are not used.
    pub fib_generation: u32,
}
pub const AGENT_HAS_V4: u32 = 1;
pub const AGENT_HAS_V6: u32 = 2;

/// Packets and bytes, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// A server slot's traffic (`SERVER_STATS`), per CPU: packets and bytes forwarded to it, and
/// how many of those packets were TCP SYNs without ACK (new connections, or a client's
/// retransmission of one). The reverse-tunnel monitor compares `syns` with the SYN-ACKs
/// the server sends back through the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerTraffic {
    pub packets: u64,
    pub bytes: u64,
    pub syns: u64,
}

/// A real address as a map key (`REVERSE`). IPv4 in `addr[0]`, the rest zero; network order
/// words as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct RealKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Reverse-tunnelled packets from one server real address (`REVERSE`), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseStats {
    pub packets: u64,
    /// `bpf_ktime_get_coarse_ns()` (`CLOCK_MONOTONIC_COARSE`) of the newest one on this CPU;
    /// 0: none yet.
    pub last_seen_ns: u64,
}

/// Server side (`REVERSE_CONFIG`, one entry): the tunnel to the agent. `family` 0 turns the
/// program into a pass-through.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseConfig {
    /// The agent's address: outer destination.
    pub agent: [u32; 4],
    /// The server's real address of the same family: outer source.
    pub source: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`] (of both addresses), or 0.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Why the data path did what it did; the index into the `VERDICTS` per-CPU array.
pub mod verdict {
    /// Encapsulated and sent back out of the ingress interface (`XDP_TX`).
    pub const TX: u32 = 0;
    /// Encapsulated and redirected to another interface.
    pub const REDIRECT: u32 = 1;
    /// Encapsulated, but the next hop's MAC is not known yet: handed to the kernel to resolve.
    pub const PASS_NO_NEIGH: u32 = 2;
    /// Encapsulated, but no route to the server: handed to the kernel, which will drop it.
    pub const PASS_NO_ROUTE: u32 = 3;
    /// Encapsulated, the egress interface is not in the device map: handed to the kernel.
    pub const PASS_NOT_TX_PORT: u32 = 4;
    /// Not addressed to an anycast service (including non-IP frames).
    pub const PASS_NOT_SERVICE: u32 = 5;
    /// An IP fragment: the ports are unknown, so it is left to the kernel.
    pub const PASS_FRAGMENT: u32 = 6;
    /// Truncated or malformed headers.
    pub const PASS_MALFORMED: u32 = 7;
    /// A service with no server able to take the flow.
    pub const DROP_NO_SERVER: u32 = 8;
    /// The frame could not be grown for the outer header.
    pub const DROP_ENCAP: u32 = 9;
    /// The agent has no address of the family the server's real address needs.
    pub const DROP_NO_AGENT_ADDR: u32 = 10;
    /// The tunnelled packet exceeds the egress MTU.
    pub const DROP_TOO_BIG: u32 = 11;
    /// Flow table hits and misses (not verdicts; counted beside them).
    pub const FLOW_HIT: u32 = 12;
    pub const FLOW_MISS: u32 = 13;
    /// Part of `FLOW_MISS`: an entry was found but had ended (idle past its timeout, or
    /// closing and reused by a new SYN), so the flow was chosen anew.
    pub const FLOW_EXPIRED: u32 = 14;
    /// A server's reverse-tunnelled response (IP-in-IP from a known server's real address to
    /// the agent's own address, inner source an anycast service): counted per server, outer
    /// header stripped, inner packet handed to the kernel to forward to the client.
    pub const REVERSE_TUNNEL: u32 = 15;
    pub const COUNT: u32 = 16;

    pub const NAMES: [&str; COUNT as usize] = [
        "tx",
        "redirect",
        "pass_no_neigh",
        "pass_no_route",
        "pass_not_tx_port",
        "pass_not_service",
        "pass_fragment",
        "pass_malformed",
        "drop_no_server",
        "drop_encap",
        "drop_no_agent_addr",
        "drop_too_big",
        "flow_hit",
        "flow_miss",
        "flow_expired",
        "reverse_tunnel",
    ];
}

/// Server side counters of the reverse-tunnel program (`REVERSE_STATS`).
pub mod reverse {
    /// A SYN-ACK encapsulated to the agent and redirected to the egress the FIB chose.
    pub const TUNNELLED: u32 = 0;
    /// Encapsulated, the next hop's MAC is not known yet: handed to `bpf_redirect_neigh`,
    /// which resolves it.
    pub const TUNNELLED_RESOLVING: u32 = 1;
    /// A SYN-ACK whose source is not an anycast address of this server: untouched.
    pub const PASS_NOT_SERVED: u32 = 2;
    /// No route to the agent (or forwarding lookups disabled): sent untouched, directly.
    pub const PASS_NO_ROUTE: u32 = 3;
    /// The tunnel packet would exceed the egress MTU: sent untouched.
    pub const PASS_TOO_BIG: u32 = 4;
    /// The packet could not be grown for the outer header: sent untouched.
    pub const PASS_ENCAP_FAILED: u32 = 5;
    /// No tunnel configured.
    pub const PASS_DISABLED: u32 = 6;
    /// Everything else (not a SYN-ACK, not TCP, not IP): untouched.
    pub const PASS_OTHER: u32 = 7;
    /// Grown, but the outer header could not be written: dropped rather than sent half
    /// rewritten (the client retransmits its SYN).
    pub const DROP_WRITE_FAILED: u32 = 8;
    pub const COUNT: u32 = 9;
    pub const NAMES: [&str; COUNT as usize] = [
        "tunnelled",
        "tunnelled_resolving",
        "pass_not_served",
        "pass_no_route",
        "pass_too_big",
        "pass_encap_failed",
        "pass_disabled",
        "pass_other",
        "drop_write_failed",
    ];
}

/// Server side counters (`DECAP_STATS`).
pub mod decap {
    pub const DECAPSULATED: u32 = 0;
    pub const PASS_NOT_TUNNEL: u32 = 1;
    pub const PASS_NOT_SERVED: u32 = 2;
    pub const PASS_MALFORMED: u32 = 3;
    pub const COUNT: u32 = 4;
    pub const NAMES: [&str; COUNT as usize] = [
        "decapsulated",
        "pass_not_tunnel",
        "pass_not_served",
        "pass_malformed",
    ];
}

/// A key for `SERVED`: an anycast address the server decapsulates for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServedKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

#[inline(always)]
fn mix(mut h: u32, k: u32) -> u32 {
    // murmur3's per-word mixing: cheap, and good enough spread for table indexing.
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    h ^= k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// The hash that indexes a service's consistent-hash table. Every agent computes the same
/// value for the same flow, so agents sharing a service choose the same server.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0x9747_b28c;
    h = mix(h, k.src[0]);
    h = mix(h, k.src[1]);
    h = mix(h, k.src[2]);
    h = mix(h, k.src[3]);
    h = mix(h, k.dst[0]);
    h = mix(h, k.dst[1]);
    h = mix(h, k.dst[2]);
    h = mix(h, k.dst[3]);
    h = mix(h, ((k.sport as u32) << 16) | k.dport as u32);
    h = mix(h, k.proto as u32);
    // murmur3 finaliser
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Words of 64 bits in `ADDRESS_FILTER`: 65536 bits, so a few thousand anycast addresses
/// still leave almost every other address's bit clear.
pub const ADDRESS_FILTER_WORDS: u32 = 1024;
/// [`address_filter_bit`] takes the top 16 bits of its hash.
const _: () = assert!(ADDRESS_FILTER_WORDS * 64 == 1 << 16);

/// The `ADDRESS_FILTER` word and bit of an address (an IPv4 address is `[a, 0, 0, 0]`, in
/// network byte order as the packet holds it). A set bit means "maybe a service address":
/// the data path then looks `SERVICES` up; a clear bit means "certainly not".
#[inline(always)]
pub fn address_filter_bit(family: u8, addr: &[u32; 4]) -> (u32, u64) {
    // Fold the address into one word, then Fibonacci hashing: the top bits of a multiply.
    // A few instructions; collisions only cost a `SERVICES` lookup.
    let folded =
        addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    let h = (folded ^ family as u32).wrapping_mul(0x9e37_79b1);
    let bit = h >> (32 - 16);
    (bit >> 6, 1u64 << (bit & 63))
}

/// A cached FIB answer for one server slot on one CPU: valid while `tick` is the current
/// tick of the flow clock (about a second) and no route, neighbour, address or link changed
/// since (`fib_generation`), the slot still holds the same server (`generation`), the packet came
/// in on `ingress` and is no longer than `max_len` (the longest outer packet the FIB has
/// accepted for this route, so a longer one is checked against the MTU again). 36 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub tick: u32,
    /// [`AgentInfo::fib_generation`] when the FIB gave this answer.
    pub fib_generation: u32,
    pub generation: u32,
    pub ingress: u32,
    pub egress: u32,
    /// Destination then source MAC: the first 12 bytes of the Ethernet header, as words.
    pub macs: [u32; 3],
    pub max_len: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, contain only integers and explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for ServerInfo {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FlowConfig {}
    unsafe impl aya::Pod for PreferenceKey {}
    unsafe impl aya::Pod for PreferenceTable {}
    unsafe impl aya::Pod for AgentInfo {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for ServerTraffic {}
    unsafe impl aya::Pod for RealKey {}
    unsafe impl aya::Pod for ReverseStats {}
    unsafe impl aya::Pod for ReverseConfig {}
    unsafe impl aya::Pod for ServedKey {}
}

#[cfg(feature = "user")]
mod addr {
    use super::*;
    use std::net::IpAddr;

    /// Network-order words of an address, as the data path reads them from the packet.
    pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
        match ip {
            IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
            IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([w(0), w(4), w(8), w(12)], FAMILY_V6)
            }
        }
    }

    pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::from(words[0].to_ne_bytes())
        } else {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::from(o)
        }
    }

    impl ServiceKey {
        pub fn new(ip: IpAddr, proto: u8, port: u16) -> Self {
            let (addr, family) = addr_words(ip);
            ServiceKey {
                addr,
                port,
                proto,
                family,
            }
        }
        pub fn ip(&self) -> IpAddr {
            words_addr(self.addr, self.family)
        }
    }

    impl ServerInfo {
        pub fn ip(&self) -> IpAddr {
            words_addr(self.addr, self.family)
        }
    }

    impl ServedKey {
        pub fn new(ip: IpAddr) -> Self {
            let (addr, family) = addr_words(ip);
            ServedKey {
                addr,
                family,
                _pad: [0; 3],
            }
        }
    }

    impl RealKey {
        pub fn new(ip: IpAddr) -> Self {
            let (addr, family) = addr_words(ip);
            RealKey {
                addr,
                family,
                _pad: [0; 3],
            }
        }
        pub fn ip(&self) -> IpAddr {
            words_addr(self.addr, self.family)
        }
    }

    impl PreferenceKey {
        /// The key for clients in `client/len` of service `service`. Host bits beyond `len`
        /// are cleared. `len` must be at most 32 for IPv4 and 128 for IPv6.
        pub fn new(service: u32, client: IpAddr, len: u8) -> Self {
            let max = if client.is_ipv4() { 32 } else { 128 };
            let len = u32::from(len).min(max);
            let (mut addr, _) = addr_words(client);
            for (i, w) in addr.iter_mut().enumerate() {
                let bits = len.saturating_sub(i as u32 * 32).min(32);
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                // The words hold the address's bytes in order: mask in the same order.
                *w &= mask.to_be();
            }
            PreferenceKey {
                prefixlen: 32 + len,
                service,
                addr,
            }
        }
        /// The client prefix: (address, length).
        pub fn client(&self, family: u8) -> (IpAddr, u8) {
            (
                words_addr(self.addr, family),
                self.prefixlen.saturating_sub(32) as u8,
            )
        }
    }

    impl FlowKey {
        pub fn new(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Self {
            let (s, family) = addr_words(src);
            let (d, _) = addr_words(dst);
            FlowKey {
                src: s,
                dst: d,
                sport,
                dport,
                proto,
                family,
                _pad: [0; 2],
            }
        }
    }
}
#[cfg(feature = "user")]
pub use addr::{addr_words, words_addr};

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of consecutive anycast addresses (the usual allocation), IPv4 or IPv6,
    /// leaves almost every bit of the address filter clear and sets one bit per address.
    #[test]
    fn address_filter_spreads_address_blocks() {
        for family in [FAMILY_V4, FAMILY_V6] {
            extern crate std;
            let mut bits = std::collections::BTreeSet::new();
            for i in 0u32..1000 {
                let addr = if family == FAMILY_V4 {
                    [(0xc000_0200u32 + i).to_be(), 0, 0, 0]
                } else {
                    [0x2001_0db8u32.to_be(), 0, 0, (0x100 + i).to_be()]
                };
                bits.insert(address_filter_bit(family, &addr));
            }
            assert!(
                bits.len() >= 990,
                "family {family}: {} distinct bits of 1000",
                bits.len()
            );
            assert!(bits.iter().all(|&(w, _)| w < ADDRESS_FILTER_WORDS));
        }
    }
    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FlowValue>(), 16);
        assert_eq!(
            core::mem::size_of::<FlowKey>() + core::mem::size_of::<FlowValue>(),
            56,
            "bytes per flow"
        );
        assert_eq!(core::mem::size_of::<FlowConfig>(), 16);
        // struct bpf_lpm_trie_key: __u32 prefixlen, then the data.
        assert_eq!(core::mem::size_of::<PreferenceKey>(), 24);
        assert_eq!(core::mem::offset_of!(PreferenceKey, prefixlen), 0);
        assert_eq!(core::mem::offset_of!(PreferenceKey, service), 4);
        assert_eq!(core::mem::offset_of!(PreferenceKey, addr), 8);
        assert_eq!(core::mem::size_of::<PreferenceTable>(), 8);
        assert_eq!(core::mem::size_of::<ServerInfo>(), 24);
        assert_eq!(core::mem::size_of::<AgentInfo>(), 28);
        assert_eq!(core::mem::size_of::<NextHop>(), 36);
        assert_eq!(core::mem::size_of::<ServerTraffic>(), 24);
        assert_eq!(core::mem::size_of::<RealKey>(), 20);
        assert_eq!(core::mem::size_of::<ReverseStats>(), 16);
        assert_eq!(core::mem::size_of::<ReverseConfig>(), 36);
        assert_eq!(
            verdict::NAMES[verdict::REVERSE_TUNNEL as usize],
            "reverse_tunnel"
        );
    }
}
