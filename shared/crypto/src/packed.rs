//! Packed GLWE encryption of encoded update vectors with a mask shared by the round.
//!
//! A client encrypts a vector of u64 plaintexts as ceil(len / N) GLWE ciphertexts (k = 1)
//! under its own fresh binary key: body = a * s + m + e in Z/2^64[X]/(X^N + 1). The masks `a`
//! come from the round's public [`MaskSeed`] and are identical on every client, so only the
//! bodies travel, and of each body only its top 8 to 32 bits (the round's [`BodyBits`]); the
//! dropped low bits add a bounded rounding error, which the encrypting client knows and may
//! carry into its next update ([`Encryptor::encrypt_chunk`]'s `delivered`). Ciphertext `i`'s mask is ChaCha20 stream `i` of the
//! seed ([`MaskStream`]), so any chunk of ciphertexts can be encrypted or decrypted on its own.
//!
//! Summing the bodies of several clients yields a GLWE ciphertext of the sum of their
//! plaintexts under the sum of their keys: it decrypts with that key sum and with nothing
//! less.

use crate::CryptoError;
use crate::negacyclic::{BinarySpectrum, NegacyclicFft, Scratch, exact_add_mul};
pub use crate::params::BodyBits;
use crate::params::{NOISE_TUNIFORM_LOG2, POLYNOMIAL_SIZE};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::sync::OnceLock;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, RandomGenerator, Seeder};

/// Domain separation of the mask generator's key: ChaCha20 key = seed (16 bytes, LE) || tag.
const MASK_KEY_TAG: [u8; 16] = *b"fedshield-mask-1";
/// Domain separation of the noise generator's key: ChaCha20 key = OS seed || tag.
const NOISE_KEY_TAG: [u8; 16] = *b"fedshield-noise1";

/// The public per-round seed from which every client derives the same ciphertext masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaskSeed(pub u128);

/// The public mask stream of a round: ChaCha20 (RFC 7539 block function, 64-bit counter and
/// 64-bit stream id) keyed by the seed; ciphertext `i`'s mask is the first N little-endian u64
/// of stream `i`. Any ciphertext's mask is computed on its own, and every implementation of
/// ChaCha20 yields the same values (tested against RustCrypto's `chacha20`).
pub struct MaskStream {
    rng: ChaCha20Rng,
    bytes: Vec<u8>,
}

impl MaskStream {
    /// The mask stream of the round of `seed`.
    pub fn new(seed: MaskSeed) -> Self {
        Self {
            rng: ChaCha20Rng::from_seed(chacha_key(seed.0, MASK_KEY_TAG)),
            bytes: vec![0; POLYNOMIAL_SIZE * 8],
        }
    }

    /// Writes ciphertext `index`'s mask (N coefficients) into `out`.
    ///
    /// # Panics
    /// If `out` does not hold N coefficients.
    pub fn mask(&mut self, index: usize, out: &mut [u64]) {
        assert_eq!(out.len(), POLYNOMIAL_SIZE, "mask size");
        self.rng.set_stream(index as u64);
        self.rng.set_word_pos(0);
        self.rng.fill_bytes(&mut self.bytes);
        for (o, b) in out.iter_mut().zip(self.bytes.chunks_exact(8)) {
            *o = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
    }
}

fn chacha_key(seed: u128, tag: [u8; 16]) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&seed.to_le_bytes());
    key[16..].copy_from_slice(&tag);
    key
}

fn fft() -> &'static NegacyclicFft {
    static FFT: OnceLock<NegacyclicFft> = OnceLock::new();
    FFT.get_or_init(|| NegacyclicFft::new(POLYNOMIAL_SIZE))
}

/// A client's secret GLWE key for one round: N binary coefficients (k = 1).
#[derive(Clone)]
pub struct ClientKey {
    coefficients: Vec<u64>,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

impl ClientKey {
    /// Draws a fresh uniform binary key from a CSPRNG seeded by `seeder` (the OS entropy
    /// source in production: [`tfhe::core_crypto::seeders::new_seeder`]).
    pub fn generate(seeder: &mut dyn Seeder) -> Self {
        let mut generator = RandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        let mut coefficients = vec![0u64; POLYNOMIAL_SIZE];
        generator.fill_slice_with_random_uniform_binary(&mut coefficients);
        Self { coefficients }
    }

    /// The key's coefficients (each 0 or 1), the vector the secure key aggregation sums.
    pub fn coefficients(&self) -> &[u64] {
        &self.coefficients
    }
}

/// Number of GLWE ciphertexts needed for `len` values.
pub fn ciphertext_count(len: usize) -> usize {
    len.div_ceil(POLYNOMIAL_SIZE)
}

/// One client's encrypted update: the top `body_bits` of each ciphertext body coefficient,
/// `ciphertext_count(len) * N` of them, for `len` plaintext values.
///
/// Wire form (postcard): `len`, `body_bits` (one byte), then the bodies as one byte string of
/// little-endian `body_bits / 8`-byte integers (never varints, which would cost more than the
/// width for most random values).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "wire::Owned")]
pub struct EncryptedUpdate {
    /// Number of plaintext values encrypted.
    pub len: usize,
    /// Width of each body.
    pub body_bits: BodyBits,
    /// Truncated bodies, N per ciphertext, each below 2^body_bits.
    pub bodies: Vec<u32>,
}

impl EncryptedUpdate {
    /// Bytes of the wire form of an update of `len` values with bodies of width `body`.
    pub fn wire_len(len: usize, body: BodyBits) -> usize {
        let bytes = ciphertext_count(len) * POLYNOMIAL_SIZE * body.bytes();
        varint_len(len as u64) + 1 + varint_len(bytes as u64) + bytes
    }
}

fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

impl serde::Serialize for EncryptedUpdate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let width = self.body_bits.bytes();
        let mut bytes = Vec::with_capacity(self.bodies.len() * width);
        for b in &self.bodies {
            bytes.extend_from_slice(&b.to_le_bytes()[..width]);
        }
        let mut st = s.serialize_struct("EncryptedUpdate", 3)?;
        st.serialize_field("len", &self.len)?;
        st.serialize_field("body_bits", &self.body_bits)?;
        st.serialize_field("bodies", &wire::Bytes(bytes))?;
        st.end()
    }
}

/// The wire form's pieces.
mod wire {
    use super::{BodyBits, EncryptedUpdate};
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// A byte string (serde's bytes, not a sequence of u8).
    pub struct Bytes(pub Vec<u8>);

    impl serde::Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> serde::Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct BytesVisitor;
            impl<'de> Visitor<'de> for BytesVisitor {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                    // Self-describing formats (JSON) hand byte strings over as sequences.
                    let mut bytes = Vec::new();
                    while let Some(b) = seq.next_element::<u8>()? {
                        bytes.push(b);
                    }
                    Ok(Bytes(bytes))
                }
            }
            d.deserialize_bytes(BytesVisitor)
        }
    }

    /// What deserializes before the checks.
    #[derive(serde::Deserialize)]
    pub struct Owned {
        len: usize,
        body_bits: BodyBits,
        bodies: Bytes,
    }

    impl TryFrom<Owned> for EncryptedUpdate {
        type Error = String;
        fn try_from(w: Owned) -> Result<Self, String> {
            let width = w.body_bits.bytes();
            let bytes = w.bodies.0;
            if !bytes.len().is_multiple_of(width) {
                return Err(format!(
                    "{} body bytes: not a multiple of {width}",
                    bytes.len()
                ));
            }
            let bodies = bytes
                .chunks_exact(width)
                .map(|c| {
                    let mut le = [0u8; 4];
                    le[..width].copy_from_slice(c);
                    u32::from_le_bytes(le)
                })
                .collect();
            Ok(EncryptedUpdate {
                len: w.len,
                body_bits: w.body_bits,
                bodies,
            })
        }
    }
}

/// Encrypts under one key for one round; holds the key's spectrum, the noise generator and
/// work buffers, so that encrypting chunk after chunk allocates nothing but the output.
pub struct Encryptor {
    masks: MaskStream,
    spectrum: BinarySpectrum,
    scratch: Scratch,
    noise: ChaCha20Rng,
    body_bits: BodyBits,
    mask: Vec<u64>,
    body: Vec<u64>,
    noise_bytes: Vec<u8>,
}

impl Encryptor {
    /// An encryptor for `key` in the round of `seed`, with bodies of width `body_bits`; noise
    /// comes from a CSPRNG seeded by `noise_seeder`.
    pub fn new(
        key: &ClientKey,
        seed: MaskSeed,
        body_bits: BodyBits,
        noise_seeder: &mut dyn Seeder,
    ) -> Self {
        Self {
            masks: MaskStream::new(seed),
            spectrum: fft().binary_spectrum(&key.coefficients),
            scratch: fft().scratch(),
            noise: ChaCha20Rng::from_seed(chacha_key(noise_seeder.seed().0, NOISE_KEY_TAG)),
            body_bits,
            mask: vec![0; POLYNOMIAL_SIZE],
            body: vec![0; POLYNOMIAL_SIZE],
            noise_bytes: vec![0; POLYNOMIAL_SIZE * 4],
        }
    }

    /// Encrypts the plaintexts of ciphertexts `first..`, `plaintexts.len().div_ceil(N)` of
    /// them (the last one zero-padded), appending N bodies per ciphertext to `out`.
    ///
    /// With `delivered`, also appends, for each plaintext m, what this encryption adds to a
    /// decrypted sum apart from its noise: m plus the body's rounding error. A client feeds
    /// the difference back into its error-feedback residual, so narrow bodies lose nothing
    /// over the rounds. The rounding error is a function of the untruncated body alone
    /// (which an RLWE reduction computes from its sample), so the next plaintext may depend
    /// on it without weakening the encryption; the noise e is left out on purpose: making a
    /// plaintext depend on a previous encryption's secret noise has no such argument.
    pub fn encrypt_chunk(
        &mut self,
        first: usize,
        plaintexts: &[u64],
        out: &mut Vec<u32>,
        mut delivered: Option<&mut Vec<u64>>,
    ) {
        out.reserve(ciphertext_count(plaintexts.len()) * POLYNOMIAL_SIZE);
        for (i, chunk) in plaintexts.chunks(POLYNOMIAL_SIZE).enumerate() {
            self.masks.mask(first + i, &mut self.mask);
            // body = m + e ...
            self.noise.fill_bytes(&mut self.noise_bytes);
            let noise = self.noise_bytes.chunks_exact(4);
            for ((j, b), r) in self.body.iter_mut().enumerate().zip(noise) {
                let m = chunk.get(j).copied().unwrap_or(0);
                let r = u32::from_le_bytes(r.try_into().expect("4 bytes"));
                *b = m.wrapping_add(t_uniform(r) as u64);
            }
            // ... + a * s
            fft().add_mul_binary(
                &mut self.body,
                &self.mask,
                &self.spectrum,
                &mut self.scratch,
            );
            let bits = self.body_bits;
            let start = out.len();
            out.extend(self.body.iter().map(|&b| bits.truncate(b)));
            if let Some(d) = delivered.as_deref_mut() {
                d.extend(
                    chunk
                        .iter()
                        .zip(&self.body)
                        .zip(&out[start..])
                        .map(|((&m, &b), &t)| m.wrapping_add(bits.expand(t).wrapping_sub(b))),
                );
            }
        }
    }

    /// Encrypts a whole update; also returns what it delivers (see [`Self::encrypt_chunk`]).
    pub fn encrypt_delivered(&mut self, plaintexts: &[u64]) -> (EncryptedUpdate, Vec<u64>) {
        let mut delivered = Vec::with_capacity(plaintexts.len());
        let update = self.encrypt_whole(plaintexts, Some(&mut delivered));
        (update, delivered)
    }

    /// Encrypts a whole update.
    pub fn encrypt(&mut self, plaintexts: &[u64]) -> EncryptedUpdate {
        self.encrypt_whole(plaintexts, None)
    }

    fn encrypt_whole(
        &mut self,
        plaintexts: &[u64],
        delivered: Option<&mut Vec<u64>>,
    ) -> EncryptedUpdate {
        let mut bodies = Vec::new();
        self.encrypt_chunk(0, plaintexts, &mut bodies, delivered);
        EncryptedUpdate {
            len: plaintexts.len(),
            body_bits: self.body_bits,
            bodies,
        }
    }
}

/// Encrypts `plaintexts` under `key` with masks from `seed` and bodies of width `body_bits`;
/// noise comes from `noise_seeder`.
pub fn encrypt(
    key: &ClientKey,
    seed: MaskSeed,
    body_bits: BodyBits,
    plaintexts: &[u64],
    noise_seeder: &mut dyn Seeder,
) -> EncryptedUpdate {
    Encryptor::new(key, seed, body_bits, noise_seeder).encrypt(plaintexts)
}

/// A TUniform(B) sample from B + 2 uniform bits: values in [-2^B, 2^B], each inner value
/// with probability 2^-(B+1) and the two end points with half that, exactly as tfhe-rs's
/// `TUniform` draws them.
fn t_uniform(random: u32) -> i64 {
    let bits = (random & ((1u32 << (NOISE_TUNIFORM_LOG2 + 2)) - 1)) as i64;
    (bits >> 1) + (bits & 1) - (1i64 << NOISE_TUNIFORM_LOG2)
}

/// Running sum of encrypted updates. Memory is one u32 per ciphertext coefficient, however
/// many clients contribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    len: usize,
    body_bits: BodyBits,
    sum: Vec<u32>,
    contributions: usize,
}

impl Aggregate {
    /// An empty aggregate for updates of `len` values with bodies of width `body_bits`.
    pub fn new(len: usize, body_bits: BodyBits) -> Self {
        Self {
            len,
            body_bits,
            sum: vec![0; ciphertext_count(len) * POLYNOMIAL_SIZE],
            contributions: 0,
        }
    }

    /// Adds one client's bodies (coefficient-wise, modulo 2^body_bits).
    pub fn add(&mut self, update: &EncryptedUpdate) -> Result<(), CryptoError> {
        if update.body_bits != self.body_bits {
            return Err(CryptoError::InvalidParameter(format!(
                "update has {}-bit bodies, the round {}",
                update.body_bits, self.body_bits
            )));
        }
        if update.len != self.len || update.bodies.len() != self.sum.len() {
            return Err(CryptoError::LengthMismatch {
                what: "encrypted update",
                expected: self.sum.len(),
                got: update.bodies.len(),
            });
        }
        let bits = self.body_bits;
        for (s, b) in self.sum.iter_mut().zip(&update.bodies) {
            *s = bits.reduce(s.wrapping_add(*b));
        }
        self.contributions += 1;
        Ok(())
    }

    /// Adds another aggregate of the same shape (a partial sum folded elsewhere): sums of
    /// bodies modulo 2^bits are associative, so partial sums of disjoint contributor sets
    /// add up to the sum over their union.
    pub fn add_aggregate(&mut self, other: &Aggregate) -> Result<(), CryptoError> {
        if other.body_bits != self.body_bits || other.len != self.len {
            return Err(CryptoError::InvalidParameter(format!(
                "partial sum of {} values at {} bits, this sum {} at {}",
                other.len, other.body_bits, self.len, self.body_bits
            )));
        }
        let bits = self.body_bits;
        for (s, b) in self.sum.iter_mut().zip(&other.sum) {
            *s = bits.reduce(s.wrapping_add(*b));
        }
        self.contributions += other.contributions;
        Ok(())
    }

    /// Number of updates added.
    pub fn contributions(&self) -> usize {
        self.contributions
    }

    /// The running sum's bodies (one per ciphertext coefficient) and the number of updates
    /// in it: what a host checkpoints ([`Aggregate::from_parts`] puts it back).
    pub fn parts(&self) -> (&[u32], usize) {
        (&self.sum, self.contributions)
    }

    /// An aggregate of updates of `len` values at `body_bits` holding `sum` over
    /// `contributions` updates; refuses a sum of the wrong size or with bodies wider than
    /// the width.
    pub fn from_parts(
        len: usize,
        body_bits: BodyBits,
        sum: Vec<u32>,
        contributions: usize,
    ) -> Result<Self, CryptoError> {
        let expected = ciphertext_count(len) * POLYNOMIAL_SIZE;
        if sum.len() != expected {
            return Err(CryptoError::LengthMismatch {
                what: "aggregate sum",
                expected,
                got: sum.len(),
            });
        }
        if sum.iter().any(|&b| body_bits.reduce(b) != b) {
            return Err(CryptoError::InvalidParameter(format!(
                "aggregate sum with bodies wider than {body_bits} bits"
            )));
        }
        Ok(Self {
            len,
            body_bits,
            sum,
            contributions,
        })
    }

    /// Decrypts the sum with `key_sum`, the coefficient-wise sum (mod 2^64) of the keys of
    /// exactly the clients whose updates were added. Returns `len` plaintext sums.
    pub fn decrypt(&self, seed: MaskSeed, key_sum: &[u64]) -> Result<Vec<u64>, CryptoError> {
        if key_sum.len() != POLYNOMIAL_SIZE {
            return Err(CryptoError::LengthMismatch {
                what: "key sum",
                expected: POLYNOMIAL_SIZE,
                got: key_sum.len(),
            });
        }
        let mut out = Vec::with_capacity(self.sum.len());
        let mut mask = vec![0u64; POLYNOMIAL_SIZE];
        let mut product = vec![0u64; POLYNOMIAL_SIZE];
        let mut masks = MaskStream::new(seed);
        // A sum of binary keys has coefficients at most the number of contributors: its
        // digit planes multiply through the FFT, exactly (`add_mul_digits`; one plane up to
        // 15 contributors, two up to 255, three up to 4,095). A key sum with larger
        // coefficients (none that a round produces) takes Karatsuba.
        let largest = key_sum.iter().copied().max().unwrap_or(0);
        let bits = 64 - largest.leading_zeros() as usize;
        let planes = bits.div_ceil(crate::negacyclic::DIGIT_BITS as usize).max(1);
        let spectra = (planes <= 4)
            .then(|| fft().digit_spectra(key_sum, planes))
            .flatten();
        let (mut scratch, mut work) = (fft().scratch(), fft().scratch());
        for (i, bodies) in self.sum.chunks_exact(POLYNOMIAL_SIZE).enumerate() {
            masks.mask(i, &mut mask);
            product.fill(0);
            match &spectra {
                Some(planes) => {
                    fft().add_mul_digits(&mut product, &mask, planes, &mut scratch, &mut work);
                }
                None => exact_add_mul(&mut product, &mask, key_sum),
            }
            out.extend(
                bodies
                    .iter()
                    .zip(&product)
                    .map(|(&b, &p)| self.body_bits.expand(b).wrapping_sub(p)),
            );
        }
        out.truncate(self.len);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfhe::core_crypto::commons::generators::DeterministicSeeder;
    use tfhe::core_crypto::commons::math::random::Seed;
    use tfhe::core_crypto::prelude::*;

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
        let mut agg = Aggregate::new(len, BodyBits::FULL);
        for (k, m) in keys.iter().zip(&msgs) {
            agg.add(&encrypt(k, round, BodyBits::FULL, m, &mut s))
                .unwrap();
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
    fn wire_form_costs_the_body_width_per_body() {
        for bits in BodyBits::ALLOWED {
            let body_bits = BodyBits::new(bits as u32).unwrap();
            let update = EncryptedUpdate {
                len: 3,
                body_bits,
                bodies: (0..POLYNOMIAL_SIZE as u32)
                    .map(|i| body_bits.reduce(i.wrapping_mul(0x9e37_79b9)))
                    .collect(),
            };
            let bytes = postcard::to_stdvec(&update).unwrap();
            assert_eq!(bytes.len(), EncryptedUpdate::wire_len(3, body_bits));
            assert!(bytes.len() <= body_bits.bytes() * POLYNOMIAL_SIZE + 8);
            let back: EncryptedUpdate = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, update);
        }
        // A byte string that is not whole bodies, or an unsupported width, is an error, not
        // a panic.
        let mut bad = postcard::to_stdvec(&3usize).unwrap();
        bad.push(32);
        bad.extend(serde_bytes_like(&[1, 2, 3, 4, 5]));
        assert!(postcard::from_bytes::<EncryptedUpdate>(&bad).is_err());
        let mut bad = postcard::to_stdvec(&3usize).unwrap();
        bad.push(12);
        bad.extend(serde_bytes_like(&[1, 2, 3]));
        assert!(postcard::from_bytes::<EncryptedUpdate>(&bad).is_err());
    }

    /// A postcard byte string (length varint + bytes).
    fn serde_bytes_like(b: &[u8]) -> Vec<u8> {
        let mut out = postcard::to_stdvec(&b.len()).unwrap();
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let mut agg = Aggregate::new(10, BodyBits::FULL);
        let bad = EncryptedUpdate {
            len: 11,
            body_bits: BodyBits::FULL,
            bodies: vec![0; POLYNOMIAL_SIZE],
        };
        assert!(agg.add(&bad).is_err());
        let narrow = EncryptedUpdate {
            len: 10,
            body_bits: BodyBits::new(16).unwrap(),
            bodies: vec![0; POLYNOMIAL_SIZE],
        };
        assert!(agg.add(&narrow).is_err());
        assert_eq!(agg.contributions(), 0);
        assert!(agg.decrypt(MaskSeed(0), &[0; 3]).is_err());
    }
    #[test]
    fn t_uniform_matches_the_distribution_exactly() {
        // Every (B + 2)-bit input once: each inner value twice, each end point once.
        let b = NOISE_TUNIFORM_LOG2;
        let mut counts = std::collections::HashMap::<i64, u32>::new();
        for r in 0..(1u32 << (b + 2)) {
            *counts.entry(t_uniform(r | 0xfff8_0000)).or_default() += 1;
        }
        let bound = 1i64 << b;
        assert_eq!(counts.len() as i64, 2 * bound + 1);
        for (v, c) in counts {
            let want = if v.abs() == bound { 1 } else { 2 };
            assert_eq!(c, want, "value {v}");
        }
    }

    #[test]
    fn ciphertexts_are_standard_glwe_under_tfhe_decryption() {
        // Rebuild the full-precision ciphertext (mask from the seed, untruncated body) and let
        // tfhe-rs decrypt it: the error is the encryption noise only.
        let mut s = seeder(3);
        let key = ClientKey::generate(&mut s);
        let round = MaskSeed(77);
        let msg: Vec<u64> = (0..POLYNOMIAL_SIZE as u64).map(|i| i << 48).collect();
        let mut enc = Encryptor::new(&key, round, BodyBits::FULL, &mut s);
        let mut mask = vec![0u64; POLYNOMIAL_SIZE];
        MaskStream::new(round).mask(0, &mut mask);
        // The body as encrypt_chunk computes it, without the truncation.
        let mut body: Vec<u64> = msg
            .iter()
            .map(|&m| m.wrapping_add(t_uniform(enc.noise.next_u32()) as u64))
            .collect();
        fft().add_mul_binary(&mut body, &mask, &enc.spectrum, &mut enc.scratch);
        let mut container = mask.clone();
        container.extend_from_slice(&body);
        let ct = GlweCiphertext::from_container(
            container,
            PolynomialSize(POLYNOMIAL_SIZE),
            CiphertextModulus::new_native(),
        );
        let tfhe_key = GlweSecretKey::from_container(
            key.coefficients().to_vec(),
            PolynomialSize(POLYNOMIAL_SIZE),
        );
        let mut out = PlaintextList::new(0u64, PlaintextCount(POLYNOMIAL_SIZE));
        decrypt_glwe_ciphertext(&tfhe_key, &ct, &mut out);
        for (got, want) in out.into_container().iter().zip(&msg) {
            let err = got.wrapping_sub(*want) as i64;
            assert!(err.abs() <= 1 << NOISE_TUNIFORM_LOG2, "error {err}");
        }
    }

    #[test]
    fn masks_match_an_independent_chacha20_and_are_random_access() {
        use chacha20::cipher::{KeyIvInit, StreamCipher};
        let seed = MaskSeed(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let mut ours = MaskStream::new(seed);
        let mut mask = vec![0u64; POLYNOMIAL_SIZE];
        for index in [0usize, 1, 2, 1000] {
            ours.mask(index, &mut mask);
            // RustCrypto's ChaCha20 (DJB layout: 64-bit counter, 64-bit nonce = stream id).
            let key = chacha_key(seed.0, MASK_KEY_TAG);
            let nonce = (index as u64).to_le_bytes();
            let mut cipher = chacha20::ChaCha20Legacy::new(&key.into(), &nonce.into());
            let mut bytes = vec![0u8; POLYNOMIAL_SIZE * 8];
            cipher.apply_keystream(&mut bytes);
            let want: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(mask, want, "ciphertext {index}");
        }
        // Out of order gives the same masks; another seed gives others.
        let mut again = vec![0u64; POLYNOMIAL_SIZE];
        MaskStream::new(seed).mask(1000, &mut again);
        assert_eq!(again, mask);
        MaskStream::new(MaskSeed(1)).mask(1000, &mut again);
        assert_ne!(again, mask);
    }

    #[test]
    fn chunked_encryption_aggregates_like_whole_updates() {
        let mut s = seeder(4);
        let round = MaskSeed(9);
        let len = 2 * POLYNOMIAL_SIZE + 100;
        let key = ClientKey::generate(&mut s);
        let msg: Vec<u64> = (0..len as u64).map(|i| (i % 97) << 52).collect();
        let mut enc = Encryptor::new(&key, round, BodyBits::FULL, &mut s);
        let mut bodies = Vec::new();
        // Out of order: the second chunk first, as a resumed upload may do.
        let mut tail = Vec::new();
        enc.encrypt_chunk(1, &msg[POLYNOMIAL_SIZE..], &mut tail, None);
        enc.encrypt_chunk(0, &msg[..POLYNOMIAL_SIZE], &mut bodies, None);
        bodies.extend(tail);
        let mut agg = Aggregate::new(len, BodyBits::FULL);
        let body_bits = BodyBits::FULL;
        agg.add(&EncryptedUpdate {
            len,
            body_bits,
            bodies,
        })
        .unwrap();
        let got = agg.decrypt(round, key.coefficients()).unwrap();
        for (g, w) in got.iter().zip(&msg) {
            assert!((g.wrapping_sub(*w) as i64).unsigned_abs() < 1 << 32);
        }
    }

    #[test]
    fn delivered_values_are_what_the_sum_decrypts_to_up_to_the_noise() {
        // Three clients at every width: the decrypted sum equals the sum of what each
        // client's encryption says it delivered, up to the three noises (2^17 each); the
        // delivered values differ from the plaintexts by the body rounding only.
        let mut s = seeder(5);
        let round = MaskSeed(0xde11);
        let len = POLYNOMIAL_SIZE + 17;
        for bits in BodyBits::ALLOWED {
            let body_bits = BodyBits::new(bits as u32).unwrap();
            let mut agg = Aggregate::new(len, body_bits);
            let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
            let mut delivered_sum = vec![0u64; len];
            let mut plain_sum = vec![0u64; len];
            for c in 0..3u64 {
                let key = ClientKey::generate(&mut s);
                let msg: Vec<u64> = (0..len as u64)
                    .map(|i| ((i * 31 + c * 7) % 201).wrapping_sub(100) << 52)
                    .collect();
                let (ct, delivered) =
                    Encryptor::new(&key, round, body_bits, &mut s).encrypt_delivered(&msg);
                assert_eq!(delivered.len(), len);
                for i in 0..len {
                    let rounding = delivered[i].wrapping_sub(msg[i]) as i64;
                    assert!(
                        rounding.unsigned_abs() <= 1 << body_bits.rounding_log2(),
                        "bits {bits}: rounding {rounding}"
                    );
                    delivered_sum[i] = delivered_sum[i].wrapping_add(delivered[i]);
                    plain_sum[i] = plain_sum[i].wrapping_add(msg[i]);
                }
                agg.add(&ct).unwrap();
                for (k, b) in key_sum.iter_mut().zip(key.coefficients()) {
                    *k += b;
                }
            }
            let got = agg.decrypt(round, &key_sum).unwrap();
            let mut worst_rounding = 0u64;
            for i in 0..len {
                let noise = got[i].wrapping_sub(delivered_sum[i]) as i64;
                assert!(
                    noise.unsigned_abs() <= 3 << NOISE_TUNIFORM_LOG2,
                    "bits {bits}"
                );
                let off = (got[i].wrapping_sub(plain_sum[i]) as i64).unsigned_abs();
                worst_rounding = worst_rounding.max(off);
            }
            // At 8 bits the rounding dwarfs the noise: the feedback is what keeps it.
            if bits == 8 {
                assert!(worst_rounding > 1 << 50, "{worst_rounding}");
            }
        }
    }
}
