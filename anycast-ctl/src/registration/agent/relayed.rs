//! Messages relayed by peer agents (several agents serve one anycast address; an agent that
//! receives a server's binding passes it on to the others, see `crate::relay`).
//!
//! A relayed message is the server's own signed datagram and the outer source it came from,
//! which the relaying agent vouches for with its MAC. It is handled by the same path as a
//! direct one ([`Registry::handle_via`]): signature, identity, `allow`, `real` and the
//! care-of and source checks (against the carried source), limits, sequence number and
//! MESG-ID. What differs:
//!
//! - its inner destination must be one of the relaying agent's addresses, not ours;
//! - nothing is answered (the server talks to the agent it sent to), and counters are
//!   `relayed_...`;
//! - a binding whose last update came by relay is neither probed nor asked to refresh: the
//!   agent the server talks to does that and relays the refreshes;
//! - relayed copies have their own rate budget per identity;
//! - a snapshot entry (a stored message, sent when a peer (re)connects) is older than the
//!   replay window: instead of the window and the identity's newest MESG-ID, it must still
//!   be live by its own signed timestamp and lifetime, and its sequence number newer than
//!   the binding's here. It carries the sender's time left and smoothed load, so that both
//!   agents expire it together and give it the same weight.
use sha2::{Digest as _, Sha256};

use super::*;

/// Who relayed a message, and what for.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// The peer agent's identity.
    pub peer: String,
    /// The peer's agent addresses (IPv4-mapped): the server's message must be addressed to
    /// one of them.
    pub peer_addresses: Vec<Ipv6Addr>,
    /// Set for a snapshot entry.
    pub snapshot: Option<SnapshotExtra>,
}

/// What a snapshot entry carries beside the message: the sender's view of the binding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotExtra {
    /// Time left until the binding expires (or its drain ends) at the sender.
    pub expires_in: Duration,
    /// The sender's smoother: smoothed load and published weight.
    pub smoothed_load: Option<f64>,
    pub weight: u32,
}

/// One binding as a snapshot sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotEntry {
    pub message: StoredMessage,
    pub extra: SnapshotExtra,
}

impl Registry {
    /// Handles a message a peer relayed: as [`Registry::handle`], without an answer. Returns
    /// the outcome (its `reply` is always None) and whether it was accepted.
    pub fn handle_relayed(
        &mut self,
        payload: &[u8],
        from: SocketAddr,
        via: &Relayed,
        now: Instant,
        wall: u64,
    ) -> Outcome {
        self.counter_prefix = "relayed_";
        let mut outcome = self.handle_via(payload, from, now, wall, Some(via));
        self.counter_prefix = "";
        outcome.reply = None;
        outcome
    }

    /// Whether an outcome of [`Registry::handle`] accepted the message (bound, refreshed or
    /// deregistered): only those are relayed.
    pub fn accepted_outcome(outcome: &Outcome) -> bool {
        matches!(
            outcome.counted.as_str(),
            "registered" | "refreshed" | "deregistered"
        )
    }

    pub(super) fn new_binding(
        &self,
        seq: u16,
        now: Instant,
        lifetime: Duration,
        load: Option<LoadInfo>,
        source: SocketAddr,
    ) -> Binding {
        let mut smoother = Smoother::default();
        smoother.update(load.as_ref());
        Binding {
            seq,
            registered: now,
            updated: now,
            expires: now + lifetime,
            lifetime,
            load,
            state: BindingState::Active,
            source,
            refresh_requested: false,
            smoother,
            probe_sent: None,
            probe_next: now,
            probe_misses: 0,
            probe_limit: self.probe.map_or(u32::MAX, |p| p.misses),
            probe_urgent: false,
            relayed_by: None,
            message: None,
        }
    }

    /// Whether a stored message signed at `ts` (NTP) with `lifetime` (4 s units; 0: a
    /// deregistration, live for the drain time) can still be live at `wall`, allowing the
    /// replay window for the clocks' difference. It must not be ahead of our clock either.
    pub(super) fn live_by_its_own_clock(&self, ts: u64, lifetime: u16, wall: u64) -> bool {
        let granted = if lifetime == 0 {
            self.drain_time
        } else {
            Duration::from_secs(lifetime as u64 * 4).min(self.max_lifetime)
        };
        let (ts, wall) = (ts >> 32, wall >> 32);
        ts <= wall + self.replay_window && ts + granted.as_secs() + self.replay_window >= wall
    }

    /// Takes a snapshot entry's time left and smoother, no longer than what the message
    /// itself grants, and only values a smoother can have.
    pub(super) fn apply_snapshot_extra(
        &mut self,
        id: &BindingId,
        extra: SnapshotExtra,
        now: Instant,
    ) {
        let Some(b) = self.bindings.get_mut(id) else {
            return;
        };
        let longest = match b.state {
            BindingState::Active => b.lifetime,
            BindingState::Draining => self.drain_time,
        };
        b.expires = now + extra.expires_in.min(longest);
        if let Some(s) = Smoother::restored(extra.smoothed_load, extra.weight) {
            b.smoother = s;
        }
    }

    /// The stored messages of every binding, oldest MESG-ID first (so that a peer's
    /// per-identity replay state moves forward only), for a snapshot to `peer`: but those
    /// that peer relayed to us, which it has.
    pub fn snapshot_entries(&self, peer: &str, now: Instant) -> Vec<SnapshotEntry> {
        let mut out: Vec<SnapshotEntry> = self
            .bindings
            .values()
            .filter(|b| b.relayed_by.as_deref() != Some(peer))
            .filter_map(|b| {
                let (smoothed_load, weight) = b.smoother.saved();
                Some(SnapshotEntry {
                    message: b.message.clone()?,
                    extra: SnapshotExtra {
                        expires_in: b.expires.saturating_duration_since(now),
                        smoothed_load,
                        weight,
                    },
                })
            })
            .collect();
        out.sort_by_key(|e| e.message.mesg_id);
        out
    }

    /// Whether some binding serves `anycast` through `real`.
    pub fn binds(&self, anycast: IpAddr, real: IpAddr) -> bool {
        self.bindings
            .keys()
            .any(|id| id.anycast == anycast && id.real == real)
    }

    /// A digest of what the forwarding tables are built from, as far as bindings go: every
    /// binding (anycast address, service, server, real address) with its sequence number,
    /// state, published weight and priority. Health is added by the agent (confirmed
    /// failures are shared, so every agent drops the same real addresses). Returns (number of bindings, SHA-256).
    pub fn inputs_digest(&self) -> (u32, [u8; 32]) {
        let mut h = Sha256::new();
        for (id, b) in &self.bindings {
            h.update(wire::to_mapped(id.anycast).octets());
            match id.selector {
                Some((proto, port)) => {
                    h.update([1, proto]);
                    h.update(port.to_be_bytes());
                }
                None => h.update([0, 0, 0, 0]),
            }
            h.update((id.server.len() as u32).to_be_bytes());
            h.update(id.server.as_bytes());
            h.update(wire::to_mapped(id.real).octets());
            h.update(b.seq.to_be_bytes());
            h.update([matches!(b.state, BindingState::Active) as u8]);
            h.update(b.smoother.weight().to_be_bytes());
            h.update(b.load.map_or(0, |l| l.priority).to_be_bytes());
        }
        (self.bindings.len() as u32, h.finalize().into())
    }
}
