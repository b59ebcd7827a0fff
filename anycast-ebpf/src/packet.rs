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
