//! Network namespaces, veth pairs and background processes for tests and the demo. Every
//! namespace is deleted when its guard drops (also on panic), killing what runs inside.
use std::{
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Runs a command, failing with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Netns> {
        // A leftover from a crashed run of the same name would make `add` fail.
        if Path::new("/run/netns").join(name).exists() {
            drop(Netns {
                name: name.to_string(),
            });
        }
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // New namespaces inherit IPv4 settings from the host; make reverse-path filtering
        // predictable (replies come back asymmetrically, by design).
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
        ] {
            ns.sysctl(key, "0")?;
        }
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(ns)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip netns exec NAME cmd args...`
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Starts a process inside the namespace; it is stopped when the guard drops.
    /// Starts `cmd` in the namespace. Only the network namespace changes (nsenter), not the
    /// mounts: `ip netns exec` would remount /sys without the host's BPF filesystem, where
    /// the agent pins the maps and links that outlive it.
    pub fn spawn(&self, label: &str, cmd: &Path, args: &[&str]) -> Result<Proc> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(cmd)
            .args(args);
        Proc::start(label, c)
    }

    /// Moves the calling thread into the namespace (sockets it opens afterwards live there).
    pub fn enter(&self) -> Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        // SAFETY: valid fd; affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    pub fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            Netns { name: name.clone() }.enter_forget()?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in {} panicked", self.name))?
    }

    fn enter_forget(self) -> Result<()> {
        let r = self.enter();
        std::mem::forget(self);
        r
    }

    /// Reads an interface counter (e.g. `rx_packets`) inside the namespace.
    pub fn link_stat(&self, dev: &str, stat: &str) -> Result<u64> {
        let s = self.exec("cat", &[&format!("/sys/class/net/{dev}/statistics/{stat}")])?;
        s.trim().parse().context("parsing a link counter")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = run("kill", &["-KILL", pid]);
            }
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Creates a veth pair between two namespaces.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str, mtu: u32) -> Result<()> {
    let tmp_b = format!("{}-tmp", &b_dev[..b_dev.len().min(10)]);
    a.ip(&[
        "link",
        "add",
        a_dev,
        "mtu",
        &mtu.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        &tmp_b,
        "mtu",
        &mtu.to_string(),
    ])?;
    a.ip(&["link", "set", &tmp_b, "netns", &b.name])?;
    b.ip(&["link", "set", &tmp_b, "name", b_dev])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}

/// A background process, stopped with SIGTERM (then SIGKILL) when dropped. Its stderr and
/// stdout lines are collected so a test can wait for a line and show them on failure.
pub struct Proc {
    pub label: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    fn start(label: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("starting {label}"))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .try_for_each(|l| tx.send(l))
        });
        std::thread::spawn(move || {
            BufReader::new(err)
                .lines()
                .map_while(Result::ok)
                .try_for_each(|l| tx2.send(l))
        });
        Ok(Proc {
            label: label.to_string(),
            child: Some(child),
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// Waits for an output line containing `needle`; fails if the process exits first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) => {
                    let hit = l.contains(needle);
                    self.seen.push(l.clone());
                    if hit {
                        return Ok(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        self.drain();
                        bail!(
                            "{} exited ({status}) before printing '{needle}':\n{}",
                            self.label,
                            self.seen.join("\n")
                        );
                    }
                    if left.is_zero() {
                        self.drain();
                        bail!(
                            "{} did not print '{needle}' within {timeout:?}:\n{}",
                            self.label,
                            self.seen.join("\n")
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100));
                    self.drain();
                    bail!(
                        "{} closed its output before printing '{needle}':\n{}",
                        self.label,
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal and waits for the process to exit; returns its output.
    pub fn stop_with(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("{} already stopped", self.label))?;
        // nsenter execs the command, so the child pid is the process itself.
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                self.drain();
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.drain();
                bail!(
                    "{} did not exit within {timeout:?} of signal {signal}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // Signal 0 delivers nothing: stop_with then only waits.
        self.stop_with(0, timeout)
    }

    pub fn output(&mut self) -> String {
        self.drain();
        self.seen.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_with(libc::SIGTERM, Duration::from_secs(5));
        }
    }
}

impl Netns {
    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let link: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", dev])?)?;
        let text = link[0]["address"]
            .as_str()
            .ok_or_else(|| anyhow!("no MAC address for {dev}"))?;
        let bytes: Vec<u8> = text
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()?;
        bytes.try_into().map_err(|_| anyhow!("MAC address {text}"))
    }
}

/// A packet socket that writes whole frames out of one interface of the namespace of the
/// thread that opens it.
pub struct FrameSender {
    fd: std::os::fd::OwnedFd,
    to: libc::sockaddr_ll,
}

impl FrameSender {
    pub fn open(dev: &str) -> Result<FrameSender> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {dev}");
        }
        // SAFETY: all-zero is a valid sockaddr_ll; the fields are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        Ok(FrameSender { fd, to })
    }

    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: a valid buffer and sockaddr_ll of the right sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &self.to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
