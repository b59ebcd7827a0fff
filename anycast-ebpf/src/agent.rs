//! The agent: forwards packets for anycast services to a server's real address, IP-in-IP.
//!
//! parse -> address filter -> flow table, else service lookup and consistent-hash table
//! (the client's preferred one, for a service with topology preferences) -> encapsulate ->
//! next hop (cached FIB answer) -> XDP_TX / XDP_REDIRECT (or hand to the kernel when the
//! neighbour is unknown).
//!
//! Reverse tunnel: an IP-in-IP packet from a known server's real address to the agent's own
//! address whose inner source is an anycast service is a server's reverse-tunnelled
//! response (its SYN-ACK): counted per server in `REVERSE`, outer header stripped, inner
//! packet passed to the kernel, which forwards it to the client. Only packets whose outer
//! protocol is 4 or 41 take that path, so client packets pay nothing for it.
use anycast_common::{
    address_filter_bit, flow_hash, flow_tick, verdict, AddressKey, AgentInfo, FlowConfig, FlowKey,
    FlowValue, NextHop, PreferenceKey, PreferenceTable, ReverseStats, ServerInfo, ServerTraffic,
    ServiceInfo, ServiceKey, Traffic, ADDRESS_FILTER_WORDS, AGENT_HAS_V4, AGENT_HAS_V6, ANY_PORT,
    DEFAULT_MAX_FLOWS, DEFAULT_MAX_PREFERENCE_TABLES, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE,
    FAMILY_V4, FAMILY_V6, FLOW_CLOSING, MAX_PREFERENCE_PREFIXES, MAX_SERVERS, MAX_TX_PORTS,
    PREFERENCE_KEY_BITS, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP, SERVER_UP,
    SERVICE_HAS_PREFERENCES,
};
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MMAPABLE,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{
        lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap,
    },
    programs::XdpContext,
};

use crate::packet::*;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
/// All consistent-hash tables, two areas (live and next) per service, then two per
/// preference table. Memory-mappable: the controller writes a table with plain stores.
#[map]
static RINGS: Array<u32> = Array::with_max_entries(
    (DEFAULT_MAX_SERVICES + DEFAULT_MAX_PREFERENCE_TABLES) * 2 * DEFAULT_RING_SIZE,
    BPF_F_MMAPABLE,
);
/// Topology preferences: (service id, client prefix) -> the preferred table. Only looked up
/// for services with `SERVICE_HAS_PREFERENCES`.
#[map]
static PREFERENCES: LpmTrie<[u32; 5], PreferenceTable> =
    LpmTrie::with_max_entries(MAX_PREFERENCE_PREFIXES, 0);
#[map]
static SERVERS: Array<ServerInfo> = Array::with_max_entries(MAX_SERVERS, 0);
/// Set bits: addresses that may be services (written by the controller before their
/// `SERVICES` entries, cleared after). Other traffic passes without a hash lookup.
#[map]
static ADDRESS_FILTER: Array<u64> = Array::with_max_entries(ADDRESS_FILTER_WORDS, 0);
/// Per CPU and server slot, the FIB's last answer, reused within its tick of the flow clock
/// (about a second) unless a routing change was reported: a FIB lookup costs more than all
/// the rest of a flow-table hit.
#[map]
static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_SERVERS, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);
#[map]
static AGENT: Array<AgentInfo> = Array::with_max_entries(1, 0);
/// Flow idle timeouts; the controller writes them before attaching.
#[map]
static FLOW_CONFIG: Array<FlowConfig> = Array::with_max_entries(1, 0);
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(verdict::COUNT, 0);
#[map]
static SERVICE_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
static SERVER_STATS: PerCpuArray<ServerTraffic> = PerCpuArray::with_max_entries(MAX_SERVERS, 0);
/// The installed servers' real addresses (keys written by the controller) and the packets
/// each reverse-tunnelled through us. A packet from any other outer source is not
/// decapsulated: the agent does not relay anycast-sourced packets for strangers.
#[map]
static REVERSE: PerCpuHashMap<AddressKey, ReverseStats> =
    PerCpuHashMap::with_max_entries(MAX_SERVERS, 0);

const TTL: u8 = 64;

#[xdp]
pub fn anycast_agent(ctx: XdpContext) -> u32 {
    let (action, reason) = forward(&ctx);
    count(reason);
    action
}

#[inline(always)]
fn count(reason: u32) {
    if let Some(c) = VERDICTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add_traffic(map: &PerCpuArray<Traffic>, index: u32, bytes: u64) {
    if let Some(t) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
        }
    }
}

/// What the parser learnt about a packet that may belong to a service.
struct Parsed {
    l3: usize,
    vlan: bool,
    key: FlowKey,
    /// Length of the inner IP packet (from its header, so Ethernet padding is not counted).
    inner_len: u16,
    /// DSCP/ECN byte, copied to the outer header.
    tos: u8,
    /// TCP flags (0 for UDP).
    tcp_flags: u8,
}

#[inline(always)]
fn add_server_traffic(index: u32, bytes: u64, syn: bool) {
    if let Some(t) = SERVER_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
            (*t).syns += syn as u64;
        }
    }
}

#[inline(always)]
fn forward(ctx: &XdpContext) -> (u32, u32) {
    let p = match parse(ctx) {
        Ok(p) => p,
        // IP-in-IP (outer protocol 4 or 41): a server's reverse tunnel, or nothing of ours.
        Err(verdict::REVERSE_TUNNEL) => return reverse(ctx),
        Err(reason) => return (xdp_action::XDP_PASS, reason),
    };
    let now = flow_clock_now();
    // A flow-table hit names its server, and the server slot its service: no service lookup.
    let (server_id, server) = match pinned_server(&p, now) {
        Some(pinned) => pinned,
        None => {
            let Some(service) = lookup_service(&p.key) else {
                return (xdp_action::XDP_PASS, verdict::PASS_NOT_SERVICE);
            };
            count(verdict::FLOW_MISS);
            let Some(chosen) = choose_server(&p, &service, flow_hash(&p.key), now) else {
                return (xdp_action::XDP_DROP, verdict::DROP_NO_SERVER);
            };
            chosen
        }
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    add_traffic(&SERVICE_STATS, server.service as u32, frame_len);
    let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    add_server_traffic(server_id, frame_len, syn);
    let Some(agent) = AGENT.get(0) else {
        return (xdp_action::XDP_DROP, verdict::DROP_NO_AGENT_ADDR);
    };
    match encapsulate(ctx, &p, agent, &server) {
        Ok(outer_len) => send(ctx, &p, agent, server_id, &server, outer_len, now),
        Err(reason) => (xdp_action::XDP_DROP, reason),
    }
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Parsed, u32> {
    let l2 = parse_l2(ctx).ok_or(verdict::PASS_MALFORMED)?;
    let frame_len = ctx.data_end() - ctx.data();
    let l3 = l2.l3;
    let mut key = FlowKey::default();
    let (l4, proto, inner_len, tos) = match l2.ether_type {
        ETH_P_IPV4 => {
            let h = ptr_at::<[u8; IPV4_LEN]>(ctx, l3).ok_or(verdict::PASS_MALFORMED)? as *const u8;
            // SAFETY: ptr_at checked the bounds of the whole header.
            let (vhl, tos, tot_len, frag, proto, src, dst) = unsafe {
                (
                    load::<u8>(h, 0),
                    load::<u8>(h, 1),
                    u16::from_be(load::<u16>(h, 2)) as usize,
                    u16::from_be(load::<u16>(h, 6)),
                    load::<u8>(h, 9),
                    load::<u32>(h, 12),
                    load::<u32>(h, 16),
                )
            };
            let ihl = ((vhl & 0x0f) as usize) * 4;
            if vhl >> 4 != 4 || ihl < IPV4_LEN || tot_len < ihl || l3 + tot_len > frame_len {
                return Err(verdict::PASS_MALFORMED);
            }
            if frag & 0x3fff != 0 {
                return Err(verdict::PASS_FRAGMENT);
            }
            key.family = FAMILY_V4;
            key.src[0] = src;
            key.dst[0] = dst;
            (l3 + ihl, proto, tot_len, tos)
        }
        ETH_P_IPV6 => {
            let h = ptr_at::<[u8; IPV6_LEN]>(ctx, l3).ok_or(verdict::PASS_MALFORMED)? as *const u8;
            // SAFETY: ptr_at checked the bounds of the whole header.
            let (b0, b1, payload_len, next) = unsafe {
                (
                    load::<u8>(h, 0),
                    load::<u8>(h, 1),
                    u16::from_be(load::<u16>(h, 4)),
                    load::<u8>(h, 6),
                )
            };
            let tot_len = IPV6_LEN + payload_len as usize;
            if b0 >> 4 != 6 || l3 + tot_len > frame_len {
                return Err(verdict::PASS_MALFORMED);
            }
            if next == 44 {
                return Err(verdict::PASS_FRAGMENT);
            }
            key.family = FAMILY_V6;
            let mut i = 0;
            while i < 4 {
                // SAFETY: ptr_at checked the bounds of the whole header.
                unsafe {
                    key.src[i] = load::<u32>(h, 8 + i * 4);
                    key.dst[i] = load::<u32>(h, 24 + i * 4);
                }
                i += 1;
            }
            let tos = (b0 << 4) | (b1 >> 4);
            (l3 + IPV6_LEN, next, tot_len, tos)
        }
        _ => return Err(verdict::PASS_NOT_SERVICE),
    };
    let l4_len = match proto {
        PROTO_TCP => TCP_LEN,
        PROTO_UDP => UDP_LEN,
        // Not a verdict here: `forward` takes it to `reverse`.
        PROTO_IPIP | PROTO_IPV6 => return Err(verdict::REVERSE_TUNNEL),
        _ => return Err(verdict::PASS_NOT_SERVICE),
    };
    if !maybe_service(key.family, &key.dst) {
        return Err(verdict::PASS_NOT_SERVICE);
    }
    // The whole fixed L4 header must be inside the IP packet.
    if l4 + l4_len > l3 + inner_len {
        return Err(verdict::PASS_MALFORMED);
    }
    let ports = ptr_at::<[u8; 4]>(ctx, l4).ok_or(verdict::PASS_MALFORMED)? as *const u8;
    let tcp_flags = if proto == PROTO_TCP {
        read::<u8>(ctx, l4 + TCP_FLAGS_OFF).ok_or(verdict::PASS_MALFORMED)?
    } else {
        0
    };
    key.proto = proto;
    // SAFETY: ptr_at checked the bounds of both ports.
    unsafe {
        key.sport = u16::from_be(load::<u16>(ports, 0));
        key.dport = u16::from_be(load::<u16>(ports, 2));
    }
    Ok(Parsed {
        l3,
        vlan: l3 != ETH_LEN,
        key,
        inner_len: inner_len as u16,
        tos,
        tcp_flags,
    })
}

/// A tunnel packet (outer IPv4 or IPv6, already checked by `parse`: version, lengths, not a
/// fragment; protocol 4 or 41). If it goes from a known server's real address to the agent's
/// own address and its inner source address, protocol and port are an anycast service, it is
/// counted for that server, its outer header is stripped and the inner packet goes to the
/// kernel (`XDP_PASS`), which forwards it to the client. Anything else passes untouched.
#[inline(always)]
fn reverse(ctx: &XdpContext) -> (u32, u32) {
    const NOT_OURS: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_NOT_SERVICE);
    const MALFORMED: (u32, u32) = (xdp_action::XDP_PASS, verdict::PASS_MALFORMED);
    let Some(l2) = parse_l2(ctx) else {
        return MALFORMED;
    };
    let l3 = l2.l3;
    let Some(agent) = AGENT.get(0) else {
        return NOT_OURS;
    };
    let mut real = AddressKey::default();
    let (outer_len, inner_proto) = match l2.ether_type {
        ETH_P_IPV4 => {
            let Some(h) = ptr_at::<[u8; IPV4_LEN]>(ctx, l3) else {
                return MALFORMED;
            };
            let h = h as *const u8;
            // SAFETY: ptr_at checked the bounds of the whole header; even offsets.
            let (vhl, proto, src, dst) = unsafe {
                (
                    load::<u8>(h, 0),
                    load::<u8>(h, 9),
                    load::<u32>(h, 12),
                    load::<u32>(h, 16),
                )
            };
            if agent.flags & AGENT_HAS_V4 == 0 || dst != agent.v4 {
                return NOT_OURS;
            }
            real.family = FAMILY_V4;
            real.addr[0] = src;
            (((vhl & 0x0f) as usize) * 4, proto)
        }
        ETH_P_IPV6 => {
            let Some(h) = ptr_at::<[u8; IPV6_LEN]>(ctx, l3) else {
                return MALFORMED;
            };
            let h = h as *const u8;
            if agent.flags & AGENT_HAS_V6 == 0 {
                return NOT_OURS;
            }
            real.family = FAMILY_V6;
            let mut i = 0;
            while i < 4 {
                // SAFETY: ptr_at checked the bounds of the whole header; even offsets.
                let (src, dst) = unsafe { (load::<u32>(h, 8 + i * 4), load::<u32>(h, 24 + i * 4)) };
                if dst != agent.v6[i] {
                    return NOT_OURS;
                }
                real.addr[i] = src;
                i += 1;
            }
            // SAFETY: as above.
            (IPV6_LEN, unsafe { load::<u8>(h, 6) })
        }
        _ => return NOT_OURS,
    };
    if outer_len < IPV4_LEN {
        return MALFORMED;
    }
    let inner = l3 + outer_len;
    let mut service = ServiceKey::default();
    let (l4, ether_type) = match inner_proto {
        PROTO_IPIP => {
            let Some(h) = ptr_at::<[u8; IPV4_LEN]>(ctx, inner) else {
                return MALFORMED;
            };
            let h = h as *const u8;
            // SAFETY: ptr_at checked the bounds of the whole header; even offsets.
            let (vhl, frag, proto, src) = unsafe {
                (
                    load::<u8>(h, 0),
                    u16::from_be(load::<u16>(h, 6)),
                    load::<u8>(h, 9),
                    load::<u32>(h, 12),
                )
            };
            let ihl = ((vhl & 0x0f) as usize) * 4;
            if vhl >> 4 != 4 || ihl < IPV4_LEN {
                return MALFORMED;
            }
            if frag & 0x3fff != 0 {
                return (xdp_action::XDP_PASS, verdict::PASS_FRAGMENT);
            }
            service.family = FAMILY_V4;
            service.addr[0] = src;
            service.proto = proto;
            (inner + ihl, ETH_P_IPV4)
        }
        _ => {
            // PROTO_IPV6: parse let nothing else through.
            let Some(h) = ptr_at::<[u8; IPV6_LEN]>(ctx, inner) else {
                return MALFORMED;
            };
            let h = h as *const u8;
            // SAFETY: ptr_at checked the bounds of the whole header; even offsets.
            if unsafe { load::<u8>(h, 0) } >> 4 != 6 {
                return MALFORMED;
            }
            service.family = FAMILY_V6;
            let mut i = 0;
            while i < 4 {
                // SAFETY: as above.
                service.addr[i] = unsafe { load::<u32>(h, 8 + i * 4) };
                i += 1;
            }
            // SAFETY: as above.
            service.proto = unsafe { load::<u8>(h, 6) };
            (inner + IPV6_LEN, ETH_P_IPV6)
        }
    };
    if service.proto != PROTO_TCP && service.proto != PROTO_UDP {
        return NOT_OURS;
    }
    let Some(sport) = read_be16(ctx, l4) else {
        return MALFORMED;
    };
    service.port = sport;
    // SAFETY: only tested for presence.
    if unsafe { SERVICES.get(&service) }.is_none() {
        service.port = ANY_PORT;
        if unsafe { SERVICES.get(&service) }.is_none() {
            return NOT_OURS;
        }
    }
    let Some(stats) = REVERSE.get_ptr_mut(&real) else {
        return NOT_OURS;
    };
    // SAFETY: this CPU's value of an existing entry; no concurrent writer.
    unsafe {
        (*stats).packets += 1;
        (*stats).last_seen_ns = bpf_ktime_get_coarse_ns();
    }
    if move_l2(ctx, 0, outer_len, l2.l3 != ETH_LEN, ether_type).is_none() {
        return MALFORMED;
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return MALFORMED;
    }
    (xdp_action::XDP_PASS, verdict::REVERSE_TUNNEL)
}

/// False when no service has this address (its `ADDRESS_FILTER` bit is clear).
#[inline(always)]
fn maybe_service(family: u8, addr: &[u32; 4]) -> bool {
    let (word, bit) = address_filter_bit(family, addr);
    ADDRESS_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}

#[inline(always)]
fn lookup_service(flow: &FlowKey) -> Option<ServiceInfo> {
    let mut key = ServiceKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: the value is copied out at once.
    if let Some(s) = unsafe { SERVICES.get(&key) } {
        return Some(*s);
    }
    key.port = ANY_PORT;
    unsafe { SERVICES.get(&key) }.copied()
}

/// The flow clock: `CLOCK_MONOTONIC_COARSE` in ticks of 2^30 ns (the controller reads the
/// same clock with `clock_gettime`). The coarse clock is a memory read, no clocksource access.
#[inline(always)]
fn flow_clock_now() -> u32 {
    // SAFETY: plain helper call without arguments.
    flow_tick(unsafe { bpf_ktime_get_coarse_ns() })
}

/// The server the flow is pinned to, if that server is still up (and is the same server,
/// not a later holder of its slot) and the entry has not ended.
///
/// An entry ends when it has been idle longer than its protocol's timeout (closing entries:
/// the closing timeout), or when it is closing and a SYN without ACK reuses its 5-tuple.
/// A client's FIN or RST marks the entry closing. `last_seen` is written only when the
/// tick changed (or the entry starts closing), not on every packet.
#[inline(always)]
fn pinned_server(p: &Parsed, now: u32) -> Option<(u32, ServerInfo)> {
    let key = &p.key;
    let pin = FLOWS.get_ptr_mut(key)?;
    // SAFETY: a valid map value; copied out at once.
    let v = unsafe { *pin };
    let s = SERVERS.get(v.server)?;
    if s.flags & SERVER_UP == 0 || s.generation != v.generation {
        return None;
    }
    let config = FLOW_CONFIG.get(0)?;
    let opens = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if config.expired(key.proto, &v, now) | (opens & (v.flags & FLOW_CLOSING != 0)) {
        count(verdict::FLOW_EXPIRED);
        return None;
    }
    count(verdict::FLOW_HIT);
    let flags = v.flags | closes(p);
    if v.last_seen != now || flags != v.flags {
        // SAFETY: a valid map value; racing writers store the same kind of values, each
        // field whole.
        unsafe {
            (*pin).last_seen = now;
            (*pin).flags = flags;
        }
    }
    Some((v.server, *s))
}

/// `FLOW_CLOSING` for a client's FIN or RST, else 0.
#[inline(always)]
fn closes(p: &Parsed) -> u32 {
    (p.tcp_flags & (TCP_FIN | TCP_RST) != 0) as u32 * FLOW_CLOSING
}

/// A new choice for the flow: the consistent-hash table's (the client's preferred table, if
/// its service has preferences and the client is in one of their prefixes), pinned.
#[inline(always)]
fn choose_server(
    p: &Parsed,
    service: &ServiceInfo,
    hash: u32,
    now: u32,
) -> Option<(u32, ServerInfo)> {
    let key = &p.key;
    let (mut base, mut size) = (service.ring_base, service.ring_size);
    if service.flags & SERVICE_HAS_PREFERENCES != 0 {
        let client = PreferenceKey {
            prefixlen: PREFERENCE_KEY_BITS,
            service: service.id,
            addr: key.src,
        };
        if let Some(t) = PREFERENCES.get(Key::new(client.prefixlen, client.data())) {
            base = t.ring_base;
            size = t.ring_size;
        }
    }
    if size == 0 {
        return None;
    }
    let server_id = *RINGS.get(base + hash % size)?;
    let s = *SERVERS.get(server_id)?;
    if s.flags & SERVER_UP == 0 {
        return None;
    }
    let pin = FlowValue {
        server: server_id,
        generation: s.generation,
        last_seen: now,
        flags: closes(p),
    };
    let _ = FLOWS.insert(key, &pin, 0);
    Some((server_id, s))
}

/// Puts an outer IPv4 or IPv6 header (by the server's real address) in front of the IP packet.
/// Returns the outer packet's total length. The header is built in registers and stored as
/// 32-bit words.
#[inline(always)]
fn encapsulate(
    ctx: &XdpContext,
    p: &Parsed,
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
        let [t0, t1] = total.to_be_bytes();
        // DF: an oversize tunnel packet must fail loudly, not be fragmented.
        let mut w = [
            u32::from_ne_bytes([0x45, p.tos, t0, t1]),
            u32::from_ne_bytes([0, 0, 0x40, 0]),
            u32::from_ne_bytes([TTL, inner_proto, 0, 0]),
            agent.v4,
            server.addr[0],
        ];
        let [c0, c1] = ipv4_checksum(&w).to_be_bytes();
        w[2] = u32::from_ne_bytes([TTL, inner_proto, c0, c1]);
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
        // Version, traffic class from the inner packet, flow label from the flow hash so
        // that ECMP on the way to the server keeps a flow on one path.
        // (Computed again after a miss: hits, the common case, need it only here.)
        let label = flow_hash(&p.key) & 0x000f_ffff;
        let [l0, l1] = p.inner_len.to_be_bytes();
        let w0 = u32::from_ne_bytes([
            0x60 | (p.tos >> 4),
            (p.tos << 4) | (label >> 16) as u8,
            (label >> 8) as u8,
            label as u8,
        ]);
        let w1 = u32::from_ne_bytes([l0, l1, inner_proto, TTL]);
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
fn grow(ctx: &XdpContext, p: &Parsed, outer: usize, ether_type: u16) -> Result<(), u32> {
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(verdict::DROP_ENCAP);
    }
    move_l2(ctx, outer, 0, p.vlan, ether_type).ok_or(verdict::DROP_ENCAP)
}

/// The IPv4 header checksum of a header given as five words in memory order.
#[inline(always)]
fn ipv4_checksum(w: &[u32; IPV4_LEN / 4]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < w.len() {
        let x = u32::from_be(w[i]);
        sum += (x >> 16) + (x & 0xffff);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

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
fn send(
    ctx: &XdpContext,
    p: &Parsed,
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
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return (xdp_action::XDP_DROP, verdict::DROP_ENCAP);
    };
    let eth = eth as *mut u8;
    // SAFETY: bounds checked by ptr_at; the frame starts at an even address.
    unsafe {
        store(eth, 0, hop.macs[0]);
        store(eth, 4, hop.macs[1]);
        store(eth, 8, hop.macs[2]);
    }
    (action, reason)
}

/// The FIB's egress interface and MACs for the tunnelled packet, or what to do with the
/// packet when there is none (no neighbour yet: the kernel resolves it; too big; no route).
#[inline(always)]
fn fib_next_hop(
    ctx: &XdpContext,
    p: &Parsed,
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
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err((xdp_action::XDP_DROP, verdict::DROP_TOO_BIG)),
        _ => Err((xdp_action::XDP_PASS, verdict::PASS_NO_ROUTE)),
    }
}
