//! The server side of a control socket, shared by the agent (`agent/control.rs`) and the
//! route-optimization client daemon (`client/control.rs`): one JSON request per line, one
//! JSON answer per line, on a Unix socket.
//!
//! An accept task starts one task per connection; each reads its request line (at most
//! [`MAX_REQUEST`] bytes) under its own timeout, asks the daemon's owner through the
//! [`Service`], and writes the answer under a timeout. A connection that never sends a
//! request only holds its own task, for at most [`REQUEST_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] are served at once, more are closed at once. The owner never touches
//! a control connection's socket.
//!
//! Each connection's task also checks who is asking (the peer's credentials, SO_PEERCRED
//! and SO_PEERGROUPS) against [`Permissions`]; a refused request is answered with the
//! reason and logged (at most one line a second).
use std::{
    cell::RefCell,
    future::Future,
    os::fd::AsRawFd as _,
    path::Path,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

/// How long a connection may take to send its request, and to take its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read; a request is a few dozen bytes.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// Connections served at once; more are closed at once (and logged, sparingly).
pub const MAX_CONNECTIONS: usize = 64;

/// What a request is, for the permission check.
pub trait Access {
    /// The request's name, for refusals.
    fn name(&self) -> &'static str;
    /// Whether it changes the daemon's state (more is asked of the peer).
    fn changes(&self) -> bool;
}

/// A daemon's side of its control socket.
pub trait Service: 'static {
    type Request: DeserializeOwned + Access;
    type Response: Serialize;
    /// The answer to a request refused (unparsable, or not allowed).
    fn error(message: String) -> Self::Response;
    /// Answers an allowed request (usually by asking the owner). An error closes the
    /// connection without an answer (the daemon is stopping).
    fn answer(&self, request: Self::Request) -> impl Future<Output = Result<Self::Response>>;
}

/// Who may ask what: root and `owner` always; members of `group` read, members of `admin`
/// also change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// A uid allowed everything besides root (the agent: 0; the client daemon: its own).
    pub owner: u32,
    pub group: Option<u32>,
    pub admin: Option<u32>,
}

impl Permissions {
    /// Whether a peer (uid, and every group it is in) may make `request`; the reason if not.
    pub fn check(&self, uid: u32, groups: &[u32], request: &impl Access) -> Result<(), String> {
        let (name, changes) = (request.name(), request.changes());
        let admin = self.admin.is_some_and(|g| groups.contains(&g));
        let reader = self.group.is_some_and(|g| groups.contains(&g));
        if uid == 0 || uid == self.owner || admin || (!changes && reader) {
            return Ok(());
        }
        let Some(group) = self.group else {
            // No group: the daemon's user only (the client daemon).
            return Err(format!(
                "permission denied: {name} needs root or uid {} (the daemon's user); uid {uid} \
                 is neither",
                self.owner
            ));
        };
        let admin = match self.admin {
            Some(g) => format!("the admin group (gid {g}, control.admin_group)"),
            None => "an admin group (control.admin_group is not set)".to_string(),
        };
        Err(if changes {
            format!("permission denied: {name} needs root or {admin}; uid {uid} has neither")
        } else {
            format!(
                "permission denied: {name} needs root, the socket's group (gid {group}) or \
                 {admin}; uid {uid} has none of them"
            )
        })
    }
}

/// Readies `socket`'s path before anything else is done: refuses a path another daemon
/// answers on, removes a stale socket, and makes its directory (0755, whatever the umask)
/// if missing. `who` names the daemon in errors.
pub async fn prepare(socket: &Path, who: &str) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another {who} is already answering on {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        // Made here, its mode does not follow the umask either: a directory others could
        // write would let them replace the socket.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} mode 0755", dir.display()))?;
    }
    Ok(())
}

/// Listens on `socket` (readied by [`prepare`]) and gives it `mode` (and `group`), whatever
/// the umask. The credential check stands behind the mode.
pub fn bind(socket: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    if let Some(group) = group {
        std::os::unix::fs::chown(socket, None, Some(group))
            .with_context(|| format!("giving {} to group {group}", socket.display()))?;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("making {} mode {mode:04o}", socket.display()))?;
    Ok(listener)
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

/// Accepts connections on `listener` and serves each on a local task of its own (run it
/// on a `LocalSet`).
pub async fn accept_loop<S: Service>(
    listener: UnixListener,
    service: Rc<S>,
    permissions: Permissions,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let log = Rc::new(RefCell::new(RefusalLog::default()));
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
                    "control socket: {MAX_CONNECTIONS} connections already open; closed a new \
                     one ({refused} so far)"
                );
            }
            continue;
        };
        let service = service.clone();
        let log = log.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = serve(stream, &*service, permissions, &log).await {
                tracing::debug!("control connection: {e:#}");
            }
            drop(slot);
        });
    }
}

async fn serve<S: Service>(
    stream: UnixStream,
    service: &S,
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
    let response = match serde_json::from_str::<S::Request>(&line) {
        Err(e) => S::error(format!("bad request: {e}")),
        Ok(request) => match permissions.check(uid, &groups, &request) {
            Err(why) => {
                log.borrow_mut().refused(&why, pid);
                S::error(why)
            }
            Ok(()) => service.answer(request).await?,
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .context("the client did not take the answer within the timeout")??;
    Ok(())
}
