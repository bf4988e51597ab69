//! FedShield's round protocol, as pure state machines (no I/O, no clock, no threads):
//!
//! - [`messages`]: the payloads and the MQTT topic tree;
//! - [`host`]: the host's round ([`host::HostRound`]): joins, secure key aggregation,
//!   chunked uploads folded into the encrypted sum, decryption of the sum only;
//! - [`edge`]: a device's round ([`edge::EdgeSession`]);
//! - [`journal`]: the host's round journal, replayed by a restarted host to resume its round.
//!
//! The MQTT drivers (host and edge binaries) feed them messages and the time, and carry out
//! the actions they return.

pub mod edge;
pub mod host;
pub mod journal;
pub mod keyfile;
pub mod messages;

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
