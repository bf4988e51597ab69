//! `fedshield-host serve`: the host's MQTT driver around [`HostRound`]. It owns the global
//! adapter and the selection history, runs rounds one after the other, publishes each
//! round's global update, writes the PEFT adapter, `metrics.json` and a loss plot after
//! every round, and persists its state so that a restarted host goes on with the next round.

use crate::fleet::FleetDir;
use anyhow::Context;
use fedshield_codec::plot::{LinePlot, Series};
use fedshield_codec::{History, Layout, PruneConfig, apply, decode_values, init_adapter, select};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::DeviceId;
use fedshield_protocol::host::{Deadlines, HostAction, HostRound, RoundResult};
use fedshield_protocol::messages::{EdgeMessage, GlobalPart, RoundConfig, Route, Topics};
use fedshield_protocol::{ProtocolError, decode};
use fedshield_transport::{Incoming, Link, LinkConfig};
use fedshield_wire::compress_if_smaller;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Fleet name (topic level).
    pub fleet: String,
    /// Fleet directory (authority, registry).
    pub fleet_dir: FleetDir,
    /// Broker address.
    pub broker: (String, u16),
    /// Broker credentials.
    pub credentials: Option<(String, String)>,
    /// Largest MQTT packet.
    pub max_packet_bytes: usize,
    /// The adapter layout.
    pub layout: Layout,
    /// LoRA hyper-parameters for the PEFT adapter_config.json: (r, alpha, targets).
    pub peft: (usize, f64, Vec<String>),
    /// Base model name or path recorded in the adapter.
    pub base_model: String,
    /// Rounds to run in all.
    pub rounds: u64,
    /// Pruning.
    pub prune: PruneConfig,
    /// Clip value.
    pub clip: f32,
    /// Local steps per round.
    pub local_steps: usize,
    /// Minimum contributors.
    pub threshold: usize,
    /// Phase deadlines.
    pub deadlines: Deadlines,
    /// Upload chunk size.
    pub chunk_bytes: usize,
    /// Seed of the initial adapter and the masks' exploration.
    pub seed: u64,
    /// Output folder: adapter/, metrics.json, loss.svg, state.bin.
    pub out: PathBuf,
    /// Seconds to wait for the last round's evaluation reports.
    pub report_wait: Duration,
}

/// Per-round metrics, as written to metrics.json.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundMetrics {
    /// The round.
    pub round: u64,
    /// Devices whose update is in the global update (0: the round failed).
    pub contributors: usize,
    /// Mean held-out loss of the round's global adapter, reported by the devices.
    pub eval_loss: Option<f64>,
    /// Encrypted bytes uploaded per contributor.
    pub upload_bytes_per_client: u64,
    /// Bytes of the published global update (each device downloads it once).
    pub download_bytes_per_client: u64,
    /// Wall time of the round.
    pub round_seconds: f64,
    /// Encryption (mean over contributors), aggregation and decryption time.
    pub crypto_seconds: f64,
    /// Host time in the round's state machine (signatures, secure aggregation, folding
    /// ciphertexts, decryption).
    pub host_crypto_seconds: f64,
    /// Devices' mean encryption time.
    pub encrypt_seconds: Option<f64>,
    /// Why the round failed, if it did.
    pub failure: Option<String>,
    #[serde(skip)]
    reports: BTreeMap<DeviceId, (f64, f64)>,
}

/// What survives a host restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct HostState {
    /// Rounds completed or failed (interrupted rounds do not count).
    round: u64,
    /// The last round number announced. A host killed mid-round comes back with the next
    /// number: devices never answer a round number twice, and the interrupted round's
    /// devices settle their uploads as not counted (their residual keeps everything).
    announced: u64,
    global: Vec<f32>,
    history: History,
    metrics: Vec<RoundMetrics>,
    layout_digest: [u8; 32],
}

impl HostState {
    /// The number of the last round that finished or failed.
    fn round_number(&self) -> u64 {
        self.metrics.last().map_or(0, |m| m.round)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

struct Host {
    cfg: ServeConfig,
    topics: Topics,
    link: Link,
    state: HostState,
    encoding: FixedPoint,
}

/// Runs the federation; returns the paths of the adapter, the plot and metrics.json.
pub fn serve(cfg: ServeConfig) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let topics = Topics::new(&cfg.fleet)?;
    std::fs::create_dir_all(&cfg.out)?;
    let state_path = cfg.out.join("state.bin");
    let state = match std::fs::read(&state_path) {
        Ok(bytes) => {
            let s: HostState = postcard::from_bytes(&bytes).context("reading state.bin")?;
            anyhow::ensure!(
                s.layout_digest == cfg.layout.digest(),
                "{} belongs to another adapter layout",
                state_path.display()
            );
            tracing::info!(
                "resuming after round {} from {}",
                s.round,
                state_path.display()
            );
            s
        }
        Err(_) => HostState {
            round: 0,
            announced: 0,
            global: init_adapter(&cfg.layout, cfg.seed),
            history: History::new(cfg.layout.len()),
            metrics: Vec::new(),
            layout_digest: cfg.layout.digest(),
        },
    };
    let link = Link::start(LinkConfig {
        host: cfg.broker.0.clone(),
        port: cfg.broker.1,
        client_id: format!("fedshield-host-{}", cfg.fleet),
        credentials: cfg.credentials.clone(),
        max_packet_bytes: cfg.max_packet_bytes,
        subscriptions: vec![topics.all_up()],
        last_will: None,
        birth: None,
    })?;
    let encoding = FixedPoint::new(cfg.clip)?;
    let mut host = Host {
        cfg,
        topics,
        link,
        state,
        encoding,
    };
    host.wait_connected()?;
    while host.state.round < host.cfg.rounds {
        host.run_round()?;
    }
    host.collect_reports()?;
    let paths = host.write_outputs()?;
    host.link.disconnect();
    Ok(paths)
}

impl Host {
    fn wait_connected(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.link.recv(Duration::from_millis(200))? {
                Some(Incoming::Connected) => return Ok(()),
                Some(Incoming::Disconnected(e)) => tracing::warn!("broker: {e}"),
                _ => {}
            }
        }
        anyhow::bail!(
            "no connection to the broker at {}:{} within 30 s",
            self.cfg.broker.0,
            self.cfg.broker.1
        )
    }

    fn round_config(&self, round: u64, selected: usize) -> RoundConfig {
        RoundConfig {
            round,
            mask_seed: ((mix(self.cfg.seed, round) as u128) << 64) | rand::random::<u64>() as u128,
            select_seed: mix(self.cfg.seed, round),
            prune: self.cfg.prune.clone(),
            clip: self.cfg.clip,
            scale_log2: self.encoding.scale_log2,
            layout_digest: self.cfg.layout.digest(),
            selected,
            history_round: self.state.history.round(),
            init_seed: self.cfg.seed,
            local_steps: self.cfg.local_steps,
            threshold: self.cfg.threshold,
            chunk_bytes: self.cfg.chunk_bytes,
        }
    }

    /// Handles an incoming message outside the round machine (evaluation reports) or
    /// returns it for the round.
    fn route(&mut self, topic: &str, payload: &[u8]) -> Option<(DeviceId, EdgeMessage)> {
        let Some(Route::Up(device)) = self.topics.route(topic) else {
            tracing::warn!("ignored a message on {topic}");
            return None;
        };
        let msg: EdgeMessage = match decode(payload, self.cfg.max_packet_bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("refused a message from {device}: {e}");
                return None;
            }
        };
        if let EdgeMessage::Evaluated {
            round,
            eval_loss,
            encrypt_seconds,
        } = msg
        {
            let entry = self.state.metrics.iter_mut().find(|m| m.round == round);
            match entry {
                Some(m) if eval_loss.is_finite() && encrypt_seconds.is_finite() => {
                    tracing::info!(
                        "round {round}: {device} reports held-out loss {eval_loss:.4} of the global adapter (encrypted in {encrypt_seconds:.2} s)"
                    );
                    m.reports.insert(device, (eval_loss, encrypt_seconds));
                    let n = m.reports.len() as f64;
                    m.eval_loss = Some(m.reports.values().map(|r| r.0).sum::<f64>() / n);
                    let enc = m.reports.values().map(|r| r.1).sum::<f64>() / n;
                    m.encrypt_seconds = Some(enc);
                    m.crypto_seconds = m.host_crypto_seconds + enc;
                }
                _ => tracing::warn!("refused an evaluation report of round {round} from {device}"),
            }
            return None;
        }
        Some((device, msg))
    }

    fn execute(
        &self,
        actions: Vec<HostAction>,
    ) -> anyhow::Result<Option<Result<RoundResult, String>>> {
        let mut outcome = None;
        for a in actions {
            match a {
                HostAction::Broadcast(state) => {
                    self.link
                        .publish(&self.topics.round(), postcard::to_stdvec(&state)?, true)?;
                }
                HostAction::Deliver(device, delivery) => {
                    self.link.publish(
                        &self.topics.down(&device),
                        postcard::to_stdvec(&delivery)?,
                        true,
                    )?;
                }
                HostAction::Finished(r) => outcome = Some(Ok(r)),
                HostAction::Failed(why) => outcome = Some(Err(why)),
            }
        }
        Ok(outcome)
    }

    fn run_round(&mut self) -> anyhow::Result<()> {
        let round = self.state.announced + 1;
        if self.state.announced > self.state.round_number() {
            tracing::warn!(
                "round {} was interrupted by a host restart; starting round {round}",
                self.state.announced
            );
            self.state.metrics.push(RoundMetrics {
                round: self.state.announced,
                failure: Some("interrupted by a host restart".into()),
                ..RoundMetrics::default()
            });
        }
        self.state.announced = round;
        self.save_state()?;
        let start = Instant::now();
        let selection = select(
            &self.cfg.layout,
            &self.cfg.prune,
            &self.state.history,
            round,
            mix(self.cfg.seed, round),
        )?;
        let config = self.round_config(round, selection.len());
        tracing::info!(
            "round {round}: announcing ({} of {} values selected)",
            selection.len(),
            self.cfg.layout.len()
        );
        let registry = self.cfg.fleet_dir.registry()?;
        let (mut machine, actions) =
            HostRound::start(config, registry, self.cfg.deadlines, now_ms())?;
        let mut host_time = Duration::ZERO;
        let mut outcome = self.execute(actions)?;
        while outcome.is_none() {
            let incoming = self.link.recv(Duration::from_millis(200))?;
            let t = Instant::now();
            let actions = match incoming {
                Some(Incoming::Message { topic, payload }) => match self.route(&topic, &payload) {
                    Some((device, msg)) => match machine.on_message(&device, msg, now_ms()) {
                        Ok(a) => a,
                        Err(e) => {
                            log_refusal(&device, &e);
                            vec![]
                        }
                    },
                    None => vec![],
                },
                Some(Incoming::Disconnected(e)) => {
                    tracing::warn!("broker connection lost ({e}); reconnecting");
                    vec![]
                }
                Some(Incoming::Connected) => vec![],
                None => machine.on_tick(now_ms()),
            };
            host_time += t.elapsed();
            outcome = self.execute(actions)?;
        }
        let mut metrics = RoundMetrics {
            round,
            round_seconds: 0.0,
            ..RoundMetrics::default()
        };
        match outcome.expect("loop ends with an outcome") {
            Ok(result) => {
                let t = Instant::now();
                let values = decode_values(
                    &selection,
                    &result.sums,
                    &self.encoding,
                    result.total_weight,
                )?;
                apply(&mut self.state.global, &selection, &values)?;
                self.state.history.observe(&selection, &values)?;
                host_time += t.elapsed();
                // zstd pays on f32 values (unlike on ciphertext bodies): each part travels
                // in a `Compressed` envelope, raw when compression would not shrink it.
                let (mut raw, mut wire) = (0usize, 0usize);
                for part in
                    GlobalPart::split(round, &result.contributors, &values, self.cfg.chunk_bytes)
                {
                    let bytes = postcard::to_stdvec(&part)?;
                    let payload = postcard::to_stdvec(&compress_if_smaller(&bytes))?;
                    raw += bytes.len();
                    wire += payload.len();
                    self.link
                        .publish(&self.topics.global(part.index), payload, true)?;
                }
                metrics.download_bytes_per_client = wire as u64;
                tracing::info!(
                    "round {round}: global update published, {wire} bytes ({raw} before zstd)"
                );
                metrics.contributors = result.contributors.len();
                metrics.upload_bytes_per_client = result.upload_bytes;
                tracing::info!(
                    "round {round}: {} contributors ({}), {} bytes uploaded each; previous global's loss reported at join: {}",
                    result.contributors.len(),
                    result
                        .contributors
                        .iter()
                        .map(|d| d.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    result.upload_bytes,
                    result
                        .eval_loss
                        .map(|l| format!("{l:.4}"))
                        .unwrap_or_else(|| "-".into())
                );
            }
            Err(why) => {
                tracing::warn!("round {round} failed: {why}");
                metrics.failure = Some(why);
            }
        }
        metrics.host_crypto_seconds = host_time.as_secs_f64();
        metrics.crypto_seconds = metrics.host_crypto_seconds;
        metrics.round_seconds = start.elapsed().as_secs_f64();
        self.state.metrics.push(metrics);
        self.state.round += 1;
        self.write_outputs()?;
        Ok(())
    }

    fn save_state(&self) -> anyhow::Result<()> {
        let tmp = self.cfg.out.join("state.bin.tmp");
        std::fs::write(&tmp, postcard::to_stdvec(&self.state)?)?;
        std::fs::rename(&tmp, self.cfg.out.join("state.bin"))?;
        Ok(())
    }

    /// Waits (at most `report_wait`) for every contributor's evaluation of the last round.
    fn collect_reports(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.cfg.report_wait;
        while Instant::now() < deadline {
            let done = self
                .state
                .metrics
                .last()
                .is_none_or(|m| m.reports.len() >= m.contributors);
            if done {
                break;
            }
            if let Some(Incoming::Message { topic, payload }) =
                self.link.recv(Duration::from_millis(200))?
                && let Some((device, _)) = self.route(&topic, &payload)
            {
                tracing::debug!("late round message from {device} ignored");
            }
        }
        Ok(())
    }

    /// Writes adapter/, metrics.json, loss.svg and state.bin.
    fn write_outputs(&self) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        let out = &self.cfg.out;
        let adapter = out.join("adapter");
        std::fs::create_dir_all(&adapter)?;
        let tensors = fedshield_codec::to_safetensors(&self.cfg.layout, &self.state.global)?;
        std::fs::write(adapter.join("adapter_model.safetensors"), tensors)?;
        let (r, alpha, targets) = &self.cfg.peft;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.cfg.base_model,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.05,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "fedshield_round": self.state.round,
        });
        std::fs::write(
            adapter.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        let metrics_path = out.join("metrics.json");
        std::fs::write(
            &metrics_path,
            serde_json::to_string_pretty(&serde_json::json!({
                "fleet": self.cfg.fleet,
                "values": self.cfg.layout.len(),
                "prune": self.cfg.prune,
                "rounds": self.state.metrics,
            }))?,
        )?;
        let plot_path = out.join("loss.svg");
        let plot = LinePlot {
            title: format!(
                "FedShield fleet {}: held-out loss per round",
                self.cfg.fleet
            ),
            x_label: "round".into(),
            y_label: "held-out loss (devices' mean)".into(),
            series: vec![Series {
                name: "global adapter".into(),
                points: self
                    .state
                    .metrics
                    .iter()
                    .filter_map(|m| m.eval_loss.map(|l| (m.round as f64, l)))
                    .collect(),
            }],
        };
        std::fs::write(&plot_path, plot.to_svg())?;
        self.save_state()?;
        Ok((adapter, plot_path, metrics_path))
    }
}

fn log_refusal(device: &DeviceId, e: &ProtocolError) {
    tracing::warn!("refused a message from {device}: {e}");
}
