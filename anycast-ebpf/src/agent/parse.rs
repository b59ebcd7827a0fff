//! First stage: what the packet is. A TCP or UDP packet to an address that may be a service
//! (its `ADDRESS_FILTER` bit is set) is a [`Flow`]; an ICMP (ICMPv6) packet to such an address
//! is an [`Icmp`], which may be an echo request or an error about a service's reply; an
//! IP-in-IP packet (outer protocol 4 or 41) is a [`Tunnel`], which may be a server's SYN-ACK
//! to relay; anything else passes, with the verdict that says why.
use anycast_common::{
    address_filter_bit, verdict, FlowKey, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, FAMILY_V6, ICMP_LEN,
    IPV4_FRAGMENT_MASK, IPV4_LEN, IPV6_LEN, PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6,
    PROTO_IPV6_FRAGMENT, PROTO_TCP, PROTO_UDP, TCP_FLAGS_OFF, TCP_LEN, UDP_LEN,
};
use aya_ebpf::programs::XdpContext;

use super::maps::ADDRESS_FILTER;
use crate::packet::{load, parse_l2, ptr_at, read, Ipv4, Ipv6};

/// What the parser found.
pub(super) enum Parsed {
    /// TCP or UDP to an address that may be a service.
    Flow(Flow),
    /// IP-in-IP or IPv6-in-IP.
    Tunnel(Tunnel),
    /// ICMP (ICMPv6) to an address that may be a service.
    Icmp(Icmp),
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) packet to an address that may be a service, whose fixed
/// 8-byte ICMP header lies inside the IP packet.
pub(super) struct Icmp {
    pub l3: usize,
    pub vlan: bool,
    /// Where the ICMP header starts.
    pub l4: usize,
    /// Where the IP packet ends (by its header's length; Ethernet padding excluded).
    pub end: usize,
    pub family: u8,
    /// DSCP/ECN byte, copied to the outer header when the packet is tunnelled.
    pub tos: u8,
    /// The destination address (network-order words; IPv4 in word 0).
    pub dst: [u32; 4],
}

/// A TCP or UDP packet that may belong to a service.
pub(super) struct Flow {
    /// Where the IP header starts.
    pub l3: usize,
    /// Whether the frame carries an 802.1Q tag.
    pub vlan: bool,
    pub key: FlowKey,
    /// Length of the IP packet (from its header, so Ethernet padding is not counted).
    pub inner_len: u16,
    /// DSCP/ECN byte, copied to the outer header.
    pub tos: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

/// A tunnel packet: its outer IP header passed the same checks as a flow's (version,
/// lengths, not a fragment).
pub(super) struct Tunnel {
    pub l3: usize,
    pub vlan: bool,
    /// Length of the outer IP header (options included): where the inner packet starts,
    /// after `l3`.
    pub outer_len: usize,
    /// [`PROTO_IPIP`] or [`PROTO_IPV6`].
    pub inner_proto: u8,
    /// The outer header's family, source and destination (network-order words).
    pub family: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// The packet's kind, or `Err(verdict)` for a packet the agent passes untouched.
#[inline(always)]
pub(super) fn parse(ctx: &XdpContext) -> Result<Parsed, u32> {
    let l2 = parse_l2(ctx).ok_or(verdict::PASS_MALFORMED)?;
    let frame_len = ctx.data_end() - ctx.data();
    let l3 = l2.l3;
    let mut key = FlowKey::default();
    let (l4, proto, inner_len, tos) = match l2.ether_type {
        ETH_P_IPV4 => {
            let h = Ipv4::at(ctx, l3).ok_or(verdict::PASS_MALFORMED)?;
            let ihl = h.header_len();
            let tot_len = h.total_len() as usize;
            if h.version() != 4 || ihl < IPV4_LEN || tot_len < ihl || l3 + tot_len > frame_len {
                return Err(verdict::PASS_MALFORMED);
            }
            if h.frag_off() & IPV4_FRAGMENT_MASK != 0 {
                return Err(verdict::PASS_FRAGMENT);
            }
            key.family = FAMILY_V4;
            key.src[0] = h.src();
            key.dst[0] = h.dst();
            (l3 + ihl, h.proto(), tot_len, h.tos())
        }
        ETH_P_IPV6 => {
            let h = Ipv6::at(ctx, l3).ok_or(verdict::PASS_MALFORMED)?;
            let tot_len = IPV6_LEN + h.payload_len() as usize;
            if h.version() != 6 || l3 + tot_len > frame_len {
                return Err(verdict::PASS_MALFORMED);
            }
            let next = h.next_header();
            if next == PROTO_IPV6_FRAGMENT {
                return Err(verdict::PASS_FRAGMENT);
            }
            key.family = FAMILY_V6;
            key.src = h.src();
            key.dst = h.dst();
            (l3 + IPV6_LEN, next, tot_len, h.traffic_class())
        }
        _ => return Err(verdict::PASS_NOT_SERVICE),
    };
    let l4_len = match proto {
        PROTO_TCP => TCP_LEN,
        PROTO_UDP => UDP_LEN,
        PROTO_IPIP | PROTO_IPV6 => {
            return Ok(Parsed::Tunnel(Tunnel {
                l3,
                vlan: l2.vlan(),
                outer_len: l4 - l3,
                inner_proto: proto,
                family: key.family,
                src: key.src,
                dst: key.dst,
            }))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // ICMP in IPv4, ICMPv6 in IPv6; nothing else is ICMP to the agent.
            let own = if key.family == FAMILY_V4 {
                PROTO_ICMP
            } else {
                PROTO_ICMPV6
            };
            if proto != own || !maybe_service(key.family, &key.dst) {
                return Err(verdict::PASS_NOT_SERVICE);
            }
            if l4 + ICMP_LEN > l3 + inner_len {
                return Err(verdict::PASS_MALFORMED);
            }
            return Ok(Parsed::Icmp(Icmp {
                l3,
                vlan: l2.vlan(),
                l4,
                end: l3 + inner_len,
                family: key.family,
                tos,
                dst: key.dst,
            }));
        }
        _ => return Err(verdict::PASS_NOT_SERVICE),
    };
    if !maybe_service(key.family, &key.dst) {
        return Err(verdict::PASS_NOT_SERVICE);
    }
    // The whole fixed L4 header must be inside the IP packet.
    if l4 + l4_len > l3 + inner_len {
        return Err(verdict::PASS_MALFORMED);
    }
    let ports = ptr_at::<[u8; 4]>(ctx, l4).ok_or(verdict::PASS_MALFORMED)? as *const u8;
    let tcp_flags = if proto == PROTO_TCP {
        read::<u8>(ctx, l4 + TCP_FLAGS_OFF).ok_or(verdict::PASS_MALFORMED)?
    } else {
        0
    };
    key.proto = proto;
    // SAFETY: ptr_at checked the bounds of both ports.
    unsafe {
        key.sport = u16::from_be(load::<u16>(ports, 0));
        key.dport = u16::from_be(load::<u16>(ports, 2));
    }
    Ok(Parsed::Flow(Flow {
        l3,
        vlan: l2.vlan(),
        key,
        inner_len: inner_len as u16,
        tos,
        tcp_flags,
    }))
}

/// False when no service has this address (its `ADDRESS_FILTER` bit is clear).
#[inline(always)]
fn maybe_service(family: u8, addr: &[u32; 4]) -> bool {
    let (word, bit) = address_filter_bit(family, addr);
    ADDRESS_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}
