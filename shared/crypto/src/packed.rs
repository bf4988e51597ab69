//! Packed GLWE encryption of encoded update vectors with a mask shared by the round.
//!
//! A client encrypts a vector of u64 plaintexts as ceil(len / N) GLWE ciphertexts under its
//! own fresh binary key. The masks come from the round's public [`MaskSeed`], identical on
//! every client, so the host only receives the bodies, and of each body only its top 32 bits
//! ([`BODY_BITS`]); the dropped low bits add a public, bounded rounding error.
//!
//! Summing the bodies of several clients yields a GLWE ciphertext of the sum of their
//! plaintexts under the sum of their keys: it decrypts with that key sum and with nothing
//! less.

use crate::CryptoError;
use crate::params::{GLWE_DIMENSION, NOISE_TUNIFORM_LOG2, POLYNOMIAL_SIZE};
use tfhe::core_crypto::commons::math::random::Seed;
use tfhe::core_crypto::prelude::*;

/// Bits of each ciphertext body that travel: the top 32 of 64.
pub const BODY_BITS: u32 = 32;

/// The public per-round seed from which every client derives the same ciphertext masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaskSeed(pub u128);

/// A client's secret GLWE key for one round: N binary coefficients (k = 1).
#[derive(Clone)]
pub struct ClientKey(GlweSecretKeyOwned<u64>);

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

impl ClientKey {
    /// Draws a fresh key from the CSPRNG seeded by `seeder` (the OS entropy source in
    /// production: [`tfhe::core_crypto::seeders::new_seeder`]).
    pub fn generate(seeder: &mut dyn Seeder) -> Self {
        let mut generator = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        Self(allocate_and_generate_new_binary_glwe_secret_key(
            GlweDimension(GLWE_DIMENSION),
            PolynomialSize(POLYNOMIAL_SIZE),
            &mut generator,
        ))
    }

    /// The key's coefficients (each 0 or 1), the vector the secure key aggregation sums.
    pub fn coefficients(&self) -> &[u64] {
        self.0.as_ref()
    }
}

/// Number of GLWE ciphertexts needed for `len` values.
pub fn ciphertext_count(len: usize) -> usize {
    len.div_ceil(POLYNOMIAL_SIZE)
}

/// One client's encrypted update: the top [`BODY_BITS`] of each ciphertext body coefficient,
/// `ciphertext_count(len) * N` of them, for `len` plaintext values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncryptedUpdate {
    /// Number of plaintext values encrypted.
    pub len: usize,
    /// Truncated bodies, N per ciphertext.
    pub bodies: Vec<u32>,
}

/// Encrypts `plaintexts` under `key` with masks from `seed`; noise comes from `noise_seeder`.
pub fn encrypt(
    key: &ClientKey,
    seed: MaskSeed,
    plaintexts: &[u64],
    noise_seeder: &mut dyn Seeder,
) -> EncryptedUpdate {
    let count = ciphertext_count(plaintexts.len());
    let mut padded = plaintexts.to_vec();
    padded.resize(count * POLYNOMIAL_SIZE, 0);
    let mut list = SeededGlweCiphertextList::new(
        0u64,
        GlweSize(GLWE_DIMENSION + 1),
        PolynomialSize(POLYNOMIAL_SIZE),
        GlweCiphertextCount(count),
        Seed(seed.0).into(),
        CiphertextModulus::new_native(),
    );
    encrypt_seeded_glwe_ciphertext_list(
        &key.0,
        &mut list,
        &PlaintextList::from_container(padded),
        TUniform::<u64>::new(NOISE_TUNIFORM_LOG2),
        noise_seeder,
    );
    let bodies = list
        .into_container()
        .into_iter()
        .map(truncate_body)
        .collect();
    EncryptedUpdate {
        len: plaintexts.len(),
        bodies,
    }
}

/// Keeps the top [`BODY_BITS`] of a body coefficient, rounded to nearest.
fn truncate_body(b: u64) -> u32 {
    (b.wrapping_add(1 << (63 - BODY_BITS)) >> (64 - BODY_BITS)) as u32
}

/// Running sum of encrypted updates. Memory is one u32 per ciphertext coefficient, however
/// many clients contribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    len: usize,
    sum: Vec<u32>,
    contributions: usize,
}

impl Aggregate {
    /// An empty aggregate for updates of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            len,
            sum: vec![0; ciphertext_count(len) * POLYNOMIAL_SIZE],
            contributions: 0,
        }
    }

    /// Adds one client's bodies (wrapping, coefficient-wise).
    pub fn add(&mut self, update: &EncryptedUpdate) -> Result<(), CryptoError> {
        if update.len != self.len || update.bodies.len() != self.sum.len() {
            return Err(CryptoError::LengthMismatch {
                what: "encrypted update",
                expected: self.sum.len(),
                got: update.bodies.len(),
            });
        }
        for (s, b) in self.sum.iter_mut().zip(&update.bodies) {
            *s = s.wrapping_add(*b);
        }
        self.contributions += 1;
        Ok(())
    }

    /// Number of updates added.
    pub fn contributions(&self) -> usize {
        self.contributions
    }

    /// Decrypts the sum with `key_sum`, the coefficient-wise sum of the keys of exactly the
    /// clients whose updates were added. Returns `len` plaintext sums.
    pub fn decrypt(&self, seed: MaskSeed, key_sum: &[u64]) -> Result<Vec<u64>, CryptoError> {
        if key_sum.len() != GLWE_DIMENSION * POLYNOMIAL_SIZE {
            return Err(CryptoError::LengthMismatch {
                what: "key sum",
                expected: GLWE_DIMENSION * POLYNOMIAL_SIZE,
                got: key_sum.len(),
            });
        }
        let count = self.sum.len() / POLYNOMIAL_SIZE;
        let bodies: Vec<u64> = self
            .sum
            .iter()
            .map(|&s| (s as u64) << (64 - BODY_BITS))
            .collect();
        let seeded = SeededGlweCiphertextList::from_container(
            bodies,
            GlweSize(GLWE_DIMENSION + 1),
            PolynomialSize(POLYNOMIAL_SIZE),
            Seed(seed.0).into(),
            CiphertextModulus::new_native(),
        );
        debug_assert_eq!(seeded.glwe_ciphertext_count().0, count);
        let list = seeded.decompress_into_glwe_ciphertext_list();
        let key = GlweSecretKey::from_container(key_sum.to_vec(), PolynomialSize(POLYNOMIAL_SIZE));
        let mut out = PlaintextList::new(0u64, PlaintextCount(count * POLYNOMIAL_SIZE));
        decrypt_glwe_ciphertext_list(&key, &list, &mut out);
        let mut out = out.into_container();
        out.truncate(self.len);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfhe::core_crypto::commons::generators::DeterministicSeeder;

    fn seeder(seed: u128) -> DeterministicSeeder<DefaultRandomGenerator> {
        DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(seed))
    }

    #[test]
    fn sum_of_three_clients_decrypts_with_key_sum_only() {
        let mut s = seeder(1);
        let round = MaskSeed(0xfeed);
        let len = 3 * POLYNOMIAL_SIZE + 5;
        let keys: Vec<ClientKey> = (0..3).map(|_| ClientKey::generate(&mut s)).collect();
        let msgs: Vec<Vec<u64>> = (0..3u64)
            .map(|c| {
                (0..len as u64)
                    .map(|i| ((i * 7 + c) % 1000) << 50)
                    .collect()
            })
            .collect();
        let mut agg = Aggregate::new(len);
        for (k, m) in keys.iter().zip(&msgs) {
            agg.add(&encrypt(k, round, m, &mut s)).unwrap();
        }
        let key_sum: Vec<u64> = (0..POLYNOMIAL_SIZE)
            .map(|j| keys.iter().map(|k| k.coefficients()[j]).sum())
            .collect();
        let got = agg.decrypt(round, &key_sum).unwrap();
        for i in 0..len {
            let want = msgs.iter().fold(0u64, |a, m| a.wrapping_add(m[i]));
            let err = got[i].wrapping_sub(want) as i64;
            assert!(err.unsigned_abs() < 3 << 31, "coefficient {i}: error {err}");
        }
        // Two of the three keys do not decrypt the three-client sum.
        let partial: Vec<u64> = (0..POLYNOMIAL_SIZE)
            .map(|j| keys[..2].iter().map(|k| k.coefficients()[j]).sum())
            .collect();
        let wrong = agg.decrypt(round, &partial).unwrap();
        let close = (0..len)
            .filter(|&i| {
                let want = msgs.iter().fold(0u64, |a, m| a.wrapping_add(m[i]));
                (wrong[i].wrapping_sub(want) as i64).unsigned_abs() < 1 << 40
            })
            .count();
        assert!(
            close < 8,
            "{close} coefficients decrypted without the full key sum"
        );
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let mut agg = Aggregate::new(10);
        let bad = EncryptedUpdate {
            len: 11,
            bodies: vec![0; POLYNOMIAL_SIZE],
        };
        assert!(agg.add(&bad).is_err());
        assert!(agg.decrypt(MaskSeed(0), &[0; 3]).is_err());
    }
}
