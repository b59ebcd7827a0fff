//! Binding liveness: expiry, drain ends, refresh requests in a binding's last quarter, and
//! refresh-request probes that make an unanswered binding suspect, then down.
use super::*;

impl Registry {
    /// Removes expired bindings and those whose drain time is over. True if any went.
    /// Also writes the summaries of rate-limited warnings whose second is over.
    pub fn expire(&mut self, now: Instant) -> bool {
        self.flush_logs(now);
        let gone: Vec<BindingId> = self
            .bindings
            .iter()
            .filter(|(_, b)| b.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &gone {
            let b = self.bindings.remove(id).expect("listed");
            match b.state {
                BindingState::Active => {
                    tracing::warn!(
                        "binding of '{}' for {} via {} expired",
                        id.server,
                        id.anycast,
                        id.real
                    );
                    self.count("expired");
                }
                BindingState::Draining => {
                    tracing::info!(
                        "'{}' for {} via {} finished draining",
                        id.server,
                        id.anycast,
                        id.real
                    );
                }
            }
        }
        !gone.is_empty()
    }

    /// Binding Refresh Requests for active bindings in the last quarter of their lifetime
    /// (once per lifetime), sent where their last update came from.
    pub fn refresh_requests(&mut self, now: Instant) -> Vec<Reply> {
        let mut out = Vec::new();
        for (id, b) in self.bindings.iter_mut() {
            if b.state != BindingState::Active
                || b.refresh_requested
                || b.expires.saturating_duration_since(now) > b.lifetime / 4
            {
                continue;
            }
            b.refresh_requested = true;
            let Some(policy) = self.servers.get(&id.server) else {
                continue;
            };
            let agent = self
                .agent
                .iter()
                .find(|a| a.to_ipv4_mapped().is_some() == id.anycast.is_ipv4())
                .or(self.agent.first());
            let Some(&agent) = agent else { continue };
            let brr = Message {
                src: agent,
                dst: wire::to_mapped(id.anycast),
                body: Body::BindingRefreshRequest,
                options: Options::default(),
            };
            out.push(Reply {
                to: b.source,
                payload: wire::encode(
                    &brr,
                    Some(Key {
                        spi: policy.spi,
                        secret: &policy.key,
                    }),
                ),
            });
        }
        for _ in 0..out.len() {
            self.count("refresh_requests_sent");
        }
        out
    }

    /// The configured services plus those the bindings bring, with their servers.
    /// Health by refresh requests: asks every active binding for an update each interval;
    /// a probe unanswered within the timeout is a miss. Returns the requests to send and
    /// whether a binding's condition changed.
    pub fn probe(&mut self, now: Instant) -> (Vec<Reply>, bool) {
        let Some(cfg) = self.probe else {
            return (Vec::new(), false);
        };
        let (interval, timeout) = (
            Duration::from_millis(cfg.interval_ms),
            Duration::from_millis(cfg.timeout_ms),
        );
        let mut changed = false;
        let mut misses = 0;
        // One request per server, home address and source: the server answers it with an
        // update for every binding of that home address.
        let mut due: BTreeSet<(String, IpAddr, SocketAddr)> = BTreeSet::new();
        for (id, b) in self.bindings.iter_mut() {
            if b.state != BindingState::Active {
                continue;
            }
            if let Some(sent) = b.probe_sent {
                if now < sent + timeout {
                    continue;
                }
                b.probe_sent = None;
                let before = b.condition();
                b.probe_misses = b.probe_misses.saturating_add(1);
                misses += 1;
                let after = b.condition();
                if b.probe_urgent {
                    if after == Condition::Down {
                        b.probe_urgent = false;
                    } else {
                        // Confirm a reverse-tunnel suspicion at once, not at the interval.
                        b.probe_next = now;
                    }
                }
                if after != before {
                    changed = true;
                    tracing::warn!(
                        "'{}' for {} via {} is {after:?}: {} refresh requests unanswered",
                        id.server,
                        id.anycast,
                        id.real,
                        b.probe_misses
                    );
                }
            }
            if now >= b.probe_next {
                due.insert((id.server.clone(), id.anycast, b.source));
            }
        }
        for (id, b) in self.bindings.iter_mut() {
            if b.state == BindingState::Active
                && due.contains(&(id.server.clone(), id.anycast, b.source))
            {
                b.probe_sent = Some(now);
                b.probe_next = now + interval;
            }
        }
        let mut out = Vec::new();
        for (server, anycast, source) in due {
            let Some(policy) = self.servers.get(&server) else {
                continue;
            };
            let agent = self
                .agent
                .iter()
                .find(|a| a.to_ipv4_mapped().is_some() == anycast.is_ipv4())
                .or(self.agent.first());
            let Some(&agent) = agent else { continue };
            let brr = Message {
                src: agent,
                dst: wire::to_mapped(anycast),
                body: Body::BindingRefreshRequest,
                options: Options::default(),
            };
            out.push(Reply {
                to: source,
                payload: wire::encode(
                    &brr,
                    Some(Key {
                        spi: policy.spi,
                        secret: &policy.key,
                    }),
                ),
            });
        }
        *self.counters.entry("probes_sent".into()).or_default() += out.len() as u64;
        *self.counters.entry("probes_missed".into()).or_default() += misses;
        (out, changed)
    }
}
