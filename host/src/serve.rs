//! `fedshield-host serve`: the host's MQTT driver around [`HostRound`]. It owns the global
//! adapter and the selection history, runs rounds one after the other, publishes each
//! round's global update, writes the PEFT adapter, `metrics.json` and a loss plot after
//! every round, and persists its state so that a restarted host goes on with the next round.

use crate::fleet::FleetDir;
use anyhow::Context;
use fedshield_codec::plot::{LinePlot, Series};
use fedshield_codec::{History, Layout, PruneConfig, apply, decode_values, init_adapter, select};
use fedshield_crypto::encoding::{DEFAULT_SCALE_LOG2, FixedPoint};
use fedshield_crypto::identity::{DeviceId, Identity, Registry};
use fedshield_crypto::params::{BodyBits, finest_scale, narrowest_body};
use fedshield_protocol::host::{
    Deadlines, HostAction, HostRound, RoundResult, expected_update_bytes,
};
use fedshield_protocol::journal::{self, Entry, Replayed};
use fedshield_protocol::messages::{
    DownMessage, EdgeMessage, GlobalPart, RoundConfig, Route, Snapshot, Topics,
};
use fedshield_protocol::signed::HostSigned;
use fedshield_protocol::{ProtocolError, decode};
use fedshield_transport::{BrokerArgs, Incoming, Link};
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
    /// Broker address, credentials, TLS and packet limit.
    pub broker: BrokerArgs,
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
    /// Width of the ciphertext bodies; `None`: the narrowest that suits the enrolled fleet
    /// (`fedshield_crypto::params::narrowest_body`).
    pub body_bits: Option<BodyBits>,
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
    /// Where to write each round's decrypted sums (`round-{r}.json`), for audits and the
    /// end-to-end tests; the host learns them anyway (they are the global update).
    pub audit_dir: Option<PathBuf>,
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
    /// The devices' signed, accepted evaluation reports of the round's global adapter.
    #[serde(default)]
    pub reports: BTreeMap<DeviceId, Report>,
}

/// One device's accepted evaluation report.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Held-out loss of the global adapter.
    pub eval_loss: f64,
    /// Seconds the device spent encrypting its update.
    pub encrypt_seconds: f64,
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
    /// The last round's global update parts as published (re-published after every
    /// reconnection: a restarted broker has lost its retained messages).
    last_global: Vec<Vec<u8>>,
    /// Contributors of the most recent completed rounds (for the snapshot).
    recent: Vec<(u64, Vec<DeviceId>)>,
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
    /// The host's certified identity: signs every downlink message.
    signer: Identity,
    /// The registry as of the current round (checks the devices' evaluation reports).
    registry: Registry,
    state: HostState,
    /// The published snapshot's parts (rebuilt from the state after every round).
    snapshot: Vec<Vec<u8>>,
}

/// Runs the federation; returns the paths of the adapter, the plot and metrics.json.
pub fn serve(cfg: ServeConfig) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let topics = Topics::new(&cfg.fleet)?;
    std::fs::create_dir_all(&cfg.out)?;
    let state_path = cfg.out.join("state.bin");
    let (signer, _) = cfg.fleet_dir.host(&cfg.fleet)?;
    let registry = cfg.fleet_dir.registry()?;
    let state = match fedshield_store::read_existing(&state_path)? {
        Some(bytes) => {
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
        None => HostState {
            round: 0,
            announced: 0,
            global: init_adapter(&cfg.layout, cfg.seed),
            history: History::new(cfg.layout.len()),
            metrics: Vec::new(),
            layout_digest: cfg.layout.digest(),
            last_global: Vec::new(),
            recent: Vec::new(),
        },
    };
    let link = Link::start(cfg.broker.link_config(
        format!("fedshield-host-{}", cfg.fleet),
        vec![topics.all_up()],
        None,
        None,
    )?)?;
    // Checked here so that a bad clip stops the host before any round.
    FixedPoint::new(cfg.clip)?;
    let mut host = Host {
        cfg,
        topics,
        link,
        signer,
        registry,
        state,
        snapshot: Vec::new(),
    };
    host.build_snapshot()?;
    host.wait_connected()?;
    host.publish_global()?;
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
            "no connection to the broker at {} within 30 s",
            self.cfg.broker.broker
        )
    }

    /// The configuration of round `round` for a fleet of `enrolled` devices: the fixed-point
    /// scale is the finest at which the body width can sum them all (the host refuses joins
    /// beyond the width's cap, so a larger fleet gets the default scale and the cap).
    fn round_config(&self, round: u64, selected: usize, enrolled: usize) -> RoundConfig {
        let body_bits = self
            .cfg
            .body_bits
            .or_else(|| narrowest_body(enrolled))
            .unwrap_or(BodyBits::FULL);
        let scale_log2 = finest_scale(body_bits, enrolled.max(1)).unwrap_or(DEFAULT_SCALE_LOG2);
        RoundConfig {
            round,
            mask_seed: ((mix(self.cfg.seed, round) as u128) << 64) | rand::random::<u64>() as u128,
            select_seed: mix(self.cfg.seed, round),
            prune: self.cfg.prune.clone(),
            clip: self.cfg.clip,
            scale_log2,
            body_bits,
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
        let msg: EdgeMessage = match decode(payload, self.cfg.broker.max_packet_bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("refused a message from {device}: {e}");
                return None;
            }
        };
        if let EdgeMessage::Evaluated(report) = msg {
            let round = report.round;
            let verified = self
                .registry
                .enrolment(&device)
                .map_err(ProtocolError::from)
                .and_then(|e| {
                    report
                        .verify(&device, &e.public_key)
                        .map_err(ProtocolError::from)
                });
            let entry = self.state.metrics.iter_mut().find(|m| m.round == round);
            match (verified, entry) {
                (Err(e), _) => log_refusal(&device, &e),
                (Ok(()), None) => log_refusal(
                    &device,
                    &ProtocolError::Refused(format!(
                        "evaluation report of round {round}, which has not finished"
                    )),
                ),
                (Ok(()), Some(m)) => {
                    let (eval_loss, encrypt_seconds) = (report.eval_loss, report.encrypt_seconds);
                    tracing::info!(
                        "round {round}: {device} reports held-out loss {eval_loss:.4} of the global adapter (encrypted in {encrypt_seconds:.2} s)"
                    );
                    m.reports.insert(
                        device,
                        Report {
                            eval_loss,
                            encrypt_seconds,
                        },
                    );
                    let n = m.reports.len() as f64;
                    m.eval_loss = Some(m.reports.values().map(|r| r.eval_loss).sum::<f64>() / n);
                    let enc = m.reports.values().map(|r| r.encrypt_seconds).sum::<f64>() / n;
                    m.encrypt_seconds = Some(enc);
                    m.crypto_seconds = m.host_crypto_seconds + enc;
                }
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
        let deliveries = actions
            .iter()
            .filter(|a| matches!(a, HostAction::Deliver(..)))
            .count();
        if deliveries > 0 {
            tracing::info!("share deliveries published to {deliveries} members; uploads open");
        }
        for a in actions {
            match a {
                HostAction::Broadcast(state) => {
                    let topic = self.topics.round();
                    let sealed = HostSigned::seal_message(&self.signer, &topic, &state);
                    self.link.publish(&topic, sealed, true)?;
                }
                HostAction::Deliver(device, delivery) => {
                    let topic = self.topics.down(&device);
                    let sealed = HostSigned::seal_message(
                        &self.signer,
                        &topic,
                        &DownMessage::Shares(delivery),
                    );
                    self.link.publish(&topic, sealed, true)?;
                }
                HostAction::RefuseUpload {
                    device,
                    round,
                    reason,
                } => {
                    tracing::warn!(
                        "round {round}: dropped the upload of {device} ({reason}); told the device"
                    );
                    let topic = self.topics.down(&device);
                    let notice = DownMessage::UploadRefused { round, reason };
                    let sealed = HostSigned::seal_message(&self.signer, &topic, &notice);
                    self.link.publish(&topic, sealed, false)?;
                }
                HostAction::Finished(r) => outcome = Some(Ok(r)),
                HostAction::Failed(why) => outcome = Some(Err(why)),
            }
        }
        Ok(outcome)
    }

    fn journal_path(&self) -> PathBuf {
        self.cfg.out.join("round.journal")
    }

    /// Rebuilds round `self.state.announced` from its journal, if there is one that replays.
    fn resume(&self) -> Option<(Replayed, u64, JournalFile)> {
        let path = self.journal_path();
        let bytes = std::fs::read(&path).ok()?;
        let attempt = || -> anyhow::Result<(Replayed, u64, JournalFile)> {
            let (entries, valid) = journal::read(&bytes)?;
            let Some(Entry::Start { config, now, .. }) = entries.first() else {
                anyhow::bail!("the journal has no start record");
            };
            anyhow::ensure!(
                config.round == self.state.announced,
                "the journal is of round {}",
                config.round
            );
            let started = *now;
            let replayed = journal::replay(&entries, self.cfg.fleet_dir.registry()?)?;
            Ok((replayed, started, JournalFile::reopen(&path, valid as u64)?))
        };
        match attempt() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    "round {} cannot be resumed from {}: {e:#}",
                    self.state.announced,
                    path.display()
                );
                None
            }
        }
    }

    /// Runs one round to its end: the interrupted one when its journal replays, else the
    /// next one.
    fn run_round(&mut self) -> anyhow::Result<()> {
        let resumed = if self.state.announced > self.state.round_number() {
            self.resume()
        } else {
            None
        };
        // The round's mask: computed once (the new round needs its length for the config; a
        // resumed round recomputes it from the journalled config below).
        let mut mask = None;
        let (mut machine, mut journal, started_ms, mut outcome) = match resumed {
            Some((replayed, started, journal)) => {
                tracing::info!(
                    "round {}: resumed after a host restart ({} journalled messages replayed)",
                    self.state.announced,
                    replayed.messages
                );
                let mut machine = replayed.round;
                let mut outcome = replayed.outcome.map(|a| match a {
                    HostAction::Finished(r) => Ok(r),
                    HostAction::Failed(why) => Err(why),
                    _ => unreachable!("replay returns outcomes only"),
                });
                let mut journal = journal;
                if outcome.is_none() {
                    journal.append(&Entry::Republish)?;
                    let actions = machine.republish();
                    outcome = self.execute(actions)?;
                }
                (machine, journal, started, outcome)
            }
            None => {
                if self.state.announced > self.state.round_number() {
                    tracing::warn!(
                        "round {} was interrupted by a host restart; starting round {}",
                        self.state.announced,
                        self.state.announced + 1
                    );
                    self.state.metrics.push(RoundMetrics {
                        round: self.state.announced,
                        failure: Some("interrupted by a host restart".into()),
                        ..RoundMetrics::default()
                    });
                }
                let round = self.state.announced + 1;
                self.state.announced = round;
                self.save_state()?;
                let selection = select(
                    &self.cfg.layout,
                    &self.cfg.prune,
                    &self.state.history,
                    round,
                    mix(self.cfg.seed, round),
                )?;
                let selected = selection.len();
                mask = Some(selection);
                let registry = self.cfg.fleet_dir.registry()?;
                self.registry = registry.clone();
                let config = self.round_config(round, selected, registry.len());
                tracing::info!(
                    "round {round}: announcing ({selected} of {} values selected, {}-bit bodies: {:.3} bytes per parameter)",
                    self.cfg.layout.len(),
                    config.body_bits,
                    expected_update_bytes(selected, config.body_bits) as f64
                        / self.cfg.layout.len() as f64
                );
                let now = now_ms();
                let journal = JournalFile::create(
                    &self.journal_path(),
                    &Entry::Start {
                        config: config.clone(),
                        deadlines: self.cfg.deadlines,
                        now,
                    },
                )?;
                let (machine, actions) =
                    HostRound::start(config, registry, self.cfg.deadlines, now)?;
                let outcome = self.execute(actions)?;
                journal.sync()?;
                (machine, journal, now, outcome)
            }
        };
        let config = machine.config().clone();
        let round = config.round;
        let selection = match mask {
            Some(s) => s,
            None => select(
                &self.cfg.layout,
                &config.prune,
                &self.state.history,
                round,
                config.select_seed,
            )?,
        };
        anyhow::ensure!(
            selection.len() == config.selected,
            "round {round}: the selection has {} values, the round {}",
            selection.len(),
            config.selected
        );
        let mut host_time = Duration::ZERO;
        while outcome.is_none() {
            let incoming = self.link.recv(Duration::from_millis(200))?;
            let t = Instant::now();
            // Journal writes are disk I/O, not crypto: kept out of the host's crypto time.
            let mut io = Duration::ZERO;
            let mut actions = match incoming {
                Some(Incoming::Message { topic, payload }) => match self.route(&topic, &payload) {
                    Some((device, msg)) => {
                        let now = now_ms();
                        match machine.on_message(&device, msg.clone(), now) {
                            Ok(a) => {
                                let w = Instant::now();
                                journal.append(&Entry::Message {
                                    from: device,
                                    message: msg,
                                    now,
                                })?;
                                io += w.elapsed();
                                a
                            }
                            Err(e) => {
                                log_refusal(&device, &e);
                                vec![]
                            }
                        }
                    }
                    None => vec![],
                },
                Some(Incoming::Disconnected(e)) => {
                    tracing::warn!("broker connection lost ({e}); reconnecting");
                    vec![]
                }
                Some(Incoming::Connected) => {
                    tracing::info!(
                        "round {round}: reconnected to the broker; re-publishing the round"
                    );
                    self.publish_global()?;
                    journal.append(&Entry::Republish)?;
                    machine.republish()
                }
                None => vec![],
            };
            let now = now_ms();
            if machine.due(now) {
                let w = Instant::now();
                journal.append(&Entry::Tick { now })?;
                journal.sync()?;
                io += w.elapsed();
                actions.extend(machine.on_tick(now));
            }
            host_time += t.elapsed().saturating_sub(io);
            outcome = self.execute(actions)?;
        }
        // The share deliveries are spent: delete the retained copies (an empty retained
        // publish), so that no device finds another round's delivery on connecting.
        for device in machine.delivered_to() {
            self.link
                .publish(&self.topics.down(device), Vec::new(), true)?;
        }
        let mut metrics = RoundMetrics {
            round,
            round_seconds: 0.0,
            ..RoundMetrics::default()
        };
        match outcome.expect("loop ends with an outcome") {
            Ok(result) => {
                let t = Instant::now();
                let encoding = FixedPoint::with_scale(config.clip, config.scale_log2)?;
                let values =
                    decode_values(&selection, &result.sums, &encoding, result.total_weight)?;
                apply(&mut self.state.global, &selection, &values)?;
                self.state.history.observe(&selection, &values)?;
                host_time += t.elapsed();
                if let Some(dir) = &self.cfg.audit_dir {
                    write_audit(dir, &result, config.body_bits)?;
                }
                // zstd pays on f32 values (unlike on ciphertext bodies): each part travels
                // in a `Compressed` envelope, raw when compression would not shrink it.
                let mut raw = 0usize;
                self.state.last_global.clear();
                for part in
                    GlobalPart::split(round, &result.contributors, &values, self.cfg.chunk_bytes)
                {
                    let bytes = postcard::to_stdvec(&part)?;
                    raw += bytes.len();
                    let topic = self.topics.global(part.index);
                    let compressed = postcard::to_stdvec(&compress_if_smaller(&bytes))?;
                    self.state
                        .last_global
                        .push(HostSigned::seal(&self.signer, &topic, compressed));
                }
                self.state.recent.push((round, result.contributors.clone()));
                let excess = self.state.recent.len().saturating_sub(Snapshot::RECENT);
                self.state.recent.drain(..excess);
                self.build_snapshot()?;
                self.publish_global()?;
                let wire: usize = self.state.last_global.iter().map(Vec::len).sum();
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
        metrics.round_seconds = now_ms().saturating_sub(started_ms) as f64 / 1000.0;
        self.state.metrics.push(metrics);
        self.state.round += 1;
        self.write_outputs()?;
        // The round is in state.bin now: its journal is done with.
        drop(journal);
        std::fs::remove_file(self.journal_path())?;
        Ok(())
    }

    /// Publishes (retained) the last round's global update parts and the fleet snapshot,
    /// if any.
    fn publish_global(&self) -> anyhow::Result<()> {
        for (i, payload) in self.state.last_global.iter().enumerate() {
            self.link
                .publish(&self.topics.global(i as u32), payload.clone(), true)?;
        }
        for (i, payload) in self.snapshot.iter().enumerate() {
            self.link
                .publish(&self.topics.snapshot(i as u32), payload.clone(), true)?;
        }
        Ok(())
    }

    /// Rebuilds the snapshot's parts from the state (none before the first round).
    fn build_snapshot(&mut self) -> anyhow::Result<()> {
        if self.state.history.round() == 0 {
            return Ok(());
        }
        let snapshot = Snapshot {
            round: self.state.history.round(),
            global: self.state.global.clone(),
            history: self.state.history.clone(),
            recent: self.state.recent.clone(),
        };
        self.snapshot = snapshot
            .split(self.cfg.chunk_bytes)
            .iter()
            .map(|part| {
                let topic = self.topics.snapshot(part.index);
                HostSigned::seal_message(&self.signer, &topic, part)
            })
            .collect();
        let bytes: usize = self.snapshot.iter().map(Vec::len).sum();
        tracing::info!(
            "snapshot of round {} for devices catching up: {bytes} bytes in {} parts",
            snapshot.round,
            self.snapshot.len()
        );
        Ok(())
    }

    fn save_state(&self) -> anyhow::Result<()> {
        fedshield_store::write_atomic(
            &self.cfg.out.join("state.bin"),
            &postcard::to_stdvec(&self.state)?,
            fedshield_store::Access::Private,
        )?;
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
            match self.link.recv(Duration::from_millis(200))? {
                Some(Incoming::Message { topic, payload }) => {
                    if let Some((device, _)) = self.route(&topic, &payload) {
                        tracing::debug!("late round message from {device} ignored");
                    }
                }
                Some(Incoming::Connected) => self.publish_global()?,
                _ => {}
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

/// The round journal on disk (see `fedshield_protocol::journal`). Each record is one
/// `write` to the kernel, so a killed host loses at most the record being written (a torn
/// tail, ignored on reading); phase changes are also fsynced.
struct JournalFile(std::fs::File);

impl JournalFile {
    fn create(path: &std::path::Path, start: &Entry) -> anyhow::Result<Self> {
        // Owner-only, like the device key files: it holds the round's uploads.
        let mut file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut file, &start.to_record())?;
        Ok(Self(file))
    }

    /// Opens a journal for appending after its first `valid` bytes (a torn tail is cut).
    fn reopen(path: &std::path::Path, valid: u64) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(valid)?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        Ok(Self(file))
    }

    fn append(&mut self, entry: &Entry) -> anyhow::Result<()> {
        std::io::Write::write_all(&mut self.0, &entry.to_record()).context("writing the journal")
    }

    fn sync(&self) -> anyhow::Result<()> {
        self.0.sync_data().context("syncing the journal")
    }
}

/// Writes a round's decrypted sums and contributors to `dir/round-{r}.json`.
fn write_audit(
    dir: &std::path::Path,
    result: &RoundResult,
    body_bits: BodyBits,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("round-{}.json", result.round));
    std::fs::write(
        &path,
        serde_json::to_string(&serde_json::json!({
            "round": result.round,
            "contributors": result.contributors,
            "total_weight": result.total_weight,
            "body_bits": body_bits,
            "sums": result.sums,
        }))?,
    )
    .with_context(|| format!("writing {}", path.display()))
}

fn log_refusal(device: &DeviceId, e: &ProtocolError) {
    tracing::warn!("refused a message from {device}: {e}");
}
