//! Bounds-checked access to packet bytes, and the header views every program shares (the
//! agent, the decapsulator and the SYN-ACK tunnel).
//!
//! The layouts are network-types' (`EthHdr`, `VlanHdr`, `Ipv4Hdr`, `Ipv6Hdr`): sizes and
//! field offsets come from there. The views read the fields with [`load`] (16- and 32-bit
//! loads at even offsets) rather than through network-types' byte-array fields, which
//! compile to byte loads and shifts on BPF.
use anycast_common::{
    ipv4_checksum, ETH_LEN, ETH_P_8021Q, IPV4_DF, IPV4_LEN, IPV6_LEN, TUNNEL_TTL, VLAN_LEN,
};
use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::offset_of;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const _: () = assert!(EthHdr::LEN == ETH_LEN && VlanHdr::LEN == VLAN_LEN);
const _: () = assert!(Ipv4Hdr::LEN == IPV4_LEN && Ipv6Hdr::LEN == IPV6_LEN);

/// A program context whose packet bytes the program reads directly: XDP, and TC's linear
/// part of the packet.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

/// A pointer to `T` at `off`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &impl Packet, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn read_be16(ctx: &impl Packet, off: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// Where the IP header starts and which one it is, after Ethernet and at most one 802.1Q tag.
pub struct L2 {
    pub l3: usize,
    pub ether_type: u16,
}

impl L2 {
    /// Whether the frame carries an 802.1Q tag.
    #[inline(always)]
    pub fn vlan(&self) -> bool {
        self.l3 != ETH_LEN
    }
}

#[inline(always)]
pub fn parse_l2(ctx: &impl Packet) -> Option<L2> {
    let ether_type = read_be16(ctx, offset_of!(EthHdr, ether_type))?;
    if ether_type == ETH_P_8021Q {
        let inner = read_be16(ctx, ETH_LEN + offset_of!(VlanHdr, ether_type))?;
        return Some(L2 {
            l3: ETH_LEN + VLAN_LEN,
            ether_type: inner,
        });
    }
    Some(L2 {
        l3: ETH_LEN,
        ether_type,
    })
}

/// A `T` at an even address. Packet data starts at an even address and every header field
/// read or written as a word sits at an even offset, so 2-byte alignment is what can be
/// relied on. (A `read_unaligned` of a word compiles to byte loads on BPF; an alignment of 2
/// gives 16-bit loads and stores, and natural alignment, where the type has it.)
#[repr(C, packed(2))]
#[derive(Clone, Copy)]
struct Even<T>(T);

/// Loads a `T` at byte `off` after `base`.
///
/// # Safety
/// `base + off .. base + off + size_of::<T>()` must have been bounds checked, and
/// `base + off` must be even if `T` is wider than a byte.
#[inline(always)]
pub unsafe fn load<T: Copy>(base: *const u8, off: usize) -> T {
    base.add(off).cast::<Even<T>>().read().0
}

/// Stores `v` at byte `off` after `base`.
///
/// # Safety
/// `base + off .. base + off + size_of::<T>()` must have been bounds checked, and
/// `base + off` must be even if `T` is wider than a byte.
#[inline(always)]
pub unsafe fn store<T: Copy>(base: *mut u8, off: usize, v: T) {
    base.add(off).cast::<Even<T>>().write(Even(v))
}

/// The fixed 20 bytes of an IPv4 header, bounds checked. Valid until the packet is resized
/// (`adjust_head`, `adjust_room`): read what is needed before.
#[derive(Clone, Copy)]
pub struct Ipv4(*const u8);

impl Ipv4 {
    /// The header at `off` (an even offset), if its fixed part is inside the packet.
    #[inline(always)]
    pub fn at(ctx: &impl Packet, off: usize) -> Option<Self> {
        ptr_at::<Ipv4Hdr>(ctx, off).map(|p| Ipv4(p as *const u8))
    }

    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> T {
        // SAFETY: `at` checked the bounds of the whole fixed header; the fields read are at
        // even offsets of it, and it starts at an even offset.
        unsafe { load::<T>(self.0, off) }
    }

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.get::<u8>(offset_of!(Ipv4Hdr, vihl)) >> 4
    }

    /// The header length in bytes, options included (IHL * 4; less than 20 if malformed).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.get::<u8>(offset_of!(Ipv4Hdr, vihl)) & 0x0f) as usize) * 4
    }

    /// DSCP and ECN.
    #[inline(always)]
    pub fn tos(&self) -> u8 {
        self.get::<u8>(offset_of!(Ipv4Hdr, tos))
    }

    #[inline(always)]
    pub fn total_len(&self) -> u16 {
        u16::from_be(self.get::<u16>(offset_of!(Ipv4Hdr, tot_len)))
    }

    /// Flags and fragment offset, host order (see `IPV4_FRAGMENT_MASK`).
    #[inline(always)]
    pub fn frag_off(&self) -> u16 {
        u16::from_be(self.get::<u16>(offset_of!(Ipv4Hdr, frags)))
    }

    #[inline(always)]
    pub fn proto(&self) -> u8 {
        self.get::<u8>(offset_of!(Ipv4Hdr, proto))
    }

    /// The source address as it sits in the packet (a network-order word).
    #[inline(always)]
    pub fn src(&self) -> u32 {
        self.get::<u32>(offset_of!(Ipv4Hdr, src_addr))
    }

    /// The destination address as it sits in the packet (a network-order word).
    #[inline(always)]
    pub fn dst(&self) -> u32 {
        self.get::<u32>(offset_of!(Ipv4Hdr, dst_addr))
    }
}

/// The 40 bytes of an IPv6 header, bounds checked. Valid until the packet is resized.
#[derive(Clone, Copy)]
pub struct Ipv6(*const u8);

impl Ipv6 {
    /// The header at `off` (an even offset), if it is inside the packet.
    #[inline(always)]
    pub fn at(ctx: &impl Packet, off: usize) -> Option<Self> {
        ptr_at::<Ipv6Hdr>(ctx, off).map(|p| Ipv6(p as *const u8))
    }

    #[inline(always)]
    fn get<T: Copy>(&self, off: usize) -> T {
        // SAFETY: `at` checked the bounds of the whole header; the fields read are at even
        // offsets of it, and it starts at an even offset.
        unsafe { load::<T>(self.0, off) }
    }

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.get::<u8>(offset_of!(Ipv6Hdr, vcf)) >> 4
    }

    /// The traffic class (DSCP and ECN), which straddles the first two bytes.
    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        let b0 = self.get::<u8>(offset_of!(Ipv6Hdr, vcf));
        let b1 = self.get::<u8>(offset_of!(Ipv6Hdr, vcf) + 1);
        (b0 << 4) | (b1 >> 4)
    }

    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        u16::from_be(self.get::<u16>(offset_of!(Ipv6Hdr, payload_len)))
    }

    #[inline(always)]
    pub fn next_header(&self) -> u8 {
        self.get::<u8>(offset_of!(Ipv6Hdr, next_hdr))
    }

    /// Word `i` (0..4) of the source address, as it sits in the packet.
    #[inline(always)]
    pub fn src_word(&self, i: usize) -> u32 {
        self.get::<u32>(offset_of!(Ipv6Hdr, src_addr) + i * 4)
    }

    /// Word `i` (0..4) of the destination address, as it sits in the packet.
    #[inline(always)]
    pub fn dst_word(&self, i: usize) -> u32 {
        self.get::<u32>(offset_of!(Ipv6Hdr, dst_addr) + i * 4)
    }

    /// The source address as network-order words.
    #[inline(always)]
    pub fn src(&self) -> [u32; 4] {
        [
            self.src_word(0),
            self.src_word(1),
            self.src_word(2),
            self.src_word(3),
        ]
    }

    /// The destination address as network-order words.
    #[inline(always)]
    pub fn dst(&self) -> [u32; 4] {
        [
            self.dst_word(0),
            self.dst_word(1),
            self.dst_word(2),
            self.dst_word(3),
        ]
    }
}

/// The outer IPv4 header of a tunnel packet, as five words in memory order: no options,
/// DSCP/ECN `tos` (copied from the inner packet), DF set (an oversize tunnel packet must
/// fail loudly, not be fragmented), TTL [`TUNNEL_TTL`], checksum computed.
#[inline(always)]
pub fn ipv4_tunnel_header(tos: u8, total_len: u16, proto: u8, src: u32, dst: u32) -> [u32; 5] {
    let [t0, t1] = total_len.to_be_bytes();
    let [f0, f1] = IPV4_DF.to_be_bytes();
    let mut w = [
        u32::from_ne_bytes([0x45, tos, t0, t1]),
        u32::from_ne_bytes([0, 0, f0, f1]),
        u32::from_ne_bytes([TUNNEL_TTL, proto, 0, 0]),
        src,
        dst,
    ];
    let [c0, c1] = ipv4_checksum(&w).to_be_bytes();
    w[2] = u32::from_ne_bytes([TUNNEL_TTL, proto, c0, c1]);
    w
}

/// The first two words of the outer IPv6 header of a tunnel packet (the addresses follow):
/// traffic class `tos` (copied from the inner packet), flow label `flow_label` (20 bits),
/// hop limit [`TUNNEL_TTL`].
#[inline(always)]
pub fn ipv6_tunnel_header_start(tos: u8, flow_label: u32, payload_len: u16, next: u8) -> [u32; 2] {
    let [l0, l1] = payload_len.to_be_bytes();
    [
        u32::from_ne_bytes([
            0x60 | (tos >> 4),
            (tos << 4) | (flow_label >> 16) as u8,
            (flow_label >> 8) as u8,
            flow_label as u8,
        ]),
        u32::from_ne_bytes([l0, l1, next, TUNNEL_TTL]),
    ]
}

/// Copies the Ethernet header (and VLAN tag) from offset `from` to offset `to` and sets the
/// ether type it carries. Used around `adjust_head` when a tunnel header is added or removed;
/// the two places never overlap, as the shift is at least one IPv4 header. Copied as words:
/// a 14-byte array copy would become a byte-loop `memmove` call.
#[inline(always)]
pub fn move_l2(
    ctx: &XdpContext,
    from: usize,
    to: usize,
    vlan: bool,
    ether_type: u16,
) -> Option<()> {
    let src = ptr_at::<[u8; ETH_LEN]>(ctx, from)? as *const u8;
    let dst = ptr_at::<[u8; ETH_LEN]>(ctx, to)? as *mut u8;
    // SAFETY: bounds checked by ptr_at; the ranges do not overlap.
    unsafe {
        store(dst, 0, load::<u32>(src, 0));
        store(dst, 4, load::<u32>(src, 4));
        store(dst, 8, load::<u32>(src, 8));
    }
    let type_off = if vlan {
        let tag_src = ptr_at::<[u8; 2 + VLAN_LEN]>(ctx, from + 12)? as *const u8;
        let tag_dst = ptr_at::<[u8; 2 + VLAN_LEN]>(ctx, to + 12)? as *mut u8;
        // SAFETY: bounds checked by ptr_at; the ranges do not overlap.
        unsafe {
            store(tag_dst, 0, load::<u16>(tag_src, 0));
            store(tag_dst, 2, load::<u16>(tag_src, 2));
        }
        to + ETH_LEN + 2
    } else {
        to + 12
    };
    let t = ptr_at::<u16>(ctx, type_off)? as *mut u8;
    // SAFETY: bounds checked by ptr_at; an even offset.
    unsafe { store(t, 0, ether_type.to_be()) };
    Some(())
}
