//! The device's libtorch worker (`fleet::TorchPlatform`): it trains and evaluates on a
//! thread of its own, answers "busy" (NaN, an error) while a training is in flight instead
//! of blocking the caller, and a failed request leaves it serving.

use fedshield_codec::PruneConfig;
use fedshield_crypto::params::BodyBits;
use fedshield_edge::fleet::{Device, TorchPlatform};
use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_edge::sft::batches;
use fedshield_models::gguf::Gguf;
use fedshield_protocol::fleet::edge::Platform;
use fedshield_protocol::fleet::steps::{DeviceStatus, Stopped, Task};
use fedshield_protocol::messages::RoundConfig;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn model() -> Llama {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/tiny_llama/model.gguf");
    Llama::from_gguf(&Gguf::open(&path).unwrap(), tch::Device::Cpu).unwrap()
}

fn round(round: u64, local_steps: usize) -> RoundConfig {
    RoundConfig {
        epoch: 1,
        round,
        mask_seed: 0,
        select_seed: 0,
        prune: PruneConfig::default(),
        clip: 1.0,
        scale_log2: 20,
        body_bits: BodyBits::FULL,
        layout_digest: [0; 32],
        selected: 0,
        history_round: round - 1,
        init_seed: 0,
        local_steps,
        min_local_steps: 1,
        threshold: 1,
        secagg_graph: fedshield_crypto::secagg::GraphPolicy::DEFAULT,
        chunk_bytes: 1024,
        fold_shards: 0,
    }
}

/// `steps` steps with all the time in the world.
fn task(steps: usize) -> Task {
    Task {
        steps,
        effective_steps: steps as f64,
        train_seconds: 1e6,
    }
}

fn platform(train: usize) -> TorchPlatform {
    platform_on(train, None)
}

fn platform_on(train: usize, telemetry: Option<fedshield_telemetry::Telemetry>) -> TorchPlatform {
    let model = model();
    let lora = Lora::new(
        &model,
        LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec![Module::V],
            freeze_a: false,
        },
        0,
    );
    let vocab = model.config.vocab_size as u32;
    let sequences: Vec<_> = (0..4u32)
        .map(|s| {
            let ids: Vec<u32> = (0..10).map(|i| (s * 13 + i * 7 + 1) % vocab).collect();
            let mask = (0..10).map(|i| i >= 5).collect();
            (ids, mask)
        })
        .collect();
    let eval = batches(&sequences, 2, 0, tch::Device::Cpu);
    let status = DeviceStatus {
        plan: Some("ckpt-packed-mb2".into()),
        memory_budget_mib: Some(4096),
        ..DeviceStatus::default()
    };
    TorchPlatform::spawn(
        Device {
            eval,
            train: sequences[..train].to_vec(),
            model,
            lora,
            lr: 1e-2,
            batch_size: 2,
            plan: fedshield_edge::plan::Plan::packed(2),
            pad: 0,
            seed: 3,
            threads: 1,
            pacer: fedshield_edge::pacing::Pacer::off(),
        },
        status,
        telemetry,
    )
    .unwrap()
}

#[test]
fn the_worker_trains_off_the_callers_thread_and_refuses_model_work_meanwhile() {
    let mut p = platform(4);
    let initial = p.initial();
    let before = p.evaluate(&initial);
    assert!(before.is_finite() && before > 0.0, "{before}");
    // The blocking path (the protocol's `train_ready`).
    let sync = p.train(&round(1, 3), &task(3), &initial).unwrap();
    assert_eq!(sync.delta.len(), initial.len());
    let e = &sync.effort;
    assert_eq!((e.assigned, e.steps, e.stopped), (3, 3, None));
    // 3 steps of 2 sequences of 10 tokens.
    assert_eq!(e.tokens, 60);
    assert_eq!(e.joules, None, "no rails on this box");
    assert!(sync.delta.iter().any(|&d| d != 0.0));
    // The driver's path: start, keep going, collect.
    p.start(&round(1, 3), &task(3), &initial);
    assert!(p.evaluate(&initial).is_nan(), "busy: no evaluation");
    assert!(
        p.train(&round(2, 1), &task(1), &initial).is_err(),
        "busy: no second training"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let trained = loop {
        if let Some(t) = p.trained() {
            break t.unwrap();
        }
        assert!(Instant::now() < deadline, "the worker never answered");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Same round, same seed: the same update as the blocking path.
    assert_eq!(trained.delta, sync.delta);
    assert!(p.trained().is_none(), "one result per start");
    // Adapter values restored after training: the same loss as before.
    assert_eq!(p.evaluate(&initial), before);
    let moved: Vec<f32> = initial
        .iter()
        .zip(&trained.delta)
        .map(|(g, d)| g + d)
        .collect();
    assert!(
        p.evaluate(&moved) < before,
        "training lowers the held-out loss"
    );
}

#[test]
fn a_failed_request_is_an_error_and_the_worker_serves_on() {
    let mut p = platform(4);
    let initial = p.initial();
    let err = p.train(&round(1, 1), &task(1), &initial[1..]).unwrap_err();
    assert!(err.contains("values") || err.contains("shape"), "{err}");
    assert!(p.evaluate(&initial[1..]).is_nan());
    assert!(p.evaluate(&initial).is_finite(), "still serving");
    // No training data: refused, not a panic of the process.
    let mut empty = platform(0);
    let err = empty.train(&round(1, 1), &task(1), &initial).unwrap_err();
    assert!(err.contains("no training examples"), "{err}");
    assert!(empty.evaluate(&initial).is_finite());
}

#[test]
fn training_stops_at_the_rounds_time_after_one_step_and_says_so() {
    let mut p = platform(4);
    let initial = p.initial();
    let short = Task {
        steps: 50,
        effective_steps: 50.0,
        train_seconds: 1e-6,
    };
    let t = p.train(&round(1, 50), &short, &initial).unwrap();
    assert_eq!(t.effort.assigned, 50);
    assert_eq!(t.effort.steps, 1);
    assert_eq!(t.effort.stopped, Some(Stopped::Deadline));
    assert!(t.delta.iter().any(|&d| d != 0.0), "the one step is kept");
}

/// The join's status: the plan and budget given at spawn, the power mode and the hottest
/// zone from the sensors at that moment; critical once a zone reaches its passive trip.
#[test]
fn the_status_carries_the_plan_power_mode_and_thermal_state_and_turns_critical_at_the_trip() {
    use fedshield_telemetry::{Telemetry, fixtures};
    let dir = tempfile::tempdir().unwrap();
    fixtures::copy_tree(&fixtures::path("orin-nano-jp6"), dir.path()).unwrap();
    let mut p = platform_on(4, Some(Telemetry::discover(dir.path())));
    let s = p.status();
    assert_eq!(s.plan.as_deref(), Some("ckpt-packed-mb2"));
    assert_eq!(s.memory_budget_mib, Some(4096));
    assert!(s.power_mode.is_some(), "{s:?}");
    let thermal = s.thermal.clone().expect("the fixture has zones");
    assert!(thermal.headroom > 0.0, "{thermal:?}");
    assert_eq!(s.critical, None);
    s.check().unwrap();
    // Heat the hottest zone past its passive trip point.
    let zones = dir.path().join("sys/devices/virtual/thermal");
    for entry in std::fs::read_dir(&zones).unwrap() {
        let zone = entry.unwrap().path();
        let kind = std::fs::read_to_string(zone.join("type")).unwrap_or_default();
        if kind.trim() == thermal.zone {
            std::fs::write(zone.join("temp"), "104500\n").unwrap();
        }
    }
    let hot = p.status();
    let why = hot.critical.clone().expect("critical past the trip point");
    assert!(
        why.contains(&thermal.zone) && why.contains("104.5"),
        "{why}"
    );
    hot.check().unwrap();
}
