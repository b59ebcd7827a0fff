//! IP-in-IP from TC egress, shared by the server's SYN-ACK tunnel and the client's tunnel:
//! the FIB is asked for the route to the tunnel's destination (before anything changes),
//! the packet grown by the outer header, the header written, and the packet redirected to
//! the egress the FIB chose (`bpf_redirect` with its MACs, or `bpf_redirect_neigh` while the
//! next hop's MAC is not known yet). The lookup is made as for a packet entering on `lo`
//! (as the kernel's own output routing does), so the controller enables forwarding on `lo`
//! (the helper refuses lookups for interfaces without it).
use anycast_common::{ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, FAMILY_V4, IPV4_LEN, IPV6_LEN};
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::packet::{ipv4_tunnel_header, ipv6_tunnel_header_start};

/// `lo`: the FIB lookup is made as for a locally sent packet.
const LOOPBACK_IFINDEX: u32 = 1;

/// One tunnel: outer addresses of `family`, and what the inner packet needs.
pub struct Tunnel {
    pub family: u8,
    pub source: [u32; 4],
    pub dest: [u32; 4],
    /// 4 (IPv4 inside) or 41 (IPv6 inside).
    pub inner_proto: u8,
    /// The whole inner IP packet's length.
    pub inner_len: u16,
    /// The inner DSCP/ECN, copied to the outer header.
    pub tos: u8,
}

pub enum Outcome {
    /// Encapsulated and redirected (`action` is the helper's answer); `resolving`: through
    /// `bpf_redirect_neigh`, MACs untouched.
    Sent { action: i32, resolving: bool },
    /// The FIB had no route (or refused the lookup): untouched.
    NoRoute,
    /// The tunnel packet would exceed the egress MTU: untouched.
    TooBig,
    /// The packet could not be grown: untouched.
    EncapFailed,
    /// Grown but not (fully) rewritten: the caller must drop it.
    WriteFailed,
}

/// The counter of each [`Outcome`] in a program's own counter set.
pub struct OutcomeCounters {
    pub tunnelled: u32,
    pub tunnelled_resolving: u32,
    pub no_route: u32,
    pub too_big: u32,
    pub encap_failed: u32,
    pub write_failed: u32,
}

impl Outcome {
    /// The TC action and counter: a packet the tunnel left untouched goes on its way
    /// (`TC_ACT_OK`); one grown but not rewritten is dropped, never let out half rewritten
    /// (TCP retransmits it).
    #[inline(always)]
    pub fn verdict(self, c: &OutcomeCounters) -> (i32, u32) {
        match self {
            Outcome::Sent {
                action,
                resolving: false,
            } => (action, c.tunnelled),
            Outcome::Sent {
                action,
                resolving: true,
            } => (action, c.tunnelled_resolving),
            Outcome::NoRoute => (TC_ACT_OK, c.no_route),
            Outcome::TooBig => (TC_ACT_OK, c.too_big),
            Outcome::EncapFailed => (TC_ACT_OK, c.encap_failed),
            Outcome::WriteFailed => (TC_ACT_SHOT, c.write_failed),
        }
    }
}

/// Encapsulates the frame (Ethernet, no VLAN tag, then the inner IP packet) and redirects
/// it; see the module doc.
#[inline(always)]
pub fn encapsulate_and_redirect(ctx: &TcContext, t: &Tunnel) -> Outcome {
    let l3 = ETH_LEN;
    let v4 = t.family == FAMILY_V4;
    let outer_len: u16 = if v4 { IPV4_LEN as u16 } else { IPV6_LEN as u16 };
    let outer_total = t.inner_len + outer_len;

    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = t.family;
    fib.l4_protocol = t.inner_proto;
    fib.__bindgen_anon_1.tot_len = outer_total;
    fib.ifindex = LOOPBACK_IFINDEX;
    if v4 {
        fib.__bindgen_anon_3.ipv4_src = t.source[0];
        fib.__bindgen_anon_4.ipv4_dst = t.dest[0];
    } else {
        fib.__bindgen_anon_3.ipv6_src = t.source;
        fib.__bindgen_anon_4.ipv6_dst = t.dest;
    }
    // SAFETY: fib is a valid, fully sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    let resolved = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH if fib.ifindex != LOOPBACK_IFINDEX => false,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Outcome::TooBig,
        _ => return Outcome::NoRoute,
    };

    // Room for the outer header between the Ethernet header and the IP packet; the kernel
    // records the encapsulation (inner headers, GSO type) and the outer protocol.
    let encap = if v4 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } as u64;
    if ctx
        .skb
        .adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, encap)
        .is_err()
    {
        return Outcome::EncapFailed;
    }
    let written = if v4 {
        let h = ipv4_tunnel_header(t.tos, outer_total, t.inner_proto, t.source[0], t.dest[0]);
        ctx.skb.store(l3, &h, 0).is_ok() && ctx.skb.store(12, &ETH_P_IPV4.to_be_bytes(), 0).is_ok()
    } else {
        let [w0, w1] = ipv6_tunnel_header_start(t.tos, 0, t.inner_len, t.inner_proto);
        let (s, d) = (t.source, t.dest);
        let h = [w0, w1, s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]];
        ctx.skb.store(l3, &h, 0).is_ok() && ctx.skb.store(12, &ETH_P_IPV6.to_be_bytes(), 0).is_ok()
    };
    if !written {
        return Outcome::WriteFailed;
    }
    if resolved {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        if ctx.skb.store(0, &macs, 0).is_err() {
            return Outcome::WriteFailed;
        }
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
        Outcome::Sent {
            action,
            resolving: false,
        }
    } else {
        // The kernel routes the outer packet itself and resolves the neighbour.
        // SAFETY: no parameters: the helper looks the route up from the packet.
        let action = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
        Outcome::Sent {
            action,
            resolving: true,
        }
    }
}
