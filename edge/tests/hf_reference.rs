//! The Rust Llama + LoRA matches Hugging Face transformers + PEFT on a tiny random Llama
//! with grouped-query attention, loaded from GGUF (with llama.cpp's Q/K permutation) and a
//! PEFT-saved adapter: logits without and with the adapter, the response-only loss, and the
//! gradient of every LoRA tensor, within 1e-4 in f32.
//! Fixtures: models/fixtures/tiny_llama (models/scripts/make_tiny_llama.py).

use fedshield_edge::llama::{Llama, NoAdapter};
use fedshield_edge::lora::Lora;
use fedshield_edge::train::{Batch, accumulate_gradients, loss};
use fedshield_models::gguf::Gguf;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/tiny_llama")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect()
}

fn max_diff(got: &Tensor, want: &[f32]) -> f64 {
    let got: Vec<f32> = got.detach().flatten(0, -1).try_into().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max)
}

#[test]
fn logits_loss_and_lora_gradients_match_transformers_and_peft() {
    let dir = fixtures();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let g = Gguf::open(&dir.join("model.gguf")).unwrap();
    let model = Llama::from_gguf(&g, Device::Cpu).unwrap();
    assert_eq!(model.config.num_key_value_heads, 2);
    let ids = Tensor::from_slice(&ints(&reference["ids"])).reshape([2, 10]);
    let labels = Tensor::from_slice(&ints(&reference["labels"])).reshape([2, 10]);

    let base = tch::no_grad(|| model.logits(&model.hidden_states(&ids, &NoAdapter)));
    let d = max_diff(&base, &floats(&reference["base_logits"]));
    assert!(d <= TOLERANCE, "base logits differ by {d}");
    eprintln!("base logits: max |diff| {d:.2e}");

    let lora = Lora::load_peft(&dir.join("adapter"), &model).unwrap();
    let with_lora = tch::no_grad(|| model.logits(&model.hidden_states(&ids, &lora)));
    let d = max_diff(&with_lora, &floats(&reference["lora_logits"]));
    assert!(d <= TOLERANCE, "adapter logits differ by {d}");
    eprintln!("adapter logits: max |diff| {d:.2e}");

    let batch = Batch { ids, labels };
    let l = loss(&model, &lora, &batch);
    let want_loss = reference["loss"].as_f64().unwrap();
    assert!(
        (l.double_value(&[]) - want_loss).abs() <= TOLERANCE,
        "loss {} vs {want_loss}",
        l.double_value(&[])
    );
    l.backward();
    let worst = check_gradients(&lora, &reference);
    eprintln!(
        "loss {:.6} (reference {want_loss:.6}); LoRA gradients: max |diff| {worst:.2e}",
        l.double_value(&[])
    );
    assert_eq!(base.kind(), Kind::Float);

    // The training path (fused, chunked LM head and loss; with and without layer-wise
    // recomputation) gives the same loss and gradients.
    for checkpointing in [false, true] {
        for t in lora.vs.trainable_variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let (sum, tokens) = accumulate_gradients(
            &model,
            &lora,
            std::slice::from_ref(&batch),
            checkpointing,
            0,
        );
        let got = sum / tokens as f64;
        assert!(
            (got - want_loss).abs() <= TOLERANCE,
            "training path loss {got} vs {want_loss} (checkpointing {checkpointing})"
        );
        let worst = check_gradients(&lora, &reference);
        eprintln!("training path, checkpointing {checkpointing}: max |diff| {worst:.2e}");
    }
}

/// Asserts every LoRA gradient matches the reference within the tolerance; the largest
/// difference.
fn check_gradients(lora: &Lora, reference: &serde_json::Value) -> f64 {
    let mut worst = 0.0f64;
    let grads = reference["grads"].as_object().unwrap();
    assert_eq!(grads.len(), lora.named_tensors().len());
    for (name, t) in lora.named_tensors() {
        let want = &grads[&name];
        let shape: Vec<i64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(t.size(), shape, "{name}");
        let d = max_diff(&t.grad(), &floats(&want["values"]));
        assert!(d <= TOLERANCE, "{name}: gradient differs by {d}");
        worst = worst.max(d);
    }
    worst
}
