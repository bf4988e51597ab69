//! The fleet directory: the enrolment authority's key, the registry of enrolled devices,
//! and one key file per device to install on it.
//!
//! ```text
//! {dir}/authority.key        32-byte ed25519 secret of the fleet authority (host only)
//! {dir}/registry.json        enrolled devices and their certificates
//! {dir}/devices/{id}.json    a device's identity secret and the authority's public key
//! ```

use anyhow::Context;
use fedshield_crypto::identity::{DeviceId, Identity, Registry};
use fedshield_protocol::keyfile::{DeviceKey, hex};
use fedshield_protocol::messages::check_level;
use std::path::{Path, PathBuf};

/// The fleet directory.
#[derive(Debug, Clone)]
pub struct FleetDir(pub PathBuf);

impl FleetDir {
    fn authority_path(&self) -> PathBuf {
        self.0.join("authority.key")
    }

    fn registry_path(&self) -> PathBuf {
        self.0.join("registry.json")
    }

    /// The key file of `device`.
    pub fn device_key_path(&self, device: &str) -> PathBuf {
        self.0.join("devices").join(format!("{device}.json"))
    }

    /// The authority, created on first use.
    pub fn authority(&self) -> anyhow::Result<Identity> {
        let path = self.authority_path();
        if let Ok(bytes) = std::fs::read(&path) {
            let secret: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("{}: not a 32-byte key", path.display()))?;
            return Ok(Identity::from_secret(secret));
        }
        std::fs::create_dir_all(&self.0)?;
        let id = Identity::generate(&mut rand::rng());
        write_private(&path, &id.secret())?;
        Ok(id)
    }

    /// The registry (empty when the fleet has no devices yet).
    pub fn registry(&self) -> anyhow::Result<Registry> {
        let authority = self.authority()?;
        match std::fs::read_to_string(self.registry_path()) {
            Ok(text) => serde_json::from_str(&text).context("parsing registry.json"),
            Err(_) => Ok(Registry::new(authority.public_key())),
        }
    }

    /// Enrols `device` with a fresh identity; writes its key file. Re-enrolling replaces the
    /// device's identity.
    pub fn enrol(&self, device: &str) -> anyhow::Result<PathBuf> {
        check_level(device)?;
        let authority = self.authority()?;
        let mut registry = self.registry()?;
        let identity = Identity::generate(&mut rand::rng());
        let id = DeviceId(device.to_string());
        registry.enrol(authority.enrol(id.clone(), identity.public_key()))?;
        std::fs::write(
            self.registry_path(),
            serde_json::to_string_pretty(&registry)?,
        )?;
        let key = DeviceKey {
            device: id,
            secret: hex(&identity.secret()),
            authority: hex(&authority.public_key()),
        };
        let path = self.device_key_path(device);
        std::fs::create_dir_all(path.parent().expect("devices folder"))?;
        write_private(&path, serde_json::to_string_pretty(&key)?.as_bytes())?;
        Ok(path)
    }
}

/// Writes a secret file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
