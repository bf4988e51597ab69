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
//! - **Device reports.** The held-out loss a device reports when it joins and its
//!   [`Evaluation`] of a global update are signed with its enrolled identity, under their own
//!   domain tags and with the round, and refused outside sane bounds
//!   ([`MAX_REPORTED_LOSS`], [`MAX_REPORTED_SECONDS`]).

use crate::ProtocolError;
use crate::fleet::steps::{DeviceStatus, Effort};
use crate::messages::{DownMessage, GlobalPart, RoundState, Route, SnapshotPart, Topics};
use fedshield_crypto::identity::{DeviceId, Identity, verify};
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
        let signature = host.sign(&Self::digest(topic, &payload));
        postcard::to_stdvec(&Self { payload, signature }).expect("envelopes encode")
    }

    /// Signs the postcard encoding of `message` for `topic`.
    pub fn seal_message<T: serde::Serialize>(host: &Identity, topic: &str, message: &T) -> Vec<u8> {
        Self::seal(
            host,
            topic,
            postcard::to_stdvec(message).expect("messages encode"),
        )
    }

    /// Decodes an envelope (at most `limit` bytes) and verifies it for `topic` under
    /// `host_key`; returns the payload.
    pub fn open(
        bytes: &[u8],
        host_key: &[u8; 32],
        topic: &str,
        limit: usize,
    ) -> Result<Vec<u8>, ProtocolError> {
        let envelope: Self = crate::decode(bytes, limit)?;
        if !verify(
            host_key,
            &Self::digest(topic, &envelope.payload),
            &envelope.signature,
        ) {
            return Err(ProtocolError::HostSignature(topic.to_string()));
        }
        Ok(envelope.payload)
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

/// Opens a message that arrived on `topic` for device `me`: `None` for topics that carry
/// nothing for it, else the message once the host's signature for that topic verifies and
/// the payload decodes within `limit` bytes (a global part is decompressed within `limit`
/// only after its signature checked).
pub fn open_downlink(
    topics: &Topics,
    host_key: &[u8; 32],
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
    let open = || -> Result<Downlink, ProtocolError> {
        let inner = HostSigned::open(payload, host_key, topic, limit)?;
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
            Route::Up(_) | Route::Status(_) => unreachable!("filtered above"),
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
