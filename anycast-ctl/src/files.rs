//! Files the agent keeps for its successor (state directory): written so that a reader, or
//! a crash, sees the old contents or the new, never a mix, and only root can read them.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory (mode 0600),
/// written, renamed over `path`. Not synced to disk: these files outlive the process (a
/// crash, a restart), which the rename guarantees; what a power cut takes, a reboot takes
/// anyway (pinned maps, sysctls), and replays after it are refused by the agent's start time.
/// A sync costs milliseconds on a disk, on the owner task, for each accepted update.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| -> Result<()> {
        let mut f = create_private(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        // Best effort: the next write removes a leftover anyway.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// A new file only its owner can read and write. A leftover of an interrupted write is
/// replaced; a symbolic link there is never followed.
fn create_private(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    let f = match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()?
        }
        r => r?,
    };
    // The umask could have taken more than group and other bits.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}
