//! Inference benchmark: ours on ONNX Runtime (the `export-onnx` graph), ours on libtorch, and
//! llama.cpp (llama-cpp-python, built by `scripts/setup.sh --bench`), side by side in one
//! run on the same machine and GGUF (SmolLM2-135M-Instruct Q4_1), each in its own process
//! (so each peak RSS is its own): a 64-token prompt in one batch, then 128 new tokens by
//! greedy decoding (end-of-sequence ignored), one and two threads, after a short warm-up.
//!
//!     scripts/bench-infer.sh        (installs llama-cpp-python, then runs this)
//!     cargo run -p fedshield-edge --example infer_bench -- --quick
//!                                   (CI: ours only, one thread, 32 new tokens, the ratios
//!                                   to our libtorch path, target/bench-quick/infer.json)
//!
//! Writes `target/bench/infer.json`: `runs` (each with `engine`, `threads`,
//! `decode_tokens_per_s`, `prefill_ms`, `first_token_ms`, `peak_rss_mib`) and the ratios to
//! llama.cpp; prints them.

mod bench_util;

use bench_util::{arg, last_json_line, peak_rss_mib};
use fedshield_edge::llama::{KvCache, Llama, NoAdapter};
use fedshield_edge::onnx_graph::{DecodeOptions, OnnxDecoder, Precision};
use fedshield_models::Assets;
use fedshield_models::gguf::Gguf;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PROMPT: usize = 64;
const NEW: usize = 128;
const ORT_EXACT: &str = "ours (ORT, exact)";
const ORT_INT8: &str = "ours (ORT, int8)";

fn main() {
    let threads = arg("--threads").and_then(|t| t.parse().ok()).unwrap_or(1);
    let result = match arg("--side").as_deref() {
        Some("ort") => side_ort(threads).map(|v| println!("{v}")),
        Some("torch") => side_torch(threads).map(|v| println!("{v}")),
        _ => orchestrate(),
    };
    if let Err(e) = result {
        eprintln!("infer_bench: {e}");
        std::process::exit(1);
    }
}

/// New tokens per measured run (`--new`, else [`NEW`]).
fn new_tokens() -> usize {
    arg("--new").and_then(|n| n.parse().ok()).unwrap_or(NEW)
}

fn ids() -> Result<Vec<u32>, String> {
    let text = std::fs::read_to_string(arg("--ids").ok_or("--ids")?).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0) as u32
}

/// One measured run: (prefill s, first token s, total s, tokens).
type Run = (f64, f64, f64, Vec<u32>);

fn report(engine: &str, threads: usize, run: Run) -> Value {
    let (prefill, first, total, tokens) = run;
    json!({
        "engine": engine,
        "threads": threads,
        "new_tokens": tokens.len(),
        "prefill_ms": prefill * 1e3,
        "first_token_ms": first * 1e3,
        "decode_tokens_per_s": (tokens.len() - 1) as f64 / (total - first),
        "peak_rss_mib": peak_rss_mib(),
        "tokens": tokens,
    })
}

fn side_ort(threads: usize) -> Result<Value, String> {
    let ids = ids()?;
    let env =
        fedshield_edge::inference::environment(&Assets::locate()).map_err(|e| e.to_string())?;
    let dir = PathBuf::from(arg("--onnx").ok_or("--onnx")?);
    let mut decoder = OnnxDecoder::open(env, &dir, threads).map_err(|e| e.to_string())?;
    let engine = match decoder.meta().options.precision {
        Precision::Exact => ORT_EXACT,
        Precision::Int8 => ORT_INT8,
    };
    let mut run = |new: usize| -> Result<Run, String> {
        let started = Instant::now();
        let mut cache = decoder.empty_cache().map_err(|e| e.to_string())?;
        let mut logits = decoder.step(&mut cache, &ids).map_err(|e| e.to_string())?;
        let prefill = started.elapsed().as_secs_f64();
        let mut out = Vec::new();
        let mut first = 0.0;
        while out.len() < new {
            let token = argmax(&logits);
            if out.is_empty() {
                first = started.elapsed().as_secs_f64();
            }
            out.push(token);
            if out.len() < new {
                logits = decoder
                    .step(&mut cache, &[token])
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok((prefill, first, started.elapsed().as_secs_f64(), out))
    };
    run(8)?; // warm-up
    Ok(report(engine, threads, run(new_tokens())?))
}

fn side_torch(threads: usize) -> Result<Value, String> {
    let ids = ids()?;
    tch::set_num_threads(threads as i32);
    let path = Assets::locate().smollm2_gguf().map_err(|e| e.to_string())?;
    let g = Gguf::open(&path).map_err(|e| e.to_string())?;
    let model = Llama::from_gguf(&g, tch::Device::Cpu).map_err(|e| e.to_string())?;
    let step = |cache: &mut KvCache, ids: &[u32]| -> u32 {
        let input: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let input = tch::Tensor::from_slice(&input).unsqueeze(0);
        let hidden = model.hidden_states_cached(&input, &NoAdapter, cache);
        let logits = model.logits(&hidden.select(1, -1)).squeeze_dim(0);
        logits.argmax(-1, false).int64_value(&[]) as u32
    };
    let run = |new: usize| -> Run {
        tch::no_grad(|| {
            let started = Instant::now();
            let mut cache = KvCache::new(&model);
            let mut token = step(&mut cache, &ids);
            // The head and argmax are part of the prefill call here.
            let prefill = started.elapsed().as_secs_f64();
            let first = prefill;
            let mut out = vec![token];
            while out.len() < new {
                token = step(&mut cache, &[token]);
                out.push(token);
            }
            (prefill, first, started.elapsed().as_secs_f64(), out)
        })
    };
    run(8); // warm-up
    Ok(report("ours (libtorch)", threads, run(new_tokens())))
}

/// The benchmark's prompt: the first 64 tokens of a chat prompt, written to `path`.
fn write_prompt(path: &Path) -> Result<Vec<u32>, String> {
    let gguf = Assets::locate().smollm2_gguf().map_err(|e| e.to_string())?;
    let g = Gguf::open(&gguf).map_err(|e| e.to_string())?;
    let tok = fedshield_models::tokenizer::Tokenizer::from_gguf(&g).map_err(|e| e.to_string())?;
    let text = "A contractor plans to renovate a four-storey residential building in the old \
                town of Zaragoza: new facade insulation, a lift in the stairwell, and the \
                replacement of the roof. Which permits are needed, in which order should they \
                be requested, how long does each take, and what inspections follow the works?";
    let prompt = tok.chat_prompt(
        &[fedshield_models::tokenizer::Message {
            role: "user".into(),
            content: text.into(),
        }],
        true,
    );
    let mut ids = tok.encode(&prompt).map_err(|e| e.to_string())?;
    if ids.len() < PROMPT {
        return Err(format!(
            "the prompt has {} tokens, fewer than {PROMPT}",
            ids.len()
        ));
    }
    ids.truncate(PROMPT);
    std::fs::write(path, serde_json::to_string(&ids).unwrap()).map_err(|e| e.to_string())?;
    Ok(ids)
}

fn orchestrate() -> Result<(), String> {
    // --quick (CI): ours only, one thread, 32 new tokens, the ratios to our libtorch path;
    // fails if ours exact and ours on libtorch decode different tokens.
    let quick = std::env::args().any(|a| a == "--quick");
    let (new, thread_counts, baseline, out) = if quick {
        (32, vec![1usize], "ours (libtorch)", "target/bench-quick")
    } else {
        (NEW, vec![1usize, 2], "llama.cpp", "target/bench")
    };
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let out_dir = root.join(out);
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let ids_path = out_dir.join("infer-prompt.json");
    write_prompt(&ids_path)?;
    let gguf = Assets::locate().smollm2_gguf().map_err(|e| e.to_string())?;
    // The exports, as a device would have them (no LoRA inputs: the base model), in both
    // precisions.
    let exports = [
        (Precision::Int8, out_dir.join("onnx-smollm2-int8")),
        (Precision::Exact, out_dir.join("onnx-smollm2")),
    ];
    {
        let env =
            fedshield_edge::inference::environment(&Assets::locate()).map_err(|e| e.to_string())?;
        let g = Gguf::open(&gguf).map_err(|e| e.to_string())?;
        let model = Llama::from_gguf(&g, tch::Device::Cpu).map_err(|e| e.to_string())?;
        for (precision, dir) in &exports {
            let options = DecodeOptions {
                max_positions: PROMPT + new,
                lora: Vec::new(),
                precision: *precision,
                ops: fedshield_edge::onnx_graph::Ops::Ort,
                float: fedshield_edge::onnx_graph::Float::F32,
            };
            OnnxDecoder::export(env, &model, &options, None, ("SmolLM2".into(), 0), dir)
                .map_err(|e| e.to_string())?;
        }
    }
    let python = root.join(".deps/venv/bin/python");
    let script = manifest.join("bench/llama_cpp_infer.py");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut runs = Vec::new();
    for threads in thread_counts {
        let t = threads.to_string();
        let ids = ids_path.to_string_lossy().into_owned();
        let sides = exports
            .iter()
            .map(|(_, dir)| ("ort", dir.as_path()))
            .chain([("torch", out_dir.as_path())]);
        for (side, dir) in sides {
            eprintln!("[bench] {side} {}, {threads} thread(s) ...", dir.display());
            let out = Command::new(&me)
                .args(["--side", side, "--threads", &t, "--ids", &ids])
                .args(["--new", &new.to_string()])
                .args(["--onnx", &dir.to_string_lossy()])
                .env("OMP_NUM_THREADS", &t)
                .output()
                .map_err(|e| e.to_string())?;
            runs.push(last_json_line(&out, side)?);
        }
        if quick {
            continue;
        }
        eprintln!("[bench] llama.cpp, {threads} thread(s) ...");
        let out = Command::new(&python)
            .arg(&script)
            .args([
                "--gguf",
                &gguf.to_string_lossy(),
                "--ids",
                &ids,
                "--threads",
                &t,
            ])
            .args(["--new", &new.to_string()])
            .env("OMP_NUM_THREADS", &t)
            .output()
            .map_err(|e| format!("{python:?}: {e} (run scripts/bench-infer.sh)"))?;
        runs.push(last_json_line(&out, "llama.cpp")?);
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut ratios = Vec::new();
    println!(
        "{:<22} {:>7} {:>12} {:>11} {:>14} {:>13}   vs {baseline}: decode, prefill",
        "engine", "threads", "decode tok/s", "prefill ms", "first token ms", "peak RSS MiB"
    );
    for run in &runs {
        let threads = run["threads"].as_u64().unwrap_or(0);
        let base = runs
            .iter()
            .find(|r| r["engine"] == baseline && r["threads"].as_u64() == Some(threads))
            .ok_or("no baseline run")?;
        let decode = f(run, "decode_tokens_per_s") / f(base, "decode_tokens_per_s");
        let prefill = f(run, "prefill_ms") / f(base, "prefill_ms");
        println!(
            "{:<22} {:>7} {:>12.1} {:>11.1} {:>14.1} {:>13.0}   {:.2}x, {:.2}x",
            run["engine"].as_str().unwrap_or("?"),
            threads,
            f(run, "decode_tokens_per_s"),
            f(run, "prefill_ms"),
            f(run, "first_token_ms"),
            f(run, "peak_rss_mib"),
            decode,
            prefill
        );
        ratios.push(json!({
            "engine": run["engine"],
            "threads": threads,
            "baseline": baseline,
            "decode_vs_baseline": decode,
            "prefill_ms_vs_baseline": prefill,
        }));
    }
    // Do the engines agree on the tokens? (Greedy on the same weights: ours must match
    // each other exactly; llama.cpp's kernels round differently.)
    let tokens = |e: &str| {
        runs.iter()
            .find(|r| r["engine"] == e && r["threads"] == 1)
            .map(|r| r["tokens"].clone())
    };
    let agree = tokens(ORT_EXACT) == tokens("ours (libtorch)");
    println!("ours on ONNX Runtime (exact) and on libtorch decode the same {new} tokens: {agree}");
    // The int8 paths (ours and llama.cpp's) round differently from the exact one: how many
    // of their first greedy tokens are the exact path's.
    let common = |a: &str, b: &str| -> usize {
        match (tokens(a), tokens(b)) {
            (Some(Value::Array(x)), Some(Value::Array(y))) => {
                x.iter().zip(&y).take_while(|(p, q)| p == q).count()
            }
            _ => 0,
        }
    };
    let int8_common = common(ORT_INT8, ORT_EXACT);
    let llama_common = common("llama.cpp", ORT_EXACT);
    if quick {
        println!(
            "tokens before the first difference from the exact path: ours int8 {int8_common} (of {new})"
        );
    } else {
        println!(
            "tokens before the first difference from the exact path: ours int8 {int8_common}, llama.cpp {llama_common} (of {new})"
        );
    }
    let path = out_dir.join("infer.json");
    let doc = json!({
        "model": gguf.file_name().map(|n| n.to_string_lossy().into_owned()),
        "prompt_tokens": PROMPT,
        "new_tokens": new,
        "runs": runs,
        "ratios": ratios,
        "ours_ort_and_torch_agree": agree,
        "int8_tokens_as_exact": int8_common,
        "llama_cpp_tokens_as_exact": llama_common,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    if quick && !agree {
        return Err(
            "ours exact (ONNX Runtime) and ours on libtorch decoded different tokens".into(),
        );
    }
    Ok(())
}
