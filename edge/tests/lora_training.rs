//! LoRA training on a tiny random Llama (GQA): layer-wise recomputation gives the same
//! gradients as plain autograd, training lowers the loss, FFA-LoRA keeps A fixed, and PEFT
//! save/load round-trips.

use fedshield_edge::llama::{KvCache, Llama, Module, Sampling};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_edge::train::{
    Batch, TrainConfig, Trainer, accumulate_gradients, evaluate, loss, lr_at,
};
use fedshield_models::config::LlamaConfig;
use tch::{Device, Kind, Tensor};

/// libtorch's generator is global: tests that draw from it run one at a time.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> Llama {
    let config = LlamaConfig {
        vocab_size: 97,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
    };
    Llama::random(config, Device::Cpu, 11)
}

fn batch() -> Batch {
    // Two sequences of different lengths; loss on the second half of each.
    let a: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 97).collect();
    let b: Vec<u32> = (0..9).map(|i| (i * 5 + 1) % 97).collect();
    let mask = |n: usize| (0..n).map(|i| i >= n / 2).collect::<Vec<_>>();
    Batch::from_sequences(&[(a, mask(12)), (b, mask(9))], 0, Device::Cpu)
}

fn config(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        target_modules: Module::ALL.to_vec(),
        freeze_a: false,
    }
}

/// Gradients of every trainable tensor after one backward pass, by name.
fn grads(lora: &Lora) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = lora
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn recomputed_gradients_equal_plain_autograd() {
    let _guard = rng_lock();
    let model = tiny();
    // With dropout too: a recomputed layer draws the masks of its first pass.
    for dropout in [0.0, 0.1] {
        check_recomputation(&model, dropout);
    }
}

fn check_recomputation(model: &Llama, dropout: f64) {
    let run = |checkpointing: bool| {
        let lora = Lora::new(model, config(dropout), 5);
        // Non-zero B so that A also gets gradients.
        tch::no_grad(|| {
            for p in lora.pairs.values() {
                let mut bb = p.b.shallow_clone();
                bb.copy_(&(Tensor::randn_like(&p.b) * 0.1));
            }
        });
        let cfg = TrainConfig {
            checkpointing,
            lr: 0.0, // gradients only
            max_grad_norm: 0.0,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(&lora, cfg).unwrap();
        let stats = trainer.step(model, &lora, &[batch()]);
        (stats.loss, grads(&lora))
    };
    let (loss_plain, g_plain) = run(false);
    let (loss_ckpt, g_ckpt) = run(true);
    assert!(
        (loss_plain - loss_ckpt).abs() < 1e-6,
        "{loss_plain} vs {loss_ckpt} (dropout {dropout})"
    );
    assert_eq!(g_plain.len(), 3 * 7 * 2);
    for ((n1, a), (n2, b)) in g_plain.iter().zip(&g_ckpt) {
        assert_eq!(n1, n2);
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(scale > 0.0, "{n1}: zero gradient");
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{n1}: max diff {diff} (scale {scale})"
        );
    }
}

#[test]
fn schedule_warms_up_then_decays_to_zero() {
    let cfg = TrainConfig {
        lr: 1.0,
        warmup_steps: 4,
        total_steps: 14,
        ..TrainConfig::default()
    };
    assert_eq!(lr_at(&cfg, 0), 0.25);
    assert_eq!(lr_at(&cfg, 3), 1.0);
    assert_eq!(lr_at(&cfg, 4), 1.0);
    assert!((lr_at(&cfg, 9) - 0.5).abs() < 1e-12);
    assert!(lr_at(&cfg, 14).abs() < 1e-12);
    assert!(lr_at(&cfg, 100).abs() < 1e-12);
}

#[test]
fn training_lowers_the_loss_and_ffa_keeps_a_fixed() {
    let _guard = rng_lock();
    let model = tiny();
    for (checkpointing, freeze_a) in [(true, false), (false, true)] {
        let lora = Lora::new(
            &model,
            LoraConfig {
                freeze_a,
                ..config(0.05)
            },
            3,
        );
        let a_before: Vec<Tensor> = lora.pairs.values().map(|p| p.a.copy()).collect();
        let cfg = TrainConfig {
            lr: 1e-2,
            warmup_steps: 2,
            total_steps: 100,
            checkpointing,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(&lora, cfg).unwrap();
        let before = evaluate(&model, Some(&lora), &[batch()]);
        for _ in 0..100 {
            trainer.step(&model, &lora, &[batch()]);
        }
        let after = evaluate(&model, Some(&lora), &[batch()]);
        eprintln!("loss {before:.3} -> {after:.3} (checkpointing {checkpointing}, FFA {freeze_a})");
        // A frozen random head bounds how far a rank-4 adapter can go; a 20% drop is clear.
        assert!(
            after < 0.8 * before,
            "loss {before} -> {after} (checkpointing {checkpointing})"
        );
        let a_after: Vec<Tensor> = lora.pairs.values().map(|p| p.a.copy()).collect();
        let a_moved = a_before.iter().zip(&a_after).any(|(x, y)| !x.equal(y));
        assert_eq!(a_moved, !freeze_a, "A moved: {a_moved}, frozen: {freeze_a}");
        if freeze_a {
            // Only B trains: r x (sum of output widths) per layer.
            assert_eq!(
                lora.trainable_len(),
                3 * 4 * (64 + 32 + 32 + 64 + 96 + 96 + 64)
            );
        }
    }
}

#[test]
fn peft_save_and_load_round_trip() {
    let _guard = rng_lock();
    let model = tiny();
    let lora = Lora::new(&model, config(0.0), 9);
    let mut trainer = Trainer::new(
        &lora,
        TrainConfig {
            lr: 1e-2,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    trainer.step(&model, &lora, &[batch()]);
    let dir = tempfile::tempdir().unwrap();
    lora.save_peft(dir.path(), "tiny-random").unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    assert_eq!(json["base_model_name_or_path"], "tiny-random");
    let loaded = Lora::load_peft(dir.path(), &model).unwrap();
    for ((n1, a), (n2, b)) in lora.named_tensors().iter().zip(loaded.named_tensors()) {
        assert_eq!(n1, &n2);
        assert!(a.equal(b), "{n1}");
    }
    assert!(n_logits_equal(&model, &lora, &loaded));
    // An adapter of another shape is refused with the tensor's name.
    let other = Lora::new(
        &model,
        LoraConfig {
            r: 2,
            ..config(0.0)
        },
        1,
    );
    other.save_peft(dir.path(), "x").unwrap();
    std::fs::copy(
        dir.path().join("adapter_model.safetensors"),
        dir.path().join("keep"),
    )
    .unwrap();
    let mut json = json;
    json["r"] = 4.into();
    std::fs::write(dir.path().join("adapter_config.json"), json.to_string()).unwrap();
    let err = Lora::load_peft(dir.path(), &model).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    let missing = tempfile::tempdir().unwrap();
    assert!(Lora::load_peft(missing.path(), &model).is_err());
}

fn n_logits_equal(model: &Llama, a: &Lora, b: &Lora) -> bool {
    let x = batch();
    let la = loss(model, a, &x).double_value(&[]);
    let lb = loss(model, b, &x).double_value(&[]);
    la == lb && la.is_finite() && x.ids.kind() == Kind::Int64
}

#[test]
fn restricted_training_moves_the_selected_coordinates_only() {
    let _guard = rng_lock();
    let model = tiny();
    let lora = Lora::new(&model, config(0.0), 5);
    let before = lora.flatten();
    // Every 7th coordinate, A and B of every pair included.
    let selected: Vec<u32> = (0..before.len() as u32).step_by(7).collect();
    lora.restrict_training(Some(&selected)).unwrap();
    // With weight decay, which must spare the unselected coordinates too.
    let mut trainer = Trainer::new(
        &lora,
        TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            weight_decay: 0.1,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    for _ in 0..5 {
        trainer.step(&model, &lora, &[batch()]);
    }
    let after = lora.flatten();
    let moved: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(!moved.is_empty());
    assert!(
        moved.iter().all(|i| i % 7 == 0),
        "an unselected coordinate moved"
    );
    // Most selected coordinates move (B starts at zero, so its first step moves it).
    assert!(
        moved.len() * 10 > selected.len() * 9,
        "{} of {}",
        moved.len(),
        selected.len()
    );
    // Lifting the restriction trains everything again.
    lora.restrict_training(None).unwrap();
    trainer.step(&model, &lora, &[batch()]);
    let last = lora.flatten();
    let moved = (0..after.len()).filter(|&i| after[i] != last[i]).count();
    assert!(moved * 10 > after.len() * 9, "{moved} of {}", after.len());
    // A coordinate outside the adapter is refused.
    let err = lora
        .restrict_training(Some(&[before.len() as u32]))
        .unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
}

#[test]
fn bf16_matmuls_track_f32_and_train() {
    let _guard = rng_lock();
    let full = tiny();
    let mixed = tiny().with_compute_kind(Kind::BFloat16);
    let lora = Lora::new(&full, config(0.0), 5);
    tch::no_grad(|| {
        for p in lora.pairs.values() {
            let mut b = p.b.shallow_clone();
            b.copy_(&(Tensor::randn_like(&p.b) * 0.1));
        }
    });
    let x = batch();
    let (l32, l16) = (
        evaluate(&full, Some(&lora), std::slice::from_ref(&x)),
        evaluate(&mixed, Some(&lora), std::slice::from_ref(&x)),
    );
    assert!(
        ((l16 - l32) / l32).abs() < 2e-2,
        "bf16 loss {l16} vs f32 {l32}"
    );
    // The LoRA parameters stay f32 and get f32 gradients pointing the same way.
    let flat_grads = |model: &Llama| {
        for t in lora.vs.trainable_variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        accumulate_gradients(model, &lora, std::slice::from_ref(&x), false, 0);
        let gs: Vec<Tensor> = lora
            .vs
            .trainable_variables()
            .iter()
            .map(|t| t.grad().flatten(0, -1))
            .collect();
        Tensor::cat(&gs, 0)
    };
    let (g32, g16) = (flat_grads(&full), flat_grads(&mixed));
    assert_eq!(g16.kind(), Kind::Float);
    let cosine = (&g32 * &g16).sum(Kind::Double).double_value(&[])
        / (g32.norm().double_value(&[]) * g16.norm().double_value(&[]));
    assert!(cosine > 0.99, "gradient cosine {cosine}");
    let mut trainer = Trainer::new(
        &lora,
        TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            checkpointing: true,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    for _ in 0..30 {
        trainer.step(&mixed, &lora, std::slice::from_ref(&x));
    }
    let after = evaluate(&mixed, Some(&lora), std::slice::from_ref(&x));
    eprintln!("bf16: loss {l16:.4} (f32 {l32:.4}), cosine {cosine:.5}, trained to {after:.4}");
    assert!(after < 0.8 * l16, "bf16 training: {l16} -> {after}");
}

#[test]
fn cached_decoding_equals_full_recomputation() {
    let _guard = rng_lock();
    let model = tiny();
    let lora = Lora::new(&model, config(0.0), 9);
    tch::no_grad(|| {
        for p in lora.pairs.values() {
            let mut b = p.b.shallow_clone();
            b.copy_(&(Tensor::randn_like(&p.b) * 0.1));
        }
    });
    let ids: Vec<i64> = (0..12).map(|i| (i * 13 + 5) % 97).collect();
    let full = tch::no_grad(|| model.hidden_states(&Tensor::from_slice(&ids).unsqueeze(0), &lora));
    // Prefill 5, then 3 at once (a masked block), then one at a time.
    let mut cache = KvCache::new(&model);
    let mut pieces = Vec::new();
    for (from, to) in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11), (11, 12)] {
        let input = Tensor::from_slice(&ids[from..to]).unsqueeze(0);
        pieces.push(tch::no_grad(|| {
            model.hidden_states_cached(&input, &lora, &mut cache)
        }));
    }
    assert_eq!(cache.len(), 12);
    let stepped = Tensor::cat(&pieces, 1);
    let d = (&full - &stepped).abs().max().double_value(&[]);
    assert!(d < 1e-5, "cached hidden states differ by {d}");
    // Generation with the cache picks the tokens full recomputation picks.
    let prompt: Vec<u32> = ids[..4].iter().map(|&i| i as u32).collect();
    let generated = model.generate(&lora, &prompt, 8, u32::MAX, &Sampling::greedy());
    let mut seq: Vec<i64> = ids[..4].to_vec();
    for &tok in &generated {
        let hidden =
            tch::no_grad(|| model.hidden_states(&Tensor::from_slice(&seq).unsqueeze(0), &lora));
        let logits = model.logits(&hidden.select(1, -1));
        assert_eq!(logits.argmax(-1, false).int64_value(&[0]), tok as i64);
        seq.push(tok as i64);
    }
    assert_eq!(generated.len(), 8);
}

/// The trainer applies weight decay itself (so that it can honour a restriction); without a
/// restriction it must be libtorch's AdamW with that weight decay, step for step.
#[test]
fn weight_decay_matches_libtorch_adamw() {
    let _guard = rng_lock();
    let model = tiny();
    let ours = Lora::new(&model, config(0.0), 9);
    let reference = Lora::new(&model, config(0.0), 9);
    assert_eq!(ours.flatten(), reference.flatten());
    let cfg = TrainConfig {
        lr: 1e-2,
        warmup_steps: 0,
        weight_decay: 0.1,
        max_grad_norm: 0.0,
        checkpointing: false,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&ours, cfg.clone()).unwrap();
    let mut opt = tch::nn::OptimizerConfig::build(
        tch::nn::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: 0.1,
            eps: 1e-8,
            amsgrad: false,
        },
        &reference.vs,
        cfg.lr,
    )
    .unwrap();
    for step in 0..4 {
        trainer.step(&model, &ours, &[batch()]);
        opt.zero_grad();
        reference.set_training(true);
        accumulate_gradients(&model, &reference, &[batch()], false, 0);
        reference.set_training(false);
        opt.set_lr(lr_at(&cfg, step));
        opt.step();
    }
    let (a, b) = (ours.flatten(), reference.flatten());
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-6, "max abs difference {max}");
    // And the decay did something: without it the values differ.
    let plain = Lora::new(&model, config(0.0), 9);
    let mut trainer = Trainer::new(
        &plain,
        TrainConfig {
            weight_decay: 0.0,
            ..cfg
        },
    )
    .unwrap();
    for _ in 0..4 {
        trainer.step(&model, &plain, &[batch()]);
    }
    let c = plain.flatten();
    let diff = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-5, "weight decay changed nothing ({diff})");
}
