//! The control socket's tasks. An accept task starts one task per connection; each reads its
//! request line under its own timeout, asks the owner (a typed message with a one-shot
//! answer), and writes the answer under a timeout. A connection that never sends a request
//! only holds its own task; the owner never touches a control connection's socket.
//!
//! Each connection's task also checks who is asking (the peer's credentials, SO_PEERCRED
//! and SO_PEERGROUPS): reading (`status`, `bindings`, `flows`) needs root, the socket's
//! group or the admin group; changing (`drain`, `reload`) needs root or the admin group.
//! A refused request is answered with the reason and logged (at most one line a second).
use std::{
    cell::RefCell,
    os::fd::AsRawFd as _,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, Semaphore},
    task::LocalSet,
};

use crate::{
    config::ControlAccess,
    control_socket::{Request, Response},
    dataplane::FlowSnapshot,
};

/// How long a connection may take to send its request, and to take its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read; a request is a few dozen bytes.
const MAX_REQUEST: u64 = 64 * 1024;
/// Connections served at once; more are closed at once (and logged, sparingly).
pub const MAX_CONNECTIONS: usize = 64;

/// A request for the owner, with where its answer goes.
pub struct ControlRequest {
    pub request: Request,
    pub answer: oneshot::Sender<Answer>,
}

/// The owner's answer: complete, or a snapshot the connection's task finishes reading
/// off the owner (a large flow table takes long to read).
pub enum Answer {
    Ready(Response),
    Flows(FlowSnapshot),
}

/// Who may ask what: root always; `group` (the socket's group) reads, `admin` also changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    pub group: u32,
    pub admin: Option<u32>,
}

impl Permissions {
    /// The socket's group is `control.group`, or else the agent's own group.
    pub fn new(access: ControlAccess) -> Permissions {
        Permissions {
            // SAFETY: getegid has no preconditions.
            group: access.group.unwrap_or_else(|| unsafe { libc::getegid() }),
            admin: access.admin_group,
        }
    }

    /// Whether a peer (uid, and every group it is in) may make `request`; the reason if not.
    pub fn check(&self, uid: u32, groups: &[u32], request: &Request) -> Result<(), String> {
        let (name, changes) = match request {
            Request::Status => ("status", false),
            Request::Bindings => ("bindings", false),
            Request::Flows => ("flows", false),
            Request::Reload => ("reload", true),
            Request::Drain { .. } => ("drain", true),
        };
        let admin = self.admin.is_some_and(|g| groups.contains(&g));
        if uid == 0 || admin || (!changes && groups.contains(&self.group)) {
            return Ok(());
        }
        let admin = match self.admin {
            Some(g) => format!("the admin group (gid {g}, control.admin_group)"),
            None => "an admin group (control.admin_group is not set)".to_string(),
        };
        Err(if changes {
            format!("permission denied: {name} needs root or {admin}; uid {uid} has neither")
        } else {
            format!(
                "permission denied: {name} needs root, the socket's group (gid {}) or {admin}; \
                 uid {uid} has none of them",
                self.group
            )
        })
    }
}

/// The peer's uid and groups (primary and supplementary) as the kernel recorded them when
/// it connected.
fn peer(stream: &UnixStream) -> Result<(u32, Vec<u32>)> {
    let cred = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    let mut groups = vec![cred.gid()];
    let fd = stream.as_raw_fd();
    let mut buf = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `buf` holds `len` bytes; the kernel writes at most that many and sets
        // `len` to what it wrote (or needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.extend_from_slice(&buf[..n.min(buf.len())]);
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > buf.len() && n <= 65536 {
            buf.resize(n, 0);
            continue;
        }
        // Without supplementary groups only the primary one counts: fewer are allowed.
        tracing::debug!("control socket: SO_PEERGROUPS: {e}");
        break;
    }
    Ok((cred.uid(), groups))
}

/// Refusals logged at most once a second, with how many were not logged since.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&mut self, why: &str, pid: Option<i32>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        let pid = pid.map_or(String::new(), |p| format!(" (pid {p})"));
        if more > 0 {
            tracing::warn!("control socket: {why}{pid}; {more} more refused since the last line");
        } else {
            tracing::warn!("control socket: {why}{pid}");
        }
        self.last = Some(now);
    }
}

/// Accepts connections on `listener` and serves each on a task of its own.
pub fn spawn(
    local: &LocalSet,
    listener: UnixListener,
    owner: mpsc::Sender<ControlRequest>,
    permissions: Permissions,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let log = Rc::new(RefCell::new(RefusalLog::default()));
    local.spawn_local(async move {
        let mut refused = 0u64;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    // E.g. out of descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        "control socket: {MAX_CONNECTIONS} connections already open; \
                         closed a new one ({refused} so far)"
                    );
                }
                continue;
            };
            let owner = owner.clone();
            let log = log.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(stream, owner, permissions, &log).await {
                    tracing::debug!("control connection: {e:#}");
                }
                drop(slot);
            });
        }
    });
}

async fn serve(
    stream: UnixStream,
    owner: mpsc::Sender<ControlRequest>,
    permissions: Permissions,
    log: &RefCell<RefusalLog>,
) -> Result<()> {
    let (uid, groups) = peer(&stream)?;
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("no request within the timeout")??;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
        Ok(request) => match permissions.check(uid, &groups, &request) {
            Err(why) => {
                log.borrow_mut().refused(&why, pid);
                Response::Error { message: why }
            }
            Ok(()) => {
                let (answer, answered) = oneshot::channel();
                owner
                    .send(ControlRequest { request, answer })
                    .await
                    .context("the agent is stopping")?;
                match answered.await.context("the agent is stopping")? {
                    Answer::Ready(r) => r,
                    Answer::Flows(snapshot) => {
                        match tokio::task::spawn_blocking(move || snapshot.read()).await {
                            Ok(Ok(flows)) => Response::Flows { flows },
                            Ok(Err(e)) => Response::Error {
                                message: format!("{e:#}"),
                            },
                            Err(e) => Response::Error {
                                message: format!("reading the flow table: {e}"),
                            },
                        }
                    }
                }
            }
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .context("the client did not take the answer within the timeout")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_needs_a_group_and_changing_needs_the_admin_group() {
        let p = Permissions {
            group: 100,
            admin: Some(200),
        };
        let drain = Request::Drain {
            server: "s1".into(),
            undo: false,
        };
        for r in [Request::Status, Request::Bindings, Request::Flows] {
            assert_eq!(p.check(0, &[0], &r), Ok(()));
            assert_eq!(p.check(1000, &[1000, 100], &r), Ok(()));
            assert_eq!(p.check(1000, &[200], &r), Ok(()));
            let e = p.check(1000, &[1000], &r).unwrap_err();
            assert!(
                e.contains("permission denied") && e.contains("uid 1000"),
                "{e}"
            );
        }
        for r in [Request::Reload, drain] {
            assert_eq!(p.check(0, &[0], &r), Ok(()));
            assert_eq!(p.check(1000, &[1000, 200], &r), Ok(()));
            let e = p.check(1000, &[1000, 100], &r).unwrap_err();
            assert!(e.contains("needs root or the admin group (gid 200"), "{e}");
        }
        let root_only = Permissions {
            group: 100,
            admin: None,
        };
        let e = root_only.check(5, &[100], &Request::Reload).unwrap_err();
        assert!(e.contains("control.admin_group is not set"), "{e}");
        assert_eq!(root_only.check(5, &[100], &Request::Status), Ok(()));
    }
}
