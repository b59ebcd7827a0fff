//! What the kernel and userspace must compute identically about flows: the hash that picks a
//! flow's entry in a consistent-hash table, the flow clock, and the idle timeouts
//! ([`FlowConfig::expired`], the same rule in the data path and in the controller's sweep).
use crate::maps::{FlowKey, FlowValue, FLOW_CLOSING};
use crate::net::PROTO_UDP;

#[inline(always)]
fn mix(mut h: u32, k: u32) -> u32 {
    // murmur3's per-word mixing: cheap, and good enough spread for table indexing.
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    h ^= k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// The hash that indexes a service's consistent-hash table. Every agent computes the same
/// value for the same flow, so agents sharing a service choose the same server.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0x9747_b28c;
    h = mix(h, k.src[0]);
    h = mix(h, k.src[1]);
    h = mix(h, k.src[2]);
    h = mix(h, k.src[3]);
    h = mix(h, k.dst[0]);
    h = mix(h, k.dst[1]);
    h = mix(h, k.dst[2]);
    h = mix(h, k.dst[3]);
    h = mix(h, ((k.sport as u32) << 16) | k.dport as u32);
    h = mix(h, k.proto as u32);
    // murmur3 finaliser
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Flow idle timeouts in ticks of the flow clock (`FLOW_CONFIG`, one entry).
///
/// The flow clock is `CLOCK_MONOTONIC_COARSE` in ticks of 2^30 ns (about 1.07 s): in the
/// data path `bpf_ktime_get_coarse_ns() >> 30` (a shift, where whole seconds would cost a
/// 64-bit division per packet), in userspace the same of `clock_gettime
/// (CLOCK_MONOTONIC_COARSE)` (the same kernel clock, so the same tick). An entry is expired
/// when `now - last_seen > timeout`; [`FlowConfig::new`] rounds timeouts in seconds up to
/// whole ticks, so an entry lives at least its timeout after its last packet, at most about
/// 1.07 s more (plus the rounding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowConfig {
    /// Indexed by [`timeout_index`]: TCP idle, UDP idle, TCP closing, UDP "closing" (never
    /// set for UDP; the controller writes the UDP idle timeout there).
    pub timeouts: [u32; 4],
}

pub const DEFAULT_TCP_IDLE: u32 = 300;
pub const DEFAULT_UDP_IDLE: u32 = 30;
pub const DEFAULT_TCP_CLOSING: u32 = 10;

/// The flow clock's tick: `CLOCK_MONOTONIC_COARSE` nanoseconds shifted right by this.
pub const FLOW_CLOCK_SHIFT: u32 = 30;

/// The flow clock's tick at `ns` of `CLOCK_MONOTONIC_COARSE`.
#[inline(always)]
pub const fn flow_tick(ns: u64) -> u32 {
    (ns >> FLOW_CLOCK_SHIFT) as u32
}

/// `secs` seconds in ticks of the flow clock, rounded up.
pub const fn flow_ticks(secs: u32) -> u32 {
    ((secs as u64 * 1_000_000_000).div_ceil(1 << FLOW_CLOCK_SHIFT)) as u32
}

/// `ticks` ticks of the flow clock in whole seconds, rounded down.
pub const fn flow_ticks_as_secs(ticks: u32) -> u32 {
    (((ticks as u64) << FLOW_CLOCK_SHIFT) / 1_000_000_000) as u32
}

impl FlowConfig {
    /// Timeouts given in seconds.
    pub const fn new(tcp_idle: u32, udp_idle: u32, tcp_closing: u32) -> Self {
        let (tcp_idle, udp_idle, tcp_closing) = (
            flow_ticks(tcp_idle),
            flow_ticks(udp_idle),
            flow_ticks(tcp_closing),
        );
        FlowConfig {
            timeouts: [tcp_idle, udp_idle, tcp_closing, udp_idle],
        }
    }

    /// The timeout of an entry of protocol `proto` with flags `flags`.
    #[inline(always)]
    pub fn timeout(&self, proto: u8, flags: u32) -> u32 {
        self.timeouts[timeout_index(proto, flags)]
    }

    /// Whether the entry is past its timeout at `now` (the same rule in the data path and
    /// in the controller's sweep). Ticks compare as serial numbers (RFC 1982): an entry
    /// seen at a tick after `now` (refreshed on another CPU, or while a sweep that read the
    /// clock earlier was running) is live, not 2^32 ticks old.
    #[inline(always)]
    pub fn expired(&self, proto: u8, value: &FlowValue, now: u32) -> bool {
        (now.wrapping_sub(value.last_seen) as i32) > self.timeout(proto, value.flags) as i32
    }
}

/// Index into [`FlowConfig::timeouts`], without branches: closing << 1 | is UDP.
#[inline(always)]
pub fn timeout_index(proto: u8, flags: u32) -> usize {
    ((((flags & FLOW_CLOSING) << 1) | (proto == PROTO_UDP) as u32) & 3) as usize
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, only integers.
unsafe impl aya::Pod for FlowConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_seen_after_the_clock_reading_is_live() {
        let config = FlowConfig::new(300, 30, 10);
        let seen = |last_seen: u32| FlowValue {
            last_seen,
            ..FlowValue::default()
        };
        let timeout = config.timeout(crate::PROTO_TCP, 0);
        for now in [0u32, 1000, u32::MAX] {
            let tcp = |v: u32| config.expired(crate::PROTO_TCP, &seen(v), now);
            assert!(!tcp(now), "seen now");
            assert!(!tcp(now.wrapping_add(1)), "seen a tick after the reading");
            assert!(!tcp(now.wrapping_add(1000)), "seen well after the reading");
            assert!(!tcp(now.wrapping_sub(timeout)), "exactly at the timeout");
            assert!(tcp(now.wrapping_sub(timeout + 1)), "past the timeout");
        }
    }

    #[test]
    fn layout_is_fixed() {
        assert_eq!(core::mem::size_of::<FlowConfig>(), 16);
    }
}
