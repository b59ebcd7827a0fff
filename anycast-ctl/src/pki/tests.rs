//! The pki commands' files: modes, refusals, and what `issue` and `revoke` produce.
use std::os::unix::fs::MetadataExt as _;

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "acro-pki-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn pre(s: &str) -> Prefix {
    s.parse().unwrap()
}

#[test]
fn keygen_writes_a_private_key_and_its_public_key_and_never_replaces_them() {
    let d = TempDir::new("keygen");
    // A permissive umask must not make the private key readable.
    // SAFETY: umask has no preconditions; the old mask is put back.
    let old = unsafe { libc::umask(0) };
    let made = keygen(&d.0.join("op"));
    unsafe { libc::umask(old) };
    let (key, public) = made.unwrap();
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(&public).unwrap().mode() & 0o777, 0o644);
    let k = read_signing_key(&key).unwrap();
    assert_eq!(read_public_key(&public).unwrap(), k.verifying_key());
    // Two key pairs differ (the seed is random).
    let (key2, _) = keygen(&d.0.join("other")).unwrap();
    assert_ne!(read_signing_key(&key2).unwrap().to_bytes(), k.to_bytes());
    // Never over an existing key.
    let e = keygen(&d.0.join("op")).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    fs::remove_file(&public).unwrap();
    let e = format!("{:#}", keygen(&d.0.join("op")).unwrap_err());
    assert!(e.contains("never replaced"), "{e}");
    assert_eq!(read_signing_key(&key).unwrap().to_bytes(), k.to_bytes());
}

#[test]
fn private_keys_readable_by_others_or_of_the_wrong_size_are_refused() {
    let d = TempDir::new("modes");
    let (key, public) = keygen(&d.0.join("op")).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let e = format!("{:#}", read_signing_key(&key).unwrap_err());
    assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o604)).unwrap();
    assert!(read_signing_key(&key).is_err());
    // A 16-byte HMAC key is no Ed25519 key.
    let short = d.0.join("short.key");
    write_private(&short, &"ab".repeat(16)).unwrap();
    let e = format!("{:#}", read_signing_key(&short).unwrap_err());
    assert!(e.contains("16 bytes"), "{e}");
    // Public keys: the wrong size, or not hex.
    fs::write(&public, "abcd\n").unwrap();
    assert!(read_public_key(&public).is_err());
    fs::write(&public, "zz".repeat(32)).unwrap();
    assert!(read_public_key(&public).is_err());
}

fn keys() -> (SigningKey, SigningKey) {
    (
        SigningKey::from_bytes(&[5; 32]),
        SigningKey::from_bytes(&[6; 32]),
    )
}

#[test]
fn issue_makes_a_certificate_the_operator_key_verifies() {
    let (op, server) = keys();
    let c = issue(
        &op,
        &server.verifying_key(),
        "s1",
        &[pre("10.71.2.11"), pre("fd71:2::/64")],
        &[pre("10.71.100.1")],
        7,
        1_000,
        2,
    )
    .unwrap();
    assert!(c.issued_by(&op.verifying_key()));
    assert_eq!(c.body.serial, 7);
    assert_eq!(c.body.not_after, 1_000 + 2 * 86_400);
    assert_eq!(c.subject_key(), server.verifying_key());
    assert!(c.allows_real("fd71:2::5".parse().unwrap()));
    let text = describe_certificate(&c, Some(true), 2_000);
    assert!(
        text.contains("identity:  s1") && text.contains("valid now"),
        "{text}"
    );

    // Refused: host bits, every address, anycast inside a real prefix, the operator's own
    // key as the server's, an identity too long.
    let refuse = |real: &[Prefix], anycast: &[Prefix], subject: &VerifyingKey, id: &str| {
        format!(
            "{:#}",
            issue(&op, subject, id, real, anycast, 1, 0, 1).unwrap_err()
        )
    };
    let sk = server.verifying_key();
    let e = refuse(&[pre("10.71.2.1/24")], &[pre("10.71.100.1")], &sk, "s1");
    assert!(e.contains("host bits"), "{e}");
    let e = refuse(&[pre("0.0.0.0/0")], &[pre("10.71.100.1")], &sk, "s1");
    assert!(e.contains("every address"), "{e}");
    let e = refuse(&[pre("10.71.0.0/16")], &[pre("10.71.100.1")], &sk, "s1");
    assert!(e.contains("overlaps"), "{e}");
    let e = refuse(
        &[pre("10.71.2.11")],
        &[pre("10.71.100.1")],
        &op.verifying_key(),
        "s1",
    );
    assert!(e.contains("operator's own"), "{e}");
    let e = refuse(
        &[pre("10.71.2.11")],
        &[pre("10.71.100.1")],
        &sk,
        &"x".repeat(65),
    );
    assert!(e.contains("identity"), "{e}");
    let e = format!(
        "{:#}",
        issue(
            &op,
            &sk,
            "s1",
            &[pre("10.71.2.11")],
            &[pre("10.71.100.1")],
            1,
            u64::MAX,
            1
        )
        .unwrap_err()
    );
    assert!(e.contains("overflows"), "{e}");
}

#[test]
fn revoke_extends_the_published_list_and_raises_its_number() {
    let (op, other) = keys();
    let d = TempDir::new("revoke");
    let first = revoke(None, &[9, 3], 100).unwrap();
    assert_eq!((first.number, first.serials()), (1, &[3u64, 9][..]));
    let path = d.0.join("revoked.list");
    write_public(&path, &hex(&first.sign(&op))).unwrap();
    let read = read_revocation_list(&path, &[op.verifying_key()]).unwrap();
    assert_eq!(read, first);
    let second = revoke(Some(&read), &[4, 9], 200).unwrap();
    assert_eq!((second.number, second.issued), (2, 200));
    assert_eq!(second.serials(), &[3, 4, 9]);
    // A list signed by another key is refused, naming the file.
    write_public(&path, &hex(&first.sign(&other))).unwrap();
    let e = format!(
        "{:#}",
        read_revocation_list(&path, &[op.verifying_key()]).unwrap_err()
    );
    assert!(
        e.contains("revoked.list") && e.contains("bad_signature"),
        "{e}"
    );
}
