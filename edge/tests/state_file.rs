//! The device's state file: a file that cannot be read or is not a state of this device is
//! refused and left byte for byte as it was; a missing one starts fresh.

use fedshield_crypto::identity::DeviceId;
use fedshield_edge::fleet::{Device, FleetClient};
use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_models::gguf::Gguf;
use fedshield_protocol::edge::EdgeIdentity;
use std::path::PathBuf;

fn client(model: &Llama) -> FleetClient<'_> {
    let lora = Lora::new(
        model,
        LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec![Module::V],
            freeze_a: false,
        },
        0,
    );
    FleetClient::new(
        Device {
            model,
            lora,
            train: Vec::new(),
            eval: Vec::new(),
            lr: 1e-3,
            batch_size: 1,
            pad: 0,
            seed: 0,
        },
        EdgeIdentity {
            id: DeviceId("edge-0".into()),
            secret: [1; 32],
            authority: [2; 32],
        },
    )
    .unwrap()
}

#[test]
fn a_corrupt_or_foreign_state_file_is_refused_and_left_intact() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/tiny_llama/model.gguf");
    let model = Llama::from_gguf(&Gguf::open(&path).unwrap(), tch::Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge-0.state");
    // Missing: a fresh start, nothing written yet.
    let (_, restored) = client(&model).with_state(state.clone()).unwrap();
    assert!(restored.is_none());
    assert!(!state.exists());
    // Garbage, a truncated file, a directory: refused, naming the file; untouched.
    for bytes in [b"\xff\xffgarbage".to_vec(), vec![0x06, b'e', b'd']] {
        std::fs::write(&state, &bytes).unwrap();
        let e = client(&model).with_state(state.clone()).err().unwrap();
        assert!(e.to_string().contains("edge-0.state"), "{e}");
        assert_eq!(std::fs::read(&state).unwrap(), bytes);
    }
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    let e = client(&model).with_state(state.clone()).err().unwrap();
    assert!(e.to_string().contains("edge-0.state"), "{e}");
    assert!(state.is_dir());
}
