//! Binding messages on the wire: how a server registers itself with an agent.
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
//! | 5, H clear | client binding ([`Body::ClientBindingUpdate`]) | sequence (2), flags all clear (2), lifetime (2) |
//! | 6 | Binding Acknowledgement | status (1), K R P flags + reserved (1), sequence (2), lifetime (2) |
//! | 7 | Binding Error | status (1), reserved (1), home address (16) |
//! | 11 | Experimental MH (RFC 5096): agent discovery request | kind 1 (1), reserved (1) |
//! | 11 | Experimental MH (RFC 5096): agent discovery reply | kind 2 (1), reserved (1), lifetime (2, in 4 s units), reserved (2) |
//!
//! Our BUs set A (acknowledgement requested, from [`Body::BindingUpdate::ack`]) and H (home
//! registration, always); other flags are zero and ignored when received.
//!
//! **Agent discovery** (a server asks the address all agents share for the list of agents;
//! Mobile IPv6's own, ICMPv6 DHAAD, neither travels over IPv4 nor is authenticated) uses the
//! Experimental Mobility Header, whose data RFC 5096 leaves to the experiment: its first
//! byte tells the request (1) from the reply (2), and mobility options follow in the usual
//! format. A request carries MN-ID, MESG-ID (its nonce) and AUTH; a reply carries one agent
//! option per agent (at most [`MAX_DISCOVERY_AGENTS`], the answering agent first), the
//! request's MESG-ID and AUTH with the requesting server's key. An unknown kind is an
//! unknown MH type.
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
//! server can bind `ADDR:tcp:80` rather than the whole address. Sub-type [`VENDOR_AGENT`]
//! (2) is one agent of a discovery reply ([`AgentEntry`]): its IPv4 address as IPv4-mapped
//! (16, all zeros: none), its IPv6 address (16, all zeros: none) and its identity (1 to
//! [`MAX_AGENT_ID_LEN`] bytes of UTF-8, the rest of the option); outside a reply it is
//! skipped. Sub-type [`VENDOR_CERTIFICATE`] (3) carries a part (1 to [`CERT_PART_MAX`]
//! bytes) of the server's certificate in a client binding: the parts, in order, are the
//! certificate's bytes (at most `pki::MAX_CERT_LEN`). Sub-type [`VENDOR_CONNECTIONS`] (5),
//! once, names the client's connections a client binding moves with it: 1 to
//! [`MAX_NAMED_CONNECTIONS`] pairs of client port (2) and service port (2); the client's
//! other connections to the service stay on the agent's path (see *Client bindings*).
//! Sub-type [`VENDOR_SIGNATURE`] (4) is
//! the server's signature of a client binding: algorithm (1, [`SIGNATURE_ED25519`]),
//! reserved zeros (6), the Ed25519 signature (64); it is the last option, at 8n+2, and ends
//! the MH (see *Client bindings* below). Vendor options with another vendor id or sub-type
//! are skipped, as are unknown option types (RFC 6275 6.2.1).
//!
//! Encoding order: Alt-CoA, MN-ID, MESG-ID, Load Information, vendor (service, then the
//! agents), AUTH. The AUTH option
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
//! # Client bindings (route optimization)
//!
//! A server's binding for a client is a BU with H clear (a correspondent registration,
//! RFC 6275 9.5.1) from the anycast address to the client, to the client's port
//! [`CLIENT_PORT`]: Alt-CoA, MESG-ID, the service selector, the named connections (if
//! any), the certificate parts, and the
//! signature option last instead of AUTH (a client shares no secret with the server; it
//! holds the operator's public key and checks the certificate, `crate::pki`). The
//! signature covers `pki::BINDING_CONTEXT`, the inner source and destination, and the MH
//! from its first byte through the signature option's reserved bytes, checksum as zero;
//! [`encode_signed`] and [`verify_signed`].
//!
//! # Validation
//!
//! [`decode`] applies RFC 6275 section 9.2's checks plus bounds checks, and each rejection is a
//! [`WireError`] with a stable [`WireError::reason`] for counters: IPv6 version and next
//! header, payload length equal to the bytes that follow, MH payload proto 59, header length
//! equal to the MH's bytes, checksum, a known MH type long enough for its fixed fields, every
//! option inside the MH, the alignments above (not for Load Information), exact lengths of
//! known options, AUTH last, and at most one of each option (except Pad1, PadN, agent
//! options and foreign vendor options); agent options well formed and at most
//! [`MAX_DISCOVERY_AGENTS`] of them. Whether a MESG-ID is fresh, and which options a message must carry, is
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

mod auth;
#[cfg(test)]
mod client_tests;
mod decode;
#[cfg(test)]
mod discovery_tests;
mod encode;
mod signature;
#[cfg(test)]
mod tests;

pub use auth::verify;
pub use decode::decode;
pub use encode::{encode, try_encode};
pub use signature::{
    encode_registration_signed, encode_signed, verify_registration_signed, verify_signed,
};

/// The agent's UDP port for binding messages.
pub const DEFAULT_PORT: u16 = 4191;
/// The client's UDP port for the bindings servers send it (route optimization; 4192 is the
/// agents' relay port).
pub const CLIENT_PORT: u16 = 4193;

/// Binding Acknowledgement status codes (IANA registry; 144-146 are RFC 4285's, 174 is
/// RFC 6275's).
pub mod status {
    pub const ACCEPTED: u8 = 0;
    pub const PROHIBITED: u8 = 129;
    pub const INSUFFICIENT_RESOURCES: u8 = 130;
    pub const SEQUENCE_OUT_OF_WINDOW: u8 = 135;
    /// MIPV6-ID-MISMATCH (RFC 4285 section 6): the MESG-ID timestamp is outside the accepted
    /// window (too far from the agent's clock, or not newer than the last accepted one). The
    /// acknowledgement carries the agent's own time in its MESG-ID option, signed, so the
    /// server can resynchronize.
    pub const ID_MISMATCH: u8 = 144;
    /// MIPV6-MESG-ID-REQD (RFC 4285 section 6): the update carries no MESG-ID option.
    pub const MESG_ID_REQUIRED: u8 = 145;
    /// MIPV6-AUTH-FAIL (RFC 4285 section 5): the AUTH option is missing or wrong, or the
    /// identity is unknown (no security association to check it with).
    pub const AUTH_FAILED: u8 = 146;
    /// Invalid Care-of Address (RFC 6275 section 6.1.8): the care-of address (Alternate
    /// Care-of Address option) is not one the identity may use.
    pub const INVALID_COA: u8 = 174;
}

/// Mobility Header types (RFC 6275 6.1; 11 is RFC 5096's Experimental Mobility Header).
pub mod mh_type {
    pub const BINDING_REFRESH_REQUEST: u8 = 0;
    pub const BINDING_UPDATE: u8 = 5;
    pub const BINDING_ACK: u8 = 6;
    pub const BINDING_ERROR: u8 = 7;
    /// Experimental Mobility Header (RFC 5096): our agent discovery request and reply, told
    /// apart by the first byte of the message data ([`super::discovery_kind`]).
    pub const EXPERIMENTAL: u8 = 11;
}

/// The first byte of an Experimental Mobility Header's data: which discovery message it is.
pub mod discovery_kind {
    pub const REQUEST: u8 = 1;
    pub const REPLY: u8 = 2;
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
/// Sub-type of our vendor-specific option that carries one agent of a discovery reply
/// ([`AgentEntry`]).
pub const VENDOR_AGENT: u8 = 2;
/// Sub-type of our vendor-specific option that carries (a part of) the server's certificate
/// in a client binding; the parts, in order, are the certificate's bytes.
pub const VENDOR_CERTIFICATE: u8 = 3;
/// Sub-type of our vendor-specific option that carries the server's signature of a client
/// binding; the last option.
pub const VENDOR_SIGNATURE: u8 = 4;
/// Sub-type of our vendor-specific option that names the client's connections a client
/// binding covers besides those opened after it: pairs of (client port, service port).
pub const VENDOR_CONNECTIONS: u8 = 5;
/// Most connections one binding names: one vendor option's worth (its length byte counts
/// vendor id and sub-type too), 4 bytes each.
pub const MAX_NAMED_CONNECTIONS: usize = (255 - 5) / 4;
/// The signature option's algorithm byte: Ed25519 (RFC 8032).
pub const SIGNATURE_ED25519: u8 = 1;
/// Most certificate bytes one vendor option carries (its length byte counts vendor id and
/// sub-type too).
pub const CERT_PART_MAX: usize = 255 - 5;
/// Most agents a discovery reply lists: bounds the reply's size (at most about 1.8 KB with
/// 64-byte identities, inside the 2048 bytes an MH can have).
pub const MAX_DISCOVERY_AGENTS: usize = 16;
/// Longest agent identity in a discovery reply (as `registration.relay.id`).
pub const MAX_AGENT_ID_LEN: usize = 64;
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
/// Vendor id (4) + sub-type (1) + IPv4 address as IPv4-mapped (16) + IPv6 address (16); the
/// identity follows.
const VENDOR_AGENT_FIXED: usize = 37;
/// Subtype (1) + SPI (4) + authenticator.
const AUTH_LEN: usize = 5 + AUTHENTICATOR_LEN;
/// Vendor id (4) + sub-type (1) + algorithm (1) + reserved (6) + Ed25519 signature (64).
const VENDOR_SIGNATURE_LEN: usize = signature::SIGNED_PREFIX + crate::pki::SIGNATURE_LEN;

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
    /// A server's binding for a client (route optimization: a correspondent registration,
    /// MH type 5 with H clear): the inner source is the anycast address, the destination the
    /// client; `lifetime` in 4-second units, 0 withdraws. Carries the server's certificate
    /// and is closed by its signature option instead of AUTH.
    ClientBindingUpdate {
        seq: u16,
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
    /// Agent discovery request (Experimental MH, kind 1): a server asks the agent at the
    /// discovery address for the list of agents. Signed like a BU (MN-ID, MESG-ID, AUTH);
    /// its MESG-ID is the nonce the reply echoes.
    DiscoveryRequest,
    /// Agent discovery reply (Experimental MH, kind 2): the agents, the answering one first;
    /// `lifetime` (4-second units) is how long the list may be used. Echoes the request's
    /// MESG-ID and is signed with the requesting server's key.
    DiscoveryReply {
        lifetime: u16,
        agents: Vec<AgentEntry>,
    },
}

/// One agent in a discovery reply: its identity and its registration addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEntry {
    /// 1 to [`MAX_AGENT_ID_LEN`] bytes of UTF-8 (the agent's `registration.relay.id`).
    pub id: String,
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Body {
    /// The MH type of this body.
    pub fn mh_type(&self) -> u8 {
        match self {
            Body::BindingRefreshRequest => mh_type::BINDING_REFRESH_REQUEST,
            Body::BindingUpdate { .. } | Body::ClientBindingUpdate { .. } => {
                mh_type::BINDING_UPDATE
            }
            Body::BindingAck { .. } => mh_type::BINDING_ACK,
            Body::BindingError { .. } => mh_type::BINDING_ERROR,
            Body::DiscoveryRequest | Body::DiscoveryReply { .. } => mh_type::EXPERIMENTAL,
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
    /// The server's certificate (`crate::pki`), as bytes: the wire only carries it.
    pub certificate: Option<Vec<u8>>,
    /// A client binding's named connections: (client port, service port) of the client's
    /// connections the server holds, which move to the server's real address with the
    /// binding (at most [`MAX_NAMED_CONNECTIONS`]; empty: none named, no option).
    pub connections: Vec<(u16, u16)>,
    /// The signature option's Ed25519 signature. Set by decode; ignored by encode
    /// ([`encode_signed`] computes it).
    pub signature: Option<[u8; 64]>,
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
    /// A discovery reply's agent list: more than [`MAX_DISCOVERY_AGENTS`] agents, an
    /// identity empty or longer than [`MAX_AGENT_ID_LEN`], an agent without an address, or
    /// an address of the wrong family in its field.
    BadAgent,
    /// A certificate empty or longer than `pki::MAX_CERT_LEN` (its length).
    BadCertificate(usize),
    /// More named connections than [`MAX_NAMED_CONNECTIONS`] (their number).
    TooManyConnections(usize),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::EmptyMnId => write!(f, "the mobile node identifier is empty"),
            EncodeError::MnIdTooLong(n) => write!(
                f,
                "the mobile node identifier has {n} bytes, more than {MAX_MN_ID_LEN}"
            ),
            EncodeError::BadAgent => write!(
                f,
                "a discovery reply lists at most {MAX_DISCOVERY_AGENTS} agents, each with an \
                 identity of 1 to {MAX_AGENT_ID_LEN} bytes and at least one address"
            ),
            EncodeError::BadCertificate(n) => write!(
                f,
                "a certificate of {n} bytes: it has 1 to {} bytes",
                crate::pki::MAX_CERT_LEN
            ),
            EncodeError::TooManyConnections(n) => write!(
                f,
                "{n} named connections: a binding names at most {MAX_NAMED_CONNECTIONS}"
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
    /// A discovery reply's agent option is malformed (identity empty, too long or not UTF-8,
    /// no address, an address of the wrong family), or the reply lists more than
    /// [`MAX_DISCOVERY_AGENTS`] agents.
    BadAgentOption,
    /// A certificate part is empty, or the parts add up to more than `pki::MAX_CERT_LEN`.
    BadCertificateOption,
    /// The signature option has another algorithm than Ed25519, reserved bytes not zero, or
    /// another length.
    BadSignatureOption,
    /// Something follows the signature option.
    SignatureNotLast,
    /// The connections option is empty, not whole (port, port) pairs, or appears twice.
    BadConnectionsOption,
}

impl WireError {
    /// Every variant, in declaration order.
    pub const ALL: [WireError; 21] = [
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
        WireError::BadAgentOption,
        WireError::BadCertificateOption,
        WireError::BadSignatureOption,
        WireError::SignatureNotLast,
        WireError::BadConnectionsOption,
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
            WireError::BadAgentOption => "bad_agent_option",
            WireError::BadCertificateOption => "bad_certificate_option",
            WireError::BadSignatureOption => "bad_signature_option",
            WireError::SignatureNotLast => "signature_not_last",
            WireError::BadConnectionsOption => "bad_connections_option",
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
            WireError::BadAgentOption => "a discovery reply's agent option is malformed",
            WireError::BadCertificateOption => "a certificate option is empty or too long",
            WireError::BadSignatureOption => "the signature option is malformed",
            WireError::SignatureNotLast => "the signature option is not the last option",
            WireError::BadConnectionsOption => {
                "the connections option is empty, not whole port pairs, or repeated"
            }
        };
        write!(f, "{text} ({})", self.reason())
    }
}

impl std::error::Error for WireError {}

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
