//! A device's key file (`devices/{id}.json` in the fleet directory, installed on the
//! device): its enrolled identity, the fleet authority's public key and the authority's
//! certificate of the fleet host's key (under which the device accepts host broadcasts),
//! in hex.

use fedshield_crypto::identity::{DeviceId, Enrolment, HostCertificate, Identity};

/// A device's key file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceKey {
    /// Device id.
    pub device: DeviceId,
    /// ed25519 secret, hex.
    pub secret: String,
    /// The fleet authority's public key, hex.
    pub authority: String,
    /// The fleet host's certificate (absent in key files issued before hosts signed their
    /// broadcasts: such a file is refused with the fix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostKeyEntry>,
}

/// The host certificate as a key file holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostKeyEntry {
    /// The fleet the host aggregates.
    pub fleet: String,
    /// The host's ed25519 public key, hex.
    pub public_key: String,
    /// The certificate's serial number (0 in entries from before host certificates had
    /// one: such a file is refused with the fix).
    #[serde(default)]
    pub serial: u64,
    /// The end of the certificate's validity, Unix seconds.
    #[serde(default)]
    pub not_after: u64,
    /// The authority's signature, hex.
    pub signature: String,
}

impl HostKeyEntry {
    /// The entry of `cert`.
    pub fn of(cert: &HostCertificate) -> Self {
        Self {
            fleet: cert.fleet.clone(),
            public_key: hex(&cert.public_key),
            serial: cert.serial,
            not_after: cert.not_after,
            signature: hex(&cert.signature),
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses exactly 64 hex digits.
pub fn unhex32(s: &str) -> Result<[u8; 32], crate::ProtocolError> {
    unhex(s)?
        .try_into()
        .map_err(|_| crate::ProtocolError::Malformed("expected 64 hex digits".into()))
}

/// Parses hex digits (an even number of them).
pub fn unhex(s: &str) -> Result<Vec<u8>, crate::ProtocolError> {
    let s = s.trim();
    let bad = || crate::ProtocolError::Malformed("expected hex digits".into());
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad()))
        .collect()
}

/// A device's identity as `fedshield-edge keygen` writes it on the device (owner-only):
/// its id and secret, before the authority has certified it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    /// Device id.
    pub device: DeviceId,
    /// ed25519 secret, hex.
    pub secret: String,
}

impl DeviceIdentity {
    /// Parses an identity file's JSON text.
    pub fn parse(text: &str) -> Result<Self, crate::ProtocolError> {
        let id: Self = serde_json::from_str(text)
            .map_err(|e| crate::ProtocolError::Malformed(format!("identity file: {e}")))?;
        crate::messages::check_level(&id.device.0)?;
        unhex32(&id.secret)?;
        Ok(id)
    }

    /// The identity.
    pub fn identity(&self) -> Result<Identity, crate::ProtocolError> {
        Ok(Identity::from_secret(unhex32(&self.secret)?))
    }
}

impl DeviceKey {
    /// The key file of a device whose identity was born on it, from what the authority
    /// returned: its certificate (which must certify this device's id and key under
    /// `authority`) and the host's certificate (signed by the same authority).
    pub fn assemble(
        identity: &DeviceIdentity,
        authority: [u8; 32],
        cert: &Enrolment,
        host: &HostCertificate,
    ) -> Result<Self, crate::ProtocolError> {
        let public = identity.identity()?.public_key();
        if cert.device != identity.device || cert.public_key != public {
            return Err(crate::ProtocolError::Malformed(format!(
                "the certificate is for {} with another key than this device's ({}): \
                 was it issued for another request?",
                cert.device, identity.device
            )));
        }
        cert.verify(&authority)?;
        host.verify(&authority, &host.fleet)?;
        let key = Self {
            device: identity.device.clone(),
            secret: identity.secret.clone(),
            authority: hex(&authority),
            host: Some(HostKeyEntry::of(host)),
        };
        Ok(key)
    }

    /// Parses a key file's JSON text; refuses a file without a valid host certificate.
    pub fn parse(text: &str) -> Result<Self, crate::ProtocolError> {
        let key: Self = serde_json::from_str(text)
            .map_err(|e| crate::ProtocolError::Malformed(format!("key file: {e}")))?;
        crate::messages::check_level(&key.device.0)?;
        key.keys()?;
        key.host_certificate()?;
        Ok(key)
    }

    /// The host certificate, checked against the key file's authority.
    pub fn host_certificate(&self) -> Result<HostCertificate, crate::ProtocolError> {
        let entry = self.host.as_ref().ok_or_else(|| {
            crate::ProtocolError::Malformed(
                "key file has no host certificate (issued before hosts signed their broadcasts): \
                 re-issue it with `fedshield-host enrol --devices ...`"
                    .into(),
            )
        })?;
        if entry.serial == 0 && entry.not_after == 0 {
            return Err(crate::ProtocolError::Malformed(
                "the key file's host certificate has no serial number or expiry (issued before \
                 host certificates had them): certify the host again (`fedshield-host authority \
                 certify-host`) and install the new certificate (`fedshield-edge install-cert`)"
                    .into(),
            ));
        }
        let cert = HostCertificate {
            fleet: entry.fleet.clone(),
            public_key: unhex32(&entry.public_key)?,
            serial: entry.serial,
            not_after: entry.not_after,
            signature: unhex(&entry.signature)?,
        };
        let (_, authority) = self.keys()?;
        cert.verify(&authority, &cert.fleet)?;
        Ok(cert)
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
    fn a_key_file_is_assembled_only_from_this_devices_certificate() {
        let authority = Identity::from_secret([1; 32]);
        let host =
            authority.certify_host("lab", Identity::from_secret([2; 32]).public_key(), 1, 10);
        let device = Identity::from_secret([3; 32]);
        let identity = DeviceIdentity {
            device: DeviceId("edge-0".into()),
            secret: hex(&device.secret()),
        };
        let text = serde_json::to_string(&identity).unwrap();
        assert_eq!(DeviceIdentity::parse(&text).unwrap(), identity);
        let cert = authority.enrol(identity.device.clone(), device.public_key());
        let key = DeviceKey::assemble(&identity, authority.public_key(), &cert, &host).unwrap();
        assert_eq!(
            key.keys().unwrap(),
            (device.secret(), authority.public_key())
        );
        assert_eq!(key.host_certificate().unwrap(), host);
        // Another device's certificate, another authority's, or a forged host: refused.
        let other = authority.enrol(DeviceId("edge-1".into()), device.public_key());
        assert!(DeviceKey::assemble(&identity, authority.public_key(), &other, &host).is_err());
        let stranger = Identity::from_secret([4; 32]);
        let theirs = stranger.enrol(identity.device.clone(), device.public_key());
        assert!(DeviceKey::assemble(&identity, authority.public_key(), &theirs, &host).is_err());
        let fake_host = stranger.certify_host("lab", stranger.public_key(), 1, 10);
        assert!(DeviceKey::assemble(&identity, authority.public_key(), &cert, &fake_host).is_err());
    }

    #[test]
    fn round_trips_and_rejects_bad_files() {
        let authority = fedshield_crypto::identity::Identity::from_secret([1; 32]);
        let host = fedshield_crypto::identity::Identity::from_secret([2; 32]);
        let cert = authority.certify_host("lab", host.public_key(), 1, 10);
        let key = DeviceKey {
            device: DeviceId("edge-0".into()),
            secret: hex(&[0xab; 32]),
            authority: hex(&authority.public_key()),
            host: Some(HostKeyEntry::of(&cert)),
        };
        let text = serde_json::to_string(&key).unwrap();
        assert_eq!(DeviceKey::parse(&text).unwrap(), key);
        assert_eq!(key.keys().unwrap(), ([0xab; 32], authority.public_key()));
        assert_eq!(key.host_certificate().unwrap(), cert);
        // No host certificate, or one the authority did not sign: refused.
        let old = DeviceKey {
            host: None,
            ..key.clone()
        };
        let e = DeviceKey::parse(&serde_json::to_string(&old).unwrap()).unwrap_err();
        assert!(matches!(e, crate::ProtocolError::Malformed(_)), "{e}");
        // An entry from before certificates had a serial and an expiry: refused with the fix.
        let mut v1 = key.clone();
        let entry = v1.host.as_mut().unwrap();
        (entry.serial, entry.not_after) = (0, 0);
        let e = DeviceKey::parse(&serde_json::to_string(&v1).unwrap()).unwrap_err();
        assert!(e.to_string().contains("certify-host"), "{e}");
        let mut forged = key.clone();
        forged.host.as_mut().unwrap().public_key = hex(&[3; 32]);
        assert!(DeviceKey::parse(&serde_json::to_string(&forged).unwrap()).is_err());
        assert!(DeviceKey::parse("{}").is_err());
        let short = text.replace(&hex(&[0xab; 32]), "abcd");
        assert!(DeviceKey::parse(&short).is_err());
        let bad_id = text.replace("edge-0", "a/b");
        assert!(DeviceKey::parse(&bad_id).is_err());
    }
}
