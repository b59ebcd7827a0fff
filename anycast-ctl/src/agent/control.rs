//! The control socket's tasks. An accept task starts one task per connection; each reads its
//! request line under its own timeout, asks the owner (a typed message with a one-shot
//! answer), and writes the answer under a timeout. A connection that never sends a request
//! only holds its own task; the owner never touches a control connection's socket.
use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, Semaphore},
    task::LocalSet,
};

use crate::{
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

/// Accepts connections on `listener` and serves each on a task of its own.
pub fn spawn(local: &LocalSet, listener: UnixListener, owner: mpsc::Sender<ControlRequest>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(stream, owner).await {
                    tracing::debug!("control connection: {e:#}");
                }
                drop(slot);
            });
        }
    });
}

async fn serve(stream: UnixStream, owner: mpsc::Sender<ControlRequest>) -> Result<()> {
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
        Ok(request) => {
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
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .context("the client did not take the answer within the timeout")??;
    Ok(())
}
