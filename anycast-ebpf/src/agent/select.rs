//! Choosing the server: the flow table first (a hit names its server, and the server slot
//! its service: no service lookup), else the service's consistent-hash table (the client's
//! preferred one, for a service with topology preferences), and the new choice is pinned.
//!
//! A TCP SYN (without ACK) is not pinned: it goes by the table and its server is written
//! into its `EMBRYOS` slot. The first packet after it that misses the flow table is pinned
//! to the slot's server when the slot holds this flow (still up, same slot generation,
//! recent), else to the table's choice. So a flood of SYNs from random sources evicts no
//! pinned flow, and a handshake keeps its server when the table changes between its SYN
//! and its ACK.
//!
//! A flow not seen opening (a TCP packet other than a SYN without a handshake in
//! `EMBRYOS`: a connection first seen mid-stream, moved from another agent or forged; or a
//! UDP flow's first packet) is pinned only within a per-CPU budget (`unseen_pins_per_second`):
//! beyond it the packet goes by the table unpinned, so a flood of ACKs or UDP from random
//! sources cannot evict pinned flows faster than the budget.
use anycast_common::{
    flow_hash, flow_tick, verdict, EmbryoSlot, FlowKey, FlowValue, PreferenceKey, ServerInfo,
    ServiceInfo, ServiceKey, ANY_PORT, BUCKET_UNSEEN_PINS, EMBRYO_SLOTS, EMBRYO_TICKS,
    FLOW_CLOSING, PREFERENCE_KEY_BITS, PROTO_TCP, SERVER_UP, SERVICE_HAS_PREFERENCES, TCP_ACK,
    TCP_FIN, TCP_RST, TCP_SYN,
};
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};

use super::maps::{
    count, take_token, AGENT, EMBRYOS, FLOWS, FLOW_CONFIG, PREFERENCES, RINGS, SERVERS, SERVICES,
};
use super::parse::Flow;

#[inline(always)]
pub(super) fn lookup_service(flow: &FlowKey) -> Option<ServiceInfo> {
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
pub(super) fn flow_clock_now() -> u32 {
    // SAFETY: plain helper call without arguments.
    flow_tick(unsafe { bpf_ktime_get_coarse_ns() })
}

/// What the flow table says of a flow.
pub(super) enum Pinned {
    /// Its server (still up, the same server, not a later holder of its slot).
    Hit(u32, ServerInfo),
    /// An entry that has ended, or whose server went: the flow was seen before, and its new
    /// choice is pinned whatever the budget of flows not seen opening.
    Ended,
    /// No entry.
    Miss,
}

/// The server the flow is pinned to, if that server is still up (and is the same server,
/// not a later holder of its slot) and the entry has not ended.
///
/// An entry ends when it has been idle longer than its protocol's timeout (closing entries:
/// the closing timeout), or when it is closing and a new handshake on its 5-tuple is in
/// `EMBRYOS` (a SYN since the entry was pinned: promotion consumes the slot).
/// SYNs do not come here: they never read the flow table (see `forward`).
/// A client's FIN or RST marks the entry closing. `last_seen` is written only when the
/// tick changed (or the entry starts closing), not on every packet.
#[inline(always)]
pub(super) fn pinned_server(p: &Flow, now: u32) -> Pinned {
    let key = &p.key;
    let Some(pin) = FLOWS.get_ptr_mut(key) else {
        return Pinned::Miss;
    };
    // SAFETY: a valid map value; copied out at once.
    let v = unsafe { *pin };
    let (Some(s), Some(config)) = (entry_server(&v), FLOW_CONFIG.get(0)) else {
        return Pinned::Ended;
    };
    if v.flags & FLOW_CLOSING != 0 && new_handshake(key, now) {
        // A new connection on a closed one's 5-tuple: its first packet after the SYN goes
        // where the SYN went, and is pinned there.
        let _ = FLOWS.remove(key);
        count(verdict::FLOW_EXPIRED);
        return Pinned::Ended;
    }
    if config.expired(key.proto, &v, now) {
        count(verdict::FLOW_EXPIRED);
        return Pinned::Ended;
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
    Pinned::Hit(v.server, s)
}

/// The server a flow entry names, while it is up and still the server the entry was made
/// for (a slot reused by another server has another generation).
#[inline(always)]
pub(super) fn entry_server(v: &FlowValue) -> Option<ServerInfo> {
    let s = SERVERS.get(v.server)?;
    if s.flags & SERVER_UP == 0 || s.generation != v.generation {
        return None;
    }
    Some(*s)
}

/// Whether this flow's `EMBRYOS` slot holds a recent SYN of it. Only for closing entries,
/// so the flow hash is computed again here rather than passed down for every packet.
#[inline(always)]
fn new_handshake(key: &FlowKey, now: u32) -> bool {
    let Some(slot) = EMBRYOS.get(flow_hash(key) & (EMBRYO_SLOTS - 1)) else {
        return false;
    };
    slot.key == *key && now.wrapping_sub(slot.seen) <= EMBRYO_TICKS
}

/// A TCP SYN without ACK: a client opening a connection.
#[inline(always)]
pub(super) fn opens(p: &Flow) -> bool {
    p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// `FLOW_CLOSING` for a client's FIN or RST, else 0.
#[inline(always)]
fn closes(p: &Flow) -> u32 {
    (p.tcp_flags & (TCP_FIN | TCP_RST) != 0) as u32 * FLOW_CLOSING
}

/// A new choice for the flow. A SYN: the consistent-hash table's, remembered in its
/// `EMBRYOS` slot, not pinned. Any other packet: the server of the SYN before it (its slot),
/// pinned; else the table's, pinned if the flow had an entry that `ended`, else within this
/// CPU's budget of flows not seen opening. With the server: whether the flow was pinned.
#[inline(always)]
pub(super) fn choose_server(
    p: &Flow,
    service: &ServiceInfo,
    hash: u32,
    now: u32,
    ended: bool,
) -> Option<(u32, ServerInfo, bool)> {
    let key = &p.key;
    let slot = EMBRYOS.get_ptr_mut(hash & (EMBRYO_SLOTS - 1))?;
    let syn = opens(p);
    if key.proto == PROTO_TCP {
        if let Some((server_id, s)) = handshake_server(key, slot, now) {
            if syn {
                // A retransmitted SYN: the server that may already have answered the first.
                count(verdict::FLOW_EMBRYO);
            } else {
                count(verdict::FLOW_PROMOTED);
                pin(p, server_id, &s, now);
                // Consumed: a SYN found here later is a new connection on this 5-tuple.
                // SAFETY: a valid map value; one whole field.
                unsafe { (*slot).seen = now.wrapping_sub(EMBRYO_TICKS + 1) };
            }
            return Some((server_id, s, !syn));
        }
    }
    let (server_id, s) = hashed_server(key, service, hash)?;
    let mut pinned = false;
    if syn {
        // SAFETY: a valid map value. A racing SYN of another flow hashed into the same
        // slot may tear it; the key is compared whole and the server checked before use.
        unsafe {
            *slot = EmbryoSlot {
                key: *key,
                server: server_id,
                generation: s.generation,
                seen: now,
                _pad: 0,
            };
        }
        count(verdict::FLOW_EMBRYO);
    } else if ended
        || AGENT
            .get(0)
            .is_some_and(|a| take_token(BUCKET_UNSEEN_PINS, a.unseen_pin_cost_ns))
    {
        pin(p, server_id, &s, now);
        pinned = true;
    } else {
        count(verdict::FLOW_UNPINNED);
    }
    Some((server_id, s, pinned))
}

/// The server the SYN of this flow went to, from its `EMBRYOS` slot: if the slot holds this
/// flow, the SYN is recent, and that server is still up and the same server.
#[inline(always)]
pub(super) fn handshake_server(
    key: &FlowKey,
    slot: *mut EmbryoSlot,
    now: u32,
) -> Option<(u32, ServerInfo)> {
    // SAFETY: a valid map value; copied out at once.
    let e = unsafe { *slot };
    if e.key != *key || now.wrapping_sub(e.seen) > EMBRYO_TICKS {
        return None;
    }
    let s = *SERVERS.get(e.server)?;
    if s.flags & SERVER_UP == 0 || s.generation != e.generation {
        return None;
    }
    Some((e.server, s))
}

/// Pins the flow to the server.
#[inline(always)]
fn pin(p: &Flow, server_id: u32, s: &ServerInfo, now: u32) {
    let pin = FlowValue {
        server: server_id,
        generation: s.generation,
        last_seen: now,
        flags: closes(p),
    };
    let _ = FLOWS.insert(&p.key, &pin, 0);
}

/// The consistent-hash table's choice (the client's preferred table, if its service has
/// preferences and the client is in one of their prefixes), if that server is up.
#[inline(always)]
pub(super) fn hashed_server(
    key: &FlowKey,
    service: &ServiceInfo,
    hash: u32,
) -> Option<(u32, ServerInfo)> {
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
    Some((server_id, s))
}
