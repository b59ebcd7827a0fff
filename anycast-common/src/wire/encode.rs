//! Building binding messages: the MH, its options in their alignments, the AUTH option
//! last, the checksum, and the inner IPv6 header in front.
use super::auth::authenticator;
use super::*;

/// The UDP payload for `msg`; with a key, an AUTH option is appended last and computed.
///
/// # Panics
///
/// If the MN-ID identifier is empty or longer than [`MAX_MN_ID_LEN`] bytes; [`try_encode`]
/// returns an error instead.
pub fn encode(msg: &Message, key: Option<Key>) -> Vec<u8> {
    match try_encode(msg, key) {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot encode binding message: {e}"),
    }
}

/// [`encode`], with an error for an MN-ID that does not fit.
pub fn try_encode(msg: &Message, key: Option<Key>) -> Result<Vec<u8>, EncodeError> {
    encode_sealed(msg, key.map_or(Seal::None, Seal::Hmac))
}

/// How the MH is closed: nothing, an AUTH option (HMAC, a key shared with the agent), or a
/// signature option (the server's Ed25519 key, for a client that holds only a trust anchor).
pub(super) enum Seal<'a> {
    None,
    Hmac(Key<'a>),
    /// The key and the context string the signature covers first.
    Ed25519(&'a crate::pki::SigningKey, &'static [u8]),
}

pub(super) fn encode_sealed(msg: &Message, seal: Seal) -> Result<Vec<u8>, EncodeError> {
    let mut mh = Vec::with_capacity(128);
    // Payload proto, header length (set below), MH type, reserved, checksum (set last).
    mh.extend_from_slice(&[IPPROTO_NONE, 0, msg.body.mh_type(), 0, 0, 0]);
    let mut agents: &[AgentEntry] = &[];
    match &msg.body {
        Body::BindingRefreshRequest => mh.extend_from_slice(&[0, 0]),
        &Body::BindingUpdate { seq, ack, lifetime } => {
            let flags = BU_FLAG_H | if ack { BU_FLAG_A } else { 0 };
            mh.extend_from_slice(&seq.to_be_bytes());
            mh.extend_from_slice(&flags.to_be_bytes());
            mh.extend_from_slice(&lifetime.to_be_bytes());
        }
        &Body::ClientBindingUpdate { seq, lifetime } => {
            // H clear: a correspondent registration (RFC 6275 9.5.1), not a home one.
            mh.extend_from_slice(&seq.to_be_bytes());
            mh.extend_from_slice(&[0, 0]);
            mh.extend_from_slice(&lifetime.to_be_bytes());
        }
        &Body::BindingAck {
            status,
            seq,
            lifetime,
        } => {
            mh.extend_from_slice(&[status, 0]);
            mh.extend_from_slice(&seq.to_be_bytes());
            mh.extend_from_slice(&lifetime.to_be_bytes());
        }
        &Body::BindingError { status, home } => {
            mh.extend_from_slice(&[status, 0]);
            mh.extend_from_slice(&home.octets());
        }
        Body::DiscoveryRequest => mh.extend_from_slice(&[discovery_kind::REQUEST, 0]),
        Body::DiscoveryReply {
            lifetime,
            agents: list,
        } => {
            if list.len() > MAX_DISCOVERY_AGENTS || !list.iter().all(agent_encodable) {
                return Err(EncodeError::BadAgent);
            }
            mh.extend_from_slice(&[discovery_kind::REPLY, 0]);
            mh.extend_from_slice(&lifetime.to_be_bytes());
            mh.extend_from_slice(&[0, 0]);
            agents = list;
        }
    }

    let o = &msg.options;
    if let Some(coa) = o.alt_coa {
        pad_to(&mut mh, 8, 6);
        mh.extend_from_slice(&[option::ALT_COA, ALT_COA_LEN as u8]);
        mh.extend_from_slice(&coa.octets());
    }
    if let Some(id) = &o.mn_id {
        let id = id.as_bytes();
        if id.is_empty() {
            return Err(EncodeError::EmptyMnId);
        }
        if id.len() > MAX_MN_ID_LEN {
            return Err(EncodeError::MnIdTooLong(id.len()));
        }
        mh.extend_from_slice(&[option::MN_ID, 1 + id.len() as u8, MN_ID_NAI]);
        mh.extend_from_slice(id);
    }
    if let Some(ts) = o.mesg_id {
        pad_to(&mut mh, 8, 2);
        mh.extend_from_slice(&[option::MESG_ID, MESG_ID_LEN as u8]);
        mh.extend_from_slice(&ts.to_be_bytes());
    }
    if let Some(l) = o.load {
        pad_to(&mut mh, 4, 0);
        mh.extend_from_slice(&[option::LOAD_INFO, LOAD_INFO_LEN as u8]);
        mh.extend_from_slice(&l.priority.to_be_bytes());
        mh.extend_from_slice(&l.sessions_in_use.to_be_bytes());
        mh.extend_from_slice(&l.max_sessions.to_be_bytes());
        mh.extend_from_slice(&l.used_capacity.to_be_bytes());
        mh.extend_from_slice(&l.max_capacity.to_be_bytes());
    }
    if let Some(s) = o.service {
        pad_to(&mut mh, 4, 2);
        mh.extend_from_slice(&[option::VENDOR, VENDOR_SERVICE_LEN as u8]);
        mh.extend_from_slice(&VENDOR_ID.to_be_bytes());
        mh.extend_from_slice(&[VENDOR_SERVICE, s.protocol]);
        mh.extend_from_slice(&s.port.to_be_bytes());
    }
    for a in agents {
        pad_to(&mut mh, 4, 2);
        let len = VENDOR_AGENT_FIXED + a.id.len();
        mh.extend_from_slice(&[option::VENDOR, len as u8]);
        mh.extend_from_slice(&VENDOR_ID.to_be_bytes());
        mh.push(VENDOR_AGENT);
        let v4 = a.v4.map_or(Ipv6Addr::UNSPECIFIED, |v4| v4.to_ipv6_mapped());
        mh.extend_from_slice(&v4.octets());
        mh.extend_from_slice(&a.v6.unwrap_or(Ipv6Addr::UNSPECIFIED).octets());
        mh.extend_from_slice(a.id.as_bytes());
    }
    if !o.connections.is_empty() {
        if o.connections.len() > MAX_NAMED_CONNECTIONS {
            return Err(EncodeError::TooManyConnections(o.connections.len()));
        }
        pad_to(&mut mh, 4, 2);
        mh.extend_from_slice(&[option::VENDOR, (5 + 4 * o.connections.len()) as u8]);
        mh.extend_from_slice(&VENDOR_ID.to_be_bytes());
        mh.push(VENDOR_CONNECTIONS);
        for (client, service) in &o.connections {
            mh.extend_from_slice(&client.to_be_bytes());
            mh.extend_from_slice(&service.to_be_bytes());
        }
    }
    if let Some(cert) = &o.certificate {
        if cert.is_empty() || cert.len() > crate::pki::MAX_CERT_LEN {
            return Err(EncodeError::BadCertificate(cert.len()));
        }
        for part in cert.chunks(CERT_PART_MAX) {
            pad_to(&mut mh, 4, 2);
            mh.extend_from_slice(&[option::VENDOR, (5 + part.len()) as u8]);
            mh.extend_from_slice(&VENDOR_ID.to_be_bytes());
            mh.push(VENDOR_CERTIFICATE);
            mh.extend_from_slice(part);
        }
    }
    match seal {
        Seal::Ed25519(signer, context) => {
            // At 8n+2 (RFC 5094's 4n+2), so the option (78 bytes) ends the MH on a
            // multiple of 8 and nothing follows it.
            pad_to(&mut mh, 8, 2);
            mh.extend_from_slice(&[option::VENDOR, VENDOR_SIGNATURE_LEN as u8]);
            mh.extend_from_slice(&VENDOR_ID.to_be_bytes());
            mh.extend_from_slice(&[VENDOR_SIGNATURE, SIGNATURE_ED25519, 0, 0, 0, 0, 0, 0]);
            let total = mh.len() + crate::pki::SIGNATURE_LEN;
            set_header_len(&mut mh, total);
            let sig = super::signature::sign(context, &msg.src, &msg.dst, &mh, signer);
            mh.extend_from_slice(&sig);
        }
        Seal::Hmac(key) => {
            // At 8n+1, so the option (2 + AUTH_LEN = 23 bytes) ends the MH on a multiple of 8.
            pad_to(&mut mh, 8, 1);
            mh.extend_from_slice(&[option::AUTH, AUTH_LEN as u8, AUTH_MN_HA]);
            mh.extend_from_slice(&key.spi.to_be_bytes());
            let total = mh.len() + AUTHENTICATOR_LEN;
            set_header_len(&mut mh, total);
            let tag = authenticator(&msg.src, &msg.dst, &mh, key.secret);
            mh.extend_from_slice(&tag);
        }
        Seal::None => {
            pad_to(&mut mh, 8, 0);
            let total = mh.len();
            set_header_len(&mut mh, total);
        }
    }
    debug_assert_eq!(mh.len() % 8, 0);
    let sum = checksum(&msg.src, &msg.dst, &mh);
    mh[4..6].copy_from_slice(&sum.to_be_bytes());

    let mut out = Vec::with_capacity(IPV6_HEADER_LEN + mh.len());
    // Version 6, traffic class 0, flow label 0.
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(mh.len() as u16).to_be_bytes());
    out.extend_from_slice(&[IPPROTO_MH, HOP_LIMIT]);
    out.extend_from_slice(&msg.src.octets());
    out.extend_from_slice(&msg.dst.octets());
    out.extend_from_slice(&mh);
    Ok(out)
}

/// An agent a reply can carry (the decoder's checks, see `decode::agent_option`).
fn agent_encodable(a: &AgentEntry) -> bool {
    (1..=MAX_AGENT_ID_LEN).contains(&a.id.len())
        && (a.v4.is_some() || a.v6.is_some())
        && a.v4.is_none_or(|v4| !v4.is_unspecified())
        && a.v6
            .is_none_or(|v6| !v6.is_unspecified() && v6.to_ipv4_mapped().is_none())
}

/// Pads `mh` with Pad1 or PadN so its length is `y` modulo `x`.
fn pad_to(mh: &mut Vec<u8>, x: usize, y: usize) {
    let need = (y + x - mh.len() % x) % x;
    match need {
        0 => {}
        1 => mh.push(option::PAD1),
        n => {
            mh.extend_from_slice(&[option::PADN, (n - 2) as u8]);
            mh.resize(mh.len() + n - 2, 0);
        }
    }
}

/// Sets the header length field for an MH of `total` bytes (a multiple of 8, at most 2048;
/// our largest messages, a discovery reply of 16 agents with 64-byte identities and a
/// client binding with the largest certificate, are under 1800).
fn set_header_len(mh: &mut [u8], total: usize) {
    debug_assert!(total.is_multiple_of(8) && total <= 2048);
    mh[1] = (total / 8 - 1) as u8;
}
