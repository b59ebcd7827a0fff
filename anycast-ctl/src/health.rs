//! Active health checks of the servers' real addresses, for sub-second detection.
//!
//! The kinds of check follow keepalived's checkers: ICMP echo (`ICMP_CHECK`), TCP connect
//! (`TCP_CHECK`), an HTTP GET judged by its status code (`HTTP_GET` with `status_code`) and an
//! operator's command judged by its exit status (`MISC_CHECK`). Like keepalived's
//! `delay_loop`/`connect_timeout`, each check has an interval and a timeout, and like its
//! `retry`/alpha mode a target only goes down after `fall` failures in a row and comes back
//! after `rise` successes in a row. Unlike keepalived's alpha mode, a new target starts up: a
//! server that has just registered is presumed healthy until a check fails.
//!
//! Health is `Up`, `Suspect` (the last check failed, fewer than `fall` in a row) or `Down`:
//!
//! ```text
//!   Up --1 failure--> Suspect --`fall` failures in a row--> Down --`rise` successes in a row--> Up
//!   Suspect --1 success--> Up          (with fall = 1, Up goes straight to Down)
//! ```
//!
//! The [`Checker`] holds the configuration, the targets and their state; [`run`] is the task
//! that checks them (on a current-thread runtime's `LocalSet`, never blocking the thread:
//! sockets and raw ICMP sockets are registered with tokio, commands run through
//! `tokio::process`). The agent shares the checker with the task as `Rc<RefCell<Checker>>`,
//! calls [`Checker::set_targets`] when the bindings change, reads [`Checker::health`] and
//! [`Checker::report`], and receives every [`Transition`] on a channel.
use std::{
    cell::{Cell, RefCell},
    collections::{hash_map::RandomState, BTreeMap, BTreeSet, HashMap},
    fmt,
    future::Future,
    hash::BuildHasher,
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd, unix::process::ExitStatusExt},
    pin::Pin,
    process::Stdio,
    rc::Rc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc::UnboundedSender, oneshot, Notify},
    task::{Id, JoinHandle, JoinSet},
};

/// Default milliseconds between two checks of a target.
pub const DEFAULT_INTERVAL_MS: u64 = 200;
/// Default milliseconds after which an unanswered check has failed.
pub const DEFAULT_TIMEOUT_MS: u64 = 150;
/// Default consecutive failures before a target is down.
pub const DEFAULT_FALL: u32 = 2;
/// Default consecutive successes before a down target is up again.
pub const DEFAULT_RISE: u32 = 2;
/// Bounds of `interval_ms`: below 10 ms the checks are a load of their own.
pub const MIN_INTERVAL_MS: u64 = 10;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// HTTP statuses that are healthy unless `expect` says otherwise.
pub const DEFAULT_EXPECT: &str = "200-399";

fn default_interval_ms() -> u64 {
    DEFAULT_INTERVAL_MS
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}

/// One way to check a server; configured per service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", from = "RawKind")]
pub enum CheckKind {
    /// ICMP (v4) / ICMPv6 echo to the real address.
    Icmp,
    /// TCP connect to the real address and `port` (default: the service port).
    Tcp {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    /// HTTP/1.0 GET `path` to the real address and port (default: the service port); healthy
    /// on a status in `expect` ("200", "200-299", "200,301-302"; default 200-399). `host` is
    /// the Host header (default: the real address, with the port unless it is 80).
    Http {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expect: Option<String>,
    },
    /// An operator's command (`sh -c`), healthy on exit 0; its environment has
    /// ANYCAST_REAL_ADDRESS, ANYCAST_PORT (the service port) and ANYCAST_SERVER (the server's
    /// name). A command still running at the timeout is killed with its process group.
    Command { command: String },
}

/// What `CheckKind` is read from. `CheckConfig` flattens the kind, and serde cannot deny
/// unknown fields on a struct with a flattened field; the fields left after the common ones
/// reach the kind, so the kind denies them (`Icmp {}` rather than a unit variant so that it
/// does too).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum RawKind {
    Icmp {},
    Tcp {
        port: Option<u16>,
    },
    Http {
        port: Option<u16>,
        path: String,
        host: Option<String>,
        expect: Option<String>,
    },
    Command {
        command: String,
    },
}

impl From<RawKind> for CheckKind {
    fn from(raw: RawKind) -> CheckKind {
        match raw {
            RawKind::Icmp {} => CheckKind::Icmp,
            RawKind::Tcp { port } => CheckKind::Tcp { port },
            RawKind::Http {
                port,
                path,
                host,
                expect,
            } => CheckKind::Http {
                port,
                path,
                host,
                expect,
            },
            RawKind::Command { command } => CheckKind::Command { command },
        }
    }
}

/// A check and its timing. Unknown fields are errors (denied through the kind, see
/// `RawKind`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CheckConfig {
    #[serde(flatten)]
    pub kind: CheckKind,
    /// Milliseconds between checks (default 200).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A check not answered within this is failed (default 150 ms; must be < interval).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive failures before down (default 2); the first failure makes the target
    /// suspect.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Consecutive successes before up again (default 2).
    #[serde(default = "default_rise")]
    pub rise: u32,
}

impl CheckConfig {
    /// A check of this kind with the default timing.
    pub fn new(kind: CheckKind) -> CheckConfig {
        CheckConfig {
            kind,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            fall: DEFAULT_FALL,
            rise: DEFAULT_RISE,
        }
    }

    /// Checks the values; an error names the field under `field` (`services[0].check`) and
    /// says why: `services[0].check.timeout_ms: must be less than interval_ms (200)`.
    pub fn validate(&self, field: &str) -> Result<(), String> {
        let bad = |sub: &str, why: String| Err(format!("{field}.{sub}: {why}"));
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return bad(
                "interval_ms",
                format!(
                    "must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS} (is {})",
                    self.interval_ms
                ),
            );
        }
        if self.timeout_ms == 0 || self.timeout_ms >= self.interval_ms {
            return bad(
                "timeout_ms",
                format!(
                    "must be at least 1 and less than interval_ms ({}) (is {})",
                    self.interval_ms, self.timeout_ms
                ),
            );
        }
        if self.fall == 0 {
            return bad("fall", "must be at least 1".into());
        }
        if self.rise == 0 {
            return bad("rise", "must be at least 1".into());
        }
        match &self.kind {
            CheckKind::Icmp => {}
            CheckKind::Tcp { port } => {
                if *port == Some(0) {
                    return bad(
                        "port",
                        "must be 1-65535 (or absent: the service port)".into(),
                    );
                }
            }
            CheckKind::Http {
                port,
                path,
                host,
                expect,
            } => {
                if *port == Some(0) {
                    return bad(
                        "port",
                        "must be 1-65535 (or absent: the service port)".into(),
                    );
                }
                if !path.starts_with('/') || !is_token(path) {
                    return bad(
                        "path",
                        format!("must start with '/', without spaces or controls (is {path:?})"),
                    );
                }
                if let Some(h) = host {
                    if h.is_empty() || !is_token(h) {
                        return bad(
                            "host",
                            format!("must be non-empty, without spaces or controls (is {h:?})"),
                        );
                    }
                }
                if let Some(e) = expect {
                    if let Err(why) = parse_expect(e) {
                        return bad("expect", why);
                    }
                }
            }
            CheckKind::Command { command } => {
                if command.trim().is_empty() {
                    return bad("command", "must not be empty".into());
                }
                if command.contains('\0') {
                    return bad("command", "must not contain NUL".into());
                }
            }
        }
        Ok(())
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.clamp(1, MAX_INTERVAL_MS))
    }
}

/// Printable ASCII without spaces: what may go into the request line or a header.
fn is_token(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses "200", "200-299" or "200,204,301-302" into inclusive ranges.
fn parse_expect(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let code = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => Ok(c),
            _ => Err(format!(
                "{s:?} is not a status 100-599 (write e.g. \"200\", \"200-299\", \"200,302\")"
            )),
        }
    };
    let mut ranges = Vec::new();
    for part in text.split(',') {
        let range = match part.split_once('-') {
            Some((lo, hi)) => (code(lo)?, code(hi)?),
            None => {
                let c = code(part)?;
                (c, c)
            }
        };
        if range.0 > range.1 {
            return Err(format!("{part:?} is an empty range"));
        }
        ranges.push(range);
    }
    Ok(ranges)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Suspect,
    Down,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Down => "down",
        })
    }
}

/// What is checked: a server's real address for one service port, with one check config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub server: String,
    pub real: IpAddr,
    /// The service port (what TCP and HTTP checks connect to unless their config names one).
    pub port: u16,
    /// Index of the check config in the checker's list.
    pub check: usize,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (check {})",
            self.server,
            SocketAddr::new(self.real, self.port),
            self.check
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub target: Target,
    pub from: Health,
    pub to: Health,
    pub at: Instant,
    /// The result of the check that made the transition ("connection refused", "timeout 150ms").
    pub detail: String,
}

/// The fall/rise state machine of one target, pure: results in, transitions out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    pub health: Health,
    /// Consecutive failures (while up or suspect).
    pub failures: u32,
    /// Consecutive successes (while down).
    pub successes: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            health: Health::Up,
            failures: 0,
            successes: 0,
        }
    }
}

impl Tracker {
    /// Takes one check result; returns (from, to) when the health changes.
    pub fn observe(&mut self, ok: bool, fall: u32, rise: u32) -> Option<(Health, Health)> {
        let from = self.health;
        if ok {
            self.failures = 0;
            match self.health {
                Health::Up => {}
                Health::Suspect => self.health = Health::Up,
                Health::Down => {
                    self.successes = self.successes.saturating_add(1);
                    if self.successes >= rise.max(1) {
                        self.health = Health::Up;
                        self.successes = 0;
                    }
                }
            }
        } else {
            self.successes = 0;
            if self.health != Health::Down {
                self.failures = self.failures.saturating_add(1);
                self.health = if self.failures >= fall.max(1) {
                    self.failures = 0;
                    Health::Down
                } else {
                    Health::Suspect
                };
            }
        }
        (self.health != from).then_some((from, self.health))
    }
}

struct Slot {
    tracker: Tracker,
    detail: String,
    /// When the next check starts.
    due: Instant,
    in_flight: bool,
    /// Tells this target's results from those of an earlier target of the same name that was
    /// removed and added again while its check was running.
    generation: u64,
}

/// A check to start.
struct Start {
    target: Target,
    generation: u64,
    check: CheckConfig,
}

/// The targets, their check configs and their state; shared with [`run`].
pub struct Checker {
    checks: Vec<CheckConfig>,
    targets: BTreeMap<Target, Slot>,
    wake: Rc<Notify>,
    /// ICMP echo identifier and payload cookie of this checker.
    ident: u16,
    cookie: u64,
    generation: u64,
    jitter: RandomState,
}

impl Checker {
    /// A checker with these check configs (validated beforehand with
    /// [`CheckConfig::validate`]; out-of-range timings are clamped) and no target.
    pub fn new(checks: Vec<CheckConfig>) -> Checker {
        let jitter = RandomState::new();
        let random = jitter.hash_one((std::process::id(), Instant::now()));
        Checker {
            checks,
            targets: BTreeMap::new(),
            wake: Rc::new(Notify::new()),
            ident: (random >> 48) as u16,
            cookie: RandomState::new().hash_one(random),
            generation: 0,
            jitter,
        }
    }

    pub fn checks(&self) -> &[CheckConfig] {
        &self.checks
    }

    /// Sets the targets to check: added targets start up (a server that just registered is
    /// presumed healthy until a check fails) and are first checked at a random point of their
    /// first interval, so checks spread out; removed ones are forgotten. A target whose check
    /// index has no config is ignored (and logged).
    pub fn set_targets(&mut self, targets: impl IntoIterator<Item = Target>) {
        let now = Instant::now();
        let wanted: BTreeSet<Target> = targets
            .into_iter()
            .filter(|t| {
                let known = t.check < self.checks.len();
                if !known {
                    tracing::error!("health: {t}: no check config {}, not checked", t.check);
                }
                known
            })
            .collect();
        self.targets.retain(|t, _| wanted.contains(t));
        for target in wanted {
            if self.targets.contains_key(&target) {
                continue;
            }
            self.generation += 1;
            let due = now + self.first_delay(&target);
            self.targets.insert(
                target,
                Slot {
                    tracker: Tracker::default(),
                    detail: "not checked yet".into(),
                    due,
                    in_flight: false,
                    generation: self.generation,
                },
            );
        }
        self.wake.notify_one();
    }

    /// Replaces the check configs (on a reload). Targets whose index no longer has a config
    /// are forgotten; targets whose config changed keep their health, restart their counts
    /// and are rescheduled.
    pub fn set_checks(&mut self, checks: Vec<CheckConfig>) {
        let now = Instant::now();
        let old = std::mem::replace(&mut self.checks, checks);
        let checks = &self.checks;
        self.targets.retain(|t, _| t.check < checks.len());
        let changed: Vec<Target> = self
            .targets
            .keys()
            .filter(|t| old.get(t.check) != self.checks.get(t.check))
            .cloned()
            .collect();
        for t in changed {
            let delay = self.first_delay(&t);
            if let Some(slot) = self.targets.get_mut(&t) {
                slot.tracker.failures = 0;
                slot.tracker.successes = 0;
                slot.due = now + delay;
            }
        }
        self.wake.notify_one();
    }

    fn first_delay(&self, target: &Target) -> Duration {
        let interval = self.checks[target.check].interval();
        let r = self.jitter.hash_one((target, self.generation));
        Duration::from_nanos(r % interval.as_nanos().max(1) as u64)
    }

    pub fn health(&self, target: &Target) -> Option<Health> {
        self.targets.get(target).map(|s| s.tracker.health)
    }

    /// All targets, their health and the last check's result, in target order.
    pub fn report(&self) -> Vec<(Target, Health, String)> {
        self.targets
            .iter()
            .map(|(t, s)| (t.clone(), s.tracker.health, s.detail.clone()))
            .collect()
    }

    /// The checks due at `now` (marked in flight and rescheduled one interval later), and
    /// when the next idle target is due.
    fn take_due(&mut self, now: Instant) -> (Vec<Start>, Option<Instant>) {
        let mut starts = Vec::new();
        let mut next: Option<Instant> = None;
        for (target, slot) in &mut self.targets {
            if slot.in_flight {
                continue;
            }
            if slot.due <= now {
                let check = self.checks[target.check].clone();
                slot.due += check.interval();
                if slot.due <= now {
                    // Late by more than an interval (the thread was busy): no catching up.
                    slot.due = now + check.interval();
                }
                slot.in_flight = true;
                starts.push(Start {
                    target: target.clone(),
                    generation: slot.generation,
                    check,
                });
                continue;
            }
            next = Some(next.map_or(slot.due, |n| n.min(slot.due)));
        }
        (starts, next)
    }

    /// Takes a check's result; returns the transition it makes, if any.
    fn record(
        &mut self,
        target: &Target,
        generation: u64,
        ok: bool,
        detail: String,
        at: Instant,
    ) -> Option<Transition> {
        let check = self.checks.get(target.check)?;
        let (fall, rise) = (check.fall, check.rise);
        let slot = self.targets.get_mut(target)?;
        if slot.generation != generation {
            return None;
        }
        slot.in_flight = false;
        let change = slot.tracker.observe(ok, fall, rise);
        slot.detail = detail;
        change.map(|(from, to)| Transition {
            target: target.clone(),
            from,
            to,
            at,
            detail: slot.detail.clone(),
        })
    }
}

fn log_transition(t: &Transition) {
    if t.to == Health::Up {
        tracing::info!("health: {} {} -> {}: {}", t.target, t.from, t.to, t.detail);
    } else {
        tracing::warn!("health: {} {} -> {}: {}", t.target, t.from, t.to, t.detail);
    }
}

/// Starts [`run`] on the current `LocalSet` (call it from inside one).
pub fn spawn(checker: &Rc<RefCell<Checker>>, tx: UnboundedSender<Transition>) -> JoinHandle<()> {
    tokio::task::spawn_local(run(checker.clone(), tx))
}

/// Checks the targets forever, logging every transition once and sending it on `tx` (a
/// closed channel is ignored: health stays readable through the checker). Runs on a
/// `LocalSet`; dropping or aborting it cancels the checks in flight (and kills their
/// commands). The checker must not be borrowed across an await by its other users.
pub async fn run(checker: Rc<RefCell<Checker>>, tx: UnboundedSender<Transition>) {
    let (wake, ident, cookie) = {
        let c = checker.borrow();
        (c.wake.clone(), c.ident, c.cookie)
    };
    let mut probes = Probes {
        ident,
        cookie,
        v4: None,
        v6: None,
        readers: JoinSet::new(),
    };
    let mut running: JoinSet<(bool, String)> = JoinSet::new();
    let mut owners: HashMap<Id, (Target, u64)> = HashMap::new();
    loop {
        let (starts, next) = checker.borrow_mut().take_due(Instant::now());
        for start in starts {
            let probe = probes.probe(&start.target, &start.check.kind);
            let limit = start.check.timeout();
            let task = running.spawn_local(async move {
                match tokio::time::timeout(limit, probe).await {
                    Ok(Ok(detail)) => (true, detail),
                    Ok(Err(detail)) => (false, detail),
                    Err(_) => (false, format!("timeout {}ms", limit.as_millis())),
                }
            });
            owners.insert(task.id(), (start.target, start.generation));
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = wake.notified() => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, ok, detail) = match done {
                    Ok((id, (ok, detail))) => (id, ok, detail),
                    Err(e) => (e.id(), false, format!("check failed: {e}")),
                };
                if let Some((target, generation)) = owners.remove(&id) {
                    let now = Instant::now();
                    let change = checker.borrow_mut().record(&target, generation, ok, detail, now);
                    if let Some(t) = change {
                        log_transition(&t);
                        let _ = tx.send(t);
                    }
                }
            }
        }
    }
}

type Probe = Pin<Box<dyn Future<Output = Result<String, String>>>>;

/// Builds the checks' futures; owns the ICMP sockets (opened on first use) and their readers.
struct Probes {
    ident: u16,
    cookie: u64,
    v4: Option<Rc<Pinger>>,
    v6: Option<Rc<Pinger>>,
    readers: JoinSet<()>,
}

impl Probes {
    fn pinger(&mut self, v6: bool) -> Result<Rc<Pinger>, String> {
        let slot = if v6 { &mut self.v6 } else { &mut self.v4 };
        if let Some(p) = slot {
            return Ok(p.clone());
        }
        let p = Pinger::open(v6, self.ident, self.cookie).map_err(|e| {
            format!(
                "cannot open the raw ICMP{} socket: {e}",
                if v6 { "v6" } else { "" }
            )
        })?;
        let p = Rc::new(p);
        self.readers.spawn_local(p.clone().receive());
        *slot = Some(p.clone());
        Ok(p)
    }

    fn probe(&mut self, target: &Target, kind: &CheckKind) -> Probe {
        let real = target.real.to_canonical();
        let port = |p: &Option<u16>| p.unwrap_or(target.port);
        let no_port = || -> Probe {
            Box::pin(std::future::ready(Err(
                "no port: the service has any port (0); give the check a port".to_string(),
            )))
        };
        match kind {
            CheckKind::Icmp => match self.pinger(real.is_ipv6()) {
                Ok(p) => Box::pin(async move { p.ping(real).await }),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
            CheckKind::Tcp { port: p } => match port(p) {
                0 => no_port(),
                p => Box::pin(tcp(SocketAddr::new(real, p))),
            },
            CheckKind::Http {
                port: p,
                path,
                host,
                expect,
            } => {
                let p = port(p);
                if p == 0 {
                    return no_port();
                }
                let addr = SocketAddr::new(real, p);
                let host = host.clone().unwrap_or_else(|| match (p, real) {
                    (80, IpAddr::V4(a)) => a.to_string(),
                    (80, IpAddr::V6(a)) => format!("[{a}]"),
                    _ => addr.to_string(),
                });
                let expect = expect.clone().unwrap_or_else(|| DEFAULT_EXPECT.into());
                Box::pin(http(addr, path.clone(), host, expect))
            }
            CheckKind::Command { command } => Box::pin(run_command(
                command.clone(),
                target.server.clone(),
                target.real,
                target.port,
            )),
        }
    }
}

fn fmt_elapsed(since: Instant) -> String {
    format!("{:.2}ms", since.elapsed().as_secs_f64() * 1000.0)
}

fn connect_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => format!("connect: {e}"),
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
    // Close with a reset: checks several times a second would otherwise leave hundreds of
    // TIME_WAIT sockets per target on the agent.
    let _ = stream.set_zero_linger();
    Ok(stream)
}

async fn tcp(addr: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    connect(addr).await?;
    Ok(format!("connected in {}", fmt_elapsed(started)))
}

/// Longest status line read.
const MAX_STATUS_LINE: usize = 1024;

async fn http(
    addr: SocketAddr,
    path: String,
    host: String,
    expect: String,
) -> Result<String, String> {
    let started = Instant::now();
    let ranges = parse_expect(&expect)?;
    let mut stream = connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: anycast-ctl health check\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let end = loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            break i;
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes"
            ));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "connection closed without a response".into()
            } else {
                "connection closed in the status line".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let status = parse_status_line(&buf[..end])?;
    if ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&status)) {
        Ok(format!("HTTP {status} in {}", fmt_elapsed(started)))
    } else {
        Err(format!("HTTP {status} (expected {expect})"))
    }
}

fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let mut words = text.split(' ').filter(|w| !w.is_empty());
    let version = words.next().unwrap_or("");
    let code = words.next().unwrap_or("");
    if version.starts_with("HTTP/") && code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(c) = code.parse() {
            return Ok(c);
        }
    }
    let shown: String = text.chars().take(60).collect();
    Err(format!("malformed status line {shown:?}"))
}

/// Kills a command's process group when the check is cancelled (timed out) before the
/// command ended: `sh -c` may have children of its own.
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: plain syscall. The group's leader is our unreaped child, so its id
            // cannot have been reused.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

async fn run_command(
    command: String,
    server: String,
    real: IpAddr,
    port: u16,
) -> Result<String, String> {
    let started = Instant::now();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("ANYCAST_REAL_ADDRESS", real.to_string())
        .env("ANYCAST_PORT", port.to_string())
        .env("ANYCAST_SERVER", &server)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let mut group = KillGroup(child.id());
    let out = child.wait_with_output().await;
    group.0 = None;
    let out = out.map_err(|e| format!("waiting for the command: {e}"))?;
    if out.status.success() {
        return Ok(format!("exit 0 in {}", fmt_elapsed(started)));
    }
    let mut why = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => format!("{}", out.status),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stderr.lines().rev().find(|l| !l.trim().is_empty()) {
        why.push_str(": ");
        why.extend(line.trim().chars().take(160));
    }
    Err(why)
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
/// `ICMP_FILTER` (level `SOL_RAW`) and `ICMP6_FILTER` (level `IPPROTO_ICMPV6`) from Linux's
/// uapi headers; the libc crate has neither.
const ICMP_FILTER: libc::c_int = 1;
const ICMP6_FILTER: libc::c_int = 1;
/// ICMP header (8 bytes) and the checker's 8-byte cookie.
const ECHO_LEN: usize = 16;

/// The internet checksum (RFC 1071); 0 over a message that holds its correct checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: identifier, sequence number and the checker's cookie as payload. The
/// ICMPv6 checksum is left to the kernel (raw IPPROTO_ICMPV6 sockets compute it, RFC 3542).
fn echo_request(v6: bool, ident: u16, seq: u16, cookie: u64) -> [u8; ECHO_LEN] {
    let mut p = [0u8; ECHO_LEN];
    p[0] = if v6 {
        ICMP6_ECHO_REQUEST
    } else {
        ICMP_ECHO_REQUEST
    };
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&cookie.to_be_bytes());
    if !v6 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The sequence number of an echo reply to this checker (identifier and cookie match), from
/// what a raw socket reads: the IPv4 packet with its header, or the ICMPv6 message alone
/// (whose checksum the kernel has verified).
fn parse_echo_reply(v6: bool, data: &[u8], ident: u16, cookie: u64) -> Option<u16> {
    let icmp = if v6 {
        data
    } else {
        let first = *data.first()?;
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < 20 || data.len() < ihl || data[9] != 1 {
            return None;
        }
        let icmp = &data[ihl..];
        if checksum(icmp) != 0 {
            return None;
        }
        icmp
    };
    if icmp.len() < ECHO_LEN {
        return None;
    }
    let reply = if v6 {
        ICMP6_ECHO_REPLY
    } else {
        ICMP_ECHO_REPLY
    };
    if icmp[0] != reply
        || icmp[1] != 0
        || icmp[4..6] != ident.to_be_bytes()
        || icmp[8..16] != cookie.to_be_bytes()
    {
        return None;
    }
    Some(u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// One raw ICMP socket (per family) shared by the checker's ICMP checks; a reader task hands
/// each reply to the check waiting for its sequence number and source.
struct Pinger {
    v6: bool,
    fd: AsyncFd<Socket>,
    ident: u16,
    cookie: u64,
    next_seq: Cell<u16>,
    waiting: RefCell<HashMap<u16, (IpAddr, oneshot::Sender<()>)>>,
}

/// Forgets a ping's sequence number when the ping ends, answered or not (timed out).
struct Forget<'a> {
    pinger: &'a Pinger,
    seq: u16,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.pinger.waiting.borrow_mut().remove(&self.seq);
    }
}

impl Pinger {
    fn open(v6: bool, ident: u16, cookie: u64) -> io::Result<Pinger> {
        let socket = if v6 {
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
        } else {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
        };
        socket.set_nonblocking(true)?;
        if let Err(e) = set_echo_reply_filter(&socket, v6) {
            tracing::debug!("health: ICMP filter not set ({e}); replies are filtered in userspace");
        }
        // SAFETY: the socket owns its descriptor, which is neither replaced nor closed while
        // the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(socket)? };
        Ok(Pinger {
            v6,
            fd,
            ident,
            cookie,
            next_seq: Cell::new(0),
            waiting: RefCell::new(HashMap::new()),
        })
    }

    async fn ping(&self, dest: IpAddr) -> Result<String, String> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let seq = {
            let mut waiting = self.waiting.borrow_mut();
            let mut seq = self.next_seq.get();
            for _ in 0..u16::MAX {
                if !waiting.contains_key(&seq) {
                    break;
                }
                seq = seq.wrapping_add(1);
            }
            self.next_seq.set(seq.wrapping_add(1));
            waiting.insert(seq, (dest, tx));
            seq
        };
        let _forget = Forget { pinger: self, seq };
        let packet = echo_request(self.v6, self.ident, seq, self.cookie);
        let to = SockAddr::from(SocketAddr::new(dest, 0));
        loop {
            let mut ready = self
                .fd
                .writable()
                .await
                .map_err(|e| format!("ICMP socket: {e}"))?;
            match ready.try_io(|s| s.get_ref().send_to(&packet, &to)) {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => return Err(format!("sending the echo request: {e}")),
                Err(_would_block) => continue,
            }
        }
        rx.await
            .map_err(|_| "the ICMP reader stopped".to_string())?;
        Ok(format!("echo reply in {}", fmt_elapsed(started)))
    }

    /// Hands a datagram read from the socket to the ping it answers, if any: same identifier,
    /// cookie and sequence number, and from the address that ping was sent to.
    fn dispatch(&self, data: &[u8], from: Option<IpAddr>) {
        let Some(seq) = parse_echo_reply(self.v6, data, self.ident, self.cookie) else {
            return;
        };
        let mut waiting = self.waiting.borrow_mut();
        let matches = waiting
            .get(&seq)
            .is_some_and(|(dest, _)| Some(*dest) == from);
        if matches {
            if let Some((_, tx)) = waiting.remove(&seq) {
                let _ = tx.send(());
            }
        }
    }

    async fn receive(self: Rc<Self>) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        loop {
            let mut ready = match self.fd.readable().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("health: ICMP socket: {e}; ICMP checks will time out");
                    return;
                }
            };
            match ready.try_io(|s| s.get_ref().recv_from(&mut buf)) {
                Ok(Ok((n, from))) => {
                    // SAFETY: recv_from initialised the first n bytes of buf.
                    let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                    let from = from.as_socket().map(|a| a.ip().to_canonical());
                    self.dispatch(data, from);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::debug!("health: reading the ICMP socket: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_would_block) => {}
            }
        }
    }
}

/// Lets only echo replies reach the socket, so the checker is not woken by every ICMP
/// message the host receives (raw sockets get a copy of each).
fn set_echo_reply_filter(socket: &Socket, v6: bool) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let rc = if v6 {
        // A set bit blocks the type.
        let mut filter = [u32::MAX; 8];
        filter[usize::from(ICMP6_ECHO_REPLY >> 5)] &= !(1u32 << (ICMP6_ECHO_REPLY & 31));
        // SAFETY: fd is an open socket; the option value is the 32-byte icmp6_filter.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_ICMPV6,
                ICMP6_FILTER,
                filter.as_ptr().cast(),
                std::mem::size_of_val(&filter) as libc::socklen_t,
            )
        }
    } else {
        // A set bit blocks the type (types 0-31).
        let mask: u32 = !(1u32 << ICMP_ECHO_REPLY);
        // SAFETY: fd is an open socket; the option value is the 4-byte icmp_filter.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_RAW,
                ICMP_FILTER,
                (&mask as *const u32).cast(),
                std::mem::size_of_val(&mask) as libc::socklen_t,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
        task::LocalSet,
    };

    use super::*;

    const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    fn config(
        kind: CheckKind,
        interval_ms: u64,
        timeout_ms: u64,
        fall: u32,
        rise: u32,
    ) -> CheckConfig {
        CheckConfig {
            kind,
            interval_ms,
            timeout_ms,
            fall,
            rise,
        }
    }

    fn target(server: &str, real: IpAddr, port: u16, check: usize) -> Target {
        Target {
            server: server.into(),
            real,
            port,
            check,
        }
    }

    /// A checker running on the current LocalSet, and its transitions.
    fn start(
        checks: Vec<CheckConfig>,
        targets: Vec<Target>,
    ) -> (
        Rc<RefCell<Checker>>,
        mpsc::UnboundedReceiver<Transition>,
        JoinHandle<()>,
    ) {
        let checker = Rc::new(RefCell::new(Checker::new(checks)));
        checker.borrow_mut().set_targets(targets);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = spawn(&checker, tx);
        (checker, rx, task)
    }

    /// The next transition of `target` within `within`, skipping the others' (kept in `seen`).
    async fn next_of(
        rx: &mut mpsc::UnboundedReceiver<Transition>,
        target: &Target,
        within: Duration,
        seen: &mut Vec<Transition>,
    ) -> Option<Transition> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let t = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
            if &t.target == target {
                return Some(t);
            }
            seen.push(t);
        }
    }

    /// Polls `done` until it holds or `within` passes; whether it held.
    async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while !done() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn detail_of(checker: &Rc<RefCell<Checker>>, t: &Target) -> String {
        let report = checker.borrow().report();
        let (_, _, detail) = report.into_iter().find(|(x, _, _)| x == t).unwrap();
        detail
    }

    /// Accepts and drops connections until aborted.
    fn serve_tcp(listener: TcpListener) -> JoinHandle<()> {
        tokio::task::spawn_local(async move {
            loop {
                let _ = listener.accept().await;
            }
        })
    }

    #[test]
    fn state_machine_fall_rise_suspect() {
        let mut t = Tracker::default();
        assert_eq!(t.health, Health::Up);
        assert_eq!(t.observe(true, 3, 2), None);
        // Up -1 failure-> Suspect, then a success brings it back.
        assert_eq!(t.observe(false, 3, 2), Some((Health::Up, Health::Suspect)));
        assert_eq!(t.observe(true, 3, 2), Some((Health::Suspect, Health::Up)));
        // fall failures in a row: Suspect, Suspect (no transition), Down.
        assert_eq!(t.observe(false, 3, 2), Some((Health::Up, Health::Suspect)));
        assert_eq!(t.observe(false, 3, 2), None);
        assert_eq!(t.health, Health::Suspect);
        assert_eq!(
            t.observe(false, 3, 2),
            Some((Health::Suspect, Health::Down))
        );
        assert_eq!(t.observe(false, 3, 2), None);
        // rise successes in a row; a failure in between restarts the count.
        assert_eq!(t.observe(true, 3, 2), None);
        assert_eq!(t.observe(false, 3, 2), None);
        assert_eq!(t.observe(true, 3, 2), None);
        assert_eq!(t.health, Health::Down);
        assert_eq!(t.observe(true, 3, 2), Some((Health::Down, Health::Up)));
        // Failures before the success do not count towards the next fall.
        assert_eq!(t.observe(false, 3, 2), Some((Health::Up, Health::Suspect)));
        assert_eq!(t.observe(false, 3, 2), None);
        assert_eq!(t.observe(true, 3, 2), Some((Health::Suspect, Health::Up)));
        assert_eq!(t.observe(false, 3, 2), Some((Health::Up, Health::Suspect)));
        assert_eq!(t.observe(false, 3, 2), None);
        assert_eq!(t.health, Health::Suspect);

        // fall 1: straight down; rise 1: straight up.
        let mut t = Tracker::default();
        assert_eq!(t.observe(false, 1, 1), Some((Health::Up, Health::Down)));
        assert_eq!(t.observe(true, 1, 1), Some((Health::Down, Health::Up)));
        // The defaults: fall 2, rise 2.
        let mut t = Tracker::default();
        let seq: Vec<_> = [false, false, true, true]
            .into_iter()
            .map(|ok| t.observe(ok, DEFAULT_FALL, DEFAULT_RISE))
            .collect();
        assert_eq!(
            seq,
            [
                Some((Health::Up, Health::Suspect)),
                Some((Health::Suspect, Health::Down)),
                None,
                Some((Health::Down, Health::Up)),
            ]
        );
    }

    #[test]
    fn config_parses_with_defaults_and_denies_unknown_fields() {
        let c: CheckConfig = serde_json::from_str(r#"{"type": "tcp"}"#).unwrap();
        assert_eq!(c, CheckConfig::new(CheckKind::Tcp { port: None }));
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.fall, c.rise),
            (200, 150, 2, 2)
        );
        let c: CheckConfig = serde_json::from_str(
            r#"{"type": "http", "port": 8080, "path": "/health", "host": "example.test",
                "expect": "200-299", "interval_ms": 100, "timeout_ms": 80, "fall": 3, "rise": 1}"#,
        )
        .unwrap();
        assert_eq!(
            c.kind,
            CheckKind::Http {
                port: Some(8080),
                path: "/health".into(),
                host: Some("example.test".into()),
                expect: Some("200-299".into()),
            }
        );
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.fall, c.rise),
            (100, 80, 3, 1)
        );
        // What is written reads back the same.
        for c in [
            c,
            CheckConfig::new(CheckKind::Icmp),
            CheckConfig::new(CheckKind::Command {
                command: "true".into(),
            }),
        ] {
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(
                serde_json::from_str::<CheckConfig>(&text).unwrap(),
                c,
                "{text}"
            );
        }
        for (text, needle) in [
            (r#"{"type": "icmp", "port": 1}"#, "unknown field `port`"),
            (
                r#"{"type": "tcp", "intervall_ms": 1}"#,
                "unknown field `intervall_ms`",
            ),
            (
                r#"{"type": "http", "path": "/", "bogus": 1}"#,
                "unknown field `bogus`",
            ),
            (r#"{"type": "ping"}"#, "unknown variant `ping`"),
            (r#"{"interval_ms": 100}"#, "missing field `type`"),
            (r#"{"type": "http"}"#, "missing field `path`"),
            (r#"{"type": "command"}"#, "missing field `command`"),
        ] {
            let e = serde_json::from_str::<CheckConfig>(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let f = "services[1].check";
        assert_eq!(CheckConfig::new(CheckKind::Icmp).validate(f), Ok(()));
        let http = |path: &str, host: Option<&str>, expect: Option<&str>| CheckKind::Http {
            port: None,
            path: path.into(),
            host: host.map(Into::into),
            expect: expect.map(Into::into),
        };
        assert_eq!(
            config(
                http("/", Some("a.test"), Some("200,301-302")),
                200,
                150,
                2,
                2
            )
            .validate(f),
            Ok(())
        );
        for (c, want) in [
            (
                config(CheckKind::Icmp, 200, 200, 2, 2),
                "timeout_ms: must be at least 1 and less than interval_ms (200) (is 200)",
            ),
            (
                config(CheckKind::Icmp, 200, 0, 2, 2),
                "timeout_ms: must be at least 1 and less than interval_ms (200) (is 0)",
            ),
            (
                config(CheckKind::Icmp, 5, 1, 2, 2),
                "interval_ms: must be between 10 and 3600000 (is 5)",
            ),
            (
                config(CheckKind::Icmp, 200, 150, 0, 2),
                "fall: must be at least 1",
            ),
            (
                config(CheckKind::Icmp, 200, 150, 2, 0),
                "rise: must be at least 1",
            ),
            (
                config(CheckKind::Tcp { port: Some(0) }, 200, 150, 2, 2),
                "port: must be 1-65535 (or absent: the service port)",
            ),
            (
                config(http("health", None, None), 200, 150, 2, 2),
                "path: must start with '/', without spaces or controls (is \"health\")",
            ),
            (
                config(http("/a b", None, None), 200, 150, 2, 2),
                "path: must start with '/', without spaces or controls (is \"/a b\")",
            ),
            (
                config(http("/", Some("a\r\nX: y"), None), 200, 150, 2, 2),
                "host: must be non-empty, without spaces or controls (is \"a\\r\\nX: y\")",
            ),
            (
                config(http("/", None, Some("2xx")), 200, 150, 2, 2),
                "expect: \"2xx\" is not a status 100-599 \
                 (write e.g. \"200\", \"200-299\", \"200,302\")",
            ),
            (
                config(http("/", None, Some("399-200")), 200, 150, 2, 2),
                "expect: \"399-200\" is an empty range",
            ),
            (
                config(
                    CheckKind::Command {
                        command: " ".into(),
                    },
                    200,
                    150,
                    2,
                    2,
                ),
                "command: must not be empty",
            ),
        ] {
            assert_eq!(c.validate(f), Err(format!("{f}.{want}")));
        }
        assert_eq!(
            parse_expect("200, 204,300-302"),
            Ok(vec![(200, 200), (204, 204), (300, 302)])
        );
    }

    #[test]
    fn targets_start_up_and_removed_ones_are_forgotten() {
        let mut c = Checker::new(vec![CheckConfig::new(CheckKind::Icmp)]);
        let a = target("a", LO4, 80, 0);
        let b = target("b", LO6, 80, 0);
        let bad = target("c", LO4, 80, 7);
        c.set_targets([a.clone(), b.clone(), bad.clone()]);
        assert_eq!(c.health(&a), Some(Health::Up));
        assert_eq!(c.health(&b), Some(Health::Up));
        assert_eq!(c.health(&bad), None, "no check config 7");
        // The first checks are spread over the first interval.
        let now = Instant::now();
        let (starts, next) = c.take_due(now + Duration::from_millis(200));
        assert_eq!(starts.len(), 2);
        assert!(next.is_none(), "both in flight");
        let (gen_a, gen_b) = (starts[0].generation, starts[1].generation);
        // A result makes a transition; a stale generation is ignored.
        let t = c
            .record(&a, gen_a, false, "connection refused".into(), now)
            .unwrap();
        assert_eq!(
            (t.from, t.to, t.detail.as_str()),
            (Health::Up, Health::Suspect, "connection refused")
        );
        assert_eq!(c.record(&b, gen_b + 100, false, "x".into(), now), None);
        assert_eq!(c.health(&b), Some(Health::Up));
        // Removed, then added again: forgotten, so up again.
        c.set_targets([b.clone()]);
        assert_eq!(c.health(&a), None);
        c.set_targets([a.clone(), b.clone()]);
        assert_eq!(c.health(&a), Some(Health::Up));
        assert_eq!(
            c.record(&a, gen_a, false, "late".into(), now),
            None,
            "old generation"
        );
        let report = c.report();
        assert_eq!(report.len(), 2);
        assert_eq!(
            report[0],
            (a.clone(), Health::Up, "not checked yet".to_string())
        );
        // Changed configs: the target keeps its health; an index that went away is dropped.
        c.set_checks(vec![]);
        assert!(c.report().is_empty());
    }

    #[test]
    fn echo_replies_are_matched_by_identifier_cookie_and_sequence() {
        let (ident, cookie) = (0x1234, 0x0102_0304_0506_0708);
        // An IPv4 reply as the raw socket reads it: IP header, then the ICMP message.
        let reply4 = |ident: u16, seq: u16, cookie: u64| {
            let mut icmp = echo_request(false, ident, seq, cookie);
            icmp[0] = ICMP_ECHO_REPLY;
            icmp[2..4].fill(0);
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut p = vec![
                0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
            ];
            p.extend_from_slice(&icmp);
            p
        };
        assert_eq!(
            parse_echo_reply(false, &reply4(ident, 7, cookie), ident, cookie),
            Some(7)
        );
        assert_eq!(
            parse_echo_reply(false, &reply4(ident + 1, 7, cookie), ident, cookie),
            None
        );
        assert_eq!(
            parse_echo_reply(false, &reply4(ident, 7, cookie + 1), ident, cookie),
            None
        );
        let mut corrupt = reply4(ident, 7, cookie);
        corrupt[30] ^= 1;
        assert_eq!(
            parse_echo_reply(false, &corrupt, ident, cookie),
            None,
            "bad checksum"
        );
        let mut request = reply4(ident, 7, cookie);
        request[20] = ICMP_ECHO_REQUEST;
        assert_eq!(
            parse_echo_reply(false, &request, ident, cookie),
            None,
            "our own request"
        );
        assert_eq!(
            parse_echo_reply(false, &reply4(ident, 7, cookie)[..30], ident, cookie),
            None
        );
        // The request's checksum is right.
        assert_eq!(checksum(&echo_request(false, ident, 9, cookie)), 0);
        // ICMPv6: the message alone.
        let mut reply6 = echo_request(true, ident, 0xfffe, cookie);
        reply6[0] = ICMP6_ECHO_REPLY;
        assert_eq!(parse_echo_reply(true, &reply6, ident, cookie), Some(0xfffe));
        assert_eq!(parse_echo_reply(true, &reply6, ident ^ 1, cookie), None);
        reply6[0] = ICMP6_ECHO_REQUEST;
        assert_eq!(parse_echo_reply(true, &reply6, ident, cookie), None);
    }

    /// A reply from another address than the one pinged does not answer the ping (root).
    #[tokio::test]
    async fn echo_reply_must_come_from_the_pinged_address() {
        let (ident, cookie) = (0x4321, 42);
        let p = Pinger::open(true, ident, cookie).unwrap();
        let (tx, mut rx) = oneshot::channel();
        p.waiting.borrow_mut().insert(5, (LO6, tx));
        let mut reply = echo_request(true, ident, 5, cookie);
        reply[0] = ICMP6_ECHO_REPLY;
        p.dispatch(&reply, Some("fd00::9".parse().unwrap()));
        assert!(rx.try_recv().is_err(), "wrong source");
        p.dispatch(&reply, Some(LO6));
        assert!(rx.try_recv().is_ok());
        assert!(p.waiting.borrow().is_empty());
    }

    #[tokio::test]
    async fn tcp_check_down_when_the_listener_closes_and_up_when_it_returns() {
        LocalSet::new()
            .run_until(async {
                let listener = TcpListener::bind((LO4, 0)).await.unwrap();
                let port = listener.local_addr().unwrap().port();
                let server = serve_tcp(listener);
                let t = target("s1", LO4, port, 0);
                let check = config(CheckKind::Tcp { port: None }, 100, 80, 2, 2);
                let (checker, mut rx, task) = start(vec![check], vec![t.clone()]);
                let mut seen = Vec::new();
                assert_eq!(
                    next_of(&mut rx, &t, Duration::from_millis(400), &mut seen).await,
                    None
                );
                assert_eq!(checker.borrow().health(&t), Some(Health::Up));
                let detail = detail_of(&checker, &t);
                assert!(detail.starts_with("connected in "), "{detail}");

                let mut server = server;
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                let wait = Duration::from_secs(2);
                for round in 1..=3 {
                    // Close the listener (at some other point of the check period each round):
                    // suspect at the first failure, down at the second.
                    tokio::time::sleep(Duration::from_millis(37 * round)).await;
                    let closed = Instant::now();
                    server.abort();
                    let _ = server.await;
                    let s = next_of(&mut rx, &t, wait, &mut seen).await.unwrap();
                    let refused = "connection refused";
                    assert_eq!(
                        (s.from, s.to, s.detail.as_str()),
                        (Health::Up, Health::Suspect, refused)
                    );
                    let d = next_of(&mut rx, &t, wait, &mut seen).await.unwrap();
                    assert_eq!(
                        (d.from, d.to, d.detail.as_str()),
                        (Health::Suspect, Health::Down, refused)
                    );
                    assert_eq!(checker.borrow().health(&t), Some(Health::Down));
                    println!(
                        "TCP check, interval 100 ms, timeout 80 ms, fall 2, rise 2, round {round}: \
                         listener closed -> suspect {:.1} ms, down {:.1} ms",
                        ms(s.at - closed),
                        ms(d.at - closed)
                    );

                    // Back: up after rise successes in a row.
                    let listener = TcpListener::bind((LO4, port)).await.unwrap();
                    server = serve_tcp(listener);
                    let back = Instant::now();
                    let u = next_of(&mut rx, &t, wait, &mut seen).await.unwrap();
                    assert_eq!((u.from, u.to), (Health::Down, Health::Up));
                    assert!(u.detail.starts_with("connected in "), "{}", u.detail);
                    println!(
                        "TCP check, round {round}: listener back -> up {:.1} ms",
                        ms(u.at - back)
                    );
                }
                assert!(seen.is_empty());
                task.abort();
                server.abort();
            })
            .await;
    }

    /// A tiny HTTP server answering every request with the current status; records requests.
    fn serve_http(
        listener: TcpListener,
        status: Rc<Cell<u16>>,
        requests: Rc<RefCell<Vec<String>>>,
    ) -> JoinHandle<()> {
        tokio::task::spawn_local(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let status = status.get();
                let requests = requests.clone();
                tokio::task::spawn_local(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    requests
                        .borrow_mut()
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    let body = "hello\n";
                    let answer = format!(
                        "HTTP/1.0 {status} Whatever\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        })
    }

    #[tokio::test]
    async fn http_check_judges_the_status() {
        LocalSet::new()
            .run_until(async {
                let listener = TcpListener::bind((LO6, 0)).await.unwrap();
                let port = listener.local_addr().unwrap().port();
                let status = Rc::new(Cell::new(200));
                let requests = Rc::new(RefCell::new(Vec::new()));
                let server = serve_http(listener, status.clone(), requests.clone());
                let checks = vec![
                    config(
                        CheckKind::Http {
                            port: None,
                            path: "/health".into(),
                            host: None,
                            expect: None,
                        },
                        100,
                        80,
                        2,
                        2,
                    ),
                    config(
                        CheckKind::Http {
                            port: Some(port),
                            path: "/x?y=1".into(),
                            host: Some("example.test".into()),
                            expect: Some("500".into()),
                        },
                        100,
                        80,
                        2,
                        2,
                    ),
                ];
                let ok = target("s1", LO6, port, 0);
                let want500 = target("s1", LO6, 1, 1);
                let (checker, mut rx, task) = start(checks, vec![ok.clone(), want500.clone()]);
                let mut seen = Vec::new();
                // 200: the first check stays up, the second (expects 500) goes down.
                let s = next_of(&mut rx, &want500, Duration::from_secs(2), &mut seen)
                    .await
                    .unwrap();
                assert_eq!(
                    (s.to, s.detail.as_str()),
                    (Health::Suspect, "HTTP 200 (expected 500)")
                );
                let d = next_of(&mut rx, &want500, Duration::from_secs(2), &mut seen)
                    .await
                    .unwrap();
                assert_eq!(d.to, Health::Down);
                assert!(seen.is_empty(), "{seen:?}");
                let detail = detail_of(&checker, &ok);
                assert!(detail.starts_with("HTTP 200 in "), "{detail}");
                {
                    let requests = requests.borrow();
                    let want = format!("GET /health HTTP/1.0\r\nHost: [::1]:{port}\r\n");
                    assert!(
                        requests.iter().any(|r| r.starts_with(&want)),
                        "{requests:?}"
                    );
                    let want = "GET /x?y=1 HTTP/1.0\r\nHost: example.test\r\n";
                    assert!(requests.iter().any(|r| r.starts_with(want)), "{requests:?}");
                }

                // 500: the other way round.
                status.set(500);
                let s = next_of(&mut rx, &ok, Duration::from_secs(2), &mut seen)
                    .await
                    .unwrap();
                assert_eq!(
                    (s.to, s.detail.as_str()),
                    (Health::Suspect, "HTTP 500 (expected 200-399)")
                );
                let d = next_of(&mut rx, &ok, Duration::from_secs(2), &mut seen)
                    .await
                    .unwrap();
                assert_eq!(d.to, Health::Down);
                let u = next_of(&mut rx, &want500, Duration::from_secs(2), &mut seen).await;
                let u = u.or_else(|| seen.pop()).unwrap();
                assert_eq!(
                    (u.target, u.from, u.to),
                    (want500.clone(), Health::Down, Health::Up)
                );
                assert!(u.detail.starts_with("HTTP 500 in "), "{}", u.detail);
                task.abort();
                server.abort();
            })
            .await;
    }

    fn processes_with_argument(arg: &str) -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| c.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
            .count()
    }

    #[tokio::test]
    async fn command_check_exit_status_environment_and_timeout() {
        LocalSet::new()
            .run_until(async {
                let cmd = |command: &str, interval_ms, timeout_ms| {
                    config(
                        CheckKind::Command {
                            command: command.into(),
                        },
                        interval_ms,
                        timeout_ms,
                        2,
                        2,
                    )
                };
                let env = r#"test "$ANYCAST_REAL_ADDRESS" = ::1 && test "$ANYCAST_PORT" = 8080 \
                             && test "$ANYCAST_SERVER" = web-1"#;
                let checks = vec![
                    cmd("true", 300, 250),
                    cmd("false", 200, 150),
                    cmd(env, 300, 250),
                    cmd("sleep 3.217", 200, 100),
                    cmd(
                        "echo out; echo >&2 oops; echo >&2 no backend; exit 3",
                        200,
                        150,
                    ),
                    cmd(r#"test "$ANYCAST_SERVER" = someone-else"#, 200, 150),
                ];
                let targets: Vec<Target> = (0..checks.len())
                    .map(|i| target("web-1", LO6, 8080, i))
                    .collect();
                let (checker, mut rx, task) = start(checks, targets.clone());
                let failing = [
                    (1, "exit 1"),
                    (3, "timeout 100ms"),
                    (4, "exit 3: no backend"),
                    (5, "exit 1"),
                ];
                let mut seen = Vec::new();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let all_down = |seen: &[Transition]| {
                    failing.iter().all(|(i, _)| {
                        seen.iter()
                            .any(|t| t.target.check == *i && t.to == Health::Down)
                    })
                };
                while !all_down(&seen) {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(t)) => seen.push(t),
                        _ => panic!("not all failing commands went down: {seen:?}"),
                    }
                }
                for t in &seen {
                    let want = failing.iter().find(|(i, _)| *i == t.target.check);
                    let want = want.map(|(_, d)| *d);
                    assert_eq!(Some(t.detail.as_str()), want, "{t:?}");
                }
                for i in [0, 2] {
                    let ok = || detail_of(&checker, &targets[i]).starts_with("exit 0 in ");
                    assert!(
                        eventually(Duration::from_secs(2), ok).await,
                        "{i}: {}",
                        detail_of(&checker, &targets[i])
                    );
                    assert_eq!(checker.borrow().health(&targets[i]), Some(Health::Up));
                }
                // Each timed-out command was killed: at most the current one is running.
                assert!(processes_with_argument("3.217") <= 1);
                task.abort();
                let _ = task.await;
                // The timed-out commands were killed with their process group.
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(processes_with_argument("3.217"), 0);
            })
            .await;
    }

    #[tokio::test]
    async fn icmp_echo_to_loopback_v4_and_v6() {
        LocalSet::new()
            .run_until(async {
                let check = config(CheckKind::Icmp, 100, 90, 3, 1);
                let targets = vec![target("a", LO4, 0, 0), target("a", LO6, 0, 0)];
                // Two checkers at once: each must take only its own replies.
                let (one, mut rx1, task1) = start(vec![check.clone()], targets.clone());
                let (two, mut rx2, task2) = start(vec![check], targets.clone());
                for checker in [&one, &two] {
                    let answered = || {
                        let report = checker.borrow().report();
                        report
                            .iter()
                            .all(|(_, _, d)| d.starts_with("echo reply in "))
                    };
                    let report = checker.borrow().report();
                    assert!(
                        eventually(Duration::from_secs(2), answered).await,
                        "{report:?}"
                    );
                    for (t, health, detail) in checker.borrow().report() {
                        assert_eq!(health, Health::Up, "{t}");
                        println!("ICMP {}: {detail}", t.real);
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                for rx in [&mut rx1, &mut rx2] {
                    while let Ok(t) = rx.try_recv() {
                        assert_ne!(t.to, Health::Down, "{t:?}");
                    }
                }
                assert_ne!(one.borrow().ident, two.borrow().ident);
                task1.abort();
                task2.abort();
            })
            .await;
    }
}
