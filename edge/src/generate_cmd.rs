//! `fedshield-edge generate`: chat with the base model, optionally with an adapter, on
//! ONNX Runtime or libtorch; `fedshield-edge export-onnx`: the ONNX export it runs.

use crate::ModelArgs;
use fedshield_edge::llama::Sampling;
use fedshield_edge::lora::Lora;
use fedshield_edge::onnx_graph::{Float, Ops, Precision, Provider};
use fedshield_models::tokenizer::Message;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new: usize,
    /// Temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the model runs: `ort` (ONNX Runtime: the export in --onnx, or the graph built
    /// in memory from the GGUF), `torch` (libtorch), or `auto` (ort when --onnx is given,
    /// else torch).
    #[arg(long, default_value = "auto")]
    runtime: String,
    /// An export directory (`fedshield-edge export-onnx`).
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// Print the timings (first token, decode tokens/s) to stderr.
    #[arg(long)]
    timings: bool,
    /// With `--runtime ort` and no --onnx: how the graph built in memory computes (see
    /// `export-onnx --precision`).
    #[arg(long, value_enum, default_value = "int8")]
    precision: Precision,
    /// With --onnx: ONNX Runtime's execution provider: cpu, cuda (an f16 export) or
    /// tensorrt (a standard-ops export); an ONNX Runtime built without it is an error,
    /// never a silent run on the CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    provider: Provider,
}

#[derive(clap::Args)]
pub struct ExportOnnxArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory: model.onnx and model.json.
    #[arg(long)]
    out: PathBuf,
    /// A PEFT adapter directory to merge into the exported weights (its projections become
    /// f32 `W + s B A`, exact). The export then takes no LoRA inputs.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The projections that take LoRA inputs (the fleet's adapter targets), comma-separated;
    /// empty for none.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// The longest sequence (prompt and new tokens) the export decodes.
    #[arg(long, default_value_t = 2048)]
    max_positions: usize,
    /// How the quantized products compute: int8 (activations quantized per block of 32,
    /// integer dot products: llama.cpp's arithmetic and speed) or exact (f32 activations:
    /// the libtorch model's logits to about 1e-4).
    #[arg(long, value_enum, default_value = "int8")]
    precision: Precision,
    /// Which operators the graph uses: ort (ONNX Runtime's contrib ops `MatMulNBits` and
    /// `GroupQueryAttention`: the CPU and CUDA execution providers) or standard (standard
    /// ONNX ops only, for TensorRT: 4-bit weights as int4 DequantizeLinear + MatMul).
    #[arg(long, value_enum, default_value = "ort")]
    ops: Ops,
    /// The float type the graph computes in: f32 (the CPU) or f16 (ONNX Runtime's CUDA
    /// provider, whose GroupQueryAttention has no f32 kernel; TensorRT builds f16 engines
    /// from either).
    #[arg(long, value_enum, default_value = "f32")]
    float: Float,
}

/// `export-onnx`: the decoding graph of the GGUF to a directory.
pub fn export_onnx(args: ExportOnnxArgs) -> anyhow::Result<()> {
    use fedshield_edge::llama::Module;
    use fedshield_edge::onnx_graph::{DecodeOptions, OnnxDecoder};
    let (path, _g, _tok, model) = args.model.load()?;
    let merge = args
        .adapter
        .as_ref()
        .map(|dir| Lora::load_peft(dir, &model))
        .transpose()?;
    let lora = args
        .lora_targets
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| {
            Module::from_peft_name(t)
                .ok_or_else(|| anyhow::anyhow!("--lora-targets: unknown projection {t:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let lora = if merge.is_some() { Vec::new() } else { lora };
    let options = DecodeOptions {
        max_positions: args.max_positions,
        lora,
        precision: args.precision,
        ops: args.ops,
        float: args.float,
    };
    let env = fedshield_edge::inference::environment(&fedshield_models::Assets::locate())?;
    let source = (
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::fs::metadata(&path)?.len(),
    );
    let started = std::time::Instant::now();
    let file = OnnxDecoder::export(env, &model, &options, merge.as_ref(), source, &args.out)?;
    eprintln!(
        "exported {} ({:.1} MiB) in {:.1} s",
        file.display(),
        std::fs::metadata(&file)?.len() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    println!("{}", file.display());
    Ok(())
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    // An export needs only the tokenizer from the GGUF: libtorch's model is not loaded (an
    // adapter is read with the export's shapes).
    if args.onnx.is_some() && matches!(args.runtime.as_str(), "auto" | "ort" | "onnx") {
        let tok = args.model.tokenizer()?;
        return generate_ort(&args, &tok, None, None);
    }
    let (_, _g, tok, model) = args.model.load()?;
    let (ids, sampling) = prompt_and_sampling(&args, &tok)?;
    let runtime = match (args.runtime.as_str(), &args.onnx) {
        ("auto", Some(_)) => "ort",
        ("auto", None) => "torch",
        ("onnx", _) => "ort",
        (r, _) => r,
    };
    let lora = args
        .adapter
        .as_ref()
        .map(|dir| Lora::load_peft(dir, &model))
        .transpose()?;
    let started = std::time::Instant::now();
    let out = match runtime {
        "ort" => return generate_ort(&args, &tok, Some(&model), lora.as_ref()),
        "torch" => match &lora {
            Some(lora) => model.generate(lora, &ids, args.max_new, tok.eos_id, &sampling),
            None => model.generate(
                &fedshield_edge::llama::NoAdapter,
                &ids,
                args.max_new,
                tok.eos_id,
                &sampling,
            ),
        },
        other => anyhow::bail!("--runtime {other:?}: expected auto, ort or torch"),
    };
    println!("{}", tok.decode(&out)?);
    if args.timings {
        eprintln!(
            "torch: {} prompt tokens, {} new tokens in {:.2} s",
            ids.len(),
            out.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The chat prompt's token ids and the sampling settings of `args`.
fn prompt_and_sampling(
    args: &GenerateArgs,
    tok: &fedshield_models::tokenizer::Tokenizer,
) -> anyhow::Result<(Vec<u32>, Sampling)> {
    let prompt = tok.chat_prompt(
        &[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }],
        true,
    );
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    Ok((tok.encode(&prompt)?, sampling))
}

/// Generation on ONNX Runtime: the export in `--onnx`, or a graph built from `model`
/// (which must then be given), with `lora` swapped in; streams the text.
fn generate_ort(
    args: &GenerateArgs,
    tok: &fedshield_models::tokenizer::Tokenizer,
    model: Option<&fedshield_edge::llama::Llama>,
    lora: Option<&Lora>,
) -> anyhow::Result<()> {
    use fedshield_edge::onnx_graph::{DecodeOptions, OnnxDecoder};
    use std::io::Write;
    let started = std::time::Instant::now();
    let (ids, sampling) = prompt_and_sampling(args, tok)?;
    let env = fedshield_edge::inference::environment(&fedshield_models::Assets::locate())?;
    let threads = args.model.threads.max(1) as usize;
    let mut decoder = match (&args.onnx, model) {
        (Some(dir), _) => OnnxDecoder::open_on(env, dir, threads, args.provider)?,
        (None, Some(_)) if args.provider != Provider::Cpu => anyhow::bail!(
            "--provider {:?} runs an export (--onnx DIR); the graph built in memory runs on the CPU",
            args.provider
        ),
        (None, Some(model)) => OnnxDecoder::new(
            env,
            model,
            &DecodeOptions {
                max_positions: ids.len() + args.max_new,
                lora: lora
                    .map(|l| l.config.target_modules.clone())
                    .unwrap_or_default(),
                precision: args.precision,
                ops: Ops::Ort,
                float: Float::F32,
            },
            None,
            threads,
        )?,
        (None, None) => anyhow::bail!("no export (--onnx) and no model to build a graph from"),
    };
    // Without a model the adapter is read with the export's LoRA input shapes.
    let read;
    let lora = match (lora, &args.adapter) {
        (Some(lora), _) => Some(lora),
        (None, Some(dir)) => {
            let meta = decoder.meta();
            let shapes: std::collections::HashMap<_, _> = meta
                .lora
                .iter()
                .map(|s| ((s.layer, s.module), (s.outputs as i64, s.inputs as i64)))
                .collect();
            read = Lora::load_peft_with(dir, tch::Device::Cpu, meta.layers, |layer, module| {
                shapes.get(&(layer, module)).copied()
            })?;
            Some(&read)
        }
        (None, None) => None,
    };
    let ready = started.elapsed().as_secs_f64();
    if let Some(lora) = lora {
        decoder.set_adapter(lora)?;
    }
    // Stream: print what each new token adds to the decoded text.
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let mut stdout = std::io::stdout();
    let (out, timings) =
        decoder.generate_streaming(&ids, args.max_new, tok.eos_id, &sampling, |t| {
            so_far.push(t);
            if let Ok(text) = tok.decode(&so_far)
                && let Some(new) = text.strip_prefix(shown.as_str())
            {
                let _ = write!(stdout, "{new}");
                let _ = stdout.flush();
                shown = text;
            }
        })?;
    let text = tok.decode(&out)?;
    println!("{}", text.strip_prefix(shown.as_str()).unwrap_or(""));
    if args.timings {
        eprintln!(
            "ort: session ready in {ready:.2} s; {} prompt tokens, first token after {:.1} ms, {} new tokens at {:.1} tokens/s",
            ids.len(),
            timings.first_token_s * 1e3,
            timings.new_tokens,
            timings.decode_tokens_per_s()
        );
    }
    Ok(())
}
