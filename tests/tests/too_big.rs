//! End to end in network namespaces: the agent's link to the servers has the clients' MTU
//! (1500), so a full-size client packet does not fit in the tunnel. A 1 MB HTTP upload
//! through the anycast address stalls while the agent drops those packets silently, and
//! completes over IPv4 and IPv6 once it answers them (ICMP "fragmentation needed", ICMPv6
//! "packet too big"): the client's own stack lowers its path MTU to the anycast address and
//! sends smaller segments. Runs as root.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anycast_tests::topology::{ServerMode, Topology, ANYCAST_V4, ANYCAST_V6, HTTP_PORT};
use anyhow::{anyhow, bail, Context as _, Result};

const UPLOAD: usize = 1 << 20;
/// How long an upload may take while too-big packets are answered (it takes well under a
/// second here).
const COMPLETES_WITHIN: Duration = Duration::from_secs(30);
/// How long an upload is given while they are dropped: a stalled connection retransmits
/// the same full-size segment with growing timeouts and never gets further.
const STALLS_FOR: Duration = Duration::from_secs(5);

/// POSTs `bytes` bytes to `addr` within `within`; the server's name and the bytes it says it
/// received. The connection is reset when it ends (SO_LINGER 0), so a stalled upload does
/// not keep retransmitting after the test gave up on it.
fn upload(addr: SocketAddr, bytes: usize, within: Duration) -> Result<(String, usize)> {
    let deadline = Instant::now() + within;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow!("the deadline of {within:?} passed"))
    };
    let mut s = TcpStream::connect_timeout(&addr, within)
        .with_context(|| format!("connecting to {addr}"))?;
    abort_on_close(&s);
    s.write_all(
        format!("POST /upload HTTP/1.0\r\nHost: anycast\r\nContent-Length: {bytes}\r\n\r\n")
            .as_bytes(),
    )?;
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    while sent < bytes {
        // One write at a time, each bounded by what is left of the deadline (a write that
        // times out after a partial write returns that, and the next one waits again).
        s.set_write_timeout(Some(
            left().with_context(|| format!("sending, {sent} of {bytes} bytes written"))?,
        ))?;
        let n = chunk.len().min(bytes - sent);
        sent += s
            .write(&chunk[..n])
            .with_context(|| format!("sending, {sent} of {bytes} bytes written"))?;
    }
    s.set_read_timeout(Some(left()?))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .with_context(|| format!("reading the answer from {addr}"))?;
    let field = |name: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no {name} line in {answer:?}"))
    };
    Ok((field("server=")?, field("received=")?.parse()?))
}

fn abort_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The MTU the client's route cache holds for the anycast address (`None`: none learnt).
fn learnt_mtu(topo: &Topology, v6: bool) -> Result<Option<u32>> {
    let out = if v6 {
        topo.clients[0].ip(&["-6", "route", "get", &ANYCAST_V6.to_string()])?
    } else {
        topo.clients[0].ip(&["route", "get", &ANYCAST_V4.to_string()])?
    };
    let words: Vec<&str> = out.split_whitespace().collect();
    Ok(words
        .windows(2)
        .find(|w| w[0] == "mtu")
        .and_then(|w| w[1].parse().ok()))
}

fn counter(topo: &Topology, name: &str) -> Result<u64> {
    topo.verdict(name)
}

#[test]
fn uploads_without_tunnel_headroom_complete_once_too_big_packets_are_answered() -> Result<()> {
    let mut topo = Topology::build("actb", 1, 1, ServerMode::Static)?;
    topo.config_extra = serde_json::json!({ "answer_too_big": false });
    topo.start_agent(1)?;
    // The agent reaches the servers (two-armed, eth1) through a link no bigger than the
    // clients' own: a 1500-byte client packet is 1520 or 1540 bytes in the tunnel.
    topo.agent.ip(&["link", "set", "eth1", "mtu", "1500"])?;

    // Answers off: the full-size segments vanish, the upload stalls.
    let dropped_before = counter(&topo, "drop_too_big")?;
    for v6 in [false, true] {
        let addr = Topology::anycast(v6, HTTP_PORT);
        let started = Instant::now();
        let r = topo.clients[0].in_ns(move || Ok(upload(addr, UPLOAD, STALLS_FOR)));
        match r? {
            Ok(done) => bail!("answers off: the upload to {addr} completed: {done:?}"),
            Err(e) => println!(
                "answers off, {addr}: stalled ({e:#}) after {:?}",
                started.elapsed()
            ),
        }
        assert_eq!(
            learnt_mtu(&topo, v6)?,
            None,
            "no path MTU learnt for {addr}"
        );
    }
    let dropped = counter(&topo, "drop_too_big")? - dropped_before;
    assert!(
        dropped >= 2,
        "full-size packets dropped and counted: {dropped}"
    );
    assert_eq!(counter(&topo, "too_big_answered")?, 0);

    // Answers on (a reload).
    topo.config_extra = serde_json::json!({ "answer_too_big": true });
    topo.write_config(1)?;
    topo.ctl(&["reload"])?;
    for (v6, mtu) in [(false, 1480), (true, 1460)] {
        let addr = Topology::anycast(v6, HTTP_PORT);
        let answered_before = counter(&topo, "too_big_answered")?;
        let started = Instant::now();
        let (server, received) =
            topo.clients[0].in_ns(move || upload(addr, UPLOAD, COMPLETES_WITHIN))?;
        let took = started.elapsed();
        let answered = counter(&topo, "too_big_answered")? - answered_before;
        println!(
            "answers on, {addr}: {received} bytes to {server} in {took:?}, {answered} \
             too-big answers"
        );
        assert_eq!(received, UPLOAD, "the server got the whole upload");
        assert!(answered >= 1, "the agent answered at least once");
        assert_eq!(
            learnt_mtu(&topo, v6)?,
            Some(mtu),
            "the client learnt the tunnel's MTU for {addr}"
        );
    }
    assert_eq!(counter(&topo, "too_big_rate_limited")?, 0);
    Ok(())
}
