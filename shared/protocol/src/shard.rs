//! Aggregation sharded over fold workers: the worker's state machine and what it and the
//! host (the coordinator) say to each other.
//!
//! In a round announced with `fold_shards = K > 0`, each device sends its manifest and
//! chunks to shard [`shard_of`]`(device, K)` on `fedshield/{f}/upload/{s}/{d}` instead of to
//! the host. The worker of shard `s` ([`FoldWorker`]) collects them, and folds an upload
//! into its partial sum once the host has admitted it ([`ShardCommand::Admit`]: the host
//! checked the device's masked input, which signs the upload's digest). At the end of the
//! upload phase the host closes every shard ([`ShardCommand::Close`]); each worker answers
//! with its [`Partial`]: its encrypted partial sum and exactly the devices in it. The host
//! takes the union of the partials' devices as the round's contributors, records their
//! masked inputs (only then) in the secure aggregation, and adds the partial sums: the sum
//! and the key aggregate cover the same set, so it decrypts.
//!
//! Shards are fixed per device (a hash of its id) rather than spread by an MQTT shared
//! subscription: a broker that hands one topic's messages round-robin to a group's
//! subscribers (mosquitto 2.0) would split one upload's chunks over several workers.
//!
//! A worker keeps nothing on disk. Every message it sends carries its `instance` (drawn at
//! start); a report under a new instance tells the host the worker restarted and lost what
//! it folded: the host forgets that shard's progress, opens the round again on the new
//! worker and asks the shard's devices to send their uploads again
//! ([`crate::messages::DownMessage::Resend`]). A worker that does not come back by the
//! close leaves its devices out of the round, as dropouts.
//!
//! Topics (host credentials only; devices cannot read or write them):
//! `fedshield/{f}/fold/{s}/cmd` host -> worker [`ShardCommand`],
//! `fedshield/{f}/fold/{s}/report` worker -> host [`ShardUplink`].

use crate::fold::Uploads;
use crate::messages::{EdgeMessage, RoundConfig, UploadRefusal};
use crate::{ProtocolError, Refusal};
use fedshield_crypto::identity::{DeviceId, Registry};
use fedshield_crypto::packed::{Aggregate, ciphertext_count};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// The most shards a round may have.
pub const MAX_SHARDS: u32 = 64;

/// The shard of `device` in a round of `shards` shards (`shards` > 0): the first eight bytes
/// of a domain-separated SHA-256 of its id, modulo `shards`. Fixed across rounds, so a
/// device's uploads keep going to the same worker.
pub fn shard_of(device: &DeviceId, shards: u32) -> u32 {
    let h = Sha256::new()
        .chain_update(b"fedshield/fold-shard/v1")
        .chain_update(device.0.as_bytes())
        .finalize();
    let x = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    (x % u64::from(shards.max(1))) as u32
}

/// What the host tells the worker of one shard.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ShardCommand {
    /// Collect the uploads of round `config.round` from these members of the shard
    /// (again: a worker already collecting that round keeps what it has).
    Open {
        /// The round's configuration.
        config: RoundConfig,
        /// The shard's members in the round's roster, sorted.
        members: Vec<DeviceId>,
    },
    /// `device`'s masked input, which signs `digest`, is accepted: fold its upload when it
    /// is complete and hashes to `digest`.
    Admit {
        /// The round.
        round: u64,
        /// The device.
        device: DeviceId,
        /// The digest its masked input signed.
        digest: [u8; 32],
    },
    /// The upload phase is over: fold nothing more and send the partial sum.
    Close {
        /// The round.
        round: u64,
    },
}

/// A worker's encrypted partial sum of one round, as the host assembles it from its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// The round.
    pub round: u64,
    /// The devices in the sum, each with the digest of the upload folded, sorted.
    pub folded: Vec<(DeviceId, [u8; 32])>,
    /// The partial sum's bodies.
    pub sum: Vec<u32>,
    /// Bytes of the uploads in it.
    pub upload_bytes: u64,
}

/// One part of a [`Partial`] on the wire: the sum's bodies packed as little-endian
/// integers of the round's body width, at most `chunk_bytes` of them per part (a broker's
/// packet limit holds whole parts); the first part also carries the devices and bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartialPart {
    /// The round.
    pub round: u64,
    /// This part.
    pub index: u32,
    /// Parts in all ([`partial_parts`] of the round).
    pub count: u32,
    /// Part 0: the devices in the sum with their digests, sorted; empty in the others.
    pub folded: Vec<(DeviceId, [u8; 32])>,
    /// Part 0: bytes of the uploads in the sum.
    pub upload_bytes: u64,
    /// The part's bodies, packed.
    pub bodies: Vec<u8>,
}

/// The parts a partial sum of round `config` travels in, and the bodies per part.
pub fn partial_parts(config: &RoundConfig) -> (u32, usize) {
    let bodies = ciphertext_count(config.selected) * POLYNOMIAL_SIZE;
    let per_part = (config.chunk_bytes / config.body_bits.bytes()).max(1);
    (bodies.div_ceil(per_part) as u32, per_part)
}

impl Partial {
    /// Its parts, packed for the wire.
    pub fn to_parts(&self, config: &RoundConfig) -> Vec<PartialPart> {
        let (count, per_part) = partial_parts(config);
        let width = config.body_bits.bytes();
        self.sum
            .chunks(per_part)
            .enumerate()
            .map(|(i, bodies)| PartialPart {
                round: self.round,
                index: i as u32,
                count,
                folded: if i == 0 { self.folded.clone() } else { vec![] },
                upload_bytes: if i == 0 { self.upload_bytes } else { 0 },
                bodies: bodies
                    .iter()
                    .flat_map(|b| b.to_le_bytes().into_iter().take(width))
                    .collect(),
            })
            .collect()
    }

    /// The partial sum of `parts`, which must be every part of a round-`config` partial
    /// sum, each once, in order of their index.
    pub fn from_parts(config: &RoundConfig, parts: &[PartialPart]) -> Result<Self, ProtocolError> {
        let bad = |why: String| ProtocolError::Malformed(format!("partial sum: {why}"));
        let (count, per_part) = partial_parts(config);
        let total = ciphertext_count(config.selected) * POLYNOMIAL_SIZE;
        let width = config.body_bits.bytes();
        if parts.len() != count as usize {
            return Err(bad(format!("{} parts of {count}", parts.len())));
        }
        let mut sum = Vec::with_capacity(total);
        for (i, p) in parts.iter().enumerate() {
            let want = per_part.min(total - i * per_part);
            if p.index as usize != i || p.count != count || p.round != config.round {
                return Err(bad(format!("part {} of {} out of place", p.index, p.count)));
            }
            if p.bodies.len() != want * width
                || (i > 0 && (!p.folded.is_empty() || p.upload_bytes > 0))
            {
                return Err(bad(format!("part {i} is not of its size")));
            }
            sum.extend(p.bodies.chunks(width).map(|b| {
                let mut le = [0u8; 4];
                le[..width].copy_from_slice(b);
                u32::from_le_bytes(le)
            }));
        }
        Ok(Self {
            round: config.round,
            folded: parts[0].folded.clone(),
            sum,
            upload_bytes: parts[0].upload_bytes,
        })
    }
}

/// What a worker tells the host.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ShardReport {
    /// The worker is connected, collecting round `round` (if any).
    Hello {
        /// The round it holds.
        round: Option<u64>,
    },
    /// `device`'s upload is in the partial sum.
    Folded {
        /// The round.
        round: u64,
        /// The device.
        device: DeviceId,
    },
    /// `device`'s upload, complete and admitted, cannot be folded.
    Refused {
        /// The round.
        round: u64,
        /// The device.
        device: DeviceId,
        /// Why.
        reason: UploadRefusal,
    },
    /// The answer to [`ShardCommand::Close`]: one part of the partial sum.
    Partial(Box<PartialPart>),
}

impl ShardReport {
    /// A stable name of the report's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Folded { .. } => "folded",
            Self::Refused { .. } => "refused",
            Self::Partial(_) => "partial",
        }
    }
}

/// A report with the worker that sent it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardUplink {
    /// The shard.
    pub shard: u32,
    /// The worker process (drawn at its start).
    pub instance: u64,
    /// The report.
    pub report: ShardReport,
}

/// What a fold worker's driver did, one JSON object per line in its event file
/// (`fedshield-host fold-worker --events FILE`), for tools and tests.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum WorkerEvent {
    /// Connected to the broker (again) and said hello.
    Connected {
        /// The shard.
        shard: u32,
        /// This process.
        instance: u64,
    },
    /// Collecting a round's uploads.
    Opened {
        /// The round.
        round: u64,
    },
    /// Answered the host's close with the partial sum.
    Closed {
        /// The round.
        round: u64,
        /// Devices in the partial sum.
        folded: usize,
        /// CPU seconds of the worker process since its start.
        cpu_s: f64,
        /// Peak resident memory of the process, MiB.
        peak_rss_mib: f64,
    },
    /// A command or upload refused (nothing changed).
    Refused {
        /// The device, for uploads.
        device: Option<String>,
        /// `ProtocolError::kind`.
        kind: String,
        /// The reason.
        detail: String,
    },
}

#[derive(Debug)]
struct WorkerRound {
    config: RoundConfig,
    members: BTreeSet<DeviceId>,
    uploads: Uploads,
    admitted: BTreeMap<DeviceId, [u8; 32]>,
    folded: BTreeMap<DeviceId, [u8; 32]>,
    refused: BTreeSet<DeviceId>,
    aggregate: Aggregate,
    upload_bytes: u64,
    closed: bool,
}

impl WorkerRound {
    fn partial(&self) -> Partial {
        Partial {
            round: self.config.round,
            folded: self.folded.iter().map(|(d, h)| (d.clone(), *h)).collect(),
            sum: self.aggregate.parts().0.to_vec(),
            upload_bytes: self.upload_bytes,
        }
    }

    /// Folds `device`'s upload if it is complete and admitted.
    fn try_fold(&mut self, device: &DeviceId) -> Vec<ShardReport> {
        let Some(&digest) = self.admitted.get(device) else {
            return vec![];
        };
        let round = self.config.round;
        match self.uploads.take(device, digest) {
            None => vec![],
            Some(Err(reason)) => {
                self.admitted.remove(device);
                self.refused.insert(device.clone());
                vec![ShardReport::Refused {
                    round,
                    device: device.clone(),
                    reason,
                }]
            }
            Some(Ok((update, bytes))) => {
                self.aggregate
                    .add(&update)
                    .expect("shape checked against the round");
                self.admitted.remove(device);
                self.folded.insert(device.clone(), digest);
                self.upload_bytes += bytes;
                vec![ShardReport::Folded {
                    round,
                    device: device.clone(),
                }]
            }
        }
    }
}

/// The worker of one shard: collects its devices' uploads and folds the admitted ones into
/// an encrypted partial sum. Pure: the driver feeds it the commands and uploads that arrive
/// and publishes the reports it returns.
#[derive(Debug)]
pub struct FoldWorker {
    shard: u32,
    instance: u64,
    registry: Registry,
    round: Option<WorkerRound>,
}

impl FoldWorker {
    /// The worker of `shard`, process `instance` (a fresh random number per start),
    /// checking manifests against `registry`.
    pub fn new(shard: u32, instance: u64, registry: Registry) -> Self {
        Self {
            shard,
            instance,
            registry,
            round: None,
        }
    }

    /// Replaces the registry (the fleet's enrolments changed).
    pub fn set_registry(&mut self, registry: Registry) {
        self.registry = registry;
    }

    /// `report` as this worker's uplink message.
    pub fn uplink(&self, report: ShardReport) -> ShardUplink {
        ShardUplink {
            shard: self.shard,
            instance: self.instance,
            report,
        }
    }

    /// What the worker says on (re)connecting, and in answer to an open.
    pub fn hello(&self) -> ShardUplink {
        self.uplink(ShardReport::Hello {
            round: self.round.as_ref().map(|r| r.config.round),
        })
    }

    /// The round it collects, if any.
    pub fn round(&self) -> Option<u64> {
        self.round.as_ref().map(|r| r.config.round)
    }

    /// Whether `device`'s upload is in the partial sum (its re-sent parts change nothing).
    pub fn has_folded(&self, device: &DeviceId) -> bool {
        self.round
            .as_ref()
            .is_some_and(|r| r.folded.contains_key(device))
    }

    /// Devices folded so far.
    pub fn folded(&self) -> usize {
        self.round.as_ref().map_or(0, |r| r.folded.len())
    }

    /// Handles a command of the host. An error means it was refused and nothing changed.
    pub fn on_command(&mut self, command: ShardCommand) -> Result<Vec<ShardUplink>, ProtocolError> {
        let reports = match command {
            ShardCommand::Open { config, members } => {
                if config.fold_shards == 0 || self.shard >= config.fold_shards {
                    return Err(ProtocolError::Config(format!(
                        "round {} has {} fold shards, this worker is shard {}",
                        config.round, config.fold_shards, self.shard
                    )));
                }
                if let Some(r) = &self.round {
                    if config.round < r.config.round {
                        return Err(Refusal::WrongRound {
                            what: "shard open",
                            got: config.round,
                        }
                        .into());
                    }
                    if config.round == r.config.round {
                        // Opened again: keep what is here, and say so.
                        return Ok(vec![self.hello()]);
                    }
                }
                if let Some(d) = members
                    .iter()
                    .find(|d| shard_of(d, config.fold_shards) != self.shard)
                {
                    return Err(ProtocolError::Config(format!(
                        "{d} is not a member of shard {}",
                        self.shard
                    )));
                }
                self.round = Some(WorkerRound {
                    uploads: Uploads::new(&config),
                    aggregate: Aggregate::new(config.selected, config.body_bits),
                    members: members.into_iter().collect(),
                    config,
                    admitted: BTreeMap::new(),
                    folded: BTreeMap::new(),
                    refused: BTreeSet::new(),
                    upload_bytes: 0,
                    closed: false,
                });
                // The answer tells the host which process collects the round.
                return Ok(vec![self.hello()]);
            }
            ShardCommand::Admit {
                round,
                device,
                digest,
            } => {
                let r = self.open_round(round, "admission")?;
                if !r.members.contains(&device) {
                    return Err(Refusal::NotInRoster(device).into());
                }
                if r.closed || r.folded.contains_key(&device) || r.refused.contains(&device) {
                    return Ok(vec![]); // too late, or admitted again after a re-publish
                }
                r.admitted.insert(device.clone(), digest);
                r.try_fold(&device)
            }
            ShardCommand::Close { round } => {
                let r = self.open_round(round, "close")?;
                r.closed = true;
                r.uploads.clear();
                r.admitted.clear();
                r.partial()
                    .to_parts(&r.config)
                    .into_iter()
                    .map(|p| ShardReport::Partial(Box::new(p)))
                    .collect()
            }
        };
        Ok(reports.into_iter().map(|r| self.uplink(r)).collect())
    }

    fn open_round(
        &mut self,
        round: u64,
        what: &'static str,
    ) -> Result<&mut WorkerRound, ProtocolError> {
        match &mut self.round {
            Some(r) if r.config.round == round => Ok(r),
            _ => Err(Refusal::WrongRound { what, got: round }.into()),
        }
    }

    /// Handles a manifest or chunk from `from` (the device named by the upload topic of
    /// this shard). An error means it was refused and nothing changed.
    pub fn on_upload(
        &mut self,
        from: &DeviceId,
        message: EdgeMessage,
    ) -> Result<Vec<ShardUplink>, ProtocolError> {
        let round = match &message {
            EdgeMessage::Manifest(m) => m.round,
            EdgeMessage::Chunk(c) => c.round,
            _ => {
                return Err(ProtocolError::Malformed(
                    "only manifests and chunks travel on an upload topic".into(),
                ));
            }
        };
        let Some(r) = self.round.as_mut().filter(|r| r.config.round == round) else {
            return Err(Refusal::WrongRound {
                what: "upload",
                got: round,
            }
            .into());
        };
        if !r.members.contains(from) {
            return Err(Refusal::NotInRoster(from.clone()).into());
        }
        if r.closed {
            return Err(Refusal::WrongPhase {
                what: "upload",
                phase: "Closed",
                round,
            }
            .into());
        }
        if r.folded.contains_key(from) || r.refused.contains(from) {
            return Ok(vec![]); // sent again: already decided
        }
        match message {
            EdgeMessage::Manifest(m) => {
                r.uploads.check_manifest(&self.registry, from, &m)?;
                r.uploads.on_manifest(from, m)?;
            }
            EdgeMessage::Chunk(c) => r.uploads.on_chunk(from, c)?,
            _ => unreachable!("matched above"),
        }
        let reports = r.try_fold(from);
        Ok(reports.into_iter().map(|r| self.uplink(r)).collect())
    }
}
