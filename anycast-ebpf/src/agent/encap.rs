//! Encapsulation: an outer IPv4 or IPv6 header (by the family of the server's real address)
//! in front of the client's IP packet, from the agent's own address to the server's.
use anycast_common::{
    flow_hash, verdict, AgentInfo, ServerInfo, AGENT_HAS_V4, AGENT_HAS_V6, ETH_P_IPV4, ETH_P_IPV6,
    FAMILY_V4, IPV4_LEN, IPV6_LEN, PROTO_IPIP, PROTO_IPV6,
};
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};

use super::parse::Flow;
use crate::packet::{ipv4_tunnel_header, ipv6_tunnel_header_start, move_l2, ptr_at, store};

/// Puts the outer header in front of the IP packet. Returns the outer packet's total
/// length. The header is built in registers and stored as 32-bit words.
#[inline(always)]
pub(super) fn encapsulate(
    ctx: &XdpContext,
    p: &Flow,
    agent: &AgentInfo,
    server: &ServerInfo,
) -> Result<u16, u32> {
    let inner_proto = if p.key.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    if server.family == FAMILY_V4 {
        if agent.flags & AGENT_HAS_V4 == 0 {
            return Err(verdict::DROP_NO_AGENT_ADDR);
        }
        let total = p.inner_len + IPV4_LEN as u16;
        let w = ipv4_tunnel_header(p.tos, total, inner_proto, agent.v4, server.addr[0]);
        grow(ctx, p, IPV4_LEN, ETH_P_IPV4)?;
        let dst = ptr_at::<[u8; IPV4_LEN]>(ctx, p.l3).ok_or(verdict::DROP_ENCAP)? as *mut u8;
        let mut i = 0;
        while i < w.len() {
            // SAFETY: bounds checked by ptr_at.
            unsafe { store(dst, i * 4, w[i]) };
            i += 1;
        }
        Ok(total)
    } else {
        if agent.flags & AGENT_HAS_V6 == 0 {
            return Err(verdict::DROP_NO_AGENT_ADDR);
        }
        // The flow label from the flow hash, so that ECMP on the way to the server keeps a
        // flow on one path. (Computed again after a miss: hits, the common case, need it
        // only here.)
        let label = flow_hash(&p.key) & 0x000f_ffff;
        let [w0, w1] = ipv6_tunnel_header_start(p.tos, label, p.inner_len, inner_proto);
        grow(ctx, p, IPV6_LEN, ETH_P_IPV6)?;
        let dst = ptr_at::<[u8; IPV6_LEN]>(ctx, p.l3).ok_or(verdict::DROP_ENCAP)? as *mut u8;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            store(dst, 0, w0);
            store(dst, 4, w1);
        }
        let mut i = 0;
        while i < 4 {
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                store(dst, 8 + i * 4, agent.v6[i]);
                store(dst, 24 + i * 4, server.addr[i]);
            }
            i += 1;
        }
        Ok(p.inner_len + IPV6_LEN as u16)
    }
}

/// Makes room for `outer` bytes between the L2 header and the IP packet.
#[inline(always)]
fn grow(ctx: &XdpContext, p: &Flow, outer: usize, ether_type: u16) -> Result<(), u32> {
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(verdict::DROP_ENCAP);
    }
    move_l2(ctx, outer, 0, p.vlan, ether_type).ok_or(verdict::DROP_ENCAP)
}
