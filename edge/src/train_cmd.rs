//! `fedshield-edge train`: fine-tunes a LoRA adapter locally (no federation) and saves it in
//! PEFT format.

use crate::{LoraArgs, ModelArgs, PacingArgs, PlanArgs};
use fedshield_edge::lora::Lora;
use fedshield_edge::sft::{self, LocalRun};
use fedshield_edge::train::{TrainConfig, Trainer, evaluate};
use fedshield_models::Assets;
use fedshield_models::data::{read_instruction_jsonl, read_plain_text, split_by_category};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    pacing: PacingArgs,
    #[command(flatten)]
    plan: PlanArgs,
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
    /// Sequences per optimizer step (the plan splits them into micro-batches).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Multiplies --batch: sequences per step = batch x accum.
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
    /// Seed (adapter initialisation, shuffling, dropout).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory of the PEFT adapter.
    #[arg(long, default_value = "runs/adapter")]
    out: PathBuf,
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let (model_path, _g, tok, mut model) = args.model.load()?;
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
    anyhow::ensure!(
        args.batch >= 1 && args.accum >= 1,
        "--batch and --accum must be at least 1"
    );
    let per_step = args.batch * args.accum;
    let planned = args.plan.apply(
        &mut model,
        &lora,
        &train_seqs,
        pad,
        per_step,
        &args.pacing.telemetry_root,
    )?;
    for line in planned.lines() {
        eprintln!("plan      : {line}");
    }
    let plan = planned.choice.plan;
    let mut trainer = Trainer::new(
        &lora,
        TrainConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            warmup_steps: args.warmup,
            total_steps: args.steps,
            max_grad_norm: args.max_grad_norm,
            checkpointing: plan.checkpointing,
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
        batch_size: plan.micro_batch,
        grad_accum: per_step.div_ceil(plan.micro_batch),
        eval_every: args.eval_every,
        seed: args.seed,
        pad,
    };
    let mut pacer = args.pacing.pacer()?;
    let after = sft::train_local(
        &model,
        &lora,
        &mut trainer,
        sft::Data {
            train: &train_seqs,
            eval: &eval,
        },
        &run,
        &mut pacer,
        |p| {
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
        },
    );
    pacer.end_run();
    bar.finish();
    eprintln!("pacing    : {}", pacing_line(&pacer.report()));
    eprintln!(
        "eval      : held-out loss {before:.4} -> {after:.4} (perplexity {:.2} -> {:.2})",
        before.exp(),
        after.exp()
    );
    lora.save_peft(&args.out, &model_path.display().to_string())?;
    // What the run did, for scripts and tests (the log lines are for people).
    let report = serde_json::json!({
        "eval_loss_before": before,
        "eval_loss_after": after,
        "steps": args.steps,
        "pacing": pacer.report(),
        "plan": planned,
    });
    fedshield_store::write_atomic(
        &args.out.join("train_report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
        fedshield_store::Access::Public,
    )?;
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

/// One line on what pacing did to a run.
pub fn pacing_line(r: &fedshield_edge::pacing::PaceReport) -> String {
    let energy = r
        .joules
        .map(|j| format!(", {j:.1} J from the rails"))
        .unwrap_or_default();
    format!(
        "{} steps, {} slowed ({:.1} s of sleep), {:.1} s paused{}{energy}",
        r.steps,
        r.slowed_steps,
        r.slept_s,
        r.paused_s,
        if r.stops > 0 {
            ", stopped by a long pause"
        } else {
            ""
        }
    )
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
