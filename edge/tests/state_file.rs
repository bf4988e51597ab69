//! The device's state file: a file that cannot be read or is not a state of this device is
//! refused and left byte for byte as it was; a missing one starts fresh.

use fedshield_crypto::identity::DeviceId;
use fedshield_edge::fleet::{EdgeFleet, open_state};
use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_models::gguf::Gguf;
use fedshield_protocol::edge::EdgeIdentity;
use std::path::PathBuf;

/// A device of the tiny model, as `fedshield-edge run` builds it.
fn client(model: &Llama) -> EdgeFleet {
    device(model, "edge-0")
}

fn device(model: &Llama, id: &str) -> EdgeFleet {
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
    EdgeFleet::new(
        EdgeIdentity {
            id: DeviceId(id.into()),
            secret: [1; 32],
            authority: [2; 32],
        },
        lora.layout().unwrap(),
        lora.flatten(),
        0,
    )
}

#[test]
fn a_corrupt_or_foreign_state_file_is_refused_and_left_intact() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/tiny_llama/model.gguf");
    let model = Llama::from_gguf(&Gguf::open(&path).unwrap(), tch::Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("edge-0.state");
    // Missing: a fresh start, nothing written yet.
    assert!(open_state(&mut client(&model), &state).unwrap().is_none());
    assert!(!state.exists());
    // Garbage, a truncated file, a directory: refused, naming the file; untouched.
    for bytes in [b"\xff\xffgarbage".to_vec(), vec![0x06, b'e', b'd']] {
        std::fs::write(&state, &bytes).unwrap();
        let e = open_state(&mut client(&model), &state).unwrap_err();
        assert!(e.to_string().contains("edge-0.state"), "{e}");
        assert_eq!(std::fs::read(&state).unwrap(), bytes);
    }
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    let e = open_state(&mut client(&model), &state).unwrap_err();
    assert!(e.to_string().contains("edge-0.state"), "{e}");
    assert!(state.is_dir());
    std::fs::remove_dir(&state).unwrap();
    // A state of this device's own making restores; another device's is refused, intact.
    let mine = client(&model);
    std::fs::write(&state, mine.state_bytes()).unwrap();
    let line = open_state(&mut client(&model), &state).unwrap().unwrap();
    assert!(line.contains("round 0 applied"), "{line}");
    let other = device(&model, "edge-1");
    let bytes = other.state_bytes();
    std::fs::write(&state, &bytes).unwrap();
    let e = open_state(&mut client(&model), &state).unwrap_err();
    assert!(e.to_string().contains("edge-1"), "{e}");
    assert_eq!(std::fs::read(&state).unwrap(), bytes);
}
