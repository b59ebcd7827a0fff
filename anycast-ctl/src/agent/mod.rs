//! `anycast-ctl agent`: loads the data path, keeps the maps in line with the configuration
//! and the servers' bindings, answers the control socket and the binding protocol. The data
//! path outlives it (pinned maps and links, `instance.rs`): SIGINT/SIGTERM detach and
//! remove everything, SIGUSR2 hands off to the next agent, which adopts what it left.
//!
//! One task owns the agent's state ([`state::Agent`]: bindings, candidates, the data plane);
//! everything that waits on the outside world runs beside it and talks to it by typed
//! messages. The owner never waits on a socket: replies go to bounded queues (dropped and
//! counted when full), control connections are read and written by their own tasks.
//!
//! ```text
//! registration sockets (v4, v6)                                  +-------------+
//!   receiver task per socket --- Datagram (bounded) ------------>|             |
//!   sender task per socket  <--- Reply (bounded, try_send) ------|             |
//! control socket                                                 |             |
//!   accept task -> task per connection -- ControlRequest ------->|    owner    |--> BPF maps
//!     (own timeouts)                   <-- Answer (one-shot) ----|    task     |    (Dataplane)
//! relay sockets (v4, v6; peer agents)                             |             |
//!   receiver task per socket --- Datagram (bounded) ------------>|             |
//!   sender task per socket  <--- envelope (bounded, try_send) ---|             |
//! health checker task -- Transition ---------------------------->|  (state.rs) |
//! routing events task (rtnetlink) -- RoutesChanged ------------->|             |
//! SIGHUP, SIGINT/SIGTERM/SIGUSR2, 50 ms housekeeping tick ------>|             |
//! BGP task (BIRD's control socket) <-- Want/Leave (unbounded) ---|             |
//!   include file, `configure`,     --- Seen (watch) ------------>|             |
//!   liveness TUN, `show protocols`                               +-------------+
//!
//! flow sweeper thread: its own map handles, reads FLOW_CONFIG, deletes expired flows;
//!   with a relay also finds the flow-pin exceptions (PinsFound, bounded, to the owner,
//!   which relays them) and installs the pins peers send (PinWork, bounded, from the owner)
//! flow listing: a snapshot from the owner, read on a blocking thread
//! metrics thread (its own runtime; HTTP): reads the snapshot the owner publishes once a
//!   second (from the 50 ms tick) and the live metrics (atomics); never sends the owner anything
//! ```
mod control;
mod instance;
mod metrics;
mod pins;
mod registration_io;
mod route_events;
mod routing;
mod shared_health;
mod state;

use std::{cell::RefCell, net::SocketAddr, path::Path, rc::Rc, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use tokio::{
    net::UdpSocket,
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
};

use self::{
    control::ControlRequest,
    instance::{Instance, Stop},
    registration_io::{Datagram, REPLY_QUEUE},
    route_events::RouteEvents,
    state::{agent_addresses, log_services, registry, sizes, Agent},
};
use crate::{
    config::Config,
    control_socket::InterfaceStatus,
    dataplane::{show_tag, Attached, Dataplane},
    health::{self, Checker, Transition},
    host::{self, HostChanges},
    model::ServicePlan,
};

/// How often expired flow entries are deleted from the map.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Most datagrams handled before the forwarding state is rebuilt and the answers are sent.
const BATCH: usize = 1024;

/// Envelopes waiting for one relay socket: a snapshot of this many bindings goes out at
/// once; beyond, envelopes are dropped and counted, and the digests ask again.
const RELAY_QUEUE: usize = 4096;

/// Scans of the flow table's exceptions waiting for the owner (each holds all of them).
const PINS_FOUND_QUEUE: usize = 4;

/// Control requests waiting for the owner.
const CONTROL_QUEUE: usize = 16;

pub async fn run(config_path: &Path, socket: &Path) -> Result<()> {
    let config = Config::load(config_path)
        .map_err(|e| anyhow!("invalid configuration {}: {e}", config_path.display()))?;
    // Everything that can be checked is checked before the host is touched.
    let mut ifindexes = Vec::new();
    for (i, name) in config.interfaces.iter().enumerate() {
        ifindexes.push(
            host::ifindex(name)
                .map_err(|e| anyhow!("invalid configuration: interfaces[{i}]: {e}"))?,
        );
    }
    let registry = registry(&config, config_path)?;
    let permissions = control::permissions(
        config
            .control_access()
            .map_err(|e| anyhow!("invalid configuration: {e}"))?,
    );
    for w in config.warnings() {
        tracing::warn!("configuration: {w}");
    }
    let mut listeners = Vec::new();
    if let Some(r) = &registry {
        // The discovery addresses too: requests and binding updates sent to the address all
        // agents share arrive there, and the answer leaves from it.
        let discovery = state::discovery(&config).addresses;
        for a in agent_addresses(&config).into_iter().chain(discovery) {
            let addr = SocketAddr::new(a, r.port());
            let sock = UdpSocket::bind(addr).await.with_context(|| {
                format!("binding the registration socket {addr} (is it an address of this host? agent_address and registration.discovery_address must be)")
            })?;
            let bytes = config
                .registration
                .as_ref()
                .map_or(8 << 20, |r| r.limits.socket_buffer_bytes);
            registration_io::size_buffers(&sock, bytes as usize);
            listeners.push(Rc::new(sock));
        }
    }
    // Binding sync with peer agents: a socket per agent address, keys read and checked now.
    let mut relay = None;
    let mut relay_sockets = Vec::new();
    if let Some((reg, cfg)) = config
        .registration
        .as_ref()
        .and_then(|r| r.relay.as_ref().map(|x| (r, x)))
    {
        let keys = config
            .load_relay_keys(config_path)
            .map_err(|e| anyhow!("invalid configuration: {e}"))?;
        for a in agent_addresses(&config) {
            let addr = SocketAddr::new(a, cfg.port);
            let sock = UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the relay socket {addr}"))?;
            registration_io::size_buffers(&sock, reg.limits.socket_buffer_bytes as usize);
            relay_sockets.push(Rc::new(sock));
        }
        relay = Some(crate::relay::Relay::new(
            cfg,
            &keys,
            reg.replay_window as u64,
            anycast_common::wire::ntp_now(),
        ));
    }
    // The metrics endpoint: bound now, so a taken or foreign address fails the start before
    // the host changes; it serves an empty snapshot until the owner publishes one.
    let metrics = match &config.metrics {
        Some(m) => {
            let addr = m
                .address()
                .map_err(|e| anyhow!("invalid configuration: {e}"))?;
            let (registry, publisher) = metrics::registry();
            let bound = metrics::spawn(addr, registry, publisher.live.clone())?;
            tracing::info!("serving metrics at http://{bound}/metrics");
            Some(publisher)
        }
        None => None,
    };
    crate::control_server::prepare(socket, "agent").await?;

    let name = instance::instance_name(&config, socket);
    let (state_dir, pin_dir) = instance::directories(&config, &name);
    let instance = Instance::open(&name, state_dir, pin_dir)?;
    // The dead man's switch first: held from here on, down until BIRD holds this agent's
    // configuration (routing.rs).
    let liveness = match &config.routing {
        Some(r) => Some(crate::routing::tun::Liveness::open(&r.liveness_device)?),
        None => None,
    };
    // Pinned maps an earlier controller left are adopted with their record, or refused
    // (with what to do) before anything changes.
    let sizes = sizes(&config);
    let record = instance.read_maps_record()?;
    let mut adopting = instance.has_pinned_maps();
    if adopting && record.is_none() && instance.has_no_pinned_links() {
        // Pinned before a first record was written, and nothing forwards with them.
        tracing::info!("removing pinned maps an agent left before it was attached");
        instance.remove_pinned()?;
        adopting = false;
    }
    if adopting {
        crate::dataplane::check_layout(
            sizes,
            &instance.maps_dir(),
            record.as_ref().map(|r| r.layout_version),
        )?;
    }
    let mut host_changes =
        HostChanges::with_originals_file(instance.file(instance::SYSCTL_ORIGINALS))?;
    // A failed start leaves an adopted data path as it was, sysctls included.
    host_changes.keep_on_drop = adopting;
    // A router forwards; the kernel must also accept the tunnelled packets XDP hands it while
    // a neighbour is being resolved, whose source is the agent's own address.
    if config.agent_address.v4.is_some() {
        host_changes.sysctl("net.ipv4.ip_forward", "1")?;
    }
    if config.agent_address.v6.is_some() {
        host_changes.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    for name in &config.interfaces {
        host_changes.sysctl(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
    }
    let set_up = (|| -> Result<_> {
        instance.make_pin_dirs()?;
        let mut dataplane = Dataplane::open(sizes, Some(&instance.maps_dir()))?;
        let mut drained = std::collections::BTreeSet::new();
        let mut adopted_flows = None;
        if let (true, Some(r)) = (adopting, record) {
            adopted_flows = Some(dataplane.adopt(r.installed)?);
            drained = r.drained.into_iter().collect();
        }
        dataplane.set_agent_addresses(config.agent_address.v4, config.agent_address.v6)?;
        dataplane.set_reverse_tunnel(reverse_tunnel_configured(&config))?;
        dataplane.set_icmp(config.answer_ping, config.forward_icmp_errors)?;
        dataplane.set_too_big_answers(config.answer_too_big, config.too_big_answers_per_second)?;
        dataplane.set_unseen_pins(config.unseen_pins_per_second)?;
        dataplane.set_flow_timeouts(config.flow_timeouts)?;
        for &ifindex in &ifindexes {
            dataplane.add_tx_port(ifindex)?;
        }
        if adopted_flows.is_none() {
            let configured: Vec<_> = config
                .service_plans()
                .iter()
                .map(ServicePlan::select)
                .collect();
            dataplane.apply(&configured)?;
        }
        // Adopting, the maps keep what the last controller published until the bindings
        // are restored and the first rebuild runs (in the loop below): no window without
        // servers.
        let mut interfaces = Vec::new();
        for (name, &ifindex) in config.interfaces.iter().zip(&ifindexes) {
            let how = dataplane.attach_pinned(name, config.xdp_mode, &instance.links_dir())?;
            let mode = config.xdp_mode;
            // The tags say which build runs: equal for the same build, not for another.
            match how {
                Attached::New { tag } => tracing::info!(
                    "attached to {name} (ifindex {ifindex}) in {mode:?} XDP mode, program tag {}",
                    show_tag(tag)
                ),
                Attached::Replaced { old, new } => tracing::info!(
                    "replaced the program of the pinned link on {name} (ifindex {ifindex}) in \
                     {mode:?} XDP mode: program tag {} -> {}",
                    show_tag(old),
                    show_tag(new)
                ),
            }
            interfaces.push(InterfaceStatus {
                name: name.clone(),
                ifindex,
                xdp_mode: format!("{:?}", config.xdp_mode).to_lowercase(),
            });
        }
        Ok((dataplane, interfaces, adopted_flows, drained))
    })();
    let (dataplane, interfaces, adopted_flows, drained) = match set_up {
        Ok(v) => v,
        Err(e) => {
            // A fresh start that failed half-way leaves nothing attached or pinned.
            if !adopting {
                let _ = instance.remove_pinned();
            }
            return Err(e);
        }
    };
    let listener = crate::control_server::bind(socket, 0o660, permissions.group)?;
    log_services(&config);

    let local = tokio::task::LocalSet::new();
    let (datagram_tx, mut datagram_rx) = mpsc::channel::<Datagram>(BATCH);
    registration_io::spawn_receivers(&local, &listeners, datagram_tx);
    let senders = listeners
        .iter()
        .map(|s| registration_io::spawn_sender(&local, s.clone(), REPLY_QUEUE))
        .collect();
    if registry.is_some() {
        let addrs: Vec<String> = listeners
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.to_string())
            .collect();
        tracing::info!("accepting binding updates on {}", addrs.join(", "));
    }
    let (relay_tx, mut relay_rx) = mpsc::channel::<Datagram>(BATCH);
    registration_io::spawn_receivers(&local, &relay_sockets, relay_tx);
    let relay_senders = relay_sockets
        .iter()
        .map(|s| registration_io::spawn_sender(&local, s.clone(), RELAY_QUEUE))
        .collect();
    if let Some(r) = &relay {
        tracing::info!("relaying bindings to peer agents on port {}", r.port());
    }
    let (control_tx, mut control_rx) = mpsc::channel::<ControlRequest>(CONTROL_QUEUE);
    control::spawn(&local, listener, control_tx, permissions);
    let mut routes_rx = spawn_route_events(&local);
    let routing = config
        .routing
        .clone()
        .zip(liveness)
        .map(|(r, l)| routing::RoutingHandle::spawn(&local, r, l));
    // Caught from before "agent ready": a signal sent as soon as that line is seen would
    // otherwise meet the default action (death: no full stop, no handoff).
    let mut hup = signal(SignalKind::hangup())?;
    let stop = StopSignals::new()?;
    tracing::info!(
        "agent ready: {} services, control socket {}, tables written by {}",
        config.services.len(),
        socket.display(),
        dataplane.table_write_path()
    );
    crate::service_manager::notify(&format!(
        "READY=1\nSTATUS=agent ready: {} services",
        config.services.len()
    ));

    // Flows that move between agents: the sweeper's thread finds the exceptions and
    // installs the peers' pins; the owner relays.
    let (pins_tx, mut pins_rx) = mpsc::channel::<crate::dataplane::PinsFound>(PINS_FOUND_QUEUE);
    let (pins, pins_worker) = match &relay {
        Some(_) => {
            let (handle, worker) = crate::dataplane::pins_channel(Box::new(move |found| {
                // Full: the owner is behind; the next scan finds them again.
                let _ = pins_tx.try_send(found);
            }));
            (Some(pins::FlowPins::new(handle)), Some(worker))
        }
        None => (None, None),
    };
    let sweeper = dataplane.spawn_sweeper_with(SWEEP_EVERY, pins_worker)?;
    let mut agent = Agent {
        config_path: config_path.to_path_buf(),
        config,
        dataplane,
        registry,
        interfaces,
        drained,
        instance,
        saved_record: None,
        adopted_flows,
        checker: Rc::new(RefCell::new(Checker::new(Vec::new()))),
        senders,
        _sweeper: sweeper,
        relay,
        relay_senders,
        pins,
        routing,
        own_down: Default::default(),
        down_inputs: Default::default(),
        metrics,
    };
    agent
        .checker
        .borrow_mut()
        .set_checks(agent.config.all_checks());
    if let Some(m) = &agent.metrics {
        let live = m.live.clone();
        agent.checker.borrow_mut().observer = Some(Box::new(move |o| match o {
            health::Observed::Result { method, ok, took } => live.check_done(method, ok, took),
            health::Observed::Transition { method, to } => {
                live.health_transition(method, &to.to_string())
            }
        }));
    }
    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<Transition>();
    let why = local
        .run_until(async {
            let _checks = health::spawn(&agent.checker, health_tx);
            let requests = agent.restore_bindings();
            agent.republish();
            agent.send(requests);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let stop = stop.recv();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    why = &mut stop => return why,
                    _ = hup.recv() => {
                        if let Err(e) = agent.reload() {
                            tracing::error!("reload refused, configuration unchanged: {e:#}");
                        }
                    }
                    Some(first) = datagram_rx.recv() => {
                        // Take what is queued, rebuild once, then answer: a server's BA
                        // means its traffic is already being forwarded.
                        let mut batch = vec![first];
                        while batch.len() < BATCH {
                            match datagram_rx.try_recv() {
                                Ok(d) => batch.push(d),
                                Err(_) => break,
                            }
                        }
                        let replies = agent.handle_datagrams(batch);
                        agent.send(replies);
                    }
                    Some(first) = relay_rx.recv() => {
                        let mut batch = vec![first];
                        while batch.len() < BATCH {
                            match relay_rx.try_recv() {
                                Ok(d) => batch.push(d),
                                Err(_) => break,
                            }
                        }
                        agent.handle_relay_datagrams(batch);
                    }
                    Some(request) = control_rx.recv() => {
                        let answer = agent.answer(request.request);
                        // The connection may have gone meanwhile: nothing to do then.
                        let _ = request.answer.send(answer);
                    }
                    Some(found) = pins_rx.recv() => agent.send_pins(found),
                    Some(_) = health_rx.recv() => {
                        // Health changed (the checker logged it): take every pending
                        // change, then rebuild once.
                        while health_rx.try_recv().is_ok() {}
                        agent.republish();
                    }
                    Some(()) = routes_rx.recv() => {
                        // The data path's cached next hops are stale: it asks the FIB again.
                        if let Err(e) = agent.dataplane.fib_changed() {
                            tracing::warn!("{e:#}");
                        }
                    }
                    _ = tick.tick() => {
                        let replies = agent.housekeeping();
                        agent.send(replies);
                        agent.publish_metrics();
                    }
                }
            }
        })
        .await?;
    let (signal, stop) = why;
    tracing::info!("{signal}: {}", stop.describe());
    crate::service_manager::notify(&format!("STOPPING=1\nSTATUS={signal}: {}", stop.describe()));
    if let Some(r) = agent.routing.take() {
        // Withdrawn while the data path still forwards what is in flight.
        let withdraw = match stop {
            Stop::Full => true,
            Stop::Handoff => agent
                .config
                .routing
                .as_ref()
                .is_some_and(|c| c.on_handoff == crate::config::OnHandoff::Withdraw),
        };
        local.run_until(r.leave(withdraw)).await;
    }
    drop(local);
    let _ = std::fs::remove_file(socket);
    match stop {
        Stop::Full => {
            agent.dataplane.detach_all();
            let Agent {
                dataplane,
                instance,
                ..
            } = agent;
            // The maps go with their last reference: the pins, then this process's.
            if let Err(e) = instance.remove_pinned() {
                tracing::warn!("{e:#}");
            }
            drop(dataplane);
            instance.remove_files(&[instance::MAPS_RECORD]);
            host_changes.undo();
            tracing::info!("agent stopped");
        }
        Stop::Handoff => {
            drop(agent);
            host_changes.keep();
            tracing::info!("agent stopped; the data path keeps forwarding");
        }
    }
    Ok(())
}

/// The signals that stop the agent: SIGINT or SIGTERM stop fully, SIGUSR2 hands off. Caught
/// from `new` on; one that comes before `recv` waits for it.
struct StopSignals {
    term: Signal,
    int: Signal,
    usr2: Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn recv(mut self) -> Result<(&'static str, Stop)> {
        Ok(tokio::select! {
            _ = self.term.recv() => ("SIGTERM", Stop::Full),
            _ = self.int.recv() => ("SIGINT", Stop::Full),
            _ = self.usr2.recv() => ("SIGUSR2", Stop::Handoff),
        })
    }
}

/// Removes what a controller of this configuration's instance left behind after a crash
/// (or a handoff no agent took over): detaches its pinned links, removes its pinned maps,
/// restores the original sysctl values, removes its state files but the bindings (their
/// replay state). Refused while an agent of the instance runs.
pub fn cleanup(config_path: &Path, socket: &Path) -> Result<()> {
    let config = Config::load(config_path)
        .map_err(|e| anyhow!("invalid configuration {}: {e}", config_path.display()))?;
    let name = instance::instance_name(&config, socket);
    let (state_dir, pin_dir) = instance::directories(&config, &name);
    let instance = Instance::open(&name, state_dir, pin_dir)?;
    let mut host_changes =
        HostChanges::with_originals_file(instance.file(instance::SYSCTL_ORIGINALS))?;
    let removed = instance.remove_pinned()?;
    instance.remove_files(&[instance::MAPS_RECORD]);
    if let Some(r) = &config.routing {
        // A handoff that kept its routes left the liveness device; removing it withdraws
        // them.
        if crate::routing::tun::remove_left_over(&r.liveness_device)? {
            tracing::info!("removed the liveness device {}", r.liveness_device);
        }
    }
    host_changes.undo();
    tracing::info!("instance {name}: removed {removed} pinned objects");
    println!("instance {name}: removed {removed} pinned objects");
    Ok(())
}

/// The control socket: mode 0660 whatever the umask, group `group`. Set after `bind` (the
/// umask is process-wide, and other threads run): a connection made in between is still
/// checked by its peer credentials, request by request (control.rs).
/// Routing events on a task of their own: one `RoutesChanged` (a unit message) per batch,
/// coalesced while the owner has not taken the last one. Without a subscription (or after
/// it fails) the data path still follows the kernel, a tick of the flow clock later.
fn spawn_route_events(local: &tokio::task::LocalSet) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let events = match RouteEvents::subscribe() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("{e:#}: cached next hops follow routing changes within about a second");
            // Keep the channel open, so the owner does not see it end.
            local.spawn_local(async move {
                let _tx = tx;
                std::future::pending::<()>().await
            });
            return rx;
        }
    };
    local.spawn_local(async move {
        loop {
            match events.changed().await {
                Ok(()) => {
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(()) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "{e:#}: no more routing events; cached next hops follow routing \
                         changes within about a second"
                    );
                    // Keep the channel open, so the owner does not see it end.
                    std::future::pending::<()>().await;
                }
            }
        }
    });
    rx
}

/// Whether the data path may decapsulate servers' reverse-tunnelled SYN-ACKs: only when the
/// configuration asks for reverse-tunnel monitoring.
pub(super) fn reverse_tunnel_configured(config: &Config) -> bool {
    config
        .registration
        .as_ref()
        .is_some_and(|r| r.reverse_tunnel.is_some())
}
