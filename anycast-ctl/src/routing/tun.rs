//! The liveness device (the dead man's switch): a non-persistent TUN device held open by
//! the agent. BIRD's static routes of the announced addresses point at it; the kernel
//! deletes the device when its last descriptor closes, on any exit including SIGKILL, and
//! BIRD withdraws the routes within milliseconds. No address is put on it: the agent's own
//! stack must not answer for the anycast addresses.
use std::{fs::File, os::fd::AsRawFd as _};

use anyhow::{bail, Context as _, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as far as these ioctls use it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            bail!("'{name}' is not a valid interface name");
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _rest: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
}

pub struct Liveness {
    file: File,
    pub name: String,
    /// The device was there already: an agent handed off with `on_handoff: keep` left it
    /// persistent and up, and its routes announced.
    pub taken_over: bool,
}

/// Whether an interface of this name exists in the calling thread's network namespace
/// (not through /sys, which shows the namespace of whoever mounted it).
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Liveness {
    /// Creates the device (down), or takes over the persistent one a handing-off agent
    /// left (as it is) and makes it non-persistent again, so that it goes with this agent.
    pub fn open(name: &str) -> Result<Liveness> {
        let taken_over = exists(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun for the liveness device")?;
        let mut req = IfReq::new(name)?;
        req.flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: a valid descriptor and an ifreq-sized buffer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "creating the liveness device {name} (TUNSETIFF){}",
                    if taken_over {
                        ": a device of that name exists and is no TUN device this agent \
                         may take (routing.liveness_device)"
                    } else {
                        ""
                    }
                )
            });
        }
        let l = Liveness {
            file,
            name: name.to_string(),
            taken_over,
        };
        l.persist(false)?;
        Ok(l)
    }

    /// Persistent: the device (and the routes through it) outlive this process.
    pub fn persist(&self, on: bool) -> Result<()> {
        // SAFETY: a valid TUN descriptor; the argument is an integer.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(on),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("TUNSETPERSIST {on} on {}", self.name));
        }
        Ok(())
    }

    /// Link up (routes through it are announced) or down (withdrawn).
    pub fn set_up(&self, up: bool) -> Result<()> {
        set_link(&self.name, up)
    }
}

fn set_link(name: &str, up: bool) -> Result<()> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCSIFFLAGS");
    }
    let result = (|| {
        let mut req = IfReq::new(name)?;
        // SAFETY: a valid socket and an ifreq-sized buffer.
        if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("reading the flags of {name}"));
        }
        let flag = libc::IFF_UP as libc::c_short;
        req.flags = if up {
            req.flags | flag
        } else {
            req.flags & !flag
        };
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setting {name} {}", if up { "up" } else { "down" }));
        }
        Ok(())
    })();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    result
}

/// For `agent --cleanup`: removes a persistent liveness device a handoff left (its routes
/// are withdrawn with it). Nothing to do when there is none.
pub fn remove_left_over(name: &str) -> Result<bool> {
    if !exists(name) {
        return Ok(false);
    }
    // Taking it over makes it non-persistent; closing it deletes it.
    drop(Liveness::open(name)?);
    Ok(true)
}
