//! The AUTH option's authenticator (RFC 4285 MN-HA, here HMAC-SHA256 truncated to 128
//! bits) and its verification.
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::decode::parse;
use super::*;

type HmacSha256 = Hmac<Sha256>;

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

pub(super) fn authenticator(
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
