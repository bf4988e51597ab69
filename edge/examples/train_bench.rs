//! Training benchmark: ours and PyTorch + PEFT side by side, in one run, same machine, same
//! configuration, each side in its own process (so each peak RSS is its own).
//!
//!     scripts/bench-train.sh        (installs transformers + PEFT, then runs this)
//!
//! Configurations: `small` (vocab 32000, hidden 512, intermediate 1408, 6 layers, 8 heads /
//! 4 KV heads, random dense f32 base on both sides) and `smollm2` (SmolLM2-135M: ours with
//! its packed 4-bit base and layer-wise recomputation, PEFT with the f32 base transformers
//! dequantizes from the same GGUF). LoRA r=16 alpha=32 dropout 0.05 on all seven
//! projections, AdamW, batch 4 x seq 256 random tokens with loss on every position, 2
//! threads. Writes `target/bench/train.json`.

mod bench_util;

use bench_util::{arg, last_json_line, peak_rss_mib};
use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_edge::plan::{Plan, Workload};
use fedshield_edge::planner::reset_peak;
use fedshield_edge::train::resident_set_bytes;
use fedshield_edge::train::{Batch, TrainConfig, Trainer};
use fedshield_models::Assets;
use fedshield_models::config::LlamaConfig;
use fedshield_models::gguf::Gguf;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 4;
const SEQ: i64 = 256;
const THREADS: i32 = 2;

fn main() {
    let result = match arg("--side").as_deref() {
        Some("ours") => measure_ours(&arg("--config").unwrap_or_default()).map(|v| println!("{v}")),
        Some("plan") => measure_plan(&arg("--config").unwrap_or_default()).map(|v| println!("{v}")),
        _ if std::env::args().any(|a| a == "--plans") => plans(),
        _ => orchestrate(),
    };
    if let Err(e) = result {
        eprintln!("train_bench: {e}");
        std::process::exit(1);
    }
}

/// The base model of a benchmark configuration: `small` random dense f32 (or, `packed`,
/// quantized to Q4_0), `smollm2` from its GGUF (packed Q4_1 / Q8_0 as stored).
fn load(config: &str, packed: bool) -> Result<Llama, String> {
    match config {
        "small" => {
            let model = Llama::random(LlamaConfig::bench_small(), Device::Cpu, 0);
            Ok(if packed {
                model.quantized_q4_0()
            } else {
                model
            })
        }
        "smollm2" => {
            let path = Assets::locate().smollm2_gguf().map_err(|e| e.to_string())?;
            let g = Gguf::open(&path).map_err(|e| e.to_string())?;
            Llama::from_gguf(&g, Device::Cpu).map_err(|e| e.to_string())
        }
        other => Err(format!("unknown config {other:?}")),
    }
}

fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.05,
        target_modules: Module::ALL.to_vec(),
        freeze_a: false,
    }
}

/// Times `steps` optimizer steps (after `warmup`) of batch BATCH x SEQ random tokens in
/// micro-batches of `micro`; returns tokens/s.
fn time_steps(
    model: &Llama,
    lora: &Lora,
    trainer: &mut Trainer,
    micro: i64,
    warmup: usize,
    steps: usize,
) -> f64 {
    let vocab = model.config.vocab_size as i64;
    tch::manual_seed(1);
    let (mut tokens, mut elapsed) = (0i64, 0.0f64);
    for step in 0..warmup + steps {
        let ids = Tensor::randint(vocab, [BATCH, SEQ], (Kind::Int64, Device::Cpu));
        let batches: Vec<Batch> = (0..BATCH / micro)
            .map(|k| {
                let ids = ids.narrow(0, k * micro, micro);
                Batch {
                    labels: ids.shallow_clone(),
                    ids,
                }
            })
            .collect();
        let t0 = Instant::now();
        trainer.step(model, lora, &batches);
        if step >= warmup {
            elapsed += t0.elapsed().as_secs_f64();
            tokens += BATCH * SEQ;
        }
    }
    tokens as f64 / elapsed
}

fn trainer(lora: &Lora, checkpointing: bool) -> Result<Trainer, String> {
    Trainer::new(
        lora,
        TrainConfig {
            lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1000,
            max_grad_norm: 0.0,
            checkpointing,
            ..TrainConfig::default()
        },
    )
    .map_err(|e| e.to_string())
}

/// The PEFT comparison's side: the small config dense without recomputation, SmolLM2 with
/// its packed base under today's fixed plan.
fn measure_ours(config: &str) -> Result<Value, String> {
    tch::set_num_threads(THREADS);
    let model = load(config, false)?;
    let checkpointing = config == "smollm2";
    let lora = Lora::new(&model, lora_config(), 0);
    let mut trainer = trainer(&lora, checkpointing)?;
    let tokens_per_s = time_steps(&model, &lora, &mut trainer, BATCH, 1, 6);
    Ok(json!({
        "tokens_per_s": tokens_per_s,
        "peak_rss_mib": peak_rss_mib(),
        "steps": 6,
        "batch": BATCH,
        "seq": SEQ,
        "threads": THREADS,
        "checkpointing": checkpointing,
        "base_bytes": model.weight_bytes(),
    }))
}

/// One plan on a packed base: `--plan NAME`, or `--budget-mib B` for the planner's choice
/// under that budget. Prints the prediction, the measured peak and tokens/s.
fn measure_plan(config: &str) -> Result<Value, String> {
    tch::set_num_threads(THREADS);
    let mut model = load(config, true)?;
    let lc = lora_config();
    let lora = Lora::new(&model, lc.clone(), 0);
    let workload = Workload::new(
        &model.config,
        lc.r as u64,
        &lc.target_modules,
        lc.dropout > 0.0,
        BATCH as usize,
        SEQ as usize,
        4,
    );
    let layers = model.config.num_hidden_layers;
    // As the planner does: loading's freed memory handed back first.
    fedshield_edge::train::release_free_memory();
    let baseline = resident_set_bytes().unwrap_or(0);
    let (plan, chosen_for) = match (arg("--plan"), arg("--budget-mib")) {
        (Some(name), _) if name == "smallest" => {
            let c = workload.choose(0, baseline);
            (c.plan, None)
        }
        (Some(name), _) => (Plan::parse(&name, layers)?, None),
        (None, Some(b)) => {
            let mib: f64 = b.parse().map_err(|e| format!("--budget-mib {b:?}: {e}"))?;
            let budget = (mib * (1 << 20) as f64) as u64;
            (workload.choose(budget, baseline).plan, Some(mib))
        }
        (None, None) => return Err("--plan NAME or --budget-mib B".into()),
    };
    let estimate = workload.predict(&plan, baseline);
    let load_peak_mib = peak_rss_mib();
    reset_peak();
    model.set_residency(plan.resident_layers, plan.resident_head);
    let mut trainer = trainer(&lora, plan.checkpointing)?;
    let tokens_per_s = time_steps(&model, &lora, &mut trainer, plan.micro_batch as i64, 1, 3);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let measured_mib = peak_rss_mib();
    Ok(json!({
        "name": plan.name(layers),
        "predicted_mib": mib(estimate.total),
        "measured_mib": measured_mib,
        // Loading included, as the PEFT side's peak is.
        "peak_rss_mib": measured_mib.max(load_peak_mib),
        "tokens_per_s": tokens_per_s,
        "cost": workload.cost(&plan),
        "baseline_mib": mib(estimate.baseline),
        "resident_mib": mib(estimate.resident),
        "step_mib": mib(estimate.step),
        "optimizer_mib": mib(estimate.optimizer),
        "chosen_for_budget_mib": chosen_for,
    }))
}

fn orchestrate() -> Result<(), String> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let python = root.join(".deps/venv/bin/python");
    let script = manifest.join("bench/peft_train.py");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut configs = Vec::new();
    let only = arg("--config");
    for name in ["small", "smollm2"] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        eprintln!("[bench] {name}: PyTorch + PEFT ...");
        let peft = Command::new(&python)
            .arg(&script)
            .args(["--config", name, "--threads", &THREADS.to_string()])
            .env("OMP_NUM_THREADS", THREADS.to_string())
            .output()
            .map_err(|e| format!("{python:?}: {e} (run scripts/bench-train.sh)"))?;
        let peft = last_json_line(&peft, "PEFT side")?;
        eprintln!("[bench] {name}: ours ...");
        let ours = Command::new(&me)
            .args(["--side", "ours", "--config", name])
            .env("OMP_NUM_THREADS", THREADS.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        let ours = last_json_line(&ours, "our side")?;
        let ratio =
            |k: &str| ours[k].as_f64().unwrap_or(f64::NAN) / peft[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:<8} tokens/s: ours {:>8.1}  PEFT {:>8.1}  ratio {:.2}x | peak RSS MiB: ours {:>7.0}  PEFT {:>7.0}  ratio {:.2}",
            ours["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            peft["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            ratio("tokens_per_s"),
            ours["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            peft["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            ratio("peak_rss_mib"),
        );
        // The planner's choice under PEFT's own peak as the budget, and the smallest plan,
        // both on a packed base (the small config quantized to Q4_0).
        let budget = format!("{:.0}", peft["peak_rss_mib"].as_f64().unwrap_or(0.0));
        let mut planned = Vec::new();
        for (label, extra) in [
            ("planner at PEFT's peak", ["--budget-mib", budget.as_str()]),
            ("smallest plan", ["--plan", "smallest"]),
        ] {
            eprintln!("[bench] {name}: {label} ...");
            let v = run_plan_side(name, &extra)?;
            let r =
                |k: &str| v[k].as_f64().unwrap_or(f64::NAN) / peft[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{name:<8} {label} ({}): tokens/s {:>8.1} ratio {:.2}x | peak RSS {:>7.0} MiB ratio {:.2}",
                v["name"].as_str().unwrap_or("?"),
                v["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                r("tokens_per_s"),
                v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
                r("peak_rss_mib"),
            );
            planned.push(json!({
                "label": label,
                "run": v,
                "ratios": {"tokens_per_s": r("tokens_per_s"), "peak_rss": r("peak_rss_mib")},
            }));
        }
        configs.push(json!({
            "name": name,
            "ours": ours,
            "peft": peft,
            "ratios": {"tokens_per_s": ratio("tokens_per_s"), "peak_rss": ratio("peak_rss_mib")},
            "planned": planned,
        }));
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let path = out_dir.join("train.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({ "configs": configs })).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Runs `--side plan` in a fresh process of this binary with `extra` arguments.
fn run_plan_side(config: &str, extra: &[&str]) -> Result<Value, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(&me)
        .args(["--side", "plan", "--config", config])
        .args(extra)
        .env("OMP_NUM_THREADS", THREADS.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    last_json_line(&out, &format!("plan {extra:?} on {config}"))
}

/// `--plans`: the planner's predicted peak against the measured one for ten plans on each
/// configuration (packed bases: SmolLM2's GGUF, the small config quantized to Q4_0), each
/// plan in its own process. Writes `target/bench/plan.json`.
fn plans() -> Result<(), String> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let only = arg("--config");
    let mut rows = Vec::new();
    println!(
        "{:<8} {:<22} {:>10} {:>10} {:>7} {:>9}",
        "config", "plan", "predicted", "measured", "error", "tokens/s"
    );
    for (config, layers) in [("small", 6usize), ("smollm2", 30)] {
        if only.as_deref().is_some_and(|o| o != config) {
            continue;
        }
        let half = layers / 2;
        let names = [
            "ckpt-packed-mb4".to_string(),
            "ckpt-packed-mb1".to_string(),
            "ckpt-head-mb4".to_string(),
            format!("ckpt-res{half}-mb4"),
            format!("ckpt-res{half}+head-mb2"),
            "ckpt-dense-mb4".to_string(),
            "ckpt-dense-mb1".to_string(),
            "full-dense-mb1".to_string(),
            "full-dense-mb2".to_string(),
            "full-dense-mb4".to_string(),
        ];
        for name in &names {
            let mut v = run_plan_side(config, &["--plan", name])?;
            let (p, m) = (
                v["predicted_mib"].as_f64().unwrap_or(f64::NAN),
                v["measured_mib"].as_f64().unwrap_or(f64::NAN),
            );
            let error = (p - m) / m;
            println!(
                "{config:<8} {name:<22} {p:>7.0} MiB {m:>6.0} MiB {:>+6.1}% {:>9.1}",
                100.0 * error,
                v["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
            );
            v["config"] = json!(config);
            v["error"] = json!(error);
            rows.push(v);
        }
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let path = out_dir.join("plan.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({ "plans": rows })).unwrap(),
    )
    .map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    Ok(())
}
