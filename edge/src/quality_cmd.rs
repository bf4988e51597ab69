//! `fedshield-edge quality`: the driver of the quality experiment (library: `quality.rs`).
//! Loads the model and the FAQ split, runs every configuration, writes `quality.json` and
//! `quality.svg` and prints a summary with the issue's targets.

use crate::{LoraArgs, ModelArgs};
use fedshield_codec::Structure;
use fedshield_codec::plot::{LinePlot, Series};
use fedshield_crypto::params::finest_scale;
use fedshield_edge::quality::{EncryptedRun, LocalTraining, QualityConfig, RunReport, Setup};
use fedshield_edge::sft;
use fedshield_models::Assets;
use fedshield_models::data::{read_instruction_jsonl, split_by_category};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct QualityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    /// A small version for CI: 2 rounds of 1 step, batch 2, 64 tokens, rank 4, 6 held-out
    /// examples (about a minute).
    #[arg(long)]
    quick: bool,
    /// Clients of the category split.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Federated rounds.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Optimizer steps per client per round.
    #[arg(long, default_value_t = 2)]
    local_steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Learning rate (constant). The best of 5e-4, 5e-3 and 1.5e-2 for dense FedAvg on
    /// SmolLM2 + FAQ (1.5e-2 diverges).
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// The encrypted runs, comma-separated: RHO (32-bit ciphertext bodies) or RHO@BITS
    /// (8, 16, 24 or 32-bit bodies), for example 0.5@8.
    #[arg(long, default_value = "1,0.5,0.25,0.1,0.5@8")]
    rhos: String,
    /// Mask structure: element or rank.
    #[arg(long, default_value = "element")]
    structure: String,
    /// Exploration share of each layer's quota.
    #[arg(long, default_value_t = 0.1)]
    explore: f64,
    /// Clip value of the fixed-point encoding.
    #[arg(long, default_value_t = 0.05)]
    clip: f32,
    /// What clients train in the pruned runs: full (every coordinate; what is not sent waits
    /// in the error-feedback residual, as in the fleet) or masked (an ablation: only the
    /// round's kept coordinates, at the learning rate times 1/rho).
    #[arg(long, default_value = "full")]
    local_training: String,
    /// Runs to do, comma-separated names (local-only, fedavg-dense-plain, fedavg-enc-rhoNN,
    /// fedavg-enc-rhoNN-bBB, centralised); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Maximum tokens per example.
    #[arg(long, default_value_t = 192)]
    max_len: usize,
    /// Held-out examples evaluated after every round (0: all).
    #[arg(long, default_value_t = 24)]
    eval_examples: usize,
    /// Seed of the split, the adapter, the data order and the masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder of quality.json and quality.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

pub fn quality(mut args: QualityArgs) -> anyhow::Result<()> {
    if args.quick {
        (args.rounds, args.local_steps, args.batch, args.max_len) = (2, 1, 2, 64);
        (args.lora.rank, args.lora.alpha, args.eval_examples) = (4, 8.0, 6);
    }
    let start = Instant::now();
    let (model_path, _g, tok, model) = args.model.load()?;
    let examples = read_instruction_jsonl(&Assets::locate().faq_with_categories()?)?;
    let split = split_by_category(&examples, args.clients, 0.1, args.seed)?;
    let clients = split
        .clients
        .iter()
        .map(|c| sft::tokenize_all(&tok, c, args.max_len))
        .collect::<Result<Vec<_>, _>>()?;
    let eval_n = match args.eval_examples {
        0 => split.eval.len(),
        n => n.min(split.eval.len()),
    };
    let eval_seqs = sft::tokenize_all(&tok, &split.eval[..eval_n], args.max_len)?;
    let structure = Structure::parse(&args.structure)?;
    let encrypted = args
        .rhos
        .split(',')
        .map(EncryptedRun::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--rhos: {e}"))?;
    if let Some(r) = encrypted
        .iter()
        .find(|r| finest_scale(r.body_bits, args.clients).is_none())
    {
        anyhow::bail!(
            "--rhos: {}-bit bodies cannot sum {} clients",
            r.body_bits,
            args.clients
        );
    }
    let setup = Setup {
        model: &model,
        lora: args.lora.config(false)?,
        clients,
        eval: sft::batches(&eval_seqs, 8, tok.eos_id, model.device),
    };
    let cfg = QualityConfig {
        rounds: args.rounds,
        local_steps: args.local_steps,
        batch_size: args.batch,
        lr: args.lr,
        encrypted,
        structure,
        explore: args.explore,
        clip: args.clip,
        local: LocalTraining::parse(&args.local_training).map_err(anyhow::Error::msg)?,
        only: args.only.clone(),
        seed: args.seed,
        pad: tok.eos_id,
    };
    eprintln!(
        "quality   : {} clients ({} train examples), {} rounds x {} steps of {}, {} held-out examples",
        setup.clients.len(),
        setup.clients.iter().map(Vec::len).sum::<usize>(),
        cfg.rounds,
        cfg.local_steps,
        cfg.batch_size,
        eval_n
    );
    let initial = setup.initial_loss(&cfg);
    eprintln!("quality   : initial held-out loss {initial:.4}");
    let runs = setup.run_all(&cfg, |line| eprintln!("{line}"));
    std::fs::create_dir_all(&args.out)?;
    let json_path = args.out.join("quality.json");
    let svg_path = args.out.join("quality.svg");
    let summary = summary(initial, &runs);
    let report = serde_json::json!({
        "model": model_path.display().to_string(),
        "quick": args.quick,
        "clients": setup.clients.len(),
        "eval_examples": eval_n,
        "lora": { "r": args.lora.rank, "alpha": args.lora.alpha, "targets": args.lora.targets },
        "config": cfg,
        "initial_eval_loss": initial,
        "runs": runs,
        "summary": summary,
        "seconds": start.elapsed().as_secs_f64(),
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let plot = LinePlot {
        title: format!(
            "SmolLM2-135M on the FAQ: {} clients, {} steps of {} per round",
            setup.clients.len(),
            cfg.local_steps,
            cfg.batch_size
        ),
        x_label: "round".into(),
        y_label: "held-out loss".into(),
        series: runs
            .iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: std::iter::once((0.0, initial))
                    .chain(
                        r.eval_loss_per_round
                            .iter()
                            .enumerate()
                            .map(|(i, &l)| ((i + 1) as f64, l)),
                    )
                    .collect(),
            })
            .collect(),
    };
    std::fs::write(&svg_path, plot.to_svg())?;
    eprintln!(
        "\n{:<28} {:>10} {:>12} {:>14} {:>14} {:>9}",
        "run", "final loss", "B/param/rnd", "B/client/rnd", "down B/client", "seconds"
    );
    for r in &runs {
        eprintln!(
            "{:<28} {:>10.4} {:>12.3} {:>14.0} {:>14.0} {:>9.1}",
            r.name,
            r.eval_loss_per_round.last().copied().unwrap_or(f64::NAN),
            r.upload_bytes_per_param_per_round,
            r.upload_bytes_per_client_per_round,
            r.download_bytes_per_client_per_round,
            r.seconds
        );
    }
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("quality   : done in {:.0} s", start.elapsed().as_secs_f64());
    println!("{}", json_path.display());
    println!("{}", svg_path.display());
    Ok(())
}

/// The issue's target figures: each encrypted run's final loss relative to dense plaintext
/// FedAvg and its bytes per parameter; and, since a pruned run lags rather than diverges,
/// where dense FedAvg reached the same loss (`dense_round_equivalent`, interpolated) and the
/// bytes per parameter each needed to get there.
fn summary(initial: f64, runs: &[RunReport]) -> serde_json::Value {
    let last = |r: &RunReport| r.eval_loss_per_round.last().copied().unwrap_or(f64::NAN);
    let dense_run = runs.iter().find(|r| r.name == "fedavg-dense-plain");
    let dense = dense_run.map(last).unwrap_or(f64::NAN);
    let rows: Vec<_> = runs
        .iter()
        .filter(|r| r.encrypted)
        .map(|r| {
            let rounds = r.eval_loss_per_round.len() as f64;
            let equivalent = dense_run
                .and_then(|d| dense_round_equivalent(initial, &d.eval_loss_per_round, last(r)));
            let dense_bytes = dense_run
                .zip(equivalent)
                .map(|(d, e)| e * d.upload_bytes_per_param_per_round);
            serde_json::json!({
                "name": r.name,
                "rho": r.rho,
                "body_bits": r.body_bits,
                "final_eval_loss": last(r),
                "relative_to_dense_plain": last(r) / dense - 1.0,
                "upload_bytes_per_param_per_round": r.upload_bytes_per_param_per_round,
                "upload_bytes_per_param_total": rounds * r.upload_bytes_per_param_per_round,
                "dense_round_equivalent": equivalent,
                "dense_upload_bytes_per_param_for_same_loss": dense_bytes,
                "crypto_share_of_run": r.crypto_seconds / r.seconds,
            })
        })
        .collect();
    serde_json::json!({ "dense_plain_final_eval_loss": dense, "encrypted": rows })
}

/// The (fractional) round at which a loss curve first reaches `loss`: the curve starts at
/// `initial` (round 0) and is linear between rounds. `None` when it never gets that low.
fn dense_round_equivalent(initial: f64, curve: &[f64], loss: f64) -> Option<f64> {
    if !loss.is_finite() {
        return None;
    }
    if initial <= loss {
        return Some(0.0);
    }
    let mut prev = initial;
    for (i, &l) in curve.iter().enumerate() {
        if l <= loss {
            return Some(i as f64 + (prev - loss) / (prev - l));
        }
        prev = l;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::dense_round_equivalent;

    #[test]
    fn round_equivalent_interpolates_the_first_crossing() {
        let curve = [3.0, 2.0, 2.5, 1.0];
        assert_eq!(dense_round_equivalent(4.0, &curve, 4.5), Some(0.0));
        assert_eq!(dense_round_equivalent(4.0, &curve, 3.0), Some(1.0));
        assert_eq!(dense_round_equivalent(4.0, &curve, 3.5), Some(0.5));
        // 2.25 is first reached between rounds 1 (3.0) and 2 (2.0), not after the bump.
        assert_eq!(dense_round_equivalent(4.0, &curve, 2.25), Some(1.75));
        assert_eq!(dense_round_equivalent(4.0, &curve, 0.5), None);
        assert_eq!(dense_round_equivalent(4.0, &curve, f64::NAN), None);
    }
}
