//! The server side's binding client (issue 3): registers this server's anycast addresses with
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

use crate::keys::MIN_KEY_BYTES;

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
    /// MN-ID (NAI), e.g. "s1"
    pub identity: String,
    pub spi: u32,
    pub key: Vec<u8>,
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
            .field("identity", &self.identity)
            .field("spi", &self.spi)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
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

/// Established TCP connections whose local address is one of `anycast`.
pub fn established_sessions(anycast: &[IpAddr]) -> u32 {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| count_established(&text, anycast))
        .fold(0u32, u32::saturating_add)
}

/// Counts the lines of a `/proc/net/tcp` or `/proc/net/tcp6` text in state `01`
/// (ESTABLISHED) whose local address is one of `anycast`. An IPv4 address seen as
/// `::ffff:a.b.c.d` on a dual-stack socket counts as the IPv4 address.
pub fn count_established(proc_text: &str, anycast: &[IpAddr]) -> u32 {
    let mut n = 0u32;
    for line in proc_text.lines() {
        let mut fields = line.split_whitespace();
        // "sl local_address rem_address st ...": the header line fails to parse and is skipped.
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != "01" {
            continue;
        }
        let Some(addr) = local.split(':').next().and_then(parse_proc_addr) else {
            continue;
        };
        if anycast.iter().any(|&a| canonical(a) == addr) {
            n = n.saturating_add(1);
        }
    }
    n
}

/// The kernel prints each 32-bit word of the address as it sits in memory (network order)
/// read as a native integer, in hex.
fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::from(word(hex)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            Some(canonical(IpAddr::from(o)))
        }
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, everything else unchanged.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses the "USED MAX" a load command prints.
fn parse_usage(out: &str) -> Result<(u32, u32)> {
    let mut words = out.split_whitespace();
    let mut next = |what: &str| -> Result<u32> {
        let w = words
            .next()
            .ok_or_else(|| anyhow!("expected \"USED MAX\", got {:?}", out.trim()))?;
        w.parse()
            .with_context(|| format!("{what} {w:?} is not an unsigned 32-bit number"))
    };
    let used = next("USED")?;
    let max = next("MAX")?;
    Ok((used, max))
}

/// Runs a load command with `sh -c` and parses its output; killed after [`COMMAND_TIMEOUT`].
async fn command_usage(command: &str) -> Result<(u32, u32)> {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever the shell started too.
        .process_group(0)
        .spawn()
        .context("starting sh")?;
    let pgid = child.id() as libc::pid_t;
    let wait = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, wait).await {
        Ok(joined) => joined
            .context("waiting for the command")?
            .context("waiting for the command")?,
        Err(_) => {
            // SAFETY: plain syscall; the group is ours and its leader is not reaped yet (the
            // blocking task that would reap it is still waiting).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            bail!("no answer within {COMMAND_TIMEOUT:?}; killed");
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        bail!(
            "{}{}{first}",
            out.status,
            if first.is_empty() { "" } else { ": " }
        );
    }
    parse_usage(&String::from_utf8_lossy(&out.stdout))
}

/// The RFC 6275 / RFC 5213 / RFC 4285 name of a Binding Acknowledgement status.
pub fn status_name(code: u8) -> &'static str {
    match code {
        status::ACCEPTED => "accepted",
        status::PROHIBITED => "administratively prohibited",
        status::INSUFFICIENT_RESOURCES => "insufficient resources",
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
}

impl Client {
    /// Validates `cfg` (clear errors), binds one UDP socket per agent.
    pub async fn new(cfg: ClientConfig) -> Result<Client> {
        let lifetime_units = validate(&cfg).context("invalid binding client configuration")?;
        let now = Instant::now();
        let mut agents = Vec::new();
        for &addr in &cfg.agents {
            let local = cfg
                .real_addresses
                .iter()
                .copied()
                .find(|r| r.is_ipv4() == addr.is_ipv4());
            let sock = bind_socket(local, addr.is_ipv4())
                .await
                .with_context(|| format!("opening the socket toward agent {addr}"))?;
            agents.push(Agent {
                addr,
                sock,
                bad_auth: RateLimit::default(),
                unsigned_refusal: RateLimit::default(),
                strays: RateLimit::default(),
                io_errors: RateLimit::default(),
            });
        }
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as u16;
        let mut groups: Vec<(usize, Ipv6Addr)> = Vec::new();
        let mut bindings = Vec::new();
        for agent in 0..cfg.agents.len() {
            for b in &cfg.bindings {
                let home = wire::to_mapped(b.anycast);
                let seq_group = match groups.iter().position(|&g| g == (agent, home)) {
                    Some(g) => g,
                    None => {
                        groups.push((agent, home));
                        groups.len() - 1
                    }
                };
                for &real in &cfg.real_addresses {
                    bindings.push(Binding {
                        agent,
                        anycast: b.anycast,
                        home,
                        selector: b.selector.as_ref().map(|s| (s.protocol, s.port)),
                        real,
                        seq_group,
                        pending: true,
                        lifetime: lifetime_units,
                        sent: Vec::new(),
                        attempts: 0,
                        timeout: cfg.initial_timeout,
                        next: now,
                        registered_until: None,
                        refused: None,
                        out_of_window: 0,
                        removed: false,
                    });
                }
            }
        }
        let mut anycast: Vec<IpAddr> = cfg.bindings.iter().map(|b| b.anycast).collect();
        anycast.sort();
        anycast.dedup();
        let max_sessions = match cfg.load {
            LoadSource::Sockets { max_sessions } => max_sessions,
            LoadSource::Command(_) => 0,
        };
        Ok(Client {
            agents,
            bindings,
            seqs: vec![start; groups.len()],
            identity: cfg.identity,
            spi: cfg.spi,
            key: cfg.key,
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
        })
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
            "registering {} binding(s) as {:?} with {} agent(s)",
            self.bindings.len(),
            self.identity,
            self.agents.len()
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
        let recv = std::future::poll_fn(|cx| {
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
        self.bindings
            .iter()
            .filter(|b| b.pending || (self.phase == Phase::Run && !b.removed))
            .map(|b| b.next)
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
                mesg_id: Some(wire::ntp_now()),
                load: Some(load),
                service: b
                    .selector
                    .map(|(protocol, port)| ServiceSelector { protocol, port }),
                auth: None,
            },
        };
        let payload = wire::encode(
            &msg,
            Some(Key {
                spi: self.spi,
                secret: &self.key,
            }),
        );
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

    fn on_datagram(&mut self, ai: usize, payload: &[u8], from: SocketAddr) {
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
        let signed = wire::verify(
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
            Body::BindingUpdate { .. } => {
                if let Some(n) = agent.strays.allow(now) {
                    tracing::warn!(
                        "ignoring a binding update from agent {expected}{}",
                        held_back(n)
                    );
                }
            }
        }
    }

    fn on_refresh_request(&mut self, ai: usize, home: Ipv6Addr, now: Instant) {
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

    fn on_ack(
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

/// Checks the configuration; returns the requested lifetime in 4 s units.
fn validate(cfg: &ClientConfig) -> Result<u16> {
    if cfg.agents.is_empty() {
        bail!("agents: at least one agent is needed");
    }
    for (i, a) in cfg.agents.iter().enumerate() {
        if a.ip().is_unspecified() || a.ip().is_multicast() {
            bail!("agents[{i}]: {a} is not a unicast address");
        }
        if a.port() == 0 {
            bail!("agents[{i}]: {a} has no port");
        }
        if cfg.agents[..i].contains(a) {
            bail!("agents[{i}]: {a} is given twice");
        }
    }
    if cfg.identity.is_empty() {
        bail!("identity: empty");
    }
    if cfg.identity.len() > wire::MAX_MN_ID_LEN {
        bail!(
            "identity: {} bytes; at most {} fit the MN-ID option",
            cfg.identity.len(),
            wire::MAX_MN_ID_LEN
        );
    }
    if cfg.identity.chars().any(char::is_control) {
        bail!("identity: {:?} contains control characters", cfg.identity);
    }
    if cfg.key.len() < MIN_KEY_BYTES {
        bail!(
            "key: {} bytes; at least {MIN_KEY_BYTES} are needed",
            cfg.key.len()
        );
    }
    if cfg.bindings.is_empty() {
        bail!("bindings: at least one anycast address is needed");
    }
    for (i, b) in cfg.bindings.iter().enumerate() {
        if b.anycast.is_unspecified() || b.anycast.is_multicast() {
            bail!("bindings[{i}]: {} is not a unicast address", b.anycast);
        }
        let sel = b.selector.as_ref().map(|s| (s.protocol, s.port));
        if let Some((proto, _)) = sel {
            if proto != PROTO_TCP && proto != PROTO_UDP {
                bail!("bindings[{i}]: protocol {proto}: only TCP (6) and UDP (17) are served");
            }
        }
        let same = |o: &AnycastBinding| {
            o.anycast == b.anycast && o.selector.as_ref().map(|s| (s.protocol, s.port)) == sel
        };
        if cfg.bindings[..i].iter().any(same) {
            bail!("bindings[{i}]: {} is given twice", b.anycast);
        }
    }
    if cfg.real_addresses.is_empty() {
        bail!("real_addresses: at least one real address is needed");
    }
    for (i, r) in cfg.real_addresses.iter().enumerate() {
        if r.is_unspecified() || r.is_multicast() {
            bail!("real_addresses[{i}]: {r} cannot receive tunnelled packets");
        }
        if cfg.real_addresses[..i].contains(r) {
            bail!("real_addresses[{i}]: {r} is given twice");
        }
    }
    if let LoadSource::Command(c) = &cfg.load {
        if c.trim().is_empty() {
            bail!("load: empty command");
        }
    }
    if cfg.initial_timeout.is_zero() {
        bail!("initial_timeout: must be more than zero");
    }
    if cfg.max_timeout < cfg.initial_timeout {
        bail!(
            "max_timeout: {:?} is less than initial_timeout {:?}",
            cfg.max_timeout,
            cfg.initial_timeout
        );
    }
    let unit_ms = u128::from(LIFETIME_UNIT_SECS) * 1000;
    let units = cfg.lifetime.as_millis().div_ceil(unit_ms).max(1);
    u16::try_from(units).map_err(|_| {
        anyhow!(
            "lifetime: {:?} is more than the {}s a binding update can ask for",
            cfg.lifetime,
            u64::from(u16::MAX) * LIFETIME_UNIT_SECS
        )
    })
}

/// A UDP socket of the agent's family, bound to `local` (a real address) when there is one,
/// else to the unspecified address. An IPv6 real address the kernel does not let us bind yet
/// (duplicate address detection still running) is bound with IPV6_FREEBIND, so the updates
/// leave with it as their source once it is usable; an IPv4 one is a configuration error.
async fn bind_socket(local: Option<IpAddr>, v4: bool) -> Result<UdpSocket> {
    let Some(ip) = local else {
        let any: IpAddr = if v4 {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        return UdpSocket::bind((any, 0))
            .await
            .with_context(|| format!("binding to {any}"));
    };
    match (UdpSocket::bind((ip, 0)).await, ip) {
        (Ok(s), _) => Ok(s),
        (Err(e), IpAddr::V6(v6)) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            tracing::warn!(
                "real address {ip} is not usable on this host yet (tentative, or missing); \
                 sending from it anyway"
            );
            let s =
                bind_freebind_v6(v6).with_context(|| format!("binding to real address {ip}"))?;
            UdpSocket::from_std(s).with_context(|| format!("binding to real address {ip}"))
        }
        (Err(e), _) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            Err(e).with_context(|| format!("real address {ip} is not an address of this host"))
        }
        (Err(e), _) => Err(e).with_context(|| format!("binding to real address {ip}")),
    }
}

/// A non-blocking UDP socket bound to `ip` (any port) with IPV6_FREEBIND.
fn bind_freebind_v6(ip: Ipv6Addr) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: plain syscalls; the descriptor is owned by `sock` from its creation on, and the
    // option value and address are fully initialised with their sizes passed along.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = std::net::UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_FREEBIND,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = ip.octets();
        if libc::bind(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const SPI: u32 = 0x0051_5100;
    const KEY: &[u8] = b"0123456789abcdef-binding-test-key";
    const OTHER_KEY: &[u8] = b"fedcba9876543210-not-the-right-key";

    /// The client's log lines, shown for failing tests (or with `--nocapture`).
    fn logs() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("anycast_ctl=debug")
            .with_test_writer()
            .try_init();
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn seq_after(a: u16, b: u16) -> bool {
        (a.wrapping_sub(b) as i16) > 0
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// An agent stand-in: a UDP socket speaking the wire format with the server's key.
    struct FakeAgent {
        sock: UdpSocket,
    }

    /// A binding update as the fake agent received it.
    struct Bu {
        msg: Message,
        seq: u16,
        lifetime: u16,
        from: SocketAddr,
    }

    impl FakeAgent {
        async fn new(addr: &str) -> FakeAgent {
            FakeAgent {
                sock: UdpSocket::bind((ip(addr), 0)).await.unwrap(),
            }
        }

        fn addr(&self) -> SocketAddr {
            self.sock.local_addr().unwrap()
        }

        /// The next datagram if one arrives within `within`; it must be a well-formed binding
        /// update signed with the server's key.
        async fn next_bu(&self, within: Duration) -> Option<Bu> {
            let mut buf = vec![0u8; 65536];
            let (n, from) = tokio::time::timeout(within, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .unwrap();
            let raw = &buf[..n];
            let msg = wire::decode(raw).expect("a decodable message");
            assert!(
                wire::verify(
                    raw,
                    Key {
                        spi: SPI,
                        secret: KEY
                    }
                ),
                "AUTH verifies"
            );
            assert!(!wire::verify(
                raw,
                Key {
                    spi: SPI,
                    secret: OTHER_KEY
                }
            ));
            let Body::BindingUpdate { seq, ack, lifetime } = msg.body else {
                panic!("not a binding update");
            };
            assert!(ack, "A flag set");
            assert_eq!(msg.options.auth.as_ref().map(|a| a.spi), Some(SPI));
            assert_eq!(msg.options.mn_id.as_deref(), Some("s1"));
            assert!(msg.options.mesg_id.is_some(), "MESG-ID present");
            assert!(msg.options.load.is_some(), "load present");
            assert!(msg.options.alt_coa.is_some(), "Alt-CoA present");
            assert_eq!(msg.dst, wire::to_mapped(self.addr().ip()));
            Some(Bu {
                msg,
                seq,
                lifetime,
                from,
            })
        }

        async fn expect_bu(&self, within: Duration) -> Bu {
            self.next_bu(within)
                .await
                .unwrap_or_else(|| panic!("no binding update within {within:?}"))
        }

        async fn send(&self, to: SocketAddr, home: Ipv6Addr, body: Body, key: Option<&[u8]>) {
            let msg = Message {
                src: wire::to_mapped(self.addr().ip()),
                dst: home,
                body,
                options: Options::default(),
            };
            let payload = wire::encode(&msg, key.map(|secret| Key { spi: SPI, secret }));
            self.sock.send_to(&payload, to).await.unwrap();
        }

        async fn ack(&self, bu: &Bu, code: u8, lifetime: u16, key: Option<&[u8]>) {
            let body = Body::BindingAck {
                status: code,
                seq: bu.seq,
                lifetime,
            };
            self.send(bu.from, bu.msg.src, body, key).await;
        }

        async fn refresh_request(&self, bu: &Bu, key: Option<&[u8]>) {
            self.send(bu.from, bu.msg.src, Body::BindingRefreshRequest, key)
                .await;
        }
    }

    fn config(agent: SocketAddr, real: &str, anycast: &str) -> ClientConfig {
        ClientConfig {
            agents: vec![agent],
            identity: "s1".into(),
            spi: SPI,
            key: KEY.to_vec(),
            bindings: vec![AnycastBinding {
                anycast: ip(anycast),
                selector: Some(ServiceSelector {
                    protocol: PROTO_TCP,
                    port: 80,
                }),
            }],
            real_addresses: vec![ip(real)],
            lifetime: secs(400.0),
            priority: 7,
            load: LoadSource::Sockets { max_sessions: 1000 },
            initial_timeout: secs(10.0),
            max_timeout: secs(20.0),
        }
    }

    struct Running {
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<Result<usize>>,
    }

    impl Running {
        async fn start(cfg: ClientConfig, deregister_timeout: Duration) -> Running {
            let client = Client::new(cfg).await.unwrap();
            let (tx, rx) = oneshot::channel::<()>();
            let stop = async move {
                let _ = rx.await;
            };
            Running {
                stop: Some(tx),
                task: tokio::spawn(client.run(stop, deregister_timeout)),
            }
        }

        fn stop(&mut self) {
            self.stop.take().unwrap().send(()).unwrap();
        }

        async fn finish(self, within: Duration) -> usize {
            tokio::time::timeout(within, self.task)
                .await
                .expect("the client returns in time")
                .unwrap()
                .unwrap()
        }
    }

    #[tokio::test]
    async fn registers_refreshes_and_deregisters_over_ipv4() {
        let agent = FakeAgent::new("127.0.0.1").await;
        let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
        cfg.lifetime = secs(3.5); // rounded up to one unit, 4 s
        cfg.initial_timeout = secs(1.0);
        let mut client = Running::start(cfg, secs(5.0)).await;

        let bu = agent.expect_bu(secs(3.0)).await;
        assert_eq!(bu.lifetime, 1);
        assert_eq!(bu.msg.src, wire::to_mapped(ip("192.0.2.80")));
        assert_eq!(bu.msg.src, "::ffff:192.0.2.80".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            bu.msg.options.alt_coa,
            Some(wire::to_mapped(ip("127.0.0.1")))
        );
        assert_eq!(bu.from.ip(), ip("127.0.0.1"), "sent from the real address");
        let sel = bu.msg.options.service.as_ref().expect("a service selector");
        assert_eq!((sel.protocol, sel.port), (PROTO_TCP, 80));
        let load = bu.msg.options.load.as_ref().unwrap();
        assert_eq!(load.priority, 7);
        assert_eq!(load.max_sessions, 1000);
        assert_eq!((load.used_capacity, load.max_capacity), (0, 0));

        // Granted 4 s: refreshed after half of it, with a later sequence number.
        let acked = Instant::now();
        agent.ack(&bu, status::ACCEPTED, 1, Some(KEY)).await;
        let refresh = agent.expect_bu(secs(4.0)).await;
        let waited = acked.elapsed();
        assert!(waited >= secs(1.5), "refreshed after {waited:?}");
        assert!(seq_after(refresh.seq, bu.seq));
        assert_eq!(refresh.lifetime, 1);
        assert_eq!(refresh.msg.src, bu.msg.src);
        agent.ack(&refresh, status::ACCEPTED, 1, Some(KEY)).await;

        client.stop();
        let dereg = agent.expect_bu(secs(2.0)).await;
        assert_eq!(dereg.lifetime, 0);
        assert!(seq_after(dereg.seq, refresh.seq));
        assert_eq!(dereg.msg.src, bu.msg.src);
        agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
        assert_eq!(client.finish(secs(2.0)).await, 1);
    }

    #[tokio::test]
    async fn answers_a_signed_refresh_request_at_once_over_ipv6() {
        let agent = FakeAgent::new("::1").await;
        let mut cfg = config(agent.addr(), "::1", "2001:db8::80");
        cfg.bindings[0].selector = None;
        cfg.load = LoadSource::Command("echo 3 10".into());
        let mut client = Running::start(cfg, secs(5.0)).await;

        let bu = agent.expect_bu(secs(5.0)).await;
        assert_eq!(bu.from.ip(), ip("::1"), "sent from the real address");
        assert_eq!(bu.msg.src, "2001:db8::80".parse::<Ipv6Addr>().unwrap());
        assert_eq!(bu.msg.options.alt_coa, Some(Ipv6Addr::LOCALHOST));
        assert!(bu.msg.options.service.is_none());
        assert_eq!(bu.lifetime, 100);
        let load = bu.msg.options.load.as_ref().unwrap();
        assert_eq!((load.used_capacity, load.max_capacity), (3, 10));
        assert_eq!((load.sessions_in_use, load.max_sessions), (0, 0));
        agent.ack(&bu, status::ACCEPTED, 100, Some(KEY)).await;

        // Unsigned, wrongly signed, or for another address: no answer.
        agent.refresh_request(&bu, None).await;
        agent.refresh_request(&bu, Some(OTHER_KEY)).await;
        let other = wire::to_mapped(ip("2001:db8::81"));
        let body = Body::BindingRefreshRequest;
        agent.send(bu.from, other, body, Some(KEY)).await;
        assert!(agent.next_bu(secs(0.5)).await.is_none());

        // Signed: answered at once (the refresh would be 200 s away).
        agent.refresh_request(&bu, Some(KEY)).await;
        let again = agent.expect_bu(secs(2.0)).await;
        assert!(seq_after(again.seq, bu.seq));
        assert_eq!((again.lifetime, again.msg.src), (100, bu.msg.src));
        agent.ack(&again, status::ACCEPTED, 100, Some(KEY)).await;

        client.stop();
        let dereg = agent.expect_bu(secs(2.0)).await;
        assert_eq!(dereg.lifetime, 0);
        agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
        assert_eq!(client.finish(secs(2.0)).await, 1);
    }

    #[tokio::test]
    async fn sequence_out_of_window_continues_from_the_agents_number() {
        logs();
        let agent = FakeAgent::new("127.0.0.1").await;
        let cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
        let mut client = Running::start(cfg, secs(5.0)).await;
        let bu = agent.expect_bu(secs(3.0)).await;

        // Ahead of ours: resent at once (the retransmission timeout is 10 s) with X+1.
        let x = bu.seq.wrapping_add(1000);
        let body = Body::BindingAck {
            status: status::SEQUENCE_OUT_OF_WINDOW,
            seq: x,
            lifetime: 0,
        };
        agent.send(bu.from, bu.msg.src, body, Some(KEY)).await;
        let again = agent.expect_bu(secs(2.0)).await;
        assert_eq!(again.seq, x.wrapping_add(1));

        // The agent's number is what counts, even behind ours.
        let y = again.seq.wrapping_sub(30000);
        let body = Body::BindingAck {
            status: status::SEQUENCE_OUT_OF_WINDOW,
            seq: y,
            lifetime: 0,
        };
        agent.send(again.from, again.msg.src, body, Some(KEY)).await;
        let third = agent.expect_bu(secs(2.0)).await;
        assert_eq!(third.seq, y.wrapping_add(1));

        // An unsigned one changes nothing.
        let body = Body::BindingAck {
            status: status::SEQUENCE_OUT_OF_WINDOW,
            seq: 7,
            lifetime: 0,
        };
        agent.send(third.from, third.msg.src, body, None).await;
        assert!(agent.next_bu(secs(0.5)).await.is_none());

        agent.ack(&third, status::ACCEPTED, 100, Some(KEY)).await;
        client.stop();
        let dereg = agent.expect_bu(secs(2.0)).await;
        assert_eq!((dereg.lifetime, dereg.seq), (0, y.wrapping_add(2)));
        agent.ack(&dereg, status::ACCEPTED, 0, Some(KEY)).await;
        assert_eq!(client.finish(secs(2.0)).await, 1);
    }

    #[tokio::test]
    async fn unsigned_or_wrongly_signed_acks_are_ignored() {
        logs();
        let agent = FakeAgent::new("127.0.0.1").await;
        let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
        cfg.initial_timeout = secs(0.2);
        cfg.max_timeout = secs(0.4);
        let mut client = Running::start(cfg, secs(5.0)).await;

        // Unsigned, then signed with another key: the client keeps retransmitting.
        let bu1 = agent.expect_bu(secs(3.0)).await;
        agent.ack(&bu1, status::ACCEPTED, 100, None).await;
        let bu2 = agent.expect_bu(secs(2.0)).await;
        assert!(seq_after(bu2.seq, bu1.seq));
        assert_eq!(bu2.lifetime, 100);
        agent
            .ack(&bu2, status::ACCEPTED, 100, Some(OTHER_KEY))
            .await;
        let bu3 = agent.expect_bu(secs(2.0)).await;
        assert!(seq_after(bu3.seq, bu2.seq));
        // An unsigned refusal is only logged; a signed one is retried with the backoff.
        agent.ack(&bu3, status::AUTH_FAILED, 0, None).await;
        let bu4 = agent.expect_bu(secs(2.0)).await;
        agent.ack(&bu4, status::PROHIBITED, 0, Some(KEY)).await;
        let bu5 = agent.expect_bu(secs(2.0)).await;
        assert!(seq_after(bu5.seq, bu4.seq));

        // Properly signed: registered, no more retransmissions.
        agent.ack(&bu5, status::ACCEPTED, 100, Some(KEY)).await;
        assert!(agent.next_bu(secs(1.2)).await.is_none());

        // Deregistration: a forged acknowledgement does not count; retransmitted every
        // initial_timeout until the real one.
        client.stop();
        let d1 = agent.expect_bu(secs(2.0)).await;
        assert_eq!(d1.lifetime, 0);
        agent.ack(&d1, status::ACCEPTED, 0, Some(OTHER_KEY)).await;
        let d2 = agent.expect_bu(secs(2.0)).await;
        assert_eq!(d2.lifetime, 0);
        assert!(seq_after(d2.seq, d1.seq));
        agent.ack(&d2, status::ACCEPTED, 0, Some(KEY)).await;
        assert_eq!(client.finish(secs(2.0)).await, 1);
    }

    #[tokio::test]
    async fn deregistration_gives_up_after_its_timeout() {
        logs();
        let agent = FakeAgent::new("127.0.0.1").await;
        let mut cfg = config(agent.addr(), "127.0.0.1", "192.0.2.80");
        cfg.initial_timeout = secs(0.1);
        cfg.max_timeout = secs(0.1);
        let mut client = Running::start(cfg, secs(0.55)).await;
        agent.expect_bu(secs(3.0)).await;
        client.stop();
        let mut deregs = 0;
        while let Some(bu) = agent.next_bu(secs(1.0)).await {
            deregs += usize::from(bu.lifetime == 0);
        }
        assert!(deregs >= 3, "{deregs} deregistration attempts");
        assert_eq!(client.finish(secs(1.0)).await, 0);
    }

    #[tokio::test]
    async fn one_binding_per_agent_and_real_address() {
        logs();
        let a4 = FakeAgent::new("127.0.0.1").await;
        let a6 = FakeAgent::new("::1").await;
        let mut cfg = config(a4.addr(), "127.0.0.1", "192.0.2.80");
        cfg.agents.push(a6.addr());
        cfg.real_addresses.push(ip("::1"));
        let mut client = Running::start(cfg, secs(5.0)).await;

        let mut client_addrs = Vec::new();
        for (agent, from) in [(&a4, "127.0.0.1"), (&a6, "::1")] {
            let b1 = agent.expect_bu(secs(3.0)).await;
            client_addrs.push(b1.from);
            let b2 = agent.expect_bu(secs(3.0)).await;
            assert_eq!(b1.from.ip(), ip(from));
            assert_ne!(b1.seq, b2.seq);
            let mut coas = [b1.msg.options.alt_coa, b2.msg.options.alt_coa];
            coas.sort();
            let mut want = [
                Some(wire::to_mapped(ip("127.0.0.1"))),
                Some(Ipv6Addr::LOCALHOST),
            ];
            want.sort();
            assert_eq!(coas, want);
            agent.ack(&b1, status::ACCEPTED, 100, Some(KEY)).await;
            agent.ack(&b2, status::ACCEPTED, 100, Some(KEY)).await;
        }
        // A refresh request refreshes both real addresses toward that agent only.
        let home = wire::to_mapped(ip("192.0.2.80"));
        a4.send(
            client_addrs[0],
            home,
            Body::BindingRefreshRequest,
            Some(KEY),
        )
        .await;
        let r1 = a4.expect_bu(secs(2.0)).await;
        let r2 = a4.expect_bu(secs(2.0)).await;
        assert_ne!(r1.msg.options.alt_coa, r2.msg.options.alt_coa);
        a4.ack(&r1, status::ACCEPTED, 100, Some(KEY)).await;
        a4.ack(&r2, status::ACCEPTED, 100, Some(KEY)).await;
        assert!(a6.next_bu(secs(0.3)).await.is_none());
        client.stop();
        let mut removed = 0;
        for agent in [&a4, &a6] {
            for _ in 0..2 {
                let d = agent.expect_bu(secs(2.0)).await;
                assert_eq!(d.lifetime, 0);
                agent.ack(&d, status::ACCEPTED, 0, Some(KEY)).await;
                removed += 1;
            }
        }
        assert_eq!(client.finish(secs(2.0)).await, removed);
    }

    #[tokio::test]
    async fn bad_configurations_are_refused_with_the_field() {
        let agent: SocketAddr = "127.0.0.1:4191".parse().unwrap();
        type Breaker = Box<dyn Fn(&mut ClientConfig)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("agents", Box::new(|c| c.agents.clear())),
            ("agents[1]", Box::new(move |c| c.agents.push(agent))),
            (
                "agents[0]",
                Box::new(|c| c.agents[0] = "127.0.0.1:0".parse().unwrap()),
            ),
            ("identity", Box::new(|c| c.identity.clear())),
            ("identity", Box::new(|c| c.identity = "x".repeat(300))),
            ("key", Box::new(|c| c.key.truncate(8))),
            ("bindings", Box::new(|c| c.bindings.clear())),
            (
                "bindings[0]",
                Box::new(|c| c.bindings[0].anycast = ip("0.0.0.0")),
            ),
            (
                "bindings[0]: protocol 1",
                Box::new(|c| c.bindings[0].selector.as_mut().unwrap().protocol = 1),
            ),
            (
                "bindings[1]",
                Box::new(|c| {
                    c.bindings.push(AnycastBinding {
                        anycast: ip("192.0.2.80"),
                        selector: Some(ServiceSelector {
                            protocol: PROTO_TCP,
                            port: 80,
                        }),
                    })
                }),
            ),
            ("real_addresses", Box::new(|c| c.real_addresses.clear())),
            (
                "real_addresses[1]",
                Box::new(|c| c.real_addresses.push(ip("127.0.0.1"))),
            ),
            ("lifetime", Box::new(|c| c.lifetime = secs(300_000.0))),
            (
                "initial_timeout",
                Box::new(|c| c.initial_timeout = secs(0.0)),
            ),
            ("max_timeout", Box::new(|c| c.max_timeout = secs(1.0))),
            (
                "load",
                Box::new(|c| c.load = LoadSource::Command(" ".into())),
            ),
        ];
        for (field, break_it) in cases {
            let mut cfg = config(agent, "127.0.0.1", "192.0.2.80");
            break_it(&mut cfg);
            let err = match Client::new(cfg).await {
                Ok(_) => panic!("{field}: accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(&format!("{field}:")), "{field}: {err}");
        }
        // The lifetime is rounded up to 4 s units, at least one.
        let mut cfg = config(agent, "127.0.0.1", "192.0.2.80");
        for (lifetime, units) in [(0.0, 1), (4.0, 1), (4.001, 2), (262_140.0, 65535)] {
            cfg.lifetime = secs(lifetime);
            assert_eq!(validate(&cfg).unwrap(), units, "{lifetime}");
        }
    }

    /// The kernel's text for 192.0.2.80, 2001:db8::80 and ::ffff:192.0.2.80 on a
    /// little-endian machine, in ESTABLISHED (01) and other states.
    #[cfg(target_endian = "little")]
    #[test]
    fn proc_net_tcp_lines_are_counted_by_state_and_local_address() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 500200C0:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 500200C0:0050 0B01A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 500200C0:0050 0C01A8C0:D432 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 500200C0:0050 0D01A8C0:D433 06 00000000:00000000 03:00000A3B 00000000     0        0 0 3 0000000000000000
   4: 0100007F:1F90 0100007F:D434 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 30 10 -1
   5: 510200C0:0050 0E01A8C0:D435 01 00000000:00000000 00:00000000 00000000     0        0 1005 1 0000000000000000 20 4 30 10 -1
";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: B80D0120000000000000000080000000:0050 B80D0120000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 20 4 30 10 -1
   2: B80D0120000000000000000080000000:0050 B80D0120000000000000000002000000:C351 08 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 20 4 30 10 -1
   3: 0000000000000000FFFF0000500200C0:0050 0000000000000000FFFF00000F01A8C0:C352 01 00000000:00000000 00:00000000 00000000     0        0 2004 1 0000000000000000 20 4 30 10 -1
   4: 00000000000000000000000001000000:0050 00000000000000000000000001000000:C353 01 00000000:00000000 00:00000000 00000000     0        0 2005 1 0000000000000000 20 4 30 10 -1
";
        let v4 = ip("192.0.2.80");
        let v6 = ip("2001:db8::80");
        assert_eq!(count_established(tcp, &[v4]), 2);
        assert_eq!(count_established(tcp, &[v4, ip("192.0.2.81")]), 3);
        assert_eq!(count_established(tcp, &[v6]), 0);
        assert_eq!(count_established(tcp6, &[v6]), 1);
        assert_eq!(
            count_established(tcp6, &[v4]),
            1,
            "IPv4-mapped counts as IPv4"
        );
        assert_eq!(count_established(tcp6, &[v4, v6, ip("::1")]), 3);
        assert_eq!(count_established(tcp6, &[ip("127.0.0.1")]), 0);
        assert_eq!(count_established("", &[v4]), 0);
        assert_eq!(count_established("garbage\n 1: zz:0050 x 01\n", &[v4]), 0);
    }

    #[tokio::test]
    async fn established_sessions_sees_a_live_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (_conn, _accepted) = (conn.unwrap(), accepted.unwrap());
        // Both ends have 127.0.0.1 as their local address.
        assert!(established_sessions(&[ip("127.0.0.1")]) >= 2);
    }

    #[tokio::test]
    async fn load_commands_are_run_and_parsed() {
        assert_eq!(parse_usage("12 100\n").unwrap(), (12, 100));
        assert!(parse_usage("12\n").is_err());
        assert!(parse_usage("12 lots").is_err());
        assert!(parse_usage("-1 100").is_err());
        assert_eq!(command_usage("echo 3 10").await.unwrap(), (3, 10));
        let err = command_usage("echo broken >&2; exit 3").await.unwrap_err();
        assert!(format!("{err:#}").contains("broken"), "{err:#}");
        assert!(command_usage("echo nothing useful").await.is_err());
    }

    #[tokio::test]
    async fn sockets_are_bound_to_a_real_address() {
        let s = bind_socket(Some(ip("127.0.0.1")), true).await.unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), ip("127.0.0.1"));
        let s = bind_socket(None, false).await.unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), ip("::"));
        // Not on this host: an IPv4 address is an error, an IPv6 one may still be tentative.
        let err = bind_socket(Some(ip("192.0.2.1")), true).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("not an address of this host"),
            "{err:#}"
        );
        let s = bind_socket(Some(ip("2001:db8::1")), false).await.unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), ip("2001:db8::1"));
    }

    #[test]
    fn status_names() {
        assert_eq!(
            status_name(status::SEQUENCE_OUT_OF_WINDOW),
            "sequence number out of window"
        );
        assert_eq!(status_name(status::AUTH_FAILED), "authentication failed");
        assert_eq!(status_name(200), "refused (unknown code)");
    }
}
