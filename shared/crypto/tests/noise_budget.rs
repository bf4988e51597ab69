//! The noise and rounding budget of SECURITY.md holds at the largest supported client count:
//! 1,000 clients, each with a fresh key, all at the encoding limits, decrypt to the weighted
//! mean within the documented bound, and the bound itself leaves the documented headroom.

use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::packed::{Aggregate, BODY_BITS, ClientKey, MaskSeed, encrypt};
use fedshield_crypto::params::{MAX_CLIENTS, NOISE_TUNIFORM_LOG2, POLYNOMIAL_SIZE};
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

/// SECURITY.md: |error| <= n * (2^B + 2^(63 - BODY_BITS)) + n/2 (encoding rounding), in
/// units of the last place.
fn worst_case_error_ulps(n: usize) -> f64 {
    n as f64 * ((1u64 << NOISE_TUNIFORM_LOG2) as f64 + (1u64 << (63 - BODY_BITS)) as f64)
        + n as f64 / 2.0
}

#[test]
fn budget_leaves_headroom_at_max_clients() {
    let fp = FixedPoint::new(1.0).unwrap();
    let bound = worst_case_error_ulps(MAX_CLIENTS);
    // The aggregate (at most 2^scale in magnitude) plus the error never reaches 2^63, so the
    // signed decoding never wraps.
    assert!((1u64 << fp.scale_log2) as f64 + bound < 2f64.powi(63));
    // Relative to the clip value the error stays below 2^-19.
    assert!(bound * fp.ulp() < 2f64.powi(-19), "bound {bound} ulps");
}

#[test]
fn thousand_clients_at_the_encoding_limits_decrypt_within_the_bound() {
    let n = MAX_CLIENTS;
    let len = POLYNOMIAL_SIZE + 3; // not a multiple of N: a padded second ciphertext
    let fp = FixedPoint::new(0.5).unwrap();
    let seed = MaskSeed(0xb0d9e7);
    let mut rng = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(99));
    let mut agg = Aggregate::new(len);
    let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
    // Unequal weights that sum to 1; values at +clip, -clip and beyond (clipped).
    let samples: Vec<u64> = (0..n as u64).map(|i| 1 + i % 7).collect();
    let total: u64 = samples.iter().sum();
    let value = |c: usize, i: usize| -> f32 {
        match (c + i) % 4 {
            0 => 0.5,
            1 => -0.5,
            2 => 3.0, // clipped to 0.5
            _ => -0.25,
        }
    };
    let mut want = vec![0f64; len];
    let mut plain = vec![0u64; len];
    for (c, &s) in samples.iter().enumerate() {
        let key = ClientKey::generate(&mut rng);
        for (k, bit) in key_sum.iter_mut().zip(key.coefficients()) {
            *k += bit;
        }
        let w = s as f64 / total as f64;
        let values: Vec<f32> = (0..len).map(|i| value(c, i)).collect();
        for (acc, v) in want.iter_mut().zip(&values) {
            *acc += w * (*v as f64).clamp(-0.5, 0.5);
        }
        fp.encode_weighted(&values, w, &mut plain).unwrap();
        agg.add(&encrypt(&key, seed, &plain, &mut rng)).unwrap();
    }
    let got = fp.decode_sum(&agg.decrypt(seed, &key_sum).unwrap(), 1.0);
    // Documented bound, plus the f32 rounding of the decoded output.
    let bound = worst_case_error_ulps(n) * fp.ulp() + f32::EPSILON as f64;
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= bound,
        "error {worst:e} exceeds the documented bound {bound:e}"
    );
    eprintln!("1000 clients: max error {worst:.3e}, documented bound {bound:.3e}");
}
