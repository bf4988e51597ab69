//! Named cryptographic parameters. SECURITY.md gives the security source and the noise and
//! rounding budget of each.

/// GLWE polynomial size N: values packed per ciphertext. Source: tfhe-rs 1.8
/// `V1_4_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128` (GLWE side), 128-bit security.
pub const POLYNOMIAL_SIZE: usize = 2048;

/// GLWE dimension k (mask polynomials per ciphertext), same source as [`POLYNOMIAL_SIZE`].
pub const GLWE_DIMENSION: usize = 1;

/// log2 of the bound B of the TUniform noise distribution: each noise coefficient is drawn
/// from [-2^B, 2^B]. Same source as [`POLYNOMIAL_SIZE`].
pub const NOISE_TUNIFORM_LOG2: u32 = 17;

/// Ciphertext modulus: the native 2^64 of u64 arithmetic.
pub const CIPHERTEXT_MODULUS_LOG2: u32 = 64;

/// Largest number of clients whose contributions may be summed in one round. The noise and
/// rounding budget (SECURITY.md) is computed for this count.
pub const MAX_CLIENTS: usize = 1000;
