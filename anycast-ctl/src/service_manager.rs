//! Telling the service manager how the agent or the server side is (systemd's `Type=notify`,
//! which the packaged units use): `READY=1` once it forwards and answers, `STOPPING=1` when
//! a signal stops it, so `systemctl start` returns when the agent is ready, not when its
//! process starts. The protocol of sd_notify(3): one datagram of `KEY=VALUE` lines to the
//! unix socket that `$NOTIFY_SOCKET` names, a path or, with a leading `@`, an abstract name.
//! Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.
use std::{
    ffi::OsStr,
    os::unix::{ffi::OsStrExt as _, net::UnixDatagram},
    path::Path,
};

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one; a failure is
/// logged, never fatal (the service works without its manager knowing).
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(
            "telling the service manager {state:?} through {}: {e}",
            socket.to_string_lossy()
        );
    }
}

fn send(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(state.as_bytes(), &address)?;
        }
        None => {
            sender.send_to(state.as_bytes(), Path::new(socket))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    fn received(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_path_socket_gets_the_state() {
        let dir = std::env::temp_dir().join(format!("anycast-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        super::send(path.as_os_str(), "READY=1\nSTATUS=ready").unwrap();
        assert_eq!(received(&listener), "READY=1\nSTATUS=ready");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("anycast-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let listener = UnixDatagram::bind_addr(&address).unwrap();
        super::send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(received(&listener), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let missing = std::env::temp_dir().join("anycast-notify-missing/none");
        assert!(super::send(missing.as_os_str(), "READY=1").is_err());
    }
}
