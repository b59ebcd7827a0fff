//! Binding messages on the wire: how a server registers itself with an agent (issue 3).
//!
//! A server sends the agent a Mobile IPv6 **Binding Update** (RFC 6275) saying "I answer for
//! this anycast address (my home address), reach me at my real address (the alternate care-of
//! address)"; the agent answers with a **Binding Acknowledgement**, and may send a **Binding
//! Refresh Request** or a **Binding Error**. Both sides build and parse these messages only
//! with this module.
//!
//! # Framing (RFC 5555 style: the IPv6 packet inside UDP)
//!
//! The UDP payload (agent port [`DEFAULT_PORT`]) is a complete IPv6 packet:
//!
//! ```text
//! IPv6 header (40 bytes)                     Mobility Header (RFC 6275 6.1.1)
//! +---------------------------------------+  +-----------+----------+---------+----------+
//! | ver 6, traffic class 0, flow label 0  |  | proto 59  | hdr len  | MH type | reserved |
//! | payload length = MH length            |  +-----------+----------+---------+----------+
//! | next header 135, hop limit 255        |  | checksum             | message data ...    |
//! | src, dst                              |  +----------------------+---------------------+
//! +---------------------------------------+  | mobility options ... (total a multiple of 8) |
//!                                            +----------------------------------------------+
//! ```
//!
//! No Home Address destination option and no type 2 routing header. For a BU the inner
//! source is the home address (the anycast address) and the destination the agent; for what
//! the agent sends (BA, BRR, BE) the source is the agent and the destination the home
//! address. The hop limit is 255: the inner packet is never forwarded (RFC 5555 tunnels it in
//! UDP and specifies no inner hop limit), so 255 marks "sent by the UDP peer itself" in the
//! spirit of RFC 5082; decoding does not check it.
//!
//! **IPv4 addresses** (an IPv4 anycast address, an IPv4 agent, an IPv4 real address) are
//! carried as IPv4-mapped IPv6 addresses, `::ffff:a.b.c.d`, everywhere in this protocol: the
//! inner source and destination, the Alternate Care-of Address and the Binding Error's home
//! address. RFC 5555 instead adds IPv4-specific options (IPv4 Home Address, IPv4 Care-of
//! Address); one address type throughout keeps the messages and their authentication
//! uniform. [`to_mapped`] and [`from_mapped`] convert.
//!
//! The checksum is RFC 6275 6.1.1's: the Internet checksum over the IPv6 pseudo-header
//! (source, destination, upper-layer length = MH length, next header 135) and the whole MH.
//!
//! # Messages
//!
//! | MH type | message | data after the 6-byte MH header |
//! | --- | --- | --- |
//! | 0 | Binding Refresh Request | reserved (2) |
//! | 5 | Binding Update | sequence (2), flags A H L K M R P F T + reserved (2), lifetime (2, in 4 s units) |
//! | 6 | Binding Acknowledgement | status (1), K R P flags + reserved (1), sequence (2), lifetime (2) |
//! | 7 | Binding Error | status (1), reserved (1), home address (16) |
//!
//! Our BUs set A (acknowledgement requested, from [`Body::BindingUpdate::ack`]) and H (home
//! registration, always); other flags are zero and ignored when received.
//!
//! # Options
//!
//! Type numbers are IANA's "Mobility Options" registry; each was checked against Wireshark's
//! `packet-mip6.c` (and, for 0-10, scapy's `inet6.py`), and tshark decodes what we send
//! without warnings (`tests/tests/wire_oracles.rs`). Alignment `xn+y` means the option's type
//! byte sits at an offset from the start of the MH that is `y` modulo `x`; Pad1/PadN fill.
//!
//! | type | option | RFC | layout after type and length | alignment |
//! | --- | --- | --- | --- | --- |
//! | 0 | Pad1 | 6275 | (a single byte, no length) | - |
//! | 1 | PadN | 6275 | N-2 zero bytes | - |
//! | 3 | Alternate Care-of Address | 6275 | address (16): the server's real address | 8n+6 |
//! | 8 | Mobile Node Identifier | 4283 | subtype 1 (NAI), identifier (the server's identity) | none |
//! | 9 | Mobility Message Authentication (AUTH) | 4285 | subtype 1 (MN-HA), SPI (4), authenticator (16) | 4n+1, last |
//! | 10 | Mobility Message Replay Protection (MESG-ID) | 4285 | timestamp (8): NTP format | 8n+2 |
//! | 19 | Vendor-Specific Mobility Option | 5094 | vendor id (4), sub-type (1), data | 4n+2 |
//! | 48 | Load Information | 6463 | priority (2), sessions in use, maximum sessions, used capacity, maximum capacity (4 each) | see below |
//!
//! The alignments of Alt-CoA, AUTH and MESG-ID are those RFC 6275 and RFC 4285 give (scapy's
//! option classes record the same); the vendor option's is RFC 5094's. Load Information has
//! length 18 and no reserved field (the layout of Wireshark's
//! dissector, `MIP6_LOAD_INF_LEN` 18); we place it at 4n so its 32-bit fields are aligned,
//! and accept it anywhere. Our vendor option uses vendor id [`VENDOR_ID`] (0, IANA's reserved
//! enterprise number: this protocol is private to the project) and sub-type
//! [`VENDOR_SERVICE`] (1), with data protocol (1) and port (2): the service selector, so a
//! server can bind `ADDR:tcp:80` rather than the whole address. Vendor options with another
//! vendor id or sub-type are skipped, as are unknown option types (RFC 6275 6.2.1).
//!
//! Encoding order: Alt-CoA, MN-ID, MESG-ID, Load Information, vendor, AUTH. The AUTH option
//! MUST be the last option (RFC 4285), so nothing, not even padding, follows it: we place it
//! at 8n+1 (which satisfies 4n+1), and its 23 bytes then end the MH on a multiple of 8.
//!
//! # Authentication
//!
//! The authenticator is HMAC-SHA256 truncated to 128 bits (not RFC 4285's HMAC-SHA1-96),
//! keyed by the secret shared for the SPI, over
//!
//! ```text
//! inner IPv6 source (16) | inner IPv6 destination (16) |
//! MH from its first byte through the AUTH option's SPI, with the checksum field as zero
//! ```
//!
//! RFC 4285 authenticates `care-of address | home agent address | MH`; we bind the two ends of
//! the binding instead (the home address and the agent), and the care-of address travels
//! inside the authenticated MH as the Alternate Care-of Address anyway. The header length
//! field is final before the HMAC is computed, and the checksum is computed last, over the
//! complete MH. [`verify`] compares in constant time.
//!
//! # Validation
//!
//! [`decode`] applies RFC 6275 section 9.2's checks plus bounds checks, and each rejection is a
//! [`WireError`] with a stable [`WireError::reason`] for counters: IPv6 version and next
//! header, payload length equal to the bytes that follow, MH payload proto 59, header length
//! equal to the MH's bytes, checksum, a known MH type long enough for its fixed fields, every
//! option inside the MH, the alignments above (not for Load Information), exact lengths of
//! known options, AUTH last, and at most one of each option (except Pad1, PadN and foreign
//! vendor options). Whether a MESG-ID is fresh, and which options a message must carry, is
//! for the caller to judge.
//!
//! # Seen through tshark 4.0
//!
//! Wireshark 4.0's `mip6` dissector shows these messages without any expert warning, but it
//! displays three fields differently from the RFCs (display only; checked in the oracle
//! test): the MESG-ID timestamp is read as Unix seconds and nanoseconds rather than NTP (so
//! 2024 shows as 2094); the AUTH authenticator and the vendor data are shown 2 bytes short,
//! and an MN-ID of fewer than 3 bytes not at all (its length arithmetic counts the type and
//! length bytes twice); and it names no AUTH subtype 1 (its table is another registry's).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The agent's UDP port for binding messages.
pub const DEFAULT_PORT: u16 = 4191;

/// Binding Acknowledgement status codes (IANA registry; 144-146 are RFC 4285's).
pub mod status {
    pub const ACCEPTED: u8 = 0;
    pub const PROHIBITED: u8 = 129;
    pub const INSUFFICIENT_RESOURCES: u8 = 130;
    pub const SEQUENCE_OUT_OF_WINDOW: u8 = 135;
    /// MIPV6-ID-MISMATCH: the MESG-ID timestamp is outside the accepted window.
    pub const ID_MISMATCH: u8 = 144;
    /// MIPV6-MESG-ID-REQD: a MESG-ID option is required.
    pub const MESG_ID_REQUIRED: u8 = 145;
    /// MIPV6-AUTH-FAIL: the AUTH option is missing or wrong.
    pub const AUTH_FAILED: u8 = 146;
}

/// Mobility Header types (RFC 6275 6.1).
pub mod mh_type {
    pub const BINDING_REFRESH_REQUEST: u8 = 0;
    pub const BINDING_UPDATE: u8 = 5;
    pub const BINDING_ACK: u8 = 6;
    pub const BINDING_ERROR: u8 = 7;
}

/// Mobility option types (IANA "Mobility Options"; see the module doc for their sources).
pub mod option {
    pub const PAD1: u8 = 0;
    pub const PADN: u8 = 1;
    pub const ALT_COA: u8 = 3;
    pub const MN_ID: u8 = 8;
    pub const AUTH: u8 = 9;
    pub const MESG_ID: u8 = 10;
    pub const VENDOR: u8 = 19;
    pub const LOAD_INFO: u8 = 48;
}

/// IPv6 next header value of the Mobility Header.
pub const IPPROTO_MH: u8 = 135;
/// The MH's payload proto: no next header.
pub const IPPROTO_NONE: u8 = 59;
/// Hop limit of the inner IPv6 header we send.
pub const HOP_LIMIT: u8 = 255;
/// MN-ID subtype: Network Access Identifier (RFC 4283).
pub const MN_ID_NAI: u8 = 1;
/// AUTH subtype: MN-HA authentication (RFC 4285).
pub const AUTH_MN_HA: u8 = 1;
/// Vendor id of our vendor-specific option (0: reserved by IANA, never a real vendor).
pub const VENDOR_ID: u32 = 0;
/// Sub-type of our vendor-specific option that carries the [`ServiceSelector`].
pub const VENDOR_SERVICE: u8 = 1;
/// Octets of the truncated HMAC-SHA256 authenticator.
pub const AUTHENTICATOR_LEN: usize = 16;
/// Longest MN-ID identifier: the option length byte counts the subtype too.
pub const MAX_MN_ID_LEN: usize = 254;
/// Binding Update flags (in the 16 bits after the sequence number).
pub const BU_FLAG_A: u16 = 0x8000;
pub const BU_FLAG_H: u16 = 0x4000;

const IPV6_HEADER_LEN: usize = 40;
/// Shortest MH: 8 bytes (header length 0).
const MIN_MH_LEN: usize = 8;
/// Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01).
const NTP_UNIX_OFFSET: i64 = 2_208_988_800;
const ALT_COA_LEN: usize = 16;
const MESG_ID_LEN: usize = 8;
const LOAD_INFO_LEN: usize = 18;
/// Vendor id (4) + sub-type (1) + protocol (1) + port (2).
const VENDOR_SERVICE_LEN: usize = 8;
/// Subtype (1) + SPI (4) + authenticator.
const AUTH_LEN: usize = 5 + AUTHENTICATOR_LEN;

/// A binding message: the inner IPv6 source and destination, the MH body and its options.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub body: Body,
    pub options: Options,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    BindingRefreshRequest,
    /// `lifetime` is in 4-second units; `ack` is the A flag (H is always set).
    BindingUpdate {
        seq: u16,
        ack: bool,
        lifetime: u16,
    },
    /// `lifetime` is in 4-second units.
    BindingAck {
        status: u8,
        seq: u16,
        lifetime: u16,
    },
    BindingError {
        status: u8,
        home: Ipv6Addr,
    },
}

impl Body {
    /// The MH type of this body.
    pub fn mh_type(&self) -> u8 {
        match self {
            Body::BindingRefreshRequest => mh_type::BINDING_REFRESH_REQUEST,
            Body::BindingUpdate { .. } => mh_type::BINDING_UPDATE,
            Body::BindingAck { .. } => mh_type::BINDING_ACK,
            Body::BindingError { .. } => mh_type::BINDING_ERROR,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Options {
    /// Alternate Care-of Address: the server's real address.
    pub alt_coa: Option<Ipv6Addr>,
    /// Mobile Node Identifier (NAI): the server's identity, 1 to [`MAX_MN_ID_LEN`] bytes.
    pub mn_id: Option<String>,
    /// MESG-ID: an NTP-format timestamp (see [`ntp_now`]).
    pub mesg_id: Option<u64>,
    pub load: Option<LoadInfo>,
    pub service: Option<ServiceSelector>,
    /// Set by decode; ignored by encode (encode computes it from the key).
    pub auth: Option<Auth>,
}

/// The Load Information option (RFC 6463).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LoadInfo {
    pub priority: u16,
    pub sessions_in_use: u32,
    pub max_sessions: u32,
    pub used_capacity: u32,
    pub max_capacity: u32,
}

/// The service a binding is for: IP protocol and port (0: every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSelector {
    pub protocol: u8,
    pub port: u16,
}

/// The AUTH option as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Auth {
    pub spi: u32,
    pub authenticator: [u8; 16],
}

/// A shared secret and the SPI that names it.
#[derive(Clone, Copy)]
pub struct Key<'a> {
    pub spi: u32,
    pub secret: &'a [u8],
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Key")
            .field("spi", &self.spi)
            .finish_non_exhaustive()
    }
}

/// Why a message cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The MN-ID identifier is empty.
    EmptyMnId,
    /// The MN-ID identifier is longer than [`MAX_MN_ID_LEN`] bytes.
    MnIdTooLong(usize),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::EmptyMnId => write!(f, "the mobile node identifier is empty"),
            EncodeError::MnIdTooLong(n) => write!(
                f,
                "the mobile node identifier has {n} bytes, more than {MAX_MN_ID_LEN}"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// Why a payload was rejected. [`WireError::reason`] names each for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireError {
    /// Shorter than an IPv6 header and the shortest MH (48 bytes).
    Truncated,
    /// The IPv6 version is not 6.
    BadIpVersion,
    /// The IPv6 next header is not 135 (MH).
    BadNextHeader,
    /// The IPv6 payload length differs from the bytes after the IPv6 header.
    BadPayloadLength,
    /// The MH payload proto is not 59 (no next header).
    BadPayloadProto,
    /// The MH header length differs from the MH's bytes.
    BadHeaderLength,
    BadChecksum,
    /// An MH type other than BRR, BU, BA and BE.
    UnknownMhType,
    /// The MH is too short for its type's fixed fields.
    MessageTooShort,
    /// An option runs past the end of the MH.
    OptionTruncated,
    /// An option is not at its required alignment.
    BadAlignment,
    /// A known option has a length other than its own.
    BadOptionLength,
    /// An option appears twice.
    DuplicateOption,
    /// Something follows the AUTH option.
    AuthNotLast,
    /// The MN-ID subtype is not NAI, or the identifier is not UTF-8.
    BadMnId,
    /// The AUTH subtype is not MN-HA.
    BadAuthSubtype,
}

impl WireError {
    /// Every variant, in declaration order.
    pub const ALL: [WireError; 16] = [
        WireError::Truncated,
        WireError::BadIpVersion,
        WireError::BadNextHeader,
        WireError::BadPayloadLength,
        WireError::BadPayloadProto,
        WireError::BadHeaderLength,
        WireError::BadChecksum,
        WireError::UnknownMhType,
        WireError::MessageTooShort,
        WireError::OptionTruncated,
        WireError::BadAlignment,
        WireError::BadOptionLength,
        WireError::DuplicateOption,
        WireError::AuthNotLast,
        WireError::BadMnId,
        WireError::BadAuthSubtype,
    ];

    /// A stable snake_case name, for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            WireError::Truncated => "truncated",
            WireError::BadIpVersion => "bad_ip_version",
            WireError::BadNextHeader => "bad_next_header",
            WireError::BadPayloadLength => "bad_payload_length",
            WireError::BadPayloadProto => "bad_payload_proto",
            WireError::BadHeaderLength => "bad_header_length",
            WireError::BadChecksum => "bad_checksum",
            WireError::UnknownMhType => "unknown_mh_type",
            WireError::MessageTooShort => "message_too_short",
            WireError::OptionTruncated => "option_truncated",
            WireError::BadAlignment => "bad_alignment",
            WireError::BadOptionLength => "bad_option_length",
            WireError::DuplicateOption => "duplicate_option",
            WireError::AuthNotLast => "auth_not_last",
            WireError::BadMnId => "bad_mn_id",
            WireError::BadAuthSubtype => "bad_auth_subtype",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            WireError::Truncated => "shorter than an IPv6 header and a mobility header",
            WireError::BadIpVersion => "IP version is not 6",
            WireError::BadNextHeader => "IPv6 next header is not the mobility header (135)",
            WireError::BadPayloadLength => "IPv6 payload length differs from the bytes received",
            WireError::BadPayloadProto => "mobility header payload proto is not 59",
            WireError::BadHeaderLength => "mobility header length differs from its bytes",
            WireError::BadChecksum => "mobility header checksum is wrong",
            WireError::UnknownMhType => "unknown mobility header type",
            WireError::MessageTooShort => "mobility header too short for its type",
            WireError::OptionTruncated => "a mobility option runs past the mobility header",
            WireError::BadAlignment => "a mobility option is misaligned",
            WireError::BadOptionLength => "a mobility option has the wrong length",
            WireError::DuplicateOption => "a mobility option appears more than once",
            WireError::AuthNotLast => "the authentication option is not the last option",
            WireError::BadMnId => "the mobile node identifier is not a UTF-8 NAI",
            WireError::BadAuthSubtype => "the authentication option is not MN-HA",
        };
        write!(f, "{text} ({})", self.reason())
    }
}

impl std::error::Error for WireError {}

type HmacSha256 = Hmac<Sha256>;

/// IPv4 -> `::ffff:a.b.c.d`; IPv6 unchanged.
pub fn to_mapped(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// `::ffff:a.b.c.d` -> IPv4; any other address stays IPv6.
pub fn from_mapped(a: Ipv6Addr) -> IpAddr {
    match a.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(a),
    }
}

/// The MESG-ID timestamp of the current time: NTP format, seconds since 1900 (modulo 2^32,
/// RFC 4330's eras) in the high 32 bits and the fraction of a second in the low 32 bits.
pub fn ntp_now() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = (now.as_secs() as i64 + NTP_UNIX_OFFSET) as u64 & 0xffff_ffff;
    let frac = (u64::from(now.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// Unix seconds of a MESG-ID timestamp (the fraction dropped). Following RFC 4330, seconds
/// with the top bit clear are in era 1 (from 2036-02-07 on), so the conversion keeps working
/// across the 2036 rollover for dates between 1968 and 2104.
pub fn ntp_to_unix_secs(ts: u64) -> i64 {
    let secs = (ts >> 32) as i64;
    let secs = if secs < 0x8000_0000 {
        secs + (1 << 32)
    } else {
        secs
    };
    secs - NTP_UNIX_OFFSET
}

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
    let mut mh = Vec::with_capacity(128);
    // Payload proto, header length (set below), MH type, reserved, checksum (set last).
    mh.extend_from_slice(&[IPPROTO_NONE, 0, msg.body.mh_type(), 0, 0, 0]);
    match msg.body {
        Body::BindingRefreshRequest => mh.extend_from_slice(&[0, 0]),
        Body::BindingUpdate { seq, ack, lifetime } => {
            let flags = BU_FLAG_H | if ack { BU_FLAG_A } else { 0 };
            mh.extend_from_slice(&seq.to_be_bytes());
            mh.extend_from_slice(&flags.to_be_bytes());
            mh.extend_from_slice(&lifetime.to_be_bytes());
        }
        Body::BindingAck {
            status,
            seq,
            lifetime,
        } => {
            mh.extend_from_slice(&[status, 0]);
            mh.extend_from_slice(&seq.to_be_bytes());
            mh.extend_from_slice(&lifetime.to_be_bytes());
        }
        Body::BindingError { status, home } => {
            mh.extend_from_slice(&[status, 0]);
            mh.extend_from_slice(&home.octets());
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
    match key {
        Some(key) => {
            // At 8n+1, so the option (2 + AUTH_LEN = 23 bytes) ends the MH on a multiple of 8.
            pad_to(&mut mh, 8, 1);
            mh.extend_from_slice(&[option::AUTH, AUTH_LEN as u8, AUTH_MN_HA]);
            mh.extend_from_slice(&key.spi.to_be_bytes());
            let total = mh.len() + AUTHENTICATOR_LEN;
            set_header_len(&mut mh, total);
            let tag = authenticator(&msg.src, &msg.dst, &mh, key.secret);
            mh.extend_from_slice(&tag);
        }
        None => {
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

/// Parses and validates a UDP payload (does not check AUTH: that needs the key, see `verify`).
pub fn decode(payload: &[u8]) -> Result<Message, WireError> {
    parse(payload).map(|(msg, _)| msg)
}

/// True if the payload's AUTH option is present, last, and correct for `key` (spi and HMAC).
/// The payload must also pass [`decode`]'s checks, checksum included.
pub fn verify(payload: &[u8], key: Key) -> bool {
    let Ok((msg, Some(auth_at))) = parse(payload) else {
        return false;
    };
    let Some(auth) = msg.options.auth else {
        return false;
    };
    if auth.spi != key.spi {
        return false;
    }
    let mh = &payload[IPV6_HEADER_LEN..];
    // Through the SPI: type, length, subtype, SPI.
    let covered = &mh[..auth_at + 7];
    let mut mac = new_mac(key.secret);
    feed_mac(&mut mac, &msg.src, &msg.dst, covered);
    // Constant time: hmac compares through `subtle`.
    mac.verify_truncated_left(&auth.authenticator).is_ok()
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
/// our largest message is well under 400).
fn set_header_len(mh: &mut [u8], total: usize) {
    debug_assert!(total.is_multiple_of(8) && total <= 2048);
    mh[1] = (total / 8 - 1) as u8;
}

fn new_mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts any key length")
}

/// Feeds the authenticated data: src, dst, and `mh_prefix` with its checksum field as zero.
fn feed_mac(mac: &mut HmacSha256, src: &Ipv6Addr, dst: &Ipv6Addr, mh_prefix: &[u8]) {
    mac.update(&src.octets());
    mac.update(&dst.octets());
    mac.update(&mh_prefix[..4]);
    mac.update(&[0, 0]);
    mac.update(&mh_prefix[6..]);
}

fn authenticator(
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    mh_prefix: &[u8],
    secret: &[u8],
) -> [u8; AUTHENTICATOR_LEN] {
    let mut mac = new_mac(secret);
    feed_mac(&mut mac, src, dst, mh_prefix);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; AUTHENTICATOR_LEN];
    tag.copy_from_slice(&full[..AUTHENTICATOR_LEN]);
    tag
}

/// The Internet checksum of the IPv6 pseudo-header (next header 135) and `mh`: the value to
/// put in the checksum field when that field is zero, or 0 when `mh` already holds a correct
/// checksum.
fn checksum(src: &Ipv6Addr, dst: &Ipv6Addr, mh: &[u8]) -> u16 {
    fn add(sum: &mut u64, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            *sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            *sum += u64::from(u16::from_be_bytes([*last, 0]));
        }
    }
    let mut sum = 0u64;
    add(&mut sum, &src.octets());
    add(&mut sum, &dst.octets());
    add(&mut sum, &(mh.len() as u32).to_be_bytes());
    add(&mut sum, &[0, 0, 0, IPPROTO_MH]);
    add(&mut sum, mh);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn addr(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// Decodes and validates; also returns the AUTH option's offset in the MH, if present.
fn parse(payload: &[u8]) -> Result<(Message, Option<usize>), WireError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    const SECRET: &[u8] = b"a shared secret of some length";
    const KEY: Key = Key {
        spi: 0x0102_0304,
        secret: SECRET,
    };

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn mapped(s: &str) -> Ipv6Addr {
        to_mapped(IpAddr::V4(s.parse::<Ipv4Addr>().unwrap()))
    }

    fn bodies(home: Ipv6Addr) -> Vec<Body> {
        vec![
            Body::BindingRefreshRequest,
            Body::BindingUpdate {
                seq: 0xbeef,
                ack: true,
                lifetime: 75,
            },
            Body::BindingUpdate {
                seq: 0,
                ack: false,
                lifetime: 0,
            },
            Body::BindingAck {
                status: status::AUTH_FAILED,
                seq: 65535,
                lifetime: 0x1234,
            },
            Body::BindingError { status: 1, home },
        ]
    }

    /// Every subset of the five options we encode (AUTH comes from the key).
    fn option_sets(coa: Ipv6Addr) -> Vec<Options> {
        (0..32u32)
            .map(|bits| Options {
                alt_coa: (bits & 1 != 0).then_some(coa),
                mn_id: (bits & 2 != 0).then(|| "server-17@anycast.example".to_owned()),
                mesg_id: (bits & 4 != 0).then_some(0xe9a1_b2c3_8000_0000),
                load: (bits & 8 != 0).then_some(LoadInfo {
                    priority: 7,
                    sessions_in_use: 1,
                    max_sessions: 0xffff_fffe,
                    used_capacity: 300,
                    max_capacity: 1000,
                }),
                service: (bits & 16 != 0).then_some(ServiceSelector {
                    protocol: 6,
                    port: 443,
                }),
                auth: None,
            })
            .collect()
    }

    /// (home/anycast, agent, real address) triples: IPv6 and IPv4-mapped.
    fn address_sets() -> Vec<(Ipv6Addr, Ipv6Addr, Ipv6Addr)> {
        vec![
            (v6("fd71:100::1"), v6("fd71:1::2"), v6("fd71:2::11")),
            (
                mapped("10.71.100.1"),
                mapped("10.71.1.2"),
                mapped("10.71.2.11"),
            ),
            (mapped("10.71.100.1"), v6("fd71:1::2"), v6("fd71:2::11")),
        ]
    }

    /// Offsets (from the MH start) and types of the options, found by walking the bytes here,
    /// independently of `parse_options`.
    fn walk_options(payload: &[u8]) -> Vec<(usize, u8)> {
        let mh = &payload[40..];
        let start = match mh[2] {
            0 => 8,
            5 | 6 => 12,
            7 => 24,
            t => panic!("type {t}"),
        };
        let mut out = Vec::new();
        let mut i = start;
        while i < mh.len() {
            out.push((i, mh[i]));
            i += if mh[i] == 0 {
                1
            } else {
                2 + mh[i + 1] as usize
            };
        }
        assert_eq!(i, mh.len(), "options end exactly at the MH end");
        out
    }

    #[test]
    fn round_trip_every_type_and_option_set() {
        let mut count = 0;
        for (home, agent, real) in address_sets() {
            for body in bodies(home) {
                for options in option_sets(real) {
                    for key in [None, Some(KEY)] {
                        // BU from the home address to the agent, the rest the other way.
                        let (src, dst) = match body {
                            Body::BindingUpdate { .. } => (home, agent),
                            _ => (agent, home),
                        };
                        let msg = Message {
                            src,
                            dst,
                            body: body.clone(),
                            options: options.clone(),
                        };
                        let bytes = encode(&msg, key);
                        assert_eq!(bytes.len() % 8, 0);
                        assert_eq!((usize::from(bytes[41]) + 1) * 8, bytes.len() - 40);
                        let got = decode(&bytes).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
                        let mut want = msg.clone();
                        if key.is_some() {
                            let auth = got.options.auth.expect("auth decoded");
                            assert_eq!(auth.spi, KEY.spi);
                            want.options.auth = Some(auth);
                            assert!(verify(&bytes, KEY));
                        } else {
                            assert!(!verify(&bytes, KEY));
                        }
                        assert_eq!(got, want);
                        // The auth field is ignored by encode.
                        assert_eq!(encode(&want, key), bytes);
                        count += 1;
                    }
                }
            }
        }
        assert_eq!(count, 3 * 5 * 32 * 2);
    }

    #[test]
    fn bu_flags_and_header_fields() {
        let msg = Message {
            src: mapped("10.0.0.1"),
            dst: mapped("10.0.0.2"),
            body: Body::BindingUpdate {
                seq: 1,
                ack: true,
                lifetime: 16,
            },
            options: Options::default(),
        };
        let b = encode(&msg, None);
        assert_eq!(
            &b[..4],
            &[0x60, 0, 0, 0],
            "version 6, no class, no flow label"
        );
        assert_eq!(be16(&b, 4), 16, "payload length");
        assert_eq!((b[6], b[7]), (135, 255), "next header MH, hop limit 255");
        assert_eq!(&b[40..44], &[59, 1, 5, 0]);
        assert_eq!(be16(&b, 48), 0xc000, "A and H");
        let no_ack = Body::BindingUpdate {
            seq: 1,
            ack: false,
            lifetime: 16,
        };
        let b = encode(
            &Message {
                body: no_ack,
                ..msg
            },
            None,
        );
        assert_eq!(be16(&b, 48), 0x4000, "H only");
    }

    #[test]
    fn checksum_known_answers() {
        // BRR from ::1 to ::2, no options. By hand, 16-bit words of:
        //   pseudo-header: src ::1 -> 0x0001; dst ::2 -> 0x0002; length 8 -> 0x0000 0x0008;
        //                  zero + next header -> 0x0000 0x0087
        //   MH: 3b00 (proto 59, hlen 0), 0000 (type 0, reserved), checksum 0000, 0000
        //   sum = 0x0001 + 0x0002 + 0x0008 + 0x0087 + 0x3b00 = 0x3b92; !0x3b92 = 0xc46d
        let msg = Message {
            src: v6("::1"),
            dst: v6("::2"),
            body: Body::BindingRefreshRequest,
            options: Options::default(),
        };
        let mut want = vec![0x60, 0, 0, 0, 0, 8, 135, 255];
        want.extend_from_slice(&v6("::1").octets());
        want.extend_from_slice(&v6("::2").octets());
        want.extend_from_slice(&[0x3b, 0, 0, 0, 0xc4, 0x6d, 0, 0]);
        assert_eq!(encode(&msg, None), want);

        // BU seq 1, A|H, lifetime 16, from ::ffff:10.0.0.1 to ::ffff:10.0.0.2, no options:
        //   src words ffff 0a00 0001 -> 0x10a00; dst ffff 0a00 0002 -> 0x10a01;
        //   length 16 -> 0x0010; next header 0x0087;
        //   MH 3b01 0500 [cksum] 0001 c000 0010, then PadN of 4: 0102 0000 -> 0x10114
        //   total 0x315ac -> fold 0x15ac + 0x3 = 0x15af; !0x15af = 0xea50
        let msg = Message {
            src: mapped("10.0.0.1"),
            dst: mapped("10.0.0.2"),
            body: Body::BindingUpdate {
                seq: 1,
                ack: true,
                lifetime: 16,
            },
            options: Options::default(),
        };
        let b = encode(&msg, None);
        assert_eq!(
            &b[40..],
            &[0x3b, 1, 5, 0, 0xea, 0x50, 0, 1, 0xc0, 0, 0, 0x10, 1, 2, 0, 0]
        );

        // Any single flipped bit of the MH or of the addresses is a bad checksum (except the
        // MH's first two bytes, whose own checks come first).
        for byte in (8..40).chain(42..b.len()) {
            for bit in 0..8 {
                let mut m = b.clone();
                m[byte] ^= 1 << bit;
                assert_eq!(
                    decode(&m),
                    Err(WireError::BadChecksum),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn alignment_and_padding() {
        for n in 1..=40 {
            let id: String = "abcdefghijklmnopqrstuvwxyz0123456789.-@_"
                .chars()
                .take(n)
                .collect();
            for options in option_sets(v6("2001:db8::5")) {
                let options = Options {
                    mn_id: options.mn_id.map(|_| id.clone()),
                    ..options
                };
                for body in bodies(v6("2001:db8::1")) {
                    for key in [None, Some(KEY)] {
                        let msg = Message {
                            src: v6("2001:db8::1"),
                            dst: v6("2001:db8::2"),
                            body: body.clone(),
                            options: options.clone(),
                        };
                        let b = encode(&msg, key);
                        let mh_len = b.len() - 40;
                        assert_eq!(mh_len % 8, 0);
                        let walked = walk_options(&b);
                        for (i, &(at, kind)) in walked.iter().enumerate() {
                            match kind {
                                option::ALT_COA => assert_eq!(at % 8, 6),
                                option::MESG_ID => assert_eq!(at % 8, 2),
                                option::VENDOR => assert_eq!(at % 4, 2),
                                option::LOAD_INFO => assert_eq!(at % 4, 0),
                                option::AUTH => {
                                    assert_eq!(at % 8, 1);
                                    assert_eq!(i, walked.len() - 1, "AUTH last");
                                    assert_eq!(at + 23, mh_len, "nothing after AUTH");
                                }
                                option::PAD1 | option::PADN | option::MN_ID => {}
                                other => panic!("unexpected option {other}"),
                            }
                        }
                        // Padding is never longer than needed: at most 7 bytes in a row.
                        let mut run = 0;
                        for &(at, kind) in &walked {
                            run = match kind {
                                option::PAD1 => run + 1,
                                option::PADN => run + 2 + b[40 + at + 1] as usize,
                                _ => 0,
                            };
                            assert!(run <= 7, "padding run {run} in {walked:?}");
                        }
                        assert!(decode(&b).is_ok());
                    }
                }
            }
        }
    }

    fn full_bu() -> Message {
        Message {
            src: mapped("192.0.2.10"),
            dst: v6("2001:db8::a"),
            body: Body::BindingUpdate {
                seq: 42,
                ack: true,
                lifetime: 30,
            },
            options: option_sets(v6("2001:db8::99"))[31].clone(),
        }
    }

    /// Rewrites the IPv6 payload length, MH header length and checksum after an edit.
    fn fix_up(b: &mut [u8]) {
        let mh_len = b.len() - 40;
        b[4..6].copy_from_slice(&(mh_len as u16).to_be_bytes());
        if mh_len >= 8 {
            b[41] = (mh_len / 8).saturating_sub(1) as u8;
        }
        if mh_len >= 6 {
            b[44] = 0;
            b[45] = 0;
            let sum = checksum(&addr(b, 8), &addr(b, 24), &b[40..]);
            b[44..46].copy_from_slice(&sum.to_be_bytes());
        }
    }

    #[test]
    fn auth_verify() {
        let msg = full_bu();
        let b = encode(&msg, Some(KEY));
        assert!(verify(&b, KEY));
        let other_secret = Key {
            spi: KEY.spi,
            secret: b"another secret",
        };
        assert!(!verify(&b, other_secret));
        let other_spi = Key {
            spi: KEY.spi + 1,
            secret: SECRET,
        };
        assert!(!verify(&b, other_spi));
        let empty = Key {
            spi: KEY.spi,
            secret: b"",
        };
        assert!(!verify(&b, empty));
        // Any single flipped byte of the inner addresses or the MH, checksum included.
        for i in 8..b.len() {
            let mut m = b.clone();
            m[i] ^= 0xff;
            assert!(!verify(&m, KEY), "flipped byte {i}");
            // Even with the checksum made right again, the HMAC catches it (fix_up rewrites
            // the header length and the checksum field, hence skipped here).
            if i != 41 && !(44..46).contains(&i) {
                fix_up(&mut m);
                assert!(!verify(&m, KEY), "flipped byte {i}, checksum fixed");
            }
        }
        // A different home address with the same options.
        let moved = Message {
            src: mapped("192.0.2.11"),
            ..msg.clone()
        };
        let m = encode(&moved, Some(KEY));
        let mut spliced = b.clone();
        spliced[40..].copy_from_slice(&m[40..]);
        assert!(!verify(&spliced, KEY));
    }

    #[test]
    fn auth_must_be_last() {
        let b = encode(&full_bu(), Some(KEY));
        // Append a PadN of 8 bytes after the AUTH option.
        let mut m = b.clone();
        m.extend_from_slice(&[1, 6, 0, 0, 0, 0, 0, 0]);
        fix_up(&mut m);
        assert_eq!(decode(&m), Err(WireError::AuthNotLast));
        assert!(!verify(&m, KEY));
        // Pad1s after it.
        let mut m = b.clone();
        m.extend_from_slice(&[0; 8]);
        fix_up(&mut m);
        assert_eq!(decode(&m), Err(WireError::AuthNotLast));
        // An AUTH option before the others, with the padding rearranged to keep alignment.
        let walked = walk_options(&b);
        let (auth_at, _) = *walked.last().unwrap();
        let opts_start = walked[0].0;
        let mh = &b[40..];
        let mut new_mh = mh[..opts_start].to_vec(); // fixed part, 12 bytes
        new_mh.push(option::PAD1); // AUTH at 13 = 4n+1
        new_mh.extend_from_slice(&mh[auth_at..]);
        new_mh.extend_from_slice(&mh[opts_start..auth_at]);
        // Pad the tail with PadN so the length is a multiple of 8 again; the alignment of
        // later options is off, but AuthNotLast is checked first.
        while !new_mh.len().is_multiple_of(8) {
            new_mh.push(option::PAD1);
        }
        let mut m = b[..40].to_vec();
        m.extend_from_slice(&new_mh);
        fix_up(&mut m);
        assert_eq!(decode(&m), Err(WireError::AuthNotLast));
        assert!(!verify(&m, KEY));
    }

    /// Builds an MH with the given fixed part and option bytes (padded to 8 with Pad1s), and
    /// returns the complete payload with correct lengths and checksum.
    fn craft(fixed: &[u8], options: &[u8]) -> Vec<u8> {
        let mut b = vec![0x60, 0, 0, 0, 0, 0, 135, 255];
        b.extend_from_slice(&v6("2001:db8::1").octets());
        b.extend_from_slice(&v6("2001:db8::2").octets());
        b.extend_from_slice(fixed);
        b.extend_from_slice(options);
        while !(b.len() - 40).is_multiple_of(8) {
            b.push(0);
        }
        fix_up(&mut b);
        b
    }

    const BU_FIXED: [u8; 12] = [59, 0, 5, 0, 0, 0, 0, 1, 0xc0, 0, 0, 1];

    #[test]
    fn option_rejections() {
        let coa = v6("2001:db8::5").octets();
        let ok = |opts: &[u8]| decode(&craft(&BU_FIXED, opts));
        // Alt-CoA at 12 + 2 = 14 = 8n+6: fine; at 12 (8n+4): misaligned.
        let mut good = vec![1, 0];
        good.extend_from_slice(&[3, 16]);
        good.extend_from_slice(&coa);
        assert_eq!(ok(&good).unwrap().options.alt_coa, Some(v6("2001:db8::5")));
        let mut bad = vec![3, 16];
        bad.extend_from_slice(&coa);
        assert_eq!(ok(&bad), Err(WireError::BadAlignment));
        // Wrong length of a known option.
        let mut bad = vec![1, 0, 3, 15];
        bad.extend_from_slice(&coa[..15]);
        assert_eq!(ok(&bad), Err(WireError::BadOptionLength));
        // Twice.
        let mut twice = good.clone(); // ends at 32
        twice.extend_from_slice(&[1, 4, 0, 0, 0, 0, 3, 16]); // the second one at 38 = 8n+6
        twice.extend_from_slice(&coa);
        assert_eq!(ok(&twice), Err(WireError::DuplicateOption));
        // Running past the end: a PadN claiming 200 bytes.
        assert_eq!(ok(&[1, 200]), Err(WireError::OptionTruncated));
        // MN-ID with another subtype, or not UTF-8.
        assert_eq!(ok(&[8, 3, 2, b'a', b'b']), Err(WireError::BadMnId));
        assert_eq!(ok(&[8, 3, 1, 0xff, 0xfe]), Err(WireError::BadMnId));
        assert_eq!(ok(&[8, 1, 1]), Err(WireError::BadOptionLength));
        // MESG-ID at 12+2 = 14: not 8n+2.
        assert_eq!(
            ok(&[1, 0, 10, 8, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(WireError::BadAlignment)
        );
        // AUTH with subtype 2 (MN-AAA), at 12+1 = 13 = 4n+1.
        let mut auth = vec![0, 9, 21, 2, 0, 0, 0, 1];
        auth.extend_from_slice(&[0; 16]);
        assert_eq!(ok(&auth), Err(WireError::BadAuthSubtype));
        // Unknown options and foreign vendor options are skipped.
        let skipped = [
            77, 2, 0xaa, 0xbb, // unknown type 77
            19, 6, 0, 0, 0x7f, 0xff, 1, 9, // vendor 32767 at 16 = 4n (not ours: no alignment)
        ];
        // Vendor options must be at 4n+2 whoever the vendor is: shift by 2 with a PadN.
        let mut shifted = vec![1, 0];
        shifted.extend_from_slice(&skipped);
        let got = ok(&shifted).unwrap();
        assert_eq!(got.options, Options::default());
        assert_eq!(ok(&skipped), Err(WireError::BadAlignment));
        // Our vendor sub-type with a wrong length.
        assert_eq!(
            ok(&[1, 0, 19, 7, 0, 0, 0, 0, 1, 6, 0]),
            Err(WireError::BadOptionLength)
        );
        // Load information: exact length, anywhere.
        let mut load = vec![48, 18];
        load.extend_from_slice(&[0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5]);
        let got = ok(&load).unwrap();
        assert_eq!(
            got.options.load,
            Some(LoadInfo {
                priority: 1,
                sessions_in_use: 2,
                max_sessions: 3,
                used_capacity: 4,
                max_capacity: 5
            })
        );
    }

    #[test]
    fn header_rejections() {
        let b = encode(&full_bu(), Some(KEY));
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut m = b.clone();
            f(&mut m);
            decode(&m)
        };
        assert_eq!(edit(&|m| m.truncate(47)), Err(WireError::Truncated));
        assert_eq!(edit(&|m| m[0] = 0x40), Err(WireError::BadIpVersion));
        assert_eq!(edit(&|m| m[6] = 17), Err(WireError::BadNextHeader));
        assert_eq!(edit(&|m| m.push(0)), Err(WireError::BadPayloadLength));
        assert_eq!(
            edit(&|m| m.truncate(m.len() - 8)),
            Err(WireError::BadPayloadLength)
        );
        assert_eq!(edit(&|m| m[40] = 6), Err(WireError::BadPayloadProto));
        assert_eq!(edit(&|m| m[41] += 1), Err(WireError::BadHeaderLength));
        assert_eq!(edit(&|m| m[45] ^= 1), Err(WireError::BadChecksum));
        assert_eq!(
            edit(&|m| {
                m[42] = 1; // Home Test Init: not ours
                fix_up(m);
            }),
            Err(WireError::UnknownMhType)
        );
        // A BE needs 24 bytes of MH; 16 is too short.
        let short_be = craft(&[59, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(decode(&short_be), Err(WireError::MessageTooShort));
        // Traffic class, flow label and hop limit are not checked.
        assert!(edit(&|m| {
            m[1] = 0xff;
            m[7] = 1;
        })
        .is_ok());
    }

    #[test]
    fn reasons_are_distinct_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for e in WireError::ALL {
            let r = e.reason();
            assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
            assert!(seen.insert(r), "{r} twice");
            assert!(e.to_string().contains(r));
        }
    }

    #[test]
    fn mn_id_limits() {
        let mut msg = full_bu();
        msg.options.mn_id = Some("x".repeat(MAX_MN_ID_LEN));
        let b = encode(&msg, Some(KEY));
        assert_eq!(decode(&b).unwrap().options.mn_id, msg.options.mn_id);
        msg.options.mn_id = Some("x".repeat(MAX_MN_ID_LEN + 1));
        assert_eq!(
            try_encode(&msg, None),
            Err(EncodeError::MnIdTooLong(MAX_MN_ID_LEN + 1))
        );
        msg.options.mn_id = Some(String::new());
        assert_eq!(try_encode(&msg, None), Err(EncodeError::EmptyMnId));
        // Multi-byte UTF-8 survives.
        msg.options.mn_id = Some("serveur-é-東京".to_owned());
        assert_eq!(
            decode(&encode(&msg, None)).unwrap().options.mn_id,
            msg.options.mn_id
        );
    }

    #[test]
    fn mapped_addresses() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 71, 100, 1));
        assert_eq!(to_mapped(v4), v6("::ffff:10.71.100.1"));
        assert_eq!(from_mapped(to_mapped(v4)), v4);
        let a = IpAddr::V6(v6("fd71::1"));
        assert_eq!(to_mapped(a), v6("fd71::1"));
        assert_eq!(from_mapped(v6("fd71::1")), a);
        // IPv4-compatible (deprecated) addresses stay IPv6.
        assert_eq!(from_mapped(v6("::10.0.0.1")), IpAddr::V6(v6("::10.0.0.1")));
    }

    #[test]
    fn ntp_timestamps() {
        // 2024-01-01T00:00:00Z = Unix 1704067200 = NTP 3913056000.
        assert_eq!(ntp_to_unix_secs(3_913_056_000u64 << 32), 1_704_067_200);
        assert_eq!(
            ntp_to_unix_secs((3_913_056_000u64 << 32) | 0xffff_ffff),
            1_704_067_200
        );
        // The Unix epoch.
        assert_eq!(ntp_to_unix_secs(2_208_988_800u64 << 32), 0);
        // Era 1: NTP second 1 is 2036-02-07T06:28:17Z = Unix 2085978497.
        assert_eq!(ntp_to_unix_secs(1u64 << 32), 2_085_978_497);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let got = ntp_to_unix_secs(ntp_now());
        assert!((got - unix_now).abs() <= 1, "{got} vs {unix_now}");
    }

    // -----------------------------------------------------------------------------------------
    // Fuzz-style property test: a fixed-seed xorshift PRNG, no extra crate.

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    fn random_message(rng: &mut Rng) -> (Message, Option<Key<'static>>) {
        let addrs = address_sets();
        let (home, agent, real) = addrs[rng.below(addrs.len())];
        let body = bodies(home)[rng.below(5)].clone();
        let mut options = option_sets(real)[rng.below(32)].clone();
        if options.mn_id.is_some() {
            let n = 1 + rng.below(60);
            options.mn_id = Some((0..n).map(|_| (b'a' + rng.byte() % 26) as char).collect());
        }
        let key = (rng.below(2) == 0).then_some(KEY);
        let (src, dst) = if matches!(body, Body::BindingUpdate { .. }) {
            (home, agent)
        } else {
            (agent, home)
        };
        let msg = Message {
            src,
            dst,
            body,
            options,
        };
        (msg, key)
    }

    /// What a mutation did, and (for some) the only acceptable outcome.
    fn mutate(rng: &mut Rng, b: &mut Vec<u8>) -> (&'static str, Option<Result<(), WireError>>) {
        match rng.below(11) {
            0 => {
                // One bit of the MH checksum field.
                b[44 + rng.below(2)] ^= 1 << rng.below(8);
                ("checksum_bit", Some(Err(WireError::BadChecksum)))
            }
            1 => {
                // One bit anywhere from the addresses on, except the MH's first two bytes.
                let at = loop {
                    let at = 8 + rng.below(b.len() - 8);
                    if at != 40 && at != 41 {
                        break at;
                    }
                };
                b[at] ^= 1 << rng.below(8);
                ("covered_bit", Some(Err(WireError::BadChecksum)))
            }
            2 => {
                // Truncation.
                let n = rng.below(b.len());
                b.truncate(n);
                let want = if n < 48 {
                    WireError::Truncated
                } else {
                    WireError::BadPayloadLength
                };
                ("truncate", Some(Err(want)))
            }
            3 => {
                // Extension with random bytes.
                for _ in 0..1 + rng.below(24) {
                    b.push(rng.byte());
                }
                ("extend", Some(Err(WireError::BadPayloadLength)))
            }
            4 => {
                // IPv6 payload length edit.
                let old = be16(b, 4);
                let new = loop {
                    let v = rng.next() as u16;
                    if v != old {
                        break v;
                    }
                };
                b[4..6].copy_from_slice(&new.to_be_bytes());
                ("payload_length", Some(Err(WireError::BadPayloadLength)))
            }
            5 => {
                // MH header length edit.
                let old = b[41];
                b[41] = loop {
                    let v = rng.byte();
                    if v != old {
                        break v;
                    }
                };
                ("header_length", Some(Err(WireError::BadHeaderLength)))
            }
            6 => {
                // Random bytes of the MH after its header, then lengths and checksum made
                // right: reaches the option parser.
                for _ in 0..1 + rng.below(4) {
                    let at = 46 + rng.below(b.len() - 46);
                    b[at] = rng.byte();
                }
                fix_up(b);
                ("fixed_byte_edit", None)
            }
            7 => {
                // Insert or remove 8 bytes after the MH header, fix up.
                let at = 48 + rng.below(b.len() - 47);
                if rng.below(2) == 0 {
                    let junk: Vec<u8> = (0..8).map(|_| rng.byte() % 52).collect();
                    b.splice(at..at, junk);
                } else if at + 8 <= b.len() {
                    b.drain(at..at + 8);
                }
                fix_up(b);
                ("fixed_splice", None)
            }
            8 => {
                // An option length byte edited (option walk here), fix up.
                let walked = walk_options(b);
                let lens: Vec<usize> = walked
                    .iter()
                    .filter(|(_, t)| *t != option::PAD1)
                    .map(|(at, _)| 40 + at + 1)
                    .collect();
                if let Some(&at) = lens.get(rng.below(lens.len().max(1))) {
                    b[at] = rng.byte();
                }
                fix_up(b);
                ("option_length", None)
            }
            9 => {
                // Header bytes (version, next header, MH proto, MH type), fix up.
                let at = [0, 6, 40, 42][rng.below(4)];
                b[at] = if at == 42 {
                    [0, 1, 5, 6, 7, rng.byte()][rng.below(6)]
                } else {
                    rng.byte()
                };
                fix_up(b);
                ("fixed_header_byte", None)
            }
            _ => {
                // The options repeated after themselves, alignment kept (fix up): a duplicate
                // of each option, or something after the AUTH option.
                let start = 40 + walk_options(b).first().map_or(b.len() - 40, |o| o.0);
                let has_option = walk_options(b)
                    .iter()
                    .any(|(_, t)| *t != option::PAD1 && *t != option::PADN);
                let has_auth = walk_options(b).iter().any(|(_, t)| *t == option::AUTH);
                let copy = b[start..].to_vec();
                if (start - 40) % 8 == 4 {
                    b.extend_from_slice(&[option::PADN, 2, 0, 0]);
                }
                b.extend_from_slice(&copy);
                fix_up(b);
                let want = if has_auth {
                    Err(WireError::AuthNotLast)
                } else if has_option {
                    Err(WireError::DuplicateOption)
                } else {
                    Ok(())
                };
                ("repeat_options", Some(want))
            }
        }
    }

    #[test]
    fn fuzz_decode_never_panics_and_rejections_have_reasons() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
        let mut by_mutation: BTreeMap<&str, usize> = BTreeMap::new();
        let mut total = 0usize;

        // Random bytes, some behind a plausible IPv6 + MH header.
        const RANDOM: usize = 40_000;
        for i in 0..RANDOM {
            let n = rng.below(160);
            let mut b: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            if i.is_multiple_of(2) && b.len() >= 48 {
                b[0] = 0x60;
                b[6] = 135;
                b[40] = 59;
                fix_up(&mut b);
            }
            let key = match decode(&b) {
                Ok(_) => "ok",
                Err(e) => e.reason(),
            };
            assert!(!verify(&b, KEY) || key == "ok");
            *outcomes.entry(key).or_default() += 1;
            total += 1;
        }

        // Valid messages, mutated.
        const MUTATED: usize = 200_000;
        for _ in 0..MUTATED {
            let (msg, key) = random_message(&mut rng);
            let mut b = encode(&msg, key);
            let (what, expected) = mutate(&mut rng, &mut b);
            *by_mutation.entry(what).or_default() += 1;
            let got = decode(&b);
            if let Some(want) = expected {
                assert_eq!(got.as_ref().map(|_| ()).map_err(|e| *e), want, "{what}");
            }
            match &got {
                Ok(decoded) => {
                    // Whatever decodes re-encodes to something that decodes to the same.
                    let again = decode(&encode(decoded, None)).expect("re-encoded decodes");
                    let mut want = decoded.clone();
                    want.options.auth = None;
                    assert_eq!(again, want);
                    *outcomes.entry("ok").or_default() += 1;
                }
                Err(e) => {
                    assert!(!verify(&b, KEY));
                    *outcomes.entry(e.reason()).or_default() += 1;
                }
            }
            total += 1;
        }

        eprintln!("mutations: {by_mutation:?}");
        eprintln!("outcomes: {outcomes:?}");
        assert_eq!(total, RANDOM + MUTATED);
        assert_eq!(
            outcomes.values().sum::<usize>(),
            total,
            "every input decoded or rejected"
        );
        assert_eq!(by_mutation.values().sum::<usize>(), MUTATED);
        for key in outcomes.keys() {
            assert!(
                *key == "ok" || WireError::ALL.iter().any(|e| e.reason() == *key),
                "{key}"
            );
        }
        // The mutations reach deep into the parser: nearly every rejection is seen.
        for e in WireError::ALL {
            assert!(
                outcomes.contains_key(e.reason()),
                "never saw {}",
                e.reason()
            );
        }
        assert!(outcomes["ok"] > 1000);
    }
}
