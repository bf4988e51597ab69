//! `fedshield-host`: the host aggregator's single binary.

mod fold_worker;
mod records;
mod serve;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedshield_codec::{DownlinkFormat, PruneConfig, Schedule, Structure};
use fedshield_crypto::params::BodyBits;
use fedshield_crypto::secagg::{Adversary, GraphPolicy, ThreatModel};
use fedshield_host::broker::{DEFAULT_MAX_PACKET_BYTES, EmbeddedBroker};
use fedshield_host::fleet::{AuthorityDir, FleetDir};
use fedshield_models::Assets;
use fedshield_models::config::LlamaConfig;
use fedshield_models::gguf::Gguf;
use fedshield_protocol::fleet::host::FleetSettings;
use fedshield_protocol::host::Deadlines;
use serve::{ServeConfig, serve};
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
    /// ONE-MACHINE CONVENIENCE (the demo, the tests): plays the fleet authority from
    /// --authority-dir and generates each device's key here, writing its key file to
    /// devices/{id}.json; also the host's key and certificate on first use. A real fleet's
    /// devices make their keys themselves (`fedshield-edge keygen`) and an offline
    /// authority signs them (`fedshield-host authority`).
    Enrol {
        /// Fleet directory.
        #[arg(long, default_value = "fleet")]
        fleet_dir: PathBuf,
        /// The authority's directory (created on first use).
        #[arg(long)]
        authority_dir: PathBuf,
        /// Fleet name (one MQTT topic level): the host certificate is for this fleet only.
        #[arg(long, default_value = "demo")]
        fleet: String,
        /// Device ids, comma-separated.
        #[arg(long)]
        devices: String,
    },
    /// Create the host's key in the fleet directory (once) and write its enrolment request
    /// (host-request.json) for the authority to certify.
    Keygen {
        /// Fleet directory.
        #[arg(long, default_value = "fleet")]
        fleet_dir: PathBuf,
        /// Fleet name (one MQTT topic level).
        #[arg(long, default_value = "demo")]
        fleet: String,
        /// Replace the host's key with a new one (the old key is kept as
        /// host.key.retired-N, N its certificate's serial, and host.json moves aside to
        /// host.json.retired-N): have the authority certify the new request, install its
        /// host.json, restart the host; the devices follow at its next round state.
        #[arg(long)]
        rotate: bool,
    },
    /// The fleet authority, on an offline machine: creates its key, signs the devices' and
    /// the host's enrolment requests, revokes devices.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Write a mosquitto configuration for the fleet: a password file with a credential
    /// per enrolled device and for the host (kept when they exist), topic ACLs (each
    /// device writes only its own uplink and status and reads only the broadcasts and its
    /// own downlink), the packet limit and the listeners.
    BrokerConfig(BrokerConfigArgs),
    /// Run the federation: rounds of secure aggregation over MQTT. Settings come from the
    /// flags and from an optional TOML file (--config; keys are the flags' long names,
    /// with - or _), flags winning.
    #[command(args_override_self = true)]
    Serve(Box<ServeArgs>),
    /// Fold the uploads of one shard of a round sharded over fold workers (`serve
    /// --fold-shards K`; run one worker per shard 0..K-1, with the host's broker
    /// credentials). It keeps nothing on disk: restart it (systemd) when it dies, and the
    /// host has the shard's devices send their uploads again. Settings from flags and an
    /// optional TOML file (--config; packaged: /etc/fedshield/fold-worker.toml).
    #[command(args_override_self = true)]
    FoldWorker {
        /// TOML file of settings (keys are the flags' long names); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fleet name (one MQTT topic level).
        #[arg(long, default_value = "demo")]
        fleet: String,
        /// Fleet directory (its registry checks the devices' manifests).
        #[arg(long, default_value = "fleet")]
        fleet_dir: PathBuf,
        #[command(flatten)]
        link: fedshield_transport::BrokerArgs,
        /// The shard this worker folds (0 to --fold-shards - 1 of the host).
        #[arg(long)]
        shard: u32,
        /// Append what the worker did to FILE, one JSON object per line.
        #[arg(long)]
        events: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuthorityCommand {
    /// Create the authority (authority.key, 0600, and authority.pub to hand out).
    Init {
        /// The authority's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a device's enrolment request (from `fedshield-edge keygen`) into its
    /// certificate, for the host's devices/{id}.cert.json and the device's install-cert.
    Enrol {
        /// The authority's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The device's enrolment-request.json.
        #[arg(long)]
        request: PathBuf,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
    },
    /// Certify the host's key (its host-request.json from `fedshield-host keygen`) for the
    /// fleet the request names.
    CertifyHost {
        /// The authority's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The host's host-request.json.
        #[arg(long)]
        request: PathBuf,
        /// Where to write the certificate (the host's host.json).
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid (devices refuse the host after that; certify
        /// the host again, with the same key or a rotated one, before it runs out).
        #[arg(long, default_value_t = 90)]
        valid_days: u64,
    },
    /// Revoke a device or a host key: writes the next signed revocation list to the
    /// authority's revocations.json (copy it to the host's fleet directory: the host
    /// refuses a revoked device from the next round on, and shows the list to the
    /// devices, which then refuse a revoked host key).
    #[command(group(clap::ArgGroup::new("what").required(true)))]
    Revoke {
        /// The authority's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The device id.
        #[arg(long, group = "what")]
        device: Option<String>,
        /// A host certificate (host.json) whose key to revoke.
        #[arg(long, group = "what")]
        host_cert: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct BrokerConfigArgs {
    /// Fleet directory (its registry names the devices).
    #[arg(long, default_value = "fleet")]
    fleet_dir: PathBuf,
    /// Fleet name (one MQTT topic level).
    #[arg(long, default_value = "demo")]
    fleet: String,
    /// Folder to write mosquitto.conf, passwd, acl and credentials/ into.
    #[arg(long)]
    out: PathBuf,
    /// Where those files will be on the broker's machine (default: --out, absolute).
    #[arg(long)]
    install_dir: Option<PathBuf>,
    /// The host's MQTT username.
    #[arg(long, default_value = "fedshield-host")]
    host_user: String,
    /// Plain-TCP listener ("none" for TLS only).
    #[arg(long, default_value = "127.0.0.1:1883")]
    listen: String,
    /// The links' largest MQTT packet (their --max-packet-bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_PACKET_BYTES)]
    max_packet_bytes: usize,
    /// TLS listener address (with --tls-cert and --tls-key).
    #[arg(long, default_value = "0.0.0.0:8883")]
    tls_listen: SocketAddr,
    /// The broker's certificate (PEM): adds the TLS listener.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The broker's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the broker's (and any client's) certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Clients must present a certificate signed by --tls-ca, besides their password.
    #[arg(long)]
    require_client_cert: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML file of settings (see `host/serve.example.toml`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Fleet name (one MQTT topic level).
    #[arg(long, default_value = "demo")]
    fleet: String,
    /// Fleet directory (see `enrol`).
    #[arg(long, default_value = "fleet")]
    fleet_dir: PathBuf,
    #[command(flatten)]
    link: fedshield_transport::BrokerArgs,
    /// Start the embedded broker on --broker's address first (one-machine runs; plain
    /// TCP on that address, so keep it on loopback or a private network).
    #[arg(long)]
    embedded_broker: bool,
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
    /// Keep schedule: RHO, uniform:RHO or ramp:FIRST:LAST. With the automatic body width,
    /// 0.5 costs 0.5 bytes per parameter for up to 8 devices (8-bit bodies) and 1 beyond
    /// (16-bit); `--rho 0.25` keeps larger fleets at 0.5.
    #[arg(long, default_value = "0.5")]
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
    /// Bits of each ciphertext body sent: 8, 16, 24, 32 (bytes per value on the wire: a
    /// value costs rho x bits / 8 bytes), or auto: the narrowest width whose rounding step
    /// stays within 1/8 of the clip for the enrolled fleet (8 bits up to 8 devices, 16 up to
    /// 1,000). Narrower bodies round more coarsely (the devices carry the rounding into
    /// later rounds) and cap the clients a round can sum (SECURITY.md, "Noise and rounding
    /// budget").
    #[arg(long, default_value = "auto")]
    body_bits: String,
    /// Local optimizer steps per round: the most a device is given. A device that reports
    /// its pace gets the steps that fit half the upload window (see ARCHITECTURE.md,
    /// "Capability-aware rounds").
    #[arg(long, default_value_t = 3)]
    local_steps: usize,
    /// A device that could train fewer steps than this in the round's time is left out.
    #[arg(long, default_value_t = 1)]
    min_local_steps: usize,
    /// Minimum contributors per round.
    #[arg(long, default_value_t = 2)]
    threshold: usize,
    /// Who shares with whom in the secure aggregation: `auto` (a SecAgg+ Harary graph with
    /// degree and threshold derived per round from the roster's size and
    /// --corrupt-rate/--dropout-rate, the complete graph below --sparse-from devices),
    /// `complete` (everyone with everyone), or `harary:K:T` (degree K, threshold T).
    #[arg(long, default_value = "auto")]
    secagg_graph: String,
    /// Fraction of devices assumed to collude with the host (for `--secagg-graph auto`).
    #[arg(long, default_value_t = 0.05)]
    corrupt_rate: f64,
    /// Fraction of devices assumed to drop out of a round (for `--secagg-graph auto`).
    #[arg(long, default_value_t = 0.05)]
    dropout_rate: f64,
    /// Derive the graph against a host that may lie about dropouts (larger neighbourhoods,
    /// majority thresholds, and 40 more bits against ring grinding; SECURITY.md).
    #[arg(long)]
    semi_malicious: bool,
    /// How the global update goes down: `q8` (8 bits per value with a per-block scale; the
    /// host carries each value's quantization error into the next round, so nothing is
    /// lost and the published adapter is exactly what the devices hold) or `f32`.
    #[arg(long, default_value = "q8")]
    downlink: String,
    /// Smallest roster that gets a sparse graph under `--secagg-graph auto`.
    #[arg(long, default_value_t = fedshield_crypto::secagg::DEFAULT_SPARSE_FROM)]
    sparse_from: u32,
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
    /// Seconds the host waits, after the last round, for the contributors' evaluation
    /// reports of the final adapter before it exits.
    #[arg(long, default_value_t = 600)]
    report_seconds: u64,
    /// Upload chunk size, bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    chunk_bytes: usize,
    /// Shard the uploads over K fold workers (`fedshield-host fold-worker --shard S` for S
    /// in 0..K, with the host's broker credentials): each folds its devices' uploads into a
    /// partial sum, the host adds the partial sums. 0: the host folds every upload itself.
    #[arg(long, default_value_t = 0)]
    fold_shards: u32,
    /// Seed of the initial adapter and the masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: adapter/, metrics.json, loss.svg, state.bin, round.journal.
    #[arg(long, default_value = "runs/fleet")]
    out: PathBuf,
    /// Write each round's decrypted sums to DIR/round-{r}.json (audits, end-to-end tests).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Append what the host did and refused to FILE, one JSON object per line
    /// (`fedshield_protocol::fleet::host::HostEvent`: announced, resumed, republished,
    /// uploads-open, upload-dropped, refused, reported, closed, failed, finished).
    #[arg(long)]
    events: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=off".into()),
        )
        .init();
    let argv = match fedshield_store::settings::expand_config(
        std::env::args_os().collect(),
        &["serve", "fold-worker"],
    ) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    match Cli::parse_from(argv).command {
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
        Command::Enrol {
            fleet_dir,
            authority_dir,
            fleet: name,
            devices,
        } => {
            let fleet = FleetDir(fleet_dir);
            let authority = AuthorityDir(authority_dir);
            for d in devices.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                println!("{}", fleet.enrol(&authority, &name, d)?.display());
            }
            Ok(())
        }
        Command::Keygen {
            fleet_dir,
            fleet,
            rotate,
        } => {
            let dir = FleetDir(fleet_dir);
            if rotate {
                let serial = dir.retire_host_key(&fleet)?;
                eprintln!(
                    "host key and certificate {serial} retired; have the authority certify the new request"
                );
            }
            println!("{}", dir.keygen(&fleet)?.display());
            Ok(())
        }
        Command::Authority(command) => run_authority(command),
        Command::BrokerConfig(args) => run_broker_config(args),
        Command::Serve(args) => run_serve(*args),
        Command::FoldWorker {
            config: _,
            fleet,
            fleet_dir,
            link,
            shard,
            events,
        } => {
            anyhow::ensure!(
                shard < fedshield_protocol::shard::MAX_SHARDS,
                "--shard {shard}: at most {} shards",
                fedshield_protocol::shard::MAX_SHARDS
            );
            fold_worker::run(fold_worker::WorkerConfig {
                fleet,
                fleet_dir: FleetDir(fleet_dir),
                broker: link,
                shard,
                events,
            })
        }
    }
}

/// `authority ...`: the offline authority's commands.
fn run_authority(command: AuthorityCommand) -> anyhow::Result<()> {
    use fedshield_crypto::identity::EnrolmentRequest;
    use fedshield_host::fleet::{read_json, write_json};
    use fedshield_store::Access;
    match command {
        AuthorityCommand::Init { dir } => {
            let authority = AuthorityDir(dir);
            let public = authority.init()?;
            eprintln!(
                "authority {} created; hand out {}",
                fedshield_protocol::keyfile::hex(&public),
                authority.public_path().display()
            );
        }
        AuthorityCommand::Enrol { dir, request, out } => {
            let request: EnrolmentRequest = read_json(&request)?;
            let cert = AuthorityDir(dir).enrol(&request)?;
            write_json(&out, &cert, Access::Public)?;
            eprintln!("certified device {} ({})", cert.device, out.display());
        }
        AuthorityCommand::CertifyHost {
            dir,
            request,
            out,
            valid_days,
        } => {
            anyhow::ensure!(valid_days >= 1, "--valid-days must be at least 1");
            let request: EnrolmentRequest = read_json(&request)?;
            let now = fedshield_store::unix_seconds();
            let cert =
                AuthorityDir(dir).certify_host(&request, now, valid_days.saturating_mul(86_400))?;
            write_json(&out, &cert, Access::Public)?;
            eprintln!(
                "certified the host of fleet {} as host certificate {}, valid for {valid_days} days ({})",
                cert.fleet,
                cert.serial,
                out.display()
            );
        }
        AuthorityCommand::Revoke {
            dir,
            device,
            host_cert,
        } => {
            let authority = AuthorityDir(dir);
            let list = match (device, host_cert) {
                (Some(device), _) => authority.revoke(&device)?,
                (None, Some(path)) => {
                    let cert: fedshield_crypto::identity::HostCertificate = read_json(&path)?;
                    authority.revoke_host(cert.public_key)?
                }
                (None, None) => unreachable!("clap requires one"),
            };
            eprintln!(
                "revocation list {} ({} devices, {} host keys revoked): copy {} to the host's fleet directory",
                list.serial,
                list.revoked.len(),
                list.hosts.len(),
                authority.revocations_path().display()
            );
        }
    }
    Ok(())
}

/// `broker-config`: the fleet's enrolled devices into a mosquitto configuration.
fn run_broker_config(args: BrokerConfigArgs) -> anyhow::Result<()> {
    use fedshield_host::broker_config::{BrokerConfig, TlsListener, write};
    let (registry, _) = FleetDir(args.fleet_dir.clone()).registry()?;
    let devices: Vec<String> = registry.devices().map(|d| d.0.clone()).collect();
    anyhow::ensure!(
        !devices.is_empty(),
        "no device is enrolled in {}: run `fedshield-host enrol` first",
        args.fleet_dir.display()
    );
    let listen = match args.listen.as_str() {
        "none" => None,
        a => Some(a.parse().with_context(|| format!("--listen {a}"))?),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let install_dir = match args.install_dir {
        Some(d) => d,
        None => std::fs::canonicalize(&args.out)?,
    };
    let tls = match (args.tls_cert, args.tls_key, args.tls_ca) {
        (Some(certfile), Some(keyfile), Some(cafile)) => Some(TlsListener {
            listen: args.tls_listen,
            cafile,
            certfile,
            keyfile,
            require_client_cert: args.require_client_cert,
        }),
        _ => None,
    };
    let config = BrokerConfig {
        fleet: args.fleet,
        host_user: args.host_user,
        devices,
        max_packet_bytes: args.max_packet_bytes,
        listen,
        tls,
        install_dir,
    };
    let written = write(&config, &args.out, &mut rand::rng())?;
    println!("{}", written.conf.display());
    eprintln!(
        "{} users ({} new, {} kept); install credentials/<user>.password on each device \
         (FEDSHIELD_MQTT_PASSWORD) and run mosquitto -c {}",
        written.new_users.len() + written.kept_users.len(),
        written.new_users.len(),
        written.kept_users.len(),
        written.conf.display()
    );
    Ok(())
}

/// The secure-aggregation graph policy of `serve`'s options.
fn graph_policy(args: &ServeArgs) -> anyhow::Result<GraphPolicy> {
    let rate = |name: &str, r: f64| -> anyhow::Result<u16> {
        if !(0.0..1.0).contains(&r) {
            anyhow::bail!("--{name} {r}: a fraction in [0, 1)");
        }
        Ok((r * 1000.0).round() as u16)
    };
    let policy = match args.secagg_graph.as_str() {
        "auto" => GraphPolicy::Derived {
            model: ThreatModel {
                corrupt_permille: rate("corrupt-rate", args.corrupt_rate)?,
                dropout_permille: rate("dropout-rate", args.dropout_rate)?,
                adversary: if args.semi_malicious {
                    Adversary::SemiMalicious
                } else {
                    Adversary::SemiHonest
                },
            },
            sparse_from: args.sparse_from,
        },
        "complete" => GraphPolicy::Complete,
        other => {
            let parsed = other.strip_prefix("harary:").and_then(|kt| {
                let (k, t) = kt.split_once(':')?;
                Some((k.parse().ok()?, t.parse().ok()?))
            });
            let Some((degree, threshold)) = parsed else {
                anyhow::bail!("--secagg-graph {other}: auto, complete or harary:K:T");
            };
            GraphPolicy::Fixed { degree, threshold }
        }
    };
    policy
        .check()
        .with_context(|| format!("--secagg-graph {}", args.secagg_graph))?;
    Ok(policy)
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let secagg_graph = graph_policy(&args)?;
    let downlink = match args.downlink.as_str() {
        "q8" => DownlinkFormat::Q8,
        "f32" => DownlinkFormat::F32,
        other => anyhow::bail!("--downlink {other}: q8 or f32"),
    };
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
    let _broker = if args.embedded_broker {
        anyhow::ensure!(
            args.link.ca_file.is_none(),
            "the embedded broker listens on plain TCP: use an external broker for TLS"
        );
        let addr: SocketAddr = args
            .link
            .broker
            .parse()
            .context("--embedded-broker needs an IP:port")?;
        let b = EmbeddedBroker::start(addr, args.link.max_packet_bytes)?;
        tracing::info!("embedded MQTT broker on {}", b.addr());
        Some(b)
    } else {
        None
    };
    let phase = args.phase_seconds * 1000;
    let (adapter, plot, metrics) = serve(ServeConfig {
        fleet: args.fleet,
        fleet_dir: FleetDir(args.fleet_dir),
        broker: args.link,
        peft: (
            args.rank,
            args.alpha,
            targets.iter().map(|t| t.to_string()).collect(),
        ),
        base_model: model.display().to_string(),
        layout,
        settings: FleetSettings {
            seed: args.seed,
            rounds: args.rounds,
            prune,
            clip: args.clip,
            body_bits: match args.body_bits.as_str() {
                "auto" => None,
                b => Some(
                    b.parse::<u32>()
                        .map_err(anyhow::Error::from)
                        .and_then(|b| Ok(BodyBits::new(b)?))
                        .with_context(|| format!("--body-bits {b}: 8, 16, 24, 32 or auto"))?,
                ),
            },
            local_steps: args.local_steps,
            min_local_steps: args.min_local_steps,
            threshold: args.threshold,
            secagg_graph,
            downlink,
            chunk_bytes: args.chunk_bytes,
            fold_shards: args.fold_shards,
        },
        deadlines: Deadlines {
            join_ms: args.join_seconds * 1000,
            shares_ms: phase,
            upload_ms: args.upload_seconds * 1000,
            finish_ms: phase,
        },
        out: args.out,
        report_wait: Duration::from_secs(args.report_seconds),
        audit_dir: args.audit_dir,
        events: args.events,
    })?;
    println!("adapter   : {}", adapter.display());
    println!("plot      : {}", plot.display());
    println!("metrics   : {}", metrics.display());
    Ok(())
}
