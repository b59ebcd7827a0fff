//! The registration sockets' tasks: one receiver per socket feeds the owner's datagram queue;
//! one sender per socket drains a bounded reply queue. The owner hands replies over with
//! `try_send` and never waits: when a queue is full (the kernel's send queue is full, e.g. of
//! replies to neighbours that never resolve), the reply is dropped and counted.
use std::{net::SocketAddr, rc::Rc};

use tokio::{net::UdpSocket, sync::mpsc, task::LocalSet};

use crate::registration::agent::Reply;

/// A datagram from a registration socket: the socket's index, the payload, the sender.
pub struct Datagram {
    pub via: usize,
    pub payload: Vec<u8>,
    pub from: SocketAddr,
}

/// Replies waiting for one socket; beyond this, replies are dropped and counted.
pub const REPLY_QUEUE: usize = 256;

/// The owner's handle on one socket's sender task.
pub struct ReplySender {
    pub v4: bool,
    /// The socket's own address.
    pub local: Option<std::net::IpAddr>,
    queue: mpsc::Sender<Reply>,
}

/// Why a reply was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// The queue is full: the socket cannot keep up.
    Full,
    /// The sender task has stopped.
    Closed,
}

impl ReplySender {
    /// Queues a reply without waiting.
    pub fn offer(&self, reply: Reply) -> Result<(), NotQueued> {
        self.queue.try_send(reply).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NotQueued::Full,
            mpsc::error::TrySendError::Closed(_) => NotQueued::Closed,
        })
    }
}

/// Gives the socket receive and send buffers of `bytes` each: beyond `net.core.rmem_max` and
/// `wmem_max` when the process may (SO_RCVBUFFORCE and SO_SNDBUFFORCE need CAP_NET_ADMIN,
/// which the agent has), else as much as the limits allow. Logs what it got.
pub fn size_buffers(sock: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd as _;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option: libc::c_int| {
        // SAFETY: a valid socket and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    for (what, forced, plain) in [
        ("receive", libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ("send", libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set(forced) != 0 && set(plain) != 0 {
            tracing::warn!(
                "registration socket: could not size its {what} buffer: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let sock = socket2::SockRef::from(sock);
    match (sock.recv_buffer_size(), sock.send_buffer_size()) {
        (Ok(r), Ok(s)) => tracing::debug!("registration socket: buffers {r} / {s} bytes"),
        (r, s) => tracing::debug!("registration socket: reading its buffer sizes: {r:?} {s:?}"),
    }
}

/// Starts a receiver for each socket, all feeding `datagrams`.
pub fn spawn_receivers(
    local: &LocalSet,
    sockets: &[Rc<UdpSocket>],
    datagrams: mpsc::Sender<Datagram>,
) {
    for (via, sock) in sockets.iter().enumerate() {
        let sock = sock.clone();
        let datagrams = datagrams.clone();
        local.spawn_local(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match sock.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        let d = Datagram {
                            via,
                            payload: buf[..n].to_vec(),
                            from,
                        };
                        // Waits while the owner is busy: the kernel's receive queue holds
                        // (or drops) what comes meanwhile.
                        if datagrams.send(d).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!("registration socket: {e}"),
                }
            }
        });
    }
}

/// Starts a sender task for `sock` with a queue of `capacity` replies.
pub fn spawn_sender(local: &LocalSet, sock: Rc<UdpSocket>, capacity: usize) -> ReplySender {
    let v4 = sock.local_addr().is_ok_and(|a| a.is_ipv4());
    let own = sock.local_addr().ok().map(|a| a.ip());
    let (queue, mut replies) = mpsc::channel::<Reply>(capacity);
    local.spawn_local(async move {
        let mut failures = 0u64;
        while let Some(r) = replies.recv().await {
            if let Err(e) = sock.send_to(&r.payload, r.to).await {
                // One line per power of two: a flood of unreachable sources is not a log flood.
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!("sending to {}: {e} ({failures} send errors so far)", r.to);
                }
            }
        }
    });
    ReplySender {
        v4,
        local: own,
        queue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(n: u8) -> Reply {
        Reply {
            to: "127.0.0.1:9".parse().unwrap(),
            payload: vec![n],
        }
    }

    #[tokio::test]
    async fn registration_sockets_get_the_buffers_asked_for() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = socket2::SockRef::from(&sock);
        let before = (r.recv_buffer_size().unwrap(), r.send_buffer_size().unwrap());
        size_buffers(&sock, 8 << 20);
        let after = (r.recv_buffer_size().unwrap(), r.send_buffer_size().unwrap());
        // The kernel doubles the value it is given (for its bookkeeping); as root the limits
        // do not apply.
        assert!(
            after.0 >= 8 << 20 && after.1 >= 8 << 20,
            "{before:?} -> {after:?} bytes"
        );
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_stopped_sender_reports_closed() {
        let (queue, replies) = mpsc::channel(2);
        let sender = ReplySender {
            v4: true,
            local: None,
            queue,
        };
        assert_eq!(sender.offer(reply(1)), Ok(()));
        assert_eq!(sender.offer(reply(2)), Ok(()));
        assert_eq!(sender.offer(reply(3)), Err(NotQueued::Full));
        drop(replies);
        assert_eq!(sender.offer(reply(4)), Err(NotQueued::Closed));
    }
}
