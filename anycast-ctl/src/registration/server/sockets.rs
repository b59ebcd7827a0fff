use super::*;

/// A UDP socket of the agent's family, bound to `local` (a real address) when there is one,
/// else to the unspecified address. An IPv6 real address the kernel does not let us bind yet
/// (duplicate address detection still running) is bound with IPV6_FREEBIND, so the updates
/// leave with it as their source once it is usable; an IPv4 one is a configuration error.
pub(crate) async fn bind_socket(local: Option<IpAddr>, v4: bool) -> Result<UdpSocket> {
    let Some(ip) = local else {
        let any: IpAddr = if v4 {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        return UdpSocket::bind((any, 0))
            .await
            .with_context(|| format!("binding to {any}"));
    };
    match (UdpSocket::bind((ip, 0)).await, ip) {
        (Ok(s), _) => Ok(s),
        (Err(e), IpAddr::V6(v6)) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            tracing::warn!(
                "real address {ip} is not usable on this host yet (tentative, or missing); \
                 sending from it anyway"
            );
            let s =
                bind_freebind_v6(v6).with_context(|| format!("binding to real address {ip}"))?;
            UdpSocket::from_std(s).with_context(|| format!("binding to real address {ip}"))
        }
        (Err(e), _) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            Err(e).with_context(|| format!("real address {ip} is not an address of this host"))
        }
        (Err(e), _) => Err(e).with_context(|| format!("binding to real address {ip}")),
    }
}

/// A non-blocking UDP socket bound to `ip` (any port) with IPV6_FREEBIND.
pub(crate) fn bind_freebind_v6(ip: Ipv6Addr) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: plain syscalls; the descriptor is owned by `sock` from its creation on, and the
    // option value and address are fully initialised with their sizes passed along.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = std::net::UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_FREEBIND,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = ip.octets();
        if libc::bind(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }
}
