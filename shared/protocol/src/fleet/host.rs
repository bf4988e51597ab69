//! The host across rounds: [`HostFleet`] owns the global adapter, the selection history,
//! the recent contributors, the round numbering and the per-round metrics; it builds each
//! round's configuration and mask once, signs what the round machine ([`HostRound`])
//! broadcasts, turns a round's result into the global update's parts and the fleet
//! snapshot, and accepts the devices' evaluation reports.
//!
//! No I/O, no clock: the driver passes in entropy and durations, carries out the
//! [`Publish`]es it gets back, and writes [`HostFleet::state_bytes`] and the outputs
//! ([`HostFleet::metrics_json`], [`HostFleet::loss_plot`], the adapter) after each round.
//!
//! [`HostRound`]: crate::host::HostRound

use crate::ProtocolError;
use crate::fleet::edge::round_mask;
use crate::fleet::steps::{DeviceRound, Effort, LeftOut};
use crate::host::{HostAction, RoundResult};
use crate::messages::{
    DownMessage, EdgeMessage, GlobalPart, GlobalValues, RoundConfig, Route, Snapshot, Topics,
    UploadRefusal,
};
use crate::signed::{Evaluation, HostSigned, HostSigner};
use fedshield_codec::plot::{LinePlot, Series};
use fedshield_codec::{
    Downlink, DownlinkFormat, Global, Layout, PruneConfig, Selection, decode_values,
};
use fedshield_crypto::encoding::{DEFAULT_SCALE_LOG2, FixedPoint};
use fedshield_crypto::identity::{DeviceId, HostCertificate, Registry, RevocationList};
use fedshield_crypto::params::{BodyBits, finest_scale, narrowest_body};
use fedshield_wire::compress_if_smaller;
use std::collections::BTreeMap;

/// The fleet's federation settings (from the host's command line or config file).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    /// Seed of the initial adapter and of the masks' exploration.
    pub seed: u64,
    /// Rounds to run in all.
    pub rounds: u64,
    /// Pruning.
    pub prune: PruneConfig,
    /// Clip value.
    pub clip: f32,
    /// Width of the ciphertext bodies; `None`: the narrowest that suits the enrolled fleet.
    pub body_bits: Option<BodyBits>,
    /// Local steps per round (the most a device is given).
    pub local_steps: usize,
    /// Devices that could train fewer steps in the round's time are left out.
    pub min_local_steps: usize,
    /// Minimum contributors.
    pub threshold: usize,
    /// The secure aggregation's graph (complete, or sparse from a threat model).
    pub secagg_graph: fedshield_crypto::secagg::GraphPolicy,
    /// How the global update goes down (8-bit with error feedback by default).
    pub downlink: DownlinkFormat,
    /// Upload and publication chunk size in bytes.
    pub chunk_bytes: usize,
    /// Fold workers the uploads are sharded over (0: the host folds them).
    pub fold_shards: u32,
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
    /// Each device that joined: its reported status (plan, speed, memory budget, power
    /// mode, thermal state) and its part (steps, or why it was left out).
    #[serde(default)]
    pub devices: BTreeMap<DeviceId, DeviceRound>,
    /// The round's `tau_eff` (`fleet::steps::effective_steps`) over its members.
    #[serde(default)]
    pub effective_steps: Option<f64>,
    /// Tokens the reporting devices trained.
    #[serde(default)]
    pub trained_tokens: Option<u64>,
    /// Energy the reporting devices with power rails drew while training (joules).
    #[serde(default)]
    pub joules: Option<f64>,
    /// `joules` per token trained by those devices.
    #[serde(default)]
    pub joules_per_token: Option<f64>,
    /// Seconds the devices' governors slowed or paused training, summed.
    #[serde(default)]
    pub throttled_seconds: Option<f64>,
    /// Neighbours per device in the round's secure aggregation (SecAgg+ Harary graph);
    /// `None` for the complete graph.
    #[serde(default)]
    pub secagg_degree: Option<usize>,
    /// Shares that reconstruct a device's secrets in that graph.
    #[serde(default)]
    pub secagg_threshold: Option<usize>,
}

/// One device's accepted evaluation report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Held-out loss of the global adapter.
    pub eval_loss: f64,
    /// Seconds the device spent encrypting its update.
    pub encrypt_seconds: f64,
    /// Its local training of the round (steps, tokens, throttling, energy).
    #[serde(default)]
    pub training: Option<Effort>,
}

/// What survives a host restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct HostState {
    /// Rounds completed or failed (interrupted rounds do not count).
    round: u64,
    /// The last round number announced. A host killed mid-round comes back with the next
    /// number (unless the round's journal replays): devices never answer a round number
    /// twice, and the interrupted round's devices settle their uploads as not counted.
    announced: u64,
    global: Global,
    metrics: Vec<RoundMetrics>,
    layout_digest: [u8; 32],
    /// The last round's global update parts as published (re-published after every
    /// reconnection: a restarted broker has lost its retained messages).
    last_global: Vec<Vec<u8>>,
    /// Contributors of the most recent completed rounds (for the snapshot).
    recent: Vec<(u64, Vec<DeviceId>)>,
    /// When this state began (see `RoundConfig::epoch`).
    epoch: u64,
    /// The quantized downlink's error owed at each coordinate (zero for an `f32` downlink).
    downlink: Downlink,
}

/// [`HostState`] as written before the quantized downlink (2026-12-07): read and carried
/// over with nothing owed.
#[derive(serde::Deserialize)]
struct HostStateV1 {
    round: u64,
    announced: u64,
    global: Global,
    metrics: Vec<RoundMetrics>,
    layout_digest: [u8; 32],
    last_global: Vec<Vec<u8>>,
    recent: Vec<(u64, Vec<DeviceId>)>,
    epoch: u64,
}

impl HostState {
    fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes).or_else(|e| {
            // Only bytes that are exactly an earlier state: a damaged current one is
            // reported, not read as an earlier one without its owed error.
            let old: HostStateV1 = match postcard::take_from_bytes::<HostStateV1>(bytes) {
                Ok((old, [])) => old,
                _ => return Err(e),
            };
            Ok(Self {
                downlink: Downlink::new(old.global.len()),
                round: old.round,
                announced: old.announced,
                global: old.global,
                metrics: old.metrics,
                layout_digest: old.layout_digest,
                last_global: old.last_global,
                recent: old.recent,
                epoch: old.epoch,
            })
        })
    }
}

/// Why the host's state was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HostStateRefusal {
    /// The bytes do not decode.
    #[error("does not decode: {0}")]
    Decode(String),
    /// The state of another adapter layout.
    #[error("belongs to another adapter layout")]
    OtherLayout,
}

/// A message for the driver to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The topic.
    pub topic: String,
    /// The payload (signed by the host; empty: delete a retained message).
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

/// A batch of the round machine's actions, signed for the broker.
#[derive(Debug, Default)]
pub struct Sealed {
    /// What to publish, in order.
    pub publish: Vec<Publish>,
    /// Share deliveries among them (uploads open when there are any).
    pub deliveries: usize,
    /// Uploads dropped (each device was told on its downlink).
    pub refused: Vec<(DeviceId, u64, UploadRefusal)>,
    /// Devices left out of the round (they learn it from the roster's plan).
    pub left_out: Vec<(DeviceId, LeftOut)>,
    /// Devices asked to send their upload again (a fold worker restarted).
    pub resent: usize,
    /// The round's outcome, when it ended.
    pub outcome: Option<Result<RoundResult, String>>,
}

/// What an uplink message is to the host.
#[derive(Debug)]
pub enum Uplink {
    /// A message for the round machine.
    Round(DeviceId, EdgeMessage),
    /// An evaluation report, accepted into the metrics of its round.
    Report {
        /// The device.
        device: DeviceId,
        /// The round evaluated.
        round: u64,
        /// The accepted report.
        report: Report,
    },
    /// Refused (logged by the driver; nothing changed).
    Refused(Option<DeviceId>, ProtocolError),
}

/// What a closed round published and recorded.
#[derive(Debug)]
pub struct Closed {
    /// Publish in this order: the spent share deliveries deleted, the global update's
    /// parts and the snapshot (retained).
    pub publish: Vec<Publish>,
    /// Bytes of the global update before compression (0 when the round failed).
    pub raw_bytes: usize,
    /// Bytes of the snapshot as published.
    pub snapshot_bytes: usize,
    /// The round's metrics as recorded.
    pub metrics: RoundMetrics,
}

/// Something the host did or refused, as one line of JSON in its event file
/// (`fedshield-host serve --events FILE`), for tools and tests.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum HostEvent {
    /// A round announced.
    Announced {
        /// The round.
        round: u64,
        /// Values its mask selects.
        selected: usize,
    },
    /// An interrupted round resumed from its journal.
    Resumed {
        /// The round.
        round: u64,
        /// Journalled messages replayed.
        messages: usize,
    },
    /// The round re-published after a reconnection to the broker (with the last global
    /// update and the snapshot) or after dropped messages.
    Republished {
        /// The round under way.
        round: u64,
    },
    /// Incoming messages dropped by the link (its budget was full): the running total; the
    /// round is re-published once the link is idle again.
    LinkDropped {
        /// The round under way.
        round: u64,
        /// Messages dropped since start.
        total: u64,
    },
    /// Share deliveries published: uploads are open.
    UploadsOpen {
        /// The round.
        round: u64,
        /// Members delivered to.
        members: usize,
    },
    /// A fold worker started or restarted during the upload phase: the devices of its
    /// shard were asked to send their uploads again (a sharded round).
    UploadsResent {
        /// The round.
        round: u64,
        /// Devices asked.
        devices: usize,
    },
    /// A device that joined left out of the round by the step rule (it learns why from
    /// the roster's plan).
    LeftOut {
        /// The round.
        round: u64,
        /// The device.
        device: DeviceId,
        /// Why.
        reason: LeftOut,
    },
    /// What a round cost the host, written as it closes: CPU seconds of the round's
    /// thread by stage (`secagg`: joins, the secure aggregation's messages and deadlines,
    /// the share deliveries signed and published; `fold`: upload manifests and chunks
    /// checked and folded into the encrypted sum; `finish`: the message or deadline that
    /// ends the round, which reconstructs the key sum and decrypts; `reports`: devices'
    /// evaluation reports; `journal`: journal writes, syncs and compactions; `resume`:
    /// replaying a journal after a restart; `apply`: decoding and applying the global
    /// update, quantizing, splitting, signing and publishing it; `outputs`: the adapter,
    /// metrics and state files), the whole process's CPU seconds over the round (the MQTT
    /// link's thread included), the process's peak resident set so far, and the round
    /// journal's largest size.
    RoundCost {
        /// The round.
        round: u64,
        /// CPU seconds of the round's thread, by stage.
        cpu_s: BTreeMap<String, f64>,
        /// CPU seconds of the whole process over the round.
        process_cpu_s: f64,
        /// Peak resident set of the process so far, MiB.
        peak_rss_mib: f64,
        /// The round journal's largest size, bytes.
        journal_peak_bytes: u64,
    },
    /// The round's journal compacted: the folded uploads' messages replaced by a
    /// checkpoint of the running sums.
    JournalCompacted {
        /// The round.
        round: u64,
        /// Uploads the checkpoint stands for.
        folded: usize,
        /// The journal's size before and after, bytes.
        bytes_before: u64,
        /// After.
        bytes_after: u64,
    },
    /// A device's upload dropped (the device was told).
    UploadDropped {
        /// The round.
        round: u64,
        /// The device.
        device: DeviceId,
        /// Why.
        reason: UploadRefusal,
    },
    /// A message refused: from whom (when the topic names a device), the refusal's stable
    /// kind ([`ProtocolError::kind`]) and its text.
    Refused {
        /// The sender.
        device: Option<DeviceId>,
        /// [`ProtocolError::kind`].
        kind: String,
        /// The error's text.
        detail: String,
    },
    /// An evaluation report accepted.
    Reported {
        /// The round evaluated.
        round: u64,
        /// The device.
        device: DeviceId,
        /// Its held-out loss.
        eval_loss: f64,
    },
    /// A round closed with its global update published.
    Closed {
        /// The round.
        round: u64,
        /// Its contributors.
        contributors: Vec<DeviceId>,
    },
    /// A round failed.
    Failed {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// Every round has run; the outputs are written.
    Finished {
        /// Rounds completed or failed.
        rounds: u64,
    },
}

impl HostEvent {
    /// The event of a refused message.
    pub fn refused(device: Option<&DeviceId>, error: &ProtocolError) -> Self {
        Self::Refused {
            device: device.cloned(),
            kind: error.kind().to_string(),
            detail: error.to_string(),
        }
    }
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

/// The host's federation state across rounds.
pub struct HostFleet {
    settings: FleetSettings,
    layout: Layout,
    topics: Topics,
    /// The host's certified identity: signs every downlink message, and shows its
    /// certificate and the revocation list with every round state.
    signer: HostSigner,
    state: HostState,
    /// The published snapshot's parts (rebuilt after every round).
    snapshot: Vec<Vec<u8>>,
}

impl std::fmt::Debug for HostFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFleet")
            .field("round", &self.state.round)
            .field("announced", &self.state.announced)
            .finish_non_exhaustive()
    }
}

impl HostFleet {
    /// The host of `topics`' fleet, signing with `signer`: from its saved state (bytes of
    /// [`HostFleet::state_bytes`]) or, when there is none, from the initial adapter in a new
    /// federation epoch `now` (ms since the Unix epoch: devices of an older epoch start over
    /// with this one).
    pub fn new(
        settings: FleetSettings,
        layout: Layout,
        topics: Topics,
        signer: HostSigner,
        saved: Option<&[u8]>,
        now: u64,
    ) -> Result<Self, HostStateRefusal> {
        let state = match saved {
            Some(bytes) => {
                let s = HostState::decode(bytes)
                    .map_err(|e| HostStateRefusal::Decode(e.to_string()))?;
                if s.layout_digest != layout.digest()
                    || s.global.len() != layout.len()
                    || s.downlink.residual().len() != layout.len()
                {
                    return Err(HostStateRefusal::OtherLayout);
                }
                s
            }
            None => HostState {
                round: 0,
                announced: 0,
                global: Global::initial(&layout, settings.seed),
                metrics: Vec::new(),
                layout_digest: layout.digest(),
                last_global: Vec::new(),
                recent: Vec::new(),
                epoch: now,
                downlink: Downlink::new(layout.len()),
            },
        };
        let mut state = state;
        // The last round's global parts are kept sealed; sealed again with this host's key
        // (it may have been rotated since), so that what it re-publishes opens under it.
        for (i, part) in state.last_global.iter_mut().enumerate() {
            if let Ok(envelope) = postcard::from_bytes::<HostSigned>(part) {
                *part = signer.seal(&topics.global(i as u32), envelope.payload);
            }
        }
        let mut fleet = Self {
            settings,
            layout,
            topics,
            signer,
            state,
            snapshot: Vec::new(),
        };
        fleet.build_snapshot();
        Ok(fleet)
    }

    /// Shows the authority's revocation list `list` (verified by the caller) with every
    /// round state from now on: the devices learn of revoked host keys from it.
    pub fn set_revocations(&mut self, list: RevocationList) {
        self.signer.set_revocations(list);
    }

    /// The host's certificate in force.
    pub fn host_certificate(&self) -> &HostCertificate {
        &self.signer.credentials().certificate
    }

    /// The host's public key.
    pub fn host_key(&self) -> [u8; 32] {
        self.signer.identity().public_key()
    }

    /// Shows `cert`, a renewed certificate of the same key, from the next round state on
    /// (refused, and nothing changes, when it certifies another key).
    pub fn renew_certificate(&mut self, cert: HostCertificate) -> Result<(), ProtocolError> {
        self.signer.renew(cert)
    }

    /// The state to keep.
    pub fn state_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.state).expect("the state encodes")
    }

    /// Rounds completed or failed.
    pub fn completed(&self) -> u64 {
        self.state.round
    }

    /// Whether every round has run.
    pub fn finished(&self) -> bool {
        self.state.round >= self.settings.rounds
    }

    /// The federation epoch.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// The global adapter.
    pub fn global(&self) -> &Global {
        &self.state.global
    }

    /// The rounds' metrics.
    pub fn metrics(&self) -> &[RoundMetrics] {
        &self.state.metrics
    }

    /// The number of the last round that finished or failed.
    fn round_number(&self) -> u64 {
        self.state.metrics.last().map_or(0, |m| m.round)
    }

    /// A round announced before a restart and not finished: its journal may resume it.
    pub fn interrupted(&self) -> Option<u64> {
        (self.state.announced > self.round_number()).then_some(self.state.announced)
    }

    /// Announces the next round to a fleet of `enrolled` devices (an interrupted round that
    /// did not resume is recorded as failed first); `entropy` is the random half of the
    /// round's mask seed. Returns the round's configuration and mask; the driver persists
    /// the state (the announced number) before it starts the round.
    pub fn announce(
        &mut self,
        enrolled: usize,
        entropy: u64,
    ) -> Result<(RoundConfig, Selection), ProtocolError> {
        if let Some(round) = self.interrupted() {
            self.state.metrics.push(RoundMetrics {
                round,
                failure: Some("interrupted by a host restart".into()),
                ..RoundMetrics::default()
            });
        }
        let round = self.state.announced + 1;
        let s = &self.settings;
        let select_seed = mix(s.seed, round);
        let selection = self
            .state
            .global
            .mask(&self.layout, &s.prune, round, select_seed)
            .map_err(|e| ProtocolError::Config(e.to_string()))?;
        // The finest fixed-point scale at which the body width sums the whole fleet (the
        // round machine refuses joins beyond the width's cap).
        let body_bits = s
            .body_bits
            .or_else(|| narrowest_body(enrolled))
            .unwrap_or(BodyBits::FULL);
        let scale_log2 = finest_scale(body_bits, enrolled.max(1)).unwrap_or(DEFAULT_SCALE_LOG2);
        let config = RoundConfig {
            epoch: self.state.epoch,
            round,
            mask_seed: (u128::from(select_seed) << 64) | u128::from(entropy),
            select_seed,
            prune: s.prune.clone(),
            clip: s.clip,
            scale_log2,
            body_bits,
            layout_digest: self.layout.digest(),
            selected: selection.len(),
            history_round: self.state.global.round(),
            init_seed: s.seed,
            local_steps: s.local_steps,
            min_local_steps: s.min_local_steps,
            threshold: s.threshold,
            secagg_graph: s.secagg_graph,
            chunk_bytes: s.chunk_bytes,
            fold_shards: s.fold_shards,
        };
        self.state.announced = round;
        Ok((config, selection))
    }

    /// The mask of a round resumed from its journal.
    pub fn selection(&self, config: &RoundConfig) -> Result<Selection, ProtocolError> {
        round_mask(&self.layout, &self.state.global, config)
    }

    /// Signs the round machine's actions for the broker.
    pub fn seal(&self, actions: Vec<HostAction>) -> Sealed {
        let mut sealed = Sealed::default();
        for a in actions {
            match a {
                HostAction::Broadcast(state) => {
                    let topic = self.topics.round();
                    let payload = self.signer.seal_round(&topic, &state);
                    sealed.publish.push(Publish {
                        topic,
                        payload,
                        retain: true,
                    });
                }
                HostAction::Deliver(device, delivery) => {
                    let topic = self.topics.down(&device);
                    let message = DownMessage::Shares(delivery);
                    let payload = self.signer.seal_message(&topic, &message);
                    sealed.deliveries += 1;
                    sealed.publish.push(Publish {
                        topic,
                        payload,
                        retain: true,
                    });
                }
                HostAction::RefuseUpload {
                    device,
                    round,
                    reason,
                } => {
                    let topic = self.topics.down(&device);
                    let notice = DownMessage::UploadRefused {
                        round,
                        reason: reason.clone(),
                    };
                    let payload = self.signer.seal_message(&topic, &notice);
                    sealed.publish.push(Publish {
                        topic,
                        payload,
                        retain: false,
                    });
                    sealed.refused.push((device, round, reason));
                }
                HostAction::Shard(shard, command) => sealed.publish.push(Publish {
                    topic: self.topics.fold_command(shard),
                    payload: postcard::to_stdvec(&command).expect("commands encode"),
                    retain: false,
                }),
                HostAction::Resend { device, round } => {
                    let topic = self.topics.down(&device);
                    let payload = self
                        .signer
                        .seal_message(&topic, &DownMessage::Resend { round });
                    sealed.resent += 1;
                    sealed.publish.push(Publish {
                        topic,
                        payload,
                        retain: false,
                    });
                }
                HostAction::LeftOut { device, reason } => sealed.left_out.push((device, reason)),
                HostAction::Finished(r) => sealed.outcome = Some(Ok(r)),
                HostAction::Failed(why) => sealed.outcome = Some(Err(why)),
            }
        }
        sealed
    }

    /// Decodes a finished round's sums, quantizes them for the downlink (with the error
    /// owed from earlier rounds, `FleetSettings::downlink`) and applies what the devices
    /// will apply to the global adapter; returns the global update as it travels.
    pub fn apply(
        &mut self,
        config: &RoundConfig,
        selection: &Selection,
        result: &RoundResult,
    ) -> Result<GlobalValues, ProtocolError> {
        let fail = |e: fedshield_codec::CodecError| {
            ProtocolError::Config(format!("round {}: {e}", config.round))
        };
        let encoding = FixedPoint::with_scale(config.clip, config.scale_log2)
            .map_err(|e| ProtocolError::Config(e.to_string()))?;
        let exact =
            decode_values(selection, &result.sums, &encoding, result.total_weight).map_err(fail)?;
        // Changed together or not at all: the owed error only once the adapter took the
        // update.
        let mut downlink = self.state.downlink.clone();
        let (wire, applied) = match self.settings.downlink {
            DownlinkFormat::F32 => (GlobalValues::F32(exact.clone()), exact),
            DownlinkFormat::Q8 => {
                let (q, sent) = downlink.quantize(selection, &exact).map_err(fail)?;
                (GlobalValues::Q8(q), sent)
            }
        };
        self.state.global.apply(selection, &applied).map_err(fail)?;
        self.state.downlink = downlink;
        Ok(wire)
    }

    /// Records the end of round `round`: `outcome` is the result and the global update's
    /// values from [`HostFleet::apply`], or why the round failed. `delivered_to` are the
    /// devices whose share deliveries are spent, `devices` each joined device's status and
    /// part (`HostRound::devices`); `host_seconds` and `round_seconds` the host's time in
    /// the round machine and the round's wall time.
    #[allow(clippy::too_many_arguments)]
    pub fn close(
        &mut self,
        round: u64,
        delivered_to: Vec<DeviceId>,
        devices: BTreeMap<DeviceId, DeviceRound>,
        outcome: Result<(RoundResult, GlobalValues), String>,
        host_seconds: f64,
        round_seconds: f64,
    ) -> Closed {
        // The share deliveries are spent: delete the retained copies (an empty retained
        // publish), so that no device finds another round's delivery on connecting.
        let mut publish: Vec<Publish> = delivered_to
            .iter()
            .map(|d| Publish {
                topic: self.topics.down(d),
                payload: Vec::new(),
                retain: true,
            })
            .collect();
        let mut metrics = RoundMetrics {
            round,
            devices,
            ..RoundMetrics::default()
        };
        let mut raw_bytes = 0;
        match outcome {
            Ok((result, values)) => {
                // zstd pays on f32 values (unlike on ciphertext bodies): each part travels
                // in a `Compressed` envelope, raw when compression would not shrink it.
                self.state.last_global.clear();
                for part in GlobalPart::split(
                    self.state.epoch,
                    round,
                    &result.contributors,
                    &values,
                    self.settings.chunk_bytes,
                ) {
                    let bytes = postcard::to_stdvec(&part).expect("parts encode");
                    raw_bytes += bytes.len();
                    let topic = self.topics.global(part.index);
                    let compressed =
                        postcard::to_stdvec(&compress_if_smaller(&bytes)).expect("envelopes");
                    self.state
                        .last_global
                        .push(self.signer.seal(&topic, compressed));
                }
                self.state.recent.push((round, result.contributors.clone()));
                let excess = self.state.recent.len().saturating_sub(Snapshot::RECENT);
                self.state.recent.drain(..excess);
                self.build_snapshot();
                publish.extend(self.retained());
                metrics.download_bytes_per_client =
                    self.state.last_global.iter().map(Vec::len).sum::<usize>() as u64;
                metrics.contributors = result.contributors.len();
                metrics.effective_steps = Some(result.effective_steps);
                metrics.secagg_degree = result.secagg_graph.map(|(k, _)| k);
                metrics.secagg_threshold = result.secagg_graph.map(|(_, t)| t);
                metrics.upload_bytes_per_client = result.upload_bytes;
            }
            Err(why) => metrics.failure = Some(why),
        }
        metrics.host_crypto_seconds = host_seconds;
        metrics.crypto_seconds = host_seconds;
        metrics.round_seconds = round_seconds;
        self.state.metrics.push(metrics.clone());
        self.state.round += 1;
        Closed {
            publish,
            raw_bytes,
            snapshot_bytes: self.snapshot.iter().map(Vec::len).sum(),
            metrics,
        }
    }

    /// The retained publications a device needs to catch up: the last round's global
    /// update parts and the fleet snapshot (re-published after every reconnection).
    pub fn retained(&self) -> Vec<Publish> {
        let global = self
            .state
            .last_global
            .iter()
            .enumerate()
            .map(|(i, p)| Publish {
                topic: self.topics.global(i as u32),
                payload: p.clone(),
                retain: true,
            });
        let snapshot = self.snapshot.iter().enumerate().map(|(i, p)| Publish {
            topic: self.topics.snapshot(i as u32),
            payload: p.clone(),
            retain: true,
        });
        global.chain(snapshot).collect()
    }

    /// Rebuilds the snapshot's parts from the state (none before the first round).
    fn build_snapshot(&mut self) {
        let global = &self.state.global;
        if global.round() == 0 {
            return;
        }
        let snapshot = Snapshot {
            epoch: self.state.epoch,
            round: global.round(),
            global: global.values().to_vec(),
            history: global.history().clone(),
            recent: self.state.recent.clone(),
        };
        self.snapshot = snapshot
            .split(self.settings.chunk_bytes)
            .iter()
            .map(|part| {
                let topic = self.topics.snapshot(part.index);
                self.signer.seal_message(&topic, part)
            })
            .collect();
    }

    /// Sorts an uplink message: for the round machine, an evaluation report (verified
    /// against `registry` and recorded), or refused.
    pub fn on_uplink(
        &mut self,
        topic: &str,
        payload: &[u8],
        limit: usize,
        registry: &Registry,
    ) -> Uplink {
        let Some(Route::Up(device)) = self.topics.route(topic) else {
            return Uplink::Refused(
                None,
                ProtocolError::Malformed(format!("a message on {topic}")),
            );
        };
        let msg: EdgeMessage = match crate::decode(payload, limit) {
            Ok(m) => m,
            Err(e) => return Uplink::Refused(Some(device), e),
        };
        match msg {
            EdgeMessage::Evaluated(report) => match self.on_report(&device, &report, registry) {
                Ok(accepted) => Uplink::Report {
                    device,
                    round: report.round,
                    report: accepted,
                },
                Err(e) => Uplink::Refused(Some(device), e),
            },
            msg => Uplink::Round(device, msg),
        }
    }

    /// Verifies and records `device`'s evaluation of a finished round's global adapter.
    fn on_report(
        &mut self,
        device: &DeviceId,
        report: &Evaluation,
        registry: &Registry,
    ) -> Result<Report, ProtocolError> {
        let enrolment = registry.enrolment(device)?;
        report.verify(device, &enrolment.public_key)?;
        let round = report.round;
        let Some(m) = self.state.metrics.iter_mut().find(|m| m.round == round) else {
            return Err(crate::Refusal::UnfinishedRound(round).into());
        };
        let accepted = Report {
            eval_loss: report.eval_loss,
            encrypt_seconds: report.encrypt_seconds,
            training: report.training.clone(),
        };
        m.reports.insert(device.clone(), accepted.clone());
        let efforts: Vec<&Effort> = m
            .reports
            .values()
            .filter_map(|r| r.training.as_ref())
            .collect();
        if !efforts.is_empty() {
            m.trained_tokens = Some(efforts.iter().map(|e| e.tokens).sum());
            m.throttled_seconds = Some(efforts.iter().map(|e| e.throttled_seconds).sum());
            let metered: Vec<&&Effort> = efforts.iter().filter(|e| e.joules.is_some()).collect();
            if !metered.is_empty() {
                let joules: f64 = metered.iter().filter_map(|e| e.joules).sum();
                let tokens: u64 = metered.iter().map(|e| e.tokens).sum();
                m.joules = Some(joules);
                m.joules_per_token = (tokens > 0).then(|| joules / tokens as f64);
            }
        }
        let n = m.reports.len() as f64;
        m.eval_loss = Some(m.reports.values().map(|r| r.eval_loss).sum::<f64>() / n);
        let enc = m.reports.values().map(|r| r.encrypt_seconds).sum::<f64>() / n;
        m.encrypt_seconds = Some(enc);
        m.crypto_seconds = m.host_crypto_seconds + enc;
        Ok(accepted)
    }

    /// Whether every contributor of the last round has reported its evaluation.
    pub fn reports_complete(&self) -> bool {
        self.state
            .metrics
            .last()
            .is_none_or(|m| m.reports.len() >= m.contributors)
    }

    /// `metrics.json`: the fleet, the adapter's size, the pruning and every round.
    pub fn metrics_json(&self, fleet: &str) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "fleet": fleet,
            "values": self.layout.len(),
            "prune": self.settings.prune,
            "rounds": self.state.metrics,
        }))
        .expect("metrics encode")
    }

    /// The held-out loss per round, as an SVG plot.
    pub fn loss_plot(&self, fleet: &str) -> String {
        LinePlot {
            title: format!("FedShield fleet {fleet}: held-out loss per round"),
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
        }
        .to_svg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_written_before_the_quantized_downlink_reads_with_nothing_owed() {
        let global = Global::starting_from(vec![0.25; 40]);
        // The fields of the earlier layout, in order: postcard writes a struct as its fields.
        let old = postcard::to_stdvec(&(
            7u64,
            8u64,
            &global,
            Vec::<RoundMetrics>::new(),
            [3u8; 32],
            vec![vec![1u8, 2]],
            vec![(7u64, vec![DeviceId("edge-0".into())])],
            1234u64,
        ))
        .unwrap();
        let state = HostState::decode(&old).unwrap();
        assert_eq!((state.round, state.announced, state.epoch), (7, 8, 1234));
        assert_eq!(state.global, global);
        assert_eq!(state.downlink, Downlink::new(40));
        // The current layout round-trips, and bytes of neither layout are refused.
        let mut owed = state.clone();
        owed.downlink = Downlink::new(40);
        let bytes = postcard::to_stdvec(&owed).unwrap();
        assert_eq!(HostState::decode(&bytes).unwrap().downlink, owed.downlink);
        assert!(HostState::decode(&old[..old.len() - 3]).is_err());
        // A current state cut inside its owed error is refused, not read as an earlier one.
        assert!(HostState::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
