//! `fedshield-edge`: the edge box's single binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedshield_edge::compute::ComputeTarget;
use fedshield_edge::inference::OnnxModel;
use fedshield_edge::llama::{Llama, Module, Sampling};
use fedshield_edge::lora::{Lora, LoraConfig};
use fedshield_edge::serial_link::SerialLink;
use fedshield_edge::sft::{self, LocalRun};
use fedshield_edge::train::{TrainConfig, Trainer, evaluate};
use fedshield_models::data::{read_instruction_jsonl, read_plain_text, split_by_category};
use fedshield_models::gguf::Gguf;
use fedshield_models::tokenizer::{Message, Tokenizer};
use fedshield_models::{Assets, fixtures};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "fedshield-edge",
    version,
    about = "FedShield edge trainer and fleet client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this box can train and infer: libtorch, the compute device, ONNX Runtime
    /// and the fetched model files.
    Doctor,
    /// Ping an attached board or test rig over a serial port.
    RigPing {
        /// Serial device, for example /dev/ttyTHS0.
        #[arg(long)]
        port: String,
        /// Baud rate.
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        /// Pings to send.
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// Seconds to wait for each answer.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
    /// Fine-tune a LoRA adapter locally (no federation) and save it in PEFT format.
    Train(TrainArgs),
    /// Chat with the base model, optionally with an adapter.
    Generate(GenerateArgs),
    /// The update codec's quality experiment: local-only, dense FedAvg, encrypted pruned
    /// FedAvg at several rho, centralised; writes quality.json and quality.svg.
    Quality(quality_cmd::QualityArgs),
    /// Join a fleet: train, encrypt and upload every round, apply the global adapter.
    Run(Box<run_cmd::RunArgs>),
}

mod quality_cmd;
mod run_cmd;

#[derive(clap::Args)]
struct ModelArgs {
    /// GGUF base model (default: the fetched SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    model: Option<PathBuf>,
    /// libtorch CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<(PathBuf, Gguf, Tokenizer, Llama)> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => Assets::locate().smollm2_gguf()?,
        };
        tch::set_num_threads(self.threads);
        let target = ComputeTarget::detect();
        let g = Gguf::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let tok = Tokenizer::from_gguf(&g)?;
        let model = Llama::from_gguf(&g, target.device)?.with_compute_kind(target.compute_kind);
        eprintln!(
            "model     : {} ({} layers, base {:.1} MiB packed) on {}",
            path.display(),
            model.config.num_hidden_layers,
            model.weight_bytes() as f64 / (1 << 20) as f64,
            target.describe()
        );
        Ok((path, g, tok, model))
    }
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    /// Instruction JSONL (alpaca instruction/input/output, or FAQ q/a/category); default: the
    /// fetched FAQ with categories.
    #[arg(long, conflicts_with = "text")]
    data: Option<PathBuf>,
    /// Plain-text documents instead (separated by blank lines or lines holding only `%`),
    /// with the loss on every token; --eval-fraction of the documents (spread through the
    /// file) are held out.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Train on client K's share of the category split (with --clients).
    #[arg(long)]
    client: Option<usize>,
    /// Number of clients of the category split.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Fraction of every category held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    eval_fraction: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// FFA-LoRA: freeze A, train B only.
    #[arg(long)]
    freeze_a: bool,
    /// Maximum tokens per example.
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
    /// Keep the whole autograd graph instead of recomputing layer by layer (faster, holds
    /// every dequantized weight until the backward pass).
    #[arg(long)]
    no_checkpointing: bool,
    /// Seed (adapter initialisation, shuffling, dropout).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory of the PEFT adapter.
    #[arg(long, default_value = "runs/adapter")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct GenerateArgs {
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
}

/// LoRA hyper-parameters shared by `train`, `quality` and `run` (a fleet's devices and host
/// must agree on rank and targets).
#[derive(clap::Args)]
struct LoraArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: i64,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// Target modules, PEFT names, comma-separated.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: String,
}

impl LoraArgs {
    fn config(&self, freeze_a: bool) -> anyhow::Result<LoraConfig> {
        Ok(LoraConfig {
            r: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: parse_targets(&self.targets)?,
            freeze_a,
        })
    }
}

/// Comma-separated PEFT module names.
fn parse_targets(list: &str) -> anyhow::Result<Vec<Module>> {
    list.split(',')
        .map(|t| {
            Module::from_peft_name(t.trim()).with_context(|| {
                format!("unknown target module {t:?} (PEFT names: q_proj .. down_proj)")
            })
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Doctor => doctor(),
        Command::Train(args) => train(args),
        Command::Quality(args) => quality_cmd::quality(args),
        Command::Run(args) => run_cmd::run(*args),
        Command::Generate(args) => generate(args),
        Command::RigPing {
            port,
            baud,
            count,
            timeout,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut link = SerialLink::open(&port, baud)?;
                for seq in 0..count {
                    let rtt = link.ping(seq, Duration::from_secs_f64(timeout)).await?;
                    println!(
                        "pong {seq} from {port} in {:.2} ms",
                        rtt.as_secs_f64() * 1e3
                    );
                }
                Ok(())
            })
        }
    }
}

fn doctor() -> anyhow::Result<()> {
    let assets = Assets::locate();
    let target = ComputeTarget::detect();
    println!("compute   : {}", target.describe());

    // A real forward and backward pass on the chosen device.
    let x = tch::Tensor::randn([4, 8], (tch::Kind::Float, target.device));
    let w = tch::Tensor::randn([8, 2], (tch::Kind::Float, target.device)).set_requires_grad(true);
    let loss = x.matmul(&w).pow_tensor_scalar(2).mean(tch::Kind::Float);
    loss.backward();
    let g = w.grad().abs().sum(tch::Kind::Float).double_value(&[]);
    println!(
        "libtorch  : forward/backward ok (loss {:.4}, |grad| {:.4})",
        loss.double_value(&[]),
        g
    );

    let mut mlp = OnnxModel::load(&assets, &fixtures::tiny_mlp_onnx())?;
    let (shape, y) = mlp.run(&[1, 4], vec![1.0, 2.0, 3.0, 4.0])?;
    println!(
        "onnxrt    : {} -> shape {shape:?}, y {y:?}",
        assets.onnxruntime_dylib()?.display()
    );

    let gguf = assets.smollm2_gguf().context("model")?;
    let size = std::fs::metadata(&gguf)?.len();
    println!(
        "model     : {} ({:.1} MiB)",
        gguf.display(),
        size as f64 / (1 << 20) as f64
    );
    println!("data      : {}", assets.faq_alpaca()?.display());
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let (model_path, _g, tok, model) = args.model.load()?;
    let (data_path, train_seqs, eval_seqs) = match &args.text {
        Some(path) => {
            let (train_docs, eval_docs) = hold_out(read_plain_text(path)?, args.eval_fraction)?;
            (
                path.clone(),
                sft::text_sequences(&tok, &train_docs, args.max_len)?,
                sft::text_sequences(&tok, &eval_docs, args.max_len)?,
            )
        }
        None => {
            let data_path = match &args.data {
                Some(p) => p.clone(),
                None => Assets::locate().faq_with_categories()?,
            };
            let examples = read_instruction_jsonl(&data_path)?;
            let split = split_by_category(&examples, args.clients, args.eval_fraction, args.seed)?;
            let train_examples = match args.client {
                Some(k) if k < args.clients => split.clients[k].clone(),
                Some(k) => anyhow::bail!("--client {k} is not below --clients {}", args.clients),
                None => split.clients.concat(),
            };
            (
                data_path,
                sft::tokenize_all(&tok, &train_examples, args.max_len)?,
                sft::tokenize_all(&tok, &split.eval, args.max_len)?,
            )
        }
    };
    anyhow::ensure!(
        !train_seqs.is_empty(),
        "{}: no training sequences",
        data_path.display()
    );
    let pad = tok.eos_id;
    let eval = sft::batches(&eval_seqs, 8, pad, model.device);
    let lora = Lora::new(&model, args.lora.config(args.freeze_a)?, args.seed as i64);
    let mut trainer = Trainer::new(
        &lora,
        TrainConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            warmup_steps: args.warmup,
            total_steps: args.steps,
            max_grad_norm: args.max_grad_norm,
            checkpointing: !args.no_checkpointing,
            seed: args.seed as i64,
        },
    )?;
    eprintln!(
        "data      : {} ({} train examples{}, {} held out); LoRA r={} alpha={} on {}, {} trainable values",
        data_path.display(),
        train_seqs.len(),
        args.client
            .map(|k| format!(" of client {k}/{}", args.clients))
            .unwrap_or_default(),
        eval_seqs.len(),
        args.lora.rank,
        args.lora.alpha,
        args.lora.targets,
        lora.trainable_len()
    );
    let before = evaluate(&model, Some(&lora), &eval);
    eprintln!(
        "eval      : held-out loss {before:.4} (perplexity {:.2}) before training",
        before.exp()
    );
    // A bar on a terminal; plain lines (every 10 steps) in logs.
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if interactive {
        indicatif::ProgressBar::new(args.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    let run = LocalRun {
        steps: args.steps,
        batch_size: args.batch,
        grad_accum: args.accum,
        eval_every: args.eval_every,
        seed: args.seed,
        pad,
    };
    let after = sft::train_local(&model, &lora, &mut trainer, &train_seqs, &eval, &run, |p| {
        bar.set_position(p.step as u64);
        bar.set_message(format!(
            "loss {:.4} lr {:.1e} {:.0} tok/s",
            p.stats.loss, p.stats.lr, p.tokens_per_s
        ));
        if !interactive && (p.step % 10 == 0 || p.step == 1) {
            eprintln!(
                "step {:>5}/{}: loss {:.4} lr {:.1e} {:.0} tok/s",
                p.step, args.steps, p.stats.loss, p.stats.lr, p.tokens_per_s
            );
        }
        if let Some(e) = p.eval_loss {
            let line = format!("step {:>5}: held-out loss {e:.4}", p.step);
            if interactive {
                bar.println(line)
            } else {
                eprintln!("{line}")
            }
        }
    });
    bar.finish();
    eprintln!(
        "eval      : held-out loss {before:.4} -> {after:.4} (perplexity {:.2} -> {:.2})",
        before.exp(),
        after.exp()
    );
    lora.save_peft(&args.out, &model_path.display().to_string())?;
    println!("{}", args.out.join("adapter_model.safetensors").display());
    Ok(())
}

/// Splits documents into training and held-out ones: every k-th document is held out, with k
/// chosen so that about `fraction` of them are (at least one when there are two or more).
fn hold_out(docs: Vec<String>, fraction: f64) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    anyhow::ensure!(
        (0.0..1.0).contains(&fraction),
        "--eval-fraction must be in [0, 1), got {fraction}"
    );
    if fraction == 0.0 || docs.len() < 2 {
        return Ok((docs, Vec::new()));
    }
    let every = ((1.0 / fraction).round() as usize).clamp(2, docs.len());
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if i % every == every - 1 {
            eval.push(d);
        } else {
            train.push(d);
        }
    }
    Ok((train, eval))
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (_, _g, tok, model) = args.model.load()?;
    let prompt = tok.chat_prompt(
        &[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }],
        true,
    );
    let ids = tok.encode(&prompt)?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let out = match &args.adapter {
        Some(dir) => {
            let lora = Lora::load_peft(dir, &model)?;
            model.generate(&lora, &ids, args.max_new, tok.eos_id, &sampling)
        }
        None => model.generate(
            &fedshield_edge::llama::NoAdapter,
            &ids,
            args.max_new,
            tok.eos_id,
            &sampling,
        ),
    };
    println!("{}", tok.decode(&out)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::hold_out;

    #[test]
    fn hold_out_spreads_the_held_out_documents() {
        let docs: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let (train, eval) = hold_out(docs.clone(), 0.2).unwrap();
        assert_eq!(eval, ["4", "9"]);
        assert_eq!(train.len(), 8);
        let (train, eval) = hold_out(docs.clone(), 0.0).unwrap();
        assert_eq!((train.len(), eval.len()), (10, 0));
        // Tiny fractions still hold one out; a single document holds none.
        let (_, eval) = hold_out(docs.clone(), 0.01).unwrap();
        assert_eq!(eval, ["9"]);
        let (train, eval) = hold_out(vec!["only".into()], 0.5).unwrap();
        assert_eq!((train.len(), eval.len()), (1, 0));
        assert!(hold_out(docs, 1.0).is_err());
    }
}
