//! `anycast-ctl pki`: the operator's trust anchor. It makes Ed25519 key pairs (the
//! operator's, and each server's), issues server certificates and signs revocation lists
//! (formats: `anycast_common::pki`).
//!
//! Files are hex text, one line: a private key is the 32-byte Ed25519 seed (`NAME.key`,
//! created 0600, never over an existing file, and refused when group or others may read
//! or write it, as the servers' HMAC keys are), a public key its 32 bytes (`NAME.pub`), a
//! certificate or a revocation list their bytes. Private keys never leave the machine that
//! made them: the operator signs a server's *public* key.
use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anycast_common::pki::{
    CertPrefix, Certificate, CertificateBody, RevocationList, SigningKey, VerifyingKey,
};
use anyhow::{bail, Context as _, Result};

use crate::{config::Prefix, registration::keys};

#[cfg(test)]
mod tests;

#[derive(clap::Subcommand, Debug)]
pub enum PkiCommand {
    /// Make an Ed25519 key pair: OUT.key (private, 0600) and OUT.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a server certificate, signed with the operator's key.
    Issue {
        /// The operator's private key (made by `pki keygen`).
        #[arg(long)]
        operator_key: PathBuf,
        /// The server's public key (its `pki keygen` OUT.pub).
        #[arg(long)]
        server_pub: PathBuf,
        /// The server's identity (as the agents' policy names it).
        #[arg(long)]
        id: String,
        /// A real address or prefix the server may bind (repeat; 1-16).
        #[arg(long = "real", required = true)]
        real: Vec<Prefix>,
        /// An anycast address or prefix the server may answer for (repeat; 1-16).
        #[arg(long = "anycast", required = true)]
        anycast: Vec<Prefix>,
        /// Serial number (each certificate its own: revocation names it).
        #[arg(long)]
        serial: u64,
        /// Start of validity, Unix seconds (default: now).
        #[arg(long)]
        not_before: Option<u64>,
        /// Days of validity from the start.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add serials to the revocation list and sign it again (number + 1); without --list
    /// a new list is started.
    Revoke {
        #[arg(long)]
        operator_key: PathBuf,
        /// The list published so far (checked against the operator's key).
        #[arg(long)]
        list: Option<PathBuf>,
        /// Serial number(s) to revoke (none: re-sign the list as it is, e.g. to start one).
        #[arg(long = "serial")]
        serials: Vec<u64>,
        /// Where to write the new list (may be the --list file).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a certificate or a revocation list; with --trust, check its signature.
    Show {
        file: PathBuf,
        /// The operator's public key.
        #[arg(long)]
        trust: Option<PathBuf>,
    },
}

pub fn run(cmd: PkiCommand) -> Result<()> {
    let now = unix_now();
    match cmd {
        PkiCommand::Keygen { out } => {
            let (key, public) = keygen(&out)?;
            println!(
                "wrote {} (private) and {} (public)",
                key.display(),
                public.display()
            );
        }
        PkiCommand::Issue {
            operator_key,
            server_pub,
            id,
            real,
            anycast,
            serial,
            not_before,
            days,
            out,
        } => {
            let operator = read_signing_key(&operator_key)?;
            let subject = read_public_key(&server_pub)?;
            let not_before = not_before.unwrap_or(now);
            let cert = issue(
                &operator, &subject, &id, &real, &anycast, serial, not_before, days,
            )?;
            write_public(&out, &hex(cert.as_bytes()))?;
            print!("{}", describe_certificate(&cert, Some(true), now));
        }
        PkiCommand::Revoke {
            operator_key,
            list,
            serials,
            out,
        } => {
            let operator = read_signing_key(&operator_key)?;
            let old = list
                .as_deref()
                .map(|p| read_revocation_list(p, &[operator.verifying_key()]))
                .transpose()?;
            let new = revoke(old.as_ref(), &serials, now)?;
            write_public(&out, &hex(&new.sign(&operator)))?;
            print!("{}", describe_list(&new, Some(true)));
        }
        PkiCommand::Show { file, trust } => {
            let anchor = trust.as_deref().map(read_public_key).transpose()?;
            let bytes = read_hex_file(&file)?;
            if bytes.starts_with(anycast_common::pki::REVOCATION_MAGIC) {
                // A list is only read through its signature, so without --trust the
                // operator's key has to come from somewhere: ask for it.
                let Some(anchor) = anchor else {
                    bail!(
                        "{}: a revocation list: give --trust OPERATOR.pub",
                        file.display()
                    );
                };
                let list = RevocationList::decode_verified(&bytes, &[anchor])
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                print!("{}", describe_list(&list, Some(true)));
            } else {
                let cert = Certificate::decode(&bytes)
                    .map_err(|e| anyhow::anyhow!("{}: not a certificate: {e}", file.display()))?;
                let signed = anchor.map(|a| cert.issued_by(&a));
                print!("{}", describe_certificate(&cert, signed, now));
                if signed == Some(false) {
                    bail!("{}: not signed by that operator key", file.display());
                }
            }
        }
    }
    Ok(())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 32 bytes from the kernel's random number generator (getrandom(2), which blocks only
/// until the pool is first initialized).
fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        // SAFETY: the pointer and length describe the unfilled part of `seed`.
        let n =
            unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        filled += n as usize;
    }
    Ok(seed)
}

/// Writes a new key pair: `OUT.key` (0600) and `OUT.pub`; refuses to replace either.
pub fn keygen(out: &Path) -> Result<(PathBuf, PathBuf)> {
    let key_path = with_suffix(out, "key");
    let pub_path = with_suffix(out, "pub");
    if pub_path.exists() {
        bail!("{} exists: not replacing a key", pub_path.display());
    }
    let key = SigningKey::from_bytes(&random_seed()?);
    write_private(&key_path, &hex(&key.to_bytes()))?;
    write_public(&pub_path, &hex(key.verifying_key().as_bytes()))?;
    Ok((key_path, pub_path))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// A new private file (0600 whatever the umask), never over an existing file or through a
/// symbolic link.
fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never replaced)",
                path.display()
            )
        })?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    f.write_all(format!("{text}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Public material (certificates, lists, public keys): written atomically, mode 0644.
fn write_public(path: &Path, text: &str) -> Result<()> {
    crate::files::write_atomically(path, format!("{text}\n").as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod 644 {}", path.display()))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A file of hex text (whitespace ignored).
pub fn read_hex_file(path: &Path) -> Result<Vec<u8>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_hex(&text).with_context(|| format!("{}", path.display()))
}

/// Hex text (whitespace ignored) as bytes.
pub fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        bail!("expected hex text with an even number of digits");
    }
    digits
        .chunks_exact(2)
        .map(|p| {
            let s = std::str::from_utf8(p).map_err(|_| anyhow::anyhow!("not hex"))?;
            u8::from_str_radix(s, 16).map_err(|_| anyhow::anyhow!("not hex: {s:?}"))
        })
        .collect()
}

/// A private Ed25519 key: refused unless private to its owner (the servers' key rules).
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let bytes = keys::read_key(path)?;
    let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "key file {}: {} bytes; an Ed25519 key has 32 (make one with anycast-ctl pki keygen)",
            path.display(),
            bytes.len()
        )
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let bytes = read_hex_file(path)?;
    let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: {} bytes; an Ed25519 public key has 32",
            path.display(),
            bytes.len()
        )
    })?;
    match VerifyingKey::from_bytes(&raw) {
        Ok(k) if !k.is_weak() => Ok(k),
        _ => bail!("{}: not a usable Ed25519 public key", path.display()),
    }
}

pub fn read_certificate(path: &Path) -> Result<Certificate> {
    let bytes = read_hex_file(path)?;
    Certificate::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn read_revocation_list(path: &Path, anchors: &[VerifyingKey]) -> Result<RevocationList> {
    let bytes = read_hex_file(path)?;
    RevocationList::decode_verified(&bytes, anchors)
        .map_err(|e| anyhow::anyhow!("revocation list {}: {e}", path.display()))
}

fn cert_prefix(p: &Prefix, what: &str) -> Result<CertPrefix> {
    CertPrefix::new(p.addr, p.len).ok_or_else(|| {
        anyhow::anyhow!("--{what} {p}: host bits set; write the prefix's network address")
    })
}

#[allow(clippy::too_many_arguments)]
pub fn issue(
    operator: &SigningKey,
    subject: &VerifyingKey,
    id: &str,
    real: &[Prefix],
    anycast: &[Prefix],
    serial: u64,
    not_before: u64,
    days: u64,
) -> Result<Certificate> {
    if subject == &operator.verifying_key() {
        bail!("the server's key is the operator's own: give the server its own key pair");
    }
    let real = real
        .iter()
        .map(|p| cert_prefix(p, "real"))
        .collect::<Result<Vec<_>>>()?;
    let anycast = anycast
        .iter()
        .map(|p| cert_prefix(p, "anycast"))
        .collect::<Result<Vec<_>>>()?;
    // The same rule as the agents' `allow`: the whole address space is never delegated.
    for p in real.iter().chain(&anycast) {
        if p.prefix_len() == 0 {
            bail!("{p}: a certificate never covers every address; list the prefixes");
        }
    }
    if let Some(a) = anycast.iter().find(|a| real.iter().any(|r| overlaps(a, r))) {
        bail!("anycast prefix {a} overlaps a real prefix: a server's real addresses are unicast");
    }
    let not_after = days
        .checked_mul(86_400)
        .and_then(|s| not_before.checked_add(s))
        .context("--days: the end of validity overflows")?;
    let body = CertificateBody {
        serial,
        not_before,
        not_after,
        subject_key: subject.to_bytes(),
        identity: id.to_owned(),
        real,
        anycast,
    };
    Certificate::issue(body, operator).map_err(|e| anyhow::anyhow!("cannot issue: {e}"))
}

fn overlaps(a: &CertPrefix, b: &CertPrefix) -> bool {
    a.contains(b.addr()) || b.contains(a.addr())
}

/// The next list: the old one's serials and `serials`, number + 1.
pub fn revoke(old: Option<&RevocationList>, serials: &[u64], now: u64) -> Result<RevocationList> {
    let mut all: Vec<u64> = old.map(|l| l.serials().to_vec()).unwrap_or_default();
    all.extend_from_slice(serials);
    let number = old.map_or(1, |l| l.number + 1);
    RevocationList::new(number, now, all).map_err(|e| anyhow::anyhow!("{e}"))
}

fn list_prefixes(v: &[CertPrefix]) -> String {
    v.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn describe_certificate(c: &Certificate, signed: Option<bool>, now: u64) -> String {
    let b = &c.body;
    let state = if now < b.not_before {
        "not yet valid"
    } else if now > b.not_after {
        "expired"
    } else {
        "valid now"
    };
    format!(
        "certificate serial {}\n  identity:  {}\n  real:      {}\n  anycast:   {}\n  valid:     {} to {} (Unix seconds; {state})\n  server key: {}\n  operator signature: {}\n",
        b.serial,
        b.identity,
        list_prefixes(&b.real),
        list_prefixes(&b.anycast),
        b.not_before,
        b.not_after,
        hex(&b.subject_key),
        match signed {
            Some(true) => "good",
            Some(false) => "NOT by that operator key",
            None => "not checked (no --trust)",
        }
    )
}

pub fn describe_list(l: &RevocationList, signed: Option<bool>) -> String {
    format!(
        "revocation list number {}, issued {} (Unix seconds), {} revoked serial(s): {}\n  operator signature: {}\n",
        l.number,
        l.issued,
        l.serials().len(),
        l.serials()
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        if signed == Some(true) { "good" } else { "not checked" }
    )
}
