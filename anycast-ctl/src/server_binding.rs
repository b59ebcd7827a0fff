//! Route optimization, the server's side (`anycast-ctl server --certificate --signing-key`):
//! a client that reached this server through the agent is sent a signed binding ("for this
//! anycast service, reach me at my real address", with the operator's certificate as the
//! proof that this server may answer for the address), so its later packets come here
//! directly (the patent's first embodiment: claims 1 and 3). On SIGTERM each bound client is
//! sent lifetime 0 (claim 15) and goes back to the agent.
//!
//! New clients are found by reading the kernel's TCP socket table (`/proc/net/tcp`,
//! `/proc/net/tcp6`) every [`POLL`]: a socket in SYN-RECV, ESTABLISHED or a closing state
//! (TIME-WAIT lasts 60 s, so short connections are seen) whose local address is one of our
//! anycast addresses is a client of that service. That is the first SYN-ACK
//! give or take one poll. The table of clients is bounded ([`MAX_CLIENTS`]), and so are
//! the sends per poll.
//!
//! UDP services have no per-client socket: their clients are found in the decapsulator's
//! `SERVER_UDP_FLOWS` (every UDP flow it handed to the stack for a served address, with when
//! it was first and last seen), read every [`POLL`] too ([`udp_connections_in`]). A UDP flow
//! is a client's connection once it lasted [`UDP_SEEN_REFRESH_NS`] (two datagrams at least
//! that far apart: a spoofed single datagram binds nobody) and while it sent something in the
//! last [`UDP_IDLE`]; flows idle longer are deleted from the map.
//!
//! A multi-homed server (claims 5 and 10): every [`POLL`] the addresses the host can send
//! from are read too ([`crate::host::usable_addresses`]: on an interface up and running).
//! When the real address the bindings of a family point at is no longer among them (its
//! link lost its carrier or was set down, or the address was removed), the bindings move
//! to the first other usable real address of that family the certificate covers: every
//! client whose binding may still be held is sent a new one at once (sequence number + 1,
//! the same lifetime), from the new address. The bindings stay there when the failed link
//! comes back (no move back: the same server either way, and a flapping link that is not
//! the one in use moves nobody); they move again only when the address in use fails in
//! turn.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anycast_common::{
    pki::{Certificate, SigningKey},
    wire::{self, Body, Message, Options, ServiceSelector},
    words_addr, FlowKey, UdpSeen, PROTO_TCP, PROTO_UDP, UDP_SEEN_REFRESH_NS,
};
use anyhow::{anyhow, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use tokio::{net::UdpSocket, sync::watch};

use crate::{
    registration::server::{bind_socket, socket_rows},
    server::AnycastSpec,
};

/// How often the socket table is read.
pub const POLL: Duration = Duration::from_millis(200);
/// Clients remembered at once; new ones beyond are not bound (counted).
pub const MAX_CLIENTS: usize = 4096;
/// Bindings sent per poll at most (new and refreshed).
pub const MAX_SENDS_PER_POLL: usize = 256;
/// `SERVER_UDP_FLOWS` holding at least this many flows is read every
/// [`UDP_FULL_READ_POLLS`] polls only: reading costs about 4 us a flow (a full map of 4096,
/// 14-19 ms), so a flood that fills it costs at most 2% of a core instead of 9%.
pub const UDP_BUSY_FLOWS: usize = 1024;
pub const UDP_FULL_READ_POLLS: u32 = 5;
/// A UDP flow counts as an open connection of its client while it sent something this
/// recently (conntrack's UDP timeout); older entries of `SERVER_UDP_FLOWS` are deleted.
pub const UDP_IDLE: Duration = Duration::from_secs(30);
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

#[derive(Clone)]
pub struct BindingOptions {
    pub certificate: Certificate,
    pub key: SigningKey,
    pub anycast: Vec<AnycastSpec>,
    /// Real addresses the bindings may point at, in order of preference: one per family is
    /// in use, at first the first the certificate covers; when it becomes unusable, the
    /// first other usable one the certificate covers.
    pub real: Vec<IpAddr>,
    /// The binding's lifetime; refreshed at a third of it while the client has a connection.
    pub lifetime: Duration,
    pub port: u16,
}

/// One client of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seen {
    pub client: IpAddr,
    pub anycast: IpAddr,
    /// The service: IP protocol and port (0: every port).
    pub service: (u8, u16),
}

/// One connection of a client: `Seen` and (client port, service port).
pub type Connection = (Seen, (u16, u16));

struct Entry {
    seq: u16,
    sent: Option<Instant>,
    seen: Instant,
    /// The client's connections in the last poll: (client port, service port).
    ports: BTreeSet<(u16, u16)>,
    /// The connections the last binding sent named.
    named: BTreeSet<(u16, u16)>,
}

/// The clients of our anycast services in a `/proc/net/tcp{,6}` text: sockets of accepted
/// connections (any state but LISTEN, SYN-SENT and CLOSE) whose local address is an anycast address of `specs`,
/// with the service the binding names (the spec's, or the local port's for a whole
/// address).
pub fn clients_in(proc_text: &str, specs: &[AnycastSpec]) -> Vec<Seen> {
    let mut out: Vec<Seen> = connections_in(proc_text, specs)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    out.dedup();
    out
}

/// As [`clients_in`], one entry per connection, with its (client port, service port): the
/// connections a binding names, so they move with it (a client's other connections to
/// the service, which the agent may have given to another server, stay on its path).
pub fn connections_in(proc_text: &str, specs: &[AnycastSpec]) -> Vec<Connection> {
    let mut out = Vec::new();
    for row in socket_rows(proc_text) {
        // Any state of a connection that was accepted: SYN-RECV (03) and ESTABLISHED (01),
        // and the closing ones (TIME-WAIT lasts 60 s), so a connection shorter than a poll is
        // seen too. Not LISTEN (0A), SYN-SENT (02, ours) or CLOSE (07).
        if matches!(row.state, "0A" | "02" | "07") {
            continue;
        }
        let ((l_addr, l_port), (r_addr, r_port)) = (row.local, row.remote);
        let service = specs.iter().find_map(|s| {
            if s.address != l_addr {
                return None;
            }
            match s.selector {
                None => Some((PROTO_TCP, l_port)),
                Some(sel) if sel.protocol == PROTO_TCP && (sel.port == 0 || sel.port == l_port) => {
                    Some((sel.protocol, sel.port))
                }
                Some(_) => None,
            }
        });
        if let Some(service) = service {
            let seen = Seen {
                client: r_addr,
                anycast: l_addr,
                service,
            };
            out.push((seen, (r_port, l_port)));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The UDP clients of our anycast services in `SERVER_UDP_FLOWS` entries (`now_ns`: the
/// `CLOCK_MONOTONIC` time): one connection per flow to an anycast address of `specs` whose
/// spec is UDP (`ADDR:udp:PORT`: that service) or the whole address (the service is then
/// UDP and the flow's port, as a whole address's TCP clients get TCP and theirs), that
/// lasted at least [`UDP_SEEN_REFRESH_NS`] and sent something in the last [`UDP_IDLE`].
/// Also returns the flows idle longer, to delete.
pub fn udp_connections_in(
    entries: &[(FlowKey, UdpSeen)],
    specs: &[AnycastSpec],
    now_ns: u64,
) -> (Vec<Connection>, Vec<FlowKey>) {
    let idle = UDP_IDLE.as_nanos() as u64;
    let mut out = Vec::new();
    let mut stale = Vec::new();
    for (k, seen) in entries {
        if now_ns.saturating_sub(seen.last_ns) > idle {
            stale.push(*k);
            continue;
        }
        // A flow seen once (or in one burst) is no client yet: a spoofed source sends once.
        if k.proto != PROTO_UDP || seen.last_ns.saturating_sub(seen.first_ns) < UDP_SEEN_REFRESH_NS
        {
            continue;
        }
        let anycast = words_addr(k.dst, k.family);
        let service = specs.iter().find_map(|s| {
            if s.address != anycast {
                return None;
            }
            match s.selector {
                None => Some((PROTO_UDP, k.dport)),
                Some(sel)
                    if sel.protocol == PROTO_UDP && (sel.port == 0 || sel.port == k.dport) =>
                {
                    Some((sel.protocol, sel.port))
                }
                Some(_) => None,
            }
        });
        if let Some(service) = service {
            let seen = Seen {
                client: words_addr(k.src, k.family),
                anycast,
                service,
            };
            out.push((seen, (k.sport, k.dport)));
        }
    }
    out.sort();
    out.dedup();
    (out, stale)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `SERVER_UDP_FLOWS`' times.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads `SERVER_UDP_FLOWS` (one `BPF_MAP_GET_NEXT_KEY` and one lookup per entry) into the
/// UDP clients' connections, and deletes the flows idle for longer than [`UDP_IDLE`].
/// Also returns how many flows it held.
pub fn read_udp_flows(
    map: &mut BpfHashMap<MapData, FlowKey, UdpSeen>,
    specs: &[AnycastSpec],
) -> (Vec<Connection>, usize) {
    let entries: Vec<(FlowKey, UdpSeen)> = map.iter().filter_map(|e| e.ok()).collect();
    let (out, stale) = udp_connections_in(&entries, specs, monotonic_ns());
    for k in stale {
        let _ = map.remove(&k);
    }
    (out, entries.len())
}

/// The index of a family in [`Binder`]'s per-family arrays.
fn family(v4: bool) -> usize {
    usize::from(!v4)
}

/// The sender: remembers the clients it bound, and signs and sends their bindings.
pub struct Binder {
    opts: BindingOptions,
    clients: HashMap<Seen, Entry>,
    last_mesg_id: u64,
    /// The real address the bindings point at, per family ([`family`]: IPv4, IPv6).
    in_use: [Option<IpAddr>; 2],
    /// The family's address in use is unusable and no other is (logged once).
    stranded: [bool; 2],
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

impl Binder {
    pub fn new(opts: BindingOptions) -> Result<Binder> {
        if opts.certificate.subject_key() != opts.key.verifying_key() {
            return Err(anyhow!(
                "the certificate is not for this signing key (its server key differs)"
            ));
        }
        for s in &opts.anycast {
            if !opts.certificate.allows_anycast(s.address) {
                tracing::warn!(
                    "the certificate does not cover the anycast address {}: clients will refuse \
                     its bindings",
                    s.address
                );
            }
        }
        if !opts.real.iter().any(|r| opts.certificate.allows_real(*r)) {
            return Err(anyhow!(
                "the certificate covers none of the real addresses {:?}",
                opts.real
            ));
        }
        let first = |v4: bool| {
            opts.real
                .iter()
                .copied()
                .find(|r| r.is_ipv4() == v4 && opts.certificate.allows_real(*r))
        };
        let in_use = [first(true), first(false)];
        Ok(Binder {
            opts,
            clients: HashMap::new(),
            last_mesg_id: 0,
            in_use,
            stranded: [false; 2],
            counters: Default::default(),
        })
    }

    /// The real address bindings for clients of this family point at now (and the one they
    /// are sent from).
    pub fn in_use(&self, v4: bool) -> Option<IpAddr> {
        self.in_use[family(v4)]
    }

    /// The usable addresses of the host are now `usable`: for each family whose real address
    /// in use is not among them, moves the bindings to the first other usable real address
    /// the certificate covers and returns a new binding for every client whose binding may
    /// still be held (sequence number + 1, the same lifetime), all of them at once (at most
    /// [`MAX_CLIENTS`]). Nothing when the address in use is still usable (no move back after
    /// a failed link returns) or when no other one is.
    pub fn addresses_changed(&mut self, usable: &[IpAddr], now: Instant) -> Vec<(Seen, Vec<u8>)> {
        let mut out = Vec::new();
        for v4 in [true, false] {
            let f = family(v4);
            let Some(current) = self.in_use[f] else {
                continue;
            };
            if usable.contains(&current) {
                self.stranded[f] = false;
                continue;
            }
            let next = self.opts.real.iter().copied().find(|r| {
                *r != current
                    && r.is_ipv4() == v4
                    && usable.contains(r)
                    && self.opts.certificate.allows_real(*r)
            });
            let Some(next) = next else {
                if !self.stranded[f] {
                    self.stranded[f] = true;
                    self.count("no_usable_real_address");
                    tracing::warn!(
                        "route optimization: real address {current} is unusable (link down or \
                         address removed) and no other certified real address of its family \
                         is usable: bindings keep pointing at it"
                    );
                }
                continue;
            };
            self.stranded[f] = false;
            self.in_use[f] = Some(next);
            self.count("real_address_moves");
            let lifetime = self.opts.lifetime;
            let mut held: Vec<Seen> = self
                .clients
                .iter()
                .filter(|(s, e)| {
                    s.client.is_ipv4() == v4
                        && e.sent
                            .is_some_and(|t| now.saturating_duration_since(t) < lifetime)
                })
                .map(|(s, _)| *s)
                .collect();
            held.sort();
            let units = self.lifetime_units();
            let mut moved = 0;
            for s in held {
                let seq = self.clients[&s].seq.wrapping_add(1);
                // The same connections as before: they follow the binding anyway (its
                // generation stays), naming them again costs nothing.
                let named: Vec<(u16, u16)> = self.clients[&s].named.iter().copied().collect();
                if let Some(m) = self.message(&s, &named, seq, units, SystemTime::now()) {
                    let e = self.clients.get_mut(&s).expect("held entries exist");
                    e.seq = seq;
                    e.sent = Some(now);
                    self.count("moves_sent");
                    moved += 1;
                    out.push((s, m));
                }
            }
            tracing::info!(
                "route optimization: real address {current} is unusable (link down or address \
                 removed): {moved} bound clients moved to {next}"
            );
        }
        out
    }

    fn count(&mut self, name: &'static str) {
        *self.counters.entry(name).or_default() += 1;
    }

    /// The real address a client of `client`'s family is sent to.
    fn real_for(&self, client: IpAddr) -> Option<IpAddr> {
        self.in_use(client.is_ipv4())
    }

    /// A signed binding (or withdrawal, `lifetime` 0) for `seen`, naming `connections`
    /// (client port, service port) of that client.
    pub fn message(
        &mut self,
        seen: &Seen,
        connections: &[(u16, u16)],
        seq: u16,
        lifetime: u16,
        now: SystemTime,
    ) -> Option<Vec<u8>> {
        let real = self.real_for(seen.client)?;
        let d = now.duration_since(UNIX_EPOCH).ok()?;
        let ntp = ((d.as_secs() + NTP_UNIX_OFFSET) << 32)
            | ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000);
        // Strictly increasing: a client refuses a MESG-ID not newer than the last it took.
        let mesg_id = ntp.max(self.last_mesg_id + 1);
        self.last_mesg_id = mesg_id;
        let msg = Message {
            src: wire::to_mapped(seen.anycast),
            dst: wire::to_mapped(seen.client),
            body: Body::ClientBindingUpdate { seq, lifetime },
            options: Options {
                alt_coa: Some(wire::to_mapped(real)),
                mesg_id: Some(mesg_id),
                service: Some(ServiceSelector {
                    protocol: seen.service.0,
                    port: seen.service.1,
                }),
                certificate: Some(self.opts.certificate.as_bytes().to_vec()),
                connections: connections.to_vec(),
                ..Options::default()
            },
        };
        wire::encode_signed(&msg, &self.opts.key).ok()
    }

    fn lifetime_units(&self) -> u16 {
        (self.opts.lifetime.as_secs() / 4).clamp(1, u64::from(u16::MAX)) as u16
    }

    /// One poll: the clients' connections seen now. Returns the datagrams to send (client,
    /// payload). A client is sent a binding when first seen, at each refresh, and when it
    /// has a connection the last binding did not name (at most one a poll).
    pub fn poll(&mut self, seen: &[Connection], now: Instant) -> Vec<(Seen, Vec<u8>)> {
        let refresh = self.opts.lifetime / 3;
        let mut current: HashMap<Seen, BTreeSet<(u16, u16)>> = HashMap::new();
        for (s, ports) in seen {
            current.entry(*s).or_default().insert(*ports);
        }
        for e in self.clients.values_mut() {
            e.ports.clear();
        }
        for (s, ports) in current {
            if let Some(e) = self.clients.get_mut(&s) {
                e.seen = now;
                e.ports = ports;
            } else if self.clients.len() >= MAX_CLIENTS {
                self.count("clients_over_limit");
            } else {
                self.clients.insert(
                    s,
                    Entry {
                        seq: 0,
                        sent: None,
                        seen: now,
                        ports,
                        named: BTreeSet::new(),
                    },
                );
            }
        }
        // Clients gone for a whole lifetime: their binding has ended on its own.
        let lifetime = self.opts.lifetime;
        self.clients
            .retain(|_, e| now.saturating_duration_since(e.seen) < lifetime);
        let mut due: Vec<Seen> = self
            .clients
            .iter()
            .filter(|(_, e)| {
                now.saturating_duration_since(e.seen) < refresh.max(POLL * 2)
                    && (e
                        .sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= refresh)
                        || (!e.ports.is_subset(&e.named)
                            && (e.named.len() < wire::MAX_NAMED_CONNECTIONS
                                || e.sent.is_none_or(|t| {
                                    now.saturating_duration_since(t) >= Duration::from_secs(1)
                                }))))
            })
            .map(|(s, _)| *s)
            .collect();
        due.sort();
        due.truncate(MAX_SENDS_PER_POLL);
        let units = self.lifetime_units();
        let mut out = Vec::new();
        for s in due {
            let e = &self.clients[&s];
            let first = e.sent.is_none();
            let seq = e.seq.wrapping_add(1);
            // The connections not named yet first, should there be more than one
            // message names.
            let mut ports: Vec<(u16, u16)> = e.ports.difference(&e.named).copied().collect();
            ports.extend(e.ports.intersection(&e.named).copied());
            if ports.len() > wire::MAX_NAMED_CONNECTIONS {
                self.count("connections_not_named");
                ports.truncate(wire::MAX_NAMED_CONNECTIONS);
            }
            if let Some(m) = self.message(&s, &ports, seq, units, SystemTime::now()) {
                let e = self.clients.get_mut(&s).expect("due entries exist");
                e.seq = seq;
                e.sent = Some(now);
                e.named = ports.into_iter().collect();
                self.count(if first {
                    "bindings_sent"
                } else {
                    "refreshes_sent"
                });
                if first {
                    tracing::info!(
                        "binding {} {}/{} -> client {}",
                        s.anycast,
                        s.service.0,
                        s.service.1,
                        s.client
                    );
                }
                out.push((s, m));
            } else {
                self.count("no_real_address_of_family");
            }
        }
        out
    }

    /// Lifetime 0 for every client whose binding may still be held.
    pub fn withdrawals(&mut self, now: Instant) -> Vec<(Seen, Vec<u8>)> {
        let lifetime = self.opts.lifetime;
        let held: Vec<(Seen, u16)> = self
            .clients
            .iter()
            .filter(|(_, e)| {
                e.sent
                    .is_some_and(|t| now.saturating_duration_since(t) < lifetime)
            })
            .map(|(s, e)| (*s, e.seq.wrapping_add(1)))
            .collect();
        let mut out = Vec::new();
        for (s, seq) in held {
            if let Some(m) = self.message(&s, &[], seq, 0, SystemTime::now()) {
                self.count("withdrawals_sent");
                out.push((s, m));
            }
        }
        out
    }
}

async fn send_all(
    v4: &Option<UdpSocket>,
    v6: &Option<UdpSocket>,
    port: u16,
    batch: Vec<(Seen, Vec<u8>)>,
) {
    for (s, m) in batch {
        let sock = if s.client.is_ipv4() { v4 } else { v6 };
        if let Some(sock) = sock {
            if let Err(e) = sock.send_to(&m, SocketAddr::new(s.client, port)).await {
                tracing::debug!("sending a binding to {}: {e}", s.client);
            }
        }
    }
}

/// A socket sending from the real address `real` (IPv6 tentative addresses included, see
/// [`bind_socket`]); `None` when there is none or it cannot be bound (logged).
async fn bind_real(real: Option<IpAddr>, v4: bool) -> Option<UdpSocket> {
    let real = real?;
    match bind_socket(Some(real), v4).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("route optimization: sending from {real}: {e:#}");
            None
        }
    }
}

/// Runs until `stop` turns true, then sends the withdrawals and returns. `udp`: the
/// decapsulator's `SERVER_UDP_FLOWS`, whose clients are bound too.
pub async fn run(
    opts: BindingOptions,
    mut udp: Option<BpfHashMap<MapData, FlowKey, UdpSeen>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let port = opts.port;
    let mut binder = Binder::new(opts)?;
    // A real address already unusable at the start is not the one used.
    if let Ok(usable) = crate::host::usable_addresses() {
        binder.addresses_changed(&usable, Instant::now());
    }
    // Sent from the real address in use: a client refuses a binding from outside the
    // certificate.
    let mut v4 = bind_real(binder.in_use(true), true).await;
    let mut v6 = bind_real(binder.in_use(false), false).await;
    let specs = binder.opts.anycast.clone();
    tracing::info!(
        "route optimization: binding new TCP and UDP clients to {:?}, lifetime {:?}",
        binder.opts.real,
        binder.opts.lifetime
    );
    let mut tick = tokio::time::interval(POLL);
    // The UDP clients of the last read, kept between reads while the map is busy.
    let mut udp_seen: Vec<Connection> = Vec::new();
    let mut udp_skip = 0u32;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                let now = Instant::now();
                match crate::host::usable_addresses() {
                    Ok(usable) => {
                        let before = [binder.in_use(true), binder.in_use(false)];
                        let moves = binder.addresses_changed(&usable, now);
                        // The moved bindings leave from the new address (the old link is
                        // down, and the client takes nothing from outside the certificate).
                        if binder.in_use(true) != before[0] {
                            v4 = bind_real(binder.in_use(true), true).await.or(v4);
                        }
                        if binder.in_use(false) != before[1] {
                            v6 = bind_real(binder.in_use(false), false).await.or(v6);
                        }
                        send_all(&v4, &v6, port, moves).await;
                    }
                    Err(e) => tracing::debug!("reading the host's addresses: {e}"),
                }
                let mut seen = Vec::new();
                for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
                    if let Ok(text) = std::fs::read_to_string(path) {
                        seen.extend(connections_in(&text, &specs));
                    }
                }
                if let Some(map) = udp.as_mut() {
                    if udp_skip == 0 {
                        let (conns, held) = read_udp_flows(map, &specs);
                        udp_seen = conns;
                        udp_skip = if held >= UDP_BUSY_FLOWS { UDP_FULL_READ_POLLS - 1 } else { 0 };
                    } else {
                        udp_skip -= 1;
                    }
                    seen.extend(udp_seen.iter().copied());
                }
                let batch = binder.poll(&seen, now);
                send_all(&v4, &v6, port, batch).await;
            }
        }
    }
    let batch = binder.withdrawals(Instant::now());
    let n = batch.len();
    send_all(&v4, &v6, port, batch).await;
    let counts: Vec<String> = binder
        .counters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(
        "route optimization: sent lifetime 0 to {n} bound clients ({})",
        counts.join(" ")
    );
    Ok(())
}

#[cfg(test)]
#[path = "server_binding_tests.rs"]
mod tests;
