//! The host around the data path: interface indexes, sysctls, addresses and clsact qdiscs,
//! each change recorded so it is undone when the agent or server exits.
use std::{net::IpAddr, process::Command};

use anyhow::{bail, Context as _, Result};

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name contains NUL")?;
    // SAFETY: c is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!(
            "no interface named '{name}': {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(index)
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

pub fn sysctl_get(key: &str) -> Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key))
        .with_context(|| format!("reading sysctl {key}"))?
        .trim()
        .to_string())
}

/// Undoes, on drop, the host changes made through it, newest first.
#[derive(Default)]
pub struct HostChanges {
    sysctls: Vec<(String, String)>,
    addresses: Vec<(IpAddr, String)>,
    /// Interfaces we gave a clsact qdisc (for TC programs).
    qdiscs: Vec<String>,
    /// Where the sysctls' original values are kept, so they are restored correctly by a
    /// later process even after this one crashed or handed off.
    originals: Option<std::path::PathBuf>,
    /// Dropped without `undo`, the changes stay (a process that adopted them from another
    /// and failed leaves them as they were).
    pub keep_on_drop: bool,
}

impl HostChanges {
    /// Changes whose sysctls' original values are kept in `path`; those an earlier process
    /// recorded there (it crashed or handed off, leaving its values set) are taken over, so
    /// they are the ones restored, not the values that process set.
    pub fn with_originals_file(path: std::path::PathBuf) -> Result<Self> {
        let sysctls: Vec<(String, String)> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("reading the original sysctl values in {}", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if !sysctls.is_empty() {
            let list: Vec<String> = sysctls.iter().map(|(k, v)| format!("{k}={v}")).collect();
            tracing::info!(
                "original sysctl values recorded by an earlier agent, restored at a full stop: {}",
                list.join(", ")
            );
        }
        Ok(HostChanges {
            sysctls,
            addresses: Vec::new(),
            qdiscs: Vec::new(),
            originals: Some(path),
            keep_on_drop: false,
        })
    }

    /// Sets a sysctl, remembering the old value if it differs (unless an earlier process
    /// of the same instance already recorded the original).
    pub fn sysctl(&mut self, key: &str, value: &str) -> Result<()> {
        let old = sysctl_get(key)?;
        if old == value {
            return Ok(());
        }
        let recorded = self.sysctls.iter().any(|(k, _)| k == key);
        if !recorded {
            self.sysctls.push((key.to_string(), old.clone()));
            self.save_originals()?;
        }
        std::fs::write(sysctl_path(key), value)
            .with_context(|| format!("setting sysctl {key}={value}"))?;
        tracing::info!("set {key}={value} (was {old})");
        Ok(())
    }

    fn save_originals(&self) -> Result<()> {
        let Some(path) = &self.originals else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&self.sysctls)?;
        crate::files::write_atomically(path, &bytes)
    }

    /// Leaves every change in place (and the record of the originals), for a later process
    /// to undo.
    pub fn keep(&mut self) {
        self.sysctls.clear();
        self.addresses.clear();
        self.qdiscs.clear();
        self.originals = None;
    }

    /// Adds a host address to an interface unless it is there already.
    pub fn add_address(&mut self, addr: IpAddr, dev: &str) -> Result<()> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let cidr = format!("{addr}/{prefix}");
        let shown = Command::new("ip")
            .args(["-o", "addr", "show", "dev", dev])
            .output()
            .context("running ip")?;
        let present = String::from_utf8_lossy(&shown.stdout)
            .split_whitespace()
            .any(|w| w == cidr);
        if present {
            tracing::info!("{cidr} already on {dev}; leaving it there");
            return Ok(());
        }
        let mut cmd = Command::new("ip");
        cmd.args(["addr", "add", &cidr, "dev", dev]);
        if addr.is_ipv6() {
            cmd.arg("nodad");
        }
        let out = cmd.output().context("running ip addr add")?;
        if !out.status.success() {
            bail!(
                "ip addr add {cidr} dev {dev}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        tracing::info!("added {cidr} to {dev}");
        self.addresses.push((addr, dev.to_string()));
        Ok(())
    }

    /// Gives an interface the clsact qdisc TC programs attach to, unless it has one.
    pub fn add_clsact(&mut self, dev: &str) -> Result<()> {
        match aya::programs::tc::qdisc_add_clsact(dev) {
            Ok(()) => {
                tracing::info!("added the clsact qdisc to {dev}");
                self.qdiscs.push(dev.to_string());
                Ok(())
            }
            Err(aya::programs::tc::TcError::NetlinkError(e))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                tracing::info!("{dev} already has a clsact qdisc; leaving it there");
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("adding the clsact qdisc to {dev}")),
        }
    }

    pub fn undo(&mut self) {
        while let Some(dev) = self.qdiscs.pop() {
            // Deleting the qdisc deletes every filter on it.
            let ok = Command::new("tc")
                .args(["qdisc", "del", "dev", &dev, "clsact"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                tracing::info!("removed the clsact qdisc from {dev}");
            } else {
                tracing::warn!("could not remove the clsact qdisc from {dev}");
            }
        }
        while let Some((addr, dev)) = self.addresses.pop() {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let ok = Command::new("ip")
                .args(["addr", "del", &format!("{addr}/{prefix}"), "dev", &dev])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                tracing::info!("removed {addr}/{prefix} from {dev}");
            } else {
                tracing::warn!("could not remove {addr}/{prefix} from {dev}");
            }
        }
        while let Some((key, old)) = self.sysctls.pop() {
            match std::fs::write(sysctl_path(&key), &old) {
                Ok(()) => tracing::info!("restored {key}={old}"),
                Err(e) => tracing::warn!("could not restore {key}={old}: {e}"),
            }
        }
        if let Some(path) = self.originals.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for HostChanges {
    fn drop(&mut self) {
        if !self.keep_on_drop {
            self.undo();
        }
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// The global-scope addresses of the interfaces (a server's real addresses by default).
pub fn global_addresses(interfaces: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for dev in interfaces {
        let text = Command::new("ip")
            .args(["-o", "addr", "show", "dev", dev, "scope", "global"])
            .output()?;
        for line in String::from_utf8_lossy(&text.stdout).lines() {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "inet" || w == "inet6" {
                    if let Some(a) = words
                        .next()
                        .and_then(|c| c.split('/').next())
                        .and_then(|a| a.parse().ok())
                    {
                        out.push(a);
                    }
                }
            }
        }
    }
    if out.is_empty() {
        bail!(
            "no global address on {}: give --real",
            interfaces.join(", ")
        );
    }
    Ok(out)
}

/// The addresses of this host (its network namespace) that traffic can leave from now: those
/// on an interface that is up and running (administratively up with its carrier: operstate
/// up). An address on a link that lost its carrier or was set down, or an address that was
/// removed, is not in the list. One `getifaddrs(3)` (a netlink dump of the links and
/// addresses), cheap enough to call every poll; unlike `/sys/class/net`, it answers for the
/// caller's own network namespace.
pub fn usable_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    let wanted = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_uint;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; its
        // address, when not null, points at a sockaddr of the family it names.
        unsafe {
            let ifa = &*cur;
            if ifa.ifa_flags & wanted == wanted && !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sa.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
