//! `fedshield-host`: the host aggregator's single binary.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedshield_codec::{PruneConfig, Schedule, Structure};
use fedshield_host::broker::{DEFAULT_MAX_PACKET_BYTES, EmbeddedBroker};
use fedshield_host::fleet::FleetDir;
use fedshield_host::serve::{ServeConfig, serve};
use fedshield_models::Assets;
use fedshield_models::config::LlamaConfig;
use fedshield_models::gguf::Gguf;
use fedshield_protocol::host::Deadlines;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "fedshield-host", version, about = "FedShield host aggregator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded MQTT broker alone (for a one-machine fleet or a test rig).
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: SocketAddr,
        /// Largest MQTT packet accepted, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_PACKET_BYTES)]
        max_packet_bytes: usize,
    },
    /// Enrol devices: writes the fleet authority (first time), the registry and one key
    /// file per device (devices/{id}.json, to install on the device).
    Enrol {
        /// Fleet directory.
        #[arg(long, default_value = "fleet")]
        fleet_dir: PathBuf,
        /// Device ids, comma-separated.
        #[arg(long)]
        devices: String,
    },
    /// Run the federation: rounds of secure aggregation over MQTT.
    Serve(Box<ServeArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Fleet name (one MQTT topic level).
    #[arg(long, default_value = "demo")]
    fleet: String,
    /// Fleet directory (see `enrol`).
    #[arg(long, default_value = "fleet")]
    fleet_dir: PathBuf,
    /// MQTT broker, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Start the embedded broker on --broker's address first (one-machine runs).
    #[arg(long)]
    embedded_broker: bool,
    /// Broker username (the password comes from FEDSHIELD_MQTT_PASSWORD).
    #[arg(long)]
    username: Option<String>,
    /// Largest MQTT packet, bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_PACKET_BYTES)]
    max_packet_bytes: usize,
    /// GGUF base model (its shapes give the adapter layout; default: the fetched SmolLM2).
    #[arg(long)]
    model: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Target modules, PEFT names, comma-separated.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    targets: String,
    /// Rounds in all (a restarted host goes on to this number).
    #[arg(long, default_value_t = 3)]
    rounds: u64,
    /// Keep schedule: RHO, uniform:RHO or ramp:FIRST:LAST.
    #[arg(long, default_value = "0.1")]
    rho: String,
    /// Mask structure: element or rank.
    #[arg(long, default_value = "element")]
    structure: String,
    /// Exploration share of the mask.
    #[arg(long, default_value_t = 0.1)]
    explore: f64,
    /// Clip value of the fixed-point encoding.
    #[arg(long, default_value_t = 0.05)]
    clip: f32,
    /// Local optimizer steps per round.
    #[arg(long, default_value_t = 3)]
    local_steps: usize,
    /// Minimum contributors per round.
    #[arg(long, default_value_t = 2)]
    threshold: usize,
    /// Seconds the round stays open for joining (it closes earlier once every enrolled
    /// device has joined).
    #[arg(long, default_value_t = 300)]
    join_seconds: u64,
    /// Seconds for local training and upload.
    #[arg(long, default_value_t = 900)]
    upload_seconds: u64,
    /// Seconds for each of the share exchange, consistency and unmasking phases.
    #[arg(long, default_value_t = 60)]
    phase_seconds: u64,
    /// Upload chunk size, bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    chunk_bytes: usize,
    /// Seed of the initial adapter and the masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: adapter/, metrics.json, loss.svg, state.bin.
    #[arg(long, default_value = "runs/fleet")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=off".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Broker {
            listen,
            max_packet_bytes,
        } => {
            let broker = EmbeddedBroker::start(listen, max_packet_bytes)?;
            println!(
                "embedded MQTT broker listening on {}; Ctrl-C stops it",
                broker.addr()
            );
            loop {
                std::thread::park();
            }
        }
        Command::Enrol { fleet_dir, devices } => {
            let fleet = FleetDir(fleet_dir);
            for d in devices.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                println!("{}", fleet.enrol(d)?.display());
            }
            Ok(())
        }
        Command::Serve(args) => run_serve(*args),
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let model = match args.model {
        Some(p) => p,
        None => Assets::locate().smollm2_gguf()?,
    };
    let g = Gguf::open(&model).with_context(|| format!("reading {}", model.display()))?;
    let llama = LlamaConfig::from_gguf(&g)?;
    let targets: Vec<&str> = args.targets.split(',').map(str::trim).collect();
    let layout = llama.lora_layout(args.rank, &targets, true)?;
    let structure = Structure::parse(&args.structure)?;
    let prune = PruneConfig {
        schedule: Schedule::parse(&args.rho)?,
        structure,
        explore: args.explore,
    };
    prune.validate()?;
    let (host, port) = fedshield_transport::parse_broker(&args.broker)?;
    let _broker = if args.embedded_broker {
        let addr: SocketAddr = args
            .broker
            .parse()
            .context("--embedded-broker needs an IP:port")?;
        let b = EmbeddedBroker::start(addr, args.max_packet_bytes)?;
        tracing::info!("embedded MQTT broker on {}", b.addr());
        Some(b)
    } else {
        None
    };
    let credentials = fedshield_transport::credentials(args.username.as_deref())?;
    let phase = args.phase_seconds * 1000;
    let (adapter, plot, metrics) = serve(ServeConfig {
        fleet: args.fleet,
        fleet_dir: FleetDir(args.fleet_dir),
        broker: (host, port),
        credentials,
        max_packet_bytes: args.max_packet_bytes,
        peft: (
            args.rank,
            args.alpha,
            targets.iter().map(|t| t.to_string()).collect(),
        ),
        base_model: model.display().to_string(),
        layout,
        rounds: args.rounds,
        prune,
        clip: args.clip,
        local_steps: args.local_steps,
        threshold: args.threshold,
        deadlines: Deadlines {
            join_ms: args.join_seconds * 1000,
            shares_ms: phase,
            upload_ms: args.upload_seconds * 1000,
            finish_ms: phase,
        },
        chunk_bytes: args.chunk_bytes,
        seed: args.seed,
        out: args.out,
        report_wait: Duration::from_secs(600),
    })?;
    println!("adapter   : {}", adapter.display());
    println!("plot      : {}", plot.display());
    println!("metrics   : {}", metrics.display());
    Ok(())
}
