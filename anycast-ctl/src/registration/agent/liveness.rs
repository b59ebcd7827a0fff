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
        self.dirty |= !gone.is_empty();
        !gone.is_empty()
    }

    /// Binding Refresh Requests for active bindings in the last quarter of their lifetime
    /// (once per lifetime), sent where their last update came from.
    pub fn refresh_requests(&mut self, now: Instant) -> Vec<Reply> {
        let mut out = Vec::new();
        for (id, b) in self.bindings.iter_mut() {
            // The agent the server talks to asks it; this one has the relayed refreshes.
            if b.state != BindingState::Active
                || b.relayed_by.is_some()
                || b.refresh_requested
                || b.expires.saturating_duration_since(now) > b.lifetime / 4
            {
                continue;
            }
            b.refresh_requested = true;
            out.extend(refresh_request(
                &self.servers,
                &self.agent,
                (&id.server, id.anycast, b.source),
                addressed_to(b),
            ));
        }
        for _ in 0..out.len() {
            self.count("refresh_requests_sent");
        }
        out
    }

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
        let mut dirty = false;
        // One request per server, home address and source: the server answers it with an
        // update for every binding of that home address.
        let mut due: BTreeSet<(String, IpAddr, SocketAddr)> = BTreeSet::new();
        for (id, b) in self.bindings.iter_mut() {
            // Only the agent a server sent its last update to probes it (a relayed binding's
            // server might not even reach this agent).
            if b.state != BindingState::Active || b.relayed_by.is_some() {
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
                // The state file holds the misses up to the limit (the condition): one
                // more for a binding that is down already changes nothing there.
                dirty |= b.probe_misses <= b.probe_limit;
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
        self.dirty |= dirty;
        let out = self.send_probes(due, now, interval);
        *self.counters.entry("probes_sent".into()).or_default() += out.len() as u64;
        *self.counters.entry("probes_missed".into()).or_default() += misses;
        self.probe_outcomes.missed += misses;
        (out, changed)
    }

    /// Refresh requests to `due` (server, home address, source), each one outstanding probe
    /// for every active binding it covers: an update before the timeout answers it, none
    /// is a miss.
    pub(super) fn send_probes(
        &mut self,
        due: BTreeSet<(String, IpAddr, SocketAddr)>,
        now: Instant,
        interval: Duration,
    ) -> Vec<Reply> {
        for (id, b) in self.bindings.iter_mut() {
            if b.state == BindingState::Active
                && b.relayed_by.is_none()
                && due.contains(&(id.server.clone(), id.anycast, b.source))
            {
                b.probe_sent = Some(now);
                b.probe_next = now + interval;
            }
        }
        due.into_iter()
            .filter_map(|(server, anycast, source)| {
                let to = self.addressed_to(&server, anycast, source);
                refresh_request(&self.servers, &self.agent, (&server, anycast, source), to)
            })
            .collect()
    }

    /// The agent address the server's last direct update of these bindings was sent to.
    pub(super) fn addressed_to(
        &self,
        server: &str,
        anycast: IpAddr,
        source: SocketAddr,
    ) -> Option<Ipv6Addr> {
        self.bindings
            .iter()
            .find(|(id, b)| id.server == server && id.anycast == anycast && b.source == source)
            .and_then(|(_, b)| addressed_to(b))
    }
}

/// The inner destination of a binding's last accepted message (the agent address, or the
/// discovery address, the server sent it to).
fn addressed_to(b: &Binding) -> Option<Ipv6Addr> {
    let m = b.message.as_ref()?;
    let dst: [u8; 16] = m.payload.get(24..40)?.try_into().ok()?;
    Some(Ipv6Addr::from(dst))
}

/// A Binding Refresh Request for `server`'s bindings of `anycast`, signed with its key, to
/// `to`, from the address the server sends its updates to (`prefer`, when it is one of
/// ours: a server that registers through the discovery address takes answers only from
/// there), else from the agent address of the same family. None if the identity is not
/// configured (its key is gone) or the agent has no address.
pub(super) fn refresh_request(
    servers: &HashMap<String, ServerPolicy>,
    agent: &[Ipv6Addr],
    (server, anycast, to): (&str, IpAddr, SocketAddr),
    prefer: Option<Ipv6Addr>,
) -> Option<Reply> {
    let policy = servers.get(server)?;
    let &agent = prefer
        .as_ref()
        .filter(|p| agent.contains(p))
        .or_else(|| {
            agent
                .iter()
                .find(|a| a.to_ipv4_mapped().is_some() == anycast.is_ipv4())
        })
        .or(agent.first())?;
    let brr = Message {
        src: agent,
        dst: wire::to_mapped(anycast),
        body: Body::BindingRefreshRequest,
        options: Options::default(),
    };
    // Unsigned to a server known by its certificate: the agent shares no key with it.
    let key = policy.certificate.is_none().then_some(Key {
        spi: policy.spi,
        secret: &policy.key,
    });
    Some(Reply {
        to,
        payload: wire::encode(&brr, key),
    })
}
