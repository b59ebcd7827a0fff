//! TCP connect, as keepalived's `TCP_CHECK`.
use super::*;

pub(crate) async fn tcp(addr: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    connect(addr).await?;
    Ok(format!("connected in {}", fmt_elapsed(started)))
}
