//! Per-server secret keys for binding authentication. A key file holds the secret as hex
//! (whitespace ignored), at least 16 bytes; the agent holds one file per server and the server
//! its own. One key per server, never one per group: a member must not be able to forge
//! another member's binding.
//!
//! A key file is refused, as ssh refuses a private key, unless it is owned by root or by the
//! user reading it (the agent runs as root; a server may run as its own user) and neither
//! readable nor writable by group or others: anyone who can read a member's key can forge its
//! bindings, and anyone who can write it can replace it.
use std::{io::Read as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{bail, Context as _, Result};

pub const MIN_KEY_BYTES: usize = 16;

pub fn parse_key(text: &str) -> Result<Vec<u8>> {
    let hex: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if hex.is_empty() {
        bail!("empty: no hex digits");
    }
    if let Some(c) = text
        .chars()
        .find(|c| !c.is_whitespace() && !c.is_ascii_hexdigit())
    {
        bail!("not hex: {c:?}");
    }
    if !hex.len().is_multiple_of(2) {
        bail!("odd number of hex digits");
    }
    let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    let key: Vec<u8> = hex
        .chunks_exact(2)
        .map(|p| digit(p[0]) << 4 | digit(p[1]))
        .collect();
    if key.len() < MIN_KEY_BYTES {
        bail!("{} bytes; at least {MIN_KEY_BYTES} are needed", key.len());
    }
    Ok(key)
}

/// Why a key file's owner or mode is refused, with the command that fixes it; `None` when
/// the file is owned by root or `euid` and private to its owner.
pub fn permission_problem(path: &Path, uid: u32, mode: u32, euid: u32) -> Option<String> {
    let p = path.display();
    if uid != 0 && uid != euid {
        let who = if euid == 0 {
            "root".to_string()
        } else {
            format!("root or uid {euid}")
        };
        return Some(format!(
            "key file {p} is owned by uid {uid}, not {who}: any process of uid {uid} could \
             read or replace it; run chown {} {p}",
            if euid == 0 {
                "root".to_string()
            } else {
                euid.to_string()
            }
        ));
    }
    let perm = mode & 0o7777;
    if perm & 0o077 == 0 {
        return None;
    }
    let mut what = Vec::new();
    for (bits, whom) in [(0o070, "group"), (0o007, "others")] {
        let r = perm & bits & 0o444 != 0;
        let w = perm & bits & 0o222 != 0;
        let verb = match (r, w) {
            (true, true) => "readable and writable",
            (true, false) => "readable",
            (false, true) => "writable",
            (false, false) if perm & bits != 0 => "executable",
            _ => continue,
        };
        what.push(format!("{verb} by {whom}"));
    }
    Some(format!(
        "key file {p} is mode {perm:04o}: {}; run chmod 600 {p}",
        what.join(", ")
    ))
}

/// Reads a key file, refusing one that others may read or write (see the module's note).
/// The checks are made on the opened file (through a symbolic link: its target), so the file
/// checked is the file read.
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading key file {}", path.display()))?;
    if !meta.is_file() {
        bail!("key file {} is not a regular file", path.display());
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if let Some(why) = permission_problem(path, meta.uid(), meta.mode(), euid) {
        bail!("{why}");
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("reading key file {}", path.display()))?;
    parse_key(&text).with_context(|| format!("key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    #[test]
    fn keys_parse_and_short_or_bad_keys_are_refused() {
        assert_eq!(
            parse_key("00112233 44556677\n8899aabbccddeeff\n")
                .unwrap()
                .len(),
            16
        );
        assert_eq!(
            parse_key("000102030405060708090a0b0c0d0eFF").unwrap(),
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 255]
        );
        for (text, why) in [
            ("0011", "2 bytes"),
            ("zz112233445566778899aabbccddeeff", "not hex"),
            ("0112233445566778899aabbccddeeff", "odd number"),
            ("", "empty"),
            (" \n", "empty"),
            // Multi-byte characters are refused, not sliced through.
            ("é0112233445566778899aabbccddeef", "not hex"),
        ] {
            let e = parse_key(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn group_or_other_access_and_foreign_owners_are_refused_with_the_fix() {
        let p = Path::new("/x/s1.key");
        assert_eq!(permission_problem(p, 0, 0o100600, 0), None);
        assert_eq!(permission_problem(p, 0, 0o100400, 0), None);
        // A server running as its own user may own its key.
        assert_eq!(permission_problem(p, 1000, 0o100600, 1000), None);
        assert_eq!(
            permission_problem(p, 0, 0o100644, 0).unwrap(),
            "key file /x/s1.key is mode 0644: readable by group, readable by others; \
             run chmod 600 /x/s1.key"
        );
        assert_eq!(
            permission_problem(p, 0, 0o100666, 0).unwrap(),
            "key file /x/s1.key is mode 0666: readable and writable by group, readable and \
             writable by others; run chmod 600 /x/s1.key"
        );
        assert!(permission_problem(p, 0, 0o100604, 0)
            .unwrap()
            .contains("mode 0604: readable by others;"));
        assert!(permission_problem(p, 0, 0o100620, 0)
            .unwrap()
            .contains("mode 0620: writable by group;"));
        let e = permission_problem(p, 1000, 0o100600, 0).unwrap();
        assert!(
            e.contains("owned by uid 1000, not root") && e.contains("run chown root /x/s1.key"),
            "{e}"
        );
        let e = permission_problem(p, 1000, 0o100600, 1001).unwrap();
        assert!(e.contains("not root or uid 1001"), "{e}");
    }

    #[test]
    fn read_key_checks_the_file_it_reads() {
        let dir = std::env::temp_dir().join(format!("anycast-keys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.key");
        std::fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
        let chmod = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m));
        chmod(0o600).unwrap();
        assert_eq!(read_key(&path).unwrap().len(), 16);
        chmod(0o644).unwrap();
        let e = format!("{:#}", read_key(&path).unwrap_err());
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        // Through a symbolic link, the file read is the one checked.
        let link = dir.join("link.key");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(format!("{:#}", read_key(&link).unwrap_err()).contains("mode 0644"));
        chmod(0o600).unwrap();
        assert_eq!(read_key(&link).unwrap().len(), 16);
        let e = format!("{:#}", read_key(&dir.join("missing.key")).unwrap_err());
        assert!(e.contains("missing.key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
