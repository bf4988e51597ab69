//! The update codec against its promises: masks computed from public data agree on every
//! client and follow the schedule; nothing a client does not send is lost; the encrypted
//! path equals the plaintext baseline within the documented bound; the wire shrinks with
//! the pruning ratio.

use fedshield_codec::{
    ErrorFeedback, History, Layout, PairSpec, PlainSum, PruneConfig, Schedule, Selection,
    Structure, apply, decode_values, select,
};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::packed::{Aggregate, BodyBits, ClientKey, Encryptor, MaskSeed, encrypt};
use fedshield_crypto::params::{NOISE_TUNIFORM_LOG2, POLYNOMIAL_SIZE, worst_case_error};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

/// A small Llama-like layout: `layers` layers of q (in 32, out 32) and down (in 64, out 32).
fn layout(layers: usize, r: usize, train_a: bool) -> Layout {
    let mut pairs = Vec::new();
    for layer in 0..layers {
        for (name, inp, out) in [("q_proj", 32, 32), ("down_proj", 64, 32)] {
            pairs.push(PairSpec {
                name: format!("layers.{layer}.{name}"),
                layer,
                r,
                in_features: inp,
                out_features: out,
                train_a,
            });
        }
    }
    Layout::new(pairs).unwrap()
}

/// SmolLM2-135M with r = 16 on all seven projections.
fn smollm2_layout() -> Layout {
    let (h, kv, ff) = (576, 192, 1536);
    let mut pairs = Vec::new();
    for layer in 0..30 {
        for (name, inp, out) in [
            ("q_proj", h, h),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", h, h),
            ("gate_proj", h, ff),
            ("up_proj", h, ff),
            ("down_proj", ff, h),
        ] {
            pairs.push(PairSpec {
                name: format!("layers.{layer}.{name}"),
                layer,
                r: 16,
                in_features: inp,
                out_features: out,
                train_a: true,
            });
        }
    }
    Layout::new(pairs).unwrap()
}

fn uniform(rho: f64) -> PruneConfig {
    PruneConfig {
        schedule: Schedule::Uniform { rho },
        ..PruneConfig::default()
    }
}

fn in_layer(layout: &Layout, layer: usize, sel: &Selection) -> usize {
    let ranges: Vec<_> = layout
        .pairs()
        .iter()
        .enumerate()
        .filter(|(_, p)| p.layer == layer)
        .map(|(i, p)| layout.offset(i)..layout.offset(i) + p.len())
        .collect();
    sel.indices
        .iter()
        .filter(|&&i| ranges.iter().any(|r| r.contains(&(i as usize))))
        .count()
}

#[test]
fn masks_agree_across_clients_follow_the_schedule_and_change_with_the_seed() {
    let l = layout(4, 4, true);
    let h = History::new(l.len());
    let cfg = PruneConfig {
        schedule: Schedule::Ramp {
            first: 0.1,
            last: 0.4,
        },
        ..PruneConfig::default()
    };
    let a = select(&l, &cfg, &h, 1, 42).unwrap();
    let b = select(&l, &cfg.clone(), &h.clone(), 1, 42).unwrap();
    assert_eq!(a, b);
    assert!(a.indices.windows(2).all(|w| w[0] < w[1]));
    let per_layer = (l.len() / 4) as f64;
    for layer in 0..4 {
        let want = (cfg.schedule.rho(layer, 4) * per_layer).round() as usize;
        assert_eq!(in_layer(&l, layer, &a), want, "layer {layer}");
    }
    let c = select(&l, &cfg, &h, 1, 43).unwrap();
    assert_eq!(c.len(), a.len());
    assert_ne!(c, a);
    // Rounds must move forward.
    assert!(select(&l, &cfg, &h, 0, 42).is_err());
}

#[test]
fn rank_structure_keeps_whole_rank_components() {
    let l = layout(2, 8, true);
    let cfg = PruneConfig {
        schedule: Schedule::Uniform { rho: 0.25 },
        structure: Structure::Rank,
        explore: 0.5,
    };
    let sel = select(&l, &cfg, &History::new(l.len()), 1, 7).unwrap();
    assert_eq!(sel.len() as f64, 0.25 * l.len() as f64);
    // Every kept A row is complete and comes with its B column.
    for (p, spec) in l.pairs().iter().enumerate() {
        let base = l.offset(p);
        for j in 0..spec.r {
            let a_row: Vec<u32> = (0..spec.in_features)
                .map(|c| (base + j * spec.in_features + c) as u32)
                .collect();
            let b_col: Vec<u32> = (0..spec.out_features)
                .map(|o| (base + spec.a_len() + o * spec.r + j) as u32)
                .collect();
            let kept = |v: &[u32]| {
                v.iter()
                    .filter(|i| sel.indices.binary_search(i).is_ok())
                    .count()
            };
            let (ka, kb) = (kept(&a_row), kept(&b_col));
            assert!(
                (ka, kb) == (0, 0) || (ka, kb) == (a_row.len(), b_col.len()),
                "pair {p} component {j}: {ka}/{} of A, {kb}/{} of B",
                a_row.len(),
                b_col.len()
            );
        }
    }
}

#[test]
fn fast_coordinates_return_often_and_none_waits_for_ever() {
    let l = layout(2, 4, false);
    let n = l.len();
    let cfg = uniform(0.1);
    let mut h = History::new(n);
    let mut sent = vec![0usize; n];
    // Coordinates 0..10 move 100 times faster than the rest.
    let speed = |i: usize| if i < 10 { 1.0 } else { 0.01 };
    let rounds = 60;
    for round in 1..=rounds {
        let sel = select(&l, &cfg, &h, round, 9).unwrap();
        let values: Vec<f32> = sel
            .indices
            .iter()
            .map(|&i| {
                sent[i as usize] += 1;
                speed(i as usize) * (round - h.last_sent(i as usize)) as f32
            })
            .collect();
        h.observe(&sel, &values).unwrap();
    }
    assert!(
        sent[..10].iter().all(|&s| s >= rounds as usize / 2),
        "{:?}",
        &sent[..10]
    );
    assert!(sent.iter().all(|&s| s > 0), "a coordinate was never sent");
}

#[test]
fn schedules_parse_validate_and_clamp() {
    assert_eq!(
        Schedule::parse("0.1").unwrap(),
        Schedule::Uniform { rho: 0.1 }
    );
    assert_eq!(
        Schedule::parse("ramp:0.8:0.5").unwrap(),
        Schedule::Ramp {
            first: 0.8,
            last: 0.5
        }
    );
    for bad in ["0", "-0.1", "1.5", "nan", "ramp:0.1", "cubic:0.1:0.2", "x"] {
        assert!(Schedule::parse(bad).is_err(), "{bad}");
    }
    let ramp = Schedule::Ramp {
        first: 0.8,
        last: 0.5,
    };
    assert_eq!(ramp.rho(0, 30), 0.8);
    assert_eq!(ramp.rho(29, 30), 0.5);
    assert!((ramp.overall(&layout(30, 2, true)) - 0.65).abs() < 1e-9);
    let bad_explore = PruneConfig {
        explore: 1.5,
        ..PruneConfig::default()
    };
    assert!(bad_explore.validate().is_err());
}

#[test]
fn bad_lengths_and_rounds_are_refused_without_changing_state() {
    let l = layout(1, 2, true);
    let mut h = History::new(l.len());
    let sel = select(&l, &uniform(0.5), &h, 1, 1).unwrap();
    let before = h.clone();
    assert!(h.observe(&sel, &[0.0]).is_err());
    assert_eq!(h, before);
    h.observe(&sel, &vec![0.1; sel.len()]).unwrap();
    assert!(
        h.observe(&sel, &vec![0.1; sel.len()]).is_err(),
        "same round twice"
    );
    let ef = ErrorFeedback::new(l.len());
    let fp = FixedPoint::new(1.0).unwrap();
    assert!(ef.prepare(&[0.0; 3], &sel, &fp, 1.0).is_err());
    assert!(decode_values(&sel, &[0; 2], &fp, 1.0).is_err());
    assert!(decode_values(&sel, &vec![0; sel.len()], &fp, 0.0).is_err());
    assert!(apply(&mut [0.0; 3], &sel, &vec![0.0; sel.len()]).is_err());
    assert!(PlainSum::new(2).add(&[1]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Error feedback loses nothing: over any rounds, with values beyond the clip, dropped
    /// rounds and NaN coordinates, what a client's counted uploads delivered plus its final
    /// residual equals the sum of its finite deltas.
    #[test]
    fn error_feedback_conserves_every_delta(
        seed in any::<u64>(),
        rho in 0.05f64..1.0,
        rounds in 1u64..12,
        weight in 0.01f64..1.0,
    ) {
        let l = layout(2, 2, true);
        let n = l.len();
        let fp = FixedPoint::new(0.05).unwrap();
        let cfg = uniform(rho);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut h = History::new(n);
        let mut ef = ErrorFeedback::new(n);
        let mut delivered = vec![0f64; n];
        let mut total = vec![0f64; n];
        for round in 1..=rounds {
            let sel = select(&l, &cfg, &h, round, seed).unwrap();
            let delta: Vec<f32> = (0..n)
                .map(|i| if i == 3 && round == 2 { f32::NAN } else { rng.random_range(-0.08f32..0.08) })
                .collect();
            for (t, d) in total.iter_mut().zip(&delta) {
                if d.is_finite() { *t += *d as f64; }
            }
            let prepared = ef.prepare(&delta, &sel, &fp, weight).unwrap();
            let counted = rng.random_bool(0.8);
            let mut sum = PlainSum::new(sel.len());
            sum.add(&prepared.plaintexts).unwrap();
            let values = decode_values(&sel, sum.sums(), &fp, weight).unwrap();
            if counted {
                let mut dense = vec![0f32; n];
                apply(&mut dense, &sel, &values).unwrap();
                for (d, v) in delivered.iter_mut().zip(&dense) { *d += *v as f64; }
            }
            ef.settle(prepared, counted);
            h.observe(&sel, &values).unwrap();
        }
        for i in 0..n {
            let got = delivered[i] + ef.residual()[i] as f64;
            prop_assert!((got - total[i]).abs() < 1e-5, "coordinate {i}: {got} vs {}", total[i]);
        }
    }
}

fn seeder(seed: u128) -> DeterministicSeeder<DefaultRandomGenerator> {
    DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(seed))
}

/// Runs one round for `clients` random deltas through both paths; returns the encrypted
/// and the plaintext global update values, and the largest encrypted upload in bytes.
fn round_both_ways(
    l: &Layout,
    cfg: &PruneConfig,
    fp: &FixedPoint,
    body: BodyBits,
    clients: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, usize) {
    let sel = select(l, cfg, &History::new(l.len()), 1, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let samples: Vec<u64> = (0..clients).map(|_| rng.random_range(1..50)).collect();
    let total: u64 = samples.iter().sum();
    let mask_seed = MaskSeed(seed as u128 + 1);
    let mut noise = seeder(seed as u128);
    let mut agg = Aggregate::new(sel.len(), body);
    let mut plain = PlainSum::new(sel.len());
    let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
    let mut upload = 0;
    for &s in &samples {
        let w = s as f64 / total as f64;
        let delta: Vec<f32> = (0..l.len())
            .map(|_| rng.random_range(-0.1f32..0.1))
            .collect();
        let prepared = ErrorFeedback::new(l.len())
            .prepare(&delta, &sel, fp, w)
            .unwrap();
        let key = ClientKey::generate(&mut noise);
        for (k, b) in key_sum.iter_mut().zip(key.coefficients()) {
            *k = k.wrapping_add(*b);
        }
        let ct = encrypt(&key, mask_seed, body, &prepared.plaintexts, &mut noise);
        upload = upload.max(postcard::to_stdvec(&ct).unwrap().len());
        agg.add(&ct).unwrap();
        plain.add(&prepared.plaintexts).unwrap();
    }
    let sums = agg.decrypt(mask_seed, &key_sum).unwrap();
    let enc = decode_values(&sel, &sums, fp, 1.0).unwrap();
    let pt = decode_values(&sel, plain.sums(), fp, 1.0).unwrap();
    (enc, pt, upload)
}

#[test]
fn encrypted_aggregate_equals_the_plaintext_baseline_at_max_clients() {
    // The noise budget at the largest supported client count, through the codec.
    let clients = fedshield_crypto::params::MAX_CLIENTS;
    let l = layout(1, 8, true); // 1280 values, all kept: one ciphertext per client
    let fp = FixedPoint::new(0.05).unwrap();
    let body = BodyBits::FULL;
    let (enc, pt, _) = round_both_ways(&l, &PruneConfig::dense(), &fp, body, clients, 5);
    let bound = worst_case_error(clients, body) as f64 * fp.ulp();
    let worst = enc
        .iter()
        .zip(&pt)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    // f32 output rounding adds at most one f32 ulp of 0.1.
    assert!(worst <= bound + 1e-8, "worst {worst:e} > bound {bound:e}");
}

#[test]
fn wire_bytes_shrink_with_rho_and_body_width_to_under_half_a_byte_per_parameter() {
    let l = smollm2_layout();
    assert_eq!(l.len(), 4_884_480);
    let fp = FixedPoint::new(0.05).unwrap();
    for (rho, bits, most) in [
        (0.1, 32, 0.41),
        (0.25, 32, 1.01),
        (0.25, 16, 0.51),
        (0.5, 8, 0.51),
    ] {
        let body = BodyBits::new(bits).unwrap();
        let (enc, pt, bytes) = round_both_ways(&l, &uniform(rho), &fp, body, 1, 3);
        let per_param = bytes as f64 / l.len() as f64;
        let floor = rho * body.bytes() as f64;
        assert!(
            per_param <= most,
            "rho {rho}, {bits} bits: {per_param} B/param"
        );
        assert!(
            per_param >= floor,
            "rho {rho}, {bits} bits: {per_param} B/param"
        );
        assert_eq!(enc.len(), pt.len());
    }
}

#[test]
fn narrow_bodies_lose_nothing_over_the_rounds() {
    // Three clients, 8-bit bodies (a rounding of up to 2^55 units per client, about a fifth
    // of the clip value here), four rounds of fresh deltas through the encrypted path: what
    // the decrypted global updates delivered plus the weighted residuals equals the weighted
    // deltas, up to the encryption noise alone (3 x 2^17 units per round), because each
    // client records what its ciphertext delivered. Without that record the rounding would
    // be lost (checked below against the same run).
    let l = layout(1, 4, true);
    let n = l.len();
    let fp = FixedPoint::new(0.05).unwrap();
    let body = BodyBits::new(8).unwrap();
    let weights = [0.5, 0.3, 0.2];
    let rounds = 4u64;
    let run = |record: bool| -> f64 {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut noise = seeder(12);
        let mut feedback = vec![ErrorFeedback::new(n); 3];
        let (mut delivered, mut total) = (vec![0f64; n], vec![0f64; n]);
        let h = History::new(n);
        for round in 1..=rounds {
            let sel = select(&l, &uniform(0.5), &h, round, 7).unwrap();
            let mask_seed = MaskSeed(round as u128);
            let mut agg = Aggregate::new(sel.len(), body);
            let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
            let mut prepared = Vec::new();
            for (f, &w) in feedback.iter().zip(&weights) {
                let delta: Vec<f32> = (0..n).map(|_| rng.random_range(-0.02f32..0.02)).collect();
                for (t, d) in total.iter_mut().zip(&delta) {
                    *t += w * *d as f64;
                }
                let mut p = f.prepare(&delta, &sel, &fp, w).unwrap();
                let key = ClientKey::generate(&mut noise);
                let (ct, what) = Encryptor::new(&key, mask_seed, body, &mut noise)
                    .encrypt_delivered(&p.plaintexts);
                if record {
                    p.record_delivery(&what, &fp, w).unwrap();
                }
                agg.add(&ct).unwrap();
                for (k, b) in key_sum.iter_mut().zip(key.coefficients()) {
                    *k = k.wrapping_add(*b);
                }
                prepared.push(p);
            }
            let sums = agg.decrypt(mask_seed, &key_sum).unwrap();
            let values = decode_values(&sel, &sums, &fp, 1.0).unwrap();
            let mut dense = vec![0f32; n];
            apply(&mut dense, &sel, &values).unwrap();
            for (d, v) in delivered.iter_mut().zip(&dense) {
                *d += *v as f64;
            }
            for (f, p) in feedback.iter_mut().zip(prepared) {
                f.settle(p, true);
            }
        }
        (0..n)
            .map(|i| {
                let pending: f64 = feedback
                    .iter()
                    .zip(&weights)
                    .map(|(f, w)| w * f.residual()[i] as f64)
                    .sum();
                (delivered[i] + pending - total[i]).abs()
            })
            .fold(0.0, f64::max)
    };
    // Noise of every round plus the f32 rounding of the stored values.
    let noise = (rounds * 3 * (1 << NOISE_TUNIFORM_LOG2)) as f64 * fp.ulp();
    let with = run(true);
    assert!(
        with <= noise + 1e-6,
        "lost {with:e} (noise bound {noise:e})"
    );
    let without = run(false);
    assert!(
        without > 1e-3,
        "rounding should be lost without the record: {without:e}"
    );
}

#[test]
fn structures_parse() {
    assert_eq!(Structure::parse("element").unwrap(), Structure::Element);
    assert_eq!(Structure::parse("rank").unwrap(), Structure::Rank);
    assert!(Structure::parse("row").is_err());
}
