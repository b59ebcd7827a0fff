//! Too big for the tunnel: a client packet that, with the outer header, exceeds the egress
//! MTU gets an answer the client's stack learns its path MTU from: ICMP "fragmentation
//! needed and DF set" (type 3 code 4, RFC 792; next-hop MTU field, RFC 1191 section 4) for
//! IPv4 with DF, ICMPv6 "packet too big" (type 2, RFC 4443 section 3.2) for IPv6. The MTU
//! given is the egress MTU less the outer header (20 or 40 bytes); the source is the anycast
//! address the client sent to (the peer of its connection; for IPv6, RFC 4443 section 2.2
//! (a): an error about a packet to one of the node's unicast addresses comes from it).
//!
//! The answer is built in place from the frame as encapsulation left it, and sent back out
//! of the ingress port with the MACs swapped (the client's 802.1Q tag kept: the answer goes
//! back on the client's segment):
//!
//! ```text
//! before: [Ethernet (+ tag)][outer IP header][the client's IP packet ...........]
//! after:  [Ethernet (+ tag)][IP header][ICMP header][the client's first Q bytes]
//! ```
//!
//! The head moves by (outer header - IP header - 8), the Ethernet header is written anew at
//! the new start, and the tail is cut after the quote. The quote has a fixed length per
//! family, so the checksum is `bpf_csum_diff` over constant sizes: IPv4 68 bytes (the
//! longest IPv4 header and the 8 bytes after it, RFC 792's minimum; a 96-byte answer), IPv6
//! 1232 bytes (as much as fits in the minimum MTU, RFC 4443 section 2.4 (c); a 1280-byte
//! answer).
//!
//! Not answered (dropped and counted `drop_too_big`, as with answers off): IPv4 without DF
//! (the agent does not fragment; the sender did not ask for path MTU discovery); a client
//! source no error may be sent to (RFC 1812 section 4.3.2.7, RFC 4443 section 2.4 (e):
//! unspecified, loopback, multicast, broadcast or class E) or a frame sent to a link-layer
//! group address; a path whose MTU less the outer header is below the family's minimum
//! (IPv4 68, RFC 791; IPv6 1280, RFC 8200 section 5: an IPv6 tunnel must carry 1280-byte
//! packets, which this one cannot, so no valid answer exists: the path to that server is
//! misconfigured). Answers are rate-limited per CPU ([`take_token`]).
use anycast_common::{
    ipv4_checksum, verdict, AgentInfo, AGENT_ANSWER_TOO_BIG, BUCKET_TOO_BIG, ETH_P_IPV4,
    ETH_P_IPV6, FAMILY_V4, IPV4_DF, IPV4_LEN, IPV6_LEN,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use super::maps::take_token;
use super::parse::Flow;
use crate::packet::{load, ptr_at, read, read_be16, store};

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// Type, code, checksum and the 4 bytes that hold the MTU.
const ICMP_LEN: usize = 8;
/// The smallest MTU each family allows: an answer never gives less.
const IPV4_MIN_MTU: usize = 68;
const IPV6_MIN_MTU: usize = 1280;
/// Bytes of the client's IPv4 packet quoted: its header (at most 60 bytes) and at least 8
/// more. No more than the minimum MTU, so a packet too big for any valid MTU has them all.
const QUOTE_V4: usize = 68;
/// Bytes of the client's IPv6 packet quoted: the answer fills the minimum MTU exactly. A
/// packet too big for a path of at least 1280 bytes is longer than that.
const QUOTE_V6: usize = IPV6_MIN_MTU - IPV6_LEN - ICMP_LEN;
/// `bpf_csum_diff` takes at most 512 bytes at a time.
const CSUM_CHUNK: usize = 512;
/// IPv4 precedence 6, internetwork control (RFC 1812 section 4.3.2.5: ICMP errors SHOULD
/// carry 6 or 7).
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
const ANSWER_TTL: u8 = 64;

const _: () = assert!(QUOTE_V4 >= 60 + 8 && QUOTE_V4 <= IPV4_MIN_MTU && QUOTE_V4 % 4 == 0);
const _: () = assert!(QUOTE_V6 == 1232 && QUOTE_V6 <= 3 * CSUM_CHUNK && QUOTE_V6 % 4 == 0);

/// What to do with client packet `p`, already encapsulated towards a server of family
/// `server_family`, which the FIB found too big for its egress MTU `mtu`.
#[inline(always)]
pub(super) fn answer(
    ctx: &XdpContext,
    p: &Flow,
    agent: &AgentInfo,
    server_family: u8,
    mtu: u16,
) -> (u32, u32) {
    const NOT_ANSWERED: (u32, u32) = (xdp_action::XDP_DROP, verdict::DROP_TOO_BIG);
    if agent.flags & AGENT_ANSWER_TOO_BIG == 0 {
        return NOT_ANSWERED;
    }
    let outer = if server_family == FAMILY_V4 {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    let mtu = mtu as usize;
    // A kernel that does not report the MTU leaves the length asked about in its place.
    if mtu >= p.inner_len as usize + outer {
        return NOT_ANSWERED;
    }
    let room = mtu.saturating_sub(outer);
    let v4 = p.key.family == FAMILY_V4;
    // Never an error about an error (RFC 1812 section 4.3.2.7, RFC 4443 section 2.4 (e)):
    // the only ICMP tunnelled is an error about a service's reply (icmp.rs), and one that
    // does not fit is dropped. Its protocol byte is behind the outer header.
    let inner_proto = p.l3 + outer + if v4 { 9 } else { 6 };
    match read::<u8>(ctx, inner_proto) {
        Some(PROTO_ICMP | PROTO_ICMPV6) | None => return NOT_ANSWERED,
        Some(_) => {}
    }
    if v4 {
        // The client's flags, behind the outer header.
        let Some(frag) = read_be16(ctx, p.l3 + outer + 6) else {
            return NOT_ANSWERED;
        };
        if frag & IPV4_DF == 0 || room < IPV4_MIN_MTU || !unicast_v4(p.key.src[0]) {
            return NOT_ANSWERED;
        }
    } else if room < IPV6_MIN_MTU || !unicast_v6(&p.key.src) {
        return NOT_ANSWERED;
    }
    // The Ethernet destination's group bit: a broadcast or multicast frame gets no error.
    // (The whole address is bounds checked: LLVM turns a check for one byte at offset 0
    // into a comparison the verifier learns no bound from.)
    let Some(dst_mac) = ptr_at::<[u8; 6]>(ctx, 0) else {
        return NOT_ANSWERED;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { load::<u8>(dst_mac as *const u8, 0) } & 1 != 0 {
        return NOT_ANSWERED;
    }
    if !take_token(BUCKET_TOO_BIG, agent.too_big_cost_ns) {
        return (xdp_action::XDP_DROP, verdict::TOO_BIG_RATE_LIMITED);
    }
    let built = if v4 {
        frag_needed(ctx, p, outer, room as u16)
    } else {
        packet_too_big(ctx, p, outer, room as u32)
    };
    match built {
        Some(()) => (xdp_action::XDP_TX, verdict::TOO_BIG_ANSWERED),
        None => NOT_ANSWERED,
    }
}

/// Not an address an ICMP error may go to (RFC 1812 section 4.3.2.7): 0/8, 127/8, and
/// 224/3 (multicast, class E, limited broadcast). `src` is a network-order word.
#[inline(always)]
fn unicast_v4(src: u32) -> bool {
    let first = src.to_ne_bytes()[0];
    first != 0 && first != 127 && first < 224
}

/// Not unspecified, loopback or multicast (RFC 4443 section 2.4 (e)).
#[inline(always)]
fn unicast_v6(src: &[u32; 4]) -> bool {
    let high_zero = src[0] == 0 && src[1] == 0 && src[2] == 0;
    let low = u32::from_be(src[3]);
    src[0].to_ne_bytes()[0] != 0xff && !(high_zero && low <= 1)
}

/// The IPv4 answer: [IPv4 20][ICMP 8][quote 68].
#[inline(always)]
fn frag_needed(ctx: &XdpContext, p: &Flow, outer: usize, mtu: u16) -> Option<()> {
    const TOTAL: usize = IPV4_LEN + ICMP_LEN + QUOTE_V4;
    reshape(ctx, p, outer, IPV4_LEN, QUOTE_V4, ETH_P_IPV4)?;
    let [t0, t1] = (TOTAL as u16).to_be_bytes();
    // id 0 with DF: an atomic datagram (RFC 6864 section 4); it is never fragmented.
    let mut ip = [
        u32::from_ne_bytes([0x45, TOS_INTERNETWORK_CONTROL, t0, t1]),
        u32::from_ne_bytes([0, 0, (IPV4_DF >> 8) as u8, 0]),
        u32::from_ne_bytes([ANSWER_TTL, PROTO_ICMP, 0, 0]),
        p.key.dst[0],
        p.key.src[0],
    ];
    let [c0, c1] = ipv4_checksum(&ip).to_be_bytes();
    ip[2] = u32::from_ne_bytes([ANSWER_TTL, PROTO_ICMP, c0, c1]);
    let [m0, m1] = mtu.to_be_bytes();
    // Type 3 (destination unreachable), code 4 (fragmentation needed and DF set); unused
    // 16 bits; the next-hop MTU.
    let icmp = [
        u32::from_ne_bytes([3, 4, 0, 0]),
        u32::from_ne_bytes([0, 0, m0, m1]),
    ];
    let at = ptr_at::<[u8; TOTAL]>(ctx, p.l3)? as *mut u8;
    let mut i = 0;
    while i < ip.len() {
        // SAFETY: bounds checked by ptr_at; an even offset.
        unsafe { store(at, i * 4, ip[i]) };
        i += 1;
    }
    // SAFETY: as above.
    unsafe {
        store(at, IPV4_LEN, icmp[0]);
        store(at, IPV4_LEN + 4, icmp[1]);
    }
    // SAFETY: the quote lies inside the TOTAL bytes ptr_at checked.
    let quote = unsafe { at.add(IPV4_LEN + ICMP_LEN) };
    let sum = csum(quote, QUOTE_V4, 0)? + icmp[0] as u64 + icmp[1] as u64;
    // SAFETY: as above.
    unsafe { store(at, IPV4_LEN + 2, fold(sum)) };
    Some(())
}

/// The IPv6 answer: [IPv6 40][ICMPv6 8][quote 1232].
#[inline(always)]
fn packet_too_big(ctx: &XdpContext, p: &Flow, outer: usize, mtu: u32) -> Option<()> {
    const TOTAL: usize = IPV6_LEN + ICMP_LEN + QUOTE_V6;
    const PAYLOAD: u16 = (ICMP_LEN + QUOTE_V6) as u16;
    reshape(ctx, p, outer, IPV6_LEN, QUOTE_V6, ETH_P_IPV6)?;
    let [l0, l1] = PAYLOAD.to_be_bytes();
    // Traffic class and flow label 0.
    let head = [
        u32::from_ne_bytes([0x60, 0, 0, 0]),
        u32::from_ne_bytes([l0, l1, PROTO_ICMPV6, ANSWER_TTL]),
    ];
    // Type 2 (packet too big), code 0; the MTU.
    let icmp = [
        u32::from_ne_bytes([2, 0, 0, 0]),
        u32::from_ne_bytes(mtu.to_be_bytes()),
    ];
    let at = ptr_at::<[u8; TOTAL]>(ctx, p.l3)? as *mut u8;
    // The pseudo-header (RFC 8200 section 8.1): addresses, upper-layer length, next header.
    let mut sum = u32::from_ne_bytes((PAYLOAD as u32).to_be_bytes()) as u64
        + u32::from_ne_bytes([0, 0, 0, PROTO_ICMPV6]) as u64
        + icmp[0] as u64
        + icmp[1] as u64;
    // SAFETY: bounds checked by ptr_at; even offsets.
    unsafe {
        store(at, 0, head[0]);
        store(at, 4, head[1]);
    }
    let mut i = 0;
    while i < 4 {
        let (src, dst) = (p.key.dst[i], p.key.src[i]);
        sum += src as u64 + dst as u64;
        // SAFETY: as above.
        unsafe {
            store(at, 8 + i * 4, src);
            store(at, 24 + i * 4, dst);
        }
        i += 1;
    }
    // SAFETY: as above.
    unsafe {
        store(at, IPV6_LEN, icmp[0]);
        store(at, IPV6_LEN + 4, icmp[1]);
    }
    // SAFETY: the quote lies inside the TOTAL bytes ptr_at checked.
    let quote = unsafe { at.add(IPV6_LEN + ICMP_LEN) };
    // SAFETY: each chunk lies inside the quote.
    let s = csum(quote, CSUM_CHUNK, 0)?;
    let s = csum(unsafe { quote.add(CSUM_CHUNK) }, CSUM_CHUNK, s as u32)?;
    let s = csum(
        unsafe { quote.add(2 * CSUM_CHUNK) },
        QUOTE_V6 - 2 * CSUM_CHUNK,
        s as u32,
    )?;
    sum += s;
    // SAFETY: as above.
    unsafe { store(at, IPV6_LEN + 2, fold(sum)) };
    Some(())
}

/// Moves the head so that `header` + 8 bytes lie between the Ethernet header and the
/// client's packet (which now starts `outer` bytes after it), writes the Ethernet header
/// (MACs swapped, tag kept, `ether_type`) at the new start, and cuts the frame after
/// `quote` bytes of the client's packet.
#[inline(always)]
fn reshape(
    ctx: &XdpContext,
    p: &Flow,
    outer: usize,
    header: usize,
    quote: usize,
    ether_type: u16,
) -> Option<()> {
    let eth = ptr_at::<[u8; 12]>(ctx, 0)? as *const u8;
    // SAFETY: bounds checked by ptr_at; even offsets.
    let mac = |i: usize| unsafe { load::<u16>(eth, i * 2) };
    let (d0, d1, d2, s0, s1, s2) = (mac(0), mac(1), mac(2), mac(3), mac(4), mac(5));
    let tag = if p.vlan {
        let t = ptr_at::<[u8; 4]>(ctx, 12)? as *const u8;
        // SAFETY: bounds checked by ptr_at.
        unsafe { load::<u32>(t, 0) }
    } else {
        0
    };
    let shift = outer as i32 - (header + ICMP_LEN) as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, shift) } != 0 {
        return None;
    }
    let want = p.l3 + header + ICMP_LEN + quote;
    let have = ctx.data_end() - ctx.data();
    if have < want {
        return None;
    }
    // SAFETY: plain helper call on our own context.
    if have > want && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((have - want) as i32)) } != 0 {
        return None;
    }
    let eth = ptr_at::<[u8; 12]>(ctx, 0)? as *mut u8;
    // SAFETY: bounds checked by ptr_at; even offsets.
    unsafe {
        store(eth, 0, s0);
        store(eth, 2, s1);
        store(eth, 4, s2);
        store(eth, 6, d0);
        store(eth, 8, d1);
        store(eth, 10, d2);
    }
    if p.vlan {
        let t = ptr_at::<[u8; 4]>(ctx, 12)? as *mut u8;
        // SAFETY: bounds checked by ptr_at.
        unsafe { store(t, 0, tag) };
    }
    let t = ptr_at::<[u8; 2]>(ctx, p.l3 - 2)? as *mut u8;
    // SAFETY: bounds checked by ptr_at; an even offset.
    unsafe { store(t, 0, ether_type.to_be()) };
    Some(())
}

/// The ones' complement sum of `len` bytes at `at` (a multiple of 4, at most
/// [`CSUM_CHUNK`]), added to `seed`, not folded.
#[inline(always)]
fn csum(at: *mut u8, len: usize, seed: u32) -> Option<u64> {
    // SAFETY: the caller's bytes, inside the packet the verifier knows the bounds of.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len as u32, seed) };
    (s >= 0).then_some(s as u32 as u64)
}

/// The Internet checksum (RFC 1071) of a sum of words as they sit in memory, as it is
/// stored (a native-order half-word in memory order).
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
