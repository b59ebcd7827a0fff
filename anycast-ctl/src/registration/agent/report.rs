//! `anycast-ctl bindings`: the binding table and the registration counters.
use super::*;

/// The reverse-tunnel side of a binding in `anycast-ctl bindings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReverseReport {
    /// The server's monitor state (all its bindings share it).
    pub state: ReverseState,
    /// TCP SYNs the agent forwarded to this binding's real address (all services).
    pub syns: u64,
    /// Packets (SYN-ACKs) the server reverse-tunnelled from this real address.
    pub syn_acks: u64,
    /// Seconds since the newest of them; absent: none yet.
    pub last_syn_ack_secs: Option<f64>,
}

/// One line of `anycast-ctl bindings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingReport {
    #[serde(flatten)]
    pub id: BindingId,
    pub state: BindingState,
    pub seq: u16,
    pub age_secs: f64,
    pub lifetime_secs: u64,
    pub lifetime_left_secs: f64,
    pub load: Option<LoadReport>,
    /// Health by refresh requests.
    pub condition: Condition,
    /// Published weight (free capacity, smoothed).
    pub weight: u32,
    /// Reverse-tunnel counters and monitor state.
    #[serde(default)]
    pub reverse: Option<ReverseReport>,
    /// The peer agent whose relay brought its last update; absent: the server sent it here.
    #[serde(default)]
    pub relayed_by: Option<String>,
    /// Who holds its real address down: "local" (this agent's own observation) and/or
    /// "peer ID" (a peer's shared, confirmed failure). Empty: nobody.
    #[serde(default)]
    pub down_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub priority: u16,
    pub sessions_in_use: u32,
    pub max_sessions: u32,
    pub used_capacity: u32,
    pub max_capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingsReport {
    pub bindings: Vec<BindingReport>,
    pub counters: BTreeMap<String, u64>,
    /// Binding sync with peer agents, when configured.
    #[serde(default)]
    pub relay: Option<crate::relay::RelayReport>,
}

impl Registry {
    /// The bindings and counters. `reverse`: the data path's reverse-tunnel counters per
    /// real address, if read.
    pub fn report(
        &self,
        now: Instant,
        reverse: Option<&BTreeMap<IpAddr, ReverseCounters>>,
    ) -> BindingsReport {
        let clock = crate::dataplane::coarse_clock_ns();
        let bindings = self
            .bindings
            .iter()
            .map(|(id, b)| BindingReport {
                id: id.clone(),
                state: b.state,
                seq: b.seq,
                age_secs: now.duration_since(b.registered).as_secs_f64(),
                lifetime_secs: b.lifetime.as_secs(),
                relayed_by: b.relayed_by.clone(),
                down_by: Vec::new(),
                lifetime_left_secs: b.expires.saturating_duration_since(now).as_secs_f64(),
                condition: self.condition(id, b),
                weight: b.smoother.weight(),
                reverse: reverse.map(|r| {
                    let c = r.get(&id.real).copied().unwrap_or_default();
                    ReverseReport {
                        state: self
                            .reverse
                            .get(&id.server)
                            .map_or(ReverseState::Off, |w| w.state),
                        syns: c.syns,
                        syn_acks: c.reverse_packets,
                        last_syn_ack_secs: (c.last_reverse_ns > 0)
                            .then(|| clock.saturating_sub(c.last_reverse_ns) as f64 / 1e9),
                    }
                }),
                load: b.load.map(|l| LoadReport {
                    priority: l.priority,
                    sessions_in_use: l.sessions_in_use,
                    max_sessions: l.max_sessions,
                    used_capacity: l.used_capacity,
                    max_capacity: l.max_capacity,
                }),
            })
            .collect();
        BindingsReport {
            bindings,
            counters: self.counters.clone(),
            relay: None,
        }
    }
}

impl Registry {
    /// How many bindings are in each (state, condition), for the metrics.
    pub fn binding_counts(&self) -> BTreeMap<(BindingState, Condition), u64> {
        let mut out = BTreeMap::new();
        for (id, b) in &self.bindings {
            *out.entry((b.state, self.condition(id, b))).or_default() += 1;
        }
        out
    }

    /// The probes answered and missed since the last call, and the probes' timeout.
    pub fn take_probe_outcomes(&mut self) -> (ProbeOutcomes, Option<Duration>) {
        (
            std::mem::take(&mut self.probe_outcomes),
            self.probe.map(|p| Duration::from_millis(p.timeout_ms)),
        )
    }

    /// The registration counters (names as `anycast-ctl bindings` shows them).
    pub fn counters(&self) -> &BTreeMap<String, u64> {
        &self.counters
    }
}
