//! One device across rounds: [`EdgeFleet`] wraps the round machine ([`EdgeSession`]) with
//! what lasts between rounds: the global adapter and its history, the error-feedback
//! residual, an upload awaiting its round's outcome (also after a restart), the global
//! update's and the snapshot's reassembly, and the device's evaluation reports.
//!
//! No I/O, no clock, no tch: the device's [`Platform`] trains and evaluates, tells the time
//! and draws entropy; every call returns an [`EdgeOutput`] whose messages, state write and
//! audit records the driver carries out (the state first: see [`EdgeOutput::persist`]).

use crate::ProtocolError;
use crate::edge::{EdgeAction, EdgeIdentity, EdgeSession};
use crate::fleet::steps::{DeviceStatus, Effort, Task, normalisation};
use crate::messages::{
    DownMessage, EdgeMessage, GlobalAssembler, GlobalPart, Phase, RoundConfig, RoundState,
    Snapshot, SnapshotAssembler, SnapshotPart, Topics,
};
use crate::signed::{Downlink, Evaluation, MAX_REPORTED_LOSS, check_value};
use fedshield_codec::{ErrorFeedback, Global, Layout, Prepared, Selection};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::{DeviceId, Identity};
use fedshield_crypto::packed::{ClientKey, Encryptor, MaskSeed};
use rand::{RngCore, SeedableRng};
use std::borrow::Cow;
use std::collections::BTreeMap;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

/// What the device provides: local training and evaluation (libtorch in `fedshield-edge`),
/// its status, a monotonic clock and entropy.
pub trait Platform {
    /// Trains `task.steps` local steps of round `config` starting from the adapter
    /// `global`, stopping early once `task.train_seconds` have passed (after at least one
    /// step); returns the trained adapter minus `global` and what the training took.
    fn train(
        &mut self,
        config: &RoundConfig,
        task: &Task,
        global: &[f32],
    ) -> Result<Trained, String>;
    /// The device's plan, memory budget, power mode and thermal state as it joins a round
    /// (its speed is the fleet's own measurement of its last round).
    fn status(&mut self) -> DeviceStatus;
    /// The held-out loss of the adapter `global`.
    fn evaluate(&mut self, global: &[f32]) -> f64;
    /// Seconds on a monotonic clock (encryption time in the reports).
    fn seconds(&self) -> f64;
    /// 32 bytes from a cryptographically secure source (the OS in production): the secure
    /// aggregation's keys, each round's fresh encryption key and noise.
    fn entropy(&mut self) -> [u8; 32];
}

/// A round's local training.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    /// The trained adapter minus the global adapter it started from, in layout order.
    pub delta: Vec<f32>,
    /// Seconds of training.
    pub seconds: f64,
    /// The last step's training loss.
    pub last_loss: f64,
    /// Steps, tokens, throttling and energy of the training.
    pub effort: Effort,
}

/// What a call asks the driver to do, and what happened, in order: write the state file
/// (when `persist`), then publish `send` on the device's uplink; write `audits` if the
/// driver keeps them; log `lines`; record `events`.
#[derive(Debug, Default)]
pub struct EdgeOutput {
    /// Messages for the device's uplink, in order.
    pub send: Vec<EdgeMessage>,
    /// The state changed: write [`EdgeFleet::state_bytes`] (atomically) before sending.
    pub persist: bool,
    /// The encoded updates of this call, before encryption (for audits and tests).
    pub audits: Vec<Audit>,
    /// Lines for the device's log.
    pub lines: Vec<String>,
    /// Structured events (the device's event file).
    pub events: Vec<Event>,
}

impl EdgeOutput {
    fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// Records a refused message: a line and an [`Event::Refused`].
    pub fn refused(&mut self, source: &str, error: &ProtocolError) {
        self.line(format!("{source}: refused: {error}"));
        self.events.push(Event::Refused {
            source: source.to_string(),
            kind: error.kind().to_string(),
            detail: error.to_string(),
        });
    }

    /// Appends another call's output.
    pub fn extend(&mut self, other: EdgeOutput) {
        self.send.extend(other.send);
        self.persist |= other.persist;
        self.audits.extend(other.audits);
        self.lines.extend(other.lines);
        self.events.extend(other.events);
    }
}

/// One round's encoded update as this device encrypted it: the device's own data.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Audit {
    /// The round.
    pub round: u64,
    /// The device.
    pub device: DeviceId,
    /// The FedAvg weight it encoded with.
    pub weight: f64,
    /// The fixed-point plaintexts before encryption.
    pub plaintexts: Vec<u64>,
    /// What the ciphertext bodies deliver of them (the body width's rounding).
    pub delivered: Vec<u64>,
}

/// Something a device did or refused, as one line of JSON in its event file
/// (`fedshield-edge run --events FILE`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A message refused: where it came from (a topic, or the state machine's input), the
    /// refusal's stable kind ([`ProtocolError::kind`]) and its text.
    Refused {
        /// Topic or input.
        source: String,
        /// [`ProtocolError::kind`].
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
        /// Seconds of local training before it.
        train_seconds: f64,
        /// Local steps trained (of the round's plan's steps for this device).
        steps: usize,
        /// The factor the delta was scaled by (`tau_eff / steps`; 1 when every member
        /// trains the same steps).
        scaled: f64,
    },
    /// The device joined `round` (its signed advert and status went to the host).
    Joined {
        /// The round.
        round: u64,
    },
    /// The host left this device out of `round`.
    LeftOut {
        /// The round.
        round: u64,
        /// The host's reason.
        reason: crate::fleet::steps::LeftOut,
    },
    /// Local training of `round` began (on the driver's worker; the link is still served).
    Training {
        /// The round.
        round: u64,
    },
    /// Incoming messages dropped by the link because its budget was full (a flood, or a
    /// driver far behind): the running total. Written by the driver.
    LinkDropped {
        /// Messages dropped since start.
        total: u64,
    },
    /// Host messages dropped because more than [`MAX_DEFERRED`] came while the device
    /// trained.
    DeferredDropped {
        /// How many.
        count: u64,
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
    /// Caught up from the fleet snapshot of `round`.
    CaughtUp {
        /// The snapshot's round.
        round: u64,
    },
    /// Restored from the state file at start (written by the driver).
    Resumed {
        /// The round whose global update is applied.
        applied: u64,
        /// The round of an upload awaiting its outcome.
        pending: Option<u64>,
    },
    /// The host's state began anew (a new federation epoch): the device dropped its global
    /// adapter, residual and pending upload of the old epoch and starts over.
    Reset {
        /// The epoch left (0: none recorded).
        from: u64,
        /// The epoch followed now.
        to: u64,
    },
    /// An attached rig warned of a power cut in `in_ms`: the device saved its state and
    /// stopped (written by the driver).
    PowerWarning {
        /// Milliseconds of warning.
        in_ms: u32,
    },
    /// A notice from an attached rig (written by the driver).
    Rig {
        /// What happened.
        notice: RigNotice,
    },
    /// The frames an attached rig's serial line carried so far (written by the driver when
    /// it stops or saves its state for a power cut).
    RigLine {
        /// Frames whose CRC matched.
        frames: u64,
        /// Messages delivered whole.
        messages: u64,
        /// Frames dropped (not COBS, too short or long, or a bad CRC).
        bad_frames: u64,
        /// Of them, CRC mismatches.
        crc_errors: u64,
        /// Messages dropped for a missing chunk.
        broken_messages: u64,
    },
    /// The broker connection dropped (written by the driver); `cut`: dropped by the link
    /// itself because the rig said the network is cut.
    LinkDown {
        /// Dropped on the rig's word.
        cut: bool,
    },
    /// Connected to the broker (again) (written by the driver).
    LinkUp,
    /// The served model (ONNX Runtime) took round `round`'s global adapter, in `swap_ms`
    /// milliseconds (written by the driver).
    Served {
        /// The adapter's round.
        round: u64,
        /// How long the swap took.
        swap_ms: f64,
    },
    /// The device now trusts host certificate `certificate` and revocation list
    /// `revocations` (a rotated or renewed host key, a newer list), saved to its file
    /// (written by the driver).
    HostTrust {
        /// The host certificate's serial.
        certificate: u64,
        /// The revocation list's serial.
        revocations: u64,
    },
    /// The device left after the last round it was asked to run (written by the driver).
    Done {
        /// That round.
        round: u64,
    },
}

/// What an attached test rig told the device ([`Event::Rig`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "notice", rename_all = "kebab-case")]
pub enum RigNotice {
    /// The rig identified itself and speaks this edge's protocol.
    Connected {
        /// Its firmware's name and version.
        firmware: String,
        /// Its protocol version.
        protocol: u16,
    },
    /// The rig speaks another protocol version (or another set of messages): the device
    /// goes on with its on-board telemetry.
    Mismatch {
        /// Its firmware's name and version.
        firmware: String,
        /// Its protocol version.
        protocol: u16,
        /// Its protocol digest.
        digest: u64,
    },
    /// No identity could be read (no rig, or one whose messages this edge cannot decode):
    /// on-board telemetry only.
    Unusable {
        /// Why.
        reason: String,
    },
    /// The rig cut the device's network.
    NetworkCut,
    /// The rig restored the device's network.
    NetworkRestored,
    /// The rig cut the device's power (seen only when the device outlives it).
    PowerCut,
    /// The rig restored the device's power.
    PowerRestored,
    /// Nothing from the rig for a while: on-board telemetry only.
    Silent,
    /// Messages from the rig again.
    Back,
}

/// What a device keeps between runs: enough to go on after a restart without losing its
/// residual or counting an update twice. Borrowed when written (no copy of the ~100 MB it
/// holds for SmolLM2), owned when read.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted<'a> {
    device: Cow<'a, str>,
    layout_digest: [u8; 32],
    init_seed: Option<u64>,
    global: Cow<'a, Global>,
    feedback: Cow<'a, ErrorFeedback>,
    /// An upload whose round's outcome was not known yet: settled on restart from the
    /// round's retained outcome, its global update's contributor list or the snapshot.
    pending: Option<Cow<'a, Prepared>>,
    eval_loss: Option<f64>,
    /// The host's federation epoch this state belongs to.
    epoch: Option<u64>,
}

/// Why a state file was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateRefusal {
    /// The bytes do not decode.
    #[error("does not decode: {0}")]
    Decode(String),
    /// The state of another device.
    #[error("belongs to device {0}")]
    OtherDevice(String),
    /// The state of another adapter layout.
    #[error("belongs to another adapter layout")]
    OtherLayout,
}

/// A round waiting to train: its configuration, this device's verified weight and its
/// task from the roster's plan.
type Pending = (RoundConfig, f64, Task);

/// One device's federation state across rounds.
pub struct EdgeFleet {
    id: DeviceId,
    signer: Identity,
    layout: Layout,
    samples: u64,
    session: EdgeSession,
    global: Global,
    feedback: ErrorFeedback,
    prepared: Option<Prepared>,
    configs: BTreeMap<u64, RoundConfig>,
    assembler: GlobalAssembler,
    /// A round built on a global update that has not arrived yet.
    waiting: Option<Pending>,
    /// A round to train as soon as the driver has published what came before it (the
    /// round's shares must leave before minutes of training, or the share phase closes
    /// without this device): see [`EdgeFleet::train_ready`].
    ready: Option<Pending>,
    /// The round being trained by the driver (see [`EdgeFleet::take_training`]).
    training: Option<u64>,
    /// Host messages that came while training, handled after it.
    deferred: std::collections::VecDeque<Downlink>,
    deferred_dropped: u64,
    eval_loss: Option<f64>,
    encrypt_seconds: BTreeMap<u64, f64>,
    /// Each recent round's training, reported with the round's evaluation.
    efforts: BTreeMap<u64, Effort>,
    /// Seconds per step and tokens per second of the last training (the join's status).
    pace: Option<(f64, f64)>,
    init_seed: Option<u64>,
    /// The round of an upload restored from the state, still to settle.
    restored_pending: Option<u64>,
    /// Behind the fleet by more than the retained global update can fix: the driver
    /// subscribes to the snapshot while this is set.
    needs_snapshot: bool,
    snapshot: SnapshotAssembler,
    /// The host's federation epoch followed (see `RoundConfig::epoch`).
    epoch: Option<u64>,
    me: EdgeIdentity,
}

impl std::fmt::Debug for EdgeFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeFleet")
            .field("id", &self.id)
            .field("applied", &self.global.round())
            .field("pending", &self.prepared.as_ref().map(Prepared::round))
            .finish_non_exhaustive()
    }
}

impl EdgeFleet {
    /// A device `me` with `samples` training examples, whose adapter has `layout` and the
    /// values `initial` (replaced by the fleet's initial adapter at the first round).
    pub fn new(me: EdgeIdentity, layout: Layout, initial: Vec<f32>, samples: u64) -> Self {
        let len = layout.len();
        Self {
            id: me.id.clone(),
            signer: Identity::from_secret(me.secret),
            session: EdgeSession::new(me.clone(), layout.digest()),
            me,
            epoch: None,
            global: Global::starting_from(initial),
            feedback: ErrorFeedback::new(len),
            layout,
            samples,
            prepared: None,
            configs: BTreeMap::new(),
            assembler: GlobalAssembler::default(),
            waiting: None,
            ready: None,
            training: None,
            deferred: Default::default(),
            deferred_dropped: 0,
            eval_loss: None,
            encrypt_seconds: BTreeMap::new(),
            efforts: BTreeMap::new(),
            pace: None,
            init_seed: None,
            restored_pending: None,
            needs_snapshot: false,
            snapshot: SnapshotAssembler::default(),
        }
    }

    /// The state to keep (see [`EdgeOutput::persist`]).
    pub fn state_bytes(&self) -> Vec<u8> {
        let state = Persisted {
            device: Cow::Borrowed(&self.id.0),
            layout_digest: self.layout.digest(),
            init_seed: self.init_seed,
            global: Cow::Borrowed(&self.global),
            feedback: Cow::Borrowed(&self.feedback),
            pending: self.prepared.as_ref().map(Cow::Borrowed),
            eval_loss: self.eval_loss,
            epoch: self.epoch,
        };
        postcard::to_stdvec(&state).expect("the state encodes")
    }

    /// Restores a state written by [`EdgeFleet::state_bytes`] (before any message); returns
    /// a line for the log. A state of another device or adapter layout is refused and
    /// nothing changes.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<String, StateRefusal> {
        let p: Persisted =
            postcard::from_bytes(bytes).map_err(|e| StateRefusal::Decode(e.to_string()))?;
        if p.device != self.id.0 {
            return Err(StateRefusal::OtherDevice(p.device.into_owned()));
        }
        if p.layout_digest != self.layout.digest()
            || p.global.len() != self.layout.len()
            || p.global.history().len() != self.layout.len()
            || p.feedback.residual().len() != self.layout.len()
        {
            return Err(StateRefusal::OtherLayout);
        }
        self.init_seed = p.init_seed;
        self.global = p.global.into_owned();
        self.feedback = p.feedback.into_owned();
        self.prepared = p.pending.map(Cow::into_owned);
        self.restored_pending = self.prepared.as_ref().map(Prepared::round);
        self.eval_loss = p.eval_loss;
        self.epoch = p.epoch;
        // Never join the applied round or an earlier one again (a replay of an old
        // announcement after a restart).
        self.session.resume_after(self.global.round());
        let residual: f64 = self
            .feedback
            .residual()
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        Ok(format!(
            "global update of round {} applied, residual norm {residual:.3e}{}",
            self.global.round(),
            match &self.prepared {
                Some(p) => format!(", round {}'s upload awaiting its outcome", p.round()),
                None => String::new(),
            }
        ))
    }

    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// Samples on this device (its FedAvg claim).
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The global adapter as this device has it.
    pub fn global(&self) -> &Global {
        &self.global
    }

    /// The error-feedback residual.
    pub fn residual(&self) -> &[f32] {
        self.feedback.residual()
    }

    /// The round of an upload awaiting its outcome.
    pub fn pending_round(&self) -> Option<u64> {
        self.prepared.as_ref().map(Prepared::round)
    }

    /// Whether the driver should be subscribed to the fleet snapshot.
    pub fn needs_snapshot(&self) -> bool {
        self.needs_snapshot
    }

    /// Whether a round waits for [`EdgeFleet::train_ready`].
    pub fn has_training(&self) -> bool {
        self.ready.is_some()
    }

    /// Settles an upload left pending by a restart, once its round's outcome is known.
    fn settle_restored(&mut self, round: u64, counted: bool, out: &mut EdgeOutput) {
        if self.restored_pending != Some(round) {
            return; // uploads of this run are settled by the session
        }
        self.restored_pending = None;
        if let Some(p) = self.prepared.take_if(|p| p.round() == round) {
            self.feedback.settle(p, counted);
            out.events.push(Event::Settled { round, counted });
            out.line(format!(
                "round {round}: the upload made before the restart {}",
                if counted {
                    "counted"
                } else {
                    "did not count; the residual keeps it"
                }
            ));
            out.persist = true;
        }
    }

    /// Follows the host's federation epoch `epoch`: an older one is a replay; a newer one
    /// means the host's state began anew, and this device starts over with it (its global
    /// adapter, history, residual and any pending upload belong to a federation that no
    /// longer exists).
    fn follow_epoch(&mut self, epoch: u64, out: &mut EdgeOutput) -> Result<(), ProtocolError> {
        match self.epoch {
            Some(have) if epoch < have => {
                return Err(ProtocolError::StaleEpoch { got: epoch, have });
            }
            Some(have) if epoch == have => return Ok(()),
            None if self.global.round() == 0 && self.prepared.is_none() => {}
            from => {
                let from = from.unwrap_or(0);
                out.line(format!(
                    "the host's federation began anew (epoch {from} -> {epoch}): dropping the global update of round {} and the residual, starting over",
                    self.global.round()
                ));
                out.events.push(Event::Reset { from, to: epoch });
                let len = self.layout.len();
                self.session = EdgeSession::new(self.me.clone(), self.layout.digest());
                self.global = Global::starting_from(self.global.values().to_vec());
                self.feedback = ErrorFeedback::new(len);
                self.prepared = None;
                self.restored_pending = None;
                self.configs.clear();
                self.assembler = GlobalAssembler::default();
                self.snapshot = SnapshotAssembler::default();
                self.waiting = None;
                self.ready = None;
                self.eval_loss = None;
                self.encrypt_seconds.clear();
                self.efforts.clear();
                self.init_seed = None;
                self.needs_snapshot = false;
            }
        }
        self.epoch = Some(epoch);
        out.persist = true;
        Ok(())
    }

    /// The (host-signed, verified) round state.
    pub fn on_round(&mut self, state: RoundState, platform: &mut dyn Platform) -> EdgeOutput {
        if self.training.is_some() {
            return self.defer(Downlink::Round(state));
        }
        let mut out = EdgeOutput::default();
        let round = state.config.round;
        if let Err(e) = self.follow_epoch(state.config.epoch, &mut out) {
            out.refused(&format!("round {round} state"), &e);
            return out;
        }
        if self.init_seed.is_none() && self.global.round() == 0 {
            // The fleet's initial adapter: identical on every device and on the host.
            self.global = Global::initial(&self.layout, state.config.init_seed);
            self.init_seed = Some(state.config.init_seed);
        }
        self.configs.insert(round, state.config.clone());
        if let Phase::Announce { .. } = state.phase
            && self.eval_loss.is_none()
        {
            self.eval_loss = Some(platform.evaluate(self.global.values()));
        }
        if let Phase::Closed { contributors } = &state.phase {
            out.line(format!(
                "round {round}: closed with {} contributors",
                contributors.len()
            ));
            let counted = contributors.contains(&self.id);
            self.settle_restored(round, counted, &mut out);
        }
        if let Phase::Failed { .. } = &state.phase {
            self.settle_restored(round, false, &mut out);
        }
        let status = if matches!(state.phase, Phase::Announce { .. }) {
            self.status(platform)
        } else {
            DeviceStatus::default()
        };
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(platform.entropy());
        match self
            .session
            .on_round(state, self.samples, self.eval_loss, &status, &mut rng)
        {
            Ok(actions) => {
                let joined = actions
                    .iter()
                    .any(|a| matches!(a, EdgeAction::Send(EdgeMessage::Join { .. })));
                self.execute(actions, &mut out);
                if joined {
                    out.events.push(Event::Joined { round });
                }
            }
            Err(e) => out.refused(&format!("round {round} state"), &e),
        }
        out
    }

    /// What this device reports as it joins: the platform's status with the pace this
    /// fleet measured in the device's last training.
    fn status(&self, platform: &mut dyn Platform) -> DeviceStatus {
        let mut status = platform.status();
        if let Some((seconds_per_step, tokens_per_second)) = self.pace {
            status.seconds_per_step = Some(seconds_per_step);
            status.tokens_per_second = Some(tokens_per_second);
        }
        status
    }

    /// The host's message on this device's downlink: its shares, or the notice that the
    /// host dropped its upload (the device then sits the round out).
    pub fn on_down(&mut self, message: DownMessage) -> EdgeOutput {
        let mut out = EdgeOutput::default();
        if let DownMessage::UploadRefused { round, reason } = &message {
            out.line(format!(
                "round {round}: the host dropped this device's upload ({reason}); sitting the round out"
            ));
        }
        match self.session.on_down(message) {
            Ok(actions) => self.execute(actions, &mut out),
            Err(e) => out.refused("share delivery", &e),
        }
        out
    }

    /// A part of a global update arrived.
    pub fn on_global(&mut self, part: GlobalPart, platform: &mut dyn Platform) -> EdgeOutput {
        if self.training.is_some() {
            return self.defer(Downlink::Global(part));
        }
        let mut out = EdgeOutput::default();
        if Some(part.epoch) != self.epoch {
            return out; // another federation's update (or one before any round state)
        }
        let applied = self.global.round();
        let Some((round, contributors, values)) = self.assembler.add(part, applied) else {
            return out;
        };
        let values = match values.decode() {
            Ok(v) => v,
            Err(e) => {
                out.line(format!(
                    "global update of round {round} does not decode: {e}"
                ));
                return out;
            }
        };
        let Some(config) = self.configs.get(&round).cloned() else {
            if round > applied {
                out.line(format!(
                    "global update of round {round}: this device missed that round; fetching the fleet snapshot"
                ));
                self.needs_snapshot = true;
            }
            return out;
        };
        let selection = match self.round_mask(&config) {
            Ok(s) if s.len() == values.len() => s,
            Ok(s) => {
                out.line(format!(
                    "global update of round {round}: {} values for a mask of {}",
                    values.len(),
                    s.len()
                ));
                return out;
            }
            Err(why) => {
                out.line(format!("global update of round {round}: {why}"));
                if round > applied + 1 {
                    out.line("fetching the fleet snapshot");
                    self.needs_snapshot = true;
                }
                return out;
            }
        };
        if let Err(e) = self.global.apply(&selection, &values) {
            out.line(format!("global update of round {round} does not fit: {e}"));
            return out;
        }
        let loss = platform.evaluate(self.global.values());
        self.eval_loss = Some(loss);
        let counted = contributors.contains(&self.id);
        self.settle_restored(round, counted, &mut out);
        out.persist = true;
        out.line(format!(
            "round {round}: applied the global update of {} devices; held-out loss {loss:.4}",
            contributors.len()
        ));
        if let Some(waiting) = self.waiting.take() {
            self.ready = Some(waiting);
        }
        if check_value("held-out loss", loss, MAX_REPORTED_LOSS).is_err() {
            out.line(format!(
                "round {round}: held-out loss {loss} is not a reportable value; not reported"
            ));
            return out;
        }
        out.events.push(Event::Evaluated {
            round,
            eval_loss: loss,
        });
        out.send.push(EdgeMessage::Evaluated(Evaluation::sign(
            &self.signer,
            &self.id,
            round,
            loss,
            self.encrypt_seconds.get(&round).copied().unwrap_or(0.0),
            self.efforts.remove(&round),
        )));
        out
    }

    /// The most a fleet snapshot of this layout may decompress to.
    fn snapshot_limit(&self) -> usize {
        64 * self.layout.len() + (1 << 20)
    }

    /// A part of the fleet snapshot arrived (heeded only while
    /// [`EdgeFleet::needs_snapshot`]).
    pub fn on_snapshot(&mut self, part: SnapshotPart, platform: &mut dyn Platform) -> EdgeOutput {
        if self.training.is_some() {
            return self.defer(Downlink::Snapshot(part));
        }
        let mut out = EdgeOutput::default();
        if !self.needs_snapshot {
            return out;
        }
        match self
            .snapshot
            .add(part, self.global.round(), self.snapshot_limit())
        {
            None => {}
            Some(Err(e)) => out.refused("fleet snapshot", &e),
            Some(Ok(s)) => self.apply_snapshot(s, platform, &mut out),
        }
        out
    }

    fn apply_snapshot(
        &mut self,
        snapshot: Snapshot,
        platform: &mut dyn Platform,
        out: &mut EdgeOutput,
    ) {
        let round = snapshot.round;
        if Some(snapshot.epoch) != self.epoch {
            return; // another federation's snapshot
        }
        if round <= self.global.round() {
            self.needs_snapshot = false;
            return;
        }
        let global = match Global::from_parts(&self.layout, snapshot.global, snapshot.history) {
            Ok(g) if g.round() == round => g,
            _ => {
                out.line(format!(
                    "fleet snapshot of round {round} does not fit this adapter's layout"
                ));
                return;
            }
        };
        self.global = global;
        self.needs_snapshot = false;
        if let Some(pending) = self.restored_pending.filter(|&r| r <= round) {
            let counted = snapshot
                .recent
                .iter()
                .any(|(r, who)| *r == pending && who.contains(&self.id));
            self.settle_restored(pending, counted, out);
        }
        let loss = platform.evaluate(self.global.values());
        self.eval_loss = Some(loss);
        out.line(format!(
            "caught up from the fleet snapshot of round {round}; held-out loss {loss:.4}"
        ));
        out.events.push(Event::CaughtUp { round });
        out.persist = true;
        match self.waiting.take() {
            Some(w) if w.0.history_round == round => self.ready = Some(w),
            other => self.waiting = other,
        }
    }

    fn execute(&mut self, actions: Vec<EdgeAction>, out: &mut EdgeOutput) {
        for a in actions {
            match a {
                EdgeAction::Send(m) => out.send.push(m),
                EdgeAction::LeftOut { round, reason } => {
                    out.line(format!(
                        "round {round}: the host left this device out ({reason})"
                    ));
                    out.events.push(Event::LeftOut { round, reason });
                }
                EdgeAction::Train {
                    config,
                    weight,
                    task,
                } => {
                    let mine = self.global.round();
                    if config.history_round > mine {
                        // The previous round's global update is still on its way, unless
                        // this device missed a round: then only the snapshot helps.
                        if config.history_round > mine + 1
                            || !self.configs.contains_key(&config.history_round)
                        {
                            out.line(format!(
                                "round {}: built on round {}, this device is at round {mine}; fetching the fleet snapshot",
                                config.round, config.history_round
                            ));
                            self.needs_snapshot = true;
                        }
                        self.waiting = Some((config, weight, task));
                    } else {
                        self.ready = Some((config, weight, task));
                    }
                }
                EdgeAction::Settle { round, counted } => {
                    if self
                        .waiting
                        .as_ref()
                        .is_some_and(|(c, ..)| c.round == round)
                    {
                        self.waiting = None;
                    }
                    if self.ready.as_ref().is_some_and(|(c, ..)| c.round == round) {
                        self.ready = None;
                    }
                    if let Some(p) = self.prepared.take_if(|p| p.round() == round) {
                        self.feedback.settle(p, counted);
                        out.events.push(Event::Settled { round, counted });
                        out.persist = true;
                        out.line(format!(
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
    }

    /// The mask of the round `config` announced, as this device computes it: refused when
    /// the device's history is not the one the round was built on, or when the mask does
    /// not have the announced length.
    fn round_mask(&self, config: &RoundConfig) -> Result<Selection, ProtocolError> {
        round_mask(&self.layout, &self.global, config)
    }

    /// Trains the round that the last call made ready, once the driver has published what
    /// that call returned (the round's shares); then encodes, encrypts and uploads. The
    /// driver that trains elsewhere (on a worker, answering the link meanwhile) calls
    /// [`EdgeFleet::take_training`] and [`EdgeFleet::finish_training`] instead.
    pub fn train_ready(&mut self, platform: &mut dyn Platform) -> EdgeOutput {
        let (job, mut out) = self.take_training();
        if let Some(job) = job {
            let trained = platform.train(&job.config, &job.task, &job.global);
            out.extend(self.finish_training(job, trained, platform));
        }
        out
    }

    /// The round that the last call made ready, as a job for the platform's training
    /// (`None`, with the reason in the output, when the round cannot be trained: its mask
    /// or encoding is refused). Until [`EdgeFleet::finish_training`] the driver may feed
    /// the fleet messages that need no platform ([`EdgeFleet::on_down`]).
    pub fn take_training(&mut self) -> (Option<Training>, EdgeOutput) {
        let mut out = EdgeOutput::default();
        let Some((config, weight, task)) = self.ready.take() else {
            return (None, out);
        };
        let round = config.round;
        let selection = match self.round_mask(&config) {
            Ok(s) => s,
            Err(why) => {
                out.line(format!("round {round}: {why}; sitting it out"));
                return (None, out);
            }
        };
        let encoding = match FixedPoint::with_scale(config.clip, config.scale_log2) {
            Ok(e) => e,
            Err(e) => {
                out.line(format!("round {round}: {e}"));
                return (None, out);
            }
        };
        out.events.push(Event::Training { round });
        self.training = Some(round);
        let job = Training {
            global: self.global.values().to_vec(),
            config,
            task,
            weight,
            selection,
            encoding,
        };
        (Some(job), out)
    }

    /// The platform's result of `job`: encodes, encrypts and uploads it, then handles the
    /// host messages deferred while the device trained, in the order they came.
    pub fn finish_training(
        &mut self,
        job: Training,
        trained: Result<Trained, String>,
        platform: &mut dyn Platform,
    ) -> EdgeOutput {
        self.training = None;
        let mut out = self.upload(job, trained, platform);
        self.replay_deferred(platform, &mut out);
        out
    }

    /// Encodes, encrypts and uploads a round's training result.
    fn upload(
        &mut self,
        job: Training,
        trained: Result<Trained, String>,
        platform: &mut dyn Platform,
    ) -> EdgeOutput {
        let mut out = EdgeOutput::default();
        let Training {
            config,
            weight,
            task,
            selection,
            encoding,
            ..
        } = job;
        let round = config.round;
        let mut trained = match trained {
            Ok(t) if t.effort.steps == 0 => {
                out.line(format!(
                    "round {round}: no step trained ({:?}); sitting it out",
                    t.effort.stopped
                ));
                return out;
            }
            Ok(t) if t.delta.len() == self.layout.len() => t,
            Ok(t) => {
                out.line(format!(
                    "round {round}: training returned {} values for a layout of {}; sitting it out",
                    t.delta.len(),
                    self.layout.len()
                ));
                return out;
            }
            Err(e) => {
                out.line(format!(
                    "round {round}: training failed: {e}; sitting it out"
                ));
                return out;
            }
        };
        // FedNova's normalisation: the delta of `steps` steps counts as `tau_eff` steps.
        let steps = trained.effort.steps as usize;
        let scaled = normalisation(task.effective_steps, steps);
        if scaled != 1.0 {
            for v in &mut trained.delta {
                *v *= scaled as f32;
            }
        }
        self.pace = Some((
            trained.seconds / steps as f64,
            trained.effort.tokens as f64 / trained.seconds.max(1e-9),
        ));
        self.efforts.insert(round, trained.effort.clone());
        while self.efforts.len() > 8 {
            self.efforts.pop_first();
        }
        let mut prepared =
            match self
                .feedback
                .prepare(&trained.delta, &selection, &encoding, weight)
            {
                Ok(p) => p,
                Err(e) => {
                    out.line(format!("round {round}: {e}"));
                    return out;
                }
            };
        let t = platform.seconds();
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(platform.entropy());
        let mut seeder = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(
            (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()),
        ));
        let key = ClientKey::generate(&mut seeder);
        let (ct, delivered) = Encryptor::new(
            &key,
            MaskSeed(config.mask_seed),
            config.body_bits,
            &mut seeder,
        )
        .encrypt_delivered(&prepared.plaintexts);
        // The body rounding stays in the residual (lengths match by construction).
        if let Err(e) = prepared.record_delivery(&delivered, &encoding, weight) {
            out.line(format!("round {round}: {e}"));
            return out;
        }
        out.events.push(Event::Encrypted {
            round,
            weight,
            train_seconds: trained.seconds,
            steps,
            scaled,
        });
        out.audits.push(Audit {
            round,
            device: self.id.clone(),
            weight,
            plaintexts: prepared.plaintexts.clone(),
            delivered,
        });
        let bytes = postcard::to_stdvec(&ct).expect("ciphertexts encode");
        let enc_s = (platform.seconds() - t).max(0.0);
        self.encrypt_seconds.insert(round, enc_s);
        out.line(format!(
            "round {round}: trained {steps} of {} steps in {:.1} s (last loss {:.4}{}); {} of {} values sent ({} clipped), {} bytes encrypted in {enc_s:.2} s",
            task.steps,
            trained.seconds,
            trained.last_loss,
            if scaled == 1.0 {
                String::new()
            } else {
                format!("; delta scaled by {scaled:.3} to the round's {:.2} effective steps", task.effective_steps)
            },
            prepared.plaintexts.len(),
            self.layout.len(),
            prepared.clipped,
            bytes.len(),
        ));
        self.prepared = Some(prepared);
        out.persist = true;
        match self
            .session
            .on_trained(round, bytes, key.coefficients().to_vec())
        {
            Ok(actions) => self.execute(actions, &mut out),
            Err(e) => out.line(format!("round {round}: {e}")),
        }
        out
    }

    /// The deferred host messages, in the order they came, once training is over.
    fn replay_deferred(&mut self, platform: &mut dyn Platform, out: &mut EdgeOutput) {
        if self.deferred_dropped > 0 {
            out.line(format!(
                "{} host messages that came while this device trained were dropped (more than {MAX_DEFERRED}); the host re-publishes what a round needs",
                self.deferred_dropped
            ));
            out.events.push(Event::DeferredDropped {
                count: self.deferred_dropped,
            });
            self.deferred_dropped = 0;
        }
        while self.training.is_none()
            && let Some(message) = self.deferred.pop_front()
        {
            out.extend(self.on_downlink(message, platform));
        }
    }

    /// Holds `message` until training is over: a duplicate of one held is ignored, and
    /// beyond [`MAX_DEFERRED`] messages the newest is dropped and counted.
    fn defer(&mut self, message: Downlink) -> EdgeOutput {
        if !self.deferred.contains(&message) {
            if self.deferred.len() < MAX_DEFERRED {
                self.deferred.push_back(message);
            } else {
                self.deferred_dropped += 1;
            }
        }
        EdgeOutput::default()
    }

    /// A verified host message ([`open_downlink`](crate::signed::open_downlink)'s), to
    /// the handler of its kind. While the device trains ([`EdgeFleet::take_training`] until
    /// [`EdgeFleet::finish_training`]) only its own downlink is handled; round states,
    /// global updates and snapshot parts, which need the platform, wait for the end of
    /// training.
    pub fn on_downlink(&mut self, message: Downlink, platform: &mut dyn Platform) -> EdgeOutput {
        match message {
            Downlink::Round(state) => self.on_round(state, platform),
            Downlink::Down(message) => self.on_down(message),
            Downlink::Global(part) => self.on_global(part, platform),
            Downlink::Snapshot(part) => self.on_snapshot(part, platform),
        }
    }

    /// Where the driver publishes `message`: a manifest or chunk of a round sharded over
    /// fold workers goes to its shard's upload topic, everything else on the device's uplink
    /// ([`Topics::uplink`]).
    pub fn uplink_topic(&self, topics: &Topics, message: &EdgeMessage) -> String {
        let round = match message {
            EdgeMessage::Manifest(m) => Some(m.round),
            EdgeMessage::Chunk(c) => Some(c.round),
            _ => None,
        };
        let shards = round
            .and_then(|r| self.configs.get(&r))
            .map_or(0, |c| c.fold_shards);
        topics.uplink(self.id(), message, shards)
    }

    /// Whether a round is being trained (between [`EdgeFleet::take_training`] and
    /// [`EdgeFleet::finish_training`]).
    pub fn is_training(&self) -> bool {
        self.training.is_some()
    }
}

/// Most host messages held while a device trains (each at most one packet): round states,
/// global update and snapshot parts. The host sends far fewer in one round; more means
/// replays.
pub const MAX_DEFERRED: usize = 256;

/// A round's local training handed to the driver ([`EdgeFleet::take_training`]): the
/// platform trains `config` from `global`, wherever the driver runs it.
#[derive(Debug, Clone)]
pub struct Training {
    /// The round's configuration.
    pub config: RoundConfig,
    /// The global adapter the round starts from.
    pub global: Vec<f32>,
    /// This device's steps and training time.
    pub task: Task,
    weight: f64,
    selection: Selection,
    encoding: FixedPoint,
}

/// The mask of the round `config` announced, computed from `global`'s history: refused
/// when that history is not the one the round was built on, or when the mask does not have
/// the announced length. The host and every device compute it here.
pub fn round_mask(
    layout: &Layout,
    global: &Global,
    config: &RoundConfig,
) -> Result<Selection, ProtocolError> {
    if config.history_round != global.round() {
        return Err(ProtocolError::OutOfSync {
            have: global.round(),
            built_on: config.history_round,
        });
    }
    let mask = global
        .mask(layout, &config.prune, config.round, config.select_seed)
        .map_err(|e| ProtocolError::Config(e.to_string()))?;
    if mask.len() != config.selected {
        return Err(ProtocolError::Config(format!(
            "mask of {} values, the round announced {}",
            mask.len(),
            config.selected
        )));
    }
    Ok(mask)
}
