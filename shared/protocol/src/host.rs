//! The host's round: a pure state machine. The driver feeds it the messages that arrive on
//! the uplink topics ([`HostRound::on_message`]) and the clock ([`HostRound::on_tick`]), and
//! carries out the [`HostAction`]s it returns. Nothing here sleeps, spawns or does I/O.
//!
//! Phases: announce (collect joins) -> roster (members train and exchange shares; the host
//! collects shares, delivers them, then collects uploads and masked inputs) -> survivors ->
//! unmask -> closed. Every phase ends when everyone expected has answered or at its deadline,
//! and refuses to go on below the threshold (the round fails; the next one starts from the
//! same global adapter).
//!
//! An upload is folded into the running encrypted sum only once it is complete, its bytes
//! hash to the digest its owner signed in its masked input, and the secure aggregation has
//! accepted that masked input: the folded set is then exactly the key aggregate's
//! contributor set, so the sum decrypts. Memory: the sum (one u32 per value) plus the
//! uploads still in flight.

use crate::fleet::steps::{
    Assignment, DeviceRound, LeftOut, RoundPlan, StepRule, TRAIN_SHARE, effective_steps,
};
use crate::fold::Uploads;
use crate::messages::{
    Chunk, EdgeMessage, Manifest, Phase, RoundConfig, RoundState, UploadRefusal,
};
use crate::shard::{
    MAX_SHARDS, Partial, PartialPart, ShardCommand, ShardReport, ShardUplink, partial_parts,
    shard_of,
};
use crate::signed::{MAX_REPORTED_LOSS, ReportRefusal, check_value, join_report_bytes};
use crate::weights::{check_claim, fedavg_weights};
use crate::{ProtocolError, Refusal};
use fedshield_crypto::identity::{DeviceId, Registry};
use fedshield_crypto::packed::{Aggregate, MaskSeed};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use fedshield_crypto::params::max_clients;
use fedshield_crypto::secagg::{ClientBody, SecAggConfig, Server, ShareDelivery, SignedMessage};
use std::collections::{BTreeMap, BTreeSet};

/// How long each phase may take, in ms of the driver's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deadlines {
    /// Joining.
    pub join_ms: u64,
    /// Share exchange.
    pub shares_ms: u64,
    /// Local training and upload (from the roster).
    pub upload_ms: u64,
    /// Consistency signatures and unmasking, each.
    pub finish_ms: u64,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum HostAction {
    /// Publish (retained) on `fedshield/{f}/round`.
    Broadcast(RoundState),
    /// Publish (retained) on `fedshield/{f}/down/{d}`.
    Deliver(DeviceId, ShareDelivery),
    /// Tell a device (on `fedshield/{f}/down/{d}`, not retained) that its upload of the
    /// round was dropped: it sits the round out, and the round no longer waits for it.
    RefuseUpload {
        /// The device.
        device: DeviceId,
        /// The round.
        round: u64,
        /// Why.
        reason: UploadRefusal,
    },
    /// A device that joined sits the round out (its status is critical, or it is too slow
    /// for the round's time); the roster's plan names it with the reason.
    LeftOut {
        /// The device.
        device: DeviceId,
        /// Why.
        reason: LeftOut,
    },
    /// The round is over: decoded sums of the contributors, to turn into the global update.
    Finished(RoundResult),
    /// The round failed; start the next.
    Failed(String),
    /// Publish on `fedshield/{f}/fold/{s}/cmd` (not retained): a command to the fold
    /// worker of shard `s` (a round sharded over fold workers, [`crate::shard`]).
    Shard(u32, ShardCommand),
    /// Ask a device (on `fedshield/{f}/down/{d}`, not retained) to send its upload again:
    /// the fold worker that had it restarted.
    Resend {
        /// The device.
        device: DeviceId,
        /// The round.
        round: u64,
    },
}

/// The state of a round's folded uploads: their devices, the secure aggregation's running
/// sum of their masked inputs with the digests they signed, the encrypted running sum and the
/// bytes folded. O(update + devices), however many uploads it stands for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FoldCheckpoint {
    /// The folded devices, sorted.
    pub folded: Vec<DeviceId>,
    /// Sum of their masked inputs (mod 2^64).
    pub masked_sum: Vec<u64>,
    /// The update digest each signed with its masked input.
    pub digests: BTreeMap<DeviceId, [u8; 32]>,
    /// The encrypted running sum's bodies.
    pub sum: Vec<u32>,
    /// Updates in it.
    pub contributions: usize,
    /// Bytes of the folded uploads.
    pub upload_bytes: u64,
}

/// A finished round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundResult {
    /// The round.
    pub round: u64,
    /// Contributors, sorted.
    pub contributors: Vec<DeviceId>,
    /// Sum of the contributors' weights (divide the sums by it).
    pub total_weight: f64,
    /// Decrypted plaintext sums, one per selected value.
    pub sums: Vec<u64>,
    /// Mean of the evaluation losses the members reported on joining.
    pub eval_loss: Option<f64>,
    /// Bytes of encrypted updates received per contributor.
    pub upload_bytes: u64,
    /// The round's `tau_eff` (the roster's plan).
    pub effective_steps: f64,
    /// The secure aggregation's graph: `(degree, threshold)` of its Harary graph, `None`
    /// for the complete graph.
    pub secagg_graph: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostPhase {
    Joining,
    Sharing,
    Uploading,
    /// A sharded round: the fold workers' partial sums are being collected.
    Collecting,
    Consistency,
    Unmasking,
    Done,
}

impl HostPhase {
    fn name(self) -> &'static str {
        match self {
            Self::Joining => "Joining",
            Self::Sharing => "Sharing",
            Self::Uploading => "Uploading",
            Self::Collecting => "Collecting",
            Self::Consistency => "Consistency",
            Self::Unmasking => "Unmasking",
            Self::Done => "Done",
        }
    }
}

/// The fold workers of a sharded round, as the host knows them.
#[derive(Debug)]
struct Shards {
    /// Each shard's worker process, as last heard from.
    instance: Vec<Option<u64>>,
    /// The devices each shard's current worker reported folded, with the digests their
    /// masked inputs signed.
    progress: Vec<BTreeMap<DeviceId, [u8; 32]>>,
    /// The sum of those devices' masked inputs (mod 2^64), per shard: a masked input is
    /// held only until its upload is folded.
    masked_sums: Vec<Vec<u64>>,
    /// The parts of the partial sums received after the close, until complete.
    parts: Vec<BTreeMap<u32, PartialPart>>,
    /// The partial sums received whole after the close.
    partials: Vec<Option<Partial>>,
}

/// One round on the host.
#[derive(Debug)]
pub struct HostRound {
    config: RoundConfig,
    deadlines: Deadlines,
    phase: HostPhase,
    deadline: u64,
    server: Server,
    registry: Registry,
    losses: BTreeMap<DeviceId, f64>,
    weights: BTreeMap<DeviceId, f64>,
    rule: StepRule,
    /// Each joined device's status and part in the round.
    devices: BTreeMap<DeviceId, DeviceRound>,
    uploads: Uploads,
    /// Checked masked inputs held until their uploads are folded.
    masked: BTreeMap<DeviceId, SignedMessage>,
    aggregate: Aggregate,
    folded: BTreeSet<DeviceId>,
    /// Members whose signed upload was inconsistent: dropped, told, not waited for.
    refused: BTreeMap<DeviceId, UploadRefusal>,
    upload_bytes: u64,
    /// The last phase broadcast and the share deliveries of the round (re-published after a
    /// restart or reconnection, see [`HostRound::republish`]).
    last_phase: Phase,
    deliveries: Vec<(DeviceId, ShareDelivery)>,
    incarnation: u32,
    effective_steps: f64,
    /// The fold workers, in a round sharded over them (`config.fold_shards > 0`).
    shards: Option<Shards>,
}

impl HostRound {
    /// Opens round `config.round` for the devices of `registry`; returns the announcement.
    pub fn start(
        config: RoundConfig,
        registry: Registry,
        deadlines: Deadlines,
        now: u64,
    ) -> Result<(Self, Vec<HostAction>), ProtocolError> {
        if config.selected == 0 || config.chunk_bytes == 0 {
            return Err(ProtocolError::Config(
                "selected values and chunk size must be positive".into(),
            ));
        }
        if config.fold_shards > MAX_SHARDS {
            return Err(ProtocolError::Config(format!(
                "{} fold shards, at most {MAX_SHARDS}",
                config.fold_shards
            )));
        }
        let shards = (config.fold_shards > 0).then(|| {
            let k = config.fold_shards as usize;
            Shards {
                instance: vec![None; k],
                progress: vec![BTreeMap::new(); k],
                masked_sums: vec![vec![0; POLYNOMIAL_SIZE]; k],
                parts: vec![BTreeMap::new(); k],
                partials: vec![None; k],
            }
        });
        let cap = max_clients(config.body_bits, config.scale_log2);
        if config.threshold > cap {
            return Err(ProtocolError::Config(format!(
                "threshold {} above the {cap} clients that {}-bit bodies at scale 2^{} can sum",
                config.threshold, config.body_bits, config.scale_log2
            )));
        }
        let rule = StepRule {
            steps: config.local_steps,
            min_steps: config.min_local_steps,
            train_seconds: deadlines.upload_ms as f64 / 1000.0 * TRAIN_SHARE,
        };
        rule.check().map_err(ProtocolError::Config)?;
        let server = Server::new(
            SecAggConfig {
                round: config.round,
                threshold: config.threshold,
                vector_len: POLYNOMIAL_SIZE,
                graph: config.secagg_graph,
            },
            registry.clone(),
        )?;
        let deadline = now + deadlines.join_ms;
        let mut round = Self {
            uploads: Uploads::new(&config),
            masked: BTreeMap::new(),
            aggregate: Aggregate::new(config.selected, config.body_bits),
            config,
            deadlines,
            phase: HostPhase::Joining,
            deadline,
            server,
            registry,
            losses: BTreeMap::new(),
            weights: BTreeMap::new(),
            rule,
            devices: BTreeMap::new(),
            folded: BTreeSet::new(),
            refused: BTreeMap::new(),
            upload_bytes: 0,
            last_phase: Phase::Announce {
                deadline_ms: deadline,
            },
            deliveries: Vec::new(),
            incarnation: 0,
            effective_steps: 0.0,
            shards,
        };
        let announce = round.broadcast(Phase::Announce {
            deadline_ms: deadline,
        });
        Ok((round, vec![announce]))
    }

    /// Re-publishes the round's retained messages (its current state and the share
    /// deliveries) and its upload refusals under the next incarnation, after a host
    /// restart or a reconnection to the broker: the broker may have lost them, and edges
    /// re-send their messages of the current phase when they see the new incarnation.
    pub fn republish(&mut self) -> Vec<HostAction> {
        self.incarnation += 1;
        let mut actions = vec![HostAction::Broadcast(self.state(self.last_phase.clone()))];
        actions.extend(
            self.deliveries
                .iter()
                .map(|(d, s)| HostAction::Deliver(d.clone(), s.clone())),
        );
        actions.extend(
            self.refused
                .iter()
                .map(|(d, reason)| HostAction::RefuseUpload {
                    device: d.clone(),
                    round: self.config.round,
                    reason: reason.clone(),
                }),
        );
        for s in 0..self.config.fold_shards {
            actions.extend(self.shard_commands(s));
        }
        actions
    }

    /// The devices the round delivered shares to (their retained deliveries are cleared
    /// by the driver once the round is over).
    pub fn delivered_to(&self) -> impl Iterator<Item = &DeviceId> {
        self.deliveries.iter().map(|(d, _)| d)
    }

    /// Whether the clock has passed the current phase's deadline: then, and only then,
    /// [`HostRound::on_tick`] changes the round (the driver journals such ticks).
    pub fn due(&self, now: u64) -> bool {
        self.phase != HostPhase::Done && now >= self.deadline
    }

    /// Each device that joined: the status it reported and its part in the round.
    pub fn devices(&self) -> &BTreeMap<DeviceId, DeviceRound> {
        &self.devices
    }

    fn left_out(&self) -> usize {
        self.devices
            .values()
            .filter(|d| matches!(d.assignment, Assignment::LeftOut(_)))
            .count()
    }

    /// The round's configuration.
    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    /// Whether the round is over (finished or failed).
    pub fn is_done(&self) -> bool {
        self.phase == HostPhase::Done
    }

    /// Whether `device`'s upload is in the running sum: its manifest and chunks, sent
    /// again (a device re-sending its phase after a re-publish or a host restart), change
    /// nothing, and the driver neither hands them over nor journals them (held, they would
    /// wait in memory until the round ends).
    pub fn has_folded(&self, device: &DeviceId) -> bool {
        self.folded.contains(device)
    }

    /// Bytes of the uploads folded into the running sum so far.
    pub fn folded_bytes(&self) -> u64 {
        self.upload_bytes
    }

    /// About the size of a [`FoldCheckpoint`] of this round, in bytes (the running sum's
    /// bodies, the masked sum, a digest per folded device).
    pub fn checkpoint_bytes(&self) -> u64 {
        let (sum, _) = self.aggregate.parts();
        (4 * sum.len() + 8 * POLYNOMIAL_SIZE + 64 * self.folded.len()) as u64
    }

    /// The folded uploads' state, to stand for their spooled messages in the journal
    /// (`journal::compact`): `None` outside the upload phase or before the first fold.
    pub fn checkpoint(&self) -> Option<FoldCheckpoint> {
        if self.phase != HostPhase::Uploading || self.folded.is_empty() || self.shards.is_some() {
            return None;
        }
        let (masked_sum, digests) = self.server.masked_inputs();
        let (sum, contributions) = self.aggregate.parts();
        Some(FoldCheckpoint {
            folded: self.folded.iter().cloned().collect(),
            masked_sum: masked_sum.to_vec(),
            digests: digests.clone(),
            sum: sum.to_vec(),
            contributions,
            upload_bytes: self.upload_bytes,
        })
    }

    /// Puts back a [`FoldCheckpoint`] while replaying a journal: the round must be
    /// collecting uploads with none folded, and hold no partial upload of a folded device.
    pub fn restore(&mut self, checkpoint: &FoldCheckpoint) -> Result<(), ProtocolError> {
        let bad = |why: &str| ProtocolError::Malformed(format!("journal checkpoint: {why}"));
        if self.phase != HostPhase::Uploading || !self.folded.is_empty() {
            return Err(bad("not in an upload phase with nothing folded"));
        }
        let folded: BTreeSet<DeviceId> = checkpoint.folded.iter().cloned().collect();
        if folded.len() != checkpoint.folded.len()
            || !folded.iter().eq(checkpoint.digests.keys())
            || folded.len() != checkpoint.contributions
        {
            return Err(bad("its folded devices, digests and count disagree"));
        }
        if let Some(d) = folded
            .iter()
            .find(|d| self.uploads.contains(d) || self.masked.contains_key(*d))
        {
            return Err(bad(&format!("{d} is both folded and uploading")));
        }
        let aggregate = Aggregate::from_parts(
            self.config.selected,
            self.config.body_bits,
            checkpoint.sum.clone(),
            checkpoint.contributions,
        )
        .map_err(|e| bad(&e.to_string()))?;
        self.server
            .restore_masked_inputs(checkpoint.masked_sum.clone(), checkpoint.digests.clone())?;
        self.aggregate = aggregate;
        self.folded = folded;
        self.upload_bytes = checkpoint.upload_bytes;
        Ok(())
    }

    fn state(&self, phase: Phase) -> RoundState {
        RoundState {
            config: self.config.clone(),
            phase,
            incarnation: self.incarnation,
        }
    }

    /// Broadcasts `phase`, remembering it for [`HostRound::republish`].
    fn broadcast(&mut self, phase: Phase) -> HostAction {
        self.last_phase = phase.clone();
        HostAction::Broadcast(self.state(phase))
    }

    /// Handles one message from `from` (the device named by the uplink topic). An error
    /// means the message was refused and nothing changed; the round goes on.
    pub fn on_message(
        &mut self,
        from: &DeviceId,
        message: EdgeMessage,
        now: u64,
    ) -> Result<Vec<HostAction>, ProtocolError> {
        let sender = match &message {
            EdgeMessage::Join { advert, .. } | EdgeMessage::SecAgg(advert) => Some(&advert.sender),
            _ => None,
        };
        if sender.is_some_and(|s| s != from) {
            return Err(Refusal::Impersonation {
                signer: sender.expect("checked").clone(),
                uplink: from.clone(),
            }
            .into());
        }
        if let Some(reason) = self.refused.get(from)
            && matches!(
                message,
                EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) | EdgeMessage::SecAgg(_)
            )
            && self.phase == HostPhase::Uploading
        {
            return Err(ProtocolError::UploadRefused {
                device: from.clone(),
                round: self.config.round,
                reason: reason.clone(),
            });
        }
        let mut actions = Vec::new();
        match message {
            EdgeMessage::Join {
                advert,
                eval_loss,
                status,
                signature,
            } => {
                self.expect(HostPhase::Joining, "join")?;
                let ClientBody::Advertise(claim) = &advert.body else {
                    return Err(Refusal::NotAnAdvert(from.clone()).into());
                };
                check_claim(from, claim.weight)?;
                // Signature, round, enrolment and duplicates of the advert first.
                self.server.check(&advert)?;
                let key = self.registry.enrolment(from)?.public_key;
                let report = join_report_bytes(from, advert.round, eval_loss, &status);
                if !fedshield_crypto::identity::verify(&key, &report, &signature) {
                    return Err(ReportRefusal::BadSignature(from.clone()).into());
                }
                if let Some(l) = eval_loss {
                    check_value("held-out loss", l, MAX_REPORTED_LOSS)?;
                }
                status.check()?;
                // The device's part depends on its own status only: a device left out is
                // told (in the roster's plan) and never enters the secure aggregation.
                let assignment = self.rule.assign(&status);
                if let Assignment::LeftOut(reason) = &assignment {
                    let reason = reason.clone();
                    self.devices.insert(
                        from.clone(),
                        DeviceRound {
                            status: *status,
                            assignment,
                        },
                    );
                    actions.push(HostAction::LeftOut {
                        device: from.clone(),
                        reason,
                    });
                    actions.extend(self.advance(now, false));
                    return Ok(actions);
                }
                // The noise and rounding budget holds for at most `cap` contributions.
                let cap = max_clients(self.config.body_bits, self.config.scale_log2);
                if self.server.collected() >= cap {
                    return Err(Refusal::RoundFull {
                        device: from.clone(),
                        cap,
                        body_bits: self.config.body_bits,
                    }
                    .into());
                }
                self.server.receive(advert)?;
                self.devices.insert(
                    from.clone(),
                    DeviceRound {
                        status: *status,
                        assignment,
                    },
                );
                if let Some(l) = eval_loss {
                    self.losses.insert(from.clone(), l);
                }
            }
            EdgeMessage::SecAgg(msg) => match msg.body {
                ClientBody::MaskedInput { .. } => {
                    self.expect(HostPhase::Uploading, "masked input")?;
                    if self.masked.contains_key(from) || self.folded.contains(from) {
                        return Err(Refusal::DuplicateMaskedInput(from.clone()).into());
                    }
                    // Checked before it is held: a forged or replayed masked input never
                    // takes the slot of the device's real one.
                    self.server.check(&msg)?;
                    if self.shards.is_some() {
                        // The device's fold worker folds its upload now it is admitted.
                        let shard = shard_of(from, self.config.fold_shards);
                        actions.push(HostAction::Shard(
                            shard,
                            ShardCommand::Admit {
                                round: self.config.round,
                                device: from.clone(),
                                digest: masked_digest(&msg),
                            },
                        ));
                        self.masked.insert(from.clone(), msg);
                    } else {
                        self.masked.insert(from.clone(), msg);
                        actions = self.try_fold(from)?;
                    }
                }
                _ => self.server.receive(msg)?,
            },
            EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) if self.shards.is_some() => {
                return Err(Refusal::ShardedUpload(from.clone()).into());
            }
            EdgeMessage::Manifest(m) => {
                self.on_manifest(from, m)?;
                actions = self.try_fold(from)?;
            }
            EdgeMessage::Chunk(c) => {
                self.on_chunk(from, c)?;
                actions = self.try_fold(from)?;
            }
            EdgeMessage::Evaluated(_) => {
                return Err(Refusal::ReportInRound.into());
            }
        }
        actions.extend(self.advance(now, false));
        Ok(actions)
    }

    /// Handles a fold worker's report (a round sharded over fold workers). An error means
    /// it was refused and nothing changed.
    ///
    /// A report under an instance not heard from before (a worker that started, or
    /// restarted and lost its partial sum) opens the round on it again with the admissions
    /// of its shard; during the upload phase the devices it was folding for are asked to
    /// send their uploads again, and nothing it reported folded before counts any more.
    pub fn on_shard(
        &mut self,
        uplink: ShardUplink,
        now: u64,
    ) -> Result<Vec<HostAction>, ProtocolError> {
        let round = self.config.round;
        let phase = self.phase;
        let Some(shards) = self.shards.as_mut() else {
            return Err(ProtocolError::Config(format!(
                "round {round} is not sharded over fold workers"
            )));
        };
        let s = uplink.shard;
        let i = s as usize;
        if i >= shards.instance.len() {
            return Err(ProtocolError::Config(format!(
                "shard {s} of a round of {} shards",
                shards.instance.len()
            )));
        }
        let wrong_round = |what, got| -> ProtocolError { Refusal::WrongRound { what, got }.into() };
        let wrong_phase = |what| -> ProtocolError {
            Refusal::WrongPhase {
                what,
                phase: phase.name(),
                round,
            }
            .into()
        };
        // Check the report before anything changes.
        match &uplink.report {
            ShardReport::Hello { .. } => {}
            ShardReport::Folded { round: r, device }
            | ShardReport::Refused {
                round: r, device, ..
            } => {
                if *r != round {
                    return Err(wrong_round("shard report", *r));
                }
                if phase != HostPhase::Uploading {
                    return Err(wrong_phase("shard report"));
                }
                if shard_of(device, self.config.fold_shards) != s
                    || !self.masked.contains_key(device)
                {
                    return Err(Refusal::NotInRoster(device.clone()).into());
                }
            }
            ShardReport::Partial(p) => {
                if p.round != round {
                    return Err(wrong_round("partial sum", p.round));
                }
                if phase != HostPhase::Collecting {
                    return Err(wrong_phase("partial sum"));
                }
                let (count, _) = partial_parts(&self.config);
                if p.count != count || p.index >= count {
                    return Err(ProtocolError::Malformed(format!(
                        "partial sum of shard {s}: part {} of {}, the round's take {count}",
                        p.index, p.count
                    )));
                }
            }
        }
        let new_worker = shards.instance[i] != Some(uplink.instance);
        if new_worker && matches!(uplink.report, ShardReport::Partial(_)) {
            // A worker that was not the one folding cannot hold the shard's partial sum.
            return Err(ProtocolError::Malformed(format!(
                "partial sum of shard {s} from a worker not heard from before"
            )));
        }
        // The partial sum this part completes, checked whole before anything changes.
        let mut completed = None;
        if let ShardReport::Partial(p) = &uplink.report
            && shards.partials[i].is_none()
        {
            let mut parts = shards.parts[i].clone();
            parts.insert(p.index, (**p).clone());
            if parts.len() == p.count as usize {
                let parts: Vec<PartialPart> = parts.into_values().collect();
                let partial = Partial::from_parts(&self.config, &parts)?;
                self.check_partial(s, &partial)?;
                completed = Some(partial);
            }
        }
        let shards = self.shards.as_mut().expect("checked");
        let mut actions = Vec::new();
        if new_worker {
            shards.instance[i] = Some(uplink.instance);
            if phase != HostPhase::Collecting || shards.partials[i].is_none() {
                // What it folded is lost, masked inputs included: its devices send both
                // again.
                let lost = std::mem::take(&mut shards.progress[i]);
                for d in lost.keys() {
                    self.folded.remove(d);
                }
                shards.masked_sums[i].fill(0);
                shards.parts[i].clear();
            }
            actions.extend(self.shard_commands(s));
            if phase == HostPhase::Uploading {
                // Its uploads in flight and folded are gone: their devices send them again.
                actions.extend(
                    self.shard_members(s)
                        .filter(|d| !self.refused.contains_key(*d))
                        .map(|d| HostAction::Resend {
                            device: d.clone(),
                            round,
                        }),
                );
            }
        }
        let shards = self.shards.as_mut().expect("checked");
        match uplink.report {
            ShardReport::Hello { round: holds } => {
                if !new_worker && holds != Some(round) {
                    actions.extend(self.shard_commands(s));
                }
            }
            ShardReport::Folded { device, .. } => {
                // The masked input joins the shard's sum; the host holds it no longer.
                let masked = self.masked.remove(&device).expect("checked above");
                let ClientBody::MaskedInput {
                    masked: y,
                    update_digest,
                } = &masked.body
                else {
                    unreachable!("only masked inputs are held");
                };
                for (s, m) in shards.masked_sums[i].iter_mut().zip(y) {
                    *s = s.wrapping_add(*m);
                }
                shards.progress[i].insert(device.clone(), *update_digest);
                self.folded.insert(device);
            }
            ShardReport::Refused { device, reason, .. } => {
                self.masked.remove(&device);
                self.refused.insert(device.clone(), reason.clone());
                actions.push(HostAction::RefuseUpload {
                    device,
                    round,
                    reason,
                });
            }
            ShardReport::Partial(p) => match completed {
                Some(partial) => {
                    shards.parts[i].clear();
                    shards.partials[i] = Some(partial);
                }
                // Sent again after it was whole: nothing to do.
                None if shards.partials[i].is_some() => {}
                None => {
                    shards.parts[i].insert(p.index, *p);
                }
            },
        }
        actions.extend(self.advance(now, false));
        Ok(actions)
    }

    /// The roster's members in shard `s`.
    fn shard_members(&self, s: u32) -> impl Iterator<Item = &DeviceId> {
        let k = self.config.fold_shards;
        self.weights.keys().filter(move |d| shard_of(d, k) == s)
    }

    /// What the worker of shard `s` needs to hear for the round's current phase: the
    /// round and its admissions while uploads are collected, the close after.
    fn shard_commands(&self, s: u32) -> Vec<HostAction> {
        let round = self.config.round;
        match self.phase {
            HostPhase::Sharing | HostPhase::Uploading => {
                let mut actions = vec![HostAction::Shard(
                    s,
                    ShardCommand::Open {
                        config: self.config.clone(),
                        members: self.shard_members(s).cloned().collect(),
                    },
                )];
                let k = self.config.fold_shards;
                actions.extend(self.masked.iter().filter(|(d, _)| shard_of(d, k) == s).map(
                    |(d, m)| {
                        HostAction::Shard(
                            s,
                            ShardCommand::Admit {
                                round,
                                device: d.clone(),
                                digest: masked_digest(m),
                            },
                        )
                    },
                ));
                actions
            }
            HostPhase::Collecting => vec![HostAction::Shard(s, ShardCommand::Close { round })],
            _ => vec![],
        }
    }

    /// A partial sum of shard `s` must hold exactly the devices its worker reported folded,
    /// each with the digest its masked input signed, and be a sum of the round's shape.
    fn check_partial(&self, s: u32, p: &Partial) -> Result<(), ProtocolError> {
        let bad =
            |why: String| ProtocolError::Malformed(format!("partial sum of shard {s}: {why}"));
        let progress = &self.shards.as_ref().expect("a sharded round").progress[s as usize];
        if !p.folded.iter().map(|(d, h)| (d, h)).eq(progress.iter()) {
            let why = p
                .folded
                .iter()
                .find(|(d, h)| progress.get(d) != Some(h))
                .map_or(
                    "a device reported folded is missing".to_string(),
                    |(d, _)| format!("{d} was not reported folded with that digest"),
                );
            return Err(bad(why));
        }
        Aggregate::from_parts(
            self.config.selected,
            self.config.body_bits,
            p.sum.clone(),
            p.folded.len(),
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(())
    }

    /// Adds the partial sums received into the round's sum, and records their devices'
    /// masked inputs (each shard's as one sum) in the secure aggregation: the contributors.
    fn combine_partials(&mut self) -> Result<(), ProtocolError> {
        let shards = self.shards.as_mut().expect("a sharded round");
        let mut aggregate = Aggregate::new(self.config.selected, self.config.body_bits);
        let mut folded = BTreeSet::new();
        let mut upload_bytes = 0;
        for i in 0..shards.partials.len() {
            let Some(p) = shards.partials[i].take() else {
                continue;
            };
            // The partial's devices are exactly the shard's reported folds (checked on
            // arrival).
            self.server.add_masked_inputs(
                &shards.masked_sums[i],
                std::mem::take(&mut shards.progress[i]),
            )?;
            let part = Aggregate::from_parts(
                self.config.selected,
                self.config.body_bits,
                p.sum,
                p.folded.len(),
            )
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
            aggregate
                .add_aggregate(&part)
                .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
            folded.extend(p.folded.into_iter().map(|(d, _)| d));
            upload_bytes += p.upload_bytes;
        }
        self.aggregate = aggregate;
        self.folded = folded;
        self.upload_bytes = upload_bytes;
        Ok(())
    }

    /// Advances on the clock: closes a phase whose deadline passed.
    pub fn on_tick(&mut self, now: u64) -> Vec<HostAction> {
        self.advance(now, true)
    }

    fn expect(&self, phase: HostPhase, what: &'static str) -> Result<(), ProtocolError> {
        if self.phase == phase {
            Ok(())
        } else {
            Err(Refusal::WrongPhase {
                what,
                phase: self.phase.name(),
                round: self.config.round,
            }
            .into())
        }
    }

    fn on_manifest(&mut self, from: &DeviceId, m: Manifest) -> Result<(), ProtocolError> {
        self.uploads.check_manifest(&self.registry, from, &m)?;
        self.expect(HostPhase::Uploading, "manifest")?;
        if !self.weights.contains_key(from) {
            return Err(Refusal::NotInRoster(from.clone()).into());
        }
        self.uploads.on_manifest(from, m)
    }

    fn on_chunk(&mut self, from: &DeviceId, c: Chunk) -> Result<(), ProtocolError> {
        self.expect(HostPhase::Uploading, "chunk")?;
        self.uploads.on_chunk(from, c)
    }

    /// Folds `from`'s upload when it is complete and its (checked) masked input is here.
    /// An upload whose signed parts disagree, or that is not an update of the round's
    /// shape, is dropped, and the device is told ([`HostAction::RefuseUpload`]) and no
    /// longer waited for: the message that completed it is accepted (and journalled), so
    /// a replayed journal drops it again.
    fn try_fold(&mut self, from: &DeviceId) -> Result<Vec<HostAction>, ProtocolError> {
        let Some(masked) = self.masked.get(from) else {
            return Ok(vec![]);
        };
        let Some(taken) = self.uploads.take(from, masked_digest(masked)) else {
            return Ok(vec![]);
        };
        let (update, bytes) = match taken {
            Ok(u) => u,
            Err(reason) => {
                self.masked.remove(from);
                self.refused.insert(from.clone(), reason.clone());
                return Ok(vec![HostAction::RefuseUpload {
                    device: from.clone(),
                    round: self.config.round,
                    reason,
                }]);
            }
        };
        let masked = self.masked.remove(from).expect("held above");
        // Checked when it arrived, and nothing of its sender's recorded since: this cannot
        // fail, but a long-running host refuses rather than panics if it ever did.
        self.server.receive(masked)?;
        self.aggregate
            .add(&update)
            .expect("length checked against the round");
        self.folded.insert(from.clone());
        self.upload_bytes += bytes;
        Ok(vec![])
    }

    /// Closes phases that are complete (or past their deadline when `clock`).
    fn advance(&mut self, now: u64, clock: bool) -> Vec<HostAction> {
        let mut actions = Vec::new();
        loop {
            let due = clock && now >= self.deadline;
            let complete = match self.phase {
                HostPhase::Done => return actions,
                HostPhase::Uploading => {
                    self.folded.len() + self.refused.len() == self.server.expected()
                        && self.server.expected() > 0
                }
                HostPhase::Collecting => self.shards.as_ref().is_some_and(|s| {
                    s.progress
                        .iter()
                        .zip(&s.partials)
                        .all(|(p, partial)| p.is_empty() || partial.is_some())
                }),
                // Devices left out have answered too.
                HostPhase::Joining => {
                    self.server.collected() + self.left_out() == self.server.expected()
                        && self.server.expected() > 0
                }
                _ => {
                    self.server.collected() == self.server.expected() && self.server.expected() > 0
                }
            };
            if !(due || complete) {
                return actions;
            }
            match self.close_phase(now) {
                Ok(mut a) => actions.append(&mut a),
                Err(reason) => {
                    self.phase = HostPhase::Done;
                    actions.push(self.broadcast(Phase::Failed {
                        reason: reason.clone(),
                    }));
                    actions.push(HostAction::Failed(reason));
                    return actions;
                }
            }
        }
    }

    /// The roster's step plan: each member's assigned steps, `tau_eff` over them, the
    /// training time and the devices left out.
    fn plan(&self, weights: &[(DeviceId, f64)]) -> RoundPlan {
        let steps: Vec<(DeviceId, usize)> = weights
            .iter()
            .map(|(d, _)| {
                let steps = match self.devices.get(d).map(|r| &r.assignment) {
                    Some(Assignment::Train { steps }) => *steps,
                    _ => self.config.local_steps,
                };
                (d.clone(), steps)
            })
            .collect();
        RoundPlan {
            effective_steps: effective_steps(weights, &steps),
            steps,
            train_seconds: self.rule.train_seconds,
            left_out: self
                .devices
                .iter()
                .filter_map(|(d, r)| match &r.assignment {
                    Assignment::LeftOut(why) => Some((d.clone(), why.clone())),
                    Assignment::Train { .. } => None,
                })
                .collect(),
        }
    }

    fn close_phase(&mut self, now: u64) -> Result<Vec<HostAction>, String> {
        let err = |e: fedshield_crypto::secagg::SecAggError| e.to_string();
        match self.phase {
            HostPhase::Joining => {
                let roster = self.server.close_advertise().map_err(err)?;
                // Exactly what every member recomputes from the signed adverts.
                self.weights = fedavg_weights(&roster)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .collect();
                self.phase = HostPhase::Sharing;
                self.deadline = now + self.deadlines.shares_ms;
                let weights: Vec<(DeviceId, f64)> =
                    self.weights.iter().map(|(d, w)| (d.clone(), *w)).collect();
                let plan = self.plan(&weights);
                self.effective_steps = plan.effective_steps;
                let mut actions = vec![self.broadcast(Phase::Roster {
                    roster,
                    weights,
                    plan: Box::new(plan),
                })];
                for s in 0..self.config.fold_shards {
                    actions.extend(self.shard_commands(s));
                }
                Ok(actions)
            }
            HostPhase::Sharing => {
                let deliveries = self.server.close_shares().map_err(err)?;
                self.phase = HostPhase::Uploading;
                self.deadline = now + self.deadlines.upload_ms;
                self.deliveries = deliveries.into_iter().collect();
                Ok(self
                    .deliveries
                    .iter()
                    .map(|(d, s)| HostAction::Deliver(d.clone(), s.clone()))
                    .collect())
            }
            HostPhase::Uploading if self.shards.is_some() => {
                self.phase = HostPhase::Collecting;
                self.deadline = now + self.deadlines.finish_ms;
                Ok((0..self.config.fold_shards)
                    .flat_map(|s| self.shard_commands(s))
                    .collect())
            }
            HostPhase::Collecting => {
                self.combine_partials().map_err(|e| e.to_string())?;
                self.masked.clear();
                let survivors = self.server.close_masked_inputs().map_err(err)?;
                self.phase = HostPhase::Consistency;
                self.deadline = now + self.deadlines.finish_ms;
                Ok(vec![self.broadcast(Phase::Survivors(survivors))])
            }
            HostPhase::Uploading => {
                self.uploads.clear();
                self.masked.clear();
                let survivors = self.server.close_masked_inputs().map_err(err)?;
                self.phase = HostPhase::Consistency;
                self.deadline = now + self.deadlines.finish_ms;
                Ok(vec![self.broadcast(Phase::Survivors(survivors))])
            }
            HostPhase::Consistency => {
                let request = self.server.close_consistency().map_err(err)?;
                self.phase = HostPhase::Unmasking;
                self.deadline = now + self.deadlines.finish_ms;
                Ok(vec![self.broadcast(Phase::Unmask(request))])
            }
            HostPhase::Unmasking => {
                let keys = self.server.close_unmask().map_err(err)?;
                let contributors: BTreeSet<DeviceId> = keys.contributors.iter().cloned().collect();
                if contributors != self.folded {
                    return Err(format!(
                        "key aggregate of {:?} does not match the folded uploads {:?}",
                        contributors, self.folded
                    ));
                }
                let sums = self
                    .aggregate
                    .decrypt(MaskSeed(self.config.mask_seed), &keys.key_sum)
                    .map_err(|e| e.to_string())?;
                let total_weight = contributors.iter().map(|d| self.weights[d]).sum();
                let losses: Vec<f64> = self
                    .losses
                    .iter()
                    .filter(|(d, _)| self.weights.contains_key(*d))
                    .map(|(_, l)| *l)
                    .collect();
                self.phase = HostPhase::Done;
                let contributors: Vec<DeviceId> = contributors.into_iter().collect();
                Ok(vec![
                    self.broadcast(Phase::Closed {
                        contributors: contributors.clone(),
                    }),
                    HostAction::Finished(RoundResult {
                        round: self.config.round,
                        total_weight,
                        sums,
                        eval_loss: (!losses.is_empty())
                            .then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                        upload_bytes: self.upload_bytes / contributors.len().max(1) as u64,
                        effective_steps: self.effective_steps,
                        secagg_graph: self
                            .server
                            .graph()
                            .and_then(|g| g.degree().map(|k| (k, g.threshold()))),
                        contributors,
                    }),
                ])
            }
            HostPhase::Done => Ok(vec![]),
        }
    }
}

/// The digest a (held, checked) masked input signs.
fn masked_digest(masked: &SignedMessage) -> [u8; 32] {
    match &masked.body {
        ClientBody::MaskedInput { update_digest, .. } => *update_digest,
        _ => unreachable!("only masked inputs are held"),
    }
}

pub use crate::fold::expected_update_bytes;
