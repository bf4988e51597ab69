//! FedShield cryptography.
//!
//! Updates are encrypted as packed GLWE ciphertexts with tfhe-rs `core_crypto`: one ciphertext
//! carries [`params::POLYNOMIAL_SIZE`] values, addition is coefficient-wise, so the host sums
//! ciphertexts without decrypting anything. Every client of a round derives the ciphertext
//! masks from the round's public seed, so only the bodies travel; each client encrypts under
//! a fresh secret key of its own, and the host can decrypt the sum only with the sum of the
//! keys of the clients that contributed.
//!
//! This crate does no I/O and keeps no global state: every function takes its inputs and
//! randomness sources explicitly.

pub mod encoding;
pub mod identity;
pub mod negacyclic;
pub mod packed;
pub mod params;
pub mod secagg;
pub mod shamir;

/// Errors of this crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Two things that must have the same length do not.
    #[error("length mismatch: {what}: expected {expected}, got {got}")]
    LengthMismatch {
        /// What was being compared.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// A parameter is out of its documented range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}
