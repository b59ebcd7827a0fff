//! Network constants both sides use: address families, IP protocols, header lengths, TCP
//! flags, and the IPv4 header checksum (computed by the eBPF programs for the outer headers
//! they build).

/// Address family tags used in keys (values of `AF_INET`/`AF_INET6` on Linux).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// IP protocol numbers of the tunnels we build.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;
/// IPv6 Fragment extension header (RFC 8200 section 4.5).
pub const PROTO_IPV6_FRAGMENT: u8 = 44;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// ICMP and ICMPv6 types the agent handles (RFC 792, RFC 4443), and the fixed part of their
/// headers: type, code, checksum and 4 bytes (identifier and sequence number of an echo;
/// unused, next-hop MTU or MTU of an error), after which an error quotes the packet.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMP_LEN: usize = 8;
/// Hop limit / TTL of the echo replies the agent sends (what Linux sends by default).
pub const ECHO_REPLY_TTL: u8 = 64;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
/// Fixed header lengths (an IPv4 header may carry options after its 20 bytes).
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

/// IPv4 `frag_off` (host order): the More Fragments bit and the fragment offset. Any of
/// them set: the packet is a fragment.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// IPv4 `frag_off` (host order): the fragment offset alone. Set: a later piece, without the
/// L4 header.
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// IPv4 `frag_off` (host order): Don't Fragment.
pub const IPV4_DF: u16 = 0x4000;

/// Offset of the flags byte in the TCP header, and its bits.
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Hop limit / TTL of the outer headers of the tunnels we build.
pub const TUNNEL_TTL: u8 = 64;

/// The IPv4 header checksum (RFC 791; the ones' complement sum of RFC 1071) of a header
/// given as five 32-bit words in memory order (each word holds four header bytes as they
/// sit in the packet), with the checksum field zero. The result is in host order: store its
/// big-endian bytes in bytes 10-11. A header with its checksum filled in sums to 0.
#[inline(always)]
pub fn ipv4_checksum(words: &[u32; IPV4_LEN / 4]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words.len() {
        let x = u32::from_be(words[i]);
        sum += (x >> 16) + (x & 0xffff);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A ones' complement checksum (IPv4 header, ICMP, ICMPv6) after one 16-bit field it
/// covers changed from `old` to `new`, without summing the data again: RFC 1624, equation
/// 3, `HC' = ~(~HC + ~m + m')`. All values in host order (the fields' big-endian values).
#[inline(always)]
pub fn checksum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
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
}
#[cfg(feature = "user")]
pub use addr::{addr_words, words_addr};

#[cfg(test)]
mod tests {
    use super::*;

    fn words(h: [u8; IPV4_LEN]) -> [u32; IPV4_LEN / 4] {
        let mut w = [0u32; IPV4_LEN / 4];
        for (i, w) in w.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([h[i * 4], h[i * 4 + 1], h[i * 4 + 2], h[i * 4 + 3]]);
        }
        w
    }

    /// A known answer (the usual worked example: the header of a UDP packet 192.168.0.1 ->
    /// 192.168.0.199, checksum 0xb861), and a header with its checksum filled in sums to 0.
    #[test]
    fn ipv4_checksum_known_answer_and_verification() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&words(h)), 0xb861);
        [h[10], h[11]] = 0xb861u16.to_be_bytes();
        assert_eq!(ipv4_checksum(&words(h)), 0);
    }

    /// An incremental update gives the checksum a full recomputation gives, for random
    /// headers and every field position.
    #[test]
    fn checksum_replace_matches_recomputation() {
        fn full(h: &[u8; IPV4_LEN]) -> u16 {
            let mut sum = 0u32;
            for pair in h.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            !(sum as u16)
        }
        let mut seed = 0x8765_4321u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 16) as u16
        };
        for round in 0..2000 {
            let mut h = [0u8; IPV4_LEN];
            for pair in h.chunks_mut(2) {
                pair.copy_from_slice(&next().to_be_bytes());
            }
            [h[10], h[11]] = [0, 0];
            let check = full(&h);
            let field = [0usize, 2, 4, 6, 8, 12, 14, 16, 18][round % 9];
            let old = u16::from_be_bytes([h[field], h[field + 1]]);
            let new = if round % 7 == 0 { 0 } else { next() };
            [h[field], h[field + 1]] = new.to_be_bytes();
            let want = full(&h);
            let got = checksum_replace(check, old, new);
            // 0x0000 and 0xffff are the same number in ones' complement; a receiver's sum
            // over the header is all ones with either.
            assert!(
                got == want || (got | want == 0xffff && got & want == 0),
                "{h:02x?}: field {field} {old:#06x} -> {new:#06x}: {got:#06x}, want {want:#06x}"
            );
        }
    }

    /// Against a plain RFC 1071 sum over 16-bit big-endian fields, for headers whose sums
    /// carry more than once (all-ones addresses, large lengths).
    #[test]
    fn ipv4_checksum_matches_reference_sum() {
        fn reference(h: &[u8; IPV4_LEN]) -> u16 {
            let mut sum = 0u64;
            for pair in h.chunks(2) {
                sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            !(sum as u16)
        }
        let mut seed = 0x1234_5678u32;
        for _ in 0..1000 {
            let mut h = [0u8; IPV4_LEN];
            for b in h.iter_mut() {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (seed >> 24) as u8;
            }
            [h[10], h[11]] = [0, 0];
            assert_eq!(ipv4_checksum(&words(h)), reference(&h), "{h:02x?}");
        }
        let mut ones = [0xffu8; IPV4_LEN];
        [ones[10], ones[11]] = [0, 0];
        assert_eq!(ipv4_checksum(&words(ones)), reference(&ones));
    }
}
