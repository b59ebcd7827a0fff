//! An agent instance's state outside its process, so the data path outlives the controller:
//! the pinned maps and XDP links in bpffs, and a state directory with the record of what
//! the maps hold, the bindings and the host's original sysctl values. One controller at a
//! time holds an instance (a lock in its state directory); a new one adopts what the last
//! one left.
use std::{
    fs::File,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::config::{valid_instance_name, Config};

/// Where pinned state and state files go when the configuration does not say.
const PIN_ROOT: &str = "/sys/fs/bpf/anycast";
const STATE_ROOT: &str = "/run/anycast";

/// The state directory's files.
pub const SYSCTL_ORIGINALS: &str = "sysctl-originals.json";
pub const MAPS_RECORD: &str = "maps.json";
/// The bindings and their replay state; kept across a full stop too.
pub const BINDINGS: &str = "bindings.json";

/// What the controller keeps beside the pinned maps: their layout version, its record of
/// what they hold, and the operator's drains (which shape what they hold).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MapsRecord {
    pub layout_version: u32,
    pub installed: crate::dataplane::InstalledRecord,
    pub drained: Vec<String>,
}

/// How the controller stops, and what it leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: detach, remove the pinned state and the state files (but the
    /// bindings file, which holds the replay state), restore the sysctls.
    Full,
    /// SIGUSR2: leave the data path forwarding with everything pinned, for the next
    /// controller (a restart or an upgrade) to adopt.
    Handoff,
}

impl Stop {
    pub fn describe(self) -> &'static str {
        match self {
            Stop::Full => "detaching and removing the pinned state",
            Stop::Handoff => {
                "handing off: the data path keeps forwarding with its pinned maps until the \
                 next agent of this instance adopts them"
            }
        }
    }
}

pub struct Instance {
    pub name: String,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// Held (flock) while this controller runs.
    _lock: File,
}

/// The instance name of a configuration: its own, or one made from the control socket's
/// path (one agent per socket).
pub fn instance_name(config: &Config, socket: &Path) -> String {
    if let Some(n) = &config.instance {
        return n.clone();
    }
    let mut name: String = socket
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            // bpffs refuses names with dots.
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(64);
    if name.is_empty() {
        name.push('_');
    }
    debug_assert!(valid_instance_name(&name));
    name
}

/// The instance's directories, from the configuration.
pub fn directories(config: &Config, name: &str) -> (PathBuf, PathBuf) {
    let state = config
        .state_directory
        .clone()
        .unwrap_or_else(|| Path::new(STATE_ROOT).join(name));
    let pins = config
        .pin_directory
        .clone()
        .unwrap_or_else(|| Path::new(PIN_ROOT).join(name));
    (state, pins)
}

/// Makes `dir` (and its parents) mode 0700 if missing; an existing `dir` must not be
/// writable by others.
fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        // Parents as any directory (the control socket may share one), the directory
        // itself private.
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} mode 0700", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        bail!(
            "{} is mode {mode:04o}: others could replace the agent's state there; \
             make it 0700 (chmod 700 {})",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

impl Instance {
    /// Takes the instance: makes its directories and locks it, so a second controller of
    /// the same instance is refused rather than fighting over the maps.
    pub fn open(name: &str, state_dir: PathBuf, pin_dir: PathBuf) -> Result<Instance> {
        private_dir(&state_dir)?;
        let lock_path = state_dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            bail!(
                "another agent runs instance {name} (it holds {}); stop it first, or give \
                 this one another `instance`",
                lock_path.display()
            );
        }
        Ok(Instance {
            name: name.to_string(),
            state_dir,
            pin_dir,
            _lock: lock,
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.pin_dir.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    /// The record an earlier controller left beside the pinned maps, if any.
    pub fn read_maps_record(&self) -> Result<Option<MapsRecord>> {
        let path = self.file(MAPS_RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Makes the bpffs directories (the parent must be on a bpffs).
    pub fn make_pin_dirs(&self) -> Result<()> {
        let existing = self
            .pin_dir
            .ancestors()
            .find(|d| d.exists())
            .unwrap_or(Path::new("/"));
        if !on_bpffs(existing) {
            bail!(
                "{} is not on a BPF filesystem, where the agent pins the maps and links that \
                 keep forwarding without it: mount one (mount -t bpf bpf {}) or set \
                 pin_directory (inside `ip netns exec`, /sys is remounted without one)",
                existing.display(),
                existing.display()
            );
        }
        for d in [self.maps_dir(), self.links_dir()] {
            private_dir(&d)?;
        }
        Ok(())
    }

    /// Whether no link is pinned (nothing forwards with pinned maps).
    pub fn has_no_pinned_links(&self) -> bool {
        std::fs::read_dir(self.links_dir()).map_or(true, |mut d| d.next().is_none())
    }

    /// Whether an earlier controller left pinned maps.
    pub fn has_pinned_maps(&self) -> bool {
        std::fs::read_dir(self.maps_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Removes every pinned object (links first: removing a link's last reference detaches
    /// it) and the pin directories. Missing ones are fine.
    pub fn remove_pinned(&self) -> Result<usize> {
        let mut removed = 0;
        for dir in [self.links_dir(), self.maps_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let path = e?.path();
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed += 1;
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
        // The default root the agent made, once no instance uses it.
        if self.pin_dir.parent() == Some(Path::new(PIN_ROOT)) {
            let _ = std::fs::remove_dir(PIN_ROOT);
        }
        Ok(removed)
    }

    /// Removes the state files a full stop leaves no use for (the bindings file stays: it
    /// holds the replay state).
    pub fn remove_files(&self, names: &[&str]) {
        for n in names {
            let _ = std::fs::remove_file(self.file(n));
        }
    }
}

/// Whether `dir` is on a BPF filesystem.
fn on_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_from_socket_paths_are_valid_and_distinct() {
        let config = crate::config::Config::parse(
            r#"{"interfaces":["eth0"],"agent_address":{"v4":"10.0.0.1"}}"#,
        )
        .unwrap();
        let a = instance_name(&config, Path::new("/run/anycast/agent.sock"));
        let b = instance_name(&config, Path::new("/tmp/acfo1/agent.sock"));
        assert_eq!(a, "run_anycast_agent_sock");
        assert_ne!(a, b);
        assert!(valid_instance_name(&a) && valid_instance_name(&b));
        let odd = instance_name(&config, Path::new("/.x/a b\n"));
        assert!(valid_instance_name(&odd), "{odd}");
        let long = "/d".repeat(100);
        assert!(valid_instance_name(&instance_name(
            &config,
            Path::new(&long)
        )));
    }

    #[test]
    fn a_second_controller_of_an_instance_is_refused() {
        let dir = std::env::temp_dir().join(format!("anycast-instance-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Instance::open("t", dir.join("state"), dir.join("pins")).unwrap();
        let second = Instance::open("t", dir.join("state"), dir.join("pins"));
        let msg = format!("{:#}", second.err().expect("refused"));
        assert!(msg.contains("another agent runs instance t"), "{msg}");
        drop(first);
        Instance::open("t", dir.join("state"), dir.join("pins")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
