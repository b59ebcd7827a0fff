//! The server's load as it reports it: established sessions from /proc, or an operator's
//! command's output.
use super::*;

/// Established TCP connections whose local address is one of `anycast`.
pub fn established_sessions(anycast: &[IpAddr]) -> u32 {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| count_established(&text, anycast))
        .fold(0u32, u32::saturating_add)
}

/// Counts the lines of a `/proc/net/tcp` or `/proc/net/tcp6` text in state `01`
/// (ESTABLISHED) whose local address is one of `anycast`. An IPv4 address seen as
/// `::ffff:a.b.c.d` on a dual-stack socket counts as the IPv4 address.
pub fn count_established(proc_text: &str, anycast: &[IpAddr]) -> u32 {
    let n = socket_rows(proc_text)
        .filter(|r| r.state == "01" && anycast.iter().any(|&a| canonical(a) == r.local.0))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One socket of a `/proc/net/{tcp,udp}{,6}` text: its local and remote address and port
/// (IPv4-mapped addresses as IPv4, [`parse_proc_addr`]) and its state, in hex.
pub(crate) struct SocketRow<'a> {
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub state: &'a str,
}

/// The sockets of a `/proc/net/{tcp,udp}{,6}` text; the header line and malformed lines
/// are skipped.
pub(crate) fn socket_rows(proc_text: &str) -> impl Iterator<Item = SocketRow<'_>> {
    proc_text.lines().filter_map(|line| {
        let mut f = line.split_whitespace();
        let (_sl, local, remote, state) = (f.next()?, f.next()?, f.next()?, f.next()?);
        Some(SocketRow {
            local: address_and_port(local)?,
            remote: address_and_port(remote)?,
            state,
        })
    })
}

/// `ADDR:PORT` as the kernel prints them, both in hex.
fn address_and_port(s: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = s.split_once(':')?;
    Some((parse_proc_addr(a)?, u16::from_str_radix(p, 16).ok()?))
}

/// The kernel prints each 32-bit word of the address as it sits in memory (network order)
/// read as a native integer, in hex.
pub(crate) fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::from(word(hex)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            Some(canonical(IpAddr::from(o)))
        }
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, everything else unchanged.
pub(crate) fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses the "USED MAX" a load command prints.
pub(crate) fn parse_usage(out: &str) -> Result<(u32, u32)> {
    let mut words = out.split_whitespace();
    let mut next = |what: &str| -> Result<u32> {
        let w = words
            .next()
            .ok_or_else(|| anyhow!("expected \"USED MAX\", got {:?}", out.trim()))?;
        w.parse()
            .with_context(|| format!("{what} {w:?} is not an unsigned 32-bit number"))
    };
    let used = next("USED")?;
    let max = next("MAX")?;
    Ok((used, max))
}

/// Runs a load command with `sh -c` and parses its output; killed after [`COMMAND_TIMEOUT`].
pub(crate) async fn command_usage(command: &str) -> Result<(u32, u32)> {
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever the shell started too.
        .process_group(0)
        .spawn()
        .context("starting sh")?;
    let pgid = child.id() as libc::pid_t;
    let wait = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, wait).await {
        Ok(joined) => joined
            .context("waiting for the command")?
            .context("waiting for the command")?,
        Err(_) => {
            // SAFETY: plain syscall; the group is ours and its leader is not reaped yet (the
            // blocking task that would reap it is still waiting).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            bail!("no answer within {COMMAND_TIMEOUT:?}; killed");
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        bail!(
            "{}{}{first}",
            out.status,
            if first.is_empty() { "" } else { ": " }
        );
    }
    parse_usage(&String::from_utf8_lossy(&out.stdout))
}
