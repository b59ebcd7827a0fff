//! Relay envelope kind 6, "flow pins": flows this agent pinned to a server that is no longer
//! their table's choice (see `dataplane::pins`), so a peer the router moves them to sends
//! them to the same server.
//!
//! Body (all integers big-endian):
//!
//! ```text
//! offset      size  field
//! 0           1     n: number of pins, 1-20
//! 1+57*i      1     family: 4 or 6 (of the client and anycast addresses)
//! 2+57*i      1     protocol: 6 TCP or 17 UDP
//! 3+57*i      1     flags: bit 0 closing (the client sent FIN or RST); the others 0
//! 4+57*i      16    client address (IPv4 as ::ffff:a.b.c.d)
//! 20+57*i     2     client port
//! 22+57*i     16    anycast address (IPv4 as ::ffff:a.b.c.d)
//! 38+57*i     2     anycast port
//! 40+57*i     16    the server's real address (IPv4 as ::ffff:a.b.c.d)
//! 56+57*i     2     seconds before the entry expires at the sender without a packet
//! ```
//!
//! At most 20 pins: 1141 bytes of body, 1301 bytes of envelope with the longest identities.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

use anycast_common::{wire, FlowKey, PROTO_TCP, PROTO_UDP};

use super::Refused;
use crate::dataplane::FlowPin;

pub const PIN_LEN: usize = 57;
pub const MAX_PINS_PER_ENVELOPE: usize = 20;
/// Every exception is sent again this often, so a peer that (re)connected or lost a
/// datagram gets it.
pub const RESEND_EVERY: Duration = Duration::from_secs(3);
/// Pins sent per second at most (to every peer, each): 500 envelopes.
pub const SEND_PER_SECOND: f64 = 10_000.0;
/// Pins taken from one peer per second at most; beyond, refused and counted
/// (`pins_refused_rate`). Twice what a sender sends.
pub const RECEIVE_PER_SECOND: f64 = 20_000.0;

pub(super) fn put(out: &mut Vec<u8>, pins: &[FlowPin]) {
    out.push(pins.len() as u8);
    for p in pins {
        let k = &p.key;
        let v4 = k.family == anycast_common::FAMILY_V4;
        out.push(if v4 { 4 } else { 6 });
        out.push(k.proto);
        out.push(p.closing as u8);
        let client = anycast_common::words_addr(k.src, k.family);
        let anycast = anycast_common::words_addr(k.dst, k.family);
        out.extend_from_slice(&wire::to_mapped(client).octets());
        out.extend_from_slice(&k.sport.to_be_bytes());
        out.extend_from_slice(&wire::to_mapped(anycast).octets());
        out.extend_from_slice(&k.dport.to_be_bytes());
        out.extend_from_slice(&wire::to_mapped(p.server).octets());
        out.extend_from_slice(&p.idle_left_secs.to_be_bytes());
    }
}

/// An address of `family` (4 or 6) in its 16 bytes: IPv4 only as mapped, IPv6 never.
fn address(bytes: [u8; 16], family: u8) -> Result<IpAddr, Refused> {
    match (wire::from_mapped(Ipv6Addr::from(bytes)), family) {
        (a @ IpAddr::V4(_), 4) | (a @ IpAddr::V6(_), 6) => Ok(a),
        _ => Err(Refused::Malformed),
    }
}

/// The pins of a kind-6 body (after the MAC verified); anything out of range is malformed.
pub(super) fn take(body: &[u8]) -> Result<(Vec<FlowPin>, usize), Refused> {
    let n = *body.first().ok_or(Refused::Malformed)? as usize;
    if !(1..=MAX_PINS_PER_ENVELOPE).contains(&n) || body.len() < 1 + n * PIN_LEN {
        return Err(Refused::Malformed);
    }
    let mut pins = Vec::with_capacity(n);
    for e in body[1..1 + n * PIN_LEN].chunks_exact(PIN_LEN) {
        let (family, proto, flags) = (e[0], e[1], e[2]);
        if !matches!(proto, PROTO_TCP | PROTO_UDP) || flags & !1 != 0 {
            return Err(Refused::Malformed);
        }
        let a16 = |at: usize| -> [u8; 16] { e[at..at + 16].try_into().expect("16 bytes") };
        let p16 = |at: usize| u16::from_be_bytes([e[at], e[at + 1]]);
        let client = address(a16(3), family)?;
        let anycast = address(a16(21), family)?;
        let server = wire::from_mapped(Ipv6Addr::from(a16(39)));
        pins.push(FlowPin {
            key: FlowKey::new(client, anycast, proto, p16(19), p16(37)),
            server,
            closing: flags & 1 == 1,
            idle_left_secs: p16(55),
        });
    }
    Ok((pins, 1 + n * PIN_LEN))
}

/// A token bucket: `rate` per second, as many at once.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: f64) -> Bucket {
        Bucket {
            rate,
            tokens: rate,
            at: None,
        }
    }

    /// How many of `want` may go now (taken from the bucket).
    pub fn take(&mut self, want: usize, now: Instant) -> usize {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.rate);
        }
        self.at = Some(now);
        let n = (want as f64).min(self.tokens.floor()).max(0.0) as usize;
        self.tokens -= n as f64;
        n
    }
}

fn order(p: &FlowPin) -> ([u32; 4], [u32; 4], u16, u16, u8) {
    (p.key.src, p.key.dst, p.key.sport, p.key.dport, p.key.proto)
}

/// The sending side's state: what was sent (to send what is new at once) and when
/// everything was last sent again. Pure: takes the exceptions found and the time, returns
/// the pins to send now.
pub struct PinSender {
    sent: HashMap<FlowKey, (IpAddr, bool)>,
    last_full: Option<Instant>,
    /// Where the next full round starts, when the budget cut the last one short.
    cursor: usize,
    budget: Bucket,
}

impl Default for PinSender {
    fn default() -> Self {
        PinSender {
            sent: HashMap::new(),
            last_full: None,
            cursor: 0,
            budget: Bucket::new(SEND_PER_SECOND),
        }
    }
}

impl PinSender {
    /// `found`: every exception of the last scan. New ones (or ones whose server or
    /// closing state changed) go at once; every [`RESEND_EVERY`], all of them; never more
    /// than the budget (what is left goes in later rounds). Exceptions no longer found are
    /// forgotten.
    pub fn round(&mut self, mut found: Vec<FlowPin>, now: Instant) -> Vec<FlowPin> {
        found.sort_by_key(order);
        let full = self
            .last_full
            .is_none_or(|t| now.saturating_duration_since(t) >= RESEND_EVERY);
        let is_fresh: Vec<bool> = found
            .iter()
            .map(|p| self.sent.get(&p.key) != Some(&(p.server, p.closing)))
            .collect();
        let mut chosen: Vec<usize> = (0..found.len()).filter(|&i| is_fresh[i]).collect();
        let fresh = chosen.len();
        if full {
            self.last_full = Some(now);
            let n = found.len();
            let start = if n == 0 { 0 } else { self.cursor % n };
            chosen.extend((0..n).map(|i| (start + i) % n).filter(|&i| !is_fresh[i]));
        }
        let allowed = self.budget.take(chosen.len(), now);
        if full && allowed < chosen.len() {
            // The next full round starts where this one stopped.
            self.cursor += allowed.saturating_sub(fresh);
        }
        chosen.truncate(allowed);
        let current: std::collections::HashSet<FlowKey> = found.iter().map(|p| p.key).collect();
        self.sent.retain(|k, _| current.contains(k));
        chosen
            .into_iter()
            .map(|i| {
                let p = found[i];
                self.sent.insert(p.key, (p.server, p.closing));
                p
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "pins_tests.rs"]
mod tests;
