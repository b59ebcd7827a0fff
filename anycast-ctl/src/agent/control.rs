//! The control socket's tasks. An accept task starts one task per connection; each reads its
//! request line under its own timeout, asks the owner (a typed message with a one-shot
//! answer), and writes the answer under a timeout. A connection that never sends a request
//! only holds its own task; the owner never touches a control connection's socket.
//!
//! Each connection's task also checks who is asking (the peer's credentials, SO_PEERCRED
//! and SO_PEERGROUPS): reading (`status`, `bindings`, `flows`) needs root, the socket's
//! group or the admin group; changing (`drain`, `reload`) needs root or the admin group.
//! A refused request is answered with the reason and logged (at most one line a second).
use std::rc::Rc;

use anyhow::{Context as _, Result};
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
    task::LocalSet,
};

pub use crate::control_server::Permissions;
use crate::{
    config::ControlAccess,
    control_server::{self, Access, Service},
    control_socket::{Request, Response},
    dataplane::FlowSnapshot,
};

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

/// Who may ask the agent what: root always; `group` (the socket's group: `control.group`,
/// or else the agent's own group) reads, `admin` also changes.
pub fn permissions(access: ControlAccess) -> Permissions {
    Permissions {
        owner: 0,
        // SAFETY: getegid has no preconditions.
        group: Some(access.group.unwrap_or_else(|| unsafe { libc::getegid() })),
        admin: access.admin_group,
    }
}

impl Access for Request {
    fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Bindings => "bindings",
            Request::Flows => "flows",
            Request::Reload => "reload",
            Request::Drain { .. } => "drain",
        }
    }

    fn changes(&self) -> bool {
        matches!(self, Request::Reload | Request::Drain { .. })
    }
}

struct AgentControl {
    owner: mpsc::Sender<ControlRequest>,
}

impl Service for AgentControl {
    type Request = Request;
    type Response = Response;

    fn error(message: String) -> Response {
        Response::Error { message }
    }

    async fn answer(&self, request: Request) -> Result<Response> {
        let (answer, answered) = oneshot::channel();
        self.owner
            .send(ControlRequest { request, answer })
            .await
            .context("the agent is stopping")?;
        Ok(match answered.await.context("the agent is stopping")? {
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
        })
    }
}

/// Accepts connections on `listener` and serves each on a task of its own.
pub fn spawn(
    local: &LocalSet,
    listener: UnixListener,
    owner: mpsc::Sender<ControlRequest>,
    permissions: Permissions,
) {
    local.spawn_local(control_server::accept_loop(
        listener,
        Rc::new(AgentControl { owner }),
        permissions,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_needs_a_group_and_changing_needs_the_admin_group() {
        let p = Permissions {
            owner: 0,
            group: Some(100),
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
            owner: 0,
            group: Some(100),
            admin: None,
        };
        let e = root_only.check(5, &[100], &Request::Reload).unwrap_err();
        assert!(e.contains("control.admin_group is not set"), "{e}");
        assert_eq!(root_only.check(5, &[100], &Request::Status), Ok(()));
    }
}
