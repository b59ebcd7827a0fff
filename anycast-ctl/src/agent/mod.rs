//! `anycast-ctl agent`: loads the data path, keeps the maps in line with the configuration
//! and the servers' bindings, answers the control socket and the binding protocol, and
//! detaches cleanly on SIGINT/SIGTERM.
use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    rc::Rc,
    time::{Duration, Instant},
};

use anycast_common::{wire, ServiceKey};
use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UdpSocket, UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

mod route_events;

use crate::{
    config::Config,
    control_socket::{HealthStatus, InterfaceStatus, Request, Response, Status},
    dataplane::{Dataplane, DesiredServer, DesiredService, FlowSweeper, Preference, Sizes},
    health::{self, CheckConfig, CheckKind, Checker, Health, Target, Transition},
    host::{self as sys, HostChanges},
    registration::agent::{Registry, Reply},
    selection::{Candidate, Condition, ServicePlan},
};
use route_events::RouteEvents;

/// The services and servers a configuration lists itself.
pub fn desired(config: &Config) -> Vec<DesiredService> {
    config
        .services
        .iter()
        .map(|s| DesiredService {
            name: s.name.clone(),
            key: ServiceKey::new(s.address, s.protocol.number(), s.port),
            servers: s
                .servers
                .iter()
                .map(|srv| DesiredServer {
                    name: srv.name.clone(),
                    address: srv.address,
                    weight: srv.weight,
                    up: true,
                })
                .collect(),
            preferences: Vec::new(),
        })
        .collect()
}

fn sizes(config: &Config) -> Sizes {
    Sizes {
        max_preference_tables: config.max_preference_tables,
        ..Sizes::new(config.ring_size, config.max_services, config.max_flows)
    }
}

fn agent_addresses(config: &Config) -> Vec<IpAddr> {
    config
        .agent_address
        .v4
        .into_iter()
        .chain(config.agent_address.v6)
        .collect()
}

/// The binding protocol's registry for a configuration (keys read from disk), if enabled.
fn registry(config: &Config, config_path: &Path) -> Result<Option<Registry>> {
    let Some(reg) = &config.registration else {
        return Ok(None);
    };
    let keys = config
        .load_keys(config_path)
        .map_err(|e| anyhow!("invalid configuration: {e}"))?;
    Ok(Some(Registry::new(
        reg,
        &keys,
        &agent_addresses(config),
        config.max_services as usize,
    )))
}

struct Agent {
    config_path: PathBuf,
    config: Config,
    dataplane: Dataplane,
    registry: Option<Registry>,
    interfaces: Vec<InterfaceStatus>,
    /// Servers the operator drained (by name); not kept across restarts.
    drained: std::collections::BTreeSet<String>,
    checker: Rc<RefCell<Checker>>,
    /// Deletes expired flow entries on a thread of its own; stops with the agent.
    _sweeper: FlowSweeper,
}

/// How often expired flow entries are deleted from the map.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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

/// Most datagrams handled before the forwarding state is rebuilt and the answers are sent.
const BATCH: usize = 1024;

pub async fn run(config_path: &Path, socket: &Path) -> Result<()> {
    let config = Config::load(config_path)
        .map_err(|e| anyhow!("invalid configuration {}: {e}", config_path.display()))?;
    // Everything that can be checked is checked before the host is touched.
    let mut ifindexes = Vec::new();
    for (i, name) in config.interfaces.iter().enumerate() {
        ifindexes.push(
            sys::ifindex(name)
                .map_err(|e| anyhow!("invalid configuration: interfaces[{i}]: {e}"))?,
        );
    }
    let registry = registry(&config, config_path)?;
    let mut listeners = Vec::new();
    if let Some(r) = &registry {
        for a in agent_addresses(&config) {
            let addr = SocketAddr::new(a, r.port());
            let sock = UdpSocket::bind(addr).await.with_context(|| {
                format!("binding the registration socket {addr} (is agent_address an address of this host?)")
            })?;
            listeners.push(Rc::new(sock));
        }
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another agent is already answering on {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let mut host = HostChanges::default();
    // A router forwards; the kernel must also accept the tunnelled packets XDP hands it while
    // a neighbour is being resolved, whose source is the agent's own address.
    if config.agent_address.v4.is_some() {
        host.sysctl("net.ipv4.ip_forward", "1")?;
    }
    if config.agent_address.v6.is_some() {
        host.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    for name in &config.interfaces {
        host.sysctl(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
    }

    let mut dataplane = Dataplane::new(sizes(&config))?;
    dataplane.set_agent_addresses(config.agent_address.v4, config.agent_address.v6)?;
    dataplane.set_flow_timeouts(config.flow_timeouts)?;
    for &ifindex in &ifindexes {
        dataplane.add_tx_port(ifindex)?;
    }
    dataplane.apply(&desired(&config))?;
    let mut interfaces = Vec::new();
    for (name, &ifindex) in config.interfaces.iter().zip(&ifindexes) {
        dataplane.attach(name, config.xdp_mode)?;
        tracing::info!(
            "attached to {name} (ifindex {ifindex}) in {:?} XDP mode",
            config.xdp_mode
        );
        interfaces.push(InterfaceStatus {
            name: name.clone(),
            ifindex,
            xdp_mode: format!("{:?}", config.xdp_mode).to_lowercase(),
        });
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    log_services(&config);

    // Each registration socket feeds one queue; answers leave by the socket the update came in on.
    let (tx, mut rx) = mpsc::channel::<(usize, Vec<u8>, SocketAddr)>(BATCH);
    let local = tokio::task::LocalSet::new();
    for (i, sock) in listeners.iter().enumerate() {
        let sock = sock.clone();
        let tx = tx.clone();
        local.spawn_local(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match sock.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        if tx.send((i, buf[..n].to_vec(), from)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!("registration socket: {e}"),
                }
            }
        });
    }
    drop(tx);
    if registry.is_some() {
        let addrs: Vec<String> = listeners
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.to_string())
            .collect();
        tracing::info!("accepting binding updates on {}", addrs.join(", "));
    }
    tracing::info!(
        "agent ready: {} services, control socket {}, tables written by {}",
        config.services.len(),
        socket.display(),
        dataplane.table_write_path()
    );

    let sweeper = dataplane.spawn_sweeper(SWEEP_EVERY)?;
    let mut agent = Agent {
        config_path: config_path.to_path_buf(),
        config,
        dataplane,
        registry,
        interfaces,
        drained: Default::default(),
        checker: Rc::new(RefCell::new(Checker::new(Vec::new()))),
        _sweeper: sweeper,
    };
    agent
        .checker
        .borrow_mut()
        .set_checks(agent.config.all_checks());
    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<Transition>();
    // Without routing events the data path still follows the kernel, a tick later.
    let mut route_events = match RouteEvents::subscribe() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("{e:#}: cached next hops follow routing changes within about a second");
            None
        }
    };
    let why = local
        .run_until(async {
            let _checks = health::spawn(&agent.checker, health_tx);
            agent.republish();
            let mut hup = signal(SignalKind::hangup())?;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let stop = sys::shutdown_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    why = &mut stop => return why,
                    _ = hup.recv() => {
                        if let Err(e) = agent.reload() {
                            tracing::error!("reload refused, configuration unchanged: {e:#}");
                        }
                    }
                    Some(first) = rx.recv() => {
                        // Take what is queued, rebuild once, then answer: a server's BA
                        // means its traffic is already being forwarded.
                        let mut batch = vec![first];
                        while batch.len() < BATCH {
                            match rx.try_recv() {
                                Ok(d) => batch.push(d),
                                Err(_) => break,
                            }
                        }
                        let replies = agent.handle_datagrams(batch);
                        send_all(&listeners, replies).await;
                    }
                    Some(_) = health_rx.recv() => {
                        // Health changed (the checker logged it): take every pending
                        // change, then rebuild once.
                        while health_rx.try_recv().is_ok() {}
                        agent.republish();
                    }
                    changed = async { route_events.as_ref().expect("guarded").changed().await },
                        if route_events.is_some() => match changed {
                        // The data path's cached next hops are stale: it asks the FIB again.
                        Ok(()) => {
                            if let Err(e) = agent.dataplane.fib_changed() {
                                tracing::warn!("{e:#}");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(
                                "{e:#}: no more routing events; cached next hops follow \
                                 routing changes within about a second"
                            );
                            route_events = None;
                        }
                    },
                    _ = tick.tick() => {
                        let replies = agent.housekeeping();
                        send_all(&listeners, replies).await;
                    }
                    conn = listener.accept() => match conn {
                        Ok((stream, _)) => {
                            if let Err(e) = agent.serve(stream).await {
                                tracing::warn!("control connection: {e:#}");
                            }
                        }
                        Err(e) => tracing::warn!("control socket accept: {e}"),
                    },
                }
            }
        })
        .await?;
    tracing::info!("{why}: detaching");
    drop(listener);
    let _ = std::fs::remove_file(socket);
    // Dropping the data plane detaches the XDP program from every interface.
    drop(agent);
    host.undo();
    tracing::info!("agent stopped");
    Ok(())
}

/// Sends answers by the socket of the right family (the one the update arrived on, for BAs).
async fn send_all(listeners: &[Rc<UdpSocket>], replies: Vec<(Option<usize>, Reply)>) {
    for (via, r) in replies {
        let sock = via.and_then(|i| listeners.get(i)).or_else(|| {
            listeners
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == r.to.is_ipv4()))
        });
        let Some(sock) = sock else { continue };
        if let Err(e) = sock.send_to(&r.payload, r.to).await {
            tracing::warn!("sending to {}: {e}", r.to);
        }
    }
}

fn log_services(config: &Config) {
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
    /// operator drains applied, then selection (tiers, weights, conditions).
    fn desired(&self) -> Vec<DesiredService> {
        let mut plans = self.plans();
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
                    let seen = match checker.health(&t) {
                        Some(Health::Down) => Condition::Down,
                        Some(Health::Suspect) => Condition::Suspect,
                        _ => Condition::Up,
                    };
                    c.condition = c.condition.max(seen);
                }
            }
        }
        plans.iter().map(ServicePlan::to_desired).collect()
    }

    /// Configured services plus those the live bindings bring, before health and drains.
    fn plans(&self) -> Vec<ServicePlan> {
        let configured: Vec<ServicePlan> = desired(&self.config)
            .iter()
            .map(ServicePlan::from_desired)
            .collect();
        match &self.registry {
            Some(r) => r.plan(&configured),
            None => configured,
        }
    }

    /// Keeps the health checker's targets in line with the services' servers.
    fn update_targets(&mut self) {
        let plans = self.plans();
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
            .desired()
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

    fn republish(&mut self) {
        self.update_targets();
        let desired = self.desired();
        if let Err(e) = self.dataplane.apply(&desired) {
            tracing::error!("updating the forwarding maps failed: {e:#}");
        }
    }

    fn handle_datagrams(
        &mut self,
        batch: Vec<(usize, Vec<u8>, SocketAddr)>,
    ) -> Vec<(Option<usize>, Reply)> {
        let Some(registry) = self.registry.as_mut() else {
            return Vec::new();
        };
        let now = Instant::now();
        let wall = wire::ntp_now();
        let mut changed = false;
        let mut replies = Vec::new();
        for (via, payload, from) in batch {
            let outcome = registry.handle(&payload, from, now, wall);
            changed |= outcome.changed;
            if let Some(r) = outcome.reply {
                replies.push((Some(via), r));
            }
        }
        if changed {
            self.republish();
        }
        replies
    }

    fn housekeeping(&mut self) -> Vec<(Option<usize>, Reply)> {
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
        if expired || suspected || conditions_changed {
            self.republish();
        }
        requests.into_iter().map(|r| (None, r)).collect()
    }

    fn reload(&mut self) -> Result<()> {
        let new = Config::load(&self.config_path).map_err(|e| anyhow!("{e}"))?;
        let fixed = |c: &Config| {
            (
                c.interfaces.clone(),
                c.xdp_mode,
                c.agent_address.clone(),
                sizes(c),
                c.registration.as_ref().map(|r| r.port),
            )
        };
        if fixed(&new) != fixed(&self.config) {
            bail!("interfaces, xdp_mode, agent_address, ring_size, max_services, max_flows and registration.port only change on restart");
        }
        let new_registry = registry(&new, &self.config_path)?;
        self.config = new;
        self.checker
            .borrow_mut()
            .set_checks(self.config.all_checks());
        self.dataplane
            .set_flow_timeouts(self.config.flow_timeouts)?;
        self.registry = match (self.registry.take(), new_registry) {
            (Some(mut old), Some(new)) => {
                old.update_policy(new);
                Some(old)
            }
            (_, new) => new,
        };
        self.republish();
        log_services(&self.config);
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }

    fn status(&self) -> Result<Status> {
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
        })
    }

    async fn serve(&mut self, stream: UnixStream) -> Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(read).read_line(&mut line),
        )
        .await
        .context("client sent no request")??;
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(Request::Status) => match self.status() {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Ok(Request::Bindings) => match &self.registry {
                Some(r) => {
                    let counters = self.dataplane.reverse_counters();
                    if let Err(e) = &counters {
                        tracing::warn!("reading the reverse-tunnel counters: {e:#}");
                    }
                    Response::Bindings(r.report(Instant::now(), counters.ok().as_ref()))
                }
                None => Response::Error {
                    message: "registration is not enabled in the configuration".into(),
                },
            },
            Ok(Request::Flows) => match self.dataplane.flows() {
                Ok(flows) => Response::Flows { flows },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Ok(Request::Drain { server, undo }) => match self.drain(server.clone(), undo) {
                Ok(drained) => Response::Drained { server, drained },
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Ok(Request::Reload) => match self.reload() {
                Ok(()) => Response::Reloaded,
                Err(e) => {
                    tracing::error!("reload refused, configuration unchanged: {e:#}");
                    Response::Error {
                        message: format!("reload refused, configuration unchanged: {e:#}"),
                    }
                }
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        Ok(())
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
