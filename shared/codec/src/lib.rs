//! FedShield's update codec: what a client sends of its LoRA update, and how the host turns
//! the aggregate back into the global update.
//!
//! - [`layout`]: the flat order of the adapter's values, identical on host and clients.
//! - [`select`]: the round's pruning mask, computed from public data only, with per-layer
//!   schedules and structured options.
//! - [`codec`]: error feedback (nothing unsent is lost), clipping and fixed-point encoding
//!   shared by the encrypted path and the plaintext baseline.
//! - [`global`]: the global adapter and its history: each round's mask, and the global
//!   update decoded and applied (one place for host, devices and experiments).
//! - [`plot`]: SVG line plots for experiment and run reports.
//! - [`quant`]: the global update quantized for the wire, with the host's error feedback.
//!
//! No I/O, no global state.

pub mod codec;
pub mod global;
pub mod layout;
pub mod plot;
pub mod quant;
pub mod select;

pub use codec::{ErrorFeedback, PlainSum, Prepared, apply, decode_values};
pub use global::Global;
pub use layout::{
    DEFAULT_LORA_DROPOUT, Layout, PairSpec, PeftConfig, init_adapter, to_safetensors,
};
pub use quant::{Downlink, DownlinkFormat, Q8, Q8_BLOCK};
pub use select::{History, PruneConfig, Schedule, Selection, Structure, select};

/// Errors of the codec.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    /// The adapter layout is invalid.
    #[error("layout: {0}")]
    Layout(String),
    /// A configuration value is out of range or unparsable.
    #[error("configuration: {0}")]
    Config(String),
    /// Two lengths that must agree do not.
    #[error("length mismatch: {what}: expected {expected}, got {got}")]
    Length {
        /// What was compared.
        what: &'static str,
        /// Required length.
        expected: usize,
        /// Received length.
        got: usize,
    },
    /// Rounds must increase.
    #[error("round {got} does not come after round {expected_after}")]
    Round {
        /// The last round seen.
        expected_after: u64,
        /// The round received.
        got: u64,
    },
    /// The fixed-point encoding refused its input.
    #[error(transparent)]
    Encoding(#[from] fedshield_crypto::CryptoError),
}

impl CodecError {
    /// `Ok` when `got == expected`, else [`CodecError::Length`] naming `what`.
    pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), Self> {
        if got == expected {
            Ok(())
        } else {
            Err(Self::Length {
                what,
                expected,
                got,
            })
        }
    }
}
