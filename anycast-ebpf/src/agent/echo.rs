//! The agent answers ICMP echo requests (ICMPv6 too) to an anycast service address
//! (`SERVICE_ADDRS`), so operators can ping the service: the request becomes its reply in
//! place (RFC 792; RFC 4443 section 4.2): MACs and IP addresses swapped, type 0 (129), TTL
//! (hop limit) [`ECHO_REPLY_TTL`], identifier, sequence number and data kept, checksums
//! updated incrementally (swapping the addresses leaves every sum, the ICMPv6 pseudo-header
//! included, unchanged), and sent back out of the port it came in on (`XDP_TX`), 802.1Q tag
//! kept. The reply is no larger than the request, so a forged source gains no
//! amplification. A request from an address no reply may go to (RFC 1122 section 3.2.2:
//! multicast, broadcast, unspecified, loopback) passes to the kernel, counted as malformed.
use anycast_common::{
    checksum_replace, verdict, AddressKey, ECHO_REPLY_TTL, FAMILY_V4, ICMPV6_ECHO_REPLY,
    ICMP_ECHO_REPLY,
};
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use super::maps::SERVICE_ADDRS;
use super::parse::Icmp;
use crate::packet::{load, ptr_at, store};

/// Offsets in the IPv4 header: the TTL/protocol word, its checksum, the addresses.
const V4_TTL: usize = 8;
const V4_CHECK: usize = 10;
const V4_SRC: usize = 12;
/// Offsets in the IPv6 header: the hop limit, the addresses.
const V6_HOP_LIMIT: usize = 7;
const V6_SRC: usize = 8;
const V6_DST: usize = 24;

/// Turns the echo request `m` into its reply (see the module doc).
#[inline(always)]
pub(super) fn reply(ctx: &XdpContext, m: &Icmp) -> (u32, u32) {
    let key = AddressKey {
        addr: m.dst,
        family: m.family,
        _pad: [0; 3],
    };
    if SERVICE_ADDRS.get_ptr(&key).is_none() {
        return (xdp_action::XDP_PASS, verdict::PASS_NOT_SERVICE);
    }
    let done = if m.family == FAMILY_V4 {
        reply_v4(ctx, m)
    } else {
        reply_v6(ctx, m)
    };
    match done {
        Some(()) => (xdp_action::XDP_TX, verdict::ECHO_REPLY),
        None => (xdp_action::XDP_PASS, verdict::PASS_ICMP_MALFORMED),
    }
}

#[inline(always)]
fn reply_v4(ctx: &XdpContext, m: &Icmp) -> Option<()> {
    let ip = ptr_at::<[u8; 20]>(ctx, m.l3)? as *mut u8;
    let icmp = ptr_at::<[u8; 4]>(ctx, m.l4)? as *mut u8;
    let eth = ptr_at::<[u8; 12]>(ctx, 0)? as *mut u8;
    // SAFETY: every access is inside the ranges ptr_at checked; the words are at even
    // offsets.
    unsafe {
        let src = load::<u32>(ip, V4_SRC);
        let first = load::<u8>(ip, V4_SRC);
        // 0/8, 127/8, and 224/4 (multicast) and up (reserved, broadcast).
        if first == 0 || first == 127 || first >= 224 {
            return None;
        }
        swap_macs(eth);
        echo_type(icmp, ICMP_ECHO_REPLY);
        store(ip, V4_SRC, load::<u32>(ip, V4_SRC + 4));
        store(ip, V4_SRC + 4, src);
        let old = u16::from_be(load::<u16>(ip, V4_TTL));
        let new = ((ECHO_REPLY_TTL as u16) << 8) | (old & 0xff);
        let check = u16::from_be(load::<u16>(ip, V4_CHECK));
        store(ip, V4_TTL, new.to_be());
        store(ip, V4_CHECK, checksum_replace(check, old, new).to_be());
    }
    Some(())
}

#[inline(always)]
fn reply_v6(ctx: &XdpContext, m: &Icmp) -> Option<()> {
    let ip = ptr_at::<[u8; 40]>(ctx, m.l3)? as *mut u8;
    let icmp = ptr_at::<[u8; 4]>(ctx, m.l4)? as *mut u8;
    let eth = ptr_at::<[u8; 12]>(ctx, 0)? as *mut u8;
    // SAFETY: as in reply_v4.
    unsafe {
        let w = |i: usize| load::<u32>(ip, V6_SRC + i * 4);
        let unspecified = w(0) | w(1) | w(2) | w(3) == 0;
        let loopback = w(0) | w(1) | w(2) == 0 && u32::from_be(w(3)) == 1;
        if load::<u8>(ip, V6_SRC) == 0xff || unspecified || loopback {
            return None;
        }
        swap_macs(eth);
        echo_type(icmp, ICMPV6_ECHO_REPLY);
        let mut i = 0;
        while i < 16 {
            let src = load::<u32>(ip, V6_SRC + i);
            store(ip, V6_SRC + i, load::<u32>(ip, V6_DST + i));
            store(ip, V6_DST + i, src);
            i += 4;
        }
        store(ip, V6_HOP_LIMIT, ECHO_REPLY_TTL);
    }
    Some(())
}

/// Destination and source MAC swapped: back to the sender's next hop.
///
/// # Safety
/// `eth` points at 12 bounds-checked bytes at an even address.
#[inline(always)]
unsafe fn swap_macs(eth: *mut u8) {
    let d = [
        load::<u16>(eth, 0),
        load::<u16>(eth, 2),
        load::<u16>(eth, 4),
    ];
    store(eth, 0, load::<u16>(eth, 6));
    store(eth, 2, load::<u16>(eth, 8));
    store(eth, 4, load::<u16>(eth, 10));
    store(eth, 6, d[0]);
    store(eth, 8, d[1]);
    store(eth, 10, d[2]);
}

/// Sets the ICMP type (the first byte of the type/code word, which the checksum covers) and
/// updates the checksum.
///
/// # Safety
/// `icmp` points at the ICMP header's first 4 bounds-checked bytes, at an even address.
#[inline(always)]
unsafe fn echo_type(icmp: *mut u8, kind: u8) {
    let old = u16::from_be(load::<u16>(icmp, 0));
    let new = ((kind as u16) << 8) | (old & 0xff);
    let check = u16::from_be(load::<u16>(icmp, 2));
    store(icmp, 0, new.to_be());
    store(icmp, 2, checksum_replace(check, old, new).to_be());
}
