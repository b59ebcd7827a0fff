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
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const SERVER_STATS: &str = "SERVER_STATS";
    /// Server side: anycast addresses this server answers for.
    pub const SERVED: &str = "SERVED";
    pub const DECAP_STATS: &str = "DECAP_STATS";
}

/// Program names, as they appear in the eBPF object.
pub mod programs {
    pub const AGENT: &str = "anycast_agent";
    pub const SERVER_DECAP: &str = "anycast_decap";
    pub const PASS: &str = "xdp_pass";
}

/// Default and compiled-in upper bounds. The ring and flow maps are sized at load time
/// from the agent's configuration; these are the defaults.
pub const DEFAULT_MAX_SERVICES: u32 = 64;
pub const MAX_SERVERS: u32 = 4096;
pub const DEFAULT_RING_SIZE: u32 = 65537;
pub const DEFAULT_MAX_FLOWS: u32 = 1_000_000;
pub const MAX_SERVED: u32 = 1024;
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
    pub flags: u32,
}

/// A server's real address, where tunnelled packets go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServerInfo {
    pub addr: [u32; 4],
    pub family: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
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

/// The server a flow is pinned to. 8 bytes, so key + value is 48 bytes per flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub server: u32,
    pub generation: u32,
}

/// The agent's own addresses: outer source of the tunnels it builds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentInfo {
    pub v6: [u32; 4],
    pub v4: u32,
    pub flags: u32,
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
    pub const COUNT: u32 = 14;

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

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, contain only integers and explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for ServerInfo {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for AgentInfo {}
    unsafe impl aya::Pod for Traffic {}
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
    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FlowValue>(), 8);
        assert_eq!(core::mem::size_of::<ServerInfo>(), 24);
        assert_eq!(core::mem::size_of::<AgentInfo>(), 24);
    }
}
