//! FedShield's round protocol, as pure state machines (no I/O, no clock, no threads):
//!
//! - [`messages`]: the payloads and the MQTT topic tree;
//! - [`host`]: the host's round ([`host::HostRound`]): joins, secure key aggregation,
//!   chunked uploads folded into the encrypted sum, decryption of the sum only;
//! - [`edge`]: a device's round ([`edge::EdgeSession`]);
//! - [`journal`]: the host's round journal, replayed by a restarted host to resume its round;
//! - [`weights`]: the FedAvg weights every member recomputes from the signed roster;
//! - [`signed`]: the host's signed broadcasts ([`signed::HostSigned`], opened by
//!   [`signed::open_downlink`]) and the devices' signed reports.
//!
//! The MQTT drivers (host and edge binaries) feed them messages and the time, and carry out
//! the actions they return.

pub mod edge;
pub mod host;
pub mod journal;
pub mod keyfile;
pub mod messages;
pub mod signed;
pub mod weights;

/// Why a message or step was refused. A refused message changes nothing; the driver logs
/// the reason and the round goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// Refused by the secure aggregation.
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] fedshield_crypto::secagg::SecAggError),
    /// Refused by the round protocol.
    #[error("refused: {0}")]
    Refused(String),
    /// A fleet or device name that is not one MQTT topic level.
    #[error("invalid name {0:?}: one topic level without '/', '+', '#' or control characters")]
    BadName(String),
    /// An invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A payload that does not decode.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A downlink message that the fleet's certified host did not sign for its topic.
    #[error("not signed by the fleet's host for {0}")]
    HostSignature(String),
    /// A host broadcast older than one already seen (a replay).
    #[error(
        "stale {what}: round {got_round} incarnation {got_incarnation}, this device is at round {round} incarnation {incarnation}"
    )]
    Stale {
        /// What was refused.
        what: &'static str,
        /// Its round.
        got_round: u64,
        /// Its incarnation (0 for messages without one).
        got_incarnation: u32,
        /// The latest round seen.
        round: u64,
        /// The latest incarnation seen of that round.
        incarnation: u32,
    },
    /// The round's announced FedAvg weights are not the ones the signed claims give.
    #[error("weights refused: {0}")]
    Weights(#[from] weights::WeightRefusal),
    /// A device report (join loss, evaluation) with a bad signature or value.
    #[error("report refused: {0}")]
    Report(#[from] signed::ReportRefusal),
    /// The host dropped a device's upload of the round (told to the device).
    #[error("upload of {device} in round {round} refused: {reason}")]
    UploadRefused {
        /// The device.
        device: fedshield_crypto::identity::DeviceId,
        /// The round.
        round: u64,
        /// Why.
        reason: messages::UploadRefusal,
    },
}

impl ProtocolError {
    /// A stable, machine-readable name of the refusal (for event logs and tests).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SecAgg(_) => "secagg",
            Self::Refused(_) => "refused",
            Self::BadName(_) => "bad-name",
            Self::Config(_) => "config",
            Self::Malformed(_) => "malformed",
            Self::HostSignature(_) => "host-signature",
            Self::Stale { .. } => "stale",
            Self::Weights(_) => "weights",
            Self::Report(_) => "report",
            Self::UploadRefused { .. } => "upload-refused",
        }
    }
}

/// Decodes a postcard payload, refusing trailing bytes and anything over `limit` bytes.
pub fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
) -> Result<T, ProtocolError> {
    if bytes.len() > limit {
        return Err(ProtocolError::Malformed(format!(
            "{} bytes, the limit is {limit}",
            bytes.len()
        )));
    }
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}
