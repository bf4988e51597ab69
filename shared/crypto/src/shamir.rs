//! Shamir secret sharing of 32-byte secrets over the prime field GF(2^61 - 1).
//!
//! A secret is cut into [`LIMBS`] limbs of at most 7 bytes (56 bits, below the modulus), and
//! each limb is shared with its own random polynomial of degree t - 1. Share x-coordinates
//! are 1..=n (the participant's position in the round's roster, plus one); any t shares
//! reconstruct the secret, t - 1 reveal nothing about it (information-theoretically).

use crate::CryptoError;
use rand::CryptoRng;

/// The field modulus, the Mersenne prime 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;
/// Limbs per 32-byte secret: 4 of 7 bytes and one of 4.
pub const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;

/// One share of a 32-byte secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// x-coordinate, 1-based.
    pub x: u32,
    /// The share of each limb.
    pub y: [u64; LIMBS],
}

fn reduce(x: u128) -> u64 {
    // x < 2^122: fold the high bits twice (2^61 = 1 mod P).
    let folded = (x & P as u128) + (x >> 61);
    let folded = (folded & P as u128) + (folded >> 61);
    let r = folded as u64;
    if r >= P { r - P } else { r }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(a as u128 * b as u128)
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // < 2^62, no overflow
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// A uniform field element (rejection sampling on 61 bits).
fn random_element(rng: &mut impl CryptoRng) -> u64 {
    loop {
        let r = rng.next_u64() & P;
        if r < P {
            return r;
        }
    }
}

fn limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut out = [0u64; LIMBS];
    for (limb, bytes) in out.iter_mut().zip(secret.chunks(LIMB_BYTES)) {
        let mut buf = [0u8; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        *limb = u64::from_le_bytes(buf);
    }
    out
}

fn unlimbs(limbs: &[u64; LIMBS]) -> Result<[u8; 32], CryptoError> {
    let mut out = [0u8; 32];
    for (limb, bytes) in limbs.iter().zip(out.chunks_mut(LIMB_BYTES)) {
        let le = limb.to_le_bytes();
        if le[bytes.len()..].iter().any(|&b| b != 0) {
            return Err(CryptoError::InvalidParameter(
                "shares do not reconstruct a 32-byte secret (inconsistent shares)".into(),
            ));
        }
        bytes.copy_from_slice(&le[..bytes.len()]);
    }
    Ok(out)
}

/// Splits `secret` into `n` shares (x = 1..=n), any `t` of which reconstruct it.
pub fn split(
    secret: &[u8; 32],
    n: usize,
    t: usize,
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, CryptoError> {
    if n >= P as usize || n > u32::MAX as usize {
        return Err(CryptoError::InvalidParameter(format!(
            "shamir: {n} shares are too many"
        )));
    }
    let xs: Vec<u32> = (1..=n as u32).collect();
    split_at(secret, &xs, t, rng)
}

/// Splits `secret` into one share per x-coordinate of `xs` (distinct, non-zero: a sparse
/// graph's holders keep their roster positions), any `t` of which reconstruct it.
pub fn split_at(
    secret: &[u8; 32],
    xs: &[u32],
    t: usize,
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, CryptoError> {
    let n = xs.len();
    if t == 0 || t > n {
        return Err(CryptoError::InvalidParameter(format!(
            "shamir: need 1 <= t <= n, got t = {t}, n = {n}"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if xs.iter().any(|&x| x == 0 || !seen.insert(x)) {
        return Err(CryptoError::InvalidParameter(
            "shamir: x-coordinates must be distinct and non-zero".into(),
        ));
    }
    // coefficients[limb][k], k = 0 the secret limb.
    let polys: Vec<Vec<u64>> = limbs(secret)
        .iter()
        .map(|&s| {
            std::iter::once(s)
                .chain((1..t).map(|_| random_element(rng)))
                .collect()
        })
        .collect();
    Ok(xs
        .iter()
        .map(|&x| {
            let mut y = [0u64; LIMBS];
            for (yl, poly) in y.iter_mut().zip(&polys) {
                // Horner
                *yl = poly
                    .iter()
                    .rev()
                    .fold(0, |acc, &c| add(mul(acc, x as u64), c));
            }
            Share { x, y }
        })
        .collect())
}

/// Lagrange coefficients at 0 for the x-coordinates `xs` (distinct, non-zero): computed once
/// and reused for every secret shared among the same participants.
pub fn lagrange_at_zero(xs: &[u32]) -> Result<Vec<u64>, CryptoError> {
    let mut seen = std::collections::BTreeSet::new();
    if xs.iter().any(|&x| x == 0 || !seen.insert(x)) {
        return Err(CryptoError::InvalidParameter(
            "shamir: x-coordinates must be distinct and non-zero".into(),
        ));
    }
    Ok(xs
        .iter()
        .map(|&xi| {
            let (mut num, mut den) = (1u64, 1u64);
            for &xj in xs.iter().filter(|&&xj| xj != xi) {
                num = mul(num, xj as u64);
                den = mul(den, sub(xj as u64, xi as u64));
            }
            mul(num, inv(den))
        })
        .collect())
}

/// Reconstructs a secret from shares whose x-coordinates are the `xs` that `coefficients`
/// were computed for, in the same order.
pub fn combine_with(shares: &[&Share], coefficients: &[u64]) -> Result<[u8; 32], CryptoError> {
    if shares.len() != coefficients.len() {
        return Err(CryptoError::LengthMismatch {
            what: "shamir shares",
            expected: coefficients.len(),
            got: shares.len(),
        });
    }
    let mut limbs = [0u64; LIMBS];
    for (share, &l) in shares.iter().zip(coefficients) {
        for (acc, &y) in limbs.iter_mut().zip(&share.y) {
            if y >= P {
                return Err(CryptoError::InvalidParameter(
                    "shamir: share out of range".into(),
                ));
            }
            *acc = add(*acc, mul(y, l));
        }
    }
    unlimbs(&limbs)
}

/// Reconstructs a secret from `shares` (at least t of them for a correct result).
pub fn combine(shares: &[Share]) -> Result<[u8; 32], CryptoError> {
    let xs: Vec<u32> = shares.iter().map(|s| s.x).collect();
    let refs: Vec<&Share> = shares.iter().collect();
    combine_with(&refs, &lagrange_at_zero(&xs)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        for a in [1u64, 2, 12345, P - 2] {
            assert_eq!(mul(a, inv(a)), 1);
        }
    }

    proptest! {
        #[test]
        fn any_t_shares_reconstruct_and_t_minus_one_do_not(
            secret in any::<[u8; 32]>(),
            n in 1usize..40,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let shares = split(&secret, n, t, &mut rng).unwrap();
            prop_assert_eq!(shares.len(), n);
            // The last t shares.
            prop_assert_eq!(combine(&shares[n - t..]).unwrap(), secret);
            // Every other share from the front, if enough.
            let alternate: Vec<Share> = shares.iter().step_by(2).copied().take(t).collect();
            if alternate.len() == t {
                prop_assert_eq!(combine(&alternate).unwrap(), secret);
            }
            if t > 1 {
                // t - 1 shares give something else (or an error), except with negligible
                // probability.
                let fewer = combine(&shares[..t - 1]);
                prop_assert!(fewer.map(|s| s != secret).unwrap_or(true));
            }
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        assert!(split(&[0; 32], 3, 4, &mut rng).is_err());
        assert!(split(&[0; 32], 3, 0, &mut rng).is_err());
        let shares = split(&[7; 32], 3, 2, &mut rng).unwrap();
        assert!(combine(&[shares[0], shares[0]]).is_err());
        let mut bad = shares[1];
        bad.y[0] = u64::MAX;
        assert!(combine(&[shares[0], bad]).is_err());
        assert!(split_at(&[0; 32], &[1, 0, 3], 2, &mut rng).is_err());
        assert!(split_at(&[0; 32], &[4, 9, 4], 2, &mut rng).is_err());
    }

    #[test]
    fn shares_at_chosen_coordinates_reconstruct_from_any_t_of_them() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let secret = [0x5a; 32];
        let shares = split_at(&secret, &[17, 3, 999, 42], 3, &mut rng).unwrap();
        assert_eq!(
            shares.iter().map(|s| s.x).collect::<Vec<_>>(),
            [17, 3, 999, 42]
        );
        assert_eq!(combine(&shares[1..]).unwrap(), secret);
        assert_eq!(combine(&[shares[0], shares[3], shares[1]]).unwrap(), secret);
        assert_ne!(combine(&shares[..2]).unwrap_or([0; 32]), secret);
    }
}
