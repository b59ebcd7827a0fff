//! Kernel routing events: a `NETLINK_ROUTE` socket subscribed to link, address, neighbour
//! and route changes. The agent bumps the data path's FIB generation on each batch, so its
//! cached next hops follow the kernel at once instead of at the next tick of the flow clock.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{anyhow, Context as _, Result};
use tokio::io::{unix::AsyncFd, Interest};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

pub struct RouteEvents {
    socket: AsyncFd<OwnedFd>,
}

impl RouteEvents {
    /// Subscribes in the calling thread's network namespace.
    pub fn subscribe() -> Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a NETLINK_ROUTE socket");
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK
            | RTMGRP_NEIGH
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV6_ROUTE;
        // SAFETY: a valid sockaddr_nl of its own size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("subscribing to route, neighbour and link events");
        }
        // SAFETY: the descriptor is owned by the AsyncFd and stays open as long as it lives.
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|_| anyhow!("registering the netlink socket with the runtime"))?;
        Ok(RouteEvents { socket })
    }

    /// Waits for one or more events and consumes every one queued. A lost batch (the
    /// socket's buffer overflowed) counts as a change too.
    ///
    /// Cancel-safe: messages are consumed only in the poll that returns.
    pub async fn changed(&self) -> Result<()> {
        // The contents do not matter: a short buffer truncates each datagram away.
        let mut buf = [0u8; 64];
        loop {
            let mut guard = self.socket.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe {
                    libc::recv(
                        self.socket.get_ref().as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(e).context("reading routing events"),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}
