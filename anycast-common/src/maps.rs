//! The maps the programs and the controller share: their names (defined here once; the
//! eBPF crate checks at compile time that each `#[map]` static carries its name), every
//! `#[repr(C)]` key and value, their flag constants and size bounds.
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
//! Addresses are kept in network byte order exactly as they sit in the packet: IPv4 in
//! `addr[0]`, the rest zero.
#[cfg(feature = "user")]
use crate::net::{addr_words, words_addr};

/// Agent: anycast services ([`ServiceKey`] -> [`ServiceInfo`]).
pub const SERVICES: &str = "SERVICES";
/// Agent: all consistent-hash tables (server slot numbers), two areas (live and next) per
/// service, then two per preference table.
pub const RINGS: &str = "RINGS";
/// Agent: server slots ([`ServerInfo`]).
pub const SERVERS: &str = "SERVERS";
/// Agent: flows pinned to a server ([`FlowKey`] -> [`FlowValue`]).
pub const FLOWS: &str = "FLOWS";
/// Agent: the servers of TCP handshakes in progress ([`EmbryoSlot`]), an array of
/// [`EMBRYO_SLOTS`] indexed by the flow hash: a SYN overwrites its slot, the first packet
/// after it pins the flow in `FLOWS` to the slot's server.
pub const EMBRYOS: &str = "EMBRYOS";
/// Agent: its own addresses ([`AgentInfo`]), one entry.
pub const AGENT: &str = "AGENT";
/// Agent: flow idle timeouts ([`FlowConfig`](crate::FlowConfig)), one entry.
pub const FLOW_CONFIG: &str = "FLOW_CONFIG";
/// Agent: topology preferences: LPM trie of [`PreferenceKey`] -> [`PreferenceTable`].
pub const PREFERENCES: &str = "PREFERENCES";
/// Benchmark generator: the frame it writes ([`GenFrame`]), one entry.
pub const BENCH_FRAME: &str = "BENCH_FRAME";
/// Agent: the interfaces it may redirect to (a device map).
pub const TX_PORTS: &str = "TX_PORTS";
/// Agent: a bitmap of the anycast addresses in `SERVICES` ([`address_filter_bit`]), so
/// traffic for any other address passes after one array read, without a hash lookup.
pub const ADDRESS_FILTER: &str = "ADDRESS_FILTER";
/// Agent: per CPU, per server slot: the last FIB answer for the server's real address
/// ([`NextHop`]), reused within the same tick of the flow clock.
pub const NEXT_HOPS: &str = "NEXT_HOPS";
/// Agent: per-CPU counters, indexed by [`verdict`](crate::verdict).
pub const VERDICTS: &str = "VERDICTS";
/// Agent: per CPU, per service id: [`Traffic`].
pub const SERVICE_STATS: &str = "SERVICE_STATS";
/// Agent: per CPU, per server slot: [`ServerTraffic`].
pub const SERVER_STATS: &str = "SERVER_STATS";
/// Agent: the installed servers' real addresses ([`AddressKey`]) -> the SYN-ACKs relayed
/// for each ([`ReverseStats`]), per CPU. Written (keys) by the controller; the data path
/// only counts into existing entries.
pub const REVERSE: &str = "REVERSE";
/// Agent: every anycast address of a service ([`AddressKey`] -> 1), written by the
/// controller after each apply: the addresses whose ICMP echo requests the agent answers.
/// (`SERVICES` is keyed by protocol and port too, and `ADDRESS_FILTER` only says "maybe".)
pub const SERVICE_ADDRS: &str = "SERVICE_ADDRS";
/// Agent: per CPU, the token buckets ([`TokenBucket`]) of the data path's rate limits,
/// indexed by [`BUCKET_TOO_BIG`] and [`BUCKET_UNSEEN_PINS`]. Not pinned: a new program
/// starts with full buckets.
pub const RATE_BUCKETS: &str = "RATE_BUCKETS";
/// Server side: anycast addresses this server answers for ([`AddressKey`] -> 1); read by
/// the decapsulator and the SYN-ACK tunnel.
pub const SERVED: &str = "SERVED";
/// Server side: per-CPU counters of the decapsulator, indexed by [`decap`](crate::decap).
pub const DECAP_STATS: &str = "DECAP_STATS";
/// Server side: where the SYN-ACK tunnel sends SYN-ACKs ([`SynAckTunnelConfig`]), one
/// entry. (The object's name predates the program's; operators and scripts see it.)
pub const REVERSE_CONFIG: &str = "REVERSE_CONFIG";
/// Server side: per-CPU counters of the SYN-ACK tunnel, indexed by
/// [`syn_ack_tunnel`](crate::syn_ack_tunnel).
pub const REVERSE_STATS: &str = "REVERSE_STATS";
/// Client side (route optimization): the bindings a client took, by service
/// ([`ServiceKey`] -> [`ClientBinding`]), at most [`MAX_CLIENT_BINDINGS`].
pub const CLIENT_BINDINGS: &str = "CLIENT_BINDINGS";
/// Client side: per-CPU counters of the client's tunnel, indexed by
/// [`client_tunnel`](crate::client_tunnel).
pub const CLIENT_STATS: &str = "CLIENT_STATS";
/// Entries of `CLIENT_BINDINGS`.
pub const MAX_CLIENT_BINDINGS: u32 = 1024;
/// Client side: the client's connections that go to a bound server directly ([`FlowKey`]
/// -> the binding's generation, `u32`): those opened while the binding was held (the
/// tunnel saw their SYN) and those the server named. An LRU map of
/// [`MAX_CLIENT_FLOWS`] entries.
pub const CLIENT_FLOWS: &str = "CLIENT_FLOWS";
/// Entries of `CLIENT_FLOWS`: the client's direct connections at once (the least recently
/// used beyond it go back through the agent).
pub const MAX_CLIENT_FLOWS: u32 = 65_536;
/// Server side (route optimization): the UDP flows the decapsulator handed to the stack for
/// a served anycast address ([`FlowKey`] as the client sent it: source the client, destination
/// the anycast address, protocol UDP -> [`UdpSeen`]), so the server daemon can bind UDP clients
/// (a UDP service has no per-client socket to find them by). An LRU map of
/// [`MAX_SERVER_UDP_FLOWS`] entries: a flood of new flows evicts the oldest.
pub const SERVER_UDP_FLOWS: &str = "SERVER_UDP_FLOWS";
/// Entries of `SERVER_UDP_FLOWS` in the server (as many as the clients its daemon
/// remembers); the agent and the client daemon load it with 1.
pub const MAX_SERVER_UDP_FLOWS: u32 = 4096;
/// `SERVER_UDP_FLOWS`: the decapsulator rewrites an entry's `last_ns` only when it is at
/// least this old, so a busy flow costs one map lookup a packet and one write per interval;
/// a flow whose `last_ns - first_ns` reaches it has sent two packets at least this far apart.
pub const UDP_SEEN_REFRESH_NS: u64 = 500_000_000;

/// The agent's maps, pinned in bpffs so the data path outlives its controller and a new
/// controller (a restart or another build) adopts them with their contents.
pub const AGENT_PINNED: &[&str] = &[
    SERVICES,
    RINGS,
    SERVERS,
    FLOWS,
    AGENT,
    FLOW_CONFIG,
    PREFERENCES,
    TX_PORTS,
    ADDRESS_FILTER,
    NEXT_HOPS,
    VERDICTS,
    SERVICE_STATS,
    SERVER_STATS,
    REVERSE,
    SERVICE_ADDRS,
];

/// The version of what the agent's pinned maps' bytes mean. A build adopts pinned maps
/// only when their version (recorded beside them) and their kernel definitions (type, key
/// and value sizes, entries) are its own. Bump it whenever the meaning of an agent map's
/// key or value changes, even when its size does not.
pub const AGENT_LAYOUT_VERSION: u32 = 2;
// 2: `ServerTraffic` gained `flows` (24 -> 32 bytes).

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

/// Port value in a [`ServiceKey`] that matches every port of the address and protocol.
pub const ANY_PORT: u16 = 0;

/// An anycast service: address, protocol and port.
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
    /// Tick of the flow clock (see [`FlowConfig`](crate::FlowConfig)) when the flow last sent a packet; for
    /// a closing flow, at least when it sent its FIN or RST.
    pub last_seen: u32,
    /// [`FLOW_CLOSING`].
    pub flags: u32,
}

/// `FlowValue::flags`: the client sent a TCP FIN or RST; the entry lives only
/// `tcp_closing` seconds after the last packet, and a SYN (without ACK) starts a new flow.
pub const FLOW_CLOSING: u32 = 1;

/// Slots of `EMBRYOS`: a power of two (the slot is `flow_hash & (EMBRYO_SLOTS - 1)`). 56 bytes
/// each: 7.3 MB. Under a flood of F random SYNs per second, a handshake's slot survives a
/// round trip of r seconds with probability exp(-F r / EMBRYO_SLOTS); losing it matters only
/// when the table moved that flow between its SYN and its ACK.
pub const EMBRYO_SLOTS: u32 = 1 << 17;

/// How long (flow-clock ticks, about 1.07 s each) a SYN's slot names the server of the
/// first packet after it: covers the server's SYN-ACK retransmissions (Linux: 1+2+4+8+16+32
/// s by default).
pub const EMBRYO_TICKS: u32 = 64;

/// A TCP handshake in progress: the SYN's flow and the server it was sent to. The key is
/// stored whole (not a short tag of the public flow hash, which an attacker could collide).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EmbryoSlot {
    pub key: FlowKey,
    pub server: u32,
    pub generation: u32,
    /// Flow-clock tick of the SYN.
    pub seen: u32,
    pub _pad: u32,
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
    /// With [`AGENT_ANSWER_TOO_BIG`]: what one answer to a packet too big for the tunnel
    /// costs from a CPU's bucket ([`TooBigBucket`]), in nanoseconds of credit: 10^9 / the
    /// answers allowed per second and CPU. 0: no limit.
    pub too_big_cost_ns: u32,
    /// What pinning a flow not seen opening costs from a CPU's [`BUCKET_UNSEEN_PINS`]
    /// bucket, in nanoseconds of credit: 10^9 / the pins allowed per second and CPU. A flow
    /// not seen opening is a TCP packet other than a SYN that misses the flow table with no
    /// handshake in `EMBRYOS` (a connection first seen mid-stream), or a UDP flow's first
    /// packet. Beyond the budget such a packet goes by the table without being pinned, so
    /// a flood of them from random sources cannot evict pinned flows faster than this.
    pub unseen_pin_cost_ns: u32,
}
pub const AGENT_HAS_V4: u32 = 1;
pub const AGENT_HAS_V6: u32 = 2;
/// Reverse tunnelling is configured (`registration.reverse_tunnel`): the data path may
/// decapsulate a server's reverse-tunnelled packets. Clear: it never does.
pub const AGENT_REVERSE_TUNNEL: u32 = 4;
/// The agent answers ICMP echo requests to anycast service addresses (`answer_ping`).
/// (8 is left to the answers to too-big client packets.)
pub const AGENT_ANSWER_PING: u32 = 16;
/// The agent tunnels ICMP errors about services' replies to the server that owns the quoted
/// flow (`forward_icmp_errors`). Clear: they pass to the agent's kernel, as other packets.
pub const AGENT_FORWARD_ICMP_ERRORS: u32 = 32;
/// Client packets too big for the tunnel are answered (ICMP "fragmentation needed" for IPv4
/// with DF, ICMPv6 "packet too big"), rate-limited by [`AgentInfo::too_big_cost_ns`].
/// Clear: they are dropped silently (`drop_too_big`).
pub const AGENT_ANSWER_TOO_BIG: u32 = 8;

/// Credit a CPU's [`TokenBucket`] holds at most, in nanoseconds: one second's worth of
/// tokens may go in a burst.
pub const BUCKET_BURST_NS: u64 = 1_000_000_000;

/// `RATE_BUCKETS`: answers to packets too big for the tunnel (each costs
/// [`AgentInfo::too_big_cost_ns`]).
pub const BUCKET_TOO_BIG: u32 = 0;
/// `RATE_BUCKETS`: pins of flows not seen opening (each costs
/// [`AgentInfo::unseen_pin_cost_ns`]).
pub const BUCKET_UNSEEN_PINS: u32 = 1;
/// Entries of `RATE_BUCKETS`.
pub const RATE_BUCKET_COUNT: u32 = 2;

/// A CPU's token bucket for one of the data path's rate limits (`RATE_BUCKETS`): credit in
/// nanoseconds, refilled by the time elapsed since `last_ns` (up to [`BUCKET_BURST_NS`]);
/// a token costs the limit's share of a second.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TokenBucket {
    pub credit_ns: u64,
    /// `bpf_ktime_get_ns()` of the last refill; 0: never (the first packet finds it full).
    pub last_ns: u64,
}

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
/// the server sends back through the agent. `flows`: packets that found no live flow-table
/// entry and were given this server (new flows of any protocol; the same slot entry is
/// written, so counting them costs no lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerTraffic {
    pub packets: u64,
    pub bytes: u64,
    pub syns: u64,
    pub flows: u64,
}

/// An address as a map key: a server's real address (`REVERSE`) or an anycast address this
/// server answers for (`SERVED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct AddressKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// SYN-ACKs relayed from one server real address (`REVERSE`), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseStats {
    pub packets: u64,
    /// `bpf_ktime_get_coarse_ns()` (`CLOCK_MONOTONIC_COARSE`) of the newest one on this CPU;
    /// 0: none yet.
    pub last_seen_ns: u64,
}

/// Server side (`REVERSE_CONFIG`, one entry): the SYN-ACK tunnel to the agent. `family` 0
/// turns the program into a pass-through.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SynAckTunnelConfig {
    /// The agent's address: outer destination.
    pub agent: [u32; 4],
    /// The server's real address of the same family: outer source.
    pub source: [u32; 4],
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6) (of both
    /// addresses), or 0.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Client side (`CLIENT_BINDINGS`): where a bound service's packets go, IP-in-IP. The key
/// is the service ([`ServiceKey`]: the anycast address, protocol and port, port
/// [`ANY_PORT`] and protocol 0 for the whole address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClientBinding {
    /// The server's real address: outer destination.
    pub real: [u32; 4],
    /// The client's own address of the same family: outer source.
    pub source: [u32; 4],
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6) (of both
    /// addresses).
    pub family: u8,
    pub _pad: [u8; 3],
    /// Which binding this is: the daemon numbers each server's binding of a service from 1
    /// (a move to another real address of the same server keeps it). A connection goes
    /// direct only while its `CLIENT_FLOWS` entry holds the current generation, so a
    /// connection never follows a binding of another server.
    pub generation: u32,
}

/// Server side (`SERVER_UDP_FLOWS`): when a UDP flow was first and last seen, nanoseconds
/// of `CLOCK_MONOTONIC` (`bpf_ktime_get_coarse_ns`: up to a tick behind). 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpSeen {
    pub first_ns: u64,
    /// Refreshed only when at least [`UDP_SEEN_REFRESH_NS`] old.
    pub last_ns: u64,
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

/// Largest frame the benchmark's generator writes; a power of two (the program masks the
/// length with it).
pub const GEN_FRAME_MAX: usize = 256;

/// The benchmark generator's frame (`BENCH_FRAME`), written by the benchmark before it runs
/// the generator.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenFrame {
    /// Bytes of `bytes` to write, 1..=GEN_FRAME_MAX.
    pub len: u32,
    pub bytes: [u8; GEN_FRAME_MAX],
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
    unsafe impl aya::Pod for EmbryoSlot {}
    unsafe impl aya::Pod for PreferenceKey {}
    unsafe impl aya::Pod for PreferenceTable {}
    unsafe impl aya::Pod for AgentInfo {}
    unsafe impl aya::Pod for TokenBucket {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for ServerTraffic {}
    unsafe impl aya::Pod for AddressKey {}
    unsafe impl aya::Pod for ReverseStats {}
    unsafe impl aya::Pod for SynAckTunnelConfig {}
    unsafe impl aya::Pod for ClientBinding {}
    unsafe impl aya::Pod for UdpSeen {}
    unsafe impl aya::Pod for GenFrame {}
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::IpAddr;

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

    impl AddressKey {
        pub fn new(ip: IpAddr) -> Self {
            let (addr, family) = addr_words(ip);
            AddressKey {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{FAMILY_V4, FAMILY_V6};

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
        // struct bpf_lpm_trie_key: __u32 prefixlen, then the data.
        assert_eq!(core::mem::size_of::<PreferenceKey>(), 24);
        assert_eq!(core::mem::offset_of!(PreferenceKey, prefixlen), 0);
        assert_eq!(core::mem::offset_of!(PreferenceKey, service), 4);
        assert_eq!(core::mem::offset_of!(PreferenceKey, addr), 8);
        assert_eq!(core::mem::size_of::<PreferenceTable>(), 8);
        assert_eq!(core::mem::size_of::<ServerInfo>(), 24);
        assert_eq!(core::mem::size_of::<AgentInfo>(), 36);
        assert_eq!(core::mem::size_of::<TokenBucket>(), 16);
        assert_eq!(core::mem::size_of::<NextHop>(), 36);
        assert_eq!(core::mem::size_of::<ServerTraffic>(), 32);
        assert_eq!(core::mem::size_of::<AddressKey>(), 20);
        assert_eq!(core::mem::size_of::<ReverseStats>(), 16);
        assert_eq!(core::mem::size_of::<SynAckTunnelConfig>(), 36);
        assert_eq!(core::mem::size_of::<ClientBinding>(), 40);
    }
}
