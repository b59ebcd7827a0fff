//! `anycast-ctl client`: the client's daemon. Listens on UDP 4193 for servers' bindings,
//! checks each with [`Verifier`] (rate-limited: a check costs 150-200 us), writes the
//! accepted ones into the TC egress tunnel's map (`CLIENT_BINDINGS`) on the client's
//! interface, and removes them when they expire, are withdrawn (lifetime 0) or their server
//! stops answering. Without the daemon (or with no binding) the client's traffic goes
//! through the agent as always.
//!
//! Tasks: the receiver owns the socket and the rate limit and hands datagrams to the owner
//! (a bounded channel; a full channel drops, counted); the owner holds the [`Verifier`] and
//! the map and never waits on the network.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anycast_common::{client_tunnel, maps, programs};
use anyhow::{anyhow, Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{control, Accepted, Named, ServiceKey, Settings, Verifier};
use crate::{
    dataplane::{attach_tc_egress, load_object, Sizes},
    host::{self as sys, HostChanges},
};

pub struct ClientOptions {
    pub trust: Vec<PathBuf>,
    pub revocations: Option<PathBuf>,
    pub interface: String,
    /// This client's addresses (bindings for others are refused); empty: the interface's
    /// global addresses.
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    /// Most checks a second (a token bucket of one second's worth).
    pub checks_per_second: u32,
    /// A binding whose server sent nothing for this long while the tunnel carried packets
    /// ends (`ended_unanswered`): back to the agent.
    pub unanswered_timeout: Duration,
    pub window: u64,
    pub max_lifetime: u64,
    /// Written (JSON) every half second and at exit.
    pub status_file: Option<PathBuf>,
    /// The control socket (`control.rs`).
    pub control_socket: PathBuf,
}

/// The daemon's status file: the verifier's counters, the receiver's, the tunnel's, and the
/// bindings held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientStatus {
    pub counters: BTreeMap<String, u64>,
    pub tunnel: BTreeMap<String, u64>,
    pub bindings: Vec<StatusBinding>,
    #[serde(default)]
    pub revocations: control::RevocationStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusBinding {
    pub service: String,
    pub server: String,
    pub real: IpAddr,
    pub expires_in: i64,
}

/// The client's object is the agent's with its tables shrunk to nothing.
const CLIENT_SIZES: Sizes = Sizes {
    ring_size: 1,
    max_services: 1,
    max_flows: 1,
    max_preference_tables: 1,
    max_client_flows: anycast_common::MAX_CLIENT_FLOWS,
    max_server_udp_flows: 1,
};

/// Datagrams waiting for the owner; more are dropped (`dropped_queue_full`).
const QUEUE: usize = 256;
/// The largest datagram read: a binding with the largest certificate is under 1800 bytes.
const MAX_DATAGRAM: usize = 2048;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One second's worth of checks, refilled continuously.
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(per_second.max(1)),
            tokens: f64::from(per_second.max(1)),
            last: now,
        }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct ReceiverCounters {
    received: AtomicU64,
    dropped_rate_limited: AtomicU64,
    dropped_queue_full: AtomicU64,
}

/// Control socket requests and revocation list reads waiting for the owner.
const EVENTS: usize = 16;

pub async fn run(opts: ClientOptions) -> Result<()> {
    // The control socket's tasks are local ones (`control_server.rs`, shared with the agent).
    tokio::task::LocalSet::new()
        .run_until(run_daemon(opts))
        .await
}

async fn run_daemon(opts: ClientOptions) -> Result<()> {
    let anchors = opts
        .trust
        .iter()
        .map(|p| crate::pki::read_public_key(p))
        .collect::<Result<Vec<_>>>()?;
    if anchors.is_empty() {
        return Err(anyhow!("give at least one --trust operator key"));
    }
    sys::ifindex(&opts.interface).context("--interface")?;
    let addresses = if opts.addresses.is_empty() {
        sys::global_addresses(std::slice::from_ref(&opts.interface))?
    } else {
        opts.addresses.clone()
    };
    if addresses.is_empty() {
        return Err(anyhow!(
            "{} has no global address; give --address",
            opts.interface
        ));
    }
    let mut verifier = Verifier::new(Settings {
        anchors: anchors.clone(),
        addresses: addresses.clone(),
        window: opts.window,
        max_lifetime: opts.max_lifetime,
    });
    if let Some(path) = &opts.revocations {
        let list = crate::pki::read_revocation_list(path, &anchors)?;
        verifier
            .set_revocation_list(list)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }

    control::prepare(&opts.control_socket).await?;

    let mut ebpf = load_object(CLIENT_SIZES)?;
    let mut table: BpfHashMap<MapData, anycast_common::ServiceKey, anycast_common::ClientBinding> =
        BpfHashMap::try_from(
            ebpf.take_map(maps::CLIENT_BINDINGS)
                .ok_or_else(|| anyhow!("no CLIENT_BINDINGS map"))?,
        )?;
    let mut flows: BpfHashMap<MapData, anycast_common::FlowKey, u32> = BpfHashMap::try_from(
        ebpf.take_map(maps::CLIENT_FLOWS)
            .ok_or_else(|| anyhow!("no CLIENT_FLOWS map"))?,
    )?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        ebpf.take_map(maps::CLIENT_STATS)
            .ok_or_else(|| anyhow!("no CLIENT_STATS map"))?,
    )?;
    let mut host = HostChanges::default();
    // The tunnel asks the FIB for the route to the server as for a packet entering on lo,
    // which the kernel answers only for an interface that forwards; lo never receives a
    // packet for another host, so this forwards nothing.
    if addresses.iter().any(|a| a.is_ipv4()) {
        host.sysctl("net.ipv4.conf.lo.forwarding", "1")?;
    }
    if addresses.iter().any(|a| a.is_ipv6()) {
        host.sysctl("net.ipv6.conf.lo.forwarding", "1")?;
    }
    let result = async {
        host.add_clsact(&opts.interface)?;
        attach_tc_egress(&mut ebpf, programs::CLIENT_TUNNEL, &opts.interface)?;
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            opts.port,
        ))
        .await
        .with_context(|| format!("binding UDP port {}", opts.port))?;
        let received = Arc::new(ReceiverCounters::default());
        let (tx, mut rx) = mpsc::channel::<(Vec<u8>, IpAddr)>(QUEUE);
        let counters = received.clone();
        let rate = opts.checks_per_second;
        let receiver = tokio::spawn(async move {
            let mut bucket = TokenBucket::new(rate, Instant::now());
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                counters.received.fetch_add(1, Ordering::Relaxed);
                if !bucket.take(Instant::now()) {
                    counters
                        .dropped_rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let source = super::unmap(from.ip());
                if tx.try_send((buf[..n].to_vec(), source)).is_err() {
                    counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let (events_tx, mut events) = mpsc::channel::<control::Event>(EVENTS);
        control::serve(
            &opts.control_socket,
            events_tx.clone(),
            opts.revocations.clone(),
            anchors.clone(),
        )?;
        control::spawn_watcher(opts.revocations.clone(), anchors.clone(), events_tx)?;
        tracing::info!(
            "client ready: tunnel on {} egress, bindings on UDP port {}, addresses {:?}, \
             control socket {}",
            opts.interface,
            opts.port,
            addresses,
            opts.control_socket.display()
        );
        crate::service_manager::notify("READY=1\nSTATUS=client ready");

        // When each held binding's server last sent us something, and the tunnel's packet
        // count then.
        let mut heard: BTreeMap<ServiceKey, (Instant, u64)> = BTreeMap::new();
        let tunnelled = |stats: &PerCpuArray<MapData, u64>| -> u64 {
            stats
                .get(&client_tunnel::TUNNELLED, 0)
                .map_or(0, |v| v.iter().sum::<u64>())
                + stats
                    .get(&client_tunnel::TUNNELLED_RESOLVING, 0)
                    .map_or(0, |v| v.iter().sum::<u64>())
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let signal = sys::shutdown_signal();
        tokio::pin!(signal);
        let mut refused_logged = Instant::now() - Duration::from_secs(10);
        let why = loop {
            tokio::select! {
                why = &mut signal => break why?,
                Some((payload, source)) = rx.recv() => {
                    let now = now_secs();
                    match verifier.check(&payload, source, now) {
                        Ok(Accepted::Bound { key, binding, named }) => {
                            // Before the binding is in place: its first packets already
                            // find the connections it covers and those it must not move.
                            keep_udp_on_agent(&mut flows, &key);
                            write_named(&mut flows, &key, &named, binding.generation);
                            match super::datapath_entry(&key, &binding, &addresses) {
                                Some((k, v)) => {
                                    if let Err(e) = table.insert(k, v, 0) {
                                        tracing::warn!("writing the binding for {key}: {e}");
                                    } else {
                                        tracing::info!(
                                            "bound {key} to {} at {} (certificate {})",
                                            binding.server, binding.real, binding.serial
                                        );
                                    }
                                }
                                None => tracing::warn!(
                                    "binding for {key}: no own address of {}'s family",
                                    binding.real
                                ),
                            }
                            heard.insert(key, (Instant::now(), tunnelled(&stats)));
                        }
                        Ok(Accepted::Refreshed { key, generation, named, .. }) => {
                            write_named(&mut flows, &key, &named, generation);
                            heard.insert(key, (Instant::now(), tunnelled(&stats)));
                        }
                        Ok(Accepted::Withdrawn { key }) => {
                            let _ = table.remove(&datapath_key(&key));
                            heard.remove(&key);
                            tracing::info!("{key}: withdrawn by its server, back to the agent");
                        }
                        Ok(Accepted::NothingToWithdraw { .. }) => {}
                        Err(e) => {
                            // Floods of forgeries: one line per 10 s, the counters say the rest.
                            if refused_logged.elapsed() >= Duration::from_secs(10) {
                                refused_logged = Instant::now();
                                tracing::warn!("refused a binding from {source}: {e}");
                            }
                        }
                    }
                }
                Some(event) = events.recv() => {
                    let status = |v: &Verifier| status(v, &received, &stats);
                    for key in control::handle(event, &mut verifier, status) {
                        let _ = table.remove(&datapath_key(&key));
                        heard.remove(&key);
                    }
                }
                _ = tick.tick() => {
                    for key in verifier.expire(now_secs()) {
                        let _ = table.remove(&datapath_key(&key));
                        heard.remove(&key);
                        tracing::info!("{key}: binding expired, back to the agent");
                    }
                    // A server that stopped answering: the tunnel carried packets since its
                    // last message and it has been silent for the timeout.
                    let sent_now = tunnelled(&stats);
                    let silent: Vec<ServiceKey> = heard
                        .iter()
                        .filter(|(_, (at, sent))| {
                            at.elapsed() >= opts.unanswered_timeout && sent_now > *sent
                        })
                        .map(|(k, _)| *k)
                        .collect();
                    for key in silent {
                        verifier.forget(&key);
                        let _ = table.remove(&datapath_key(&key));
                        heard.remove(&key);
                        tracing::warn!(
                            "{key}: the server sent nothing for {:?} while the tunnel carried \
                             packets: back to the agent",
                            opts.unanswered_timeout
                        );
                    }
                    if let Some(path) = &opts.status_file {
                        write_status(path, &verifier, &received, &stats);
                    }
                }
            }
        };
        receiver.abort();
        if let Some(path) = &opts.status_file {
            write_status(path, &verifier, &received, &stats);
        }
        tracing::info!("{why}: client stopping ({})", summary(&verifier, &received));
        Ok::<(), anyhow::Error>(())
    }
    .await;
    drop(ebpf);
    host.undo();
    let _ = std::fs::remove_file(&opts.control_socket);
    result
}

/// The connections the server named go with the binding (`generation`).
fn write_named(
    flows: &mut BpfHashMap<MapData, anycast_common::FlowKey, u32>,
    key: &ServiceKey,
    named: &Named,
    generation: u32,
) {
    let Some(client) = named.client else {
        return;
    };
    for &(client_port, service_port) in &named.ports {
        let k = super::flow_key(
            client,
            client_port,
            key.anycast,
            service_port,
            named.protocol,
        );
        if let Err(e) = flows.insert(k, generation, 0) {
            tracing::warn!("{key}: moving the connection from port {client_port}: {e}");
        }
    }
}

/// The client's connected UDP sockets to a UDP service (or a whole address) that were
/// running before its binding: marked generation 0, so they stay on the agent's path (a
/// UDP flow has no opening; unmarked, the tunnel would take it for a new one). Only where
/// no entry is (`BPF_NOEXIST`): a flow that already goes direct keeps going.
fn keep_udp_on_agent(
    flows: &mut BpfHashMap<MapData, anycast_common::FlowKey, u32>,
    key: &ServiceKey,
) {
    const BPF_NOEXIST: u64 = 1;
    if key.protocol != anycast_common::PROTO_UDP && key.protocol != 0 {
        return;
    }
    for path in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for (own, own_port, service_port) in super::connected_udp(&text, key) {
            let k = super::flow_key(
                own,
                own_port,
                key.anycast,
                service_port,
                anycast_common::PROTO_UDP,
            );
            let _ = flows.insert(k, 0, BPF_NOEXIST);
        }
    }
}

fn datapath_key(key: &ServiceKey) -> anycast_common::ServiceKey {
    anycast_common::ServiceKey::new(key.anycast, key.protocol, key.port)
}

fn status(
    verifier: &Verifier,
    received: &ReceiverCounters,
    stats: &PerCpuArray<MapData, u64>,
) -> ClientStatus {
    let mut counters = verifier.counters().clone();
    for (name, c) in [
        ("received", &received.received),
        ("dropped_rate_limited", &received.dropped_rate_limited),
        ("dropped_queue_full", &received.dropped_queue_full),
    ] {
        counters.insert(name.into(), c.load(Ordering::Relaxed));
    }
    let tunnel = client_tunnel::NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = stats
                .get(&(i as u32), 0)
                .map_or(0, |v| v.iter().sum::<u64>());
            (n.to_string(), v)
        })
        .collect();
    let now = now_secs() as i64;
    let bindings = verifier
        .bindings()
        .iter()
        .map(|(k, b)| StatusBinding {
            service: k.to_string(),
            server: b.server.clone(),
            real: b.real,
            expires_in: b.expires as i64 - now,
        })
        .collect();
    ClientStatus {
        counters,
        tunnel,
        bindings,
        revocations: control::revocation_status(verifier),
    }
}

fn summary(verifier: &Verifier, received: &ReceiverCounters) -> String {
    let mut parts: Vec<String> = verifier
        .counters()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.push(format!(
        "received={} dropped_rate_limited={}",
        received.received.load(Ordering::Relaxed),
        received.dropped_rate_limited.load(Ordering::Relaxed)
    ));
    parts.join(" ")
}

fn write_status(
    path: &std::path::Path,
    verifier: &Verifier,
    received: &ReceiverCounters,
    stats: &PerCpuArray<MapData, u64>,
) {
    let s = status(verifier, received, stats);
    let Ok(text) = serde_json::to_string_pretty(&s) else {
        return;
    };
    // Written aside and renamed: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_second_of_checks_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        let taken = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(taken, 100);
        assert!(!b.take(t0));
        // 50 ms later: 5 more.
        let t1 = t0 + Duration::from_millis(50);
        let more = (0..1000).filter(|_| b.take(t1)).count();
        assert_eq!(more, 5);
    }
}
