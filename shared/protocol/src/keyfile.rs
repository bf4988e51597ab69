//! A device's key file (`devices/{id}.json` in the fleet directory, installed on the
//! device): its enrolled identity and the fleet authority's public key, in hex.

use fedshield_crypto::identity::DeviceId;

/// A device's key file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceKey {
    /// Device id.
    pub device: DeviceId,
    /// ed25519 secret, hex.
    pub secret: String,
    /// The fleet authority's public key, hex.
    pub authority: String,
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses exactly 64 hex digits.
pub fn unhex32(s: &str) -> Result<[u8; 32], crate::ProtocolError> {
    let s = s.trim();
    let bad = || crate::ProtocolError::Malformed("expected 64 hex digits".into());
    if s.len() != 64 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl DeviceKey {
    /// Parses a key file's JSON text.
    pub fn parse(text: &str) -> Result<Self, crate::ProtocolError> {
        let key: Self = serde_json::from_str(text)
            .map_err(|e| crate::ProtocolError::Malformed(format!("key file: {e}")))?;
        crate::messages::check_level(&key.device.0)?;
        key.keys()?;
        Ok(key)
    }

    /// (secret, authority public key).
    pub fn keys(&self) -> Result<([u8; 32], [u8; 32]), crate::ProtocolError> {
        Ok((unhex32(&self.secret)?, unhex32(&self.authority)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let key = DeviceKey {
            device: DeviceId("edge-0".into()),
            secret: hex(&[0xab; 32]),
            authority: hex(&[1; 32]),
        };
        let text = serde_json::to_string(&key).unwrap();
        assert_eq!(DeviceKey::parse(&text).unwrap(), key);
        assert_eq!(key.keys().unwrap(), ([0xab; 32], [1; 32]));
        assert!(DeviceKey::parse("{}").is_err());
        let short = text.replace(&hex(&[0xab; 32]), "abcd");
        assert!(DeviceKey::parse(&short).is_err());
        let bad_id = text.replace("edge-0", "a/b");
        assert!(DeviceKey::parse(&bad_id).is_err());
    }
}
