//! Route optimization, the client's side: which bindings a client believes.
//!
//! A server sends a client that reached it through the agent a binding (the patent's first
//! embodiment: "anycast address -> my real address", with "a proof that the server indeed
//! has been authorized to respond to the used anycast address"). Believing a forged one
//! would hand the client's traffic for the service to whoever forged it, so
//! [`Verifier::check`] takes a binding only when every check below passes, and counts
//! every refusal by its reason ([`Refusal::reason`]); a refused binding changes nothing, so
//! the client's traffic keeps going through the agent.
//!
//! Checks, in order (cheap ones first; the two signature checks cost about 50 us each):
//!
//! 1. the message decodes (`wire`'s checks) and is a client binding (H clear) addressed to
//!    one of this client's addresses, carrying a certificate, a signature, the real
//!    address (Alternate Care-of Address) and a MESG-ID timestamp;
//! 2. the certificate is well formed and signed by a trust anchor (the operator's key);
//! 3. it is valid now, and its serial is not on the operator's revocation list;
//! 4. the message is signed by the certificate's key;
//! 5. the anycast address (the inner source) lies in the certificate's anycast prefixes,
//!    and the real address and the datagram's source in its real prefixes;
//! 6. the MESG-ID is within `window` of this client's clock and newer than the last one
//!    taken from that server identity (a replay is refused even inside the window);
//! 7. the sequence number is newer (modulo 2^16) than the binding's, when that server
//!    holds the binding;
//! 8. no other server holds a live binding for the same service: a server the client is
//!    bound to is only replaced when its binding ends (expiry, withdrawal, revocation), so
//!    a second server's binding cannot move the client's open connections.
//!
//! A binding with lifetime 0 (the server is going down, claim 15) passes the same checks
//! and withdraws the binding. The binding table here is what the client's data path
//! installs; [`Verifier::expire`] ends bindings whose lifetime is over.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use anycast_common::{
    pki::{Certificate, PkiError, RevocationList, VerifyingKey},
    wire::{self, Body, WireError},
};

pub mod control;
pub mod daemon;
#[cfg(test)]
mod tests;

/// What a binding is for: the anycast address, IP protocol and port (0 and 0: the whole
/// address, when the server's binding names no service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub anycast: IpAddr,
    pub protocol: u8,
    pub port: u16,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            0 => "any".to_string(),
            p => p.to_string(),
        };
        write!(f, "{} {proto}/{}", self.anycast, self.port)
    }
}

/// A binding the client took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub server: String,
    pub serial: u64,
    pub real: IpAddr,
    pub seq: u16,
    /// Unix seconds.
    pub expires: u64,
    /// Which binding of the service this is, from 1: a binding taken from a server that
    /// did not hold the service gets the next number; a refresh or a move to another real
    /// address of the same server keeps it. The tunnel moves a connection only with the
    /// generation it began with.
    pub generation: u32,
}

/// The client's connections a binding moves with it, as the server named them: this
/// client's address (the one the binding was sent to), the protocol, and (client port,
/// service port) pairs. Any other connection open before the binding stays on the agent's
/// path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub client: Option<IpAddr>,
    pub protocol: u8,
    pub ports: Vec<(u16, u16)>,
}

/// What an accepted message did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A new binding, or one moved to another real address (a link of the server failed).
    Bound {
        key: ServiceKey,
        binding: Binding,
        named: Named,
    },
    /// The same server and real address, a later expiry.
    Refreshed {
        key: ServiceKey,
        expires: u64,
        generation: u32,
        named: Named,
    },
    /// Lifetime 0 from the server holding the binding: back to the agent.
    Withdrawn { key: ServiceKey },
    /// Lifetime 0 for a binding not held (or held by another server): nothing to do.
    NothingToWithdraw { key: ServiceKey },
}

/// Why a message was refused. Every variant is counted as `refused_REASON`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Malformed(WireError),
    /// A well-formed message but not a client binding (a home BU, a BA, ...).
    NotClientBinding,
    /// Addressed to another client (a binding captured elsewhere and sent here).
    NotForUs,
    /// No certificate, signature, real address or MESG-ID.
    MissingOption,
    BadCertificate(PkiError),
    /// Not signed by a trust anchor: self-signed, another operator's, or forged.
    UntrustedCertificate,
    CertificateExpired,
    CertificateNotYetValid,
    CertificateRevoked,
    /// The message's signature does not verify with the certificate's key.
    BadSignature,
    /// The anycast address is not one the certificate covers.
    AnycastNotCertified,
    /// The real address is not one the certificate covers.
    RealNotCertified,
    /// The datagram came from an address the certificate does not cover.
    SourceNotCertified,
    /// The MESG-ID is outside the window around this client's clock.
    Stale,
    /// The MESG-ID is not newer than the last one taken from that server.
    Replayed,
    /// The sequence number is not newer than the binding's.
    OldSequence,
    /// Another server holds a live binding for that service.
    OtherServerBound,
}

impl Refusal {
    /// A stable snake_case name, for counters and logs.
    pub fn reason(self) -> String {
        let s = match self {
            Refusal::Malformed(e) => return format!("malformed_{}", e.reason()),
            Refusal::BadCertificate(e) => return format!("bad_certificate_{}", e.reason()),
            Refusal::NotClientBinding => "not_client_binding",
            Refusal::NotForUs => "not_for_us",
            Refusal::MissingOption => "missing_option",
            Refusal::UntrustedCertificate => "untrusted_certificate",
            Refusal::CertificateExpired => "certificate_expired",
            Refusal::CertificateNotYetValid => "certificate_not_yet_valid",
            Refusal::CertificateRevoked => "certificate_revoked",
            Refusal::BadSignature => "bad_signature",
            Refusal::AnycastNotCertified => "anycast_not_certified",
            Refusal::RealNotCertified => "real_not_certified",
            Refusal::SourceNotCertified => "source_not_certified",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
            Refusal::OldSequence => "old_sequence",
            Refusal::OtherServerBound => "other_server_bound",
        };
        s.to_string()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Malformed(e) => write!(f, "malformed: {e}"),
            Refusal::BadCertificate(e) => write!(f, "bad certificate: {e}"),
            other => write!(f, "{}", other.reason().replace('_', " ")),
        }
    }
}

/// The client's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator keys a certificate may be signed by.
    pub anchors: Vec<VerifyingKey>,
    /// This client's addresses: bindings addressed elsewhere are refused.
    pub addresses: Vec<IpAddr>,
    /// How far a MESG-ID may be from this client's clock (seconds).
    pub window: u64,
    /// Longest lifetime taken (seconds); a longer one is cut to it.
    pub max_lifetime: u64,
}

/// The bindings a client holds, the replay state, and the counters.
pub struct Verifier {
    settings: Settings,
    revoked: RevocationList,
    bindings: BTreeMap<ServiceKey, Binding>,
    /// The newest MESG-ID taken from each server identity.
    last_mesg_id: HashMap<String, u64>,
    /// The last generation given ([`Binding::generation`]).
    generation: u32,
    counters: BTreeMap<String, u64>,
}

impl Verifier {
    pub fn new(settings: Settings) -> Verifier {
        Verifier {
            settings,
            revoked: RevocationList::default(),
            bindings: BTreeMap::new(),
            last_mesg_id: HashMap::new(),
            generation: 0,
            counters: BTreeMap::new(),
        }
    }

    pub fn bindings(&self) -> &BTreeMap<ServiceKey, Binding> {
        &self.bindings
    }

    pub fn counters(&self) -> &BTreeMap<String, u64> {
        &self.counters
    }

    pub fn revocation_list(&self) -> &RevocationList {
        &self.revoked
    }

    fn count(&mut self, name: String) {
        *self.counters.entry(name).or_default() += 1;
    }

    /// Takes a newer revocation list (its signature was checked when it was read) and ends
    /// the bindings of the certificates it revokes, returning their services. A list with
    /// a number not above the current one is refused: an older list could un-revoke.
    pub fn set_revocation_list(&mut self, list: RevocationList) -> Result<Vec<ServiceKey>, String> {
        if list.number <= self.revoked.number && self.revoked.number != 0 {
            self.count("revocation_list_refused_older".into());
            return Err(format!(
                "revocation list number {} is not newer than the current {}",
                list.number, self.revoked.number
            ));
        }
        self.revoked = list;
        let gone: Vec<ServiceKey> = self
            .bindings
            .iter()
            .filter(|(_, b)| self.revoked.is_revoked(b.serial))
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.bindings.remove(k);
            self.count("ended_revoked".into());
        }
        Ok(gone)
    }

    /// Ends a binding now, on the operator's word (`anycast-ctl client-unbind`).
    pub fn end(&mut self, key: &ServiceKey) -> Option<Binding> {
        let b = self.bindings.remove(key);
        if b.is_some() {
            self.count("ended_by_operator".into());
        }
        b
    }

    /// Counts a revocation list file refused (`revocation_list_refused_REASON`).
    pub fn refuse_revocation_list(&mut self, reason: &str) {
        self.count(format!("revocation_list_refused_{reason}"));
    }

    /// Counts an event of the daemon's (e.g. `revocation_list_taken`).
    pub fn count_event(&mut self, name: &str) {
        self.count(name.into());
    }

    /// Ends the bindings whose lifetime is over at `now` (Unix seconds), returning them.
    pub fn expire(&mut self, now: u64) -> Vec<ServiceKey> {
        let gone: Vec<ServiceKey> = self
            .bindings
            .iter()
            .filter(|(_, b)| b.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.bindings.remove(k);
            self.count("ended_expired".into());
        }
        gone
    }

    /// Ends a binding whose server stopped answering (the data path's timeout).
    pub fn forget(&mut self, key: &ServiceKey) -> bool {
        let had = self.bindings.remove(key).is_some();
        if had {
            self.count("ended_unanswered".into());
        }
        had
    }

    /// Checks one datagram from `source` (the UDP payload) at `now` (Unix seconds) and, if
    /// every check passes, applies it. Counted either way.
    pub fn check(&mut self, payload: &[u8], source: IpAddr, now: u64) -> Result<Accepted, Refusal> {
        let r = self.check_inner(payload, source, now);
        match &r {
            Ok(a) => self.count(
                match a {
                    Accepted::Bound { .. } => "bound",
                    Accepted::Refreshed { .. } => "refreshed",
                    Accepted::Withdrawn { .. } => "withdrawn",
                    Accepted::NothingToWithdraw { .. } => "withdrawn_nothing",
                }
                .into(),
            ),
            Err(e) => self.count(format!("refused_{}", e.reason())),
        }
        r
    }

    fn check_inner(
        &mut self,
        payload: &[u8],
        source: IpAddr,
        now: u64,
    ) -> Result<Accepted, Refusal> {
        let msg = wire::decode(payload).map_err(Refusal::Malformed)?;
        let Body::ClientBindingUpdate { seq, lifetime } = msg.body else {
            return Err(Refusal::NotClientBinding);
        };
        if !self
            .settings
            .addresses
            .contains(&wire::from_mapped(msg.dst))
        {
            return Err(Refusal::NotForUs);
        }
        let o = &msg.options;
        let (Some(cert), Some(_), Some(real), Some(mesg_id)) =
            (&o.certificate, o.signature, o.alt_coa, o.mesg_id)
        else {
            return Err(Refusal::MissingOption);
        };
        let cert = Certificate::decode(cert).map_err(Refusal::BadCertificate)?;
        if !self.settings.anchors.iter().any(|a| cert.issued_by(a)) {
            return Err(Refusal::UntrustedCertificate);
        }
        if now < cert.body.not_before {
            return Err(Refusal::CertificateNotYetValid);
        }
        if !cert.valid_at(now) {
            return Err(Refusal::CertificateExpired);
        }
        if self.revoked.is_revoked(cert.body.serial) {
            return Err(Refusal::CertificateRevoked);
        }
        if !wire::verify_signed(payload, &cert.subject_key()) {
            return Err(Refusal::BadSignature);
        }
        let anycast = wire::from_mapped(msg.src);
        let real = wire::from_mapped(real);
        if !cert.allows_anycast(anycast) {
            return Err(Refusal::AnycastNotCertified);
        }
        if !cert.allows_real(real) {
            return Err(Refusal::RealNotCertified);
        }
        if !cert.allows_real(unmap(source)) {
            return Err(Refusal::SourceNotCertified);
        }
        let sent = wire::ntp_to_unix_secs(mesg_id);
        if sent.abs_diff(now as i64) > self.settings.window {
            return Err(Refusal::Stale);
        }
        let server = cert.body.identity.clone();
        if self
            .last_mesg_id
            .get(&server)
            .is_some_and(|&last| mesg_id <= last)
        {
            return Err(Refusal::Replayed);
        }
        let key = ServiceKey {
            anycast,
            protocol: o.service.map_or(0, |s| s.protocol),
            port: o.service.map_or(0, |s| s.port),
        };
        let held = self.bindings.get(&key).filter(|b| b.expires > now);
        match held {
            Some(b) if b.server == server && (seq.wrapping_sub(b.seq) as i16) <= 0 => {
                return Err(Refusal::OldSequence)
            }
            Some(b) if b.server != server && lifetime != 0 => {
                return Err(Refusal::OtherServerBound)
            }
            _ => {}
        }
        // Every check passed: the message is the server's and fresh.
        self.last_mesg_id.insert(server.clone(), mesg_id);
        let held_by_it = held.is_some_and(|b| b.server == server);
        if lifetime == 0 {
            if held_by_it {
                self.bindings.remove(&key);
                return Ok(Accepted::Withdrawn { key });
            }
            return Ok(Accepted::NothingToWithdraw { key });
        }
        let secs = (u64::from(lifetime) * 4).min(self.settings.max_lifetime);
        // Never beyond the certificate's own validity.
        let expires = (now + secs).min(cert.body.not_after);
        let generation = match held {
            Some(b) if held_by_it => b.generation,
            _ => {
                // Never 0: an entry of generation 0 is a connection that stays on the
                // agent's path.
                self.generation = self.generation.checked_add(1).unwrap_or(1);
                self.generation
            }
        };
        let binding = Binding {
            server,
            serial: cert.body.serial,
            real,
            seq,
            expires,
            generation,
        };
        let same_path = held.is_some_and(|b| b.server == binding.server && b.real == real);
        let named = self.named(&key, wire::from_mapped(msg.dst), &o.connections);
        self.bindings.insert(key, binding.clone());
        if same_path {
            Ok(Accepted::Refreshed {
                key,
                expires,
                generation,
                named,
            })
        } else {
            Ok(Accepted::Bound {
                key,
                binding,
                named,
            })
        }
    }

    /// The connections a binding names, less those outside its service (counted): a
    /// service of one port names only that port; a whole address (protocol 0) names TCP
    /// connections, the ones a server finds in its socket table.
    fn named(&mut self, key: &ServiceKey, client: IpAddr, pairs: &[(u16, u16)]) -> Named {
        let protocol = if key.protocol == 0 {
            anycast_common::PROTO_TCP
        } else {
            key.protocol
        };
        let inside: Vec<(u16, u16)> = pairs
            .iter()
            .copied()
            .filter(|&(_, port)| key.port == 0 || port == key.port)
            .collect();
        for _ in inside.len()..pairs.len() {
            self.count("named_connection_outside_service".into());
        }
        // A connection is between addresses of one family: the anycast address's.
        if client.is_ipv4() != key.anycast.is_ipv4() {
            if !inside.is_empty() {
                self.count("named_connections_of_other_family".into());
            }
            return Named::default();
        }
        Named {
            client: Some(client),
            protocol,
            ports: inside,
        }
    }
}

/// The client's tunnel map entry (`CLIENT_BINDINGS`) for a binding: the service as the data
/// path's key, the server's real address as outer destination and the client's own address
/// of the real address's family as outer source. `None` when the client has no address of
/// that family: the service then stays on the agent's path.
pub fn datapath_entry(
    key: &ServiceKey,
    binding: &Binding,
    own: &[IpAddr],
) -> Option<(anycast_common::ServiceKey, anycast_common::ClientBinding)> {
    let source = *own.iter().find(|a| a.is_ipv4() == binding.real.is_ipv4())?;
    let (real, family) = anycast_common::addr_words(binding.real);
    let map_key = anycast_common::ServiceKey::new(key.anycast, key.protocol, key.port);
    let value = anycast_common::ClientBinding {
        real,
        source: anycast_common::addr_words(source).0,
        family,
        _pad: [0; 3],
        generation: binding.generation,
    };
    Some((map_key, value))
}

/// An IPv4-mapped source (a dual-stack socket's view of an IPv4 sender) as IPv4.
pub(crate) fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => wire::from_mapped(v6),
        v4 => v4,
    }
}

/// The tunnel's `CLIENT_FLOWS` key of a connection from `client` port `client_port` to
/// the service's anycast address and `service_port`.
pub fn flow_key(
    client: IpAddr,
    client_port: u16,
    anycast: IpAddr,
    service_port: u16,
    protocol: u8,
) -> anycast_common::FlowKey {
    let (src, family) = anycast_common::addr_words(client);
    anycast_common::FlowKey {
        src,
        dst: anycast_common::addr_words(anycast).0,
        sport: client_port,
        dport: service_port,
        proto: protocol,
        family,
        _pad: [0; 2],
    }
}

/// The client's connected UDP sockets to `key`'s service in a `/proc/net/udp{,6}` text:
/// (own address, own port, service port). A UDP flow has no opening the tunnel could see,
/// so these, running before a binding, are marked to stay on the agent's path.
pub fn connected_udp(proc_text: &str, key: &ServiceKey) -> Vec<(IpAddr, u16, u16)> {
    crate::registration::server::socket_rows(proc_text)
        .filter(|r| {
            let (ra, rp) = r.remote;
            ra == key.anycast && rp != 0 && (key.port == 0 || rp == key.port)
        })
        .map(|r| (r.local.0, r.local.1, r.remote.1))
        .collect()
}
