//! Everything host and edges say to each other, and the MQTT topic tree that carries it.
//! Every payload is a postcard encoding of one of these types.
//!
//! # Topic tree (fleet `f`, device `d`)
//! | topic | direction | retained | payload |
//! |---|---|---|---|
//! | `fedshield/{f}/round` | host -> edges | yes | [`RoundState`]: the current round and its phase |
//! | `fedshield/{f}/down/{d}` | host -> one edge | yes | [`DownMessage`]: the `secagg::ShareDelivery` of the current round (the retained copy is deleted when the round ends), or a notice that the host dropped the device's upload (not retained) |
//! | `fedshield/{f}/up/{d}` | edge -> host | no | [`EdgeMessage`] (one topic per device keeps its messages in order) |
//! | `fedshield/{f}/upload/{s}/{d}` | edge -> fold worker `s` | no | [`EdgeMessage`]: the manifest and chunks, in a round sharded over fold workers ([`crate::shard`]) |
//! | `fedshield/{f}/fold/{s}/cmd`, `.../report` | host <-> fold worker `s` | no | [`crate::shard::ShardCommand`], [`crate::shard::ShardUplink`] (host credentials only) |
//! | `fedshield/{f}/global/{i}` | host -> edges | yes | [`GlobalPart`] `i` of the last completed round's update, in a `fedshield_wire::Compressed` (zstd) envelope |
//! | `fedshield/{f}/status/{d}` | edge -> all | yes | `online` / `offline` (the last will) |
//! | `fedshield/{f}/snapshot/{i}` | host -> edges | yes | [`SnapshotPart`] `i` of the fleet's state after the last completed round (a [`Snapshot`]: global adapter, selection history, recent contributors), for devices that missed a global update; devices subscribe only while they need it |
//!
//! Every downlink payload (round, down, global, snapshot) is a `signed::HostSigned`
//! envelope: the host's signature over the topic and the payload, checked by the devices
//! under the host certificate of their key file. Uplink messages are signed by the devices.
//!
//! QoS 1 everywhere: every handler is idempotent (duplicates are recognised and ignored).

use fedshield_codec::PruneConfig;
use fedshield_crypto::identity::DeviceId;
use fedshield_crypto::params::BodyBits;
use fedshield_crypto::secagg::{
    GraphPolicy, Roster, ShareDelivery, SignedMessage, SurvivorList, UnmaskRequest,
};

/// Topic names of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    fleet: String,
}

/// What a topic of the tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `fedshield/{f}/round`.
    Round,
    /// `fedshield/{f}/down/{d}`.
    Down(DeviceId),
    /// `fedshield/{f}/up/{d}`.
    Up(DeviceId),
    /// `fedshield/{f}/global/{i}`.
    Global(u32),
    /// `fedshield/{f}/status/{d}`.
    Status(DeviceId),
    /// `fedshield/{f}/snapshot/{i}`.
    Snapshot(u32),
    /// `fedshield/{f}/upload/{s}/{d}`: device `d`'s manifest and chunks for fold shard `s`.
    Upload(u32, DeviceId),
    /// `fedshield/{f}/fold/{s}/cmd`: the host's commands to the worker of shard `s`.
    FoldCommand(u32),
    /// `fedshield/{f}/fold/{s}/report`: the reports of the worker of shard `s`.
    FoldReport(u32),
}

impl Topics {
    /// The tree of `fleet`, which must be a single topic level without wildcards.
    pub fn new(fleet: &str) -> Result<Self, crate::ProtocolError> {
        check_level(fleet)?;
        Ok(Self {
            fleet: fleet.to_string(),
        })
    }

    /// `fedshield/{f}/round`.
    pub fn round(&self) -> String {
        format!("fedshield/{}/round", self.fleet)
    }

    /// `fedshield/{f}/global/{i}`.
    pub fn global(&self, i: u32) -> String {
        format!("fedshield/{}/global/{i}", self.fleet)
    }

    /// The edges' subscription to the global update parts.
    pub fn all_global(&self) -> String {
        format!("fedshield/{}/global/+", self.fleet)
    }

    /// `fedshield/{f}/snapshot/{i}`.
    pub fn snapshot(&self, i: u32) -> String {
        format!("fedshield/{}/snapshot/{i}", self.fleet)
    }

    /// The subscription of a device that needs the snapshot.
    pub fn all_snapshot(&self) -> String {
        format!("fedshield/{}/snapshot/+", self.fleet)
    }

    /// `fedshield/{f}/down/{d}`.
    pub fn down(&self, d: &DeviceId) -> String {
        format!("fedshield/{}/down/{}", self.fleet, d.0)
    }

    /// `fedshield/{f}/up/{d}`.
    pub fn up(&self, d: &DeviceId) -> String {
        format!("fedshield/{}/up/{}", self.fleet, d.0)
    }

    /// `fedshield/{f}/status/{d}`.
    pub fn status(&self, d: &DeviceId) -> String {
        format!("fedshield/{}/status/{}", self.fleet, d.0)
    }

    /// The host's subscription: every device's uplink.
    pub fn all_up(&self) -> String {
        format!("fedshield/{}/up/+", self.fleet)
    }

    /// `fedshield/{f}/upload/{s}/{d}`.
    pub fn upload(&self, shard: u32, d: &DeviceId) -> String {
        format!("fedshield/{}/upload/{shard}/{}", self.fleet, d.0)
    }

    /// The subscription of the worker of shard `s`: its devices' uploads.
    pub fn shard_uploads(&self, shard: u32) -> String {
        format!("fedshield/{}/upload/{shard}/+", self.fleet)
    }

    /// `fedshield/{f}/fold/{s}/cmd`.
    pub fn fold_command(&self, shard: u32) -> String {
        format!("fedshield/{}/fold/{shard}/cmd", self.fleet)
    }

    /// `fedshield/{f}/fold/{s}/report`.
    pub fn fold_report(&self, shard: u32) -> String {
        format!("fedshield/{}/fold/{shard}/report", self.fleet)
    }

    /// The host's subscription to every worker's reports.
    pub fn all_fold_reports(&self) -> String {
        format!("fedshield/{}/fold/+/report", self.fleet)
    }

    /// Where device `d` publishes `message` in a round of `fold_shards` shards: its
    /// manifest and chunks to its shard's upload topic when the round is sharded, all else
    /// (and everything in an unsharded round) on its uplink.
    pub fn uplink(&self, d: &DeviceId, message: &EdgeMessage, fold_shards: u32) -> String {
        match message {
            EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) if fold_shards > 0 => {
                self.upload(crate::shard::shard_of(d, fold_shards), d)
            }
            _ => self.up(d),
        }
    }

    /// The topic's meaning, or `None` for topics outside this fleet's tree.
    pub fn route(&self, topic: &str) -> Option<Route> {
        let rest = topic
            .strip_prefix("fedshield/")?
            .strip_prefix(self.fleet.as_str())?
            .strip_prefix('/')?;
        let device = |d: &str| (!d.is_empty() && !d.contains('/')).then(|| DeviceId(d.into()));
        match rest.split_once('/') {
            None if rest == "round" => Some(Route::Round),
            Some(("global", i)) => i.parse().ok().map(Route::Global),
            Some(("snapshot", i)) => i.parse().ok().map(Route::Snapshot),
            Some(("down", d)) => device(d).map(Route::Down),
            Some(("up", d)) => device(d).map(Route::Up),
            Some(("status", d)) => device(d).map(Route::Status),
            Some(("upload", rest)) => {
                let (s, d) = rest.split_once('/')?;
                Some(Route::Upload(s.parse().ok()?, device(d)?))
            }
            Some(("fold", rest)) => match rest.split_once('/')? {
                (s, "cmd") => s.parse().ok().map(Route::FoldCommand),
                (s, "report") => s.parse().ok().map(Route::FoldReport),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A fleet or device name must be one non-empty topic level: no `/`, `+`, `#` or NUL.
pub fn check_level(name: &str) -> Result<(), crate::ProtocolError> {
    if name.is_empty()
        || name.len() > 128
        || name.contains(['/', '+', '#', '\0'])
        || name.chars().any(char::is_control)
    {
        return Err(crate::ProtocolError::BadName(name.to_string()));
    }
    Ok(())
}

/// The public configuration of one round, announced with it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundConfig {
    /// The host's federation epoch: when its state began (ms since the Unix epoch). A
    /// device that follows an older epoch (the host's state was wiped) starts over with
    /// this one; a broadcast of an older epoch than the device's is a replay and refused.
    pub epoch: u64,
    /// The round (1, 2, ...).
    pub round: u64,
    /// Seed of the ciphertexts' shared masks.
    pub mask_seed: u128,
    /// Seed of the pruning mask's tie-breaks and exploration.
    pub select_seed: u64,
    /// Pruning configuration.
    pub prune: PruneConfig,
    /// Clip value of the fixed-point encoding.
    pub clip: f32,
    /// Fixed-point scale.
    pub scale_log2: u32,
    /// Width of the ciphertext bodies (bits kept of each 64-bit body coefficient).
    pub body_bits: BodyBits,
    /// SHA-256 of the adapter layout (see `fedshield_codec::Layout::digest`).
    pub layout_digest: [u8; 32],
    /// Values each client encrypts this round (the selection's length).
    pub selected: usize,
    /// The last round in the host's selection history: a device whose history differs
    /// would compute another mask, so it sits the round out until it has caught up.
    pub history_round: u64,
    /// Seed of the fleet's initial adapter (`fedshield_codec::init_adapter`).
    pub init_seed: u64,
    /// Local optimizer steps per round (the most a device is given).
    pub local_steps: usize,
    /// A device that could train fewer steps in the round's time is left out.
    pub min_local_steps: usize,
    /// Minimum contributors.
    pub threshold: usize,
    /// Who shares with whom in the secure aggregation (`secagg::Graph`).
    pub secagg_graph: GraphPolicy,
    /// Largest upload chunk, in bytes of encrypted update.
    pub chunk_bytes: usize,
    /// Fold workers the uploads are sharded over (`shard::shard_of`); 0: the host folds
    /// them itself, and manifests and chunks go on the device's uplink.
    pub fold_shards: u32,
}

/// The round's phase, as broadcast (retained) on `fedshield/{f}/round`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Open for joining until the deadline (host clock, ms).
    Announce {
        /// When joining closes.
        deadline_ms: u64,
    },
    /// Who is in, with their weights; members train now.
    Roster {
        /// The secure-aggregation roster (every member's signed advert and sample count).
        roster: Roster,
        /// Weight of each member, `weights::fedavg_weights` of the roster: every member
        /// recomputes them and refuses the round if they differ.
        weights: Vec<(DeviceId, f64)>,
        /// Each member's local steps and training time, and who was left out
        /// (`fleet::steps`): every member checks it against the weights.
        plan: Box<crate::fleet::steps::RoundPlan>,
    },
    /// Sign the survivor list.
    Survivors(SurvivorList),
    /// Reveal the shares.
    Unmask(UnmaskRequest),
    /// Finished: the global update is published.
    Closed {
        /// Whose updates are in it.
        contributors: Vec<DeviceId>,
    },
    /// Abandoned (below threshold); the next round starts from the same global adapter.
    Failed {
        /// Why.
        reason: String,
    },
}

/// `fedshield/{f}/round`'s payload.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundState {
    /// The round's configuration.
    pub config: RoundConfig,
    /// Where it stands.
    pub phase: Phase,
    /// How many times the host has re-published this round's state after a restart or a
    /// reconnection to the broker (0 at first): messages in flight may have been lost then,
    /// so on a higher incarnation each edge re-sends what it sent in the current phase
    /// (the host ignores what it already has).
    pub incarnation: u32,
}

/// An edge's message to the host, on its own uplink topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum EdgeMessage {
    /// Join a round: the signed secure-aggregation advert (it carries the device's sample
    /// count, its FedAvg weight claim), the held-out loss of the current global adapter
    /// and the device's status (plan, speed, memory, power mode, thermal state), signed by
    /// the device (`signed::join_report_bytes`).
    Join {
        /// The signed advert (its round is the round joined).
        advert: SignedMessage,
        /// Held-out loss of the current global adapter on the device's evaluation data.
        eval_loss: Option<f64>,
        /// What the device says about itself (the host plans its steps from it).
        status: Box<crate::fleet::steps::DeviceStatus>,
        /// The device's ed25519 signature of `signed::join_report_bytes`.
        signature: Vec<u8>,
    },
    /// A secure-aggregation message (shares, masked input, consistency, unmask).
    SecAgg(SignedMessage),
    /// The upload's table of contents, before its chunks.
    Manifest(Manifest),
    /// One chunk of the encrypted update.
    Chunk(Chunk),
    /// After applying a round's global update: its held-out loss on this device's
    /// evaluation data and the device's encryption time that round, signed.
    Evaluated(crate::signed::Evaluation),
}

/// `fedshield/{f}/down/{d}`'s payload: what the host tells one device.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DownMessage {
    /// The shares addressed to the device (retained until the round ends).
    Shares(ShareDelivery),
    /// The host dropped the device's upload of `round`: the device sits the round out (its
    /// residual keeps the update), and the round no longer waits for it.
    UploadRefused {
        /// The round.
        round: u64,
        /// Why.
        reason: UploadRefusal,
    },
    /// Send the upload of `round` (manifest and chunks) again: the fold worker that had it
    /// restarted and lost it (not retained).
    Resend {
        /// The round.
        round: u64,
    },
}

/// Why the host dropped an upload whose every part was signed by its device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum UploadRefusal {
    /// The chunks, the manifest's digest and the masked input's digest disagree.
    #[error("the upload does not hash to the digest its masked input signed")]
    DigestMismatch,
    /// The upload does not decode as an encrypted update of the round's shape.
    #[error("the upload is not an encrypted update of the round's shape: {0}")]
    Malformed(String),
}

/// The table of contents of an upload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The round.
    pub round: u64,
    /// Bytes of the serialized encrypted update.
    pub total_bytes: u64,
    /// SHA-256 of each chunk.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// `secagg::update_digest` of the whole update (what the masked input binds).
    pub digest: [u8; 32],
    /// The device's ed25519 signature of [`Manifest::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Manifest {
    /// What the signature covers: a domain tag, the device, and every field above.
    pub fn signed_bytes(&self, device: &DeviceId) -> Vec<u8> {
        let mut m = b"fedshield/manifest/v1".to_vec();
        m.extend(
            postcard::to_stdvec(&(
                device,
                self.round,
                self.total_bytes,
                &self.chunk_hashes,
                self.digest,
            ))
            .expect("encodable"),
        );
        m
    }

    /// Splits a serialized update into chunks of at most `chunk_bytes` and signs the
    /// manifest as `device`.
    pub fn build(
        identity: &fedshield_crypto::identity::Identity,
        device: &DeviceId,
        round: u64,
        update: &[u8],
        chunk_bytes: usize,
    ) -> (Self, Vec<Chunk>) {
        let chunks: Vec<Chunk> = update
            .chunks(chunk_bytes.max(1))
            .enumerate()
            .map(|(i, c)| Chunk {
                round,
                index: i as u32,
                bytes: c.to_vec(),
            })
            .collect();
        let mut manifest = Self {
            round,
            total_bytes: update.len() as u64,
            chunk_hashes: chunks
                .iter()
                .map(|c| <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&c.bytes)))
                .collect(),
            digest: fedshield_crypto::secagg::update_digest(update),
            signature: Vec::new(),
        };
        manifest.signature = identity.sign(&manifest.signed_bytes(device));
        (manifest, chunks)
    }
}

/// One chunk of an upload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    /// The round.
    pub round: u64,
    /// Position in the manifest.
    pub index: u32,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// `fedshield/{f}/global/{i}`'s payload: part `index` of `parts` of the round's global
/// update, the values at the selected coordinates (the selection follows from the round's
/// public configuration and the history). Parts stay under the chunk size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GlobalPart {
    /// The host's federation epoch (see [`RoundConfig::epoch`]).
    pub epoch: u64,
    /// The round.
    pub round: u64,
    /// Whose updates it averages.
    pub contributors: Vec<DeviceId>,
    /// This part's position.
    pub index: u32,
    /// Number of parts.
    pub parts: u32,
    /// Offset of `values` in the whole update.
    pub offset: u64,
    /// The values.
    pub values: GlobalValues,
}

/// A global update's values as they travel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum GlobalValues {
    /// One `f32` per selected value.
    F32(Vec<f32>),
    /// 8-bit codes with per-block scales (`fedshield_codec::quant`).
    Q8(fedshield_codec::Q8),
}

impl GlobalValues {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Q8(q) => q.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as the devices apply them.
    pub fn decode(&self) -> Result<Vec<f32>, fedshield_codec::CodecError> {
        match self {
            Self::F32(v) => Ok(v.clone()),
            Self::Q8(q) => q.dequantize(),
        }
    }

    /// Values `start..end`; a quantized update is cut at its blocks (`start` a multiple of
    /// `Q8_BLOCK`).
    fn slice(&self, start: usize, end: usize) -> Self {
        match self {
            Self::F32(v) => Self::F32(v[start..end].to_vec()),
            Self::Q8(q) => Self::Q8(q.slice(start, end)),
        }
    }

    /// Values per part of at most `chunk_bytes` bytes (whole blocks when quantized).
    fn per_part(&self, chunk_bytes: usize) -> usize {
        match self {
            Self::F32(_) => (chunk_bytes / 4).max(1),
            Self::Q8(_) => {
                let block = fedshield_codec::Q8_BLOCK;
                (chunk_bytes / (block + 4)).max(1) * block
            }
        }
    }

    /// The parts' values in order, joined; `None` if they are of different kinds.
    fn concat(parts: impl IntoIterator<Item = Self>) -> Option<Self> {
        let mut out: Option<Self> = None;
        for part in parts {
            out = Some(match (out, part) {
                (None, p) => p,
                (Some(Self::F32(mut a)), Self::F32(b)) => {
                    a.extend(b);
                    Self::F32(a)
                }
                (Some(Self::Q8(mut a)), Self::Q8(b)) => {
                    a.scales.extend(b.scales);
                    a.codes.extend(b.codes);
                    Self::Q8(a)
                }
                _ => return None,
            });
        }
        out
    }
}

impl GlobalPart {
    /// Splits a round's global update into parts of at most `chunk_bytes` of values.
    pub fn split(
        epoch: u64,
        round: u64,
        contributors: &[DeviceId],
        values: &GlobalValues,
        chunk_bytes: usize,
    ) -> Vec<Self> {
        let per = values.per_part(chunk_bytes);
        let parts = values.len().div_ceil(per).max(1) as u32;
        (0..parts)
            .map(|i| {
                let start = i as usize * per;
                let end = (start + per).min(values.len());
                Self {
                    epoch,
                    round,
                    contributors: contributors.to_vec(),
                    index: i,
                    parts,
                    offset: start as u64,
                    values: values.slice(start, end),
                }
            })
            .collect()
    }
}

/// Reassembles a round's global update from its parts, arriving in any order, with
/// duplicates and parts of older rounds.
#[derive(Debug, Default)]
pub struct GlobalAssembler {
    round: u64,
    parts: std::collections::BTreeMap<u32, GlobalPart>,
}

impl GlobalAssembler {
    /// Adds a part; returns the whole update (contributors, values) when complete. Parts of
    /// rounds at or before `applied` are ignored; a set of parts of mixed kinds is dropped.
    pub fn add(
        &mut self,
        part: GlobalPart,
        applied: u64,
    ) -> Option<(u64, Vec<DeviceId>, GlobalValues)> {
        if part.round <= applied || part.index >= part.parts {
            return None;
        }
        if part.round != self.round {
            self.round = part.round;
            self.parts.clear();
        }
        let parts = part.parts;
        self.parts.insert(part.index, part);
        if self.parts.len() as u32 != parts {
            return None;
        }
        let parts = std::mem::take(&mut self.parts);
        let contributors = parts
            .values()
            .next()
            .map(|p| p.contributors.clone())
            .unwrap_or_default();
        let values = GlobalValues::concat(parts.into_values().map(|p| p.values))?;
        Some((self.round, contributors, values))
    }
}

/// The fleet's state after a completed round: what a device that missed a global update
/// (down for a round, or enrolled late) needs to take part again. Published by the host in
/// [`SnapshotPart`]s; zstd-compressed postcard inside.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The host's federation epoch (see [`RoundConfig::epoch`]).
    pub epoch: u64,
    /// The last completed round (the history's round).
    pub round: u64,
    /// The global adapter, in layout order.
    pub global: Vec<f32>,
    /// The selection history.
    pub history: fedshield_codec::History,
    /// Contributors of the most recent completed rounds (a restarted device settles its
    /// pending upload from these).
    pub recent: Vec<(u64, Vec<DeviceId>)>,
}

/// One part of a published [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotPart {
    /// The snapshot's round.
    pub round: u64,
    /// SHA-256 of the whole compressed snapshot (parts of different publications never mix).
    pub digest: [u8; 32],
    /// This part's position.
    pub index: u32,
    /// Number of parts.
    pub parts: u32,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Snapshot {
    /// Rounds of contributors a snapshot keeps.
    pub const RECENT: usize = 16;

    /// Compresses and splits the snapshot into parts of at most `chunk_bytes` bytes.
    pub fn split(&self, chunk_bytes: usize) -> Vec<SnapshotPart> {
        let raw = postcard::to_stdvec(self).expect("snapshots encode");
        let bytes = postcard::to_stdvec(&fedshield_wire::compress_if_smaller(&raw))
            .expect("envelopes encode");
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
        let chunks: Vec<&[u8]> = bytes.chunks(chunk_bytes.max(1)).collect();
        let parts = chunks.len() as u32;
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| SnapshotPart {
                round: self.round,
                digest,
                index: i as u32,
                parts,
                bytes: c.to_vec(),
            })
            .collect()
    }
}

/// Reassembles a snapshot from its parts (any order, duplicates, parts of other
/// publications). `limit` bounds the decompressed size.
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    digest: [u8; 32],
    parts: std::collections::BTreeMap<u32, SnapshotPart>,
}

impl SnapshotAssembler {
    /// Adds a part; returns the snapshot once every part of one publication is here and
    /// it checks out (digest, decompression, decoding). A part of a snapshot at or before
    /// `applied` (the round this device has already reached: a replay) is refused and
    /// leaves a publication being assembled untouched.
    pub fn add(
        &mut self,
        part: SnapshotPart,
        applied: u64,
        limit: usize,
    ) -> Option<Result<Snapshot, crate::ProtocolError>> {
        if part.round <= applied {
            return Some(Err(crate::ProtocolError::Stale {
                what: "snapshot part",
                got_round: part.round,
                got_incarnation: 0,
                round: applied,
                incarnation: 0,
            }));
        }
        if part.index >= part.parts {
            return None;
        }
        if part.digest != self.digest {
            self.digest = part.digest;
            self.parts.clear();
        }
        let parts = part.parts;
        self.parts.insert(part.index, part);
        if self.parts.len() as u32 != parts {
            return None;
        }
        let bytes: Vec<u8> = std::mem::take(&mut self.parts)
            .into_values()
            .flat_map(|p| p.bytes)
            .collect();
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
        if digest != self.digest {
            return Some(Err(crate::ProtocolError::Malformed(
                "snapshot parts do not hash to their digest".into(),
            )));
        }
        Some(
            crate::decode::<fedshield_wire::Compressed>(&bytes, bytes.len())
                .and_then(|c| {
                    c.into_bytes(limit)
                        .map_err(|e| crate::ProtocolError::Malformed(e.to_string()))
                })
                .and_then(|raw| crate::decode::<Snapshot>(&raw, limit)),
        )
    }
}
