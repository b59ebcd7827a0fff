//! Parsing and validating binding messages (RFC 6275 section 9.2's checks plus bounds
//! checks); each rejection is a [`WireError`].
use super::*;

/// Parses and validates a UDP payload (does not check AUTH: that needs the key, see `verify`).
pub fn decode(payload: &[u8]) -> Result<Message, WireError> {
    parse(payload).map(|(msg, _)| msg)
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn addr(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// Decodes and validates; also returns the AUTH option's offset in the MH, if present.
pub(super) fn parse(payload: &[u8]) -> Result<(Message, Option<usize>), WireError> {
    if payload.len() < IPV6_HEADER_LEN + MIN_MH_LEN {
        return Err(WireError::Truncated);
    }
    if payload[0] >> 4 != 6 {
        return Err(WireError::BadIpVersion);
    }
    if payload[6] != IPPROTO_MH {
        return Err(WireError::BadNextHeader);
    }
    let mh = &payload[IPV6_HEADER_LEN..];
    if usize::from(be16(payload, 4)) != mh.len() {
        return Err(WireError::BadPayloadLength);
    }
    let src = addr(payload, 8);
    let dst = addr(payload, 24);
    if mh[0] != IPPROTO_NONE {
        return Err(WireError::BadPayloadProto);
    }
    if (usize::from(mh[1]) + 1) * 8 != mh.len() {
        return Err(WireError::BadHeaderLength);
    }
    if checksum(&src, &dst, mh) != 0 {
        return Err(WireError::BadChecksum);
    }
    // The fixed part of each message type, including the 6-byte MH header.
    let fixed = match mh[2] {
        mh_type::BINDING_REFRESH_REQUEST => 8,
        mh_type::BINDING_UPDATE | mh_type::BINDING_ACK => 12,
        mh_type::BINDING_ERROR => 24,
        // The kind byte needs 7 bytes; a request has 8, a reply 12 (checked below).
        mh_type::EXPERIMENTAL => match mh.get(6) {
            Some(&discovery_kind::REQUEST) => 8,
            Some(&discovery_kind::REPLY) => 12,
            _ => return Err(WireError::UnknownMhType),
        },
        _ => return Err(WireError::UnknownMhType),
    };
    if mh.len() < fixed {
        return Err(WireError::MessageTooShort);
    }
    let body = match mh[2] {
        mh_type::BINDING_REFRESH_REQUEST => Body::BindingRefreshRequest,
        // H set: a home registration with an agent; H clear: a correspondent
        // registration, the server's binding for a client (RFC 6275 9.5.1).
        mh_type::BINDING_UPDATE if be16(mh, 8) & BU_FLAG_H != 0 => Body::BindingUpdate {
            seq: be16(mh, 6),
            ack: be16(mh, 8) & BU_FLAG_A != 0,
            lifetime: be16(mh, 10),
        },
        mh_type::BINDING_UPDATE => Body::ClientBindingUpdate {
            seq: be16(mh, 6),
            lifetime: be16(mh, 10),
        },
        mh_type::BINDING_ACK => Body::BindingAck {
            status: mh[6],
            seq: be16(mh, 8),
            lifetime: be16(mh, 10),
        },
        mh_type::BINDING_ERROR => Body::BindingError {
            status: mh[6],
            home: addr(mh, 8),
        },
        _ if mh[6] == discovery_kind::REQUEST => Body::DiscoveryRequest,
        _ => Body::DiscoveryReply {
            lifetime: be16(mh, 8),
            agents: Vec::new(),
        },
    };
    let (options, agents, auth_at) = parse_options(mh, fixed)?;
    // Agent options mean something in a discovery reply only; elsewhere they are skipped
    // like any vendor option we do not use.
    let body = match body {
        Body::DiscoveryReply { lifetime, .. } => Body::DiscoveryReply { lifetime, agents },
        other => other,
    };
    let msg = Message {
        src,
        dst,
        body,
        options,
    };
    Ok((msg, auth_at))
}

type Parsed = (Options, Vec<AgentEntry>, Option<usize>);

fn parse_options(mh: &[u8], start: usize) -> Result<Parsed, WireError> {
    let end = mh.len();
    let mut o = Options::default();
    let mut agents = Vec::new();
    let mut auth_at = None;
    let mut signature_seen = false;
    let mut i = start;
    let aligned = |at: usize, x: usize, y: usize| {
        if at % x == y {
            Ok(())
        } else {
            Err(WireError::BadAlignment)
        }
    };
    let exact = |len: usize, want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(WireError::BadOptionLength)
        }
    };
    fn once<T>(slot: &Option<T>) -> Result<(), WireError> {
        match slot {
            Some(_) => Err(WireError::DuplicateOption),
            None => Ok(()),
        }
    }
    while i < end {
        if auth_at.is_some() {
            return Err(WireError::AuthNotLast);
        }
        if signature_seen {
            return Err(WireError::SignatureNotLast);
        }
        let kind = mh[i];
        if kind == option::PAD1 {
            i += 1;
            continue;
        }
        if i + 2 > end {
            return Err(WireError::OptionTruncated);
        }
        let len = usize::from(mh[i + 1]);
        let next = i + 2 + len;
        if next > end {
            return Err(WireError::OptionTruncated);
        }
        let data = &mh[i + 2..next];
        match kind {
            option::ALT_COA => {
                aligned(i, 8, 6)?;
                exact(len, ALT_COA_LEN)?;
                once(&o.alt_coa)?;
                o.alt_coa = Some(addr(data, 0));
            }
            option::MN_ID => {
                if len < 2 {
                    return Err(WireError::BadOptionLength);
                }
                once(&o.mn_id)?;
                if data[0] != MN_ID_NAI {
                    return Err(WireError::BadMnId);
                }
                let id = std::str::from_utf8(&data[1..]).map_err(|_| WireError::BadMnId)?;
                o.mn_id = Some(id.to_owned());
            }
            option::MESG_ID => {
                aligned(i, 8, 2)?;
                exact(len, MESG_ID_LEN)?;
                once(&o.mesg_id)?;
                let mut ts = [0u8; 8];
                ts.copy_from_slice(data);
                o.mesg_id = Some(u64::from_be_bytes(ts));
            }
            option::LOAD_INFO => {
                exact(len, LOAD_INFO_LEN)?;
                once(&o.load)?;
                o.load = Some(LoadInfo {
                    priority: be16(data, 0),
                    sessions_in_use: be32(data, 2),
                    max_sessions: be32(data, 6),
                    used_capacity: be32(data, 10),
                    max_capacity: be32(data, 14),
                });
            }
            option::VENDOR => {
                aligned(i, 4, 2)?;
                // Vendor id and sub-type at least (RFC 5094).
                if len < 5 {
                    return Err(WireError::BadOptionLength);
                }
                if be32(data, 0) == VENDOR_ID && data[4] == VENDOR_SERVICE {
                    exact(len, VENDOR_SERVICE_LEN)?;
                    once(&o.service)?;
                    o.service = Some(ServiceSelector {
                        protocol: data[5],
                        port: be16(data, 6),
                    });
                } else if be32(data, 0) == VENDOR_ID && data[4] == VENDOR_AGENT {
                    if agents.len() == MAX_DISCOVERY_AGENTS {
                        return Err(WireError::BadAgentOption);
                    }
                    agents.push(agent_option(data)?);
                } else if be32(data, 0) == VENDOR_ID && data[4] == VENDOR_CERTIFICATE {
                    let part = &data[5..];
                    let cert = o.certificate.get_or_insert_with(Vec::new);
                    if part.is_empty() || cert.len() + part.len() > crate::pki::MAX_CERT_LEN {
                        return Err(WireError::BadCertificateOption);
                    }
                    cert.extend_from_slice(part);
                } else if be32(data, 0) == VENDOR_ID && data[4] == VENDOR_CONNECTIONS {
                    let pairs = &data[5..];
                    if pairs.is_empty()
                        || !pairs.len().is_multiple_of(4)
                        || !o.connections.is_empty()
                    {
                        return Err(WireError::BadConnectionsOption);
                    }
                    o.connections = pairs
                        .chunks_exact(4)
                        .map(|p| (be16(p, 0), be16(p, 2)))
                        .collect();
                } else if be32(data, 0) == VENDOR_ID && data[4] == VENDOR_SIGNATURE {
                    // Last, and the MH ends with its signature: what it covers is then
                    // everything before the last 64 bytes.
                    if next != end {
                        return Err(WireError::SignatureNotLast);
                    }
                    if len != VENDOR_SIGNATURE_LEN
                        || data[5] != SIGNATURE_ED25519
                        || data[6..signature::SIGNED_PREFIX].iter().any(|&b| b != 0)
                    {
                        return Err(WireError::BadSignatureOption);
                    }
                    let mut sig = [0u8; crate::pki::SIGNATURE_LEN];
                    sig.copy_from_slice(&data[signature::SIGNED_PREFIX..]);
                    o.signature = Some(sig);
                    signature_seen = true;
                }
            }
            option::AUTH => {
                aligned(i, 4, 1)?;
                exact(len, AUTH_LEN)?;
                if data[0] != AUTH_MN_HA {
                    return Err(WireError::BadAuthSubtype);
                }
                let mut authenticator = [0u8; AUTHENTICATOR_LEN];
                authenticator.copy_from_slice(&data[5..]);
                o.auth = Some(Auth {
                    spi: be32(data, 1),
                    authenticator,
                });
                auth_at = Some(i);
            }
            // PadN, and options we do not know: skipped (RFC 6275 6.2.1).
            _ => {}
        }
        i = next;
    }
    Ok((o, agents, auth_at))
}

/// One agent of a discovery reply: the vendor option's data (vendor id, sub-type, IPv4
/// address as IPv4-mapped or all zeros, IPv6 address or all zeros, identity).
fn agent_option(data: &[u8]) -> Result<AgentEntry, WireError> {
    let bad = WireError::BadAgentOption;
    if data.len() < VENDOR_AGENT_FIXED + 1 || data.len() > VENDOR_AGENT_FIXED + MAX_AGENT_ID_LEN {
        return Err(bad);
    }
    let v4 = match addr(data, 5) {
        a if a.is_unspecified() => None,
        a => Some(a.to_ipv4_mapped().ok_or(bad)?),
    };
    let v6 = match addr(data, 21) {
        a if a.is_unspecified() => None,
        a if a.to_ipv4_mapped().is_some() => return Err(bad),
        a => Some(a),
    };
    // An all-zero IPv4-mapped address (::ffff:0.0.0.0) is no address either.
    if v4.is_some_and(|a| a.is_unspecified()) || (v4.is_none() && v6.is_none()) {
        return Err(bad);
    }
    let id = std::str::from_utf8(&data[VENDOR_AGENT_FIXED..]).map_err(|_| bad)?;
    Ok(AgentEntry {
        id: id.to_owned(),
        v4,
        v6,
    })
}
