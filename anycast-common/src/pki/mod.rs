//! The operator's trust anchor: server certificates and the revocation list, defined once
//! for whoever issues, carries or checks them (`anycast-ctl pki`, the server, the client).
//!
//! The patent's route optimization has the server send the client a binding and "a proof
//! that the server indeed has been authorized to respond to the used anycast address". Our
//! proof is a **certificate**: the operator's Ed25519 key signs a server's identity, its
//! public key, the real addresses it may use and the anycast addresses it may answer for,
//! with a validity period and a serial number. A client that holds the operator's public key
//! (its trust anchor) checks the certificate, then the server's own signature on the binding
//! (`wire`'s signature option). The operator withdraws a certificate before it expires by
//! publishing a signed **revocation list** of serial numbers.
//!
//! # Certificate (version 1)
//!
//! All integers big-endian; times are Unix seconds.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 1 | version, 1 |
//! | 1 | 1 | reserved, 0 |
//! | 2 | 8 | serial number (the operator's; what a revocation list names) |
//! | 10 | 8 | not before |
//! | 18 | 8 | not after (not before it) |
//! | 26 | 32 | the server's Ed25519 public key |
//! | 58 | 1 | `n`: identity length, 1-[`MAX_IDENTITY_LEN`] |
//! | 59 | `n` | identity, UTF-8 (as the agent's policy names the server) |
//! | 59+`n` | 1 | `r`: number of real prefixes, 1-[`MAX_PREFIXES`] |
//! | ... | `r` x 6 or 18 | real prefixes: family (4 or 6), prefix length, address (4 or 16), host bits zero |
//! | ... | 1 | `a`: number of anycast prefixes, 1-[`MAX_PREFIXES`] |
//! | ... | `a` x 6 or 18 | anycast prefixes, as above |
//! | end-64 | 64 | the operator's Ed25519 signature |
//!
//! The signature is over [`CERT_CONTEXT`] followed by every byte before it. Each signed
//! object has its own context string, so a signature made for one kind of object (a
//! certificate, a revocation list, a binding) is never valid as another.
//!
//! # Revocation list (version 1)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `ACRV` |
//! | 4 | 1 | version, 1 |
//! | 5 | 3 | reserved, 0 |
//! | 8 | 8 | list number: each list the operator publishes has a higher one |
//! | 16 | 8 | issued at |
//! | 24 | 4 | `k`: number of serials, at most [`MAX_REVOKED`] |
//! | 28 | `k` x 8 | revoked serial numbers, strictly ascending |
//! | 28+8`k` | 64 | the operator's Ed25519 signature over [`REVOCATION_CONTEXT`] and every byte before it |
//!
//! Signatures are checked with `verify_strict` (no malleable signatures, no weak keys), and
//! a certificate whose public key is weak or not a curve point is malformed.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ed25519_dalek::Signer as _;
pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};

#[cfg(test)]
mod tests;

pub const CERT_VERSION: u8 = 1;
pub const REVOCATION_VERSION: u8 = 1;
pub const REVOCATION_MAGIC: &[u8; 4] = b"ACRV";
/// Longest identity a certificate names (as `registration.relay.id` and MN-IDs in practice).
pub const MAX_IDENTITY_LEN: usize = 64;
/// Most real prefixes, and most anycast prefixes, in one certificate.
pub const MAX_PREFIXES: usize = 16;
/// Most serials in one revocation list (8 MB): bounds what a reader allocates.
pub const MAX_REVOKED: usize = 1_000_000;
pub const PUBLIC_KEY_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;
/// The longest certificate: 16 + 16 IPv6 prefixes and a 64-byte identity.
pub const MAX_CERT_LEN: usize = 59 + MAX_IDENTITY_LEN + 2 + 2 * MAX_PREFIXES * 18 + SIGNATURE_LEN;
/// What an operator's signature on a certificate covers first.
pub const CERT_CONTEXT: &[u8] = b"anycast certificate v1\0";
/// What an operator's signature on a revocation list covers first.
pub const REVOCATION_CONTEXT: &[u8] = b"anycast revocation list v1\0";
/// What a server's signature on a binding for a client covers first (see `wire`).
pub const BINDING_CONTEXT: &[u8] = b"anycast client binding v1\0";
/// What a server's signature on a binding update to an agent covers first (a
/// certificate-signed registration): never valid as a client binding, nor the reverse.
pub const REGISTRATION_CONTEXT: &[u8] = b"anycast registration v1\0";

const CERT_FIXED: usize = 59;
const REVOCATION_FIXED: usize = 28;

/// A prefix a certificate lists: an address with host bits zero and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CertPrefix {
    addr: IpAddr,
    len: u8,
}

impl CertPrefix {
    /// `None` for a length beyond the family's width or host bits set.
    pub fn new(addr: IpAddr, len: u8) -> Option<CertPrefix> {
        let width: u32 = if addr.is_ipv4() { 32 } else { 128 };
        if u32::from(len) > width {
            return None;
        }
        let p = CertPrefix { addr, len };
        (mask(bits(addr), width, len) == bits(addr)).then_some(p)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies inside. An IPv4 address never lies in an IPv6 prefix (IPv4-mapped
    /// addresses are converted back by the wire module before they are checked).
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        mask(bits(ip), width, self.len) == bits(self.addr)
    }
}

impl fmt::Display for CertPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask(v: u128, width: u32, len: u8) -> u128 {
    let len = u32::from(len);
    if len == 0 {
        return 0;
    }
    let keep = if len == 128 {
        u128::MAX
    } else {
        !(u128::MAX >> len)
    };
    // Bits of a `width`-bit value sit at the bottom of the u128.
    v & (keep >> (128 - width))
}

/// What the operator certifies about a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateBody {
    pub serial: u64,
    pub not_before: u64,
    pub not_after: u64,
    pub subject_key: [u8; PUBLIC_KEY_LEN],
    pub identity: String,
    /// The real addresses the server may bind and send bindings from.
    pub real: Vec<CertPrefix>,
    /// The anycast addresses the server may answer for.
    pub anycast: Vec<CertPrefix>,
}

/// A certificate as issued: its body, the operator's signature, and the exact bytes (what
/// the signature covers, and what travels in bindings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    pub body: CertificateBody,
    pub signature: [u8; SIGNATURE_LEN],
    bytes: Vec<u8>,
}

/// Why certificate or revocation list bytes are refused. [`PkiError::reason`] names each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PkiError {
    /// Shorter than its fields say, or than the fixed part.
    Truncated,
    /// Bytes after the signature.
    TrailingBytes,
    /// A version (or magic) we do not know, or a reserved field not zero.
    BadVersion,
    /// An identity empty, longer than [`MAX_IDENTITY_LEN`], or not UTF-8.
    BadIdentity,
    /// No prefix, more than [`MAX_PREFIXES`], an unknown family, a length beyond the
    /// family's width, or host bits set.
    BadPrefix,
    /// Not after before not before.
    BadValidity,
    /// The subject key is not a valid Ed25519 public key, or a weak one.
    BadSubjectKey,
    /// A revocation list's serials not strictly ascending, or more than [`MAX_REVOKED`].
    BadSerials,
    /// The operator's signature does not verify with the trust anchor.
    BadSignature,
}

impl PkiError {
    pub const ALL: [PkiError; 9] = [
        PkiError::Truncated,
        PkiError::TrailingBytes,
        PkiError::BadVersion,
        PkiError::BadIdentity,
        PkiError::BadPrefix,
        PkiError::BadValidity,
        PkiError::BadSubjectKey,
        PkiError::BadSerials,
        PkiError::BadSignature,
    ];

    /// A stable snake_case name, for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            PkiError::Truncated => "truncated",
            PkiError::TrailingBytes => "trailing_bytes",
            PkiError::BadVersion => "bad_version",
            PkiError::BadIdentity => "bad_identity",
            PkiError::BadPrefix => "bad_prefix",
            PkiError::BadValidity => "bad_validity",
            PkiError::BadSubjectKey => "bad_subject_key",
            PkiError::BadSerials => "bad_serials",
            PkiError::BadSignature => "bad_signature",
        }
    }
}

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            PkiError::Truncated => "shorter than its fields",
            PkiError::TrailingBytes => "bytes after the signature",
            PkiError::BadVersion => "unknown version or magic, or reserved bytes not zero",
            PkiError::BadIdentity => "identity empty, too long or not UTF-8",
            PkiError::BadPrefix => "a prefix list is empty, too long, or has a bad prefix",
            PkiError::BadValidity => "not after is before not before",
            PkiError::BadSubjectKey => "the server's public key is not a usable Ed25519 key",
            PkiError::BadSerials => "serial numbers not strictly ascending, or too many",
            PkiError::BadSignature => "the operator's signature does not verify",
        };
        write!(f, "{text} ({})", self.reason())
    }
}

impl std::error::Error for PkiError {}

/// A bounds-checked reader.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PkiError> {
        let end = self.at.checked_add(n).ok_or(PkiError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(PkiError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PkiError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, PkiError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, PkiError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

fn put_prefixes(out: &mut Vec<u8>, list: &[CertPrefix]) {
    out.push(list.len() as u8);
    for p in list {
        match p.addr {
            IpAddr::V4(a) => {
                out.extend_from_slice(&[4, p.len]);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.extend_from_slice(&[6, p.len]);
                out.extend_from_slice(&a.octets());
            }
        }
    }
}

fn read_prefixes(r: &mut Reader) -> Result<Vec<CertPrefix>, PkiError> {
    let n = usize::from(r.u8()?);
    if n == 0 || n > MAX_PREFIXES {
        return Err(PkiError::BadPrefix);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let family = r.u8()?;
        let len = r.u8()?;
        let addr = match family {
            4 => {
                let s = r.take(4)?;
                IpAddr::V4(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
            }
            6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(r.take(16)?);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(PkiError::BadPrefix),
        };
        out.push(CertPrefix::new(addr, len).ok_or(PkiError::BadPrefix)?);
    }
    Ok(out)
}

fn body_valid(b: &CertificateBody) -> Result<(), PkiError> {
    body_form_valid(b)?;
    match VerifyingKey::from_bytes(&b.subject_key) {
        Ok(k) if !k.is_weak() => Ok(()),
        _ => Err(PkiError::BadSubjectKey),
    }
}

/// [`body_valid`] but the subject key (a curve point decompression: the costly part).
fn body_form_valid(b: &CertificateBody) -> Result<(), PkiError> {
    if b.identity.is_empty() || b.identity.len() > MAX_IDENTITY_LEN {
        return Err(PkiError::BadIdentity);
    }
    for list in [&b.real, &b.anycast] {
        if list.is_empty() || list.len() > MAX_PREFIXES {
            return Err(PkiError::BadPrefix);
        }
    }
    if b.not_after < b.not_before {
        return Err(PkiError::BadValidity);
    }
    Ok(())
}

impl CertificateBody {
    /// The bytes the operator signs (after [`CERT_CONTEXT`]): everything but the signature.
    fn to_signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_CERT_LEN);
        out.extend_from_slice(&[CERT_VERSION, 0]);
        out.extend_from_slice(&self.serial.to_be_bytes());
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&self.subject_key);
        out.push(self.identity.len() as u8);
        out.extend_from_slice(self.identity.as_bytes());
        put_prefixes(&mut out, &self.real);
        put_prefixes(&mut out, &self.anycast);
        out
    }
}

fn signed_message(context: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + bytes.len());
    m.extend_from_slice(context);
    m.extend_from_slice(bytes);
    m
}

impl Certificate {
    /// The operator signs `body`. Refused as [`Certificate::decode`] would refuse it.
    pub fn issue(body: CertificateBody, operator: &SigningKey) -> Result<Certificate, PkiError> {
        body_valid(&body)?;
        let mut bytes = body.to_signed_bytes();
        let signature = operator
            .sign(&signed_message(CERT_CONTEXT, &bytes))
            .to_bytes();
        bytes.extend_from_slice(&signature);
        Ok(Certificate {
            body,
            signature,
            bytes,
        })
    }

    /// Parses and checks the form (not the signature: see [`Certificate::issued_by`]).
    pub fn decode(bytes: &[u8]) -> Result<Certificate, PkiError> {
        let (body, signature) = Self::parse(bytes)?;
        body_valid(&body)?;
        debug_assert!(bytes.len() >= CERT_FIXED + SIGNATURE_LEN);
        Ok(Certificate {
            body,
            signature,
            bytes: bytes.to_vec(),
        })
    }

    /// The fields, with [`Certificate::decode`]'s checks except the subject key's (a curve
    /// point decompression, most of decode's cost): for cheap checks before costly ones,
    /// e.g. on a path a flood of forgeries takes. Decode the certificate before using it.
    pub fn peek(bytes: &[u8]) -> Result<CertificateBody, PkiError> {
        let (body, _) = Self::parse(bytes)?;
        body_form_valid(&body)?;
        Ok(body)
    }

    fn parse(bytes: &[u8]) -> Result<(CertificateBody, [u8; SIGNATURE_LEN]), PkiError> {
        let mut r = Reader { b: bytes, at: 0 };
        let version = r.u8()?;
        let reserved = r.u8()?;
        if version != CERT_VERSION || reserved != 0 {
            return Err(PkiError::BadVersion);
        }
        let serial = r.u64()?;
        let not_before = r.u64()?;
        let not_after = r.u64()?;
        let mut subject_key = [0u8; PUBLIC_KEY_LEN];
        subject_key.copy_from_slice(r.take(PUBLIC_KEY_LEN)?);
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_IDENTITY_LEN {
            return Err(PkiError::BadIdentity);
        }
        let identity = std::str::from_utf8(r.take(n)?)
            .map_err(|_| PkiError::BadIdentity)?
            .to_owned();
        let real = read_prefixes(&mut r)?;
        let anycast = read_prefixes(&mut r)?;
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(r.take(SIGNATURE_LEN)?);
        if r.at != bytes.len() {
            return Err(PkiError::TrailingBytes);
        }
        let body = CertificateBody {
            serial,
            not_before,
            not_after,
            subject_key,
            identity,
            real,
            anycast,
        };
        Ok((body, signature))
    }

    /// The certificate's bytes: what a file holds and a binding carries.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether `anchor` (the operator's public key) signed this certificate.
    pub fn issued_by(&self, anchor: &VerifyingKey) -> bool {
        let signed = &self.bytes[..self.bytes.len() - SIGNATURE_LEN];
        let sig = Signature::from_bytes(&self.signature);
        anchor
            .verify_strict(&signed_message(CERT_CONTEXT, signed), &sig)
            .is_ok()
    }

    /// The server's public key (checked usable when the certificate was decoded or issued).
    pub fn subject_key(&self) -> VerifyingKey {
        VerifyingKey::from_bytes(&self.body.subject_key).expect("checked by body_valid")
    }

    /// Whether `now` (Unix seconds) lies in the validity period, both ends included.
    pub fn valid_at(&self, now: u64) -> bool {
        self.body.not_before <= now && now <= self.body.not_after
    }

    pub fn allows_real(&self, ip: IpAddr) -> bool {
        self.body.real.iter().any(|p| p.contains(ip))
    }

    pub fn allows_anycast(&self, ip: IpAddr) -> bool {
        self.body.anycast.iter().any(|p| p.contains(ip))
    }
}

/// The operator's list of revoked certificate serials.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RevocationList {
    pub number: u64,
    pub issued: u64,
    /// Strictly ascending.
    serials: Vec<u64>,
}

impl RevocationList {
    /// A list of `serials` (sorted and deduplicated here).
    pub fn new(number: u64, issued: u64, mut serials: Vec<u64>) -> Result<Self, PkiError> {
        serials.sort_unstable();
        serials.dedup();
        if serials.len() > MAX_REVOKED {
            return Err(PkiError::BadSerials);
        }
        Ok(RevocationList {
            number,
            issued,
            serials,
        })
    }

    pub fn serials(&self) -> &[u64] {
        &self.serials
    }

    pub fn is_revoked(&self, serial: u64) -> bool {
        self.serials.binary_search(&serial).is_ok()
    }

    /// The signed list's bytes.
    pub fn sign(&self, operator: &SigningKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(REVOCATION_FIXED + 8 * self.serials.len() + 64);
        out.extend_from_slice(REVOCATION_MAGIC);
        out.extend_from_slice(&[REVOCATION_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.number.to_be_bytes());
        out.extend_from_slice(&self.issued.to_be_bytes());
        out.extend_from_slice(&(self.serials.len() as u32).to_be_bytes());
        for s in &self.serials {
            out.extend_from_slice(&s.to_be_bytes());
        }
        let sig = operator.sign(&signed_message(REVOCATION_CONTEXT, &out));
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    /// Parses a signed list and checks that one of `anchors` signed it. A list nobody we
    /// trust signed is worth nothing, so form and signature are checked together.
    pub fn decode_verified(bytes: &[u8], anchors: &[VerifyingKey]) -> Result<Self, PkiError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(4)? != REVOCATION_MAGIC || r.take(4)? != [REVOCATION_VERSION, 0, 0, 0] {
            return Err(PkiError::BadVersion);
        }
        let number = r.u64()?;
        let issued = r.u64()?;
        let k = r.u32()? as usize;
        if k > MAX_REVOKED {
            return Err(PkiError::BadSerials);
        }
        let raw = r.take(k * 8)?;
        let mut sig = [0u8; SIGNATURE_LEN];
        sig.copy_from_slice(r.take(SIGNATURE_LEN)?);
        if r.at != bytes.len() {
            return Err(PkiError::TrailingBytes);
        }
        let serials: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if serials.windows(2).any(|w| w[0] >= w[1]) {
            return Err(PkiError::BadSerials);
        }
        let signed = signed_message(REVOCATION_CONTEXT, &bytes[..bytes.len() - SIGNATURE_LEN]);
        let sig = Signature::from_bytes(&sig);
        if !anchors
            .iter()
            .any(|a| a.verify_strict(&signed, &sig).is_ok())
        {
            return Err(PkiError::BadSignature);
        }
        Ok(RevocationList {
            number,
            issued,
            serials,
        })
    }
}
