//! The client daemon's operations: its revocation list re-read while it runs, and its
//! control socket.
//!
//! Revocation list: a task watches `--revocations FILE` (its size, modification time and
//! inode, every [`POLL`], and at once on SIGHUP or `anycast-ctl client-reload`), reads and
//! verifies it off the owner, and hands the owner what it read ([`ListRead`]). The owner
//! takes a list only when signed by a trust anchor and numbered above the current one, and
//! ends at once the bindings of the certificates it revokes (their tunnel map entries go:
//! traffic goes back through the agent). A missing, unreadable, malformed or badly signed
//! file, or an older list, is refused, logged once per change of the file (not at every
//! poll) and counted (`revocation_list_refused_REASON`); the current list stays.
//!
//! Control socket: the agent's protocol and code (`control_server.rs`: one JSON line each
//! way, bounded request size, timeouts and connections, peer credential check), mode 0600,
//! and only root and the daemon's own user are answered.
use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    rc::Rc,
    time::{Duration, SystemTime},
};

use anycast_common::pki::{PkiError, RevocationList, VerifyingKey, MAX_REVOKED};
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{daemon::ClientStatus, ServiceKey, Verifier};
use crate::control_server::{self, Access, Permissions, Service};

/// The client daemon's control socket by default.
pub const DEFAULT_SOCKET: &str = "/run/anycast/client.sock";
/// How often the revocation list file's metadata is looked at.
pub const POLL: Duration = Duration::from_secs(1);
/// The largest list file read: `MAX_REVOKED` serials as hex, with its header and signature.
const MAX_LIST_FILE: u64 = 2 * (24 + 8 * MAX_REVOKED as u64 + 64) + 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Counters, tunnel counters, bindings held, the revocation list.
    Status,
    /// End the binding(s) of a service now (protocol and port 0: every binding of the
    /// anycast address): back to the agent.
    Unbind {
        anycast: IpAddr,
        protocol: u8,
        port: u16,
    },
    /// Re-read the revocation list file now (as SIGHUP does).
    ReloadRevocations,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<ClientStatus>),
    Unbound {
        /// "SERVICE (server)" per binding ended.
        ended: Vec<String>,
    },
    RevocationsReloaded {
        /// What was done with the file: "taken", "unchanged".
        outcome: String,
        number: u64,
        ended: Vec<String>,
    },
    Error {
        message: String,
    },
}

impl Access for Request {
    fn name(&self) -> &'static str {
        match self {
            Request::Status => "client-status",
            Request::Unbind { .. } => "client-unbind",
            Request::ReloadRevocations => "client-reload",
        }
    }

    fn changes(&self) -> bool {
        !matches!(self, Request::Status)
    }
}

/// The revocation list in the status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RevocationStatus {
    /// 0: no list.
    pub number: u64,
    /// Unix seconds.
    pub issued: u64,
    pub revoked: Vec<u64>,
}

pub fn revocation_status(verifier: &Verifier) -> RevocationStatus {
    let l = verifier.revocation_list();
    RevocationStatus {
        number: l.number,
        issued: l.issued,
        revoked: l.serials().to_vec(),
    }
}

/// The revocation list file as read and checked (off the owner).
#[derive(Debug, Clone, PartialEq)]
pub enum ListRead {
    /// Well formed and signed by a trust anchor (not yet compared with the current one).
    List(RevocationList),
    /// Why not: `missing`, `unreadable`, `malformed`, `bad_signature`.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Reads and verifies the list at `path`.
pub fn read_list(path: &Path, anchors: &[VerifyingKey]) -> ListRead {
    let refused = |reason, message: String| ListRead::Refused {
        reason,
        message: format!("revocation list {}: {message}", path.display()),
    };
    let mut text = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_LIST_FILE + 1).read_to_end(&mut text));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return refused("missing", e.to_string())
        }
        Err(e) => return refused("unreadable", e.to_string()),
        Ok(_) if text.len() as u64 > MAX_LIST_FILE => {
            return refused("malformed", format!("larger than {MAX_LIST_FILE} bytes"))
        }
        Ok(_) => {}
    }
    let Some(bytes) = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| crate::pki::parse_hex(t).ok())
    else {
        return refused("malformed", "not hex text".into());
    };
    match RevocationList::decode_verified(&bytes, anchors) {
        Ok(list) => ListRead::List(list),
        Err(PkiError::BadSignature) => refused(
            "bad_signature",
            "not signed by a trusted operator key".into(),
        ),
        Err(e) => refused("malformed", e.to_string()),
    }
}

/// What the owner did with a list read: taken (with the bindings it ended), unchanged, or
/// refused (the reason and why); the current list stays unless taken.
#[derive(Debug, Clone, PartialEq)]
pub enum ListOutcome {
    Taken {
        number: u64,
        /// The service and the server of each binding ended.
        ended: Vec<(ServiceKey, String)>,
    },
    Unchanged {
        number: u64,
    },
    Refused(String),
}

/// Applies a list read to the verifier, counting a refusal as
/// `revocation_list_refused_REASON` (an older list: `_older`) and a list taken as
/// `revocation_list_taken`. The same list again (the file touched, or read again after a
/// SIGHUP) changes and counts nothing.
pub fn take_list(verifier: &mut Verifier, read: ListRead) -> ListOutcome {
    let list = match read {
        ListRead::List(l) => l,
        ListRead::Refused { reason, message } => {
            verifier.refuse_revocation_list(reason);
            return ListOutcome::Refused(message);
        }
    };
    if &list == verifier.revocation_list() {
        return ListOutcome::Unchanged {
            number: list.number,
        };
    }
    let number = list.number;
    let servers: Vec<(ServiceKey, String)> = verifier
        .bindings()
        .iter()
        .filter(|(_, b)| list.is_revoked(b.serial))
        .map(|(k, b)| (*k, format!("{} (certificate {})", b.server, b.serial)))
        .collect();
    match verifier.set_revocation_list(list) {
        Err(e) => ListOutcome::Refused(e),
        Ok(gone) => {
            verifier.count_event("revocation_list_taken");
            ListOutcome::Taken {
                number,
                ended: servers
                    .into_iter()
                    .filter(|(k, _)| gone.contains(k))
                    .collect(),
            }
        }
    }
}

/// What the owner is asked: from the file watcher, or from a control connection.
pub enum Event {
    /// The watcher saw the file change (or was sent SIGHUP) and read it.
    Revocations(ListRead),
    Control {
        ask: Ask,
        answer: oneshot::Sender<Response>,
    },
}

/// A control request as the owner sees it: a reload is read by the connection's task.
pub enum Ask {
    Status,
    Unbind {
        anycast: IpAddr,
        protocol: u8,
        port: u16,
    },
    TakeList(ListRead),
}

/// Handles one event on the owner, returning the bindings ended (their tunnel map entries
/// are the caller's to remove). `status` makes the status (the counters the daemon adds).
pub fn handle(
    event: Event,
    verifier: &mut Verifier,
    status: impl FnOnce(&Verifier) -> ClientStatus,
) -> Vec<ServiceKey> {
    match event {
        Event::Revocations(read) => {
            let outcome = take_list(verifier, read);
            log_outcome(&outcome, "changed");
            ended_keys(&outcome)
        }
        Event::Control { ask, answer } => {
            let (response, ended) = match ask {
                Ask::Status => (Response::Status(Box::new(status(verifier))), vec![]),
                Ask::Unbind {
                    anycast,
                    protocol,
                    port,
                } => {
                    let keys: Vec<ServiceKey> = verifier
                        .bindings()
                        .keys()
                        .filter(|k| {
                            k.anycast == anycast
                                && ((protocol, port) == (0, 0)
                                    || (k.protocol, k.port) == (protocol, port))
                        })
                        .copied()
                        .collect();
                    let mut ended = Vec::new();
                    for k in &keys {
                        if let Some(b) = verifier.end(k) {
                            tracing::info!(
                                "{k}: binding to {} ended by the operator: back to the agent",
                                b.server
                            );
                            ended.push(format!("{k} ({})", b.server));
                        }
                    }
                    let response = if ended.is_empty() {
                        Response::Error {
                            message: format!("no binding held for {anycast} {protocol}/{port}"),
                        }
                    } else {
                        Response::Unbound { ended }
                    };
                    (response, keys)
                }
                Ask::TakeList(read) => {
                    let outcome = take_list(verifier, read);
                    log_outcome(&outcome, "re-read on request");
                    let response = match &outcome {
                        ListOutcome::Refused(message) => Response::Error {
                            message: format!("{message}; the current list stays"),
                        },
                        ListOutcome::Unchanged { number } => Response::RevocationsReloaded {
                            outcome: "unchanged".into(),
                            number: *number,
                            ended: vec![],
                        },
                        ListOutcome::Taken { number, ended } => Response::RevocationsReloaded {
                            outcome: "taken".into(),
                            number: *number,
                            ended: ended.iter().map(|(k, s)| format!("{k} ({s})")).collect(),
                        },
                    };
                    (response, ended_keys(&outcome))
                }
            };
            // The asker may have gone (its timeout): the change is made all the same.
            let _ = answer.send(response);
            ended
        }
    }
}

fn ended_keys(outcome: &ListOutcome) -> Vec<ServiceKey> {
    match outcome {
        ListOutcome::Taken { ended, .. } => ended.iter().map(|(k, _)| *k).collect(),
        _ => vec![],
    }
}

fn log_outcome(outcome: &ListOutcome, why: &str) {
    match outcome {
        ListOutcome::Taken { number, ended } => {
            tracing::info!("revocation list {why}: took list number {number}");
            for (k, server) in ended {
                tracing::info!("{k}: {server} revoked: binding ended, back to the agent");
            }
        }
        ListOutcome::Unchanged { number } => {
            tracing::debug!("revocation list {why}: still number {number}")
        }
        ListOutcome::Refused(message) => {
            tracing::warn!("revocation list {why}: refused, the current list stays: {message}")
        }
    }
}

/// What identifies a version of the file: size, modification time, inode (a file replaced
/// by rename is another inode), or why it cannot be looked at.
type Fingerprint = Result<(u64, Option<SystemTime>, u64), std::io::ErrorKind>;

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| (m.len(), m.modified().ok(), m.ino()))
        .map_err(|e| e.kind())
}

/// Watches the revocation list file (when there is one) and answers SIGHUP: a local task
/// that reads the file when it changes or on SIGHUP and hands the owner what it read.
/// Without a file, SIGHUP is only logged (it no longer stops the daemon).
pub fn spawn_watcher(
    path: Option<PathBuf>,
    anchors: Vec<VerifyingKey>,
    events: mpsc::Sender<Event>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("catching SIGHUP")?;
    tokio::task::spawn_local(async move {
        // Unknown at first: the first look reads it again, so a change between the read at
        // start and now is not missed (the same list again changes nothing).
        let mut last: Option<Fingerprint> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = hup.recv() => true,
                _ = tick.tick() => false,
            };
            let Some(path) = &path else {
                if forced {
                    tracing::info!("SIGHUP: no --revocations file to re-read");
                }
                continue;
            };
            let now = fingerprint(path);
            if !forced && last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now);
            let read = read_list(path, &anchors);
            if events.send(Event::Revocations(read)).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// The control connections' side: asks the owner; a reload's file is read here.
struct ClientControl {
    events: mpsc::Sender<Event>,
    revocations: Option<PathBuf>,
    anchors: Vec<VerifyingKey>,
}

impl Service for ClientControl {
    type Request = Request;
    type Response = Response;

    fn error(message: String) -> Response {
        Response::Error { message }
    }

    async fn answer(&self, request: Request) -> Result<Response> {
        let ask = match request {
            Request::Status => Ask::Status,
            Request::Unbind {
                anycast,
                protocol,
                port,
            } => Ask::Unbind {
                anycast,
                protocol,
                port,
            },
            Request::ReloadRevocations => match &self.revocations {
                None => {
                    return Ok(Response::Error {
                        message: "the client was started without --revocations".into(),
                    })
                }
                Some(path) => {
                    let (path, anchors) = (path.clone(), self.anchors.clone());
                    let read = tokio::task::spawn_blocking(move || read_list(&path, &anchors))
                        .await
                        .context("reading the revocation list")?;
                    Ask::TakeList(read)
                }
            },
        };
        let (answer, answered) = oneshot::channel();
        self.events
            .send(Event::Control { ask, answer })
            .await
            .context("the client is stopping")?;
        answered.await.context("the client is stopping")
    }
}

/// Readies the control socket's path (before the host is touched).
pub async fn prepare(socket: &Path) -> Result<()> {
    control_server::prepare(socket, "client daemon").await
}

/// Listens on `socket` (mode 0600: the daemon's user; root passes anyway) and serves it on
/// local tasks. Only root and the daemon's own user are answered, whatever the mode.
pub fn serve(
    socket: &Path,
    events: mpsc::Sender<Event>,
    revocations: Option<PathBuf>,
    anchors: Vec<VerifyingKey>,
) -> Result<()> {
    let listener = control_server::bind(socket, 0o600, None)?;
    let permissions = Permissions {
        // SAFETY: geteuid has no preconditions.
        owner: unsafe { libc::geteuid() },
        group: None,
        admin: None,
    };
    tokio::task::spawn_local(control_server::accept_loop(
        listener,
        Rc::new(ClientControl {
            events,
            revocations,
            anchors,
        }),
        permissions,
    ));
    Ok(())
}

/// `anycast-ctl client-status`: counters, the revocation list, the bindings.
pub fn render_status(s: &ClientStatus) -> String {
    let mut out = String::new();
    let r = &s.revocations;
    if r.number == 0 {
        out.push_str("revocation list: none\n");
    } else {
        out.push_str(&format!(
            "revocation list: number {}, issued {} (Unix seconds), {} revoked serial(s)\n",
            r.number,
            r.issued,
            r.revoked.len()
        ));
    }
    out.push_str(&render_bindings(s));
    out.push_str("counters:\n");
    for (k, v) in &s.counters {
        out.push_str(&format!("  {k:<40} {v}\n"));
    }
    out.push_str("tunnel:\n");
    for (k, v) in &s.tunnel {
        out.push_str(&format!("  {k:<40} {v}\n"));
    }
    out
}

/// `anycast-ctl client-bindings`: one line per binding held.
pub fn render_bindings(s: &ClientStatus) -> String {
    if s.bindings.is_empty() {
        return "bindings: none (every service goes through the agent)\n".into();
    }
    let mut out = format!(
        "{:<32} {:<12} {:<28} {:>10}\n",
        "SERVICE", "SERVER", "REAL", "EXPIRES IN"
    );
    for b in &s.bindings {
        out.push_str(&format!(
            "{:<32} {:<12} {:<28} {:>9}s\n",
            b.service,
            b.server,
            b.real.to_string(),
            b.expires_in
        ));
    }
    out
}
