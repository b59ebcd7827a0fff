//! Reverse-tunnel monitoring: per server, the SYNs forwarded against the SYN-ACKs that came
//! back through the agent (the state machine is drawn in the parent module's documentation).
use super::*;

/// Whether a server's SYN-ACKs come back through the agent (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseState {
    /// Not watched: no reverse-tunnelled packet seen yet, or monitoring is not configured.
    Off,
    /// Watched: new flows get their SYN-ACKs back through the agent.
    Ok,
    /// Given new TCP flows for `suspect_after_ms` without a SYN-ACK coming back; a refresh
    /// request confirms (answered: silent) or refutes (unanswered: down).
    Suspect,
    /// Answered the refresh request, but its SYN-ACKs no longer come through the agent: not
    /// watched until they do again.
    Silent,
}

/// One server's reverse-tunnel watch.
#[derive(Debug, Clone)]
pub(crate) struct ReverseWatch {
    pub(crate) state: ReverseState,
    /// Sums over the server's real addresses at the last observation.
    syns: u64,
    packets: u64,
    /// Since when the server has been given new TCP flows with no reverse-tunnelled packet
    /// after them.
    waiting_since: Option<Instant>,
}

impl Registry {
    /// Whether reverse-tunnel monitoring is configured.
    pub fn reverse_monitoring(&self) -> bool {
        self.reverse_tunnel.is_some()
    }

    /// Reverse-tunnel monitoring: takes the data path's counters (per real address: SYNs
    /// forwarded, reverse-tunnelled packets received) and moves each server's watch (see the
    /// module documentation). A server that becomes suspect gets refresh requests at once
    /// (sent by the next [`Registry::probe`]). Returns whether a binding's condition changed.
    ///
    /// New flows are seen as rises of the SYN counter between two calls, so a call's
    /// interval (the agent calls every 50 ms) is the resolution of `suspect_after_ms`.
    pub fn watch_reverse(
        &mut self,
        now: Instant,
        counters: &BTreeMap<IpAddr, ReverseCounters>,
    ) -> bool {
        let Some(cfg) = self.reverse_tunnel else {
            return false;
        };
        let window = Duration::from_millis(cfg.suspect_after_ms);
        // Per server: the sums over the distinct real addresses of its active bindings.
        let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut seen: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        for id in self.bindings.keys() {
            let s = sums.entry(id.server.clone()).or_default();
            if self.bindings[id].state == BindingState::Active
                && seen.insert((id.server.clone(), id.real))
            {
                let c = counters.get(&id.real).copied().unwrap_or_default();
                s.0 += c.syns;
                s.1 += c.reverse_packets;
            }
        }
        self.reverse.retain(|server, _| sums.contains_key(server));
        let mut suspects = Vec::new();
        let mut changed = false;
        for (server, (syns, packets)) in sums {
            let w = self.reverse.entry(server.clone()).or_insert(ReverseWatch {
                state: ReverseState::Off,
                syns,
                packets: 0,
                waiting_since: None,
            });
            // A counter that went down was reset (an address left and came back): rebase.
            let new_syns = syns > w.syns;
            let new_packets = packets > w.packets;
            w.syns = syns;
            w.packets = packets;
            let before = w.state;
            if new_packets {
                // Everything forwarded before now counts as answered.
                w.waiting_since = None;
                w.state = ReverseState::Ok;
            } else if w.state == ReverseState::Ok {
                if new_syns && w.waiting_since.is_none() {
                    w.waiting_since = Some(now);
                }
                if w.waiting_since
                    .is_some_and(|t| now.duration_since(t) >= window)
                {
                    w.state = ReverseState::Suspect;
                    w.waiting_since = None;
                    suspects.push(server.clone());
                }
            }
            if w.state == before {
                continue;
            }
            changed |= before == ReverseState::Suspect || w.state == ReverseState::Suspect;
            match (before, w.state) {
                (ReverseState::Off, _) => tracing::info!(
                    "'{server}' reverse-tunnels its SYN-ACKs: watching it (suspect after \
                     {} ms of new flows without one)",
                    cfg.suspect_after_ms
                ),
                (_, ReverseState::Suspect) => tracing::warn!(
                    "'{server}' is suspect: given new TCP flows for {} ms without a \
                     reverse-tunnelled SYN-ACK; sending refresh requests",
                    cfg.suspect_after_ms
                ),
                _ => {
                    tracing::info!("'{server}' reverse-tunnels its SYN-ACKs again (was {before:?})")
                }
            }
        }
        for server in suspects {
            self.count("reverse_suspected");
            for (id, b) in self.bindings.iter_mut() {
                if id.server == server && b.state == BindingState::Active {
                    b.probe_urgent = true;
                    if b.probe_sent.is_none() {
                        b.probe_next = now;
                    }
                }
            }
        }
        changed
    }

    /// An update arrived from `id`'s server: if the reverse-tunnel monitor suspected it,
    /// it is alive but its SYN-ACKs do not come through us. Returns whether its condition
    /// changed.
    pub(crate) fn reverse_answered(&mut self, id: &BindingId) -> bool {
        let Some(w) = self.reverse.get_mut(&id.server) else {
            return false;
        };
        if w.state != ReverseState::Suspect {
            return false;
        }
        w.state = ReverseState::Silent;
        w.waiting_since = None;
        tracing::warn!(
            "'{}' answered the refresh request, but its SYN-ACKs no longer come through the \
             agent: up; reverse-tunnel monitoring of it paused until they do",
            id.server
        );
        self.count("reverse_silent");
        true
    }
}
