//! The signature option of a client binding: the server's Ed25519 signature, which a client
//! that shares no secret with the server checks with the key the server's certificate
//! names (see `crate::pki`).
use ed25519_dalek::Signer as _;

use super::decode::parse;
use super::*;
use crate::pki::{
    Signature, SigningKey, VerifyingKey, BINDING_CONTEXT, REGISTRATION_CONTEXT, SIGNATURE_LEN,
};

/// Octets of the signature option's data before the signature: vendor id (4), sub-type (1),
/// algorithm (1), reserved (6).
pub(super) const SIGNED_PREFIX: usize = 12;

/// What the signature covers: the context string, the inner source and destination, and the
/// MH from its first byte through the signature option's reserved bytes, checksum as zero.
fn covered(context: &[u8], src: &Ipv6Addr, dst: &Ipv6Addr, mh_prefix: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + 32 + mh_prefix.len());
    m.extend_from_slice(context);
    m.extend_from_slice(&src.octets());
    m.extend_from_slice(&dst.octets());
    m.extend_from_slice(&mh_prefix[..4]);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&mh_prefix[6..]);
    m
}

pub(super) fn sign(
    context: &[u8],
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    mh_prefix: &[u8],
    signer: &SigningKey,
) -> [u8; SIGNATURE_LEN] {
    signer
        .sign(&covered(context, src, dst, mh_prefix))
        .to_bytes()
}

/// The UDP payload for `msg` closed by the signature option, signed with `signer` (the key
/// of the certificate in `msg.options.certificate`).
pub fn encode_signed(msg: &Message, signer: &SigningKey) -> Result<Vec<u8>, EncodeError> {
    encode::encode_sealed(msg, encode::Seal::Ed25519(signer, BINDING_CONTEXT))
}

/// The UDP payload for a server's binding update to an agent signed with its certificate's
/// key instead of an AUTH option: like [`encode_signed`], but the signature covers
/// [`REGISTRATION_CONTEXT`] first, so it is never valid as a client binding.
pub fn encode_registration_signed(
    msg: &Message,
    signer: &SigningKey,
) -> Result<Vec<u8>, EncodeError> {
    encode::encode_sealed(msg, encode::Seal::Ed25519(signer, REGISTRATION_CONTEXT))
}

/// True if the payload passes [`decode`]'s checks, ends with a signature option, and the
/// signature verifies (strictly: no malleable signatures) with `key`.
pub fn verify_signed(payload: &[u8], key: &VerifyingKey) -> bool {
    verify_with_context(BINDING_CONTEXT, payload, key)
}

/// [`verify_signed`] for a certificate-signed binding update to an agent
/// ([`encode_registration_signed`]).
pub fn verify_registration_signed(payload: &[u8], key: &VerifyingKey) -> bool {
    verify_with_context(REGISTRATION_CONTEXT, payload, key)
}

fn verify_with_context(context: &[u8], payload: &[u8], key: &VerifyingKey) -> bool {
    let Ok((msg, _)) = parse(payload) else {
        return false;
    };
    let Some(sig) = msg.options.signature else {
        return false;
    };
    let mh = &payload[IPV6_HEADER_LEN..];
    // The signature is the last SIGNATURE_LEN bytes of the MH (decode checks it is last
    // and that the MH ends with it).
    let covered_len = mh.len() - SIGNATURE_LEN;
    let m = covered(context, &msg.src, &msg.dst, &mh[..covered_len]);
    key.verify_strict(&m, &Signature::from_bytes(&sig)).is_ok()
}
