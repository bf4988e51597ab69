//! Signatures outside the secure aggregation: what the host broadcasts to the devices, and
//! what the devices report to the host.
//!
//! - **Host broadcasts.** The fleet's host holds an ed25519 key certified by the fleet
//!   authority (`identity::HostCertificate`, installed on each device with its key file).
//!   Every message on a downlink topic (round state, share deliveries and upload refusals,
//!   global update parts, snapshot parts) travels as a [`HostSigned`] envelope whose
//!   signature covers a domain tag, the topic and the payload: a message signed for one
//!   topic (another fleet, another device, another part) does not verify on another.
//!   [`open_downlink`] verifies before anything is decompressed or decoded. Replays of a
//!   genuine older broadcast are refused by round and incarnation in the state machines.
//! - **Host key custody.** A host certificate has a serial number and an expiry. The host
//!   sends its certificate and the authority's latest revocation list with every round state
//!   ([`HostCredentials`], both signed by the authority, so they need no host signature); a
//!   device's [`HostTrust`] adopts a certificate of a higher serial (a rotated host key
//!   reaches the fleet in-band), refuses every older one once it has seen a newer one, and
//!   refuses all host messages while its certificate has expired or its key is revoked.
//! - **Device reports.** The held-out loss a device reports when it joins and its
//!   [`Evaluation`] of a global update are signed with its enrolled identity, under their own
//!   domain tags and with the round, and refused outside sane bounds
//!   ([`MAX_REPORTED_LOSS`], [`MAX_REPORTED_SECONDS`]).

use crate::ProtocolError;
use crate::fleet::steps::{DeviceStatus, Effort};
use crate::messages::{DownMessage, GlobalPart, RoundState, Route, SnapshotPart, Topics};
use fedshield_crypto::identity::{DeviceId, HostCertificate, Identity, RevocationList, verify};
use sha2::{Digest, Sha256};

const HOST_BROADCAST_DOMAIN: &[u8] = b"fedshield/host-broadcast/v1";
const JOIN_REPORT_DOMAIN: &[u8] = b"fedshield/join-report/v2";
const EVALUATION_DOMAIN: &[u8] = b"fedshield/evaluation/v2";

/// The largest held-out loss (mean cross-entropy per token, in nats) a report may carry:
/// a uniform guess over SmolLM2's 49,152 tokens costs 10.8; 100 is already nonsense.
pub const MAX_REPORTED_LOSS: f64 = 100.0;

/// The longest encryption time a report may carry (a day).
pub const MAX_REPORTED_SECONDS: f64 = 86_400.0;

/// Why a device report was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportRefusal {
    /// The signature does not verify under the device's enrolled key.
    #[error("{0}'s report is unsigned or its signature does not verify")]
    BadSignature(DeviceId),
    /// A value that is not finite, negative, or beyond its bound.
    #[error("{what} {value} outside 0..={bound}")]
    OutOfRange {
        /// Which value.
        what: &'static str,
        /// The value.
        value: f64,
        /// Its bound.
        bound: f64,
    },
    /// A value that is not finite or outside its interval.
    #[error("{what} {value} outside {low}..={high}")]
    OutOfInterval {
        /// Which value.
        what: &'static str,
        /// The value.
        value: f64,
        /// Its lower bound.
        low: f64,
        /// Its upper bound.
        high: f64,
    },
    /// A text longer than its bound.
    #[error("{what} of {len} bytes, at most {max}")]
    TextTooLong {
        /// Which text.
        what: &'static str,
        /// Its length.
        len: usize,
        /// Its bound.
        max: usize,
    },
}

/// Checks a reported value: finite, non-negative, at most `bound`.
pub fn check_value(what: &'static str, value: f64, bound: f64) -> Result<(), ReportRefusal> {
    if value.is_finite() && (0.0..=bound).contains(&value) {
        Ok(())
    } else {
        Err(ReportRefusal::OutOfRange { what, value, bound })
    }
}

/// A payload signed by the fleet's host for one topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostSigned {
    /// The postcard encoding of the topic's message.
    pub payload: Vec<u8>,
    /// The host's ed25519 signature of [`HostSigned::digest`].
    pub signature: Vec<u8>,
    /// On round states: the host's certificate and the authority's latest revocation list
    /// (signed by the authority, so outside the host's signature).
    pub credentials: Option<Box<HostCredentials>>,
}

/// What a host shows the devices with each round state: its certificate, and the newest
/// revocation list it has from the authority.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostCredentials {
    /// The host's certificate.
    pub certificate: HostCertificate,
    /// The authority's latest revocation list (serial 0: none issued yet).
    pub revocations: RevocationList,
}

impl HostSigned {
    /// What the signature covers: SHA-256 over the domain tag, the topic and the payload,
    /// each length-prefixed (the payload is hashed once, not copied).
    pub fn digest(topic: &str, payload: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [HOST_BROADCAST_DOMAIN, topic.as_bytes(), payload] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    /// Signs `payload` for `topic`; returns the envelope's wire bytes.
    pub fn seal(host: &Identity, topic: &str, payload: Vec<u8>) -> Vec<u8> {
        Self::seal_with(host, topic, payload, None)
    }

    /// Signs `payload` for `topic` and attaches `credentials`; returns the wire bytes.
    pub fn seal_with(
        host: &Identity,
        topic: &str,
        payload: Vec<u8>,
        credentials: Option<&HostCredentials>,
    ) -> Vec<u8> {
        let signature = host.sign(&Self::digest(topic, &payload));
        let envelope = Self {
            payload,
            signature,
            credentials: credentials.map(|c| Box::new(c.clone())),
        };
        postcard::to_stdvec(&envelope).expect("envelopes encode")
    }

    /// Signs the postcard encoding of `message` for `topic`.
    pub fn seal_message<T: serde::Serialize>(host: &Identity, topic: &str, message: &T) -> Vec<u8> {
        Self::seal(
            host,
            topic,
            postcard::to_stdvec(message).expect("messages encode"),
        )
    }

    /// Checks the signature for `topic` under `host_key`; returns the payload.
    fn verified(self, host_key: &[u8; 32], topic: &str) -> Result<Vec<u8>, ProtocolError> {
        if !verify(
            host_key,
            &Self::digest(topic, &self.payload),
            &self.signature,
        ) {
            return Err(ProtocolError::HostSignature(topic.to_string()));
        }
        Ok(self.payload)
    }

    /// Decodes an envelope (at most `limit` bytes) and verifies it for `topic` under
    /// `host_key`; returns the payload.
    pub fn open(
        bytes: &[u8],
        host_key: &[u8; 32],
        topic: &str,
        limit: usize,
    ) -> Result<Vec<u8>, ProtocolError> {
        crate::decode::<Self>(bytes, limit)?.verified(host_key, topic)
    }
}

/// The host's side of [`HostTrust`]: its identity, its certificate and the revocation list
/// it shows with every round state.
pub struct HostSigner {
    identity: Identity,
    credentials: HostCredentials,
}

impl HostSigner {
    /// Signs as `identity`, which `certificate` must certify.
    pub fn new(identity: Identity, certificate: HostCertificate) -> Result<Self, ProtocolError> {
        let mut signer = Self {
            identity,
            credentials: HostCredentials {
                certificate: certificate.clone(),
                revocations: RevocationList::default(),
            },
        };
        signer.renew(certificate)?;
        Ok(signer)
    }

    /// Shows `certificate` from now on: a renewal of this host's key (another key is
    /// refused; rotating to one means restarting with it).
    pub fn renew(&mut self, certificate: HostCertificate) -> Result<(), ProtocolError> {
        if certificate.public_key != self.identity.public_key() {
            return Err(ProtocolError::Config(format!(
                "host certificate {} certifies another key than this host's",
                certificate.serial
            )));
        }
        self.credentials.certificate = certificate;
        Ok(())
    }

    /// Shows `list` from now on (the caller verified it under the authority).
    pub fn set_revocations(&mut self, list: RevocationList) {
        self.credentials.revocations = list;
    }

    /// The certificate and revocation list shown.
    pub fn credentials(&self) -> &HostCredentials {
        &self.credentials
    }

    /// The signing identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Signs `payload` for `topic`.
    pub fn seal(&self, topic: &str, payload: Vec<u8>) -> Vec<u8> {
        HostSigned::seal(&self.identity, topic, payload)
    }

    /// Signs the postcard encoding of `message` for `topic`.
    pub fn seal_message<T: serde::Serialize>(&self, topic: &str, message: &T) -> Vec<u8> {
        HostSigned::seal_message(&self.identity, topic, message)
    }

    /// Signs a round state for `topic`, with the host's credentials attached.
    pub fn seal_round(&self, topic: &str, state: &RoundState) -> Vec<u8> {
        HostSigned::seal_with(
            &self.identity,
            topic,
            postcard::to_stdvec(state).expect("messages encode"),
            Some(&self.credentials),
        )
    }
}

/// Why a device refused its fleet's host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostRefusal {
    /// The host certificate has expired.
    #[error(
        "host certificate {serial} expired at {not_after} (Unix seconds; now {now}): waiting for the host to show a newer one"
    )]
    Expired {
        /// Its serial.
        serial: u64,
        /// Its expiry.
        not_after: u64,
        /// The time of the check.
        now: u64,
    },
    /// The host's key is on the authority's revocation list.
    #[error("host certificate {serial}'s key is revoked by revocation list {list}")]
    Revoked {
        /// The certificate's serial.
        serial: u64,
        /// The list that revokes it.
        list: u64,
    },
    /// A certificate older than one this device has seen (a rotated-out host key).
    #[error("host certificate {got} is older than certificate {have}, which replaced it")]
    Superseded {
        /// The certificate shown.
        got: u64,
        /// The newest this device has seen.
        have: u64,
    },
    /// Another certificate under a serial this device already holds one of.
    #[error("host certificate {0} differs from the certificate of that serial this device holds")]
    Conflicting(u64),
}

impl HostRefusal {
    /// A stable, machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Expired { .. } => "host-expired",
            Self::Revoked { .. } => "host-revoked",
            Self::Superseded { .. } => "host-superseded",
            Self::Conflicting(_) => "host-conflicting",
        }
    }
}

/// What a device trusts its fleet's host by: the authority's key, the newest host
/// certificate it has seen (from its key file, then from round states) and the newest
/// revocation list. Kept by the device across restarts ([`HostTrust::saved`]): once a
/// device has seen host certificate n, no restart makes it accept n - 1 again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTrust {
    authority: [u8; 32],
    credentials: HostCredentials,
    changed: bool,
}

impl HostTrust {
    /// Trust in `certificate` (from the device's key file) under `authority`, for `fleet`,
    /// then in what the device saved before (`saved`, from [`HostTrust::saved`]), whose
    /// certificate and list must verify under the same authority.
    pub fn new(
        authority: [u8; 32],
        fleet: &str,
        certificate: HostCertificate,
        saved: Option<HostCredentials>,
    ) -> Result<Self, ProtocolError> {
        certificate.verify(&authority, fleet)?;
        let mut trust = Self {
            authority,
            credentials: HostCredentials {
                certificate,
                revocations: RevocationList::default(),
            },
            changed: false,
        };
        if let Some(saved) = saved {
            trust.adopt(&saved, None)?;
            trust.changed = false;
        }
        Ok(trust)
    }

    /// The certificate and list trusted now (to save when [`HostTrust::take_changed`]).
    pub fn saved(&self) -> &HostCredentials {
        &self.credentials
    }

    /// Whether the trust changed since the last call (a rotated certificate or a newer
    /// revocation list: the device saves it).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The host key that messages must be signed with at `now` (Unix seconds), unless the
    /// certificate has expired or its key is revoked.
    pub fn key(&self, now: u64) -> Result<[u8; 32], ProtocolError> {
        let cert = &self.credentials.certificate;
        Self::usable(cert, &self.credentials.revocations, now)?;
        Ok(cert.public_key)
    }

    fn usable(cert: &HostCertificate, list: &RevocationList, now: u64) -> Result<(), HostRefusal> {
        if list.hosts.contains(&cert.public_key) {
            return Err(HostRefusal::Revoked {
                serial: cert.serial,
                list: list.serial,
            });
        }
        if now >= cert.not_after {
            return Err(HostRefusal::Expired {
                serial: cert.serial,
                not_after: cert.not_after,
                now,
            });
        }
        Ok(())
    }

    /// Learns from the credentials a round state came with, at `now`: a newer revocation
    /// list is adopted; a newer certificate is adopted when it is valid at `now` and not
    /// revoked; an older one, or another one of the same serial, is refused.
    pub fn learn(&mut self, shown: &HostCredentials, now: u64) -> Result<(), ProtocolError> {
        self.adopt(shown, Some(now))
    }

    fn adopt(&mut self, shown: &HostCredentials, now: Option<u64>) -> Result<(), ProtocolError> {
        let fleet = self.credentials.certificate.fleet.clone();
        shown.revocations.verify(&self.authority)?;
        if shown.revocations.serial > self.credentials.revocations.serial {
            self.credentials.revocations = shown.revocations.clone();
            self.changed = true;
        }
        let have = &self.credentials.certificate;
        let cert = &shown.certificate;
        if cert.serial < have.serial {
            return Err(HostRefusal::Superseded {
                got: cert.serial,
                have: have.serial,
            }
            .into());
        }
        if cert.serial == have.serial {
            return if cert == have {
                Ok(())
            } else {
                Err(HostRefusal::Conflicting(cert.serial).into())
            };
        }
        cert.verify(&self.authority, &fleet)?;
        if let Some(now) = now {
            // Shown by a host: adopted only when usable. (Restored from the device's own
            // file: kept as it was; `key` refuses it if it is revoked or expired.)
            Self::usable(cert, &self.credentials.revocations, now)?;
        }
        self.credentials.certificate = cert.clone();
        self.changed = true;
        Ok(())
    }
}

/// A verified downlink message.
#[derive(Debug, Clone, PartialEq)]
pub enum Downlink {
    /// `fedshield/{f}/round`.
    Round(RoundState),
    /// `fedshield/{f}/down/{me}`.
    Down(DownMessage),
    /// `fedshield/{f}/global/{i}`.
    Global(GlobalPart),
    /// `fedshield/{f}/snapshot/{i}`.
    Snapshot(SnapshotPart),
}

/// Opens a message that arrived on `topic` for device `me` at `now` (Unix seconds): `None`
/// for topics that carry nothing for it, else the message once the host's signature for
/// that topic verifies under the key `trust` holds and the payload decodes within `limit`
/// bytes (a global part is decompressed within `limit` only after its signature checked).
/// A round state's credentials update `trust` first (a rotated host key, a newer
/// revocation list).
pub fn open_downlink(
    topics: &Topics,
    trust: &mut HostTrust,
    now: u64,
    me: &DeviceId,
    topic: &str,
    payload: &[u8],
    limit: usize,
) -> Option<Result<Downlink, ProtocolError>> {
    let route = topics.route(topic)?;
    match &route {
        Route::Round | Route::Global(_) | Route::Snapshot(_) => {}
        Route::Down(d) if d == me => {}
        _ => return None,
    }
    let mut open = || -> Result<Downlink, ProtocolError> {
        let envelope: HostSigned = crate::decode(payload, limit)?;
        if let (Route::Round, Some(shown)) = (&route, &envelope.credentials) {
            trust.learn(shown, now)?;
        }
        let inner = envelope.verified(&trust.key(now)?, topic)?;
        Ok(match route {
            Route::Round => Downlink::Round(crate::decode(&inner, limit)?),
            Route::Down(_) => Downlink::Down(crate::decode(&inner, limit)?),
            Route::Global(_) => {
                let compressed: fedshield_wire::Compressed = crate::decode(&inner, limit)?;
                let raw = compressed
                    .into_bytes(limit)
                    .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
                Downlink::Global(crate::decode(&raw, limit)?)
            }
            Route::Snapshot(_) => Downlink::Snapshot(crate::decode(&inner, limit)?),
            Route::Up(_)
            | Route::Status(_)
            | Route::Upload(..)
            | Route::FoldCommand(_)
            | Route::FoldReport(_) => unreachable!("filtered above"),
        })
    };
    Some(open())
}

/// What a device's join signature covers: a domain tag, the device, the round joined and
/// the held-out loss and the status it reports (its sample count is in the signed advert).
pub fn join_report_bytes(
    device: &DeviceId,
    round: u64,
    eval_loss: Option<f64>,
    status: &DeviceStatus,
) -> Vec<u8> {
    let mut m = JOIN_REPORT_DOMAIN.to_vec();
    m.extend(postcard::to_stdvec(&(device, round, eval_loss, status)).expect("encodable"));
    m
}

/// A device's evaluation of a round's global adapter, signed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// The round whose global adapter was evaluated.
    pub round: u64,
    /// Mean held-out loss per target token.
    pub eval_loss: f64,
    /// Seconds the device spent encrypting its update in that round.
    pub encrypt_seconds: f64,
    /// Its local training of that round (steps, tokens, throttling, energy), when it
    /// trained the round.
    pub training: Option<Effort>,
    /// The device's ed25519 signature of [`Evaluation::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Evaluation {
    /// What the signature covers: a domain tag, the device and every field above.
    pub fn signed_bytes(&self, device: &DeviceId) -> Vec<u8> {
        let mut m = EVALUATION_DOMAIN.to_vec();
        m.extend(
            postcard::to_stdvec(&(
                device,
                self.round,
                self.eval_loss,
                self.encrypt_seconds,
                &self.training,
            ))
            .expect("encodable"),
        );
        m
    }

    /// Signs a report as `device`.
    pub fn sign(
        identity: &Identity,
        device: &DeviceId,
        round: u64,
        eval_loss: f64,
        encrypt_seconds: f64,
        training: Option<Effort>,
    ) -> Self {
        let mut e = Self {
            round,
            eval_loss,
            encrypt_seconds,
            training,
            signature: Vec::new(),
        };
        e.signature = identity.sign(&e.signed_bytes(device));
        e
    }

    /// Checks the signature under `device`'s enrolled key and the values' bounds.
    pub fn verify(&self, device: &DeviceId, public_key: &[u8; 32]) -> Result<(), ReportRefusal> {
        if !verify(public_key, &self.signed_bytes(device), &self.signature) {
            return Err(ReportRefusal::BadSignature(device.clone()));
        }
        check_value("held-out loss", self.eval_loss, MAX_REPORTED_LOSS)?;
        check_value(
            "encryption seconds",
            self.encrypt_seconds,
            MAX_REPORTED_SECONDS,
        )?;
        match &self.training {
            Some(effort) => effort.check(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(cert: &HostCertificate, revocations: &RevocationList) -> HostCredentials {
        HostCredentials {
            certificate: cert.clone(),
            revocations: revocations.clone(),
        }
    }

    #[test]
    fn host_trust_follows_newer_certificates_and_lists_and_never_goes_back() {
        let authority = Identity::from_secret([1; 32]);
        let (k1, k2, k3) = ([2; 32], [3; 32], [4; 32]);
        let c1 = authority.certify_host("lab", k1, 1, 100);
        let c2 = authority.certify_host("lab", k2, 2, 200);
        let none = RevocationList::default();
        let mut trust = HostTrust::new(authority.public_key(), "lab", c1.clone(), None).unwrap();
        assert_eq!(trust.key(50), Ok(k1));
        // Certificate 2 is adopted (and saved); certificate 1 is refused from then on.
        trust.learn(&shown(&c2, &none), 50).unwrap();
        assert!(trust.take_changed());
        assert_eq!(trust.key(150), Ok(k2));
        let back = trust.learn(&shown(&c1, &none), 50).unwrap_err();
        assert_eq!(back.kind(), "host-superseded");
        // Another certificate under serial 2, or one for another fleet or authority.
        let twin = authority.certify_host("lab", k3, 2, 200);
        assert_eq!(
            trust.learn(&shown(&twin, &none), 50).unwrap_err().kind(),
            "host-conflicting"
        );
        let other_fleet = authority.certify_host("prod", k3, 3, 200);
        assert!(trust.learn(&shown(&other_fleet, &none), 50).is_err());
        let stranger = Identity::from_secret([9; 32]).certify_host("lab", k3, 3, 200);
        assert!(trust.learn(&shown(&stranger, &none), 50).is_err());
        assert!(!trust.take_changed());
        // A newer certificate that has expired, or whose key is revoked, is not adopted.
        let stale = authority.certify_host("lab", k3, 3, 60);
        assert_eq!(
            trust.learn(&shown(&stale, &none), 60).unwrap_err().kind(),
            "host-expired"
        );
        let revoked = none.revoke_host(&authority, k3);
        let c3 = authority.certify_host("lab", k3, 3, 300);
        assert_eq!(
            trust.learn(&shown(&c3, &revoked), 60).unwrap_err().kind(),
            "host-revoked"
        );
        // ... but the list itself was: the current key stays usable, k3 never will be.
        assert!(trust.take_changed());
        assert_eq!(trust.key(60), Ok(k2));
        // An older list does not un-revoke anything; a forged one is refused.
        trust.learn(&shown(&c2, &none), 60).unwrap();
        assert_eq!(trust.saved().revocations, revoked);
        let mut forged = revoked.revoke_host(&authority, k2);
        forged.hosts.clear();
        assert!(trust.learn(&shown(&c2, &forged), 60).is_err());
        // The current key revoked: refused. Expired: refused.
        let k2_revoked = revoked.revoke_host(&authority, k2);
        trust.learn(&shown(&c2, &k2_revoked), 60).unwrap();
        assert_eq!(trust.key(60).unwrap_err().kind(), "host-revoked");
        let fresh = HostTrust::new(authority.public_key(), "lab", c2.clone(), None).unwrap();
        assert_eq!(fresh.key(200).unwrap_err().kind(), "host-expired");
        // Restored from what the device saved: its key file's older certificate does not
        // win; a saved file of another authority is refused.
        let restored = HostTrust::new(
            authority.public_key(),
            "lab",
            c1.clone(),
            Some(trust.saved().clone()),
        )
        .unwrap();
        assert_eq!(restored.saved(), trust.saved());
        assert!(
            HostTrust::new(
                authority.public_key(),
                "lab",
                c1,
                Some(shown(&stranger, &none))
            )
            .is_err()
        );
    }
}
