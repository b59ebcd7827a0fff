//! Certificate-signed registration: a server that holds a certificate from the operator
//! (`anycast_common::pki`) signs its binding updates with the certificate's key instead of an
//! AUTH option, so the agent needs no secret per server. The certificate says which identity
//! may bind which anycast addresses through which real addresses; the agent's configuration
//! (`registration.certificates`) says which operator keys it trusts and which of its services
//! take such bindings. Both must allow a binding.
//!
//! Checks, in order (cheap ones first, the two Ed25519 verifications last and globally
//! rate-limited, so a flood of forged updates costs the owner task at most
//! `checks_per_second` pairs of verifications a second); each refusal is counted as
//! `refused_certificate_REASON` ([`CertRefusal::reason`]):
//!
//! 1. certificates are configured (`not_accepted`); the update carries a certificate, the
//!    real address (Alternate Care-of Address) and a MESG-ID (`missing_option`); the
//!    certificate is well formed (`bad_certificate_WHY`);
//! 2. the MN-ID is the certificate's identity (`identity_mismatch`), and that identity has
//!    no key in `registration.servers` unless `keyed_identities` (`identity_has_key`);
//! 3. the certificate is valid at the agent's clock (`not_yet_valid`, `expired`) and not on
//!    the revocation list (`revoked`);
//! 4. the anycast address (home address) is in the certificate's anycast prefixes
//!    (`anycast_not_certified`) and the service is one that takes certificates
//!    (`service_not_accepting`: with a service selector that service; without one, every
//!    configured service of the address);
//! 5. the real address and the datagram's source are in the certificate's real prefixes
//!    (`real_not_certified`, `source_not_certified`);
//! 6. the MESG-ID is within the replay window, not older than the agent's start
//!    (`stale`), and newer than the identity's last accepted one (`replayed`);
//! 7. a check is in the budget (else dropped unanswered: `dropped_certificate_rate_limited`);
//! 8. the certificate's key is a usable Ed25519 key (`bad_certificate_bad_subject_key`;
//!    checked here because decompressing it costs several microseconds), the certificate is
//!    signed by a trust anchor (`untrusted`), and the update by the
//!    certificate's key (`bad_signature`).
//!
//! Then the update goes on as an authenticated one (per-identity budget, replay, care-of
//! checks, limits, sequence numbers), with the certificate's prefixes as the identity's
//! policy, and a lifetime never beyond the certificate's end.
use std::collections::BTreeSet;
use std::path::Path;

use anycast_common::pki::{Certificate, PkiError, RevocationList, VerifyingKey};
use anyhow::{Context as _, Result};

use super::*;
use crate::config::Config;

/// What the agent trusts and accepts (`registration.certificates`, files read).
#[derive(Clone, Debug)]
pub struct CertificatePolicy {
    pub anchors: Vec<VerifyingKey>,
    pub revoked: RevocationList,
    /// The configured services that take certificate-signed bindings.
    pub accepting: BTreeSet<ServiceKey>,
    /// Every configured service (a binding without a service selector joins all of its
    /// address's).
    pub configured: Vec<ServiceKey>,
    pub checks_per_second: u32,
    pub keyed_identities: bool,
}

impl CertificatePolicy {
    /// Reads the trust anchors and the revocation list of `config`'s
    /// `registration.certificates` (paths relative to the config file); None when absent.
    pub fn load(config: &Config, config_path: &Path) -> Result<Option<CertificatePolicy>> {
        let Some(c) = config
            .registration
            .as_ref()
            .and_then(|r| r.certificates.as_ref())
        else {
            return Ok(None);
        };
        let dir = config_path.parent().unwrap_or(Path::new("."));
        let anchors = c
            .trust
            .iter()
            .map(|p| crate::pki::read_public_key(&dir.join(p)))
            .collect::<Result<Vec<_>>>()
            .context("registration.certificates.trust")?;
        let revoked = match &c.revocations {
            Some(p) => crate::pki::read_revocation_list(&dir.join(p), &anchors)
                .context("registration.certificates.revocations")?,
            None => RevocationList::default(),
        };
        let key =
            |s: &crate::config::Service| ServiceKey::new(s.address, s.protocol.number(), s.port);
        Ok(Some(CertificatePolicy {
            anchors,
            revoked,
            accepting: config
                .services
                .iter()
                .filter(|s| c.services.contains(&s.name))
                .map(key)
                .collect(),
            configured: config.services.iter().map(key).collect(),
            checks_per_second: c.checks_per_second,
            keyed_identities: c.keyed_identities,
        }))
    }

    /// Whether a binding of `anycast` (with the service `selector`, if any) may come from
    /// a certificate.
    pub fn accepts(&self, anycast: IpAddr, selector: Option<(u8, u16)>) -> bool {
        match selector {
            Some((proto, port)) => self
                .accepting
                .contains(&ServiceKey::new(anycast, proto, port)),
            None => {
                let mut of_address = self.configured.iter().filter(|k| k.ip() == anycast);
                let mut any = false;
                let all = of_address.all(|k| {
                    any = true;
                    self.accepting.contains(k)
                });
                any && all
            }
        }
    }
}

/// The certificate an identity registered with: what its bindings depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CertHeld {
    pub serial: u64,
    /// Unix seconds.
    pub not_after: u64,
}

/// Why a certificate-signed update was refused. Counted as `refused_certificate_REASON`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRefusal {
    NotAccepted,
    MissingOption,
    BadCertificate(PkiError),
    IdentityMismatch,
    IdentityHasKey,
    NotYetValid,
    Expired,
    Revoked,
    AnycastNotCertified,
    ServiceNotAccepting,
    RealNotCertified,
    SourceNotCertified,
    Stale,
    Replayed,
    /// Over `checks_per_second`: dropped before the signatures were checked.
    RateLimited,
    Untrusted,
    BadSignature,
}

impl CertRefusal {
    /// A stable snake_case name, for counters and logs.
    pub fn reason(self) -> String {
        let s = match self {
            CertRefusal::BadCertificate(e) => return format!("bad_certificate_{}", e.reason()),
            CertRefusal::NotAccepted => "not_accepted",
            CertRefusal::MissingOption => "missing_option",
            CertRefusal::IdentityMismatch => "identity_mismatch",
            CertRefusal::IdentityHasKey => "identity_has_key",
            CertRefusal::NotYetValid => "not_yet_valid",
            CertRefusal::Expired => "expired",
            CertRefusal::Revoked => "revoked",
            CertRefusal::AnycastNotCertified => "anycast_not_certified",
            CertRefusal::ServiceNotAccepting => "service_not_accepting",
            CertRefusal::RealNotCertified => "real_not_certified",
            CertRefusal::SourceNotCertified => "source_not_certified",
            CertRefusal::Stale => "stale",
            CertRefusal::Replayed => "replayed",
            CertRefusal::RateLimited => "rate_limited",
            CertRefusal::Untrusted => "untrusted",
            CertRefusal::BadSignature => "bad_signature",
        };
        s.to_string()
    }

    /// The log kind (one line a second per kind).
    fn log_kind(self) -> &'static str {
        match self {
            CertRefusal::Untrusted | CertRefusal::BadSignature => "certificate: forged",
            CertRefusal::Stale | CertRefusal::Replayed => "certificate: replayed or stale",
            CertRefusal::Expired | CertRefusal::NotYetValid | CertRefusal::Revoked => {
                "certificate: not valid"
            }
            _ => "certificate: refused",
        }
    }
}

fn counter<'a>(counters: &'a mut BTreeMap<String, u64>, name: &str) -> &'a mut u64 {
    counters.entry(name.to_string()).or_default()
}

fn to_prefix(p: &anycast_common::pki::CertPrefix) -> Prefix {
    Prefix {
        addr: p.addr(),
        len: p.prefix_len(),
    }
}

impl Registry {
    /// Certificate-signed registration with `policy` (None: off).
    pub fn with_certificates(mut self, policy: Option<CertificatePolicy>) -> Self {
        self.certificates = policy;
        self
    }

    /// The current revocation list's number (0: none), for the status output.
    pub fn revocation_list_number(&self) -> Option<u64> {
        self.certificates.as_ref().map(|c| c.revoked.number)
    }

    /// The checks above for a certificate-signed update from `identity` (its MN-ID); on
    /// success the identity's policy is the certificate's (unless it has a key) and the
    /// certificate's end is returned.
    pub(super) fn check_certificate(
        &mut self,
        msg: &Message,
        payload: &[u8],
        from: SocketAddr,
        identity: &str,
        (now, wall, snapshot): (Instant, u64, bool),
    ) -> std::result::Result<CertHeld, CertRefusal> {
        let Some(policy) = &self.certificates else {
            return Err(CertRefusal::NotAccepted);
        };
        let o = &msg.options;
        let (Some(cert_bytes), Some(real), Some(ts)) = (&o.certificate, o.alt_coa, o.mesg_id)
        else {
            return Err(CertRefusal::MissingOption);
        };
        // Its fields only: the subject key's check (a curve point decompression, most of a
        // full decode's cost) waits for the budget, with the signatures.
        let body = Certificate::peek(cert_bytes).map_err(CertRefusal::BadCertificate)?;
        let covers = |prefixes: &[anycast_common::pki::CertPrefix], ip: IpAddr| {
            prefixes.iter().any(|p| p.contains(ip))
        };
        if body.identity != identity {
            return Err(CertRefusal::IdentityMismatch);
        }
        let keyed = self
            .servers
            .get(identity)
            .is_some_and(|p| p.certificate.is_none());
        if keyed && !policy.keyed_identities {
            return Err(CertRefusal::IdentityHasKey);
        }
        let unix = u64::try_from(wire::ntp_to_unix_secs(wall)).unwrap_or(0);
        if unix < body.not_before {
            return Err(CertRefusal::NotYetValid);
        }
        if unix > body.not_after {
            return Err(CertRefusal::Expired);
        }
        if policy.revoked.is_revoked(body.serial) {
            return Err(CertRefusal::Revoked);
        }
        let home = wire::from_mapped(msg.src);
        if !covers(&body.anycast, home) {
            return Err(CertRefusal::AnycastNotCertified);
        }
        if !policy.accepts(home, o.service.map(|s| (s.protocol, s.port))) {
            return Err(CertRefusal::ServiceNotAccepting);
        }
        if !covers(&body.real, wire::from_mapped(real)) {
            return Err(CertRefusal::RealNotCertified);
        }
        if !covers(&body.real, from.ip().to_canonical()) {
            return Err(CertRefusal::SourceNotCertified);
        }
        // A snapshot entry is an old stored message: its liveness is judged later, by its
        // own timestamp and lifetime, as for a keyed server's.
        if !snapshot {
            if (ts >> 32).abs_diff(wall >> 32) > self.replay_window || ts < self.started {
                return Err(CertRefusal::Stale);
            }
            if self.last_mesg_id.get(identity).is_some_and(|&l| ts <= l) {
                return Err(CertRefusal::Replayed);
            }
        }
        let rate = f64::from(policy.checks_per_second);
        if !self
            .certificate_checks
            .get_or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
        {
            return Err(CertRefusal::RateLimited);
        }
        let policy = self.certificates.as_ref().expect("checked above");
        let cert = Certificate::decode(cert_bytes).map_err(CertRefusal::BadCertificate)?;
        if !policy.anchors.iter().any(|a| cert.issued_by(a)) {
            return Err(CertRefusal::Untrusted);
        }
        if !wire::verify_registration_signed(payload, &cert.subject_key()) {
            return Err(CertRefusal::BadSignature);
        }
        let held = CertHeld {
            serial: cert.body.serial,
            not_after: cert.body.not_after,
        };
        if !keyed {
            // The certificate is the identity's policy (the newest one it signed with).
            self.servers.insert(
                identity.to_string(),
                ServerPolicy {
                    spi: 0,
                    key: Vec::new(),
                    allow: cert.body.anycast.iter().map(to_prefix).collect(),
                    real: cert.body.real.iter().map(to_prefix).collect(),
                    certificate: Some(held),
                },
            );
        }
        Ok(held)
    }

    /// A refused certificate-signed update: counted, logged within the log budget, and
    /// answered (unsigned: the agent shares no key with the sender) within the budget of
    /// answers to unauthenticated messages; a rate-limited one is not answered.
    pub(super) fn refuse_certificate(
        &mut self,
        msg: &Message,
        from: SocketAddr,
        (identity, seq, now): (&str, u16, Instant),
        why: CertRefusal,
    ) -> Outcome {
        if why == CertRefusal::RateLimited {
            let counted = self.count("dropped_certificate_rate_limited");
            return Outcome {
                reply: None,
                changed: false,
                counted,
            };
        }
        let reason = why.reason();
        self.warn(why.log_kind(), now, || {
            format!(
                "certificate-signed binding update from {from} claiming to be '{identity}' \
                 refused: {}",
                reason.replace('_', " ")
            )
        });
        let counted = self.count(format!("refused_certificate_{reason}"));
        let status = match why {
            CertRefusal::Stale | CertRefusal::Replayed => status::ID_MISMATCH,
            CertRefusal::AnycastNotCertified | CertRefusal::ServiceNotAccepting => {
                status::PROHIBITED
            }
            CertRefusal::RealNotCertified | CertRefusal::SourceNotCertified => status::INVALID_COA,
            _ => status::AUTH_FAILED,
        };
        self.answer_unauthenticated(msg, from, status, seq, now, counted)
    }

    /// After a reload: a revocation list older (by its number) than the one in use is not
    /// taken, since it could un-revoke a certificate; the one in use stays.
    pub(super) fn keep_newer_revocation_list(&mut self, old: Option<RevocationList>) {
        let (Some(policy), Some(old)) = (self.certificates.as_mut(), old) else {
            return;
        };
        if policy.revoked.number < old.number {
            tracing::warn!(
                "registration.certificates.revocations: list number {} is older than the one \
                 in use ({}): keeping that one",
                policy.revoked.number,
                old.number
            );
            *counter(&mut self.counters, "revocation_list_refused_older") += 1;
            policy.revoked = old;
        }
    }

    /// After a reload: the certificate-registered identities that the new policy still
    /// takes (certificates on, the identity not now keyed, the certificate not revoked).
    pub(super) fn keep_certificate_identities(&mut self, old: HashMap<String, ServerPolicy>) {
        let Some(policy) = &self.certificates else {
            return;
        };
        for (identity, p) in old {
            let Some(held) = p.certificate else { continue };
            if self.servers.contains_key(&identity) {
                tracing::info!(
                    "'{identity}' is now configured with a key: its certificate no longer \
                     applies"
                );
                continue;
            }
            if policy.revoked.is_revoked(held.serial) {
                tracing::info!(
                    "certificate {} of '{identity}' revoked: its bindings end",
                    held.serial
                );
                continue;
            }
            self.servers.insert(identity, p);
        }
    }
}
