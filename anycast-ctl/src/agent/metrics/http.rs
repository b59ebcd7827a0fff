//! The endpoint: an HTTP/1.1 server (hyper) on a thread and runtime of its own, bounded
//! against hostile clients: at most [`MAX_CONNECTIONS`] at once (more are closed at once),
//! request heads of at most [`MAX_REQUEST_HEAD`] bytes (hyper answers 431 beyond), heads
//! read within [`HEAD_TIMEOUT`], and no connection lives longer than [`CONNECTION_LIFETIME`]
//! (a client that stops reading its answer is cut then). Each refusal is counted
//! (`anycast_metrics_refused_total{reason}`) and logged at most once a minute.
use std::{
    convert::Infallible,
    net::TcpListener as StdListener,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding::prometheus_text, registry::Registry};
use tokio::{net::TcpListener, sync::Semaphore};

use super::Live;

pub(super) const MAX_CONNECTIONS: usize = 16;
/// hyper's smallest read buffer: a request head must fit in it.
pub(super) const MAX_REQUEST_HEAD: usize = 8192;
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Binds `metrics.listen` (before the agent is ready, so a bad address fails the start) and
/// serves `/metrics` from `registry` on a thread of its own until the process exits.
pub(in crate::agent) fn spawn(
    addr: std::net::SocketAddr,
    registry: Registry,
    live: Live,
) -> Result<std::net::SocketAddr> {
    let listener = StdListener::bind(addr)
        .with_context(|| format!("metrics.listen: binding {addr} for the metrics endpoint"))?;
    listener
        .set_nonblocking(true)
        .context("metrics: making the listening socket non-blocking")?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("metrics: starting the endpoint's runtime")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, Arc::new(registry), live).await,
                    Err(e) => tracing::error!("metrics: the endpoint cannot run: {e}"),
                }
            })
        })
        .context("metrics: starting the endpoint's thread")?;
    Ok(bound)
}

/// Logs a refusal at most once a minute, with how many went unlogged.
struct Sparse {
    last: Option<Instant>,
    unlogged: u64,
}

impl Sparse {
    fn note(&mut self, what: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            "metrics endpoint: {what} ({} more refusals not logged)",
            self.unlogged
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

pub(super) async fn serve(listener: TcpListener, registry: Arc<Registry>, live: Live) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let log = Arc::new(std::sync::Mutex::new(Sparse {
        last: None,
        unlogged: 0,
    }));
    let note = move |live: &Live, reason: &str, what: &str| {
        live.refuse(reason);
        log.lock().unwrap_or_else(|e| e.into_inner()).note(what);
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                note(&live, "accept_failed", &format!("accepting: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            note(
                &live,
                "connection_limit",
                &format!("{MAX_CONNECTIONS} connections open, closed one from {peer}"),
            );
            continue;
        };
        let registry = registry.clone();
        let live = live.clone();
        let note = note.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = {
                let live = live.clone();
                hyper::service::service_fn(move |req| {
                    let answer = answer(&registry, &live, &req);
                    async move { Ok::<_, Infallible>(answer) }
                })
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            let why = match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Ok(())) => return,
                Err(_) => "lifetime",
                Ok(Err(e)) if e.is_timeout() => "timeout",
                Ok(Err(e)) if e.is_parse_too_large() => "too_large",
                Ok(Err(e)) if e.is_parse() => "malformed",
                // The client went away: nothing to refuse.
                Ok(Err(_)) => return,
            };
            note(
                &live,
                why,
                &format!("{why}: closed the connection from {peer}"),
            );
        });
    }
}

/// One request's answer: `GET /metrics` (or `HEAD`), else 404 or 405.
pub(super) fn answer<B>(
    registry: &Registry,
    live: &Live,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::with_capacity(16 << 10);
            if let Err(e) = prometheus_text::encode(&mut body, registry) {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding the metrics: {e}\n"),
                );
            }
            live.scrapes.inc();
            let mut r = reply(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            r
        }
        "/" => reply(
            StatusCode::OK,
            "anycast agent: metrics at /metrics\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
    }
}
