//! Whole fleets of simulated devices ([`crate::sim`]) against a real mosquitto and the
//! real `fedshield-host serve`: enrolment, the processes, the broker's byte counters, and
//! the record of a run. Used by `fedshield-sim run` and `bench` (`scripts/bench-scale.sh`)
//! and by the simulator's whole-system tests.

use crate::Mosquitto;
use crate::sim::{Dropouts, RoundStats, SimStats, Stage};
use anyhow::{Context, bail};
use fedshield_protocol::fleet::host::HostEvent;
use fedshield_protocol::shard::WorkerEvent;
use fedshield_transport::{BrokerArgs, Incoming, Link};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The adapter every simulated device and the host share: rank and target modules of
/// LoRA on a GGUF base model (its shapes give the layout; no weights are read).
#[derive(Debug, Clone)]
pub struct Adapter {
    /// LoRA rank.
    pub rank: usize,
    /// Target modules, comma-separated PEFT names.
    pub targets: String,
    /// The GGUF base model (default: the fetched SmolLM2).
    pub model: Option<PathBuf>,
}

impl Adapter {
    /// The model's path.
    pub fn model(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => Ok(fedshield_models::Assets::locate().smollm2_gguf()?),
        }
    }

    /// The adapter's layout.
    pub fn layout(&self) -> anyhow::Result<fedshield_codec::Layout> {
        let path = self.model()?;
        let g = fedshield_models::gguf::Gguf::open(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config = fedshield_models::config::LlamaConfig::from_gguf(&g)?;
        let targets: Vec<&str> = self.targets.split(',').map(str::trim).collect();
        Ok(config.lora_layout(self.rank, &targets, true)?)
    }

    /// The flags that give host and devices this adapter.
    pub fn args(&self) -> anyhow::Result<Vec<String>> {
        Ok(vec![
            "--rank".into(),
            self.rank.to_string(),
            "--targets".into(),
            self.targets.clone(),
            "--model".into(),
            self.model()?.display().to_string(),
        ])
    }
}

/// A host's settings for a simulated fleet.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Rounds.
    pub rounds: u64,
    /// `--rho`.
    pub rho: String,
    /// Join window, seconds.
    pub join_seconds: u64,
    /// Upload window, seconds.
    pub upload_seconds: u64,
    /// Share, consistency and unmasking windows, seconds.
    pub phase_seconds: u64,
    /// Anything else (`--secagg-graph complete`, `--audit-dir DIR`, ...).
    pub extra: Vec<String>,
}

impl HostSettings {
    /// Windows that fit `devices` simulated devices on a two-core machine, where every
    /// device's work shares two cores: each checks the whole roster (two signatures per
    /// member, about 130 ms per device at 1,000) and encrypts its update, so a phase takes
    /// about n x 0.1 s of wall time at 1,000 (a window is only waited out in full when a
    /// device drops out in it).
    pub fn for_devices(devices: usize, rounds: u64) -> Self {
        let n = devices as u64;
        Self {
            rounds,
            rho: "0.5".into(),
            join_seconds: 20 + n / 20,
            upload_seconds: 30 + n * 3 / 20,
            phase_seconds: 15 + n / 10,
            extra: Vec::new(),
        }
    }

    /// The longest a round may take.
    pub fn round_limit(&self) -> Duration {
        Duration::from_secs(self.join_seconds + self.upload_seconds + 4 * self.phase_seconds + 30)
    }
}

/// A fleet of `devices` enrolled devices (edge-0, edge-1, ...) on a fresh mosquitto that
/// reports its byte counters every second; host and simulator processes started from
/// `bins`, their files in a temporary folder.
pub struct SimFleet {
    /// The broker.
    pub broker: Mosquitto,
    dir: tempfile::TempDir,
    bins: PathBuf,
    /// Devices enrolled.
    pub devices: usize,
    /// The shared adapter.
    pub adapter: Adapter,
    /// Fleet name.
    pub name: String,
    /// Largest MQTT packet.
    pub max_packet_bytes: usize,
    hosts_started: usize,
    workers_started: usize,
}

/// A child process killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Waits at most `timeout` for the process to exit; its status, or `None` if it still
    /// runs.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn run_ok(command: &mut Command) -> anyhow::Result<()> {
    let out = command.output()?;
    if !out.status.success() {
        bail!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl SimFleet {
    /// Enrols `devices` devices and starts the broker. `bins` holds `fedshield-host` and
    /// `fedshield-sim`.
    pub fn enrol(bins: &Path, devices: usize, adapter: Adapter) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let name = "sim".to_string();
        let ids: Vec<String> = (0..devices).map(|i| format!("edge-{i}")).collect();
        run_ok(
            Command::new(bins.join("fedshield-host"))
                .args(["enrol", "--fleet", &name, "--devices", &ids.join(",")])
                .arg("--fleet-dir")
                .arg(dir.path().join("fleet"))
                .arg("--authority-dir")
                .arg(dir.path().join("authority")),
        )?;
        let max_packet_bytes = 1 << 20;
        // The broker's queue per client must hold a round's worth of messages to a device
        // that is slow to read them.
        let broker = Mosquitto::start_with(max_packet_bytes, "sys_interval 1\n")?;
        std::fs::create_dir_all(dir.path().join("out"))?;
        Ok(Self {
            broker,
            dir,
            bins: bins.to_path_buf(),
            devices,
            adapter,
            name,
            max_packet_bytes,
            hosts_started: 0,
            workers_started: 0,
        })
    }

    /// The fleet directory.
    pub fn fleet_dir(&self) -> PathBuf {
        self.dir.path().join("fleet")
    }

    /// The host's output folder (also where the processes' logs and records go).
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// The event file of the host's `k`-th start.
    fn host_events_path(&self, k: usize) -> PathBuf {
        self.out().join(format!("events-host-{k}.jsonl"))
    }

    /// Starts `fedshield-host serve` (its log in `out/host-{k}.log`).
    pub fn host(&mut self, settings: &HostSettings) -> anyhow::Result<Process> {
        let k = self.hosts_started;
        self.hosts_started += 1;
        let log = std::fs::File::create(self.out().join(format!("host-{k}.log")))?;
        let child = Command::new(self.bins.join("fedshield-host"))
            .args(["serve", "--fleet", &self.name, "--broker"])
            .arg(self.broker.addr().to_string())
            .args(self.adapter.args()?)
            .args(["--rounds", &settings.rounds.to_string()])
            .args(["--rho", &settings.rho])
            .args(["--join-seconds", &settings.join_seconds.to_string()])
            .args(["--upload-seconds", &settings.upload_seconds.to_string()])
            .args(["--phase-seconds", &settings.phase_seconds.to_string()])
            .args(["--report-seconds", "20", "--threshold", "2"])
            .args(["--max-packet-bytes", &self.max_packet_bytes.to_string()])
            .args(&settings.extra)
            .arg("--fleet-dir")
            .arg(self.fleet_dir())
            .arg("--out")
            .arg(self.out())
            .arg("--events")
            .arg(self.host_events_path(k))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting fedshield-host serve")?;
        Ok(Process(child))
    }

    /// Starts `fedshield-host fold-worker --shard {shard}` with the host's credentials (its
    /// log in `out/worker-{k}.log`, its events in `out/events-worker-{k}.jsonl`, `k`
    /// counting worker starts).
    pub fn fold_worker(&mut self, shard: u32) -> anyhow::Result<Process> {
        let k = self.workers_started;
        self.workers_started += 1;
        let log = std::fs::File::create(self.out().join(format!("worker-{k}.log")))?;
        let child = Command::new(self.bins.join("fedshield-host"))
            .args(["fold-worker", "--fleet", &self.name, "--broker"])
            .arg(self.broker.addr().to_string())
            .args(["--shard", &shard.to_string()])
            .args(["--max-packet-bytes", &self.max_packet_bytes.to_string()])
            .arg("--fleet-dir")
            .arg(self.fleet_dir())
            .arg("--events")
            .arg(self.out().join(format!("events-worker-{k}.jsonl")))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting fedshield-host fold-worker")?;
        Ok(Process(child))
    }

    /// Every event of every fold worker start so far, by start (a torn last line is
    /// skipped).
    pub fn worker_events(&self) -> Vec<Vec<WorkerEvent>> {
        (0..self.workers_started)
            .map(|k| {
                let path = self.out().join(format!("events-worker-{k}.jsonl"));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                text.lines()
                    .filter_map(|l| serde_json::from_str::<WorkerEvent>(l).ok())
                    .collect()
            })
            .collect()
    }

    /// Starts the simulated devices in `processes` processes (contiguous ranges of device
    /// numbers), each recording to `out/sim-{p}.json` and logging to `out/sim-{p}.log`.
    pub fn devices(
        &self,
        processes: usize,
        rounds: u64,
        dropouts: &Dropouts,
        audit_dir: Option<&Path>,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Process>> {
        let processes = processes.clamp(1, self.devices.max(1));
        let stages: Vec<&str> = dropouts.stages.iter().map(|s| s.name()).collect();
        let mut children = Vec::new();
        for p in 0..processes {
            let from = self.devices * p / processes;
            let to = self.devices * (p + 1) / processes;
            let log = std::fs::File::create(self.out().join(format!("sim-{p}.log")))?;
            let mut command = Command::new(self.bins.join("fedshield-sim"));
            command
                .args(["devices", "--fleet", &self.name, "--broker"])
                .arg(self.broker.addr().to_string())
                .args(["--max-packet-bytes", &self.max_packet_bytes.to_string()])
                .arg("--key-dir")
                .arg(self.fleet_dir().join("devices"))
                .args([
                    "--from",
                    &from.to_string(),
                    "--count",
                    &(to - from).to_string(),
                ])
                .args(self.adapter.args()?)
                .args(["--rounds", &rounds.to_string()])
                .args(["--dropout", &dropouts.rate.to_string()])
                .args(["--stages", &stages.join(",")])
                .args(["--seed", &dropouts.seed.to_string()])
                .args(["--timeout-seconds", &timeout.as_secs().to_string()])
                .arg("--stats")
                .arg(self.out().join(format!("sim-{p}.json")));
            if let Some(dir) = audit_dir {
                command.arg("--audit-dir").arg(dir);
            }
            let child = command
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                // Hundreds of link threads: glibc's per-thread arenas would hold far more
                // memory than the devices use.
                .env("MALLOC_ARENA_MAX", "2")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting fedshield-sim devices")?;
            children.push(Process(child));
        }
        Ok(children)
    }

    /// Every event of every host start so far, in order (a torn last line is skipped).
    pub fn host_events(&self) -> Vec<HostEvent> {
        (0..self.hosts_started)
            .flat_map(|k| {
                let text = std::fs::read_to_string(self.host_events_path(k)).unwrap_or_default();
                text.lines()
                    .filter_map(|l| serde_json::from_str::<HostEvent>(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits at most `timeout` for a host event that `is` accepts.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        is: impl Fn(&HostEvent) -> bool,
    ) -> anyhow::Result<HostEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.host_events().into_iter().find(&is) {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!("no host event {what} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The simulator processes' records.
    pub fn sim_stats(&self) -> anyhow::Result<Vec<SimStats>> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(self.out())? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("sim-") && name.ends_with(".json") {
                let text = std::fs::read_to_string(&path)?;
                all.push(serde_json::from_str(&text).with_context(|| path.display().to_string())?);
            }
        }
        Ok(all)
    }

    /// Keeps the fleet's folder (fleet, logs, records) past the fleet's end; its path.
    pub fn keep(self) -> PathBuf {
        let SimFleet { dir, .. } = self;
        dir.keep()
    }

    /// The host's metrics.json rounds.
    pub fn metrics(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = self.out().join("metrics.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let metrics: serde_json::Value = serde_json::from_str(&text)?;
        Ok(metrics["rounds"].as_array().cloned().unwrap_or_default())
    }
}

/// The broker's own byte counters (`$SYS/broker/bytes/received` and `sent`, published
/// every `sys_interval` second).
pub struct BrokerMeter {
    link: Link,
    received: u64,
    sent: u64,
}

impl BrokerMeter {
    /// Subscribes to the counters of the broker at `addr`.
    pub fn start(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let args = BrokerArgs {
            broker: addr.to_string(),
            username: None,
            max_packet_bytes: 64 * 1024,
            ca_file: None,
            client_cert: None,
            client_key: None,
            incoming_budget: None,
        };
        let link = Link::start(args.link_config(
            format!("fedshield-sim-meter-{}", std::process::id()),
            vec!["$SYS/broker/bytes/+".into()],
            None,
            None,
        )?)?;
        Ok(Self {
            link,
            received: 0,
            sent: 0,
        })
    }

    /// The newest counters (bytes received, sent), after waiting `settle` for the broker
    /// to publish them again.
    pub fn sample(&mut self, settle: Duration) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + settle;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.recv(left.min(Duration::from_millis(100)))? {
                Some(Incoming::Message { topic, payload }) => {
                    let value = std::str::from_utf8(&payload)
                        .ok()
                        .and_then(|t| t.trim().parse().ok());
                    match (topic.rsplit('/').next(), value) {
                        (Some("received"), Some(v)) => self.received = v,
                        (Some("sent"), Some(v)) => self.sent = v,
                        _ => {}
                    }
                }
                _ if left.is_zero() => return Ok((self.received, self.sent)),
                _ => {}
            }
        }
    }
}

/// One round of a simulated run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub round: u64,
    /// Devices whose update is in the aggregate (0: failed).
    pub contributors: usize,
    /// Values the round's mask selected (each device encrypts this many).
    pub update_values: usize,
    /// Wall time of the round, seconds (the host's).
    pub round_s: f64,
    /// Host CPU seconds by stage (`HostEvent::RoundCost`).
    pub host_cpu_s: BTreeMap<String, f64>,
    /// Host CPU seconds, every stage.
    pub host_cpu_total_s: f64,
    /// The host process's CPU seconds (its MQTT link's thread included).
    pub host_process_cpu_s: f64,
    /// The host's peak resident set at the round's end, MiB.
    pub host_peak_rss_mib: f64,
    /// The round journal's largest size, bytes.
    pub journal_peak_bytes: u64,
    /// The simulated devices' figures, every process added.
    pub devices: RoundStats,
    /// Device CPU seconds per device (the simulators' driver threads).
    pub device_cpu_s_per_device: f64,
    /// Fold workers' process CPU seconds in the round (each worker's CPU between its
    /// closes), every worker added; 0 when the host folds.
    pub workers_cpu_s: f64,
    /// The busiest fold worker's CPU seconds in the round.
    pub worker_cpu_max_s: f64,
    /// The host side's critical path in CPU seconds, one core per process: the host's
    /// round thread plus the busiest fold worker (the host alone when it folds).
    pub host_side_cpu_s: f64,
    /// Secure-aggregation payload bytes per device, both ways (joins, shares, masked
    /// inputs, consistency, unmasking; the share deliveries down).
    pub secagg_bytes_per_device: f64,
    /// SecAgg+ degree and threshold (`None`: the complete graph).
    pub secagg_degree: Option<u64>,
    /// Threshold.
    pub secagg_threshold: Option<u64>,
}

/// One simulated run (`target/bench/scale.json`'s `runs`): the headline figures are the
/// last round's (the first round also pays for the devices' first connection).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Devices enrolled and simulated.
    pub devices: usize,
    /// Fraction dropping out of each round.
    pub dropout: f64,
    /// Stages they drop out at.
    pub stages: Vec<Stage>,
    /// Values each device encrypts per round (the round's mask).
    pub update_values: usize,
    /// The adapter's values.
    pub layout_values: usize,
    /// Simulator processes.
    pub processes: usize,
    /// Fold workers (0: the host folds every upload).
    #[serde(default)]
    pub workers: u32,
    /// The last round's host CPU seconds by stage.
    pub host_cpu_s: BTreeMap<String, f64>,
    /// The host's peak resident set, MiB.
    pub host_peak_rss_mib: f64,
    /// The last round's payload bytes by kind, `up` (devices to host) and `down`.
    pub broker_bytes: BTreeMap<String, BTreeMap<String, u64>>,
    /// The last round's wall time, seconds.
    pub round_s: f64,
    /// Every round.
    pub rounds: Vec<RoundRecord>,
    /// Simulator processes' CPU seconds over the run (links included).
    pub sim_process_cpu_s: f64,
    /// Simulator processes' peak resident set, MiB (largest of them).
    pub sim_peak_rss_mib: f64,
    /// Incoming messages the simulated devices' links dropped.
    pub link_dropped: u64,
    /// The broker's own counters over the whole run (`$SYS/broker/bytes/received` and
    /// `sent`, every MQTT byte of every client: devices, host and this meter).
    pub broker_received: u64,
    /// Sent.
    pub broker_sent: u64,
}

impl RunRecord {
    /// The last round's record.
    pub fn last(&self) -> Option<&RoundRecord> {
        self.rounds.last()
    }
}

/// Assembles a run's record from the host's events and metrics, the simulators' records
/// and the broker's byte counters at the end (received, sent).
pub fn record(
    fleet: &SimFleet,
    dropouts: &Dropouts,
    processes: usize,
    broker: (u64, u64),
) -> anyhow::Result<RunRecord> {
    let events = fleet.host_events();
    let metrics = fleet.metrics()?;
    let sims = fleet.sim_stats()?;
    let mut rounds = Vec::new();
    for m in &metrics {
        let round = m["round"].as_u64().unwrap_or(0);
        let mut r = RoundRecord {
            round,
            contributors: m["contributors"].as_u64().unwrap_or(0) as usize,
            round_s: m["round_seconds"].as_f64().unwrap_or(0.0),
            secagg_degree: m["secagg_degree"].as_u64(),
            secagg_threshold: m["secagg_threshold"].as_u64(),
            ..RoundRecord::default()
        };
        for e in &events {
            match e {
                HostEvent::Announced { round: k, selected } if *k == round => {
                    r.update_values = *selected;
                }
                HostEvent::RoundCost {
                    round: k,
                    cpu_s,
                    process_cpu_s,
                    peak_rss_mib,
                    journal_peak_bytes,
                } if *k == round => {
                    // A restarted host's round: its stages add up over both starts.
                    for (stage, s) in cpu_s {
                        *r.host_cpu_s.entry(stage.clone()).or_default() += s;
                    }
                    r.host_process_cpu_s += process_cpu_s;
                    r.host_peak_rss_mib = r.host_peak_rss_mib.max(*peak_rss_mib);
                    r.journal_peak_bytes = r.journal_peak_bytes.max(*journal_peak_bytes);
                }
                _ => {}
            }
        }
        r.host_cpu_total_s = r.host_cpu_s.values().sum();
        r.host_side_cpu_s = r.host_cpu_total_s;
        for events in fleet.worker_events() {
            // Process CPU since the worker's start at each close: the round's share is
            // the difference from the previous close.
            let mut before = 0.0;
            for e in events {
                if let WorkerEvent::Closed {
                    round: k, cpu_s, ..
                } = e
                {
                    if k == round {
                        r.workers_cpu_s += cpu_s - before;
                        r.worker_cpu_max_s = r.worker_cpu_max_s.max(cpu_s - before);
                    }
                    before = cpu_s;
                }
            }
        }
        r.host_side_cpu_s += r.worker_cpu_max_s;
        for s in &sims {
            if let Some(stats) = s.rounds.get(&round) {
                r.devices.merge(stats);
            }
        }
        let n = fleet.devices.max(1) as f64;
        r.device_cpu_s_per_device = r.devices.device_cpu_s / n;
        let secagg_up: u64 = ["join", "shares", "masked-input", "consistency", "unmask"]
            .iter()
            .filter_map(|k| r.devices.up_bytes.get(*k))
            .sum();
        let secagg_down = r.devices.down_bytes.get("shares").copied().unwrap_or(0);
        r.secagg_bytes_per_device = (secagg_up + secagg_down) as f64 / n;
        rounds.push(r);
    }
    let last = rounds.last().cloned().unwrap_or_default();
    let layout_values = fleet.adapter.layout()?.len();
    Ok(RunRecord {
        devices: fleet.devices,
        dropout: dropouts.rate,
        stages: dropouts.stages.clone(),
        update_values: last.update_values,
        layout_values,
        processes,
        workers: 0,
        host_cpu_s: last.host_cpu_s.clone(),
        host_peak_rss_mib: rounds
            .iter()
            .map(|r| r.host_peak_rss_mib)
            .fold(0.0, f64::max),
        broker_bytes: BTreeMap::from([
            ("up".to_string(), last.devices.up_bytes.clone()),
            ("down".to_string(), last.devices.down_bytes.clone()),
        ]),
        round_s: last.round_s,
        rounds,
        sim_process_cpu_s: sims.iter().map(|s| s.process_cpu_s).sum(),
        sim_peak_rss_mib: sims.iter().map(|s| s.peak_rss_mib).fold(0.0, f64::max),
        link_dropped: sims.iter().map(|s| s.link_dropped).sum(),
        broker_received: broker.0,
        broker_sent: broker.1,
    })
}

/// One simulated scenario, start to end.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Devices.
    pub devices: usize,
    /// Simulator processes.
    pub processes: usize,
    /// Who drops out where.
    pub dropouts: Dropouts,
    /// The adapter.
    pub adapter: Adapter,
    /// The host.
    pub host: HostSettings,
    /// Fold workers the host shards the uploads over (0: it folds them itself).
    pub workers: u32,
    /// Keep the run's folder (fleet, logs, records) instead of deleting it.
    pub keep: bool,
}

/// Runs `scenario` with the binaries in `bins`: enrols the fleet, starts the simulated
/// devices and the host, samples the broker at each round's close, and records the run.
pub fn run(bins: &Path, scenario: &Scenario) -> anyhow::Result<RunRecord> {
    let mut fleet = SimFleet::enrol(bins, scenario.devices, scenario.adapter.clone())?;
    let mut meter = BrokerMeter::start(fleet.broker.addr())?;
    let limit = scenario.host.round_limit() * scenario.host.rounds as u32;
    let mut devices = fleet.devices(
        scenario.processes,
        scenario.host.rounds,
        &scenario.dropouts,
        None,
        limit + Duration::from_secs(60),
    )?;
    let workers = (0..scenario.workers)
        .map(|s| fleet.fold_worker(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut settings = scenario.host.clone();
    if scenario.workers > 0 {
        settings
            .extra
            .extend(["--fold-shards".into(), scenario.workers.to_string()]);
    }
    let mut host = fleet.host(&settings)?;
    let failure = match host.wait(limit + Duration::from_secs(60))? {
        Some(status) if status.success() => None,
        Some(status) => Some(format!("the host exited with {status}")),
        None => Some(format!(
            "the host did not finish {} rounds within {limit:?}",
            scenario.host.rounds
        )),
    };
    if let Some(why) = failure {
        drop((host, devices, workers));
        let dir = if scenario.keep {
            fleet.keep()
        } else {
            fleet.out()
        };
        bail!("{why}: see {}", dir.display());
    }
    for d in &mut devices {
        d.wait(Duration::from_secs(60))?;
    }
    drop(devices);
    drop(workers);
    // Every client is gone: the counters settle within the broker's reporting interval.
    let broker = meter.sample(Duration::from_millis(2500))?;
    let record = record(&fleet, &scenario.dropouts, scenario.processes, broker).map(|mut r| {
        r.workers = scenario.workers;
        r
    });
    if scenario.keep {
        eprintln!("run folder kept: {}", fleet.keep().display());
    }
    record
}
