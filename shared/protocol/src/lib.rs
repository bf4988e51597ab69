//! FedShield's round protocol, as pure state machines (no I/O, no clock, no threads):
//!
//! - [`messages`]: the payloads and the MQTT topic tree;
//! - [`host`]: the host's round ([`host::HostRound`]): joins, secure key aggregation,
//!   chunked uploads folded into the encrypted sum, decryption of the sum only;
//! - [`edge`]: a device's round ([`edge::EdgeSession`]);
//! - [`fleet`]: the host and a device across rounds ([`fleet::host::HostFleet`],
//!   [`fleet::edge::EdgeFleet`]): global adapter, history, snapshots, restarts;
//! - [`journal`]: the host's round journal, replayed by a restarted host to resume its round;
//! - [`weights`]: the FedAvg weights every member recomputes from the signed roster;
//! - [`signed`]: the host's signed broadcasts ([`signed::HostSigned`], opened by
//!   [`signed::open_downlink`]) and the devices' signed reports.
//!
//! The MQTT drivers (host and edge binaries) feed them messages and the time, and carry out
//! the actions they return.

pub mod edge;
pub mod fleet;
pub mod fold;
pub mod host;
pub mod journal;
pub mod keyfile;
pub mod messages;
pub mod shard;
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
    Refused(#[from] Refusal),
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
    /// The fleet's host is not trusted (expired, revoked or rotated-out certificate).
    #[error("host refused: {0}")]
    Host(#[from] signed::HostRefusal),
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
    /// A host broadcast of an older federation epoch than the one this device follows.
    #[error("stale host epoch {got}: this device follows epoch {have}")]
    StaleEpoch {
        /// The broadcast's epoch.
        got: u64,
        /// The device's.
        have: u64,
    },
    /// The round's announced FedAvg weights are not the ones the signed claims give.
    #[error("weights refused: {0}")]
    Weights(#[from] weights::WeightRefusal),
    /// A device report (join loss, evaluation) with a bad signature or value.
    #[error("report refused: {0}")]
    Report(#[from] signed::ReportRefusal),
    /// A round built on a global update other than the one this history has applied.
    #[error("out of sync: this history is of round {have}, the round was built on {built_on}")]
    OutOfSync {
        /// The round of the history at hand.
        have: u64,
        /// The round the configuration was built on.
        built_on: u64,
    },
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
            Self::Refused(r) => r.kind(),
            Self::BadName(_) => "bad-name",
            Self::Config(_) => "config",
            Self::Malformed(_) => "malformed",
            Self::HostSignature(_) => "host-signature",
            Self::Host(r) => r.kind(),
            Self::Stale { .. } => "stale",
            Self::StaleEpoch { .. } => "stale-epoch",
            Self::Weights(_) => "weights",
            Self::Report(_) => "report",
            Self::OutOfSync { .. } => "out-of-sync",
            Self::UploadRefused { .. } => "upload-refused",
        }
    }
}

/// Why the round protocol refused a message (a [`ProtocolError::Refused`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// A message signed by one device on another's uplink.
    #[error("message signed by {signer} on the uplink of {uplink}")]
    Impersonation {
        /// Who signed it.
        signer: fedshield_crypto::identity::DeviceId,
        /// Whose uplink carried it.
        uplink: fedshield_crypto::identity::DeviceId,
    },
    /// A join without an advert.
    #[error("{0}: a join must carry an advert")]
    NotAnAdvert(fedshield_crypto::identity::DeviceId),
    /// More joins than the body width can sum.
    #[error("{device}: the round is full ({cap} clients, the most {body_bits}-bit bodies can sum)")]
    RoundFull {
        /// The device turned away.
        device: fedshield_crypto::identity::DeviceId,
        /// The most contributions the width sums within its budget.
        cap: usize,
        /// The round's body width.
        body_bits: fedshield_crypto::params::BodyBits,
    },
    /// A message that belongs to another phase.
    #[error("{what} in phase {phase} of round {round}")]
    WrongPhase {
        /// The message.
        what: &'static str,
        /// The round's phase.
        phase: &'static str,
        /// The round.
        round: u64,
    },
    /// A message of another round.
    #[error("{what} for round {got}")]
    WrongRound {
        /// The message.
        what: &'static str,
        /// Its round.
        got: u64,
    },
    /// A second masked input.
    #[error("duplicate masked input from {0}")]
    DuplicateMaskedInput(fedshield_crypto::identity::DeviceId),
    /// An upload from a device outside the roster.
    #[error("{0} is not in the roster")]
    NotInRoster(fedshield_crypto::identity::DeviceId),
    /// A manifest without a valid signature.
    #[error("manifest from {0} is unsigned or its signature does not verify")]
    ManifestSignature(fedshield_crypto::identity::DeviceId),
    /// A manifest of the wrong size.
    #[error(
        "{device}: manifest of {bytes} bytes in {chunks} chunks, this round takes {expected} in {expected_chunks}"
    )]
    ManifestSize {
        /// The device.
        device: fedshield_crypto::identity::DeviceId,
        /// Bytes announced.
        bytes: u64,
        /// Chunks announced.
        chunks: usize,
        /// Bytes the round takes.
        expected: u64,
        /// Chunks the round takes.
        expected_chunks: u64,
    },
    /// A second manifest that differs from the first.
    #[error("{0} sent a second, different manifest")]
    SecondManifest(fedshield_crypto::identity::DeviceId),
    /// A chunk before its manifest.
    #[error("chunk from {0} before its manifest")]
    ChunkBeforeManifest(fedshield_crypto::identity::DeviceId),
    /// A chunk index the manifest does not have.
    #[error("chunk index {0} out of range")]
    ChunkIndex(u32),
    /// A chunk whose length or hash is not the manifest's.
    #[error("chunk {index} from {device} does not match its manifest")]
    ChunkMismatch {
        /// The device.
        device: fedshield_crypto::identity::DeviceId,
        /// The chunk.
        index: u32,
    },
    /// An evaluation report handed to the round machine (reports are the fleet's).
    #[error("evaluation reports are the fleet's, not the round's")]
    ReportInRound,
    /// An evaluation report of a round that has not finished.
    #[error("evaluation report of round {0}, which has not finished")]
    UnfinishedRound(u64),
    /// A manifest or chunk on the host's uplink in a round sharded over fold workers.
    #[error("{0} sent its upload to the host in a round sharded over fold workers")]
    ShardedUpload(fedshield_crypto::identity::DeviceId),
    /// A round announced for another adapter layout.
    #[error("round {0} is for another adapter layout")]
    OtherLayout(u64),
}

impl Refusal {
    /// A stable, machine-readable name of the refusal.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Impersonation { .. } => "impersonation",
            Self::NotAnAdvert(_) => "not-an-advert",
            Self::RoundFull { .. } => "round-full",
            Self::WrongPhase { .. } => "wrong-phase",
            Self::WrongRound { .. } => "wrong-round",
            Self::DuplicateMaskedInput(_) => "duplicate-masked-input",
            Self::NotInRoster(_) => "not-in-roster",
            Self::ManifestSignature(_) => "manifest-signature",
            Self::ManifestSize { .. } => "manifest-size",
            Self::SecondManifest(_) => "second-manifest",
            Self::ChunkBeforeManifest(_) => "chunk-before-manifest",
            Self::ChunkIndex(_) => "chunk-index",
            Self::ChunkMismatch { .. } => "chunk-mismatch",
            Self::ReportInRound => "report-in-round",
            Self::UnfinishedRound(_) => "unfinished-round",
            Self::OtherLayout(_) => "other-layout",
            Self::ShardedUpload(_) => "sharded-upload",
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
