//! Confirmed failures are shared: a real address one agent's own health monitoring holds
//! down (refresh-request probes, active health checks, the reverse-tunnel monitor; `down`,
//! never `suspect`) is announced to every peer in a health envelope (kind 5), so every agent
//! drops the server together and their tables stay the same.
//!
//! Each envelope carries the sender's whole list (not a change), so the last one taken is
//! the truth: an address missing from it is up again at the sender. It goes out at once
//! when the list changes and again every digest interval while it is not empty, so a lost
//! datagram is repaired by the next one. A peer's marks lapse when it has not re-sent its
//! list for [`LAPSE_INTERVALS`] digest intervals (the agent died, or a partition): one dead
//! or cut-off agent cannot keep servers out for ever. Marks only change health; they never
//! remove a binding. What a peer says is never passed on (each agent sends its own
//! observations only), so nothing loops.
//!
//! Body (after the envelope header):
//!
//! ```text
//! 0    2   n: number of entries (0 to MAX_HEALTH_ENTRIES; 0: nothing held down)
//! 2    35n entries, each:
//!          16  anycast address (IPv4 as ::ffff:a.b.c.d)
//!          1   IP protocol of the service (6, 17)
//!          2   service port (0: every port)
//!          16  the server's real address
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
    time::Instant,
};

use anycast_common::wire;
use serde::{Deserialize, Serialize};

use super::{Body, Cursor, Refused, Relay};
use crate::registration::agent::Reply;

/// Most entries in one health envelope: 35 bytes each, so that the largest envelope
/// (identities of 64 bytes) still fits the 2048-byte receive buffer. An agent that holds
/// more down announces the first ones (in order) and counts `relay_health_truncated`.
pub const MAX_HEALTH_ENTRIES: usize = 48;
/// Digest intervals without a re-sent list after which a peer's marks lapse.
pub const LAPSE_INTERVALS: u32 = 3;
/// Mark transitions logged per peer per second; beyond, counted
/// (`relay_health_logs_suppressed`) and summed up in one line: a peer that keeps changing
/// its list cannot flood the log.
const LOG_LINES_PER_SECOND: u32 = 20;
const ENTRY_LEN: usize = 35;

/// One real address of one service, as health envelopes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HealthEntry {
    pub anycast: IpAddr,
    pub protocol: u8,
    pub port: u16,
    pub real: IpAddr,
}

impl HealthEntry {
    pub fn bytes(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        out[..16].copy_from_slice(&wire::to_mapped(self.anycast).octets());
        out[16] = self.protocol;
        out[17..19].copy_from_slice(&self.port.to_be_bytes());
        out[19..].copy_from_slice(&wire::to_mapped(self.real).octets());
        out
    }
}

pub(super) fn put_health(out: &mut Vec<u8>, down: &[HealthEntry]) {
    let n = down.len().min(MAX_HEALTH_ENTRIES);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for e in &down[..n] {
        out.extend_from_slice(&e.bytes());
    }
}

pub(super) fn take_health(c: &mut Cursor<'_>) -> Result<Vec<HealthEntry>, Refused> {
    let n = u16::from_be_bytes(c.array()?) as usize;
    if n > MAX_HEALTH_ENTRIES {
        return Err(Refused::Malformed);
    }
    (0..n)
        .map(|_| {
            let anycast = wire::from_mapped(Ipv6Addr::from(c.array::<16>()?));
            let protocol = c.array::<1>()?[0];
            let port = u16::from_be_bytes(c.array()?);
            let real = wire::from_mapped(Ipv6Addr::from(c.array::<16>()?));
            Ok(HealthEntry {
                anycast,
                protocol,
                port,
                real,
            })
        })
        .collect()
}

/// What a peer holds down, as taken here.
#[derive(Debug, Default)]
pub(super) struct PeerMarks {
    pub down: BTreeSet<HealthEntry>,
    /// When its last health envelope was taken.
    pub heard: Option<Instant>,
    /// Log lines in the current second: (its start, lines, suppressed).
    log_window: Option<(Instant, u32, u64)>,
}

impl PeerMarks {
    /// Whether one more transition line may be logged now.
    fn may_log(&mut self, peer: &str, now: Instant) -> bool {
        let (start, lines, suppressed) = self.log_window.get_or_insert((now, 0, 0));
        if now.saturating_duration_since(*start) >= std::time::Duration::from_secs(1) {
            if *suppressed > 0 {
                tracing::warn!(
                    "relay: {suppressed} more health mark changes from peer '{peer}' were not \
                     logged"
                );
            }
            (*start, *lines, *suppressed) = (now, 0, 0);
        }
        *lines += 1;
        if *lines > LOG_LINES_PER_SECOND {
            *suppressed += 1;
            return false;
        }
        true
    }
}

/// One real address held down, for `bindings --json` and `status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldDown {
    #[serde(flatten)]
    pub entry: HealthEntry,
    pub server: Option<String>,
    /// "local" (this agent's own observation) and/or "peer ID".
    pub down_by: Vec<String>,
}

impl Relay {
    /// This agent's own list changed or not: when it did (and at the first call), the new
    /// list goes to every peer at once. The digest rounds re-send it while not empty.
    pub fn announce_health(&mut self, own: &BTreeSet<HealthEntry>, wall: u64) -> Vec<Reply> {
        if self.own_down.as_ref() == Some(own) {
            return Vec::new();
        }
        self.own_down = Some(own.clone());
        self.health_envelopes(wall)
    }

    /// Our list to every peer (in the digest round too, while it is not empty).
    pub(super) fn health_envelopes(&mut self, wall: u64) -> Vec<Reply> {
        let down: Vec<HealthEntry> = self.own_down.iter().flatten().copied().collect();
        if down.len() > MAX_HEALTH_ENTRIES {
            self.count("relay_health_truncated");
            tracing::warn!(
                "relay: {} real addresses held down, only the first {MAX_HEALTH_ENTRIES} are \
                 told to peers",
                down.len()
            );
        }
        (0..self.peers.len())
            .map(|i| {
                self.stamped_for(
                    i,
                    Body::Health {
                        down: down.iter().take(MAX_HEALTH_ENTRIES).copied().collect(),
                    },
                    wall,
                )
            })
            .collect()
    }

    /// A peer's list, taken: its marks become exactly the entries this agent knows (`known`
    /// names the server of a real address of a service here, None for one it has no
    /// binding or configured server for: ignored and counted `relay_health_unknown`).
    /// Logs each mark made or lifted; returns whether the marks changed.
    pub fn take_health(
        &mut self,
        peer: &str,
        down: &[HealthEntry],
        known: impl Fn(&HealthEntry) -> Option<String>,
        now: Instant,
    ) -> bool {
        let Some(i) = self.index(peer) else {
            return false;
        };
        let mut unknown = 0;
        let mut new = BTreeMap::new();
        for e in down {
            match known(e) {
                Some(server) => {
                    new.insert(*e, server);
                }
                None => unknown += 1,
            }
        }
        for _ in 0..unknown {
            self.count("relay_health_unknown");
        }
        let p = &mut self.peers[i];
        p.marks.heard = Some(now);
        let old = std::mem::take(&mut p.marks.down);
        p.marks.down = new.keys().copied().collect();
        let mut changed = false;
        let mut suppressed = 0;
        for (e, server) in &new {
            if !old.contains(e) {
                changed = true;
                if !p.marks.may_log(&p.id, now) {
                    suppressed += 1;
                    continue;
                }
                tracing::warn!(
                    "server {server} {} real address down by peer '{}' ({} {}/{})",
                    e.real,
                    p.id,
                    e.anycast,
                    proto_name(e.protocol),
                    e.port
                );
            }
        }
        let lifted: Vec<HealthEntry> = old.difference(&p.marks.down).copied().collect();
        for e in lifted {
            changed = true;
            if !p.marks.may_log(&p.id, now) {
                suppressed += 1;
                continue;
            }
            tracing::info!(
                "{} real address up again at peer '{}' ({} {}/{}): no longer held down by it",
                e.real,
                p.id,
                e.anycast,
                proto_name(e.protocol),
                e.port
            );
        }
        for _ in 0..suppressed {
            self.count("relay_health_logs_suppressed");
        }
        changed
    }

    /// Drops the marks of every peer that has not re-sent its list for
    /// [`LAPSE_INTERVALS`] digest intervals; returns whether any lapsed.
    pub fn expire_health(&mut self, now: Instant) -> bool {
        let limit = self.interval * LAPSE_INTERVALS;
        let mut lapsed = 0;
        for p in &mut self.peers {
            let stale = p
                .marks
                .heard
                .is_none_or(|t| now.saturating_duration_since(t) >= limit);
            if stale && !p.marks.down.is_empty() {
                tracing::warn!(
                    "relay: peer '{}' has not re-sent its health list for {} intervals: its \
                     {} marks lapse ({})",
                    p.id,
                    LAPSE_INTERVALS,
                    p.marks.down.len(),
                    p.marks
                        .down
                        .iter()
                        .map(|e| e.real.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                p.marks.down.clear();
                lapsed += 1;
            }
        }
        for _ in 0..lapsed {
            self.count("relay_health_lapsed");
        }
        lapsed > 0
    }

    /// Every entry some peer holds down, with the peers that do.
    pub fn peer_marks(&self) -> BTreeMap<HealthEntry, Vec<String>> {
        let mut out: BTreeMap<HealthEntry, Vec<String>> = BTreeMap::new();
        for p in &self.peers {
            for e in &p.marks.down {
                out.entry(*e).or_default().push(p.id.clone());
            }
        }
        out
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        p => p.to_string(),
    }
}
