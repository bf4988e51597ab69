//! The fleet directory: the enrolment authority's key, the host's key and its certificate,
//! the registry of enrolled devices, and one key file per device to install on it.
//!
//! ```text
//! {dir}/authority.key        32-byte ed25519 secret of the fleet authority (host only)
//! {dir}/host.key             32-byte ed25519 secret of the host: signs its broadcasts
//! {dir}/host.json            the authority's certificate of the host key for one fleet
//! {dir}/registry.json        enrolled devices and their certificates
//! {dir}/devices/{id}.json    a device's identity secret, the authority's public key and
//!                            the host certificate
//! ```
//!
//! A file that exists but cannot be read or parsed is an error, never replaced: a new
//! authority would void every enrolment, an empty registry would forget every device.

use crate::HostError;
use fedshield_crypto::identity::{DeviceId, HostCertificate, Identity, Registry};
use fedshield_protocol::keyfile::{DeviceKey, HostKeyEntry, hex};
use fedshield_protocol::messages::check_level;
use fedshield_store::{Access, read_existing, write_atomic};
use std::path::{Path, PathBuf};

/// The fleet directory.
#[derive(Debug, Clone)]
pub struct FleetDir(pub PathBuf);

impl FleetDir {
    fn authority_path(&self) -> PathBuf {
        self.0.join("authority.key")
    }

    fn host_key_path(&self) -> PathBuf {
        self.0.join("host.key")
    }

    fn host_cert_path(&self) -> PathBuf {
        self.0.join("host.json")
    }

    fn registry_path(&self) -> PathBuf {
        self.0.join("registry.json")
    }

    /// The key file of `device`.
    pub fn device_key_path(&self, device: &str) -> PathBuf {
        self.0.join("devices").join(format!("{device}.json"))
    }

    /// The authority, created on first use (only when its file does not exist).
    pub fn authority(&self) -> Result<Identity, HostError> {
        read_or_create_key(&self.0, &self.authority_path())
    }

    /// The host's identity and its certificate for `fleet`: created (key, and certificate by
    /// the authority) on first use; an existing certificate for another fleet is an error.
    pub fn host(&self, fleet: &str) -> Result<(Identity, HostCertificate), HostError> {
        check_level(fleet)?;
        let authority = self.authority()?;
        let host = read_or_create_key(&self.0, &self.host_key_path())?;
        let path = self.host_cert_path();
        let cert = match read_existing(&path)? {
            Some(text) => {
                let cert: HostCertificate =
                    serde_json::from_slice(&text).map_err(|e| HostError::invalid(&path, e))?;
                if cert.fleet != fleet {
                    return Err(HostError::invalid(
                        &path,
                        format!(
                            "the fleet directory of fleet {:?}, not {fleet:?}",
                            cert.fleet
                        ),
                    ));
                }
                cert.verify(&authority.public_key(), fleet)
                    .map_err(|e| HostError::invalid(&path, e))?;
                if cert.public_key != host.public_key() {
                    return Err(HostError::invalid(
                        &path,
                        format!(
                            "certifies another key than {}",
                            self.host_key_path().display()
                        ),
                    ));
                }
                cert
            }
            None => {
                let cert = authority.certify_host(fleet, host.public_key());
                let json = serde_json::to_string_pretty(&cert).expect("certificates encode");
                write_atomic(&path, json.as_bytes(), Access::Public)?;
                cert
            }
        };
        Ok((host, cert))
    }

    /// The registry (empty when the fleet has no devices yet).
    pub fn registry(&self) -> Result<Registry, HostError> {
        let authority = self.authority()?;
        let path = self.registry_path();
        match read_existing(&path)? {
            Some(text) => {
                let registry: Registry =
                    serde_json::from_slice(&text).map_err(|e| HostError::invalid(&path, e))?;
                if registry.authority != authority.public_key() {
                    return Err(HostError::invalid(
                        &path,
                        format!(
                            "belongs to another authority than {}",
                            self.authority_path().display()
                        ),
                    ));
                }
                Ok(registry)
            }
            None => Ok(Registry::new(authority.public_key())),
        }
    }

    /// Enrols `device` of `fleet` with a fresh identity; writes its key file (with the host
    /// certificate). Re-enrolling replaces the device's identity.
    pub fn enrol(&self, fleet: &str, device: &str) -> Result<PathBuf, HostError> {
        check_level(device)?;
        let authority = self.authority()?;
        let (_, host) = self.host(fleet)?;
        let mut registry = self.registry()?;
        let identity = Identity::generate(&mut rand::rng());
        let id = DeviceId(device.to_string());
        registry
            .enrol(authority.enrol(id.clone(), identity.public_key()))
            .map_err(|e| HostError::invalid(&self.registry_path(), e))?;
        write_atomic(
            &self.registry_path(),
            serde_json::to_string_pretty(&registry)
                .expect("registries encode")
                .as_bytes(),
            Access::Public,
        )?;
        let key = DeviceKey {
            device: id,
            secret: hex(&identity.secret()),
            authority: hex(&authority.public_key()),
            host: Some(HostKeyEntry::of(&host)),
        };
        let path = self.device_key_path(device);
        let devices = path.parent().expect("devices folder");
        std::fs::create_dir_all(devices).map_err(|e| HostError::invalid(devices, e))?;
        write_atomic(
            &path,
            serde_json::to_string_pretty(&key)
                .expect("key files encode")
                .as_bytes(),
            Access::Private,
        )?;
        Ok(path)
    }
}

/// The ed25519 key in `path`, created (owner-only) when the file does not exist.
fn read_or_create_key(dir: &Path, path: &Path) -> Result<Identity, HostError> {
    match read_existing(path)? {
        Some(bytes) => {
            let secret: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| HostError::invalid(path, "not a 32-byte key"))?;
            Ok(Identity::from_secret(secret))
        }
        None => {
            std::fs::create_dir_all(dir).map_err(|e| HostError::invalid(dir, e))?;
            let id = Identity::generate(&mut rand::rng());
            write_atomic(path, &id.secret(), Access::Private)?;
            Ok(id)
        }
    }
}
