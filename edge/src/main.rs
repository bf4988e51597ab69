//! `fedshield-edge`: the edge box's single binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedshield_edge::compute::ComputeTarget;
use fedshield_edge::llama::{Llama, Module};
use fedshield_edge::lora::LoraConfig;
use fedshield_models::Assets;
use fedshield_models::gguf::Gguf;
use fedshield_models::tokenizer::Tokenizer;
use std::path::PathBuf;

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
    /// Check that this box can train and infer: its telemetry (memory, temperatures, power,
    /// GPU, power mode), libtorch, the compute device, ONNX Runtime and the fetched model
    /// files.
    Doctor {
        /// Root under which proc/ and sys/ are read.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Stream the box's telemetry as JSON lines.
    Telemetry(telemetry_cmd::TelemetryArgs),
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
    Train(train_cmd::TrainArgs),
    /// Chat with the base model, optionally with an adapter.
    Generate(generate_cmd::GenerateArgs),
    /// Write the base model's decoding graph for ONNX Runtime (4-bit projections kept
    /// 4-bit, a KV cache, LoRA as inputs) to a directory, for `generate --onnx DIR`.
    ExportOnnx(generate_cmd::ExportOnnxArgs),
    /// The update codec's quality experiment: local-only, dense FedAvg, encrypted pruned
    /// FedAvg at several rho, centralised; writes quality.json and quality.svg.
    Quality(quality_cmd::QualityArgs),
    /// Create this device's identity here (identity.key, owner-only; never replaced) and
    /// its enrolment request for the fleet authority.
    Keygen(keys_cmd::KeygenArgs),
    /// Check the authority's answer (this device's certificate, the host's certificate,
    /// the authority's public key) against this device's identity and write the key file
    /// for `run --key`.
    InstallCert(keys_cmd::InstallCertArgs),
    /// Join a fleet: train, encrypt and upload every round, apply the global adapter.
    /// Settings come from the flags and from an optional TOML file (--config; keys are the
    /// flags' long names, with - or _), flags winning.
    #[command(args_override_self = true)]
    Run(Box<run_cmd::RunArgs>),
}

mod doctor_cmd;
mod generate_cmd;
mod keys_cmd;
mod quality_cmd;
mod run_cmd;
mod telemetry_cmd;
mod train_cmd;

#[derive(clap::Args)]
struct ModelArgs {
    /// GGUF base model (default: the fetched SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    model: Option<PathBuf>,
    /// libtorch CPU threads.
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
}

impl ModelArgs {
    /// The GGUF file.
    fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.model {
            Some(p) => p.clone(),
            None => Assets::locate().smollm2_gguf()?,
        })
    }

    /// Only the tokenizer (from the GGUF's metadata; no weights, no libtorch).
    fn tokenizer(&self) -> anyhow::Result<Tokenizer> {
        let path = self.path()?;
        let g = Gguf::open(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Tokenizer::from_gguf(&g)?)
    }

    fn load(&self) -> anyhow::Result<(PathBuf, Gguf, Tokenizer, Llama)> {
        let path = self.path()?;
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

/// How the box's sensors pace training, shared by `train` and `run`.
#[derive(clap::Args)]
struct PacingArgs {
    /// Root under which the sensors are read (proc/, sys/; a fixture tree in tests).
    #[arg(long, default_value = "/")]
    telemetry_root: PathBuf,
    /// Keep the module's power (the rails' total) under this many watts.
    #[arg(long)]
    power_cap_watts: Option<f64>,
    /// A thermal pause longer than this many seconds ends local training (the steps done
    /// are kept).
    #[arg(long, default_value_t = 600.0)]
    max_pause_seconds: f64,
    /// Train at full speed whatever the sensors say.
    #[arg(long)]
    no_pacing: bool,
}

impl PacingArgs {
    fn pacer(&self) -> anyhow::Result<fedshield_edge::pacing::Pacer> {
        use fedshield_edge::pacing::{Pacer, Time};
        use fedshield_telemetry::governor::GovernorConfig;
        if self.no_pacing {
            return Ok(Pacer::off());
        }
        let config = GovernorConfig {
            power_cap: self.power_cap_watts.map(fedshield_telemetry::Watts),
            ..GovernorConfig::default()
        };
        anyhow::ensure!(
            self.max_pause_seconds >= 0.0,
            "--max-pause-seconds must not be negative"
        );
        let mut pacer = Pacer::new(&self.telemetry_root, config, Time::real())
            .map_err(|e| anyhow::anyhow!("pacing: {e}"))?;
        pacer.max_pause_s = self.max_pause_seconds;
        Ok(pacer)
    }
}

/// How a training step is run (the memory planner), shared by `train` and `run`.
#[derive(clap::Args)]
struct PlanArgs {
    /// Training plan: `auto` (the fastest that fits the memory budget), or a name such as
    /// `ckpt-packed-mb4`, `ckpt-res15+head-mb2` or `full-dense-mb4` (recomputation or not,
    /// dequantized weights kept, sequences per micro-batch; see ARCHITECTURE.md).
    #[arg(long, default_value = "auto")]
    plan: String,
    /// Memory budget of the whole process, MiB (default: MemAvailable less 512 MiB, plus
    /// what the process already holds).
    #[arg(long)]
    memory_budget: Option<f64>,
    /// Skip the probe step that checks the chosen plan before training.
    #[arg(long)]
    no_probe: bool,
}

impl PlanArgs {
    /// Plans training `lora` on `model` for `sequences`, `batch` per step.
    fn apply(
        &self,
        model: &mut fedshield_edge::llama::Llama,
        lora: &fedshield_edge::lora::Lora,
        sequences: &[fedshield_edge::sft::Sequence],
        pad: u32,
        batch: usize,
        telemetry_root: &std::path::Path,
    ) -> anyhow::Result<fedshield_edge::planner::Planned> {
        use fedshield_edge::planner::{PlanRequest, plan_training};
        if let Some(b) = self.memory_budget {
            anyhow::ensure!(b > 0.0, "--memory-budget must be positive (MiB)");
        }
        let request = PlanRequest {
            plan: (self.plan != "auto").then_some(self.plan.as_str()),
            budget: self
                .memory_budget
                .map(|mib| (mib * (1u64 << 20) as f64) as u64),
            telemetry_root,
            batch,
            probe: !self.no_probe,
        };
        Ok(plan_training(model, lora, sequences, pad, &request)?)
    }
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
    #[arg(long, default_value_t = fedshield_codec::DEFAULT_LORA_DROPOUT)]
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
        // Logs on stderr: stdout carries commands' results (`generate`'s text, paths).
        .with_writer(std::io::stderr)
        .init();
    let argv =
        match fedshield_store::settings::expand_config(std::env::args_os().collect(), &["run"]) {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };
    match Cli::parse_from(argv).command {
        Command::Doctor { root } => doctor_cmd::doctor(&root),
        Command::Telemetry(args) => telemetry_cmd::telemetry(args),
        Command::Train(args) => train_cmd::train(args),
        Command::Quality(args) => quality_cmd::quality(args),
        Command::Run(args) => run_cmd::run(*args),
        Command::Keygen(args) => keys_cmd::keygen(args),
        Command::InstallCert(args) => keys_cmd::install_cert(args),
        Command::Generate(args) => generate_cmd::generate(args),
        Command::ExportOnnx(args) => generate_cmd::export_onnx(args),
        Command::RigPing {
            port,
            baud,
            count,
            timeout,
        } => doctor_cmd::rig_ping(&port, baud, count, timeout),
    }
}
