//! Per-server secret keys for binding authentication. A key file holds the secret as hex
//! (whitespace ignored), at least 16 bytes; the agent holds one file per server and the server
//! its own. One key per server, never one per group: a member must not be able to forge
//! another member's binding.
use std::path::Path;

use anyhow::{bail, Context as _, Result};

pub const MIN_KEY_BYTES: usize = 16;

pub fn parse_key(text: &str) -> Result<Vec<u8>> {
    let hex: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !hex.len().is_multiple_of(2) {
        bail!("odd number of hex digits");
    }
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("not hex")?;
    if key.len() < MIN_KEY_BYTES {
        bail!("{} bytes; at least {MIN_KEY_BYTES} are needed", key.len());
    }
    Ok(key)
}

pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading key file {}", path.display()))?;
    parse_key(&text).with_context(|| format!("key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn keys_parse_and_short_or_bad_keys_are_refused() {
        assert_eq!(
            parse_key("00112233 44556677\n8899aabbccddeeff\n")
                .unwrap()
                .len(),
            16
        );
        assert!(parse_key("0011").is_err());
        assert!(parse_key("zz112233445566778899aabbccddeeff").is_err());
        assert!(parse_key("0112233445566778899aabbccddeeff").is_err());
    }
}
