//! Who holds which key. Three places, on three kinds of machine:
//!
//! ```text
//! the authority (offline)     AuthorityDir
//!   authority.key             its ed25519 secret (0600): signs certificates and revocations
//!   authority.pub             its public key (hex)
//!   revocations.json          the latest signed revocation list (devices and host keys)
//!   host-serial               the serial of the last host certificate it issued
//!   issued/{name}.json        every certificate it signed (a record)
//!
//! the host                    FleetDir: public material and the host's own key only
//!   authority.pub             copied from the authority
//!   host.key                  the host's ed25519 secret (0600): signs its broadcasts
//!   host-request.json         the host's enrolment request (carried to the authority)
//!   host.json                 the authority's certificate of the host key for one fleet
//!                             (serial number, expiry; shown to the devices every round)
//!   devices/{id}.cert.json    the authority's certificates of the devices
//!   revocations.json          copied from the authority; re-read at every round
//!
//! a device                    `fedshield-edge keygen` / `install-cert`
//!   identity.key              its secret, born there, never leaves it
//!   key file                  its secret, the authority's public key and the host's
//!                             certificate
//! ```
//!
//! The host can neither enrol a device (it has no authority key) nor read a device's
//! secret. `enrol` is the one-machine convenience of the demo and the tests: it plays the
//! authority (from a directory given explicitly) and generates the devices' keys itself,
//! writing their key files to `devices/{id}.json`.
//!
//! A file that exists but cannot be read or parsed is an error, never replaced: a new
//! authority would void every enrolment.

use crate::HostError;
use fedshield_crypto::identity::{
    DeviceId, Enrolment, EnrolmentRequest, HostCertificate, Identity, Registry, RevocationList,
};
use fedshield_protocol::keyfile::{DeviceKey, HostKeyEntry, hex, unhex32};
use fedshield_protocol::messages::check_level;
use fedshield_store::{Access, read_existing, write_atomic};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// How long a host certificate is valid unless the authority says otherwise: 90 days.
/// Short enough that a stolen host key whose revocation a compromised host withholds from
/// the devices dies on its own within a quarter; long enough for a quarterly rotation.
pub const DEFAULT_HOST_VALIDITY_S: u64 = 90 * 86_400;

/// The fleet authority's directory, kept on an offline machine.
#[derive(Debug, Clone)]
pub struct AuthorityDir(pub PathBuf);

impl AuthorityDir {
    fn key_path(&self) -> PathBuf {
        self.0.join("authority.key")
    }

    /// `authority.pub`: the file to copy to the host and the devices.
    pub fn public_path(&self) -> PathBuf {
        self.0.join("authority.pub")
    }

    /// `revocations.json`: the latest list, to copy to the host.
    pub fn revocations_path(&self) -> PathBuf {
        self.0.join("revocations.json")
    }

    /// Creates a fresh authority; refuses when the directory already has one.
    pub fn init(&self) -> Result<[u8; 32], HostError> {
        if read_key(&self.key_path())?.is_some() {
            return Err(HostError::Config(format!(
                "{} already holds an authority: a new one would void every certificate it issued",
                self.0.display()
            )));
        }
        self.open_or_init().map(|a| a.public_key())
    }

    /// The authority, created when its directory has none (the one-machine convenience).
    fn open_or_init(&self) -> Result<Identity, HostError> {
        let authority = read_or_create_key(&self.0, &self.key_path())?;
        install_public_key(
            &self.public_path(),
            authority.public_key(),
            "not authority.key's public key",
        )?;
        Ok(authority)
    }

    /// The authority (it must exist).
    pub fn open(&self) -> Result<Identity, HostError> {
        if read_key(&self.key_path())?.is_none() {
            return Err(HostError::Config(format!(
                "{} holds no authority: run `fedshield-host authority init --dir {}`",
                self.0.display(),
                self.0.display()
            )));
        }
        self.open_or_init()
    }

    /// Signs a device's enrolment request into a certificate (after checking that the
    /// requester holds the key), and records it under `issued/`.
    pub fn enrol(&self, request: &EnrolmentRequest) -> Result<Enrolment, HostError> {
        check_level(&request.name)?;
        request
            .verify()
            .map_err(|e| HostError::Config(e.to_string()))?;
        let authority = self.open()?;
        if self
            .revocations()?
            .revoked
            .contains(&DeviceId(request.name.clone()))
        {
            return Err(HostError::Config(format!(
                "device {:?} is revoked: enrol it under another id",
                request.name
            )));
        }
        let cert = authority.enrol(DeviceId(request.name.clone()), request.public_key);
        self.record(&format!("device-{}", request.name), &cert)?;
        Ok(cert)
    }

    fn host_serial_path(&self) -> PathBuf {
        self.0.join("host-serial")
    }

    /// Certifies a host's key for the fleet its request names, valid from `now` for
    /// `valid_s` seconds, under the next host serial number (persisted before the
    /// certificate is returned: no two certificates share a serial).
    pub fn certify_host(
        &self,
        request: &EnrolmentRequest,
        now: u64,
        valid_s: u64,
    ) -> Result<HostCertificate, HostError> {
        check_level(&request.name)?;
        request
            .verify()
            .map_err(|e| HostError::Config(e.to_string()))?;
        let authority = self.open()?;
        if self.revocations()?.hosts.contains(&request.public_key) {
            return Err(HostError::Config(
                "this host key is revoked: have the host make a new one (`fedshield-host keygen`)"
                    .into(),
            ));
        }
        let path = self.host_serial_path();
        let last = match read_existing(&path)? {
            None => 0,
            Some(bytes) => String::from_utf8(bytes)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .ok_or_else(|| HostError::invalid(&path, "not a serial number"))?,
        };
        let serial = last + 1;
        write_atomic(&path, format!("{serial}\n").as_bytes(), Access::Public)?;
        let not_after = now.saturating_add(valid_s);
        let cert = authority.certify_host(&request.name, request.public_key, serial, not_after);
        self.record(&format!("host-{}-{serial}", request.name), &cert)?;
        Ok(cert)
    }

    /// The latest revocation list (empty before the first revocation).
    pub fn revocations(&self) -> Result<RevocationList, HostError> {
        let authority = read_public_key(&self.public_path())?;
        read_revocations(&self.revocations_path(), &authority)
    }

    /// Revokes `device`: writes the next list (higher serial) and returns it.
    pub fn revoke(&self, device: &str) -> Result<RevocationList, HostError> {
        check_level(device)?;
        let authority = self.open()?;
        let list = self
            .revocations()?
            .revoke(&authority, DeviceId(device.to_string()));
        write_json(&self.revocations_path(), &list, Access::Public)?;
        Ok(list)
    }

    /// Revokes the host key `public_key`: writes the next list and returns it. Devices
    /// learn it from the next round state of any host of the fleet (and refuse the key).
    pub fn revoke_host(&self, public_key: [u8; 32]) -> Result<RevocationList, HostError> {
        let authority = self.open()?;
        let list = self.revocations()?.revoke_host(&authority, public_key);
        write_json(&self.revocations_path(), &list, Access::Public)?;
        Ok(list)
    }

    fn record(&self, name: &str, what: &impl Serialize) -> Result<(), HostError> {
        let dir = self.0.join("issued");
        std::fs::create_dir_all(&dir).map_err(|e| HostError::invalid(&dir, e))?;
        write_json(&dir.join(format!("{name}.json")), what, Access::Public)
    }
}

/// The host's fleet directory (public material and the host's own key).
#[derive(Debug, Clone)]
pub struct FleetDir(pub PathBuf);

impl FleetDir {
    fn host_key_path(&self) -> PathBuf {
        self.0.join("host.key")
    }

    /// The host's enrolment request, to carry to the authority.
    pub fn host_request_path(&self) -> PathBuf {
        self.0.join("host-request.json")
    }

    /// The authority's certificate of the host key.
    pub fn host_cert_path(&self) -> PathBuf {
        self.0.join("host.json")
    }

    /// The authority's public key.
    pub fn authority_path(&self) -> PathBuf {
        self.0.join("authority.pub")
    }

    /// The authority's revocation list, as copied here.
    pub fn revocations_path(&self) -> PathBuf {
        self.0.join("revocations.json")
    }

    fn devices_dir(&self) -> PathBuf {
        self.0.join("devices")
    }

    /// Where a device's certificate goes.
    pub fn device_cert_path(&self, device: &str) -> PathBuf {
        self.devices_dir().join(format!("{device}.cert.json"))
    }

    /// The key file of `device` (the one-machine convenience of [`FleetDir::enrol`]).
    pub fn device_key_path(&self, device: &str) -> PathBuf {
        self.devices_dir().join(format!("{device}.json"))
    }

    /// A fleet directory of the layout before keys left the host: refused with the way out.
    fn refuse_old_layout(&self) -> Result<(), HostError> {
        let old = self.0.join("authority.key");
        if old.exists() {
            return Err(HostError::invalid(
                &old,
                "the fleet authority's secret key is in the host's directory (an older layout): \
                 move it to an authority directory on an offline machine, copy that directory's \
                 authority.pub here, and issue the devices' certificates from there \
                 (README, \"Deploying a fleet\")",
            ));
        }
        Ok(())
    }

    /// The authority's public key.
    pub fn authority(&self) -> Result<[u8; 32], HostError> {
        self.refuse_old_layout()?;
        read_public_key(&self.authority_path())
    }

    /// The host's key, created with its enrolment request when it does not exist yet.
    /// Returns the request's path.
    pub fn keygen(&self, fleet: &str) -> Result<PathBuf, HostError> {
        check_level(fleet)?;
        self.refuse_old_layout()?;
        let host = read_or_create_key(&self.0, &self.host_key_path())?;
        let request = EnrolmentRequest::new(&host, fleet);
        write_json(&self.host_request_path(), &request, Access::Public)?;
        Ok(self.host_request_path())
    }

    /// Moves the host's key and certificate aside (`host.key.retired-N`, `host.json.retired-N`,
    /// N the certificate's serial; renamed, never deleted) so that [`FleetDir::keygen`] makes
    /// a new key. Returns N.
    pub fn retire_host_key(&self, fleet: &str) -> Result<u64, HostError> {
        let (_, cert) = self.host(fleet)?;
        let serial = cert.serial;
        for path in [self.host_cert_path(), self.host_key_path()] {
            let mut retired = path.clone().into_os_string();
            retired.push(format!(".retired-{serial}"));
            let retired = PathBuf::from(retired);
            if retired.exists() {
                return Err(HostError::invalid(
                    &retired,
                    "exists already: not overwritten",
                ));
            }
            std::fs::rename(&path, &retired).map_err(|e| HostError::invalid(&path, e))?;
        }
        Ok(serial)
    }

    /// The host's identity and its certificate for `fleet`, both of which must exist and
    /// match: the key, the authority's signature and the fleet. (Its expiry and
    /// revocation are checked by `serve`, which knows the time.)
    pub fn host(&self, fleet: &str) -> Result<(Identity, HostCertificate), HostError> {
        check_level(fleet)?;
        let authority = self.authority()?;
        let key = self.host_key_path();
        let cert_path = self.host_cert_path();
        let Some(host) = read_key(&key)? else {
            return Err(HostError::Config(format!(
                "{} has no host key: run `fedshield-host keygen --fleet {fleet} --fleet-dir {}` \
                 and have the authority certify {}",
                self.0.display(),
                self.0.display(),
                self.host_request_path().display()
            )));
        };
        let Some(text) = read_existing(&cert_path)? else {
            return Err(HostError::Config(format!(
                "{} is missing: have the authority certify {} \
                 (`fedshield-host authority certify-host`) and copy its answer there",
                cert_path.display(),
                self.host_request_path().display()
            )));
        };
        let cert: HostCertificate =
            serde_json::from_slice(&text).map_err(|e| HostError::invalid(&cert_path, e))?;
        if cert.fleet != fleet {
            return Err(HostError::invalid(
                &cert_path,
                format!(
                    "certifies the host of fleet {:?}, not {fleet:?}",
                    cert.fleet
                ),
            ));
        }
        cert.verify(&authority, fleet)
            .map_err(|e| HostError::invalid(&cert_path, e))?;
        if cert.public_key != host.public_key() {
            return Err(HostError::invalid(
                &cert_path,
                format!("certifies another key than {}", key.display()),
            ));
        }
        Ok((host, cert))
    }

    /// The registry: every certificate under `devices/` (each checked against the
    /// authority and its file name), less the revoked devices. Read anew at every round,
    /// so a certificate or revocation list copied in takes effect without a restart.
    pub fn registry(&self) -> Result<(Registry, RevocationList), HostError> {
        let authority = self.authority()?;
        let mut registry = Registry::new(authority);
        let dir = self.devices_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.collect::<Result<Vec<_>, _>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(e),
        }
        .map_err(|e| HostError::invalid(&dir, e))?;
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(device) = name.strip_suffix(".cert.json") else {
                continue; // key files of the convenience enrolment, temporary files
            };
            let cert: Enrolment = read_json(&path)?;
            if cert.device.0 != device {
                return Err(HostError::invalid(
                    &path,
                    format!("certifies {:?}, not {device:?}", cert.device.0),
                ));
            }
            registry
                .enrol(cert)
                .map_err(|e| HostError::invalid(&path, e))?;
        }
        let revocations = read_revocations(&self.revocations_path(), &authority)?;
        registry.apply(&revocations);
        Ok((registry, revocations))
    }

    /// One-machine convenience (the demo, the tests): plays the authority in
    /// `authority` (created on first use) and enrols `device` of `fleet` with a key made
    /// here, written to its key file `devices/{id}.json`; the host's key and certificate
    /// are made too on first use. Re-enrolling replaces the device's key. A real fleet's
    /// devices make their keys themselves (`fedshield-edge keygen`).
    pub fn enrol(
        &self,
        authority: &AuthorityDir,
        fleet: &str,
        device: &str,
    ) -> Result<PathBuf, HostError> {
        check_level(device)?;
        check_level(fleet)?;
        let public = authority.open_or_init()?.public_key();
        std::fs::create_dir_all(&self.0).map_err(|e| HostError::invalid(&self.0, e))?;
        self.refuse_old_layout()?;
        install_public_key(
            &self.authority_path(),
            public,
            &format!("another authority than {}'s", authority.0.display()),
        )?;
        if read_existing(&self.host_cert_path())?.is_none() {
            self.keygen(fleet)?;
            let request: EnrolmentRequest = read_json(&self.host_request_path())?;
            let cert = authority.certify_host(
                &request,
                fedshield_store::unix_seconds(),
                DEFAULT_HOST_VALIDITY_S,
            )?;
            write_json(&self.host_cert_path(), &cert, Access::Public)?;
        }
        let (_, host) = self.host(fleet)?;
        let identity = Identity::generate(&mut rand::rng());
        let cert = authority.enrol(&EnrolmentRequest::new(&identity, device))?;
        let devices = self.devices_dir();
        std::fs::create_dir_all(&devices).map_err(|e| HostError::invalid(&devices, e))?;
        write_json(&self.device_cert_path(device), &cert, Access::Public)?;
        let key = DeviceKey {
            device: DeviceId(device.to_string()),
            secret: hex(&identity.secret()),
            authority: hex(&public),
            host: Some(HostKeyEntry::of(&host)),
        };
        let path = self.device_key_path(device);
        write_json(&path, &key, Access::Private)?;
        Ok(path)
    }
}

/// A public key file: 64 hex digits.
pub fn read_public_key(path: &Path) -> Result<[u8; 32], HostError> {
    let Some(bytes) = read_existing(path)? else {
        return Err(HostError::Config(format!(
            "{} is missing: copy the authority's authority.pub there",
            path.display()
        )));
    };
    let text = String::from_utf8(bytes).map_err(|e| HostError::invalid(path, e))?;
    unhex32(&text).map_err(|e| HostError::invalid(path, e))
}

/// A revocation list file, checked against `authority` (no file: the empty list).
fn read_revocations(path: &Path, authority: &[u8; 32]) -> Result<RevocationList, HostError> {
    if read_existing(path)?.is_none() {
        return Ok(RevocationList::default());
    }
    let list: RevocationList = read_json(path)?;
    list.verify(authority)
        .map_err(|e| HostError::invalid(path, e))?;
    Ok(list)
}

/// A JSON file (it must exist).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, HostError> {
    let bytes = read_existing(path)?.ok_or_else(|| HostError::invalid(path, "no such file"))?;
    serde_json::from_slice(&bytes).map_err(|e| HostError::invalid(path, e))
}

/// Writes `what` as pretty JSON, atomically.
pub fn write_json(path: &Path, what: &impl Serialize, access: Access) -> Result<(), HostError> {
    let json = serde_json::to_string_pretty(what).expect("certificates and lists encode");
    write_atomic(path, json.as_bytes(), access)?;
    Ok(())
}

/// Writes `key` to the public key file `path` when there is none; an existing file must
/// hold the same key (`mismatch` says what it is otherwise).
fn install_public_key(path: &Path, key: [u8; 32], mismatch: &str) -> Result<(), HostError> {
    if read_existing(path)?.is_none() {
        return write_atomic(path, format!("{}\n", hex(&key)).as_bytes(), Access::Public)
            .map_err(Into::into);
    }
    if read_public_key(path)? != key {
        return Err(HostError::invalid(path, mismatch));
    }
    Ok(())
}

/// The ed25519 key in `path` (`None` when the file does not exist).
fn read_key(path: &Path) -> Result<Option<Identity>, HostError> {
    let Some(bytes) = read_existing(path)? else {
        return Ok(None);
    };
    let secret: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| HostError::invalid(path, "not a 32-byte key"))?;
    Ok(Some(Identity::from_secret(secret)))
}

/// The ed25519 key in `path`, created (owner-only) when the file does not exist.
fn read_or_create_key(dir: &Path, path: &Path) -> Result<Identity, HostError> {
    if let Some(id) = read_key(path)? {
        return Ok(id);
    }
    std::fs::create_dir_all(dir).map_err(|e| HostError::invalid(dir, e))?;
    let id = Identity::generate(&mut rand::rng());
    write_atomic(path, &id.secret(), Access::Private)?;
    Ok(id)
}
