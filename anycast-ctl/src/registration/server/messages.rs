//! What arrives from an agent: acknowledgements (signed, for a binding we sent) and refresh
//! requests; anything unsigned, wrongly signed or unexpected is dropped and logged.
use super::load::canonical;
use super::*;

impl Client {
    pub(crate) fn on_datagram(&mut self, ai: usize, payload: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let agent = &mut self.agents[ai];
        let expected = agent.addr;
        if canonical(from.ip()) != canonical(expected.ip()) || from.port() != expected.port() {
            if let Some(n) = agent.strays.allow(now) {
                tracing::warn!(
                    "ignoring a datagram from {from} on the socket toward agent {expected}{}",
                    held_back(n)
                );
            }
            return;
        }
        let msg = match wire::decode(payload) {
            Ok(msg) => msg,
            Err(e) => {
                if let Some(n) = agent.strays.allow(now) {
                    tracing::warn!(
                        "ignoring an undecodable message from agent {expected}: {e}{}",
                        held_back(n)
                    );
                }
                return;
            }
        };
        // With a certificate there is no shared key: the agent's messages are unsigned, and
        // only their source (checked above) vouches for them.
        let signed = self.certificate.is_some()
            || wire::verify(
                payload,
                Key {
                    spi: self.spi,
                    secret: &self.key,
                },
            );
        let home = wire::from_mapped(msg.dst);
        match msg.body {
            Body::BindingAck {
                status: code,
                seq,
                lifetime,
            } => {
                if signed {
                    self.on_ack(ai, &msg, code, seq, lifetime, now);
                } else if code != status::ACCEPTED && msg.options.auth.is_none() {
                    if let Some(n) = agent.unsigned_refusal.allow(now) {
                        tracing::warn!(
                            "agent {expected} refused the binding of {home}: status {code} ({}), \
                             unsigned (the agent could not identify us: check the identity, SPI \
                             and key){}",
                            status_name(code),
                            held_back(n)
                        );
                    }
                } else if let Some(n) = agent.bad_auth.allow(now) {
                    tracing::warn!(
                        "dropping a binding acknowledgement for {home} from {expected}: {}{}",
                        if msg.options.auth.is_none() {
                            "unsigned"
                        } else {
                            "bad signature"
                        },
                        held_back(n)
                    );
                }
            }
            Body::BindingRefreshRequest => {
                if !signed {
                    if let Some(n) = agent.bad_auth.allow(now) {
                        tracing::warn!(
                            "dropping a binding refresh request for {home} from {expected}: {}{}",
                            if msg.options.auth.is_none() {
                                "unsigned"
                            } else {
                                "bad signature"
                            },
                            held_back(n)
                        );
                    }
                    return;
                }
                self.on_refresh_request(ai, msg.dst, now);
            }
            Body::BindingError {
                status: code,
                home: bad,
            } => {
                if let Some(n) = agent.strays.allow(now) {
                    tracing::warn!(
                        "agent {expected} reports binding error {code} for {}{}{}",
                        wire::from_mapped(bad),
                        if signed { "" } else { " (unsigned)" },
                        held_back(n)
                    );
                }
            }
            Body::BindingUpdate { .. }
            | Body::ClientBindingUpdate { .. }
            | Body::DiscoveryRequest
            | Body::DiscoveryReply { .. } => {
                if let Some(n) = agent.strays.allow(now) {
                    tracing::warn!(
                        "ignoring a binding update or discovery message from agent {expected}{}",
                        held_back(n)
                    );
                }
            }
        }
    }

    pub(crate) fn on_refresh_request(&mut self, ai: usize, home: Ipv6Addr, now: Instant) {
        let agent = self.agents[ai].addr;
        if self.phase == Phase::Deregister {
            tracing::debug!(
                "agent {agent} asks to refresh {}: deregistering, ignored",
                wire::from_mapped(home)
            );
            return;
        }
        let matching: Vec<usize> = (0..self.bindings.len())
            .filter(|&i| self.bindings[i].agent == ai && self.bindings[i].home == home)
            .collect();
        if matching.is_empty() {
            tracing::warn!(
                "agent {agent} asks to refresh {}, which this server does not register",
                wire::from_mapped(home)
            );
            return;
        }
        tracing::info!(
            "agent {agent} asks to refresh {}: sending {} binding update(s)",
            wire::from_mapped(home),
            matching.len()
        );
        for i in matching {
            self.begin(i, self.lifetime_units, now);
        }
    }

    pub(crate) fn on_ack(
        &mut self,
        ai: usize,
        msg: &Message,
        code: u8,
        seq: u16,
        lifetime: u16,
        now: Instant,
    ) {
        let agent = self.agents[ai].addr;
        let found = self
            .bindings
            .iter()
            .position(|b| b.agent == ai && b.home == msg.dst && b.pending && b.sent.contains(&seq));
        if code == status::SEQUENCE_OUT_OF_WINDOW {
            // The BA carries the agent's last accepted sequence number, not ours: it applies to
            // the pending bindings of that home address (narrowed by the options it echoes).
            let targets: Vec<usize> = match found {
                Some(i) => vec![i],
                None => (0..self.bindings.len())
                    .filter(|&i| {
                        let b = &self.bindings[i];
                        b.agent == ai
                            && b.home == msg.dst
                            && b.pending
                            && msg
                                .options
                                .alt_coa
                                .is_none_or(|c| c == wire::to_mapped(b.real))
                            && msg
                                .options
                                .service
                                .as_ref()
                                .is_none_or(|s| b.selector == Some((s.protocol, s.port)))
                    })
                    .collect(),
            };
            if targets.is_empty() {
                tracing::debug!(
                    "agent {agent}: out-of-window answer for {} with nothing pending",
                    wire::from_mapped(msg.dst)
                );
                return;
            }
            let next_seq = seq.wrapping_add(1);
            for i in targets {
                let b = &mut self.bindings[i];
                self.seqs[b.seq_group] = next_seq;
                b.out_of_window += 1;
                b.refused = Some(code);
                if b.out_of_window <= MAX_IMMEDIATE_RESENDS {
                    b.next = now;
                }
                tracing::warn!(
                    "{}: refused by the agent: status {code} ({}), its last accepted sequence \
                     number is {seq}: continuing from {next_seq}",
                    b.label(agent),
                    status_name(code)
                );
            }
            return;
        }
        let Some(i) = found else {
            tracing::debug!(
                "agent {agent}: acknowledgement for {} seq {seq} matches no outstanding update",
                wire::from_mapped(msg.dst)
            );
            return;
        };
        let deregistering = self.phase == Phase::Deregister;
        // An unsigned time (certificate mode) is not taken: anyone could send it.
        if code == status::ID_MISMATCH && self.certificate.is_none() {
            // RFC 4285 section 6: our timestamp was outside the agent's window; the signed
            // answer to our own update carries the agent's time: resynchronize and resend.
            if let Some(agent_time) = msg.options.mesg_id {
                let offset = agent_time.wrapping_sub(wire::ntp_now()) as i64;
                self.agents[ai].clock_offset = offset;
                let b = &mut self.bindings[i];
                b.out_of_window += 1;
                b.refused = Some(code);
                if b.out_of_window <= MAX_IMMEDIATE_RESENDS {
                    b.next = now;
                }
                tracing::warn!(
                    "{}: refused by the agent: status {code} ({}): our clock differs from the \
                     agent's by {:.3} s; resynchronized, resending",
                    b.label(agent),
                    status_name(code),
                    offset as f64 / 4_294_967_296.0
                );
                return;
            }
        }
        let b = &mut self.bindings[i];
        if code != status::ACCEPTED {
            b.refused = Some(code);
            tracing::warn!(
                "{}: refused by the agent: status {code} ({})",
                b.label(agent),
                status_name(code)
            );
            // Still pending: the backoff timer retries.
            return;
        }
        b.pending = false;
        b.sent.clear();
        b.refused = None;
        if b.lifetime == 0 {
            b.removed = true;
            b.registered_until = None;
            tracing::info!("deregistered {}", b.label(agent));
            return;
        }
        if deregistering {
            // A late answer to a registration; the deregistration is begun anew.
            return;
        }
        let granted = Duration::from_secs(u64::from(lifetime) * LIFETIME_UNIT_SECS);
        let was_registered = b.registered_until.is_some_and(|t| t > now);
        b.registered_until = Some(now + granted);
        b.next = now + (granted / 2).max(MIN_REFRESH);
        if was_registered {
            tracing::debug!(
                "refreshed {} for {}s (seq {seq})",
                b.label(agent),
                granted.as_secs()
            );
        } else {
            tracing::info!(
                "registered {} for {}s (seq {seq})",
                b.label(agent),
                granted.as_secs()
            );
        }
        if lifetime == 0 {
            tracing::warn!("{}: the agent granted a zero lifetime", b.label(agent));
        }
    }
}
