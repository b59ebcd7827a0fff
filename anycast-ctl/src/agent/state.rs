//! The agent's state and its owner task's handlers. Handlers are synchronous: they read and
//! write the maps (bpf(2) calls) but never wait on a socket; what they have to send goes to
//! the sender tasks' queues.
use std::{
    cell::RefCell,
    net::IpAddr,
    path::{Path, PathBuf},
    rc::Rc,
    time::Instant,
};

use anycast_common::wire;
use anyhow::{anyhow, bail, Result};

use super::shared_health::table_inputs_digest;
use super::{
    control::Answer,
    registration_io::{Datagram, NotQueued, ReplySender},
};
use crate::{
    config::Config,
    control_socket::{HealthStatus, InterfaceStatus, Request, Response, Status},
    dataplane::{Dataplane, FlowSweeper, Sizes},
    health::{CheckConfig, CheckKind, Checker, Target},
    model::{Candidate, Condition, ServicePlan},
    model::{DesiredService, Preference},
    registration::agent::{
        read_state_file, write_state_file, CertificatePolicy, DiscoveryConfig, Registry, Relayed,
        Reply,
    },
    relay::{Body, Relay},
    routing::{Desired, PrefixWant},
};

pub(super) fn sizes(config: &Config) -> Sizes {
    Sizes {
        max_preference_tables: config.max_preference_tables,
        ..Sizes::new(config.ring_size, config.max_services, config.max_flows)
    }
}

pub(super) fn agent_addresses(config: &Config) -> Vec<IpAddr> {
    config
        .agent_address
        .v4
        .into_iter()
        .chain(config.agent_address.v6)
        .collect()
}

/// The binding protocol's registry for a configuration (keys read from disk), if enabled.
pub(super) fn registry(config: &Config, config_path: &Path) -> Result<Option<Registry>> {
    let Some(reg) = &config.registration else {
        return Ok(None);
    };
    let keys = config
        .load_keys(config_path)
        .map_err(|e| anyhow!("invalid configuration: {e}"))?;
    Ok(Some(
        Registry::new(
            reg,
            &keys,
            &agent_addresses(config),
            config.max_services as usize,
        )
        .with_service_addresses(config.services.iter().map(|s| s.address))
        .refusing_mesg_ids_before(wire::ntp_now())
        .with_discovery(discovery(config))
        .with_certificates(
            CertificatePolicy::load(config, config_path)
                .map_err(|e| anyhow!("invalid configuration: {e:#}"))?,
        ),
    ))
}

/// What agent discovery answers: the discovery addresses, then this agent and its relay
/// peers with their registration addresses (empty when `discovery_address` is not set).
pub(super) fn discovery(config: &Config) -> DiscoveryConfig {
    let Some(reg) = &config.registration else {
        return DiscoveryConfig::default();
    };
    let Some(d) = &reg.discovery_address else {
        return DiscoveryConfig::default();
    };
    // The first usable address of each family.
    let entry = |id: &str, addresses: &[IpAddr]| {
        let usable = |a: &&IpAddr| !a.is_unspecified() && !a.is_multicast();
        let e = wire::AgentEntry {
            id: id.to_string(),
            v4: addresses.iter().filter(usable).find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            v6: addresses.iter().filter(usable).find_map(|a| match a {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Some(*v6),
                _ => None,
            }),
        };
        (e.v4.is_some() || e.v6.is_some()).then_some(e)
    };
    let own_id = reg.relay.as_ref().map_or("agent", |r| r.id.as_str());
    let mut agents: Vec<wire::AgentEntry> = entry(own_id, &agent_addresses(config))
        .into_iter()
        .collect();
    for p in reg.relay.iter().flat_map(|r| &r.peers) {
        agents.extend(entry(&p.id, &p.registration_addresses()));
    }
    DiscoveryConfig {
        addresses: d.v4.into_iter().chain(d.v6).collect(),
        agents,
    }
}

/// The health-check targets of a service's candidate: one per configured check, at the
/// check's port or the service's (none for TCP/HTTP checks of an every-port service).
fn targets(checks: &[CheckConfig], which: &[usize], port: u16, c: &Candidate) -> Vec<Target> {
    which
        .iter()
        .filter_map(|&i| checks.get(i).map(|check| (i, check)))
        .filter_map(|(i, check)| {
            let port = match &check.kind {
                CheckKind::Tcp { port: Some(p) } | CheckKind::Http { port: Some(p), .. } => *p,
                CheckKind::Tcp { .. } | CheckKind::Http { .. } if port == 0 => return None,
                _ => port,
            };
            Some(Target {
                server: c.name.clone(),
                real: c.address,
                port,
                check: i,
            })
        })
        .collect()
}

pub(super) struct Agent {
    pub(super) config_path: PathBuf,
    pub(super) config: Config,
    pub(super) dataplane: Dataplane,
    pub(super) registry: Option<Registry>,
    pub(super) interfaces: Vec<InterfaceStatus>,
    /// Servers the operator drained (by name); not kept across restarts.
    pub(super) drained: std::collections::BTreeSet<String>,
    pub(super) checker: Rc<RefCell<Checker>>,
    /// One per registration socket, in the sockets' order.
    pub(super) senders: Vec<ReplySender>,
    /// Deletes expired flow entries on a thread of its own; stops with the agent.
    pub(super) _sweeper: FlowSweeper,
    /// The instance's pinned state and files.
    pub(super) instance: super::instance::Instance,
    /// The record of the maps last written beside them.
    pub(super) saved_record: Option<super::instance::MapsRecord>,
    /// Flows in the adopted flow table, when this controller adopted pinned maps.
    pub(super) adopted_flows: Option<usize>,
    /// Binding sync with peer agents, when configured, and its sockets' senders.
    pub(super) relay: Option<Relay>,
    pub(super) relay_senders: Vec<ReplySender>,
    /// Flows that move between agents: the pins this agent relays and takes (with a relay).
    pub(super) pins: Option<super::pins::FlowPins>,
    /// The routing task's end, when the configuration has a `routing` section.
    pub(super) routing: Option<super::routing::RoutingHandle>,
    /// Real addresses this agent holds down by its own observation (as last published).
    pub(super) own_down: std::collections::BTreeSet<crate::relay::HealthEntry>,
    /// Real addresses of bindings down in the published tables (here or by a peer's mark):
    /// part of the digest the agents compare.
    pub(super) down_inputs: std::collections::BTreeSet<crate::relay::HealthEntry>,
    /// The metrics endpoint's snapshots and live metrics (with `metrics`).
    pub(super) metrics: Option<super::metrics::Publisher>,
}

pub(super) fn log_services(config: &Config) {
    for s in &config.services {
        tracing::info!(
            "service {} {} {} port {}: {} configured servers",
            s.name,
            s.address,
            s.protocol,
            s.port,
            s.servers.len()
        );
    }
}

impl Agent {
    /// The forwarding state: configured services plus what the live bindings bring, with
    /// operator drains, this agent's health and the peers' marks applied, then selection
    /// (tiers, weights, conditions).
    fn forwarding(&self) -> Vec<DesiredService> {
        let mut plans = self.own_plans();
        self.apply_peer_marks(&mut plans);
        plans.iter().map(ServicePlan::select).collect()
    }

    /// Configured services plus what the live bindings bring, with operator drains and this
    /// agent's own health observations (not the peers' marks).
    fn own_plans(&self) -> Vec<ServicePlan> {
        let mut plans = self.service_plans();
        let checks = self.config.all_checks();
        let checker = self.checker.borrow();
        for plan in &mut plans {
            plan.preferences = self
                .config
                .preferences
                .iter()
                .map(|p| Preference {
                    // A preference lists clients of both families; a service takes those of
                    // its own address's family.
                    clients: p
                        .clients
                        .iter()
                        .filter(|c| c.addr.is_ipv4() == plan.key.ip().is_ipv4())
                        .map(|c| (c.addr, c.len))
                        .collect(),
                    servers: plan
                        .candidates
                        .iter()
                        .filter(|c| p.servers.contains(&c.name))
                        .map(|c| c.address)
                        .collect(),
                })
                .filter(|p| !p.servers.is_empty() && !p.clients.is_empty())
                .collect();
            for c in &mut plan.candidates {
                c.draining |= self.drained.contains(&c.name);
                // The worst of the binding's own condition and every check of the server.
                for t in targets(
                    &checks,
                    &self
                        .config
                        .checks_of(plan.key.ip(), plan.key.proto, plan.key.port),
                    plan.key.port,
                    c,
                ) {
                    let seen = checker.health(&t).unwrap_or(Condition::Up);
                    c.condition = c.condition.max(seen);
                }
            }
        }
        plans
    }

    /// Configured services plus those the live bindings bring, before health and drains.
    pub(super) fn service_plans(&self) -> Vec<ServicePlan> {
        let configured = self.config.service_plans();
        match &self.registry {
            Some(r) => r.plan(&configured),
            None => configured,
        }
    }

    /// Keeps the health checker's targets in line with the services' servers.
    fn update_targets(&mut self) {
        let plans = self.service_plans();
        let checks = self.config.all_checks();
        let all: std::collections::BTreeSet<Target> = plans
            .iter()
            .flat_map(|p| {
                p.candidates.iter().flat_map(|c| {
                    targets(
                        &checks,
                        &self.config.checks_of(p.key.ip(), p.key.proto, p.key.port),
                        p.key.port,
                        c,
                    )
                })
            })
            .collect();
        self.checker.borrow_mut().set_targets(all);
    }

    fn drain(&mut self, server: String, undo: bool) -> Result<Vec<String>> {
        let known = self
            .forwarding()
            .iter()
            .any(|s| s.servers.iter().any(|x| x.name == server));
        if !undo && !known {
            bail!("no server named '{server}' in any service");
        }
        let changed = if undo {
            self.drained.remove(&server)
        } else {
            self.drained.insert(server.clone())
        };
        if changed {
            tracing::info!(
                "operator {} '{server}'",
                if undo { "undrained" } else { "drained" }
            );
            self.republish();
        }
        Ok(self.drained.iter().cloned().collect())
    }

    pub(super) fn republish(&mut self) {
        let started = Instant::now();
        self.update_targets();
        let mut plans = self.own_plans();
        let own = super::shared_health::down_in(&plans);
        self.apply_peer_marks(&mut plans);
        let forwarding: Vec<DesiredService> = plans.iter().map(ServicePlan::select).collect();
        self.share_health(own, &plans);
        let built = Instant::now();
        let applied = self.dataplane.apply(&forwarding);
        if let Some(m) = &self.metrics {
            m.live.table_built(built - started);
            m.live.table_published(built.elapsed());
        }
        match applied {
            // Announced only what the published tables can serve.
            Ok(()) => {
                self.publish_pin_view();
                let desired = desired_routes(&self.config, &forwarding);
                if let Some(r) = &mut self.routing {
                    r.want(desired);
                }
            }
            Err(e) => tracing::error!("updating the forwarding maps failed: {e:#}"),
        }
        self.save_maps_record();
    }

    /// Keeps the record of what the maps hold beside them (when it changed), for the next
    /// controller to adopt. A small file in the state directory (tmpfs by default).
    fn save_maps_record(&mut self) {
        let record = super::instance::MapsRecord {
            layout_version: anycast_common::maps::AGENT_LAYOUT_VERSION,
            installed: self.dataplane.record(),
            drained: self.drained.iter().cloned().collect(),
        };
        if self.saved_record.as_ref() == Some(&record) {
            return;
        }
        let path = self.instance.file(super::instance::MAPS_RECORD);
        let written = serde_json::to_vec(&record)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::files::write_atomically(&path, &bytes));
        match written {
            Ok(()) => self.saved_record = Some(record),
            Err(e) => tracing::error!(
                "keeping the record of the maps in {}: {e:#} (a restarted agent could not \
                 adopt them)",
                path.display()
            ),
        }
    }

    pub(super) fn handle_datagrams(&mut self, batch: Vec<Datagram>) -> Vec<(Option<usize>, Reply)> {
        let Some(registry) = self.registry.as_mut() else {
            return Vec::new();
        };
        let now = Instant::now();
        let wall = wire::ntp_now();
        let mut changed = false;
        let mut replies = Vec::new();
        let mut relayed = Vec::new();
        for Datagram { via, payload, from } in batch {
            let outcome = registry.handle(&payload, from, now, wall);
            changed |= outcome.changed;
            // What this agent accepted from a server goes to its peers, verbatim.
            if let Some(relay) = self.relay.as_mut() {
                if Registry::accepted_outcome(&outcome) {
                    relayed.extend(relay.relay(&payload, from, wall));
                }
            }
            if let Some(r) = outcome.reply {
                replies.push((Some(via), r));
            }
        }
        if changed {
            self.republish();
        }
        self.save_bindings();
        self.send_relay(relayed);
        replies
    }

    /// Datagrams from the relay sockets: envelopes from peer agents. Relayed and snapshot
    /// messages are handled as the server's own (never answered, never relayed again);
    /// digests are compared; a hello is answered with a snapshot.
    pub(super) fn handle_relay_datagrams(&mut self, batch: Vec<Datagram>) {
        let (Some(registry), Some(relay)) = (self.registry.as_mut(), self.relay.as_mut()) else {
            return;
        };
        let now = Instant::now();
        let wall = wire::ntp_now();
        let mut changed = false;
        let mut out = Vec::new();
        let mut health = Vec::new();
        let digest = |r: &Registry| table_inputs_digest(r, &self.down_inputs);
        let mut pins_in = Vec::new();
        for Datagram { payload, from, .. } in batch {
            let Ok((peer, peer_addresses, envelope)) = relay.receive(from, &payload, now, wall)
            else {
                continue;
            };
            let relayed = |snapshot| Relayed {
                peer: peer.clone(),
                peer_addresses: peer_addresses.clone(),
                snapshot,
            };
            match envelope.body {
                Body::Relay { from, message } => {
                    let via = relayed(None);
                    changed |= registry
                        .handle_relayed(&message, from, &via, now, wall)
                        .changed;
                }
                Body::Snapshot {
                    from,
                    message,
                    extra,
                } => {
                    let via = relayed(Some(extra));
                    changed |= registry
                        .handle_relayed(&message, from, &via, now, wall)
                        .changed;
                }
                Body::Digest {
                    bindings,
                    digest: theirs,
                } => out.extend(relay.compare(
                    &peer,
                    (bindings, theirs),
                    digest(registry),
                    now,
                    wall,
                )),
                Body::Hello => out.extend(relay.snapshot(
                    &peer,
                    registry.snapshot_entries(&peer, now),
                    digest(registry),
                    now,
                    wall,
                )),
                // Taken after the batch's bindings, so a mark can name one that came with
                // it. Never passed on: an agent tells only its own observations.
                Body::Health { down } => health.push((peer, down)),
                Body::FlowPins { pins } => pins_in.push((peer, pins)),
            }
        }
        if !health.is_empty() {
            let known = self.known_real_addresses();
            if let Some(relay) = self.relay.as_mut() {
                for (peer, down) in health {
                    changed |= relay.take_health(&peer, &down, |e| known.get(e).cloned(), now);
                }
            }
        }
        for (peer, pins) in pins_in {
            self.take_pins(&peer, pins);
        }
        if changed {
            self.republish();
        }
        self.save_bindings();
        self.send_relay(out);
    }

    /// Hands envelopes to the relay sockets' senders (by the peer's family); a full queue
    /// drops the envelope and counts it (a lost delta shows in the next digests, which ask
    /// for a snapshot).
    pub(super) fn send_relay(&mut self, out: Vec<Reply>) {
        for r in out {
            let Some(sender) = self.relay_senders.iter().find(|s| s.v4 == r.to.is_ipv4()) else {
                continue;
            };
            match sender.offer(r) {
                Ok(()) => {}
                Err(NotQueued::Full) => {
                    if let Some(relay) = self.relay.as_mut() {
                        relay.count("relay_dropped_queue_full");
                    }
                }
                Err(NotQueued::Closed) => tracing::error!("a relay sender has stopped"),
            }
        }
    }

    /// Takes the bindings back from the state file an earlier agent of this instance left,
    /// and asks every server to confirm its binding at once. Before the first publish, so
    /// the first tables are the ones that agent left.
    pub(super) fn restore_bindings(&mut self) -> Vec<(Option<usize>, Reply)> {
        let path = self.instance.file(super::instance::BINDINGS);
        let Some(registry) = self.registry.as_mut() else {
            return Vec::new();
        };
        let now = Instant::now();
        match read_state_file(&path) {
            Ok(Some(state)) => {
                let report = registry.restore(state, now, wire::ntp_now());
                tracing::info!("{report}");
            }
            Ok(None) => {}
            Err(e) => tracing::error!("{e:#}: starting without the bindings it holds"),
        }
        let requests = registry.refresh_all(now);
        self.save_bindings();
        requests.into_iter().map(|r| (None, r)).collect()
    }

    /// Writes the bindings and their replay state to the state file when they changed:
    /// before the acknowledgements go out, so the file never lags behind what a server was
    /// told.
    pub(super) fn save_bindings(&mut self) {
        let Some(registry) = self.registry.as_mut() else {
            return;
        };
        if !registry.take_dirty() {
            return;
        }
        let state = registry.snapshot(Instant::now(), wire::ntp_now());
        let path = self.instance.file(super::instance::BINDINGS);
        if let Err(e) = write_state_file(&path, &state) {
            tracing::error!("keeping the bindings in {}: {e:#}", path.display());
        }
    }

    pub(super) fn housekeeping(&mut self) -> Vec<(Option<usize>, Reply)> {
        let now = Instant::now();
        let Some(registry) = self.registry.as_mut() else {
            return Vec::new();
        };
        let expired = registry.expire(now);
        let mut suspected = false;
        if registry.reverse_monitoring() {
            match self.dataplane.reverse_counters() {
                Ok(counters) => suspected = registry.watch_reverse(now, &counters),
                Err(e) => tracing::warn!("reading the reverse-tunnel counters: {e:#}"),
            }
        }
        let mut requests = registry.refresh_requests(now);
        let (probes, conditions_changed) = registry.probe(now);
        requests.extend(probes);
        let mut lapsed = false;
        let relay_out = match self.relay.as_mut() {
            Some(relay) => {
                lapsed = relay.expire_health(now);
                relay.tick(
                    table_inputs_digest(registry, &self.down_inputs),
                    now,
                    wire::ntp_now(),
                )
            }
            None => Vec::new(),
        };
        if expired || suspected || conditions_changed || lapsed {
            self.republish();
        }
        self.save_bindings();
        self.send_relay(relay_out);
        requests.into_iter().map(|r| (None, r)).collect()
    }

    /// Publishes a metrics snapshot when one is due (once a second).
    pub(super) fn publish_metrics(&mut self) {
        let due = self.metrics.as_ref().is_some_and(|m| m.due(Instant::now()));
        if due {
            if let (Some(r), Some(m)) = (self.registry.as_mut(), &self.metrics) {
                // Refresh-request probes are a health method of their own.
                let (outcomes, timeout) = r.take_probe_outcomes();
                m.live.probes_done(&outcomes, timeout.unwrap_or_default());
            }
            let snapshot = self.metrics_snapshot();
            if let Some(m) = &mut self.metrics {
                m.publish(snapshot);
            }
        }
    }

    pub(super) fn reload(&mut self) -> Result<()> {
        let new = Config::load(&self.config_path).map_err(|e| anyhow!("{e}"))?;
        let fixed = |c: &Config| {
            (
                c.interfaces.clone(),
                c.xdp_mode,
                c.agent_address.clone(),
                sizes(c),
                c.registration.as_ref().map(|r| r.port),
                c.control.clone(),
                (c.routing.clone(), c.metrics.clone()),
                (
                    c.instance.clone(),
                    c.state_directory.clone(),
                    c.pin_directory.clone(),
                ),
                c.registration
                    .as_ref()
                    .map(|r| (r.relay.clone(), r.discovery_address.clone())),
            )
        };
        if fixed(&new) != fixed(&self.config) {
            bail!("interfaces, xdp_mode, agent_address, ring_size, max_services, max_flows, registration.port, registration.relay, registration.discovery_address, control, routing, metrics, instance, state_directory and pin_directory only change on restart");
        }
        for w in new.warnings() {
            tracing::warn!("configuration: {w}");
        }
        let new_registry = registry(&new, &self.config_path)?;
        self.config = new;
        self.checker
            .borrow_mut()
            .set_checks(self.config.all_checks());
        self.dataplane
            .set_flow_timeouts(self.config.flow_timeouts)?;
        self.dataplane
            .set_reverse_tunnel(super::reverse_tunnel_configured(&self.config))?;
        self.dataplane
            .set_icmp(self.config.answer_ping, self.config.forward_icmp_errors)?;
        self.dataplane.set_too_big_answers(
            self.config.answer_too_big,
            self.config.too_big_answers_per_second,
        )?;
        self.dataplane
            .set_unseen_pins(self.config.unseen_pins_per_second)?;
        self.registry = match (self.registry.take(), new_registry) {
            (Some(mut old), Some(new)) => {
                old.update_policy(new);
                Some(old)
            }
            (_, new) => new,
        };
        self.republish();
        self.save_bindings();
        log_services(&self.config);
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }

    pub(super) fn status(&self) -> Result<Status> {
        Ok(Status {
            config: self.config_path.clone(),
            interfaces: self.interfaces.clone(),
            agent_v4: self.config.agent_address.v4,
            agent_v6: self.config.agent_address.v6,
            dataplane: self.dataplane.report()?,
            health: self
                .checker
                .borrow()
                .report()
                .into_iter()
                .map(|(t, h, detail)| HealthStatus {
                    check: self
                        .config
                        .all_checks()
                        .get(t.check)
                        .map_or("?".into(), |c| kind_name(&c.kind)),
                    server: t.server,
                    real: t.real,
                    port: t.port,
                    health: h,
                    detail,
                })
                .collect(),
            drained: self.drained.iter().cloned().collect(),
            routing: self.routing.as_ref().map(|r| r.status()),
            instance: Some(crate::control_socket::InstanceStatus {
                name: self.instance.name.clone(),
                state_directory: self.instance.state_dir.clone(),
                pin_directory: self.instance.pin_dir.clone(),
                adopted_flows: self.adopted_flows,
            }),
            relay: self.relay_report(Instant::now()),
        })
    }

    /// Answers a control request. Everything but the flow listing is answered here, from
    /// the owner's state; the flow listing gets a snapshot to read off the owner.
    pub(super) fn answer(&mut self, request: Request) -> Answer {
        let error = |e: anyhow::Error| Response::Error {
            message: format!("{e:#}"),
        };
        Answer::Ready(match request {
            Request::Status => match self.status() {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => error(e),
            },
            Request::Bindings => match &self.registry {
                Some(r) => {
                    let counters = self.dataplane.reverse_counters();
                    if let Err(e) = &counters {
                        tracing::warn!("reading the reverse-tunnel counters: {e:#}");
                    }
                    let now = Instant::now();
                    let mut report = r.report(now, counters.ok().as_ref());
                    report.relay = self.relay_report(now);
                    self.fill_down_by(&mut report);
                    Response::Bindings(report)
                }
                None => Response::Error {
                    message: "registration is not enabled in the configuration".into(),
                },
            },
            Request::Flows => match self.dataplane.flow_snapshot() {
                Ok(snapshot) => return Answer::Flows(snapshot),
                Err(e) => error(e),
            },
            Request::Drain { server, undo } => match self.drain(server.clone(), undo) {
                Ok(drained) => Response::Drained { server, drained },
                Err(e) => error(e),
            },
            Request::Reload => match self.reload() {
                Ok(()) => Response::Reloaded,
                Err(e) => {
                    tracing::error!("reload refused, configuration unchanged: {e:#}");
                    Response::Error {
                        message: format!("reload refused, configuration unchanged: {e:#}"),
                    }
                }
            },
        })
    }

    /// Hands replies to the sender tasks: by the socket the update came in on, else by the
    /// socket of the message's inner source (a refresh request to a server that talks to
    /// the discovery address leaves from there), else by one of the destination's family.
    /// A full queue drops the reply and counts it.
    pub(super) fn send(&mut self, replies: Vec<(Option<usize>, Reply)>) {
        for (via, r) in replies {
            let inner_src = r
                .payload
                .get(8..24)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(|b| wire::from_mapped(b.into()));
            let sender = via
                .and_then(|i| self.senders.get(i))
                .or_else(|| {
                    self.senders
                        .iter()
                        .find(|s| inner_src.is_some() && s.local == inner_src)
                })
                .or_else(|| self.senders.iter().find(|s| s.v4 == r.to.is_ipv4()));
            let Some(sender) = sender else { continue };
            match sender.offer(r) {
                Ok(()) => {}
                Err(NotQueued::Full) => {
                    if let Some(registry) = self.registry.as_mut() {
                        registry.count_reply_dropped();
                    }
                }
                Err(NotQueued::Closed) => tracing::error!("a registration sender has stopped"),
            }
        }
    }
}

/// What BIRD should announce: each anycast address of the published services, announced
/// while at least one of its services has a server that is up and takes new flows. The
/// export filters let through the configured addresses and the registration `allow`
/// prefixes only.
pub(super) fn desired_routes(config: &Config, published: &[DesiredService]) -> Desired {
    let mut healthy: std::collections::BTreeMap<IpAddr, usize> = Default::default();
    for s in published {
        let n = s.servers.iter().filter(|x| x.up && x.weight > 0).count();
        *healthy.entry(s.key.ip()).or_default() += n;
    }
    for s in &config.services {
        healthy.entry(s.address).or_default();
    }
    let exportable = config
        .services
        .iter()
        .map(|s| crate::config::Prefix {
            addr: s.address,
            len: if s.address.is_ipv4() { 32 } else { 128 },
        })
        .chain(
            config
                .registration
                .iter()
                .flat_map(|r| &r.servers)
                .flat_map(|s| s.allow.iter().copied()),
        )
        .collect();
    Desired {
        exportable,
        prefixes: healthy
            .into_iter()
            .map(|(address, n)| PrefixWant {
                address,
                announce: n > 0,
                why: match n {
                    0 => "no healthy server".to_string(),
                    1 => "1 healthy server".to_string(),
                    n => format!("{n} healthy servers"),
                },
            })
            .collect(),
    }
}

fn kind_name(k: &CheckKind) -> String {
    match k {
        CheckKind::Icmp => "icmp".into(),
        CheckKind::Tcp { .. } => "tcp".into(),
        CheckKind::Http { .. } => "http".into(),
        CheckKind::Command { .. } => "command".into(),
    }
}
