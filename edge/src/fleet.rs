//! `fedshield-edge run`'s engine: one device of a fleet. Around the protocol's
//! [`EdgeSession`] it trains the local adapter each round (libtorch), encodes the delta with
//! the round's public mask and error feedback, encrypts it under a fresh key, applies each
//! published global update and reports its held-out loss. The MQTT link is the driver's.

use crate::llama::Llama;
use crate::lora::Lora;
use crate::sft::{LocalRun, Sequence, train_local};
use crate::train::{Batch, TrainConfig, Trainer, evaluate};
use fedshield_codec::{
    ErrorFeedback, History, Layout, Prepared, Selection, apply, init_adapter, select,
};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::Identity;
use fedshield_crypto::packed::{ClientKey, Encryptor, MaskSeed};
use fedshield_protocol::ProtocolError;
use fedshield_protocol::edge::{EdgeAction, EdgeIdentity, EdgeSession};
use fedshield_protocol::messages::{
    DownMessage, EdgeMessage, GlobalAssembler, GlobalPart, Phase, RoundConfig, RoundState,
    Snapshot, SnapshotAssembler, SnapshotPart,
};
use fedshield_protocol::signed::{Evaluation, MAX_REPORTED_LOSS, check_value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;
use tfhe::core_crypto::seeders::new_seeder;

/// What the device trains with.
pub struct Device<'a> {
    /// The base model.
    pub model: &'a Llama,
    /// The adapter (its values are the global adapter between rounds).
    pub lora: Lora,
    /// Local training data.
    pub train: Vec<Sequence>,
    /// Held-out batches.
    pub eval: Vec<Batch>,
    /// Learning rate.
    pub lr: f64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Padding token.
    pub pad: u32,
    /// Seed of data order and dropout.
    pub seed: u64,
}

/// One device's federation state.
pub struct FleetClient<'a> {
    device: Device<'a>,
    layout: Layout,
    session: EdgeSession,
    global: Vec<f32>,
    history: History,
    feedback: ErrorFeedback,
    prepared: Option<Prepared>,
    configs: BTreeMap<u64, RoundConfig>,
    assembler: GlobalAssembler,
    waiting: Option<(RoundConfig, f64)>,
    /// A round to train as soon as the driver has published what came before it (the
    /// round's shares must leave before minutes of training, or the share phase closes
    /// without this device): see [`FleetClient::train_ready`].
    ready: Option<(RoundConfig, f64)>,
    eval_loss: Option<f64>,
    encrypt_seconds: BTreeMap<u64, f64>,
    rng: rand::rngs::ThreadRng,
    init_seed: Option<u64>,
    id: String,
    /// Signs this device's evaluation reports.
    signer: Identity,
    audit_dir: Option<std::path::PathBuf>,
    state_path: Option<std::path::PathBuf>,
    /// The round of an upload restored from the state file, still to settle.
    restored_pending: Option<u64>,
    /// Behind the fleet by more than the retained global update can fix: the driver
    /// subscribes to the snapshot while this is set.
    needs_snapshot: bool,
    snapshot: SnapshotAssembler,
}

/// What a device keeps on disk between runs (`--state`): enough to go on after a restart
/// without losing its residual or counting an update twice. Written atomically (temporary
/// file + rename) whenever one of these changes: a global update applied, an upload
/// prepared, a round settled.
/// Borrowed when written (no copy of the ~100 MB it holds for SmolLM2), owned when read.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted<'a> {
    device: Cow<'a, str>,
    layout_digest: [u8; 32],
    init_seed: Option<u64>,
    global: Cow<'a, [f32]>,
    history: Cow<'a, History>,
    feedback: Cow<'a, ErrorFeedback>,
    /// An upload whose round's outcome was not known yet: settled on restart from the
    /// round's retained outcome or its global update's contributor list.
    pending: Option<Cow<'a, Prepared>>,
    eval_loss: Option<f64>,
}

/// What a call did, for the device's log (lines for people) and its event file
/// (structured [`Event`]s for tools and tests).
#[derive(Debug, Default)]
pub struct Log {
    /// Lines for the log.
    pub lines: Vec<String>,
    /// Events.
    pub events: Vec<Event>,
}

impl Log {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a line.
    pub fn push(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// Records a refused message (a line and an event).
    pub fn refused(&mut self, source: &str, error: &ProtocolError) {
        self.push(format!("{source}: refused: {error}"));
        self.events.push(Event::Refused {
            source: source.to_string(),
            kind: error.kind().to_string(),
            detail: error.to_string(),
        });
    }
}

/// Something a device did or refused, as one line of JSON in its event file
/// (`fedshield-edge run --events FILE`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A message refused: where it came from (a topic, or the state machine's input), the
    /// refusal's stable kind (`ProtocolError::kind`) and its text.
    Refused {
        /// Topic or input.
        source: String,
        /// `ProtocolError::kind`.
        kind: String,
        /// The error's text.
        detail: String,
    },
    /// An upload encrypted for `round` under `weight` (the weight this device verified).
    Encrypted {
        /// The round.
        round: u64,
        /// The FedAvg weight encoded with.
        weight: f64,
    },
    /// A round settled for this device.
    Settled {
        /// The round.
        round: u64,
        /// Whether its update counted.
        counted: bool,
    },
    /// A global update applied and evaluated (the signed report that went to the host).
    Evaluated {
        /// The round.
        round: u64,
        /// Held-out loss.
        eval_loss: f64,
    },
}

impl<'a> FleetClient<'a> {
    /// A client for `device` with identity `me`.
    pub fn new(device: Device<'a>, me: EdgeIdentity) -> Result<Self, crate::EdgeError> {
        let layout = device
            .lora
            .layout()
            .map_err(|e| crate::EdgeError::Shape(e.to_string()))?;
        let len = layout.len();
        Ok(Self {
            id: me.id.0.clone(),
            signer: Identity::from_secret(me.secret),
            audit_dir: None,
            state_path: None,
            restored_pending: None,
            needs_snapshot: false,
            snapshot: SnapshotAssembler::default(),
            session: EdgeSession::new(me, layout.digest()),
            global: device.lora.flatten(),
            history: History::new(len),
            feedback: ErrorFeedback::new(len),
            layout,
            device,
            prepared: None,
            configs: BTreeMap::new(),
            assembler: GlobalAssembler::default(),
            waiting: None,
            ready: None,
            eval_loss: None,
            encrypt_seconds: BTreeMap::new(),
            rng: rand::rng(),
            init_seed: None,
        })
    }

    /// Writes each round's encoded plaintext update (what this device encrypts, before
    /// encryption) and its weight to `dir/round-{r}-{device}.json`: the device's own data,
    /// for audits and for the end-to-end tests to recompute the aggregate.
    pub fn with_audit_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.audit_dir = dir;
        self
    }

    fn write_audit(
        &self,
        round: u64,
        weight: f64,
        plaintexts: &[u64],
        delivered: &[u64],
    ) -> std::io::Result<()> {
        let Some(dir) = &self.audit_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let json = serde_json::json!({
            "round": round,
            "device": self.id,
            "weight": weight,
            "plaintexts": plaintexts,
            "delivered": delivered,
        });
        std::fs::write(
            dir.join(format!("round-{round}-{}.json", self.id)),
            json.to_string(),
        )
    }

    /// Keeps this device's federation state in `path` (see [`Persisted`]), restoring it
    /// first when the file exists. Returns the client and, when it restored, a line for the
    /// log. A state of another device or adapter layout is refused.
    pub fn with_state(
        mut self,
        path: std::path::PathBuf,
    ) -> Result<(Self, Option<String>), crate::EdgeError> {
        let read = fedshield_store::read_existing(&path)
            .map_err(|e| crate::EdgeError::Shape(e.to_string()))?;
        let restored = match read {
            Some(bytes) => {
                let bad = |why: String| {
                    crate::EdgeError::Shape(format!("state file {}: {why}", path.display()))
                };
                let p: Persisted = postcard::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
                if p.device != self.id {
                    return Err(bad(format!("belongs to device {}", p.device)));
                }
                if p.layout_digest != self.layout.digest() || p.global.len() != self.layout.len() {
                    return Err(bad("belongs to another adapter layout".into()));
                }
                self.init_seed = p.init_seed;
                self.global = p.global.into_owned();
                self.history = p.history.into_owned();
                self.feedback = p.feedback.into_owned();
                self.prepared = p.pending.map(Cow::into_owned);
                self.restored_pending = self.prepared.as_ref().map(Prepared::round);
                self.eval_loss = p.eval_loss;
                // Never join the applied round or an earlier one again (a replay of an old
                // announcement after a restart).
                self.session.resume_after(self.history.round());
                self.load_global();
                let residual: f64 = self
                    .feedback
                    .residual()
                    .iter()
                    .map(|&v| (v as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                Some(format!(
                    "resumed from {}: global update of round {} applied, residual norm {residual:.3e}{}",
                    path.display(),
                    self.history.round(),
                    match &self.prepared {
                        Some(p) => format!(", round {}'s upload awaiting its outcome", p.round()),
                        None => String::new(),
                    }
                ))
            }
            None => None,
        };
        self.state_path = Some(path);
        Ok((self, restored))
    }

    /// Writes the state file (when there is one); a failure is logged, the run goes on.
    fn persist(&self, log: &mut Log) {
        let Some(path) = &self.state_path else {
            return;
        };
        let state = Persisted {
            device: Cow::Borrowed(&self.id),
            layout_digest: self.layout.digest(),
            init_seed: self.init_seed,
            global: Cow::Borrowed(&self.global),
            history: Cow::Borrowed(&self.history),
            feedback: Cow::Borrowed(&self.feedback),
            pending: self.prepared.as_ref().map(Cow::Borrowed),
            eval_loss: self.eval_loss,
        };
        // Owner-only: the residual and the pending upload derive from the private data.
        let written = postcard::to_stdvec(&state)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                fedshield_store::write_atomic(path, &bytes, fedshield_store::Access::Private)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            log.push(format!("state not saved to {}: {e}", path.display()));
        }
    }

    /// Settles an upload left pending by a restart, once its round's outcome is known.
    fn settle_pending(&mut self, round: u64, counted: bool, log: &mut Log) {
        if self.restored_pending != Some(round) {
            return; // uploads of this run are settled by the session
        }
        self.restored_pending = None;
        if let Some(p) = self.prepared.take_if(|p| p.round() == round) {
            self.feedback.settle(p, counted);
            log.push(format!(
                "round {round}: the upload made before the restart {}",
                if counted {
                    "counted"
                } else {
                    "did not count; the residual keeps it"
                }
            ));
            self.persist(log);
        }
    }

    /// Samples on this device.
    pub fn samples(&self) -> u64 {
        self.device.train.len() as u64
    }

    /// The round state arrived; returns the messages to publish.
    pub fn on_round(&mut self, state: RoundState, log: &mut Log) -> Vec<EdgeMessage> {
        let round = state.config.round;
        if self.init_seed.is_none() && self.history.round() == 0 {
            // The fleet's initial adapter: identical on every device and on the host.
            self.global = init_adapter(&self.layout, state.config.init_seed);
            self.load_global();
            self.init_seed = Some(state.config.init_seed);
        }
        self.configs.insert(round, state.config.clone());
        if let Phase::Announce { .. } = state.phase
            && self.eval_loss.is_none()
        {
            self.eval_loss = Some(evaluate(
                self.device.model,
                Some(&self.device.lora),
                &self.device.eval,
            ));
        }
        if let Phase::Closed { contributors } = &state.phase {
            log.push(format!(
                "round {round}: closed with {} contributors",
                contributors.len()
            ));
            let counted = contributors.iter().any(|d| d.0 == self.id);
            self.settle_pending(round, counted, log);
        }
        if let Phase::Failed { .. } = &state.phase {
            self.settle_pending(round, false, log);
        }
        let samples = self.samples();
        match self
            .session
            .on_round(state, samples, self.eval_loss, &mut self.rng)
        {
            Ok(actions) => self.execute(actions, log),
            Err(e) => {
                log.refused(&format!("round {round} state"), &e);
                vec![]
            }
        }
    }

    /// Whether a round waits for [`Self::train_ready`].
    pub fn has_training(&self) -> bool {
        self.ready.is_some()
    }

    /// Trains the round that the last event made ready, once the driver has published the
    /// messages that event returned; returns the messages to publish after training.
    pub fn train_ready(&mut self, log: &mut Log) -> Vec<EdgeMessage> {
        match self.ready.take() {
            Some((config, weight)) => self.train_round(config, weight, log),
            None => vec![],
        }
    }

    /// The host's message on this device's downlink: its shares, or the notice that the
    /// host dropped its upload (the device then sits the round out).
    pub fn on_down(&mut self, message: DownMessage, log: &mut Log) -> Vec<EdgeMessage> {
        if let DownMessage::UploadRefused { round, reason } = &message {
            log.push(format!(
                "round {round}: the host dropped this device's upload ({reason}); sitting the round out"
            ));
        }
        match self.session.on_down(message) {
            Ok(actions) => self.execute(actions, log),
            Err(e) => {
                log.refused("share delivery", &e);
                vec![]
            }
        }
    }

    /// A part of a global update arrived.
    pub fn on_global(&mut self, part: GlobalPart, log: &mut Log) -> Vec<EdgeMessage> {
        let Some((round, contributors, values)) = self.assembler.add(part, self.history.round())
        else {
            return vec![];
        };
        let Some(config) = self.configs.get(&round).cloned() else {
            if round > self.history.round() {
                log.push(format!(
                    "global update of round {round}: this device missed that round; fetching the fleet snapshot"
                ));
                self.needs_snapshot = true;
            }
            return vec![];
        };
        let selection = match self.round_mask(&config) {
            Ok(s) if s.len() == values.len() => s,
            Ok(s) => {
                log.push(format!(
                    "global update of round {round}: {} values for a mask of {}",
                    values.len(),
                    s.len()
                ));
                return vec![];
            }
            Err(why) => {
                log.push(format!("global update of round {round}: {why}"));
                if round > self.history.round() + 1 {
                    log.push("fetching the fleet snapshot");
                    self.needs_snapshot = true;
                }
                return vec![];
            }
        };
        if apply(&mut self.global, &selection, &values).is_err()
            || self.history.observe(&selection, &values).is_err()
        {
            log.push(format!("global update of round {round} does not fit"));
            return vec![];
        }
        self.load_global();
        let loss = evaluate(
            self.device.model,
            Some(&self.device.lora),
            &self.device.eval,
        );
        self.eval_loss = Some(loss);
        let counted = contributors.iter().any(|d| d.0 == self.id);
        self.settle_pending(round, counted, log);
        self.persist(log);
        log.push(format!(
            "round {round}: applied the global update of {} devices; held-out loss {loss:.4}",
            contributors.len()
        ));
        if let Some(waiting) = self.waiting.take() {
            self.ready = Some(waiting);
        }
        if check_value("held-out loss", loss, MAX_REPORTED_LOSS).is_err() {
            log.push(format!(
                "round {round}: held-out loss {loss} is not a reportable value; not reported"
            ));
            return vec![];
        }
        log.events.push(Event::Evaluated {
            round,
            eval_loss: loss,
        });
        let id = fedshield_crypto::identity::DeviceId(self.id.clone());
        vec![EdgeMessage::Evaluated(Evaluation::sign(
            &self.signer,
            &id,
            round,
            loss,
            self.encrypt_seconds.get(&round).copied().unwrap_or(0.0),
        ))]
    }

    /// Whether the driver should be subscribed to the fleet snapshot.
    pub fn needs_snapshot(&self) -> bool {
        self.needs_snapshot
    }

    /// A part of the fleet snapshot arrived (while [`FleetClient::needs_snapshot`]).
    pub fn on_snapshot(&mut self, part: SnapshotPart, log: &mut Log) -> Vec<EdgeMessage> {
        if !self.needs_snapshot {
            return vec![];
        }
        let limit = 64 * self.layout.len() + (1 << 20);
        let snapshot = match self.snapshot.add(part, self.history.round(), limit) {
            None => return vec![],
            Some(Err(e)) => {
                log.refused("fleet snapshot", &e);
                return vec![];
            }
            Some(Ok(s)) => s,
        };
        self.apply_snapshot(snapshot, log)
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot, log: &mut Log) -> Vec<EdgeMessage> {
        let round = snapshot.round;
        if round <= self.history.round() {
            self.needs_snapshot = false;
            return vec![];
        }
        if snapshot.global.len() != self.layout.len() || snapshot.history.len() != self.layout.len()
        {
            log.push(format!(
                "fleet snapshot of round {round} does not fit this adapter's layout"
            ));
            return vec![];
        }
        self.global = snapshot.global;
        self.history = snapshot.history;
        self.needs_snapshot = false;
        self.load_global();
        if let Some(pending) = self.restored_pending.filter(|&r| r <= round) {
            let counted = snapshot
                .recent
                .iter()
                .any(|(r, who)| *r == pending && who.iter().any(|d| d.0 == self.id));
            self.settle_pending(pending, counted, log);
        }
        let loss = evaluate(
            self.device.model,
            Some(&self.device.lora),
            &self.device.eval,
        );
        self.eval_loss = Some(loss);
        log.push(format!(
            "caught up from the fleet snapshot of round {round}; held-out loss {loss:.4}"
        ));
        self.persist(log);
        match self.waiting.take() {
            Some(w) if w.0.history_round == round => self.ready = Some(w),
            other => self.waiting = other,
        }
        vec![]
    }

    fn load_global(&self) {
        self.device
            .lora
            .load_flat(&self.global)
            .expect("the global adapter has the adapter's layout");
    }

    fn execute(&mut self, actions: Vec<EdgeAction>, log: &mut Log) -> Vec<EdgeMessage> {
        let mut out = Vec::new();
        for a in actions {
            match a {
                EdgeAction::Send(m) => out.push(m),
                EdgeAction::Train { config, weight } => {
                    if config.history_round > self.history.round() {
                        // The previous round's global update is still on its way, unless
                        // this device missed a round: then only the snapshot helps.
                        let mine = self.history.round();
                        if config.history_round > mine + 1
                            || !self.configs.contains_key(&config.history_round)
                        {
                            log.push(format!(
                                "round {}: built on round {}, this device is at round {mine}; fetching the fleet snapshot",
                                config.round, config.history_round
                            ));
                            self.needs_snapshot = true;
                        }
                        self.waiting = Some((config, weight));
                    } else {
                        self.ready = Some((config, weight));
                    }
                }
                EdgeAction::Settle { round, counted } => {
                    if self.waiting.as_ref().is_some_and(|(c, _)| c.round == round) {
                        self.waiting = None;
                    }
                    if self.ready.as_ref().is_some_and(|(c, _)| c.round == round) {
                        self.ready = None;
                    }
                    if let Some(p) = self.prepared.take_if(|p| p.round() == round) {
                        self.feedback.settle(p, counted);
                        log.events.push(Event::Settled { round, counted });
                        self.persist(log);
                        log.push(format!(
                            "round {round}: {}",
                            if counted {
                                "update counted; residual keeps what was not sent"
                            } else {
                                "update not counted; residual keeps all of it"
                            }
                        ));
                    }
                }
            }
        }
        out
    }

    /// The mask of the round `config` announced, as this device computes it: refused when
    /// the device's history is not the one the round was built on, or when the mask does
    /// not have the announced length.
    fn round_mask(&self, config: &RoundConfig) -> Result<Selection, String> {
        if config.history_round != self.history.round() {
            return Err(format!(
                "out of sync: this device has the history of round {}, the round was built on {}",
                self.history.round(),
                config.history_round
            ));
        }
        let mask = select(
            &self.layout,
            &config.prune,
            &self.history,
            config.round,
            config.select_seed,
        )
        .map_err(|e| e.to_string())?;
        if mask.len() != config.selected {
            return Err(format!(
                "mask of {} values, the round announced {}",
                mask.len(),
                config.selected
            ));
        }
        Ok(mask)
    }

    /// Trains, encodes, encrypts and hands the update to the session.
    fn train_round(&mut self, config: RoundConfig, weight: f64, log: &mut Log) -> Vec<EdgeMessage> {
        let round = config.round;
        let selection = match self.round_mask(&config) {
            Ok(s) => s,
            Err(why) => {
                log.push(format!("round {round}: {why}; sitting it out"));
                return vec![];
            }
        };
        let encoding = match FixedPoint::with_scale(config.clip, config.scale_log2) {
            Ok(e) => e,
            Err(e) => {
                log.push(format!("round {round}: {e}"));
                return vec![];
            }
        };
        self.load_global();
        let t = Instant::now();
        let mut trainer = Trainer::new(
            &self.device.lora,
            TrainConfig::constant(self.device.lr, (self.device.seed ^ round) as i64),
        )
        .expect("AdamW over the adapter");
        let run = LocalRun {
            steps: config.local_steps,
            batch_size: self.device.batch_size,
            grad_accum: 1,
            eval_every: 0,
            seed: self.device.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            pad: self.device.pad,
        };
        let mut last_loss = f64::NAN;
        train_local(
            self.device.model,
            &self.device.lora,
            &mut trainer,
            &self.device.train,
            &[],
            &run,
            |p| last_loss = p.stats.loss,
        );
        let delta: Vec<f32> = self
            .device
            .lora
            .flatten()
            .iter()
            .zip(&self.global)
            .map(|(l, g)| l - g)
            .collect();
        self.load_global();
        let mut prepared = match self.feedback.prepare(&delta, &selection, &encoding, weight) {
            Ok(p) => p,
            Err(e) => {
                log.push(format!("round {round}: {e}"));
                return vec![];
            }
        };
        let train_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut seeder = new_seeder();
        let key = ClientKey::generate(seeder.as_mut());
        let (ct, delivered) = Encryptor::new(
            &key,
            MaskSeed(config.mask_seed),
            config.body_bits,
            seeder.as_mut(),
        )
        .encrypt_delivered(&prepared.plaintexts);
        // The body rounding stays in the residual (lengths match by construction).
        if let Err(e) = prepared.record_delivery(&delivered, &encoding, weight) {
            log.push(format!("round {round}: {e}"));
            return vec![];
        }
        log.events.push(Event::Encrypted { round, weight });
        if let Err(e) = self.write_audit(round, weight, &prepared.plaintexts, &delivered) {
            log.push(format!("round {round}: audit file not written: {e}"));
        }
        let bytes = postcard::to_stdvec(&ct).expect("serializable");
        let enc_s = t.elapsed().as_secs_f64();
        self.encrypt_seconds.insert(round, enc_s);
        log.push(format!(
            "round {round}: trained {} steps in {train_s:.1} s (last loss {last_loss:.4}); {} of {} values sent ({} clipped), {} bytes encrypted in {:.2} s",
            config.local_steps,
            prepared.plaintexts.len(),
            self.layout.len(),
            prepared.clipped,
            bytes.len(),
            enc_s
        ));
        self.prepared = Some(prepared);
        self.persist(log);
        match self
            .session
            .on_trained(round, bytes, key.coefficients().to_vec())
        {
            Ok(actions) => self.execute(actions, log),
            Err(e) => {
                log.push(format!("round {round}: {e}"));
                vec![]
            }
        }
    }
}
