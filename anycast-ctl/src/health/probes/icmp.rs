//! ICMP and ICMPv6 echo through one raw socket per family, as keepalived's `ICMP_CHECK`.
use super::*;

pub(crate) const ICMP_ECHO_REPLY: u8 = 0;
pub(crate) const ICMP_ECHO_REQUEST: u8 = 8;
pub(crate) const ICMP6_ECHO_REQUEST: u8 = 128;
pub(crate) const ICMP6_ECHO_REPLY: u8 = 129;
/// `ICMP_FILTER` (level `SOL_RAW`) and `ICMP6_FILTER` (level `IPPROTO_ICMPV6`) from Linux's
/// uapi headers; the libc crate has neither.
pub(crate) const ICMP_FILTER: libc::c_int = 1;
pub(crate) const ICMP6_FILTER: libc::c_int = 1;
/// ICMP header (8 bytes) and the checker's 8-byte cookie.
pub(crate) const ECHO_LEN: usize = 16;

/// The internet checksum (RFC 1071); 0 over a message that holds its correct checksum.
pub(crate) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: identifier, sequence number and the checker's cookie as payload. The
/// ICMPv6 checksum is left to the kernel (raw IPPROTO_ICMPV6 sockets compute it, RFC 3542).
pub(crate) fn echo_request(v6: bool, ident: u16, seq: u16, cookie: u64) -> [u8; ECHO_LEN] {
    let mut p = [0u8; ECHO_LEN];
    p[0] = if v6 {
        ICMP6_ECHO_REQUEST
    } else {
        ICMP_ECHO_REQUEST
    };
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&cookie.to_be_bytes());
    if !v6 {
        let sum = checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// The sequence number of an echo reply to this checker (identifier and cookie match), from
/// what a raw socket reads: the IPv4 packet with its header, or the ICMPv6 message alone
/// (whose checksum the kernel has verified).
pub(crate) fn parse_echo_reply(v6: bool, data: &[u8], ident: u16, cookie: u64) -> Option<u16> {
    let icmp = if v6 {
        data
    } else {
        let first = *data.first()?;
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < 20 || data.len() < ihl || data[9] != 1 {
            return None;
        }
        let icmp = &data[ihl..];
        if checksum(icmp) != 0 {
            return None;
        }
        icmp
    };
    if icmp.len() < ECHO_LEN {
        return None;
    }
    let reply = if v6 {
        ICMP6_ECHO_REPLY
    } else {
        ICMP_ECHO_REPLY
    };
    if icmp[0] != reply
        || icmp[1] != 0
        || icmp[4..6] != ident.to_be_bytes()
        || icmp[8..16] != cookie.to_be_bytes()
    {
        return None;
    }
    Some(u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// One raw ICMP socket (per family) shared by the checker's ICMP checks; a reader task hands
/// each reply to the check waiting for its sequence number and source.
pub(crate) struct Pinger {
    v6: bool,
    fd: AsyncFd<Socket>,
    ident: u16,
    cookie: u64,
    next_seq: Cell<u16>,
    pub(crate) waiting: RefCell<HashMap<u16, (IpAddr, oneshot::Sender<()>)>>,
}

/// Forgets a ping's sequence number when the ping ends, answered or not (timed out).
pub(crate) struct Forget<'a> {
    pinger: &'a Pinger,
    seq: u16,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.pinger.waiting.borrow_mut().remove(&self.seq);
    }
}

impl Pinger {
    pub(crate) fn open(v6: bool, ident: u16, cookie: u64) -> io::Result<Pinger> {
        let socket = if v6 {
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
        } else {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
        };
        socket.set_nonblocking(true)?;
        if let Err(e) = set_echo_reply_filter(&socket, v6) {
            tracing::debug!("health: ICMP filter not set ({e}); replies are filtered in userspace");
        }
        // SAFETY: the socket owns its descriptor, which is neither replaced nor closed while
        // the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(socket)? };
        Ok(Pinger {
            v6,
            fd,
            ident,
            cookie,
            next_seq: Cell::new(0),
            waiting: RefCell::new(HashMap::new()),
        })
    }

    pub(crate) async fn ping(&self, dest: IpAddr) -> Result<String, String> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let seq = {
            let mut waiting = self.waiting.borrow_mut();
            let mut seq = self.next_seq.get();
            for _ in 0..u16::MAX {
                if !waiting.contains_key(&seq) {
                    break;
                }
                seq = seq.wrapping_add(1);
            }
            self.next_seq.set(seq.wrapping_add(1));
            waiting.insert(seq, (dest, tx));
            seq
        };
        let _forget = Forget { pinger: self, seq };
        let packet = echo_request(self.v6, self.ident, seq, self.cookie);
        let to = SockAddr::from(SocketAddr::new(dest, 0));
        loop {
            let mut ready = self
                .fd
                .writable()
                .await
                .map_err(|e| format!("ICMP socket: {e}"))?;
            match ready.try_io(|s| s.get_ref().send_to(&packet, &to)) {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => return Err(format!("sending the echo request: {e}")),
                Err(_would_block) => continue,
            }
        }
        rx.await
            .map_err(|_| "the ICMP reader stopped".to_string())?;
        Ok(format!("echo reply in {}", fmt_elapsed(started)))
    }

    /// Hands a datagram read from the socket to the ping it answers, if any: same identifier,
    /// cookie and sequence number, and from the address that ping was sent to.
    pub(crate) fn dispatch(&self, data: &[u8], from: Option<IpAddr>) {
        let Some(seq) = parse_echo_reply(self.v6, data, self.ident, self.cookie) else {
            return;
        };
        let mut waiting = self.waiting.borrow_mut();
        let matches = waiting
            .get(&seq)
            .is_some_and(|(dest, _)| Some(*dest) == from);
        if matches {
            if let Some((_, tx)) = waiting.remove(&seq) {
                let _ = tx.send(());
            }
        }
    }

    pub(crate) async fn receive(self: Rc<Self>) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        loop {
            let mut ready = match self.fd.readable().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("health: ICMP socket: {e}; ICMP checks will time out");
                    return;
                }
            };
            match ready.try_io(|s| s.get_ref().recv_from(&mut buf)) {
                Ok(Ok((n, from))) => {
                    // SAFETY: recv_from initialised the first n bytes of buf.
                    let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                    let from = from.as_socket().map(|a| a.ip().to_canonical());
                    self.dispatch(data, from);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => {
                    tracing::debug!("health: reading the ICMP socket: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_would_block) => {}
            }
        }
    }
}

/// Lets only echo replies reach the socket, so the checker is not woken by every ICMP
/// message the host receives (raw sockets get a copy of each).
pub(crate) fn set_echo_reply_filter(socket: &Socket, v6: bool) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let rc = if v6 {
        // A set bit blocks the type.
        let mut filter = [u32::MAX; 8];
        filter[usize::from(ICMP6_ECHO_REPLY >> 5)] &= !(1u32 << (ICMP6_ECHO_REPLY & 31));
        // SAFETY: fd is an open socket; the option value is the 32-byte icmp6_filter.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_ICMPV6,
                ICMP6_FILTER,
                filter.as_ptr().cast(),
                std::mem::size_of_val(&filter) as libc::socklen_t,
            )
        }
    } else {
        // A set bit blocks the type (types 0-31).
        let mask: u32 = !(1u32 << ICMP_ECHO_REPLY);
        // SAFETY: fd is an open socket; the option value is the 4-byte icmp_filter.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_RAW,
                ICMP_FILTER,
                (&mask as *const u32).cast(),
                std::mem::size_of_val(&mask) as libc::socklen_t,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
