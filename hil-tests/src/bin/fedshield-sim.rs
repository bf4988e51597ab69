//! `fedshield-sim`: a fleet of simulated devices against a real broker and the real
//! `fedshield-host serve` (see `fedshield_hil_tests::sim` and `::scale`).
//!
//!     fedshield-sim devices --key-dir fleet/devices --from 0 --count 500 ...   # one process's devices
//!     fedshield-sim run --devices 100 --dropout 0.1 --out run.json            # one scenario, recorded
//!     fedshield-sim bench --devices 10,100,300,1000 --dropouts 0,0.1 \
//!         --out target/bench/scale.json                                        # scripts/bench-scale.sh

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedshield_codec::plot::{LinePlot, Series};
use fedshield_hil_tests::scale::{Adapter, HostSettings, RunRecord, Scenario, run};
use fedshield_hil_tests::sim::{Dropouts, SimConfig, Stage, run_devices};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    about = "Simulated FedShield devices: the real edge protocol and crypto, synthetic updates"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct AdapterArgs {
    /// LoRA rank of the shared adapter.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Target modules (PEFT names, comma-separated). The default, rank 8 on q_proj of
    /// SmolLM2-135M, is 276,480 values (all sent at the default rho 1; the SmolLM2 demo's
    /// adapter, rank 16 on all seven projections, is 4,884,480).
    #[arg(long, default_value = "q_proj")]
    targets: String,
    /// GGUF base model whose shapes give the layout (default: the fetched SmolLM2).
    #[arg(long)]
    model: Option<PathBuf>,
}

impl AdapterArgs {
    fn adapter(&self) -> Adapter {
        Adapter {
            rank: self.rank,
            targets: self.targets.clone(),
            model: self.model.clone(),
        }
    }
}

#[derive(clap::Args, Clone)]
struct DropoutArgs {
    /// Fraction of devices dropping out of each round.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Stages they drop out at, drawn uniformly (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "join,shares,upload,unmask"
    )]
    stages: Vec<Stage>,
    /// Seed of who drops out.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl DropoutArgs {
    fn dropouts(&self, rate: f64) -> anyhow::Result<Dropouts> {
        anyhow::ensure!(
            (0.0..1.0).contains(&rate),
            "--dropout {rate}: a fraction in [0, 1)"
        );
        Ok(Dropouts {
            rate,
            stages: self.stages.clone(),
            seed: self.seed,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs enrolled devices in this process until their rounds are done.
    Devices {
        /// Fleet name.
        #[arg(long, default_value = "demo")]
        fleet: String,
        #[command(flatten)]
        link: fedshield_transport::BrokerArgs,
        /// Folder of the key files `edge-{i}.json` (`fedshield-host enrol`).
        #[arg(long)]
        key_dir: PathBuf,
        /// First device number.
        #[arg(long, default_value_t = 0)]
        from: usize,
        /// Devices.
        #[arg(long)]
        count: usize,
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Leave after this round's global update.
        #[arg(long, default_value_t = 1)]
        rounds: u64,
        #[command(flatten)]
        dropouts: DropoutArgs,
        /// Write each round's encoded updates to DIR (as `fedshield-edge run --audit-dir`).
        #[arg(long)]
        audit_dir: Option<PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3_600)]
        timeout_seconds: u64,
        /// Write the record (`fedshield_hil_tests::sim::SimStats`) to FILE.
        #[arg(long)]
        stats: PathBuf,
    },
    /// Runs one scenario (broker, host and simulated devices) and records it.
    Run {
        /// Devices.
        #[arg(long)]
        devices: usize,
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Where the record goes (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs the scenarios of every fleet size and dropout rate, and writes scale.json and
    /// the plots of cost against fleet size beside it.
    Bench {
        /// Fleet sizes.
        #[arg(long, value_delimiter = ',', default_value = "10,100,300,1000")]
        devices: Vec<usize>,
        /// Dropout rates.
        #[arg(long, value_delimiter = ',', default_value = "0,0.1")]
        dropouts: Vec<f64>,
        /// Fold worker counts to run each fleet size with (overrides --fold-workers; 0:
        /// the host folds).
        #[arg(long, value_delimiter = ',')]
        worker_counts: Vec<u32>,
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Where the record goes (JSON, with `runs`); plots beside it.
        #[arg(long, default_value = "target/bench/scale.json")]
        out: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct ScenarioArgs {
    /// Simulator processes.
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// Rounds (the record's headline figures are the last round's).
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Fraction of each round's mask (the host's `--rho`). 1 by default: every device
    /// then holds only the values it sends (a device's state is about 10 MiB per 276,480
    /// values, which bounds how many one machine simulates).
    #[arg(long, default_value = "1")]
    rho: String,
    #[command(flatten)]
    adapter: AdapterArgs,
    #[command(flatten)]
    dropouts: DropoutArgs,
    /// The host's upload window, seconds (default: fitted to the fleet's size for updates
    /// of the default size; larger updates take longer to encrypt on two shared cores).
    #[arg(long)]
    upload_seconds: Option<u64>,
    /// The host's join, share, consistency and unmasking windows, seconds (default: fitted
    /// to the fleet's size; with larger updates each simulated device also takes longer to
    /// set a round up, and its process serves its devices one after another).
    #[arg(long)]
    phase_seconds: Option<u64>,
    /// Shard the uploads over K fold workers (`fedshield-host fold-worker`, one process
    /// per shard; the host's `--fold-shards K`); 0: the host folds them.
    #[arg(long, default_value_t = 0)]
    fold_workers: u32,
    /// Keep each run's folder (fleet, host and simulator logs, records) and print its path.
    #[arg(long)]
    keep: bool,
    /// More flags for `fedshield-host serve`.
    #[arg(long, allow_hyphen_values = true, num_args = 1..)]
    host_args: Vec<String>,
}

impl ScenarioArgs {
    fn scenario(&self, devices: usize, dropout: f64) -> anyhow::Result<Scenario> {
        let mut host = HostSettings::for_devices(devices, self.rounds);
        host.rho = self.rho.clone();
        if let Some(s) = self.upload_seconds {
            host.upload_seconds = s;
        }
        if let Some(s) = self.phase_seconds {
            host.phase_seconds = s;
            host.join_seconds = s;
        }
        host.extra = self.host_args.clone();
        Ok(Scenario {
            devices,
            processes: self.processes,
            dropouts: self.dropouts.dropouts(dropout)?,
            adapter: self.adapter.adapter(),
            host,
            workers: self.fold_workers,
            keep: self.keep,
        })
    }
}

/// The folder of this executable (`fedshield-host` is built beside it).
fn bins() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("executable folder")?.to_path_buf())
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    fedshield_store::write_atomic(
        path,
        serde_json::to_string_pretty(value)?.as_bytes(),
        fedshield_store::Access::Public,
    )?;
    Ok(())
}

/// One line per run for the terminal.
fn summary(r: &RunRecord) -> String {
    let Some(last) = r.last() else {
        return format!("{} devices: no round recorded", r.devices);
    };
    let n = r.devices as f64;
    format!(
        "{:>5} devices, {:>3.0}% dropouts: {} contributors, round {:.1} s, host CPU {:.3} s \
         ({:.3} ms per device; secagg {:.3} s, fold {:.3} s, finish {:.3} s, apply {:.3} s, \
         journal {:.3} s), host peak RSS {:.1} MiB, journal peak {:.1} MiB, device CPU {:.1} ms \
         per device, secagg {:.1} KiB per device; broker over the run {:.1} MiB in, {:.1} MiB out{}",
        r.devices,
        r.dropout * 100.0,
        last.contributors,
        last.round_s,
        last.host_cpu_total_s,
        last.host_cpu_total_s * 1e3 / n,
        last.host_cpu_s.get("secagg").copied().unwrap_or(0.0),
        last.host_cpu_s.get("fold").copied().unwrap_or(0.0),
        last.host_cpu_s.get("finish").copied().unwrap_or(0.0),
        last.host_cpu_s.get("apply").copied().unwrap_or(0.0),
        last.host_cpu_s.get("journal").copied().unwrap_or(0.0),
        r.host_peak_rss_mib,
        last.journal_peak_bytes as f64 / f64::from(1 << 20),
        last.device_cpu_s_per_device * 1e3,
        last.secagg_bytes_per_device / 1024.0,
        r.broker_received as f64 / f64::from(1 << 20),
        r.broker_sent as f64 / f64::from(1 << 20),
        if r.workers > 0 {
            format!(
                "; {} fold workers: {:.3} s CPU in all, {:.3} s the busiest",
                r.workers, last.workers_cpu_s, last.worker_cpu_max_s
            )
        } else {
            String::new()
        },
    )
}

/// The host side's critical path (CPU seconds, one core per process) of each sharded run
/// against the run of the same fleet with one fold worker, and with the host folding.
fn gains(runs: &[RunRecord]) {
    let side = |r: &RunRecord| r.last().map_or(0.0, |l| l.host_side_cpu_s);
    for r in runs {
        let same = |w: u32| {
            runs.iter()
                .find(|o| o.devices == r.devices && o.dropout == r.dropout && o.workers == w)
                .map(side)
        };
        let ratio = |base: Option<f64>| {
            base.filter(|b| *b > 0.0)
                .map_or("-".to_string(), |b| format!("{:.2}x", side(r) / b))
        };
        println!(
            "{:>5} devices, {} fold workers: host side {:.3} s CPU on its critical path, {} of one worker's, {} of the host alone",
            r.devices,
            r.workers,
            side(r),
            ratio(same(1)),
            ratio(same(0)),
        );
    }
}

/// A figure of a run, for the plots.
type Figure = fn(&RunRecord) -> Option<f64>;

/// Plots of cost against fleet size, one series per dropout rate.
fn plots(runs: &[RunRecord], out: &Path) -> anyhow::Result<()> {
    let mut rates: Vec<f64> = runs.iter().map(|r| r.dropout).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let figures: [(&str, &str, Figure); 3] = [
        ("cpu", "host CPU per device per round (ms)", |r| {
            r.last()
                .map(|l| l.host_cpu_total_s * 1e3 / r.devices as f64)
        }),
        ("rss", "host peak resident set (MiB)", |r| {
            Some(r.host_peak_rss_mib)
        }),
        ("secagg", "secure-aggregation bytes per device (KiB)", |r| {
            r.last().map(|l| l.secagg_bytes_per_device / 1024.0)
        }),
    ];
    for (name, label, value) in figures {
        let plot = LinePlot {
            title: format!("FedShield fleet simulation: {label}"),
            x_label: "devices".into(),
            y_label: label.into(),
            series: rates
                .iter()
                .map(|rate| Series {
                    name: format!("{:.0}% dropouts", rate * 100.0),
                    points: runs
                        .iter()
                        .filter(|r| r.dropout == *rate)
                        .filter_map(|r| Some((r.devices as f64, value(r)?)))
                        .collect(),
                })
                .collect(),
        };
        let path = out.with_file_name(format!(
            "{}-{name}.svg",
            out.file_stem().and_then(|s| s.to_str()).unwrap_or("scale")
        ));
        fedshield_store::write_atomic(
            &path,
            plot.to_svg().as_bytes(),
            fedshield_store::Access::Public,
        )?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Cmd::Devices {
            fleet,
            link,
            key_dir,
            from,
            count,
            adapter,
            rounds,
            dropouts,
            audit_dir,
            timeout_seconds,
            stats,
        } => {
            let layout = adapter.adapter().layout()?;
            let cfg = SimConfig {
                fleet,
                link,
                keys: (from..from + count)
                    .map(|i| key_dir.join(format!("edge-{i}.json")))
                    .collect(),
                layout,
                rounds,
                dropouts: dropouts.dropouts(dropouts.dropout)?,
                audit_dir,
                timeout: Duration::from_secs(timeout_seconds),
            };
            let record = run_devices(&cfg)?;
            write_json(&stats, &record)?;
            anyhow::ensure!(record.finished, "timed out: see {}", stats.display());
        }
        Cmd::Run {
            devices,
            scenario,
            out,
        } => {
            let record = run(
                &bins()?,
                &scenario.scenario(devices, scenario.dropouts.dropout)?,
            )?;
            println!("{}", summary(&record));
            write_json(&out, &record)?;
        }
        Cmd::Bench {
            devices,
            dropouts,
            worker_counts,
            scenario,
            out,
        } => {
            let mut runs: Vec<RunRecord> = Vec::new();
            let worker_counts = if worker_counts.is_empty() {
                vec![scenario.fold_workers]
            } else {
                worker_counts
            };
            for &n in &devices {
                for &rate in &dropouts {
                    for &workers in &worker_counts {
                        let mut s = scenario.scenario(n, rate)?;
                        s.workers = workers;
                        let record = run(&bins()?, &s).with_context(|| {
                            format!("{n} devices, dropout {rate}, {workers} fold workers")
                        })?;
                        println!("{}", summary(&record));
                        runs.push(record);
                        // Written after every run: a long bench keeps what it measured.
                        write_json(&out, &serde_json::json!({ "runs": runs }))?;
                    }
                }
            }
            // The plots are of cost against fleet size, one series per dropout rate.
            if worker_counts.len() == 1 {
                plots(&runs, &out)?;
            } else {
                gains(&runs);
            }
            println!("record: {}", out.display());
        }
    }
    Ok(())
}
