//! ICMP through the agent, end to end in network namespaces (the e2e topology: a client,
//! the router, the agent, two servers). The servers answer the client directly, through
//! the router, whose link towards the client has an MTU of 1280 while every other link
//! carries 1500-byte packets: a 1 MB HTTP download needs the router's "fragmentation
//! needed" / "packet too big" to reach the server that sends it. They are sent to the
//! anycast address, so they reach the agent, which tunnels them to that server: the
//! download completes over IPv4 and IPv6; with `forward_icmp_errors` off it stalls (a path
//! MTU black hole) and fails within its bound. And the agent answers ping of the anycast
//! addresses. Runs as root.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anycast_tests::{
    netns::Netns,
    topology::{ServerMode, Topology, ANYCAST_V4, ANYCAST_V6, HTTP_PORT},
};
use anyhow::{bail, Context as _, Result};

/// The router's MTU towards the clients.
const NARROW_MTU: &str = "1280";
const DOWNLOAD: usize = 1 << 20;
/// A download gets this long in all; a stalled one is given up after `STALL` without data.
const DOWNLOAD_BOUND: Duration = Duration::from_secs(30);
const STALL: Duration = Duration::from_secs(4);

fn verdict(topo: &Topology, name: &str) -> Result<u64> {
    topo.verdict(name)
}

/// `GET /bytes/N` from `addr`; checks every byte of the body. Returns the answering server.
/// (Call from a thread inside a client namespace.)
fn download(addr: SocketAddr, n: usize) -> Result<String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, STALL)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    write!(s, "GET /bytes/{n} HTTP/1.0\r\nHost: anycast\r\n\r\n")?;
    let mut got = Vec::with_capacity(n + 256);
    let mut buf = vec![0u8; 65536];
    loop {
        if start.elapsed() > DOWNLOAD_BOUND {
            bail!("{addr}: {} bytes after {DOWNLOAD_BOUND:?}", got.len());
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => bail!(
                "{addr}: stalled after {} bytes in {:?}: {e}",
                got.len(),
                start.elapsed()
            ),
        }
    }
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the answer's head")?;
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let body = &got[head_end + 4..];
    if !head.starts_with("HTTP/1.0 200") || body.len() != n {
        bail!("{addr}: {head:?} and {} bytes of body, not {n}", body.len());
    }
    if let Some(i) = (0..n).find(|&i| body[i] != (i % 256) as u8 ^ 0x5a) {
        bail!("{addr}: body byte {i} differs");
    }
    let server = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Server: "))
        .context("no X-Server")?;
    Ok(server.to_string())
}

fn in_client<T: Send + 'static>(
    topo: &Topology,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = Netns {
        name: topo.clients[0].name.clone(),
    };
    let r = ns.in_ns(f);
    std::mem::forget(ns); // owned by the topology
    r
}

/// The router's link towards the clients narrowed to 1280 (the servers' links and the
/// clients' own stay wide), and the anycast addresses routed to the agent, so the router's
/// ICMP errors about the servers' replies go there.
fn narrow_the_clients_path(topo: &Topology) -> Result<()> {
    topo.net.ip(&["link", "set", "brc", "mtu", NARROW_MTU])?;
    topo.net.ip(&[
        "route",
        "add",
        &format!("{ANYCAST_V4}/32"),
        "via",
        "10.71.1.2",
    ])?;
    topo.net.ip(&[
        "-6",
        "route",
        "add",
        &format!("{ANYCAST_V6}/128"),
        "via",
        "fd71:1::2",
    ])?;
    // ICMP errors are sent at the kernel's usual rates (not turned off).
    topo.net.sysctl("net.ipv4.icmp_ratelimit", "1000")?;
    Ok(())
}

/// Turns forwarding of ICMP errors on or off with a configuration reload.
fn set_forwarding(topo: &mut Topology, on: bool) -> Result<()> {
    topo.config_extra = serde_json::json!({ "forward_icmp_errors": on });
    topo.write_config(topo.configured)?;
    topo.ctl(&["reload"])?;
    Ok(())
}

#[test]
fn large_replies_cross_a_narrow_link_only_when_icmp_errors_reach_the_servers() -> Result<()> {
    let mut topo = Topology::build("acim", 1, 2, ServerMode::Static)?;
    topo.start_agent(2)?;
    narrow_the_clients_path(&topo)?;
    let v4 = Topology::anycast(false, HTTP_PORT);
    let v6 = Topology::anycast(true, HTTP_PORT);

    // Off first (no server has learnt the narrow path yet): the download stalls.
    set_forwarding(&mut topo, false)?;
    for addr in [v4, v6] {
        let before = verdict(&topo, "pass_not_service")?;
        let start = Instant::now();
        let r = in_client(&topo, move || download(addr, DOWNLOAD));
        let took = start.elapsed();
        println!("forward_icmp_errors off, {addr}: {r:?} in {took:?}");
        assert!(r.is_err(), "{addr}: completed without the ICMP errors");
        assert!(
            took < DOWNLOAD_BOUND + STALL,
            "{addr}: failed only after {took:?}"
        );
        assert!(
            verdict(&topo, "pass_not_service")? > before,
            "{addr}: the router's errors reached the agent and were passed"
        );
    }
    assert_eq!(verdict(&topo, "icmp_to_server")?, 0);

    // On: the errors reach the servers, which lower their path MTU; complete downloads.
    set_forwarding(&mut topo, true)?;
    for addr in [v4, v6] {
        let before = verdict(&topo, "icmp_to_server")?;
        let start = Instant::now();
        let server = in_client(&topo, move || download(addr, DOWNLOAD))
            .with_context(|| format!("downloading 1 MB from {addr}"))?;
        let errors = verdict(&topo, "icmp_to_server")? - before;
        println!(
            "forward_icmp_errors on, {addr}: 1 MB from {server} in {:?}, {errors} ICMP errors \
             tunnelled",
            start.elapsed()
        );
        assert!(errors >= 1, "{addr}: no error was tunnelled");
    }
    Ok(())
}

/// One echo request to `dst` from a raw socket (identifier `id`, sequence `seq`); the reply's
/// source, or an error after `timeout`. (Call from a thread inside a client namespace.)
fn ping(dst: IpAddr, id: u16, seq: u16, timeout: Duration) -> Result<IpAddr> {
    use std::mem::{size_of, zeroed};
    let v6 = dst.is_ipv6();
    let (family, proto) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6)
    } else {
        (libc::AF_INET, libc::IPPROTO_ICMP)
    };
    // SAFETY: plain syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        let close = Closer(fd);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as u32,
        );
        let mut msg = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(b"anycast ping");
        if !v6 {
            // ICMPv6's checksum is the kernel's on a raw socket (RFC 3542 section 3.1).
            let sum = anycast_tests::packet::inet_checksum(&msg);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        let mut sa: libc::sockaddr_storage = zeroed();
        let len = match dst {
            IpAddr::V4(a) => {
                let s = &mut *(&mut sa as *mut _ as *mut libc::sockaddr_in);
                s.sin_family = libc::AF_INET as u16;
                s.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                size_of::<libc::sockaddr_in>()
            }
            IpAddr::V6(a) => {
                let s = &mut *(&mut sa as *mut _ as *mut libc::sockaddr_in6);
                s.sin6_family = libc::AF_INET6 as u16;
                s.sin6_addr.s6_addr = a.octets();
                size_of::<libc::sockaddr_in6>()
            }
        };
        if libc::sendto(
            fd,
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            len as u32,
        ) < 0
        {
            bail!("sendto {dst}: {}", std::io::Error::last_os_error());
        }
        let start = Instant::now();
        let mut buf = [0u8; 1500];
        while start.elapsed() < timeout {
            let mut from: libc::sockaddr_storage = zeroed();
            let mut from_len = size_of::<libc::sockaddr_storage>() as u32;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut from_len,
            );
            if n <= 0 {
                continue;
            }
            // An IPv4 raw socket gets the IP header too.
            let icmp = if v6 {
                &buf[..n as usize]
            } else {
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                &buf[ihl.min(n as usize)..n as usize]
            };
            let reply = if v6 { 129 } else { 0 };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..8] == msg[4..8] {
                let source = if v6 {
                    let s = &*(&from as *const _ as *const libc::sockaddr_in6);
                    IpAddr::from(s.sin6_addr.s6_addr)
                } else {
                    let s = &*(&from as *const _ as *const libc::sockaddr_in);
                    IpAddr::from(s.sin_addr.s_addr.to_ne_bytes())
                };
                drop(close);
                return Ok(source);
            }
        }
        bail!("no echo reply from {dst} within {timeout:?}")
    }
}

struct Closer(i32);

impl Drop for Closer {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this guard owns.
        unsafe { libc::close(self.0) };
    }
}

#[test]
fn the_agent_answers_ping_of_the_anycast_addresses() -> Result<()> {
    let mut topo = Topology::build("acimp", 1, 1, ServerMode::Static)?;
    topo.start_agent(1)?;
    for dst in [IpAddr::V4(ANYCAST_V4), IpAddr::V6(ANYCAST_V6)] {
        let before = verdict(&topo, "echo_reply")?;
        for seq in 1..=3u16 {
            let from = in_client(&topo, move || {
                ping(dst, 0x4143, seq, Duration::from_secs(2))
            })?;
            assert_eq!(from, dst, "the reply comes from the anycast address");
        }
        assert_eq!(
            verdict(&topo, "echo_reply")? - before,
            3,
            "{dst}: three requests answered by the agent"
        );
    }
    // Off: the agent no longer answers (its kernel does not have the address).
    topo.config_extra = serde_json::json!({ "answer_ping": false });
    topo.write_config(topo.configured)?;
    topo.ctl(&["reload"])?;
    for dst in [IpAddr::V4(ANYCAST_V4), IpAddr::V6(ANYCAST_V6)] {
        let before = verdict(&topo, "echo_reply")?;
        let r = in_client(&topo, move || ping(dst, 0x4143, 9, Duration::from_secs(1)));
        assert!(r.is_err(), "{dst}: answered with answer_ping off: {r:?}");
        assert_eq!(verdict(&topo, "echo_reply")?, before);
    }
    Ok(())
}
