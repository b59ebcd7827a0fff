//! The next hop to the server: the kernel's FIB answer (cached per CPU and server slot
//! within a tick of the flow clock, see `NEXT_HOPS`), then the frame leaves by the ingress
//! port (`XDP_TX`) or is redirected to another (`TX_PORTS`); without a neighbour entry it
//! goes to the kernel, which resolves it. A frame sent out by XDP leaves without the
//! client's 802.1Q tag.
use anycast_common::{
    verdict, AgentInfo, NextHop, ServerInfo, FAMILY_V4, PROTO_IPIP, PROTO_IPV6, VLAN_LEN,
};
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};

use super::maps::{NEXT_HOPS, TX_PORTS};
use super::parse::Flow;
use crate::packet::{ptr_at, store};

/// The FIB lookup's parameter block, written as 16 words, every byte. Not `mem::zeroed` nor
/// an array of plain stores: LLVM turns the runs of zero stores into a `memset` call, a byte
/// loop on BPF; volatile word stores stay word stores.
#[inline(always)]
fn fib_params(
    fib: &mut core::mem::MaybeUninit<FibParams>,
    family: u8,
    l4_protocol: u8,
    tot_len: u16,
    ifindex: u32,
    src: [u32; 4],
    dst: [u32; 4],
) {
    let [t0, t1] = tot_len.to_ne_bytes();
    let p = fib.as_mut_ptr() as *mut u32;
    // SAFETY: word `i` < 16 of the 64-byte, 4-aligned block.
    let put = |i: usize, v: u32| unsafe { p.add(i).write_volatile(v) };
    put(0, u32::from_ne_bytes([family, l4_protocol, 0, 0])); // sport 0
    put(1, u32::from_ne_bytes([0, 0, t0, t1])); // dport 0, tot_len
    put(2, ifindex);
    put(3, 0); // tos / flowinfo
    let mut i = 0;
    while i < 4 {
        put(4 + i, src[i]);
        put(8 + i, dst[i]);
        i += 1;
    }
    put(12, 0); // vlan / tbid
    put(13, 0); // smac
    put(14, 0); // smac, dmac
    put(15, 0); // dmac
}

/// The MAC addresses the FIB lookup found, as the first 12 bytes of an Ethernet header
/// (destination, then source), in three words.
#[inline(always)]
fn fib_macs(fib: &FibParams) -> [u32; 3] {
    // smac is bytes 52..58 of the block and dmac 58..64: half-words 26..32.
    let h = fib as *const FibParams as *const u16;
    // SAFETY: within the 64-byte, 4-aligned block.
    let h = |i: usize| unsafe { h.add(i).read() };
    let pair = |a: u16, b: u16| {
        let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
        u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
    };
    [pair(h(29), h(30)), pair(h(31), h(26)), pair(h(27), h(28))]
}

/// Next hop by the kernel's FIB (or its answer cached for this server within the tick),
/// then out of the same port or redirected to another.
#[inline(always)]
pub(super) fn send(
    ctx: &XdpContext,
    p: &Flow,
    agent: &AgentInfo,
    server_id: u32,
    server: &ServerInfo,
    outer_len: u16,
    now: u32,
) -> (u32, u32) {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(cache) = NEXT_HOPS.get_ptr_mut(server_id) else {
        return (xdp_action::XDP_PASS, verdict::PASS_NO_ROUTE);
    };
    // SAFETY: this CPU's slot, copied out at once; no concurrent writer.
    let cached = unsafe { *cache };
    let hop = if cached.tick == now
        && cached.fib_generation == agent.fib_generation
        && cached.generation == server.generation
        && cached.ingress == ingress
        && outer_len as u32 <= cached.max_len
    {
        cached
    } else {
        match fib_next_hop(ctx, p, agent, server, outer_len, ingress) {
            Ok((egress, macs)) => {
                let same = cached.tick == now
                    && cached.fib_generation == agent.fib_generation
                    && cached.generation == server.generation
                    && cached.ingress == ingress
                    && cached.egress == egress
                    && cached.macs == macs;
                let hop = NextHop {
                    tick: now,
                    fib_generation: agent.fib_generation,
                    generation: server.generation,
                    ingress,
                    egress,
                    macs,
                    // A longer packet than any the FIB accepted goes to the FIB again (MTU).
                    max_len: if same {
                        cached.max_len.max(outer_len as u32)
                    } else {
                        outer_len as u32
                    },
                };
                // SAFETY: as above.
                unsafe { *cache = hop };
                hop
            }
            Err(result) => return result,
        }
    };
    let (action, reason) = if hop.egress == ingress {
        (xdp_action::XDP_TX, verdict::TX)
    } else {
        match TX_PORTS.redirect(hop.egress, xdp_action::XDP_PASS as u64) {
            Ok(action) => (action, verdict::REDIRECT),
            // The kernel forwards it: the MACs must stay addressed to us.
            Err(action) => return (action, verdict::PASS_NOT_TX_PORT),
        }
    };
    // The frame leaves after we return, so the MACs can be set after redirect().
    // A client's 802.1Q tag belongs to the client's segment: the FIB named a port of ours
    // (not a VLAN sub-interface, which is in no device map), so the server is reached
    // untagged there (IEEE 802.1Q: a frame carries the framing of the segment it is sent
    // on). The new MACs go 4 bytes further on, over the tag, so that they end right
    // before the ether type `move_l2` wrote after the tag; then the head moves past the
    // first 4 bytes.
    let macs_at = if p.vlan { VLAN_LEN } else { 0 };
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, macs_at) else {
        return (xdp_action::XDP_DROP, verdict::DROP_ENCAP);
    };
    let eth = eth as *mut u8;
    // SAFETY: bounds checked by ptr_at; the frame starts at an even address and VLAN_LEN
    // is even.
    unsafe {
        store(eth, 0, hop.macs[0]);
        store(eth, 4, hop.macs[1]);
        store(eth, 8, hop.macs[2]);
    }
    // SAFETY: plain helper call on our own context.
    if p.vlan && unsafe { bpf_xdp_adjust_head(ctx.ctx, VLAN_LEN as i32) } != 0 {
        return (xdp_action::XDP_DROP, verdict::DROP_ENCAP);
    }
    (action, reason)
}

/// Whether the agent reaches `real` (a server's real address, family `family`) through the
/// interface `ingress`: the FIB's egress for a packet from `own` (the agent's address) to
/// `real`, as if it came in on `ingress`. A packet from `real` is only believed to come from
/// it when it arrives on that interface (the feasible-path check of RFC 3704, section 2.2,
/// applied to the outer source of a reverse-tunnelled packet). No neighbour entry yet still
/// names the interface; no route, or forwarding off on `ingress`, is false.
#[inline(always)]
pub(super) fn reaches_via(
    ctx: &XdpContext,
    family: u8,
    own: [u32; 4],
    real: [u32; 4],
    ingress: u32,
) -> bool {
    let mut fib = core::mem::MaybeUninit::uninit();
    // tot_len 0: no MTU check, only the route.
    fib_params(&mut fib, family, 0, 0, ingress, own, real);
    // SAFETY: fib_params wrote all 64 bytes; any bytes are a valid bpf_fib_lookup.
    let fib = unsafe { fib.assume_init_mut() };
    // SAFETY: fib is a valid, fully sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) && fib.ifindex == ingress
}

/// The FIB's egress interface and MACs for the tunnelled packet, or what to do with the
/// packet when there is none (no neighbour yet: the kernel resolves it; too big: answered
/// or dropped, see `too_big.rs`; no route).
#[inline(always)]
fn fib_next_hop(
    ctx: &XdpContext,
    p: &Flow,
    agent: &AgentInfo,
    server: &ServerInfo,
    outer_len: u16,
    ingress: u32,
) -> Result<(u32, [u32; 3]), (u32, u32)> {
    let l4_protocol = if p.key.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    // An IPv4 address is the union's first word; the rest stays zero.
    let (src, dst) = if server.family == FAMILY_V4 {
        ([agent.v4, 0, 0, 0], [server.addr[0], 0, 0, 0])
    } else {
        (agent.v6, server.addr)
    };
    let mut fib = core::mem::MaybeUninit::uninit();
    fib_params(
        &mut fib,
        server.family,
        l4_protocol,
        outer_len,
        ingress,
        src,
        dst,
    );
    // SAFETY: fib_params wrote all 64 bytes; any bytes are a valid bpf_fib_lookup.
    let fib = unsafe { fib.assume_init_mut() };
    // SAFETY: fib is a valid, fully sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok((fib.ifindex, fib_macs(fib))),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err((xdp_action::XDP_PASS, verdict::PASS_NO_NEIGH)),
        // The kernel reports the egress MTU in place of the length asked about.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            Err(super::too_big::answer(ctx, p, agent, server.family, {
                // SAFETY: a u16 either way.
                unsafe { fib.__bindgen_anon_1.mtu_result }
            }))
        }
        _ => Err((xdp_action::XDP_PASS, verdict::PASS_NO_ROUTE)),
    }
}
