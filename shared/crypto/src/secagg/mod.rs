//! Dropout-tolerant secure aggregation of the clients' per-round GLWE key vectors
//! (Bonawitz et al., CCS 2017, with its consistency check; over the sparse graph of SecAgg+,
//! Bell et al., CCS 2020, for large rosters), as pure state machines.
//!
//! The host learns `S = sum of key_u (mod 2^64)` over the clients `U3` whose masked inputs it
//! received, and nothing else about any single key, provided `|U3|` reaches the round's
//! minimum; with `S` it can decrypt the sum of exactly those clients' encrypted updates.
//! Who shares with whom is the round's [`Graph`]: everyone with everyone (the complete
//! graph, threshold a strict majority of the roster), or each member with its `k`
//! neighbours on a random ring (a Harary graph, threshold `t` of the member's own and its
//! neighbours' shares; see `graph`). Stages (see SECURITY.md):
//!
//! 0. **Advertise**: each client sends two fresh X25519 public keys (`c` for encrypting
//!    shares, `s` for pairwise masks) and a fresh ring nonce, signed with its ed25519
//!    identity. The host closes the stage with enough adverts and broadcasts the [`Roster`]
//!    `U1` (with the enrolment certificates, so clients check each other's identities
//!    against the fleet authority). Host and clients derive the same graph from it.
//! 1. **Share keys**: each client Shamir-shares its self-mask seed `b_u` and its secret `s`
//!    key among itself and its neighbours, and sends each neighbour its shares encrypted
//!    with ChaCha20-Poly1305 under a key agreed from the `c` keys. The host forwards them;
//!    `U2` = clients that sent shares.
//! 2. **Masked input**: each client sends `y_u = key_u + PRG(b_u) + sum ±PRG(s_uv)` over its
//!    neighbours v in `U2` (+ if u < v, - otherwise) with the digest of its encrypted
//!    update. The host sums them as they arrive; `U3` = clients whose masked input arrived.
//! 3. **Consistency**: the host sends `U3` to its members; each signs its digest. Enough
//!    signatures on the same list are required before any client unmasks, so a host cannot
//!    tell different clients different survivor sets.
//! 4. **Unmask**: each client reveals, once, the `b` shares it holds of members of `U3` and
//!    the `s` shares it holds of `U2 \ U3` (never both kinds for one client). The host
//!    reconstructs, removes the self masks and the dropped clients' leftover pairwise masks,
//!    and gets `S`.
//!
//! Every client message is signed (domain, sender, round and the message's kind included in
//! the signed bytes), so tampered, replayed, wrong-round and unsigned messages are rejected
//! with a typed [`SecAggError`]. The minimum of contributors in force is
//! [`effective_threshold`]: the configured one, raised to a strict majority of the roster.

mod client;
mod graph;
mod server;

pub use client::Client;
pub use graph::{
    Adversary, CORRECTNESS_BITS, DEFAULT_SPARSE_FROM, GRINDING_BITS, Graph, GraphPolicy,
    HararyParameters, SECURITY_BITS, ThreatModel, harary_parameters,
};
pub use server::{KeyAggregate, Server, Stage};

use crate::identity::{DeviceId, Enrolment, Identity};
use crate::shamir::Share;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain separation of every signed secure-aggregation message.
const MESSAGE_DOMAIN: &[u8] = b"fedshield/secagg/v2/message";

/// Public parameters of one secure aggregation, announced with the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggConfig {
    /// Round id: in every signed message, so nothing replays across rounds.
    pub round: u64,
    /// Minimum number of contributors; raised to a strict majority of the roster.
    pub threshold: usize,
    /// Length of the vectors aggregated (the GLWE key size N for FedShield).
    pub vector_len: usize,
    /// Who shares with whom ([`Graph::build`] derives the round's graph from the roster).
    pub graph: GraphPolicy,
}

/// The threshold in force for a roster of `roster_len` clients: at least 2, at least the
/// configured threshold, and a strict majority of the roster (which stops a host from
/// splitting the clients into two groups that each unmask a different survivor set).
pub fn effective_threshold(configured: usize, roster_len: usize) -> usize {
    configured.max(roster_len / 2 + 1).max(2)
}

/// A client's stage-0 advertisement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// X25519 public key for share encryption.
    pub c_pk: [u8; 32],
    /// X25519 public key for pairwise masks.
    pub s_pk: [u8; 32],
    /// The client's claimed aggregation weight (FedShield: its training sample count).
    /// Signed with the advert and broadcast in the roster, so that every member can
    /// recompute every member's weight and refuse a server that announces others.
    pub weight: u64,
    /// Fresh randomness for the ring order of a sparse graph ([`Graph::build`]).
    pub ring_nonce: [u8; 32],
}

/// A share sent from one client to another, encrypted end to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// Sender.
    pub from: DeviceId,
    /// Recipient.
    pub to: DeviceId,
    /// ChaCha20-Poly1305 ciphertext of the [`SharePair`].
    pub ciphertext: Vec<u8>,
}

/// What one client gives another in stage 1: its shares of the self-mask seed and of the
/// secret mask key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SharePair {
    pub b: Share,
    pub s: Share,
}

/// The body of a client's message, one kind per stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientBody {
    /// Stage 0.
    Advertise(Advert),
    /// Stage 1: one encrypted share per other roster member.
    Shares(Vec<EncryptedShare>),
    /// Stage 2: the masked key vector and the SHA-256 of the encrypted update it belongs to.
    MaskedInput {
        /// key + masks, mod 2^64.
        masked: Vec<u64>,
        /// SHA-256 of the client's serialized encrypted update.
        update_digest: [u8; 32],
    },
    /// Stage 3: the digest ([`survivors_digest`]) of the survivor list the client saw.
    Consistency([u8; 32]),
    /// Stage 4: shares revealed for reconstruction, of the client's own secrets and its
    /// neighbours' (everyone's in the complete graph).
    Unmask {
        /// Shares of `b_v` for every v in U3 that this client holds shares of.
        self_mask: Vec<(DeviceId, Share)>,
        /// Shares of `s_v` for every v in U2 \ U3 that this client holds shares of.
        mask_key: Vec<(DeviceId, Share)>,
    },
}

impl ClientBody {
    /// The message kind, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Advertise(_) => "advertise",
            Self::Shares(_) => "shares",
            Self::MaskedInput { .. } => "masked-input",
            Self::Consistency(_) => "consistency",
            Self::Unmask { .. } => "unmask",
        }
    }
}

/// A signed client message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMessage {
    /// The sender.
    pub sender: DeviceId,
    /// The round.
    pub round: u64,
    /// The body.
    pub body: ClientBody,
    /// ed25519 signature of [`SignedMessage::signed_bytes`]; empty means unsigned.
    pub signature: Vec<u8>,
}

impl SignedMessage {
    /// The bytes the signature covers: a domain tag, then sender, round and body.
    pub fn signed_bytes(sender: &DeviceId, round: u64, body: &ClientBody) -> Vec<u8> {
        let mut m = MESSAGE_DOMAIN.to_vec();
        m.extend(postcard::to_stdvec(&(sender, round, body)).expect("encodable"));
        m
    }

    /// Signs `body` as `sender` in `round`.
    pub fn sign(identity: &Identity, sender: DeviceId, round: u64, body: ClientBody) -> Self {
        let signature = identity.sign(&Self::signed_bytes(&sender, round, &body));
        Self {
            sender,
            round,
            body,
            signature,
        }
    }

    /// Checks the signature against `public_key`.
    pub fn verify(&self, public_key: &[u8; 32]) -> Result<(), SecAggError> {
        if self.signature.is_empty() {
            return Err(SecAggError::Unsigned(self.sender.clone()));
        }
        let bytes = Self::signed_bytes(&self.sender, self.round, &self.body);
        if crate::identity::verify(public_key, &bytes, &self.signature) {
            Ok(())
        } else {
            Err(SecAggError::BadSignature(self.sender.clone()))
        }
    }
}

/// One member of the roster: certificate and signed advert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The authority's certificate of the member's identity.
    pub enrolment: Enrolment,
    /// The member's signed stage-0 message.
    pub advert: SignedMessage,
}

/// Stage 0's result, broadcast to every member: `U1`, sorted by device id. A member's Shamir
/// x-coordinate is its position plus one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// The round.
    pub round: u64,
    /// The members.
    pub entries: Vec<RosterEntry>,
}

/// Stage 1's result for one recipient: the shares addressed to it by the members of `U2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareDelivery {
    /// The round.
    pub round: u64,
    /// Encrypted shares, one per sender in U2 other than the recipient.
    pub shares: Vec<EncryptedShare>,
}

/// Stage 3's request: the survivor list `U3` to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorList {
    /// The round.
    pub round: u64,
    /// U3, sorted.
    pub survivors: Vec<DeviceId>,
}

/// Stage 4's request: `U3` with enough members' signatures on its digest (the graph's
/// threshold of them: a strict majority of the roster in the complete graph).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// The round.
    pub round: u64,
    /// U3, sorted.
    pub survivors: Vec<DeviceId>,
    /// Consistency messages signed by members of U3.
    pub signatures: Vec<SignedMessage>,
}

/// What a consistency message signs: the round and the survivor list, hashed, so that the
/// unmask request carries the list once and each signature in constant size.
pub fn survivors_digest(round: u64, survivors: &[DeviceId]) -> [u8; 32] {
    let round = round.to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![&round];
    parts.extend(survivors.iter().map(|d| d.0.as_bytes()));
    kdf(b"fedshield/secagg/v2/survivors", &parts)
}

/// Why a secure-aggregation message or step was refused. Nothing is changed by a refused
/// message: the state machine is exactly as before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    /// The message carries no signature.
    #[error("unsigned message from {0}")]
    Unsigned(DeviceId),
    /// The signature does not verify: tampered, or not the sender's key.
    #[error("bad signature on a message from {0}")]
    BadSignature(DeviceId),
    /// The sender is not enrolled.
    #[error("unknown device {0}")]
    UnknownDevice(DeviceId),
    /// The sender's enrolment was revoked.
    #[error("revoked device {0}")]
    Revoked(DeviceId),
    /// The enrolment certificate is not signed by the fleet authority.
    #[error("enrolment of {0} is not signed by the fleet authority")]
    BadEnrolment(DeviceId),
    /// A revocation list not signed by the fleet authority.
    #[error("revocation list {0} is not signed by the fleet authority")]
    BadRevocations(u64),
    /// The host certificate is not signed by the fleet authority, or is for another fleet.
    #[error("host certificate of fleet {0:?} is not signed by the fleet authority")]
    BadHostCertificate(String),
    /// The host certificate's validity has ended.
    #[error(
        "host certificate {serial} expired at {not_after} (Unix seconds; now {now}): the fleet authority must certify the host again"
    )]
    HostCertificateExpired {
        /// Its serial number.
        serial: u64,
        /// The end of its validity.
        not_after: u64,
        /// The time it was checked at.
        now: u64,
    },
    /// A message for another round (a replay from an earlier one, or a stale client).
    #[error("message for round {got}, this is round {expected}")]
    WrongRound {
        /// This round.
        expected: u64,
        /// The message's round.
        got: u64,
    },
    /// A message of a kind this stage does not accept (late, early, or replayed).
    #[error("{got} message while collecting {expected}")]
    WrongStage {
        /// What the stage collects.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The sender already sent this stage's message (a replay or a duplicate).
    #[error("duplicate {kind} message from {sender}")]
    Duplicate {
        /// The sender.
        sender: DeviceId,
        /// The message kind.
        kind: &'static str,
    },
    /// The sender is not part of this stage's set (it dropped out earlier, or never joined).
    #[error("{0} is not a participant of this stage")]
    NotAParticipant(DeviceId),
    /// Fewer participants than the threshold: the host refuses to go on (it could otherwise
    /// decrypt too small an aggregate), and a client refuses to help it.
    #[error("{stage}: {have} participants, the threshold is {need}")]
    BelowThreshold {
        /// The stage.
        stage: &'static str,
        /// Participants.
        have: usize,
        /// Threshold in force.
        need: usize,
    },
    /// Structurally invalid content (wrong lengths, missing entries, bad keys).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A share that does not decrypt (tampered or misaddressed).
    #[error("share from {0} does not decrypt")]
    ShareDecryption(DeviceId),
    /// The host's unmask request contradicts what this client signed, or lacks signatures.
    #[error("inconsistent unmask request: {0}")]
    InconsistentRequest(String),
    /// An operation in the wrong state of the local state machine.
    #[error("{0}")]
    OutOfOrder(&'static str),
}

/// The digest a client signs with its masked input: SHA-256 of its serialized encrypted
/// update, under a domain tag.
pub fn update_digest(serialized_update: &[u8]) -> [u8; 32] {
    kdf(b"fedshield/update/v1", &[serialized_update])
}

/// SHA-256 of `parts`, each length-prefixed, under a domain tag.
pub(crate) fn kdf(domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((domain.len() as u64).to_le_bytes());
    h.update(domain);
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Adds (`sign` = 1) or subtracts (`sign` = -1) the ChaCha20 expansion of `seed` to `acc`,
/// mod 2^64.
pub(crate) fn apply_prg(acc: &mut [u64], seed: &[u8; 32], negate: bool) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
    if negate {
        for a in acc.iter_mut() {
            *a = a.wrapping_sub(rng.next_u64());
        }
    } else {
        for a in acc.iter_mut() {
            *a = a.wrapping_add(rng.next_u64());
        }
    }
}

/// The pairwise mask seed of two clients from their X25519 agreement.
pub(crate) fn pair_seed(round: u64, shared: &[u8; 32]) -> [u8; 32] {
    kdf(
        b"fedshield/secagg/v1/pair-mask",
        &[&round.to_le_bytes(), shared],
    )
}

/// The share-encryption key of two clients from their X25519 agreement.
pub(crate) fn share_key(round: u64, shared: &[u8; 32]) -> [u8; 32] {
    kdf(
        b"fedshield/secagg/v1/share-key",
        &[&round.to_le_bytes(), shared],
    )
}

/// Nonce and associated data of a share from `from` (x-coordinate) to `to`.
pub(crate) fn share_nonce_aad(round: u64, from: &DeviceId, to: &DeviceId) -> ([u8; 12], Vec<u8>) {
    let digest = kdf(
        b"fedshield/secagg/v1/share-nonce",
        &[&round.to_le_bytes(), from.0.as_bytes(), to.0.as_bytes()],
    );
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&digest[..12]);
    let aad = postcard::to_stdvec(&(round, from, to)).expect("encodable");
    (nonce, aad)
}

#[cfg(test)]
mod tests;
