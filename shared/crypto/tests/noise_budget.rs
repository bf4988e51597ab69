//! The noise and rounding budget of SECURITY.md holds at the largest supported client count
//! of every body width (1,000 clients at 16, 24 and 32 bits, 223 at 8): clients with fresh
//! keys, all at the encoding limits, decrypt to the weighted mean within the documented bound,
//! and the bound itself leaves the documented headroom.

use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::packed::{Aggregate, BodyBits, ClientKey, MaskSeed, encrypt};
use fedshield_crypto::params::{MAX_CLIENTS, POLYNOMIAL_SIZE, max_clients, worst_case_error};
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

fn widths() -> impl Iterator<Item = BodyBits> {
    BodyBits::ALLOWED
        .iter()
        .map(|&b| BodyBits::new(b as u32).unwrap())
}

#[test]
fn budget_leaves_headroom_at_max_clients() {
    let fp = FixedPoint::new(1.0).unwrap();
    for body in widths() {
        let n = max_clients(body, fp.scale_log2);
        let bound = worst_case_error(n, body) as f64;
        // The aggregate (at most 2^scale in magnitude) plus the error never reaches 2^63, so
        // the signed decoding never wraps.
        assert!(
            (1u64 << fp.scale_log2) as f64 + bound < 2f64.powi(63),
            "{body} bits"
        );
        if body == BodyBits::FULL {
            // Full bodies: 1,000 clients, and an error below 2^-19 of the clip value.
            assert_eq!(n, MAX_CLIENTS);
            assert!(bound * fp.ulp() < 2f64.powi(-19), "bound {bound} ulps");
        }
    }
}

/// `n` clients (unequal weights summing to 1), each with a fresh key, all at the encoding
/// limits or beyond (clipped), decrypt to the weighted mean within the documented bound.
fn clients_at_the_encoding_limits(n: usize, body: BodyBits) {
    let len = POLYNOMIAL_SIZE + 3; // not a multiple of N: a padded second ciphertext
    let fp = FixedPoint::new(0.5).unwrap();
    let seed = MaskSeed(0xb0d9e7);
    let mut rng = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(99));
    let mut agg = Aggregate::new(len, body);
    let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
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
        agg.add(&encrypt(&key, seed, body, &plain, &mut rng))
            .unwrap();
    }
    let got = fp.decode_sum(&agg.decrypt(seed, &key_sum).unwrap(), 1.0);
    // Documented bound, plus the f32 rounding of the decoded output.
    let bound = worst_case_error(n, body) as f64 * fp.ulp() + f32::EPSILON as f64;
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= bound,
        "{body} bits, {n} clients: error {worst:e} exceeds the documented bound {bound:e}"
    );
    eprintln!("{body} bits, {n} clients: max error {worst:.3e}, documented bound {bound:.3e}");
}

#[test]
fn max_clients_at_the_encoding_limits_decrypt_within_the_bound_at_every_width() {
    let scale = FixedPoint::new(0.5).unwrap().scale_log2;
    for body in widths() {
        clients_at_the_encoding_limits(max_clients(body, scale), body);
    }
}
