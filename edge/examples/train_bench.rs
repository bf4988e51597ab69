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

use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::{Lora, LoraConfig};
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

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let result = match arg("--side").as_deref() {
        Some("ours") => measure_ours(&arg("--config").unwrap_or_default()).map(|v| println!("{v}")),
        _ => orchestrate(),
    };
    if let Err(e) = result {
        eprintln!("train_bench: {e}");
        std::process::exit(1);
    }
}

/// Peak resident set of this process, MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn measure_ours(config: &str) -> Result<Value, String> {
    tch::set_num_threads(THREADS);
    let (model, checkpointing) = match config {
        "small" => (
            Llama::random(LlamaConfig::bench_small(), Device::Cpu, 0),
            false,
        ),
        "smollm2" => {
            let path = Assets::locate().smollm2_gguf().map_err(|e| e.to_string())?;
            let g = Gguf::open(&path).map_err(|e| e.to_string())?;
            (
                Llama::from_gguf(&g, Device::Cpu).map_err(|e| e.to_string())?,
                true,
            )
        }
        other => return Err(format!("unknown config {other:?}")),
    };
    let lora = Lora::new(
        &model,
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: Module::ALL.to_vec(),
            freeze_a: false,
        },
        0,
    );
    let mut trainer = Trainer::new(
        &lora,
        TrainConfig {
            lr: 1e-4,
            warmup_steps: 0,
            total_steps: 1000,
            max_grad_norm: 0.0,
            checkpointing,
            ..TrainConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let (warmup, steps) = (1, 6);
    let vocab = model.config.vocab_size as i64;
    tch::manual_seed(1);
    let (mut tokens, mut elapsed) = (0i64, 0.0f64);
    for step in 0..warmup + steps {
        let ids = Tensor::randint(vocab, [BATCH, SEQ], (Kind::Int64, Device::Cpu));
        let batch = Batch {
            labels: ids.shallow_clone(),
            ids,
        };
        let t0 = Instant::now();
        trainer.step(&model, &lora, &[batch]);
        if step >= warmup {
            elapsed += t0.elapsed().as_secs_f64();
            tokens += BATCH * SEQ;
        }
    }
    Ok(json!({
        "tokens_per_s": tokens as f64 / elapsed,
        "peak_rss_mib": peak_rss_mib(),
        "steps": steps,
        "batch": BATCH,
        "seq": SEQ,
        "threads": THREADS,
        "checkpointing": checkpointing,
        "base_bytes": model.weight_bytes(),
    }))
}

fn last_json_line(out: &std::process::Output, what: &str) -> Result<Value, String> {
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("{what} output {last:?}: {e}"))
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
        configs.push(json!({
            "name": name,
            "ours": ours,
            "peft": peft,
            "ratios": {"tokens_per_s": ratio("tokens_per_s"), "peak_rss": ratio("peak_rss_mib")},
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
