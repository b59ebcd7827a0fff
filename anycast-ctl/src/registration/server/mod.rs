//! The server side's binding client: registers this server's anycast addresses with
//! the agents by authenticated Mobile IPv6 Binding Updates over UDP (DSMIPv6 framing, see
//! `anycast_common::wire`), keeps the bindings fresh, answers Binding Refresh Requests, and
//! deregisters every binding on stop.
//!
//! One binding exists per (agent, anycast binding, real address). Its home address is the
//! anycast address (IPv4 as `::ffff:a.b.c.d`), its care-of address the real address, carried
//! in the Alternate Care-of Address option. Every Binding Update carries the server's identity
//! (MN-ID), a timestamp (MESG-ID), its load, the service selector if any, and an AUTH option
//! computed with the server's key. The agent signs its acknowledgements and refresh requests
//! with the same key: anything unsigned or wrongly signed is dropped, so an impostor can
//! neither deregister nor redirect a binding.
//!
//! With a certificate instead of a key ([`RegistrationCertificate`]), every Binding Update
//! carries the certificate and is signed with its key (`wire::encode_registration_signed`);
//! the agent shares no key with us, so its acknowledgements and refresh requests are
//! unsigned and taken on their source alone (the agent's address and port, which each
//! socket is bound to), and the time an unsigned MESG-ID mismatch carries is not used
//! (the server's clock must be right: NTP).
//!
//! Everything runs in one task (the binary uses a current-thread runtime): one UDP socket per
//! agent, a timer per binding, and a loop that sends what is due and handles what arrives.
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anycast_common::wire::{self, status, Body, Key, LoadInfo, Message, Options, ServiceSelector};
use anycast_common::{PROTO_TCP, PROTO_UDP};
use anyhow::{anyhow, bail, Context as _, Result};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::registration::keys::MIN_KEY_BYTES;

/// An anycast address this server registers, optionally restricted to one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnycastBinding {
    pub anycast: IpAddr,
    pub selector: Option<ServiceSelector>,
}

/// Where the load reported in every Binding Update comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadSource {
    /// established TCP connections to the anycast addresses (from /proc/net/tcp and tcp6)
    Sockets { max_sessions: u32 },
    /// a command run with `sh -c` printing "USED MAX" (capacity units)
    Command(String),
}

#[derive(Clone)]
pub struct ClientConfig {
    /// agent address and port
    pub agents: Vec<SocketAddr>,
    /// The address all agents share (agent discovery): the agents it lists are added to
    /// `agents`, and asked again every half of the list's lifetime.
    pub discovery: Option<SocketAddr>,
    /// MN-ID (NAI), e.g. "s1"
    pub identity: String,
    pub spi: u32,
    /// Empty when `certificate` is given.
    pub key: Vec<u8>,
    /// Register with the certificate instead of the key.
    pub certificate: Option<RegistrationCertificate>,
    pub bindings: Vec<AnycastBinding>,
    /// one binding per (agent, anycast binding, real address)
    pub real_addresses: Vec<IpAddr>,
    /// requested; rounded up to 4 s units, at least 4 s
    pub lifetime: Duration,
    pub priority: u16,
    pub load: LoadSource,
    /// first BA wait (RFC 6275: 1 s), doubling up to max_timeout
    pub initial_timeout: Duration,
    /// (RFC 6275: 32 s)
    pub max_timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClientConfig")
            .field("agents", &self.agents)
            .field("discovery", &self.discovery)
            .field("identity", &self.identity)
            .field("spi", &self.spi)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field(
                "certificate",
                &self.certificate.as_ref().map(|c| c.certificate.len()),
            )
            .field("bindings", &self.bindings)
            .field("real_addresses", &self.real_addresses)
            .field("lifetime", &self.lifetime)
            .field("priority", &self.priority)
            .field("load", &self.load)
            .field("initial_timeout", &self.initial_timeout)
            .field("max_timeout", &self.max_timeout)
            .finish()
    }
}

/// A certificate from the operator (`anycast-ctl pki issue`) and the private key it names:
/// binding updates are signed with that key and carry the certificate, instead of an AUTH
/// option with a shared key.
#[derive(Clone)]
pub struct RegistrationCertificate {
    /// The certificate's bytes.
    pub certificate: Vec<u8>,
    pub key: anycast_common::pki::SigningKey,
}

/// Binding lifetimes travel in units of 4 seconds.
const LIFETIME_UNIT_SECS: u64 = 4;
/// A refresh is never scheduled sooner than this after an acknowledgement.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Log lines about things an attacker (or a broken peer) can provoke at will are limited to
/// one per this period.
const LOG_PERIOD: Duration = Duration::from_secs(60);
/// How long a load command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Sequence-out-of-window answers in a row after which the binding falls back to the backoff
/// instead of resending at once (a confused agent must not make us spin).
const MAX_IMMEDIATE_RESENDS: u32 = 3;
/// Sequence numbers of one exchange (retransmissions included) whose acknowledgement is still
/// accepted.
const REMEMBERED_SEQS: usize = 16;

/// The RFC 6275 / RFC 5213 / RFC 4285 name of a Binding Acknowledgement status.
pub fn status_name(code: u8) -> &'static str {
    match code {
        status::ACCEPTED => "accepted",
        status::PROHIBITED => "administratively prohibited",
        status::INSUFFICIENT_RESOURCES => "insufficient resources",
        status::INVALID_COA => "invalid care-of address",
        status::SEQUENCE_OUT_OF_WINDOW => "sequence number out of window",
        status::ID_MISMATCH => "MESG-ID mismatch",
        status::MESG_ID_REQUIRED => "MESG-ID required",
        status::AUTH_FAILED => "authentication failed",
        1..=127 => "accepted (unknown code)",
        _ => "refused (unknown code)",
    }
}

/// Limits a kind of log line to one per [`LOG_PERIOD`], counting what it held back.
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the last.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < LOG_PERIOD => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last report)")
    }
}

struct Agent {
    addr: SocketAddr,
    sock: UdpSocket,
    /// Messages that fail authentication.
    bad_auth: RateLimit,
    /// Unsigned refusals (the agent could not identify us).
    unsigned_refusal: RateLimit,
    /// Undecodable messages, messages from elsewhere, of the wrong kind, binding errors.
    strays: RateLimit,
    io_errors: RateLimit,
    /// Added to our clock for this agent's MESG-IDs (NTP units): set from a signed
    /// MIPV6-ID-MISMATCH answer, which carries the agent's time (RFC 4285 section 6).
    clock_offset: i64,
}

struct Binding {
    agent: usize,
    anycast: IpAddr,
    /// `to_mapped(anycast)`.
    home: Ipv6Addr,
    selector: Option<(u8, u16)>,
    real: IpAddr,
    /// Index into [`Client::seqs`]: the bindings of one home address toward one agent share
    /// a counter, so an acknowledgement's (home, seq) names exactly one of them.
    seq_group: usize,
    /// An exchange is in progress: a BU was (or is about to be) sent and its BA is awaited.
    pending: bool,
    /// Requested lifetime of the exchange in progress (4 s units; 0 deregisters).
    lifetime: u16,
    /// Sequence numbers sent in the exchange in progress.
    sent: Vec<u16>,
    attempts: u32,
    timeout: Duration,
    /// Pending: when to (re)send. Otherwise: when to refresh.
    next: Instant,
    registered_until: Option<Instant>,
    /// Status of the last signed refusal in this exchange, until the next send.
    refused: Option<u8>,
    out_of_window: u32,
    /// Deregistration confirmed by the agent.
    removed: bool,
}

impl Binding {
    fn label(&self, agent: SocketAddr) -> String {
        let sel = match self.selector {
            None => String::new(),
            Some((PROTO_TCP, port)) => format!(" tcp/{port}"),
            Some((PROTO_UDP, port)) => format!(" udp/{port}"),
            Some((proto, port)) => format!(" proto {proto}/{port}"),
        };
        format!("{}{sel} via {} at {agent}", self.anycast, self.real)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Run,
    Deregister,
}

enum Event {
    Stop,
    Packet(usize, usize, SocketAddr),
    /// A datagram on the discovery socket: its length and sender.
    Discovery(usize, SocketAddr),
    RecvError(usize, io::Error),
    Timer,
}

/// The binding client. See the module documentation.
/// How long a load measurement is reused for further binding updates.
const LOAD_REUSE: Duration = Duration::from_millis(250);

pub struct Client {
    agents: Vec<Agent>,
    bindings: Vec<Binding>,
    seqs: Vec<u16>,
    identity: String,
    spi: u32,
    key: Vec<u8>,
    certificate: Option<RegistrationCertificate>,
    lifetime_units: u16,
    priority: u16,
    load: LoadSource,
    /// Every anycast address, for [`LoadSource::Sockets`].
    anycast: Vec<IpAddr>,
    initial_timeout: Duration,
    max_timeout: Duration,
    phase: Phase,
    last_load: LoadInfo,
    /// When `last_load` was measured: answers to refresh requests within LOAD_REUSE of it
    /// reuse it, so probing the server stays cheap (no command per probe).
    last_measured: Option<Instant>,
    load_warn: RateLimit,
    /// Where the next receive starts looking, so one busy agent cannot starve the others.
    recv_start: usize,
    /// Agent discovery, when configured (see `discovery`).
    discovery: Option<Discovery>,
    /// Binding settings kept for agents added later (by discovery).
    wanted: Vec<AnycastBinding>,
    real_addresses: Vec<IpAddr>,
    /// First sequence number of a new (agent, home address) group.
    seq_start: u16,
}

impl Client {
    /// Validates `cfg` (clear errors), binds one UDP socket per agent.
    pub async fn new(cfg: ClientConfig) -> Result<Client> {
        let lifetime_units = validate(&cfg).context("invalid binding client configuration")?;
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as u16;
        let discovery = match cfg.discovery {
            Some(addr) => Some(Discovery::open(addr, &cfg.real_addresses).await?),
            None => None,
        };
        let mut anycast: Vec<IpAddr> = cfg.bindings.iter().map(|b| b.anycast).collect();
        anycast.sort();
        anycast.dedup();
        let max_sessions = match cfg.load {
            LoadSource::Sockets { max_sessions } => max_sessions,
            LoadSource::Command(_) => 0,
        };
        let mut client = Client {
            agents: Vec::new(),
            bindings: Vec::new(),
            seqs: Vec::new(),
            identity: cfg.identity,
            spi: cfg.spi,
            key: cfg.key,
            certificate: cfg.certificate,
            lifetime_units,
            priority: cfg.priority,
            load: cfg.load,
            anycast,
            initial_timeout: cfg.initial_timeout,
            max_timeout: cfg.max_timeout,
            phase: Phase::Run,
            last_load: LoadInfo {
                priority: cfg.priority,
                sessions_in_use: 0,
                max_sessions,
                used_capacity: 0,
                max_capacity: 0,
            },
            last_measured: None,
            load_warn: RateLimit::default(),
            recv_start: 0,
            discovery,
            wanted: cfg.bindings,
            real_addresses: cfg.real_addresses,
            seq_start: start,
        };
        for &addr in &cfg.agents {
            client.add_agent(addr).await?;
        }
        Ok(client)
    }

    /// Opens a socket toward the agent at `addr` and starts registering every binding with
    /// it.
    pub(crate) async fn add_agent(&mut self, addr: SocketAddr) -> Result<()> {
        let local = self
            .real_addresses
            .iter()
            .copied()
            .find(|r| r.is_ipv4() == addr.is_ipv4());
        let sock = bind_socket(local, addr.is_ipv4())
            .await
            .with_context(|| format!("opening the socket toward agent {addr}"))?;
        let agent = self.agents.len();
        self.agents.push(Agent {
            addr,
            sock,
            bad_auth: RateLimit::default(),
            unsigned_refusal: RateLimit::default(),
            strays: RateLimit::default(),
            io_errors: RateLimit::default(),
            clock_offset: 0,
        });
        let now = Instant::now();
        let mut homes: Vec<(Ipv6Addr, usize)> = Vec::new();
        for b in &self.wanted {
            let home = wire::to_mapped(b.anycast);
            // The bindings of one home address toward one agent share a sequence counter.
            let seq_group = match homes.iter().find(|(h, _)| *h == home) {
                Some(&(_, g)) => g,
                None => {
                    self.seqs.push(self.seq_start);
                    homes.push((home, self.seqs.len() - 1));
                    self.seqs.len() - 1
                }
            };
            for &real in &self.real_addresses {
                self.bindings.push(Binding {
                    agent,
                    anycast: b.anycast,
                    home,
                    selector: b.selector.as_ref().map(|s| (s.protocol, s.port)),
                    real,
                    seq_group,
                    pending: true,
                    lifetime: self.lifetime_units,
                    sent: Vec::new(),
                    attempts: 0,
                    timeout: self.initial_timeout,
                    next: now,
                    registered_until: None,
                    refused: None,
                    out_of_window: 0,
                    removed: false,
                });
            }
        }
        Ok(())
    }

    /// The agents registered with, in the order they were given or found.
    pub fn agent_addrs(&self) -> Vec<SocketAddr> {
        self.agents.iter().map(|a| a.addr).collect()
    }

    /// The local address of the socket toward each agent, in the configuration's order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.agents
            .iter()
            .filter_map(|a| a.sock.local_addr().ok())
            .collect()
    }

    /// Registers every binding, keeps it fresh, answers BRRs, until `stop` completes; then
    /// deregisters (lifetime 0) every binding and waits for the BAs (at most `deregister_timeout`),
    /// returning how many bindings were confirmed removed.
    pub async fn run(
        mut self,
        stop: impl Future<Output = ()>,
        deregister_timeout: Duration,
    ) -> Result<usize> {
        let mut stop = std::pin::pin!(stop);
        let mut buf = vec![0u8; 65536];
        tracing::info!(
            "registering {} binding(s) as {:?} with {} agent(s){}",
            self.bindings.len(),
            self.identity,
            self.agents.len(),
            self.discovery
                .as_ref()
                .map_or(String::new(), |d| format!(", and those {} lists", d.addr))
        );
        loop {
            self.send_due().await;
            let next = self.next_deadline();
            match self.wait(stop.as_mut(), &mut buf, next).await {
                Event::Stop => break,
                event => self.handle(event, &buf),
            }
        }

        self.phase = Phase::Deregister;
        let deadline = Instant::now() + deregister_timeout;
        let now = Instant::now();
        for i in 0..self.bindings.len() {
            self.begin(i, 0, now);
        }
        tracing::info!(
            "deregistering {} binding(s) (waiting at most {deregister_timeout:?})",
            self.bindings.len()
        );
        let mut never = std::pin::pin!(std::future::pending::<()>());
        loop {
            self.send_due().await;
            if self.bindings.iter().all(|b| b.removed) || Instant::now() >= deadline {
                break;
            }
            let next = self.next_deadline().map_or(deadline, |t| t.min(deadline));
            let event = self.wait(never.as_mut(), &mut buf, Some(next)).await;
            self.handle(event, &buf);
        }
        let removed = self.bindings.iter().filter(|b| b.removed).count();
        if removed < self.bindings.len() {
            for b in self.bindings.iter().filter(|b| !b.removed) {
                tracing::warn!(
                    "{}: deregistration not confirmed",
                    b.label(self.agents[b.agent].addr)
                );
            }
        }
        tracing::info!(
            "{removed} of {} binding(s) confirmed removed",
            self.bindings.len()
        );
        Ok(removed)
    }

    /// Waits for `stop`, a datagram on any agent's socket or `until`, whichever comes first.
    async fn wait<S: Future<Output = ()>>(
        &mut self,
        stop: Pin<&mut S>,
        buf: &mut [u8],
        until: Option<Instant>,
    ) -> Event {
        let start = self.recv_start;
        self.recv_start = self.recv_start.wrapping_add(1);
        let agents = &self.agents;
        let discovery = self.discovery.as_ref().map(|d| &d.sock);
        let recv = std::future::poll_fn(|cx| {
            if let Some(sock) = discovery {
                let mut rb = tokio::io::ReadBuf::new(&mut buf[..]);
                if let Poll::Ready(r) = sock.poll_recv_from(cx, &mut rb) {
                    let n = rb.filled().len();
                    return Poll::Ready(match r {
                        Ok(from) => Event::Discovery(n, from),
                        Err(e) => Event::RecvError(usize::MAX, e),
                    });
                }
            }
            for k in 0..agents.len() {
                let i = (start + k) % agents.len();
                let mut rb = tokio::io::ReadBuf::new(&mut buf[..]);
                if let Poll::Ready(r) = agents[i].sock.poll_recv_from(cx, &mut rb) {
                    let n = rb.filled().len();
                    return Poll::Ready(match r {
                        Ok(from) => Event::Packet(i, n, from),
                        Err(e) => Event::RecvError(i, e),
                    });
                }
            }
            Poll::Pending
        });
        let timer = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = stop => Event::Stop,
            event = recv => event,
            () = timer => Event::Timer,
        }
    }

    fn handle(&mut self, event: Event, buf: &[u8]) {
        match event {
            Event::Stop | Event::Timer => {}
            Event::Packet(agent, n, from) => self.on_datagram(agent, &buf[..n], from),
            Event::Discovery(n, from) => self.on_discovery_reply(&buf[..n], from),
            Event::RecvError(usize::MAX, e) => {
                if let Some(d) = self.discovery.as_mut() {
                    if let Some(n) = d.io_errors.allow(Instant::now()) {
                        tracing::warn!("receiving from {}: {e}{}", d.addr, held_back(n));
                    }
                }
            }
            Event::RecvError(agent, e) => {
                let a = &mut self.agents[agent];
                if let Some(n) = a.io_errors.allow(Instant::now()) {
                    tracing::warn!("receiving from agent {}: {e}{}", a.addr, held_back(n));
                }
            }
        }
    }

    /// When the next binding needs a send: its retransmission, retry or refresh time.
    fn next_deadline(&self) -> Option<Instant> {
        let discovery = self
            .discovery
            .as_ref()
            .filter(|_| self.phase == Phase::Run)
            .map(|d| d.next);
        self.bindings
            .iter()
            .filter(|b| b.pending || (self.phase == Phase::Run && !b.removed))
            .map(|b| b.next)
            .chain(discovery)
            .min()
    }

    /// Starts an exchange for binding `i`: its BU goes out at the next `send_due`.
    fn begin(&mut self, i: usize, lifetime: u16, now: Instant) {
        let b = &mut self.bindings[i];
        if !b.pending || b.lifetime != lifetime {
            b.sent.clear();
        }
        b.pending = true;
        b.lifetime = lifetime;
        b.attempts = 0;
        b.timeout = self.initial_timeout;
        b.next = now;
        b.refused = None;
        b.out_of_window = 0;
    }

    /// Sends every BU that is due: first sends, retransmissions, retries and refreshes.
    async fn send_due(&mut self) {
        self.add_discovered().await;
        self.send_discovery_request().await;
        let now = Instant::now();
        let due: Vec<usize> = (0..self.bindings.len())
            .filter(|&i| {
                let b = &self.bindings[i];
                b.next <= now && (b.pending || (self.phase == Phase::Run && !b.removed))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let load = self.measure_load().await;
        let now = Instant::now();
        for i in due {
            if !self.bindings[i].pending {
                self.begin(i, self.lifetime_units, now);
            }
            self.send_bu(i, load, now).await;
        }
    }

    async fn measure_load(&mut self) -> LoadInfo {
        if self.phase == Phase::Deregister {
            return self.last_load;
        }
        if self.last_measured.is_some_and(|t| t.elapsed() < LOAD_REUSE) {
            return self.last_load;
        }
        let mut load = LoadInfo {
            priority: self.priority,
            sessions_in_use: 0,
            max_sessions: 0,
            used_capacity: 0,
            max_capacity: 0,
        };
        match &self.load {
            LoadSource::Sockets { max_sessions } => {
                load.sessions_in_use = established_sessions(&self.anycast);
                load.max_sessions = *max_sessions;
            }
            LoadSource::Command(cmd) => match command_usage(cmd).await {
                Ok((used, max)) => {
                    load.used_capacity = used;
                    load.max_capacity = max;
                }
                Err(e) => {
                    if let Some(n) = self.load_warn.allow(Instant::now()) {
                        tracing::warn!(
                            "load command {cmd:?} failed, reporting zero load: {e:#}{}",
                            held_back(n)
                        );
                    }
                }
            },
        }
        self.last_load = load;
        self.last_measured = Some(Instant::now());
        load
    }

    async fn send_bu(&mut self, i: usize, load: LoadInfo, now: Instant) {
        let in_run = self.phase == Phase::Run;
        let (initial, max) = (self.initial_timeout, self.max_timeout);
        let b = &mut self.bindings[i];
        let agent_addr = self.agents[b.agent].addr;
        if b.attempts > 0 {
            if in_run {
                if b.registered_until.is_some_and(|t| t <= now) {
                    b.registered_until = None;
                    tracing::warn!("{}: binding lapsed at the agent", b.label(agent_addr));
                }
                if b.refused.is_none() {
                    tracing::warn!(
                        "{}: no acknowledgement after {} attempt(s), retransmitting",
                        b.label(agent_addr),
                        b.attempts
                    );
                }
                b.timeout = (b.timeout * 2).min(max);
            } else {
                b.timeout = initial;
            }
        }
        let seq = self.seqs[b.seq_group];
        self.seqs[b.seq_group] = seq.wrapping_add(1);
        if b.sent.len() >= REMEMBERED_SEQS {
            b.sent.remove(0);
        }
        b.sent.push(seq);
        b.attempts += 1;
        b.refused = None;
        b.next = now + b.timeout;
        let msg = Message {
            src: b.home,
            dst: wire::to_mapped(agent_addr.ip()),
            body: Body::BindingUpdate {
                seq,
                ack: true,
                lifetime: b.lifetime,
            },
            options: Options {
                alt_coa: Some(wire::to_mapped(b.real)),
                mn_id: Some(self.identity.clone()),
                mesg_id: Some(
                    wire::ntp_now().wrapping_add_signed(self.agents[b.agent].clock_offset),
                ),
                load: Some(load),
                service: b
                    .selector
                    .map(|(protocol, port)| ServiceSelector { protocol, port }),
                certificate: self.certificate.as_ref().map(|c| c.certificate.clone()),
                ..Options::default()
            },
        };
        let payload = match &self.certificate {
            // Checked when the client was made: the certificate encodes.
            Some(c) => wire::encode_registration_signed(&msg, &c.key)
                .expect("a certificate validated at start encodes"),
            None => wire::encode(
                &msg,
                Some(Key {
                    spi: self.spi,
                    secret: &self.key,
                }),
            ),
        };
        tracing::debug!(
            "{}: binding update seq {seq} lifetime {}s",
            b.label(agent_addr),
            u64::from(b.lifetime) * LIFETIME_UNIT_SECS
        );
        let agent = &mut self.agents[b.agent];
        if let Err(e) = agent.sock.send_to(&payload, agent.addr).await {
            if let Some(n) = agent.io_errors.allow(now) {
                tracing::warn!("sending to agent {}: {e}{}", agent.addr, held_back(n));
            }
        }
    }
}

mod discovery;
#[cfg(test)]
mod discovery_tests;
mod load;
mod messages;
mod sockets;
#[cfg(test)]
mod tests;
mod validate;

use discovery::Discovery;
use load::command_usage;
pub(crate) use load::socket_rows;
pub use load::{count_established, established_sessions};
pub(crate) use sockets::bind_socket;
use validate::validate;
