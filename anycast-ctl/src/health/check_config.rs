//! How a server is checked (keepalived's checkers), as configured per service.
use super::*;

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

pub(crate) fn default_interval_ms() -> u64 {
    DEFAULT_INTERVAL_MS
}
pub(crate) fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
pub(crate) fn default_fall() -> u32 {
    DEFAULT_FALL
}
pub(crate) fn default_rise() -> u32 {
    DEFAULT_RISE
}

impl CheckKind {
    /// The method's name, as configured (`type`) and as metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Icmp => "icmp",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Command { .. } => "command",
        }
    }
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
pub(crate) enum RawKind {
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

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS))
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.clamp(1, MAX_INTERVAL_MS))
    }
}

/// Printable ASCII without spaces: what may go into the request line or a header.
pub(crate) fn is_token(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses "200", "200-299" or "200,204,301-302" into inclusive ranges.
pub(crate) fn parse_expect(text: &str) -> Result<Vec<(u16, u16)>, String> {
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
