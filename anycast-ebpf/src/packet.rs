//! Bounds-checked access to packet bytes and the header layout both programs share.
use aya_ebpf::programs::XdpContext;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// Offset of the flags byte in the TCP header, and its bits.
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to `T` at `off`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// Where the IP header starts and which one it is, after Ethernet and at most one 802.1Q tag.
pub struct L2 {
    pub l3: usize,
    pub ether_type: u16,
}

#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Option<L2> {
    let ether_type = read_be16(ctx, 12)?;
    if ether_type == ETH_P_8021Q {
        let inner = read_be16(ctx, ETH_LEN + 2)?;
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

/// Copies the Ethernet header (and VLAN tag) from offset `from` to offset `to` and sets the
/// ether type it carries. Used around `adjust_head` when a tunnel header is added or removed;
/// the two places never overlap, as the shift is at least one IPv4 header.
#[inline(always)]
pub fn move_l2(
    ctx: &XdpContext,
    from: usize,
    to: usize,
    vlan: bool,
    ether_type: u16,
) -> Option<()> {
    let src = ptr_at::<[u8; ETH_LEN]>(ctx, from)?;
    let dst = ptr_at::<[u8; ETH_LEN]>(ctx, to)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { dst.write_unaligned(src.read_unaligned()) };
    let type_off = if vlan {
        let tag_src = ptr_at::<[u8; VLAN_LEN]>(ctx, from + ETH_LEN)?;
        let tag_dst = ptr_at::<[u8; VLAN_LEN]>(ctx, to + ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { tag_dst.write_unaligned(tag_src.read_unaligned()) };
        to + ETH_LEN + 2
    } else {
        to + 12
    };
    let t = ptr_at::<[u8; 2]>(ctx, type_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { t.write_unaligned(ether_type.to_be_bytes()) };
    Some(())
}
