//! Watching packets on an interface of a namespace (an AF_PACKET socket with kernel receive
//! timestamps), and a UDP client that keeps sending, for the end-to-end timings.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Moves the calling thread into the named namespace.
pub fn enter_ns(name: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening netns {name}"))?;
    // SAFETY: a valid fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

const ETH_P_ALL: u16 = 0x0003;
const SIOCGSTAMPNS: libc::c_ulong = 0x8907;

/// A packet socket on one interface of the calling thread's namespace.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn open(dev: &str) -> Result<Capture> {
        // SAFETY: plain socket(2).
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if raw < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {dev}");
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: a valid sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            bail!(
                "binding a packet socket to {dev}: {}",
                std::io::Error::last_os_error()
            );
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let c = Capture { fd };
        // The first SIOCGSTAMPNS turns receive timestamps on.
        let _ = c.stamp();
        Ok(c)
    }

    fn stamp(&self) -> Option<SystemTime> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: SIOCGSTAMPNS fills a timespec.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCGSTAMPNS, &mut ts) };
        (rc == 0 && ts.tv_sec > 0)
            .then(|| UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// The next frame and when the kernel received it; `None` after 100 ms without one.
    pub fn next(&self, buf: &mut [u8]) -> Result<Option<(usize, SystemTime)>> {
        // SAFETY: recv into our buffer.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(anyhow!("reading a packet socket: {e}")),
            };
        }
        let when = self.stamp().unwrap_or_else(SystemTime::now);
        Ok(Some((n as usize, when)))
    }
}

/// (outer destination, inner destination) of an IPv4-in-IPv4 Ethernet frame.
pub fn ipip(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    if frame.len() < 14 + 40 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if frame[14 + 9] != 4 || frame.len() < 14 + ihl + 20 {
        return None;
    }
    let outer = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let i = 14 + ihl;
    let inner = Ipv4Addr::new(frame[i + 16], frame[i + 17], frame[i + 18], frame[i + 19]);
    Some((outer, inner))
}

/// Records the kernel receive times of the IPv4-in-IPv4 frames to `outer` (inner
/// destination `inner`) seen on `dev` of namespace `ns`, until dropped.
pub struct Watch {
    stop: Arc<AtomicBool>,
    pub seen: Arc<Mutex<Vec<SystemTime>>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Watch {
    pub fn start(ns: &str, dev: &str, outer: Ipv4Addr, inner: Ipv4Addr) -> Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let (ns, dev_name) = (ns.to_string(), dev.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            let cap = enter_ns(&ns).and_then(|_| Capture::open(&dev_name));
            let cap = match cap {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Some((n, when)) = cap.next(&mut buf)? {
                    if ipip(&buf[..n]) == Some((outer, inner)) {
                        v.lock().unwrap().push(when);
                    }
                }
            }
            Ok(())
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("watching {dev}: {e}"),
            Err(_) => bail!("watching {dev}: the capture did not start"),
        }
        Ok(Watch {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Times seen at or after `t`.
    pub fn since(&self, t: SystemTime) -> Vec<SystemTime> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&w| w >= t)
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client in namespace `ns` that sends a small UDP datagram to `to` every ~100 us,
/// round robin from `flows` sockets (so `flows` flows), until dropped. With `rotate`, the
/// sockets are replaced by new ones (new flows) that often.
pub struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Sender {
    pub fn start(ns: &str, to: SocketAddr, flows: usize, rotate: Option<Duration>) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || -> Result<()> {
            enter_ns(&ns)?;
            let open = || {
                (0..flows)
                    .map(|_| UdpSocket::bind("0.0.0.0:0"))
                    .collect::<std::io::Result<Vec<_>>>()
            };
            let mut socks = open()?;
            let mut opened = std::time::Instant::now();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                if rotate.is_some_and(|r| opened.elapsed() >= r) {
                    socks = open()?;
                    opened = std::time::Instant::now();
                }
                // Errors (e.g. ICMP unreachable before anything forwards) do not matter.
                let _ = socks[i % flows].send_to(b"anycast bench", to);
                i += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(())
        });
        Sender {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `a - b` in milliseconds (negative if `a` is earlier).
pub fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}
