//! Device identities (ed25519), enrolment certificates and the host's registry.
//!
//! A fleet has an enrolment authority: an ed25519 key kept offline by the operator, whose
//! public key every device and the host are configured with. Enrolling a device means the
//! authority signs an [`Enrolment`] (device id + the device's public key). The host keeps the
//! certificates (public data only) and a revocation list in a [`Registry`]; devices check
//! their peers' certificates against the authority key, so a host cannot invent devices.

use crate::secagg::SecAggError;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::CryptoRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Domain separation of enrolment signatures.
const ENROLMENT_DOMAIN: &[u8] = b"fedshield/enrolment/v1";

/// Domain separation of host certificates: a device certificate can never pass for one.
/// Version 2 signs the serial number and the expiry too (version 1 certificates, without
/// them, no longer verify: re-certify such a host).
const HOST_CERTIFICATE_DOMAIN: &[u8] = b"fedshield/host-certificate/v2";

/// Domain separation of the self-signature of an enrolment request.
const REQUEST_DOMAIN: &[u8] = b"fedshield/enrolment-request/v1";

/// Domain separation of the authority's revocation lists (devices only).
const REVOCATION_DOMAIN: &[u8] = b"fedshield/revocations/v1";

/// Domain separation of revocation lists that also revoke host keys (a list without one
/// is signed as before, so existing lists stay valid).
const REVOCATION_HOSTS_DOMAIN: &[u8] = b"fedshield/revocations/v2";

/// A device's name in the fleet, unique per fleet (for example "edge-007").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub String);

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for DeviceId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// An ed25519 signing key: a device's identity, or the fleet's enrolment authority.
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(public {:02x?})", &self.public_key()[..4])
    }
}

impl Identity {
    /// A fresh identity.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self::from_secret(secret)
    }

    /// The identity with this 32-byte secret (as stored in the device's key file).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// The 32-byte secret, for the device's key file.
    pub fn secret(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signing.sign(message).to_bytes().to_vec()
    }

    /// As the enrolment authority: certifies that the aggregation host of `fleet` holds
    /// `public_key` (the key that signs everything the host broadcasts to the devices),
    /// as the fleet's host certificate number `serial` (each one issued for the fleet gets
    /// a higher number: a device that has seen one refuses every older one), valid until
    /// `not_after` (Unix seconds).
    pub fn certify_host(
        &self,
        fleet: &str,
        public_key: [u8; 32],
        serial: u64,
        not_after: u64,
    ) -> HostCertificate {
        let mut cert = HostCertificate {
            fleet: fleet.to_string(),
            public_key,
            serial,
            not_after,
            signature: Vec::new(),
        };
        cert.signature = self.sign(&cert.signed_bytes());
        cert
    }

    /// As the enrolment authority: certifies that `device` holds `public_key`.
    pub fn enrol(&self, device: DeviceId, public_key: [u8; 32]) -> Enrolment {
        let signature = self.sign(&Enrolment::signed_bytes(&device, &public_key));
        Enrolment {
            device,
            public_key,
            signature,
        }
    }
}

/// Verifies an ed25519 `signature` of `message` by `public_key`.
pub fn verify(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    key.verify(message, &sig).is_ok()
}

/// The authority's certificate that `device` holds `public_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// The device.
    pub device: DeviceId,
    /// Its ed25519 public key.
    pub public_key: [u8; 32],
    /// The authority's signature.
    pub signature: Vec<u8>,
}

impl Enrolment {
    fn signed_bytes(device: &DeviceId, public_key: &[u8; 32]) -> Vec<u8> {
        let mut m = ENROLMENT_DOMAIN.to_vec();
        m.extend(postcard::to_stdvec(&(device, public_key)).expect("encodable"));
        m
    }

    /// Checks the authority's signature.
    pub fn verify(&self, authority: &[u8; 32]) -> Result<(), SecAggError> {
        if verify(
            authority,
            &Self::signed_bytes(&self.device, &self.public_key),
            &self.signature,
        ) {
            Ok(())
        } else {
            Err(SecAggError::BadEnrolment(self.device.clone()))
        }
    }
}

/// The authority's certificate that the host of `fleet` holds `public_key`. Devices get it
/// with their key file; a host sends its current one with every round state, so a rotated
/// host key reaches the devices in-band (see `fedshield_protocol::signed::HostTrust`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCertificate {
    /// The fleet the host aggregates (its topic level).
    pub fleet: String,
    /// The host's ed25519 public key.
    pub public_key: [u8; 32],
    /// Increases with every host certificate the authority issues for the fleet.
    pub serial: u64,
    /// The end of its validity, Unix seconds.
    pub not_after: u64,
    /// The authority's signature.
    pub signature: Vec<u8>,
}

impl HostCertificate {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = HOST_CERTIFICATE_DOMAIN.to_vec();
        m.extend(
            postcard::to_stdvec(&(&self.fleet, &self.public_key, self.serial, self.not_after))
                .expect("encodable"),
        );
        m
    }

    /// Checks the authority's signature and that the certificate is for `fleet` (its
    /// validity period is [`HostCertificate::check_time`]'s).
    pub fn verify(&self, authority: &[u8; 32], fleet: &str) -> Result<(), SecAggError> {
        let signed = verify(authority, &self.signed_bytes(), &self.signature);
        if signed && self.fleet == fleet {
            Ok(())
        } else {
            Err(SecAggError::BadHostCertificate(self.fleet.clone()))
        }
    }

    /// Refuses the certificate at `now` (Unix seconds) when it has expired.
    pub fn check_time(&self, now: u64) -> Result<(), SecAggError> {
        if now < self.not_after {
            Ok(())
        } else {
            Err(SecAggError::HostCertificateExpired {
                serial: self.serial,
                not_after: self.not_after,
                now,
            })
        }
    }
}

/// What a device (or the host) sends the offline authority to be enrolled: its name and
/// public key, signed by the key itself (proof that the requester holds the secret, which
/// never leaves the machine it was born on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentRequest {
    /// The device id, or the fleet's name for a host's request.
    pub name: String,
    /// The requester's ed25519 public key.
    pub public_key: [u8; 32],
    /// The requester's signature over the domain, the name and the key.
    pub signature: Vec<u8>,
}

impl EnrolmentRequest {
    fn signed_bytes(name: &str, public_key: &[u8; 32]) -> Vec<u8> {
        let mut m = REQUEST_DOMAIN.to_vec();
        m.extend(postcard::to_stdvec(&(name, public_key)).expect("encodable"));
        m
    }

    /// `identity`'s request to be enrolled as `name`.
    pub fn new(identity: &Identity, name: &str) -> Self {
        let public_key = identity.public_key();
        Self {
            name: name.to_string(),
            public_key,
            signature: identity.sign(&Self::signed_bytes(name, &public_key)),
        }
    }

    /// Checks the self-signature.
    pub fn verify(&self) -> Result<(), SecAggError> {
        if verify(
            &self.public_key,
            &Self::signed_bytes(&self.name, &self.public_key),
            &self.signature,
        ) {
            Ok(())
        } else {
            Err(SecAggError::BadEnrolment(DeviceId(self.name.clone())))
        }
    }
}

/// The authority's list of revoked devices and host keys. Each list replaces the one before
/// and carries a higher serial number, so an old list (which would un-revoke a device) is
/// refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// Increases with every list the authority issues.
    pub serial: u64,
    /// The revoked devices.
    pub revoked: BTreeSet<DeviceId>,
    /// The revoked host keys (ed25519 public keys): devices refuse a host certificate of
    /// any of them. (Lists written before host keys could be revoked have none.)
    #[serde(default)]
    pub hosts: BTreeSet<[u8; 32]>,
    /// The authority's signature.
    pub signature: Vec<u8>,
}

impl RevocationList {
    fn signed_bytes(&self) -> Vec<u8> {
        if self.hosts.is_empty() {
            let mut m = REVOCATION_DOMAIN.to_vec();
            m.extend(postcard::to_stdvec(&(self.serial, &self.revoked)).expect("encodable"));
            m
        } else {
            let mut m = REVOCATION_HOSTS_DOMAIN.to_vec();
            m.extend(
                postcard::to_stdvec(&(self.serial, &self.revoked, &self.hosts)).expect("encodable"),
            );
            m
        }
    }

    fn next(&self, authority: &Identity, change: impl FnOnce(&mut Self)) -> Self {
        let mut list = self.clone();
        change(&mut list);
        list.serial = self.serial + 1;
        list.signature = authority.sign(&list.signed_bytes());
        list
    }

    /// As the authority: the list after this one with `device` added.
    pub fn revoke(&self, authority: &Identity, device: DeviceId) -> Self {
        self.next(authority, |l| {
            l.revoked.insert(device);
        })
    }

    /// As the authority: the list after this one with the host key `public_key` added.
    pub fn revoke_host(&self, authority: &Identity, public_key: [u8; 32]) -> Self {
        self.next(authority, |l| {
            l.hosts.insert(public_key);
        })
    }

    /// Checks the authority's signature (an empty list of serial 0 needs none).
    pub fn verify(&self, authority: &[u8; 32]) -> Result<(), SecAggError> {
        if self.serial == 0 && self.revoked.is_empty() && self.hosts.is_empty() {
            return Ok(());
        }
        if verify(authority, &self.signed_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(SecAggError::BadRevocations(self.serial))
        }
    }
}

/// The host's view of the fleet: enrolment certificates and revocations. Public data only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// The enrolment authority's public key.
    pub authority: [u8; 32],
    enrolled: BTreeMap<DeviceId, Enrolment>,
    revoked: BTreeSet<DeviceId>,
}

impl Registry {
    /// An empty registry for the authority with this public key.
    pub fn new(authority: [u8; 32]) -> Self {
        Self {
            authority,
            ..Self::default()
        }
    }

    /// Adds (or replaces, for a re-keyed device) a certificate, after checking it.
    pub fn enrol(&mut self, enrolment: Enrolment) -> Result<(), SecAggError> {
        enrolment.verify(&self.authority)?;
        if self.revoked.contains(&enrolment.device) {
            return Err(SecAggError::Revoked(enrolment.device));
        }
        self.enrolled.insert(enrolment.device.clone(), enrolment);
        Ok(())
    }

    /// Revokes a device: its messages are rejected from now on.
    pub fn revoke(&mut self, device: &DeviceId) {
        self.revoked.insert(device.clone());
        self.enrolled.remove(device);
    }

    /// The certificate of an enrolled, non-revoked device.
    pub fn enrolment(&self, device: &DeviceId) -> Result<&Enrolment, SecAggError> {
        if self.revoked.contains(device) {
            return Err(SecAggError::Revoked(device.clone()));
        }
        self.enrolled
            .get(device)
            .ok_or_else(|| SecAggError::UnknownDevice(device.clone()))
    }

    /// Applies a revocation list (already verified): its devices are refused from now on.
    pub fn apply(&mut self, list: &RevocationList) {
        for d in &list.revoked {
            self.revoke(d);
        }
    }

    /// The enrolled, non-revoked devices, in order.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceId> {
        self.enrolled.keys()
    }

    /// Number of enrolled devices.
    pub fn len(&self) -> usize {
        self.enrolled.len()
    }

    /// Whether no device is enrolled.
    pub fn is_empty(&self) -> bool {
        self.enrolled.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn enrolment_requests_prove_the_key_and_revocation_lists_the_authority() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let device = Identity::generate(&mut rng);
        let request = EnrolmentRequest::new(&device, "edge-7");
        assert_eq!(request.verify(), Ok(()));
        // Another name, or another key, under the same signature: refused.
        let renamed = EnrolmentRequest {
            name: "edge-8".into(),
            ..request.clone()
        };
        assert!(renamed.verify().is_err());
        let other = Identity::generate(&mut rng);
        let stolen = EnrolmentRequest {
            public_key: other.public_key(),
            ..request.clone()
        };
        assert!(stolen.verify().is_err());
        let authority = Identity::generate(&mut rng);
        let empty = RevocationList::default();
        assert_eq!(empty.verify(&authority.public_key()), Ok(()));
        let one = empty.revoke(&authority, DeviceId("edge-7".into()));
        let two = one.revoke(&authority, DeviceId("edge-1".into()));
        assert_eq!((one.serial, two.serial), (1, 2));
        assert_eq!(two.revoked.len(), 2);
        assert_eq!(two.verify(&authority.public_key()), Ok(()));
        assert!(two.verify(&other.public_key()).is_err());
        let mut shortened = two.clone();
        shortened.revoked.remove(&DeviceId("edge-7".into()));
        assert!(shortened.verify(&authority.public_key()).is_err());
        // Emptied but keeping its serial: the signature no longer matches.
        let emptied = RevocationList {
            revoked: BTreeSet::new(),
            ..two.clone()
        };
        assert!(emptied.verify(&authority.public_key()).is_err());
        // Host keys: a list revoking one is signed under its own domain; dropping the key
        // from it breaks the signature.
        let three = two.revoke_host(&authority, [7; 32]);
        assert_eq!((three.serial, three.hosts.len()), (3, 1));
        assert_eq!(three.verify(&authority.public_key()), Ok(()));
        let unrevoked = RevocationList {
            hosts: BTreeSet::new(),
            ..three.clone()
        };
        assert!(unrevoked.verify(&authority.public_key()).is_err());
        let mut registry = Registry::new(authority.public_key());
        for (id, key) in [("edge-7", &device), ("edge-3", &other)] {
            registry
                .enrol(authority.enrol(DeviceId(id.into()), key.public_key()))
                .unwrap();
        }
        registry.apply(&two);
        let names: Vec<_> = registry.devices().map(|d| d.0.as_str()).collect();
        assert_eq!(names, ["edge-3"]);
        assert_eq!(
            registry.enrolment(&DeviceId("edge-7".into())),
            Err(SecAggError::Revoked(DeviceId("edge-7".into())))
        );
    }

    #[test]
    fn host_certificates_verify_only_for_their_fleet_and_authority() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let authority = Identity::generate(&mut rng);
        let host = Identity::generate(&mut rng);
        let cert = authority.certify_host("lab", host.public_key(), 3, 1_000);
        assert_eq!(cert.verify(&authority.public_key(), "lab"), Ok(()));
        assert_eq!(cert.check_time(999), Ok(()));
        assert_eq!(
            cert.check_time(1_000),
            Err(SecAggError::HostCertificateExpired {
                serial: 3,
                not_after: 1_000,
                now: 1_000
            })
        );
        // A later expiry or another serial under the same signature: refused.
        for tampered in [
            HostCertificate {
                not_after: u64::MAX,
                ..cert.clone()
            },
            HostCertificate {
                serial: 4,
                ..cert.clone()
            },
        ] {
            assert!(tampered.verify(&authority.public_key(), "lab").is_err());
        }
        // Another fleet, another authority, another key: refused.
        assert!(cert.verify(&authority.public_key(), "prod").is_err());
        let other = Identity::generate(&mut rng);
        assert!(cert.verify(&other.public_key(), "lab").is_err());
        let mut swapped = cert.clone();
        swapped.public_key = other.public_key();
        assert!(swapped.verify(&authority.public_key(), "lab").is_err());
        // A device enrolment under the same name and key is no host certificate (domains).
        let enrolment = authority.enrol(DeviceId("lab".into()), host.public_key());
        let forged = HostCertificate {
            fleet: "lab".into(),
            public_key: host.public_key(),
            serial: 3,
            not_after: 1_000,
            signature: enrolment.signature,
        };
        assert!(forged.verify(&authority.public_key(), "lab").is_err());
    }
}
