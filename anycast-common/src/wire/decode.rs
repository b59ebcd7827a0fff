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
        _ => return Err(WireError::UnknownMhType),
    };
    if mh.len() < fixed {
        return Err(WireError::MessageTooShort);
    }
    let body = match mh[2] {
        mh_type::BINDING_REFRESH_REQUEST => Body::BindingRefreshRequest,
        mh_type::BINDING_UPDATE => Body::BindingUpdate {
            seq: be16(mh, 6),
            ack: be16(mh, 8) & BU_FLAG_A != 0,
            lifetime: be16(mh, 10),
        },
        mh_type::BINDING_ACK => Body::BindingAck {
            status: mh[6],
            seq: be16(mh, 8),
            lifetime: be16(mh, 10),
        },
        _ => Body::BindingError {
            status: mh[6],
            home: addr(mh, 8),
        },
    };
    let (options, auth_at) = parse_options(mh, fixed)?;
    let msg = Message {
        src,
        dst,
        body,
        options,
    };
    Ok((msg, auth_at))
}

fn parse_options(mh: &[u8], start: usize) -> Result<(Options, Option<usize>), WireError> {
    let end = mh.len();
    let mut o = Options::default();
    let mut auth_at = None;
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
    Ok((o, auth_at))
}
