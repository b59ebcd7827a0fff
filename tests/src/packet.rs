//! Test frames, built byte by byte, independently of the data path's code: the one packet
//! builder of the data-path fixtures and the benchmarks.
//!
//! ```
//! use anycast_tests::packet::{ethernet, tcp, Ip, TCP_ACK};
//! let ip = Ip::new("198.51.100.7".parse()?, "192.0.2.10".parse()?, 6)
//!     .ttl(61)
//!     .packet(&tcp(40000, 80, TCP_ACK, b"payload"));
//! let frame = ethernet([2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 0, 0xaa], None, &ip);
//! assert_eq!(frame.len(), 14 + 20 + 20 + 7);
//! # Ok::<(), std::net::AddrParseError>(())
//! ```
use std::{fmt::Write as _, net::IpAddr};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_SYN_ACK: u8 = TCP_SYN | TCP_ACK;

/// IPv4's Don't Fragment bit, in the flags-and-offset field.
pub const DF: u16 = 0x4000;
/// IPv4's More Fragments bit.
pub const MF: u16 = 0x2000;

/// Internet checksum (RFC 1071) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment (no options) with `flags`; the checksum field holds 0xbeef, as the data
/// path never reads it.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    h.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // ack
    h.push(5 << 4); // data offset
    h.push(flags);
    h.extend_from_slice(&0xfaf0u16.to_be_bytes()); // window
    h.extend_from_slice(&0xbeefu16.to_be_bytes()); // checksum
    h.extend_from_slice(&[0, 0]); // urgent pointer
    h.extend_from_slice(payload);
    h
}

/// A UDP datagram; the checksum field holds 0xbeef.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&0xbeefu16.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IP header of either family, by its addresses; [`Ip::packet`] puts it in front of a
/// payload. Defaults: TOS/traffic class 0, TTL/hop limit 64, IPv4 id 0 and DF, IPv6 flow
/// label 0, no IPv4 options: the outer header the data path writes.
#[derive(Clone, Debug)]
pub struct Ip {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    tos: u8,
    ttl: u8,
    id: u16,
    frag: u16,
    label: u32,
    options: Vec<u8>,
}

impl Ip {
    /// `proto` is the IPv4 protocol or the IPv6 next header.
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8) -> Ip {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "mixed families: {src} -> {dst}"
        );
        Ip {
            src,
            dst,
            proto,
            tos: 0,
            ttl: 64,
            id: 0,
            frag: DF,
            label: 0,
            options: Vec::new(),
        }
    }
    /// IPv4 TOS (DSCP and ECN) or IPv6 traffic class.
    pub fn tos(mut self, tos: u8) -> Ip {
        self.tos = tos;
        self
    }
    /// IPv4 TTL or IPv6 hop limit.
    pub fn ttl(mut self, ttl: u8) -> Ip {
        self.ttl = ttl;
        self
    }
    /// IPv4 identification.
    pub fn id(mut self, id: u16) -> Ip {
        self.id = id;
        self
    }
    /// IPv4 flags and fragment offset (in 8-byte units), e.g. [`DF`], [`MF`], `0x0003`.
    pub fn frag(mut self, frag: u16) -> Ip {
        self.frag = frag;
        self
    }
    /// IPv6 flow label (20 bits).
    pub fn label(mut self, label: u32) -> Ip {
        self.label = label & 0x000f_ffff;
        self
    }
    /// IPv4 options: a multiple of 4 bytes, at most 40.
    pub fn options(mut self, options: &[u8]) -> Ip {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40);
        self.options = options.to_vec();
        self
    }

    /// The header and `payload`; an IPv4 header checksum is computed here.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ihl = (20 + self.options.len()) / 4;
                let total = (ihl * 4 + payload.len()) as u16;
                let mut h = vec![0x40 | ihl as u8, self.tos];
                h.extend_from_slice(&total.to_be_bytes());
                h.extend_from_slice(&self.id.to_be_bytes());
                h.extend_from_slice(&self.frag.to_be_bytes());
                h.push(self.ttl);
                h.push(self.proto);
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&self.options);
                let sum = inet_checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(payload);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let first = (6u32 << 28) | (u32::from(self.tos) << 20) | self.label;
                let mut h = first.to_be_bytes().to_vec();
                h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                h.push(self.proto);
                h.push(self.ttl);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(payload);
                h
            }
            _ => unreachable!("checked in Ip::new"),
        }
    }
}

/// Recomputes the header checksum of an IPv4 packet after an edit (no-op for IPv6 or a
/// header too short to hold one).
pub fn fix_ipv4_checksum(ip: &mut [u8]) {
    if ip.len() < 12 || ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
        return;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = inet_checksum(&ip[..ihl.min(ip.len())]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The ether type of an IP packet, by its version.
pub fn ethertype_of(ip: &[u8]) -> u16 {
    match ip[0] >> 4 {
        4 => ETH_P_IPV4,
        6 => ETH_P_IPV6,
        v => panic!("IP version {v}"),
    }
}

/// An Ethernet frame carrying the IP packet `ip`, behind an 802.1Q tag if `vlan` is set.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    ethernet_with(dst, src, vlan, ethertype_of(ip), ip)
}

/// An Ethernet frame of any ether type.
pub fn ethernet_with(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    body: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_LEN + 4 + body.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// An ARP request from `mac`/`ip` for `target`, broadcast.
pub fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    a.extend_from_slice(&mac);
    a.extend_from_slice(&ip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    ethernet_with([0xff; 6], mac, None, ETH_P_ARP, &a)
}

/// `aa:bb:...` for `ip link` and `ip neigh`.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Hex dump, 16 bytes a line, so that assertion diffs point at the offending bytes.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let _ = write!(s, "{:04x}:", i * 16);
        for byte in chunk {
            let _ = write!(s, " {byte:02x}");
        }
        s.push('\n');
    }
    s
}

/// Where two frames first differ, for failure messages.
pub fn first_difference(actual: &[u8], expected: &[u8]) -> String {
    match actual.iter().zip(expected).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None if actual.len() != expected.len() => format!(
            "lengths differ: {} (actual) vs {} (expected)",
            actual.len(),
            expected.len()
        ),
        None => "identical".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usual worked example of the IPv4 header checksum (Wikipedia, "Internet
    /// checksum"): 4500 0073 0000 4000 4011 xxxx c0a8 0001 c0a8 00c7 sums to 0xb861.
    #[test]
    fn ipv4_header_checksum_matches_a_known_header() {
        let ip = Ip::new(
            "192.168.0.1".parse().unwrap(),
            "192.168.0.199".parse().unwrap(),
            17,
        )
        .packet(&[0; 0x73 - 20]);
        assert_eq!(
            &ip[..12],
            &[0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0xb8, 0x61]
        );
        assert_eq!(
            inet_checksum(&ip[..20]),
            0,
            "a header with its checksum sums to 0"
        );
    }

    #[test]
    fn frames_carry_their_tag_and_ether_type() {
        let ip = Ip::new(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            17,
        )
        .tos(0xa6)
        .label(0x5_4321)
        .packet(&udp(1, 2, b"x"));
        assert_eq!(&ip[..4], &[0x6a, 0x65, 0x43, 0x21]);
        let f = ethernet([1; 6], [2; 6], Some(100), &ip);
        assert_eq!(&f[12..18], &[0x81, 0x00, 0x00, 100, 0x86, 0xdd]);
        assert_eq!(f.len(), 18 + 40 + 9);
    }
}
