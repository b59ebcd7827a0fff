//! An HTTP GET judged by its status code, as keepalived's `HTTP_GET`.
use super::*;

/// Longest status line read.
pub(crate) const MAX_STATUS_LINE: usize = 1024;

pub(crate) async fn http(
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

pub(crate) fn parse_status_line(line: &[u8]) -> Result<u16, String> {
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
