//! Handling one datagram: decode, authenticate, check the policy (care-of, limits,
//! replay), then bind, refresh or deregister, and the answer (RFC 6275 section 9.5.1,
//! RFC 4285).
use super::*;

impl Registry {
    /// Handles one datagram from `from`. `wall` is the agent's clock as an NTP timestamp.
    pub fn handle(&mut self, payload: &[u8], from: SocketAddr, now: Instant, wall: u64) -> Outcome {
        self.handle_via(payload, from, now, wall, None)
    }

    /// Handles one datagram, sent to this agent (`via` None) or relayed by a peer agent,
    /// `from` being the outer source the peer vouches for. A relayed message goes through
    /// every check a direct one does (signature, identity, policy, care-of and source,
    /// sequence, timestamp); the differences are in [`super::relayed`].
    pub(super) fn handle_via(
        &mut self,
        payload: &[u8],
        from: SocketAddr,
        now: Instant,
        wall: u64,
        via: Option<&Relayed>,
    ) -> Outcome {
        let none = |counted: String| Outcome {
            reply: None,
            changed: false,
            counted,
        };
        // Everything is decoded and authenticated first (an HMAC is cheap); only then does a
        // message count against its identity's budget. What a sender that does not
        // authenticate can cause beyond that, answers and log lines, is globally bounded.
        let msg = match wire::decode(payload) {
            Ok(m) => m,
            // A peer relays only what it accepted: nothing to answer, and not ours to.
            Err(wire::WireError::UnknownMhType) if via.is_some() => {
                return none(self.count("dropped_malformed_unknown_mh_type"))
            }
            Err(wire::WireError::UnknownMhType) => return self.binding_error(payload, from, now),
            Err(e) => return none(self.count(format!("dropped_malformed_{}", e.reason()))),
        };
        if msg.body == Body::DiscoveryRequest && via.is_none() {
            return self.discovery_request(&msg, payload, from, now, wall);
        }
        let Body::BindingUpdate { seq, lifetime, .. } = msg.body else {
            return none(self.count("dropped_not_binding_update"));
        };
        // A relayed message was addressed to the agent that relays it: to one of its own
        // addresses, or to the discovery address all agents share (the server sent it to
        // the nearest agent by anycast).
        let addressed = match via {
            None => self.agent.contains(&msg.dst),
            Some(r) => r.peer_addresses.contains(&msg.dst) || self.discovery.contains(&msg.dst),
        };
        if !addressed {
            return none(self.count("dropped_not_for_this_agent"));
        }
        let home = wire::from_mapped(msg.src);
        // Identify and authenticate before anything else is believed.
        // Without an identity, or with one we share no key with, there is no security
        // association to authenticate with: RFC 4285 section 5's MIPV6-AUTH-FAIL.
        let Some(identity) = msg.options.mn_id.clone() else {
            self.warn("no identity", now, || {
                format!("binding update from {from} without an identity refused")
            });
            return self.refuse_unauthenticated(&msg, from, seq, now);
        };
        let snapshot = via.and_then(|r| r.snapshot);
        // Signed with a certificate's key rather than a shared one (see `certificates`).
        let mut certificate_end = None;
        if msg.options.signature.is_some() {
            let checked = (now, wall, snapshot.is_some());
            match self.check_certificate(&msg, payload, from, &identity, checked) {
                Ok(held) => certificate_end = Some(held.not_after),
                Err(why) => return self.refuse_certificate(&msg, from, (&identity, seq, now), why),
            }
        } else {
            // Only a configured identity has a key: one known by its certificate has none
            // (its empty `key` must never verify anything).
            let Some(policy) = self
                .servers
                .get(&identity)
                .filter(|p| p.certificate.is_none())
            else {
                self.warn("unknown identity", now, || {
                    format!("binding update from {from} for unknown server '{identity}' refused")
                });
                return self.refuse_unauthenticated(&msg, from, seq, now);
            };
            let key = Key {
                spi: policy.spi,
                secret: &policy.key,
            };
            let spi_ok = msg.options.auth.is_some_and(|a| a.spi == policy.spi);
            if !spi_ok || !wire::verify(payload, key) {
                self.warn("authentication failed", now, || {
                    format!(
                        "binding update from {from} claiming to be '{identity}' failed \
                         authentication"
                    )
                });
                return self.refuse_unauthenticated(&msg, from, seq, now);
            }
        }
        // Relayed copies have a budget of their own: a peer's relays cannot use up the
        // budget of the server's own updates to this agent.
        let budget = match via {
            None => identity.clone(),
            Some(_) => format!("{identity}\0relayed"),
        };
        if !self.allow_rate(&budget, now) {
            return none(self.count("dropped_rate_limited"));
        }
        let signer = Some(identity.clone());
        // Replay protection (RFC 4285 section 6): a MESG-ID is required (145); its timestamp
        // must be near our clock, newer than the last one accepted from this identity and
        // not older than the agent's start (144, answered with the agent's time).
        let Some(ts) = msg.options.mesg_id else {
            self.warn("no MESG-ID", now, || {
                format!("binding update from '{identity}' at {from} refused: no MESG-ID")
            });
            return self.refuse(&msg, from, status::MESG_ID_REQUIRED, seq, signer);
        };
        let last = self.last_mesg_id.get(&identity).copied();
        let skew = (ts >> 32).abs_diff(wall >> 32);
        let stale = match snapshot {
            None => {
                skew > self.replay_window
                    || last.is_some_and(|last| ts <= last)
                    || ts < self.started
            }
            // A snapshot entry is a stored message, older than the window: it must still be
            // live by its own signed timestamp and lifetime (sequence numbers, below, refuse
            // what this agent already has newer).
            Some(_) => !self.live_by_its_own_clock(ts, lifetime, wall),
        };
        if stale {
            self.warn("replayed or stale timestamp", now, || {
                format!(
                    "binding update from '{identity}' at {from} refused: replayed or stale \
                     timestamp"
                )
            });
            // The agent's time, but never one the server could not use: just past the last
            // accepted timestamp when the server's clock ran ahead of ours.
            let agent_time = wall
                .max(last.map_or(0, |l| l.saturating_add(1)))
                .max(self.started);
            let counted = self.count(format!("refused_{}", status::ID_MISMATCH));
            let reply = self.ack_with_time(
                &msg,
                from,
                (status::ID_MISMATCH, seq, 0),
                Some(agent_time),
                signer,
            );
            return Outcome {
                reply,
                changed: false,
                counted,
            };
        }
        let Some(coa) = msg.options.alt_coa else {
            return self.refuse(&msg, from, STATUS_UNSPECIFIED, seq, signer);
        };
        let real = wire::from_mapped(coa);
        let policy = &self.servers[&identity];
        if !policy.allow.iter().any(|p| p.contains(home)) {
            self.warn("not authorized", now, || {
                format!("'{identity}' is not authorized to bind {home} (via {real}): refused")
            });
            return self.refuse(&msg, from, status::PROHIBITED, seq, signer);
        }
        if let Some(why) = self.invalid_care_of(&identity, real, from.ip()) {
            self.warn("invalid care-of address", now, || {
                format!("binding of '{identity}' for {home} via {real} refused: {why}")
            });
            return self.refuse(&msg, from, status::INVALID_COA, seq, signer);
        }
        let id = BindingId {
            anycast: home,
            selector: msg
                .options
                .service
                .map(|s: ServiceSelector| (s.protocol, s.port)),
            server: identity.clone(),
            real,
        };
        let relayed_by = via.map(|r| r.peer.to_string());
        let stored = StoredMessage {
            payload: payload.to_vec(),
            from,
            mesg_id: ts,
        };
        if let Some(b) = self.bindings.get(&id) {
            // Sequence numbers compare modulo 2^16 (RFC 6275 9.5.1).
            if (seq.wrapping_sub(b.seq) as i16) <= 0 {
                let last = b.seq;
                return self.refuse(&msg, from, status::SEQUENCE_OUT_OF_WINDOW, last, signer);
            }
        }
        if lifetime == 0 {
            let drain_time = self.drain_time;
            let changed = match self.bindings.get_mut(&id) {
                Some(b) if drain_time > Duration::ZERO => {
                    b.seq = seq;
                    b.relayed_by = relayed_by;
                    b.message = Some(stored);
                    let was = b.state;
                    b.state = BindingState::Draining;
                    b.expires = now + self.drain_time;
                    if was == BindingState::Active {
                        tracing::info!(
                            "'{identity}' deregistered {home} via {real}: draining for {:?}",
                            self.drain_time
                        );
                    }
                    was == BindingState::Active
                }
                Some(_) => {
                    self.bindings.remove(&id);
                    tracing::info!("'{identity}' deregistered {home} via {real}");
                    true
                }
                // A snapshot carries a draining binding as its deregistration.
                None if drain_time > Duration::ZERO && snapshot.is_some() => {
                    let mut b = self.new_binding(seq, now, drain_time, msg.options.load, from);
                    b.state = BindingState::Draining;
                    b.relayed_by = relayed_by;
                    b.message = Some(stored);
                    self.bindings.insert(id.clone(), b);
                    true
                }
                None => false,
            };
            if let Some(extra) = snapshot {
                self.apply_snapshot_extra(&id, extra, now);
            }
            self.accepted(&identity, ts);
            let counted = self.count("deregistered");
            let reply = self.ack(&msg, from, status::ACCEPTED, seq, 0, signer);
            return Outcome {
                reply,
                changed,
                counted,
            };
        }
        let is_new = !self.bindings.contains_key(&id);
        if is_new {
            if let Some(why) = self.over_limit(&id) {
                self.warn("limit reached", now, || {
                    format!("binding of '{identity}' for {home} via {real} refused: {why}")
                });
                return self.refuse(&msg, from, status::INSUFFICIENT_RESOURCES, seq, signer);
            }
        }
        let mut granted = Duration::from_secs(lifetime as u64 * 4).min(self.max_lifetime);
        if let Some(end) = certificate_end {
            // Never beyond the certificate's validity.
            let unix = u64::try_from(wire::ntp_to_unix_secs(wall)).unwrap_or(0);
            granted = granted.min(Duration::from_secs(end.saturating_sub(unix)));
        }
        let units = (granted.as_secs() / 4) as u16;
        let load = msg.options.load;
        let probe_limit = self.probe.map_or(u32::MAX, |p| p.misses);
        let changed = match self.bindings.get_mut(&id) {
            Some(b) => {
                let was = b.condition();
                let mut changed = b.state != BindingState::Active;
                changed |= b.smoother.update(load.as_ref());
                changed |= b.load.map(|l| l.priority) != load.map(|l| l.priority);
                // Any update answers an outstanding probe.
                if let Some(sent) = b.probe_sent.take() {
                    self.probe_outcomes
                        .answered(now.saturating_duration_since(sent));
                }
                b.probe_misses = 0;
                b.probe_urgent = false;
                if was != Condition::Up {
                    tracing::info!(
                        "'{}' for {} via {} is up again",
                        id.server,
                        id.anycast,
                        id.real
                    );
                    changed = true;
                }
                b.seq = seq;
                b.updated = now;
                b.expires = now + granted;
                b.lifetime = granted;
                b.load = load;
                b.state = BindingState::Active;
                b.source = from;
                b.refresh_requested = false;
                b.relayed_by = relayed_by;
                b.message = Some(stored);
                changed |= self.reverse_answered(&id);
                changed
            }
            None => {
                tracing::info!(
                    "'{identity}' registered {home} via {real} for {granted:?}{}",
                    via.map_or(String::new(), |r| format!(" (relayed by '{}')", r.peer))
                );
                let mut b = self.new_binding(seq, now, granted, load, from);
                b.probe_limit = probe_limit;
                b.relayed_by = relayed_by;
                b.message = Some(stored);
                self.bindings.insert(id.clone(), b);
                true
            }
        };
        if let Some(extra) = snapshot {
            self.apply_snapshot_extra(&id, extra, now);
        }
        self.accepted(&identity, ts);
        let counted = self.count(if is_new { "registered" } else { "refreshed" });
        let reply = self.ack(&msg, from, status::ACCEPTED, seq, units, signer);
        Outcome {
            reply,
            changed,
            counted,
        }
    }

    /// An update from `identity` with MESG-ID `ts` was accepted (bound, refreshed or
    /// deregistered). Only an accepted update moves the replay state: a refused one, even an
    /// authentic one, leaves the server's own next update acceptable.
    fn accepted(&mut self, identity: &str, ts: u64) {
        // A snapshot entry may be older than the identity's newest: never move back.
        let last = self.last_mesg_id.entry(identity.to_string()).or_default();
        *last = (*last).max(ts);
        self.dirty = true;
    }

    /// RFC 6275 9.2: an unknown MH type is answered with a Binding Error, status 2.
    pub(super) fn binding_error(
        &mut self,
        payload: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Outcome {
        let addr = |at: usize| {
            <[u8; 16]>::try_from(&payload[at..at + 16])
                .map(Ipv6Addr::from)
                .ok()
        };
        let (src, dst) = (addr(8), addr(24));
        let counted = self.count("dropped_malformed_unknown_mh_type");
        let reply = match (src, dst) {
            (Some(src), Some(dst))
                if self.agent.contains(&dst) && self.allow_unauthenticated_reply(now) =>
            {
                self.count("binding_errors_sent");
                let be = Message {
                    src: dst,
                    dst: src,
                    body: Body::BindingError {
                        status: STATUS_UNKNOWN_MH_TYPE,
                        home: src,
                    },
                    options: Options::default(),
                };
                Some(Reply {
                    to: from,
                    payload: wire::encode(&be, None),
                })
            }
            _ => None,
        };
        Outcome {
            reply,
            changed: false,
            counted,
        }
    }

    /// Why `real` cannot be `identity`'s care-of address, or why `source` (where the update
    /// came from, and where acknowledgements and refresh requests go) is not its own.
    /// RFC 6275 section 6.1.8 names the refusal: invalid care-of address (174).
    pub(super) fn invalid_care_of(
        &self,
        identity: &str,
        real: IpAddr,
        source: IpAddr,
    ) -> Option<String> {
        let source = source.to_canonical();
        let unicast = match real {
            IpAddr::V4(a) => {
                !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
            }
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
        };
        if !unicast {
            return Some(format!("{real} is not a unicast address"));
        }
        if self.agent.contains(&wire::to_mapped(real)) {
            return Some(format!("{real} is the agent's own address"));
        }
        if self.anycast.contains(&real)
            || self
                .servers
                .values()
                .any(|p| p.allow.iter().any(|a| a.contains(real)))
        {
            return Some(format!("{real} is an anycast address"));
        }
        let policy = self.servers.get(identity)?;
        if !policy.real.iter().any(|p| p.contains(real)) {
            return Some(format!("{real} is not among its real addresses"));
        }
        if !policy.real.iter().any(|p| p.contains(source)) {
            return Some(format!(
                "the update came from {source}, which is not among its real addresses"
            ));
        }
        if let Some(other) = self
            .bindings
            .keys()
            .find(|k| k.real == real && k.server != identity)
        {
            return Some(format!("{real} is bound by '{}'", other.server));
        }
        None
    }

    pub(super) fn over_limit(&self, id: &BindingId) -> Option<String> {
        let per_address = self
            .bindings
            .keys()
            .filter(|k| k.anycast == id.anycast)
            .count();
        if per_address >= self.limits.bindings_per_address as usize {
            return Some(format!("{} already has {per_address} bindings", id.anycast));
        }
        let per_server = self
            .bindings
            .keys()
            .filter(|k| k.server == id.server)
            .count();
        if per_server >= self.limits.bindings_per_server as usize {
            return Some(format!("'{}' already has {per_server} bindings", id.server));
        }
        let mut keys: BTreeSet<ServiceKey> = BTreeSet::new();
        for k in self.bindings.keys().chain(std::iter::once(id)) {
            keys.extend(service_keys(k, &[]));
        }
        if keys.len() > self.max_services {
            return Some(format!(
                "the agent holds at most {} services",
                self.max_services
            ));
        }
        None
    }

    /// A refusal (RFC 4285 section 5's MIPV6-AUTH-FAIL) to a sender that did not
    /// authenticate: counted always, answered (unsigned) within the global budget.
    pub(super) fn refuse_unauthenticated(
        &mut self,
        msg: &Message,
        from: SocketAddr,
        seq: u16,
        now: Instant,
    ) -> Outcome {
        let counted = self.count(format!("refused_{}", status::AUTH_FAILED));
        self.answer_unauthenticated(msg, from, status::AUTH_FAILED, seq, now, counted)
    }

    /// An unsigned refusal with `status`, sent within the global budget of answers to
    /// senders that did not authenticate; `counted` is the refusal's counter, already
    /// counted.
    pub(super) fn answer_unauthenticated(
        &mut self,
        msg: &Message,
        from: SocketAddr,
        status: u8,
        seq: u16,
        now: Instant,
        counted: String,
    ) -> Outcome {
        let reply = if self.allow_unauthenticated_reply(now) {
            self.ack(msg, from, status, seq, 0, None)
        } else {
            None
        };
        Outcome {
            reply,
            changed: false,
            counted,
        }
    }

    pub(super) fn refuse(
        &mut self,
        msg: &Message,
        from: SocketAddr,
        st: u8,
        seq: u16,
        signer: Option<String>,
    ) -> Outcome {
        let counted = self.count(format!("refused_{st}"));
        let reply = self.ack(msg, from, st, seq, 0, signer);
        Outcome {
            reply,
            changed: false,
            counted,
        }
    }

    /// A Binding Acknowledgement, signed with the server's key when we know who it is.
    pub(super) fn ack(
        &self,
        msg: &Message,
        from: SocketAddr,
        st: u8,
        seq: u16,
        lifetime: u16,
        signer: Option<String>,
    ) -> Option<Reply> {
        self.ack_with_time(msg, from, (st, seq, lifetime), None, signer)
    }

    /// A Binding Acknowledgement (status, sequence, lifetime), with a MESG-ID option when
    /// `time` is given (RFC 4285 section 6: the agent's time, for a server to resynchronize).
    pub(super) fn ack_with_time(
        &self,
        msg: &Message,
        from: SocketAddr,
        (st, seq, lifetime): (u8, u16, u16),
        time: Option<u64>,
        signer: Option<String>,
    ) -> Option<Reply> {
        let ba = Message {
            src: msg.dst,
            dst: msg.src,
            body: Body::BindingAck {
                status: st,
                seq,
                lifetime,
            },
            options: Options {
                mesg_id: time,
                ..Options::default()
            },
        };
        let key = signer
            .as_ref()
            .and_then(|s| self.servers.get(s))
            .filter(|p| p.certificate.is_none())
            .map(|p| Key {
                spi: p.spi,
                secret: &p.key,
            });
        Some(Reply {
            to: from,
            payload: wire::encode(&ba, key),
        })
    }
}
