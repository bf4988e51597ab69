//! Host and edges agree on the adapter without sharing a model copy: the layout the host
//! derives from GGUF shapes equals the trainer's, the fleet's initial adapter loads into the
//! trainer's tensors, and the adapter the host writes (pure Rust safetensors) loads back as
//! a PEFT adapter with the same values.

use fedshield_codec::{init_adapter, to_safetensors};
use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_models::config::LlamaConfig;
use fedshield_models::gguf::Gguf;
use std::path::PathBuf;
use tch::Device;

fn tiny() -> (Gguf, Llama) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/tiny_llama/model.gguf");
    let g = Gguf::open(&path).unwrap();
    let model = Llama::from_gguf(&g, Device::Cpu).unwrap();
    (g, model)
}

#[test]
fn host_layout_initial_adapter_and_written_adapter_match_the_trainer() {
    let (g, model) = tiny();
    let targets = [Module::Q, Module::V, Module::Down];
    let lora = Lora::new(
        &model,
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: targets.to_vec(),
            freeze_a: false,
        },
        0,
    );
    let host_layout = LlamaConfig::from_gguf(&g)
        .unwrap()
        .lora_layout(4, &["q_proj", "v_proj", "down_proj"], true)
        .unwrap();
    assert_eq!(lora.layout().unwrap(), host_layout);
    assert_eq!(lora.layout().unwrap().digest(), host_layout.digest());

    // The shared initial adapter: A within PEFT's bound, B zero, loaded exactly.
    let init = init_adapter(&host_layout, 11);
    assert_eq!(init, init_adapter(&host_layout, 11));
    assert_ne!(init, init_adapter(&host_layout, 12));
    lora.load_flat(&init).unwrap();
    assert_eq!(lora.flatten(), init);
    for (i, spec) in host_layout.pairs().iter().enumerate() {
        let base = host_layout.offset(i);
        let bound = 1.0 / (spec.in_features as f32).sqrt();
        assert!(
            init[base..base + spec.a_len()]
                .iter()
                .all(|v| v.abs() <= bound)
        );
        assert!(
            init[base + spec.a_len()..base + spec.len()]
                .iter()
                .all(|&v| v == 0.0)
        );
    }
    assert!(lora.load_flat(&init[1..]).is_err());

    // What the host writes after a round loads as a PEFT adapter with the same values.
    let trained: Vec<f32> = init
        .iter()
        .enumerate()
        .map(|(i, v)| v + i as f32 * 1e-4)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        to_safetensors(&host_layout, &trained).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
    )
    .unwrap();
    let loaded = Lora::load_peft(dir.path(), &model).unwrap();
    assert_eq!(loaded.flatten(), trained);
}
