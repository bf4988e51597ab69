//! The host's round journal: how a killed host resumes the round it was running.
//!
//! [`HostRound`] is deterministic: the same inputs (accepted messages with their times, and
//! the clock ticks that closed a phase) rebuild exactly the same state, down to the running
//! encrypted sum. So instead of snapshotting the state (secure-aggregation server, partial
//! uploads, sum), the driver appends every input that changed the round to a journal, and a
//! restarted host replays it ([`replay`]). Refused messages change nothing and are not
//! journalled. The journal spools the in-flight uploads; once uploads are folded into the
//! running sum, the driver compacts it ([`compact`]): their messages give way to one
//! [`Entry::Checkpoint`] of the folded state (`host::FoldCheckpoint`: the encrypted running
//! sum, the masked inputs' sum and digests), so a round's journal stays
//! O(update + devices x metadata + in-flight uploads) on disk. It is deleted when the
//! round ends.
//!
//! Record format: a little-endian `u32` length, then the postcard encoding of one
//! [`Entry`]. A torn last record (the host killed mid-write) is ignored on reading.

use crate::ProtocolError;
use crate::host::{Deadlines, FoldCheckpoint, HostAction, HostRound};
use crate::messages::{EdgeMessage, RoundConfig};
use crate::shard::ShardUplink;
use fedshield_crypto::identity::{DeviceId, Registry};
use fedshield_crypto::secagg::ClientBody;

/// One journal record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Entry {
    /// The round started (always the first record).
    Start {
        /// Its configuration (with the mask seed drawn for it).
        config: RoundConfig,
        /// Its deadlines.
        deadlines: Deadlines,
        /// The driver's clock at the start (ms).
        now: u64,
    },
    /// A message the round accepted.
    Message {
        /// The device of the uplink it came on.
        from: DeviceId,
        /// The message.
        message: EdgeMessage,
        /// The driver's clock (ms).
        now: u64,
    },
    /// A clock tick past the phase deadline.
    Tick {
        /// The driver's clock (ms).
        now: u64,
    },
    /// A fold worker's report the round accepted ([`HostRound::on_shard`]).
    Shard {
        /// The report.
        uplink: ShardUplink,
        /// The driver's clock (ms).
        now: u64,
    },
    /// The round's retained messages were re-published ([`HostRound::republish`]).
    Republish,
    /// The folded uploads' state ([`HostRound::checkpoint`]), standing for their messages
    /// ([`compact`]).
    Checkpoint(Box<FoldCheckpoint>),
}

impl Entry {
    /// The entry as one journal record.
    pub fn to_record(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self).expect("journal entries encode");
        let mut record = Vec::with_capacity(4 + body.len());
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&body);
        record
    }
}

/// Reads the records of a journal: the entries, and the length of the valid prefix (a torn
/// last record is left out). A record that is complete but does not decode is an error.
pub fn read(bytes: &[u8]) -> Result<(Vec<Entry>, usize), ProtocolError> {
    let mut entries = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 4 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(body) = bytes.get(at + 4..at + 4 + len) else {
            break; // torn
        };
        let entry = crate::decode(body, len)
            .map_err(|e| ProtocolError::Malformed(format!("journal record at byte {at}: {e}")))?;
        entries.push(entry);
        at += 4 + len;
    }
    Ok((entries, at))
}

/// A round rebuilt from its journal.
#[derive(Debug)]
pub struct Replayed {
    /// The round, in the state it had when the journal ends.
    pub round: HostRound,
    /// Its outcome, if it ended within the journal ([`HostAction::Finished`] or
    /// [`HostAction::Failed`]).
    pub outcome: Option<HostAction>,
    /// Messages replayed.
    pub messages: usize,
}

/// Rebuilds a round from its journal. Every journalled message was accepted when it
/// arrived; one refused on replay (the registry changed since, say) is an error, and the
/// driver gives the round up rather than resume a different one.
pub fn replay(entries: &[Entry], registry: Registry) -> Result<Replayed, ProtocolError> {
    let Some(Entry::Start {
        config,
        deadlines,
        now,
    }) = entries.first()
    else {
        return Err(ProtocolError::Malformed(
            "a journal starts with the round's start".into(),
        ));
    };
    let (mut round, _) = HostRound::start(config.clone(), registry, *deadlines, *now)?;
    let mut outcome = None;
    let mut messages = 0;
    for entry in &entries[1..] {
        let actions = match entry {
            Entry::Start { .. } => {
                return Err(ProtocolError::Malformed(
                    "a second start in the journal".into(),
                ));
            }
            Entry::Message { from, message, now } => {
                messages += 1;
                round.on_message(from, message.clone(), *now)?
            }
            Entry::Shard { uplink, now } => {
                messages += 1;
                round.on_shard(uplink.clone(), *now)?
            }
            Entry::Tick { now } => round.on_tick(*now),
            Entry::Republish => round.republish(),
            Entry::Checkpoint(checkpoint) => {
                round.restore(checkpoint)?;
                vec![]
            }
        };
        outcome = actions
            .into_iter()
            .find(|a| matches!(a, HostAction::Finished(_) | HostAction::Failed(_)))
            .or(outcome);
    }
    Ok(Replayed {
        round,
        outcome,
        messages,
    })
}

/// A journal's entries with the upload messages of the devices in `checkpoint` (their
/// masked inputs, manifests and chunks) and any earlier checkpoint replaced by `checkpoint`
/// at the end: replayed, it rebuilds the round exactly as the whole journal would. Taken
/// while the round collects uploads ([`HostRound::checkpoint`] is `None` otherwise), so
/// nothing after it depended on the messages it drops.
pub fn compact(entries: &[Entry], checkpoint: FoldCheckpoint) -> Vec<Entry> {
    let folded: std::collections::BTreeSet<&DeviceId> = checkpoint.folded.iter().collect();
    let upload = |message: &EdgeMessage| match message {
        EdgeMessage::SecAgg(m) => matches!(m.body, ClientBody::MaskedInput { .. }),
        EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) => true,
        _ => false,
    };
    let mut out: Vec<Entry> = entries
        .iter()
        .filter(|e| match e {
            Entry::Message { from, message, .. } => !(folded.contains(from) && upload(message)),
            Entry::Checkpoint(_) => false,
            _ => true,
        })
        .cloned()
        .collect();
    out.push(Entry::Checkpoint(Box::new(checkpoint)));
    out
}
