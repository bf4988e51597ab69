//! The host's side of secure key aggregation. The driver feeds every incoming message to
//! [`Server::receive`] and closes each stage (on its deadline, or when everyone answered)
//! with the matching `close_*` method, which refuses to go on below the threshold.

use super::{
    ClientBody, EncryptedShare, Graph, Roster, RosterEntry, SecAggConfig, SecAggError,
    ShareDelivery, SignedMessage, SurvivorList, UnmaskRequest, apply_prg, effective_threshold,
    pair_seed, survivors_digest,
};
use crate::identity::{DeviceId, Registry};
use crate::shamir::{self, Share};
use std::collections::{BTreeMap, BTreeSet};
use x25519_dalek::{PublicKey, StaticSecret};

/// The stage the server is collecting messages for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Stage 0: adverts.
    Advertise,
    /// Stage 1: encrypted shares.
    ShareKeys,
    /// Stage 2: masked inputs.
    MaskedInput,
    /// Stage 3: consistency signatures.
    Consistency,
    /// Stage 4: unmask responses.
    Unmask,
    /// Finished: the key sum is available.
    Done,
}

impl Stage {
    fn expects(self) -> &'static str {
        match self {
            Self::Advertise => "advertise",
            Self::ShareKeys => "shares",
            Self::MaskedInput => "masked-input",
            Self::Consistency => "consistency",
            Self::Unmask => "unmask",
            Self::Done => "nothing (finished)",
        }
    }
}

/// The outcome: the sum of the keys of exactly `contributors`, and the digests of the
/// encrypted updates they bound their inputs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAggregate {
    /// U3, sorted.
    pub contributors: Vec<DeviceId>,
    /// SHA-256 of each contributor's encrypted update, as it signed it.
    pub update_digests: BTreeMap<DeviceId, [u8; 32]>,
    /// Sum of the contributors' key vectors, mod 2^64.
    pub key_sum: Vec<u64>,
}

/// One responder's revealed shares: of self-mask seeds (members of U3) and of mask keys
/// (members of U2 \ U3), by the secret's owner.
type UnmaskShares = (BTreeMap<DeviceId, Share>, BTreeMap<DeviceId, Share>);

/// The host's secure-aggregation session for one round.
#[derive(Debug)]
pub struct Server {
    config: SecAggConfig,
    registry: Registry,
    stage: Stage,
    adverts: BTreeMap<DeviceId, RosterEntry>,
    /// U1 in roster order (sorted), with each member's s public key.
    u1: Vec<(DeviceId, [u8; 32])>,
    graph: Option<Graph>,
    /// Fewest contributors (a strict majority of the roster, at least the configured).
    threshold: usize,
    /// Each member's encrypted shares until they are delivered; after that, empty lists
    /// (the keys are U2).
    shares: BTreeMap<DeviceId, Vec<EncryptedShare>>,
    masked_sum: Vec<u64>,
    digests: BTreeMap<DeviceId, [u8; 32]>,
    u3: Vec<DeviceId>,
    /// `survivors_digest` of U3, what every consistency message must sign.
    u3_digest: [u8; 32],
    consistency: BTreeMap<DeviceId, SignedMessage>,
    unmask: BTreeMap<DeviceId, UnmaskShares>,
}

impl Server {
    /// A session for `config` accepting devices of `registry`.
    pub fn new(config: SecAggConfig, registry: Registry) -> Result<Self, SecAggError> {
        if config.vector_len == 0 {
            return Err(SecAggError::Malformed("vector length 0".into()));
        }
        config.graph.check()?;
        Ok(Self {
            config,
            registry,
            stage: Stage::Advertise,
            adverts: BTreeMap::new(),
            u1: Vec::new(),
            graph: None,
            threshold: effective_threshold(config.threshold, 0),
            shares: BTreeMap::new(),
            masked_sum: vec![0; config.vector_len],
            digests: BTreeMap::new(),
            u3: Vec::new(),
            u3_digest: [0; 32],
            consistency: BTreeMap::new(),
            unmask: BTreeMap::new(),
        })
    }

    /// The stage being collected.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The fewest contributors the round accepts (known once the roster is fixed).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The round's graph, once the roster is fixed.
    pub fn graph(&self) -> Option<&Graph> {
        self.graph.as_ref()
    }

    /// Shares that reconstruct a secret: the graph's threshold (the minimum of
    /// contributors until the roster is fixed).
    fn share_threshold(&self) -> usize {
        self.graph.as_ref().map_or(self.threshold, Graph::threshold)
    }

    /// How many messages the current stage has collected.
    pub fn collected(&self) -> usize {
        match self.stage {
            Stage::Advertise => self.adverts.len(),
            Stage::ShareKeys => self.shares.len(),
            Stage::MaskedInput => self.digests.len(),
            Stage::Consistency => self.consistency.len(),
            Stage::Unmask => self.unmask.len(),
            Stage::Done => 0,
        }
    }

    /// How many messages the current stage can collect at most (its participants).
    pub fn expected(&self) -> usize {
        match self.stage {
            Stage::Advertise => self.registry.len(),
            Stage::ShareKeys => self.u1.len(),
            Stage::MaskedInput => self.shares.len(),
            Stage::Consistency => self.u3.len(),
            Stage::Unmask => self.consistency.len(),
            Stage::Done => 0,
        }
    }

    fn x_of(&self, id: &DeviceId) -> Option<u32> {
        self.position(id).map(|i| i as u32 + 1)
    }

    /// `id`'s index in U1 (sorted by id).
    fn position(&self, id: &DeviceId) -> Option<usize> {
        self.u1.binary_search_by(|(d, _)| d.cmp(id)).ok()
    }

    /// Roster indices of `id`'s neighbours.
    fn neighbours_of(&self, id: &DeviceId) -> Vec<usize> {
        match (&self.graph, self.position(id)) {
            (Some(g), Some(i)) => g.neighbours(i),
            _ => Vec::new(),
        }
    }

    /// The holders of `owner`'s shares (itself and its neighbours), ascending by id.
    fn holders_of(&self, owner: &DeviceId) -> Vec<&DeviceId> {
        match (&self.graph, self.position(owner)) {
            (Some(g), Some(o)) => g.holders(o).into_iter().map(|j| &self.u1[j].0).collect(),
            _ => Vec::new(),
        }
    }

    fn in_u3(&self, id: &DeviceId) -> bool {
        self.u3.binary_search(id).is_ok()
    }

    /// Checks one client message as [`Server::receive`] would, without recording it: its
    /// round, the sender's enrolment and signature, the stage, the sender's part in it,
    /// duplicates and the content's shape. A driver that must hold a message before
    /// handing it over (the host holds a masked input until its upload is complete) checks
    /// it first, so that nothing forged or replayed ever takes a genuine message's place.
    pub fn check(&self, msg: &SignedMessage) -> Result<(), SecAggError> {
        if msg.round != self.config.round {
            return Err(SecAggError::WrongRound {
                expected: self.config.round,
                got: msg.round,
            });
        }
        let enrolment = self.registry.enrolment(&msg.sender)?;
        msg.verify(&enrolment.public_key)?;
        let sender = &msg.sender;
        let duplicate = |kind| SecAggError::Duplicate {
            sender: sender.clone(),
            kind,
        };
        match (&self.stage, &msg.body) {
            (Stage::Advertise, ClientBody::Advertise(_)) => {
                if self.adverts.contains_key(sender) {
                    return Err(duplicate("advertise"));
                }
            }
            (Stage::ShareKeys, ClientBody::Shares(shares)) => {
                if self.x_of(sender).is_none() {
                    return Err(SecAggError::NotAParticipant(sender.clone()));
                }
                if self.shares.contains_key(sender) {
                    return Err(duplicate("shares"));
                }
                let recipients: BTreeSet<&DeviceId> = shares.iter().map(|s| &s.to).collect();
                let neighbours: BTreeSet<&DeviceId> = self
                    .neighbours_of(sender)
                    .into_iter()
                    .map(|j| &self.u1[j].0)
                    .collect();
                let valid = recipients.len() == shares.len()
                    && recipients == neighbours
                    && shares.iter().all(|s| &s.from == sender);
                if !valid {
                    return Err(SecAggError::Malformed(format!(
                        "shares from {sender}: need one per neighbour in the round's graph"
                    )));
                }
            }
            (Stage::MaskedInput, ClientBody::MaskedInput { masked, .. }) => {
                if !self.shares.contains_key(sender) {
                    return Err(SecAggError::NotAParticipant(sender.clone()));
                }
                if self.digests.contains_key(sender) {
                    return Err(duplicate("masked-input"));
                }
                if masked.len() != self.config.vector_len {
                    return Err(SecAggError::Malformed(format!(
                        "masked input of {} values, expected {}",
                        masked.len(),
                        self.config.vector_len
                    )));
                }
            }
            (Stage::Consistency, ClientBody::Consistency(list)) => {
                if !self.in_u3(sender) {
                    return Err(SecAggError::NotAParticipant(sender.clone()));
                }
                if self.consistency.contains_key(sender) {
                    return Err(duplicate("consistency"));
                }
                if *list != self.u3_digest {
                    return Err(SecAggError::InconsistentRequest(format!(
                        "{sender} signed another survivor list"
                    )));
                }
            }
            (
                Stage::Unmask,
                ClientBody::Unmask {
                    self_mask,
                    mask_key,
                },
            ) => {
                let Some(x) = self
                    .consistency
                    .contains_key(sender)
                    .then(|| self.x_of(sender))
                    .flatten()
                else {
                    return Err(SecAggError::NotAParticipant(sender.clone()));
                };
                if self.unmask.contains_key(sender) {
                    return Err(duplicate("unmask"));
                }
                // A member holds shares of exactly its holders' secrets (the relation is
                // symmetric): of those in U3 and of those in U2 \ U3.
                let held = self.holders_of(sender);
                let survivors: Vec<&DeviceId> =
                    held.iter().copied().filter(|v| self.in_u3(v)).collect();
                let dropped: Vec<&DeviceId> = held
                    .iter()
                    .copied()
                    .filter(|v| !self.in_u3(v) && self.shares.contains_key(*v))
                    .collect();
                let matches =
                    |got: &[(DeviceId, Share)], want: &mut dyn Iterator<Item = &DeviceId>| {
                        let want: Vec<&DeviceId> = want.collect();
                        got.len() == want.len()
                            && got
                                .iter()
                                .zip(want)
                                .all(|((id, share), w)| id == w && share.x == x)
                    };
                if !matches(self_mask, &mut survivors.into_iter())
                    || !matches(mask_key, &mut dropped.into_iter())
                {
                    return Err(SecAggError::Malformed(format!(
                        "unmask response from {sender}: shares must cover the members of U3 \\
                         and of U2 \\ U3 it holds shares of"
                    )));
                }
            }
            _ => {
                return Err(SecAggError::WrongStage {
                    expected: self.stage.expects(),
                    got: msg.body.kind(),
                });
            }
        }
        Ok(())
    }

    /// The masked inputs recorded so far, as their running sum and the update digests
    /// their senders signed: with the round's earlier messages, all a restarted host needs
    /// to go on (it checkpoints these instead of keeping every masked input).
    pub fn masked_inputs(&self) -> (&[u64], &BTreeMap<DeviceId, [u8; 32]>) {
        (&self.masked_sum, &self.digests)
    }

    /// Puts back what [`Server::masked_inputs`] returned, into a server that is collecting
    /// masked inputs and has recorded none (a host replaying its checkpointed journal). The
    /// senders must be members of U2.
    pub fn restore_masked_inputs(
        &mut self,
        masked_sum: Vec<u64>,
        digests: BTreeMap<DeviceId, [u8; 32]>,
    ) -> Result<(), SecAggError> {
        if self.stage != Stage::MaskedInput || !self.digests.is_empty() {
            return Err(SecAggError::OutOfOrder(
                "masked inputs restored outside an empty masked-input stage",
            ));
        }
        self.add_masked_inputs(&masked_sum, digests)
    }

    /// Records the masked inputs of `digests`' senders through their sum `masked_sum`
    /// (summed elsewhere: a fold worker's shard, or a checkpoint), with the update digests
    /// they signed. The senders must be members of U2 that have not been recorded; their
    /// messages were checked on arrival by the caller ([`Server::check`]).
    pub fn add_masked_inputs(
        &mut self,
        masked_sum: &[u64],
        digests: BTreeMap<DeviceId, [u8; 32]>,
    ) -> Result<(), SecAggError> {
        if self.stage != Stage::MaskedInput {
            return Err(SecAggError::OutOfOrder(
                "masked inputs added outside the masked-input stage",
            ));
        }
        if masked_sum.len() != self.config.vector_len {
            return Err(SecAggError::Malformed(format!(
                "masked sum of {} values, expected {}",
                masked_sum.len(),
                self.config.vector_len
            )));
        }
        if let Some(stranger) = digests.keys().find(|d| !self.shares.contains_key(*d)) {
            return Err(SecAggError::NotAParticipant(stranger.clone()));
        }
        if let Some(twice) = digests.keys().find(|d| self.digests.contains_key(*d)) {
            return Err(SecAggError::Duplicate {
                sender: twice.clone(),
                kind: "masked-input",
            });
        }
        for (s, m) in self.masked_sum.iter_mut().zip(masked_sum) {
            *s = s.wrapping_add(*m);
        }
        self.digests.extend(digests);
        Ok(())
    }

    /// Checks ([`Server::check`]) and records one client message. A refused message
    /// changes nothing.
    pub fn receive(&mut self, msg: SignedMessage) -> Result<(), SecAggError> {
        self.check(&msg)?;
        let sender = msg.sender.clone();
        match &msg.body {
            ClientBody::Advertise(_) => {
                let enrolment = self.registry.enrolment(&sender)?.clone();
                self.adverts.insert(
                    sender,
                    RosterEntry {
                        enrolment,
                        advert: msg,
                    },
                );
            }
            ClientBody::Shares(shares) => {
                let shares = shares.clone();
                self.shares.insert(sender, shares);
            }
            ClientBody::MaskedInput {
                masked,
                update_digest,
            } => {
                for (s, m) in self.masked_sum.iter_mut().zip(masked) {
                    *s = s.wrapping_add(*m);
                }
                let digest = *update_digest;
                self.digests.insert(sender, digest);
            }
            ClientBody::Consistency(_) => {
                self.consistency.insert(sender, msg);
            }
            ClientBody::Unmask {
                self_mask,
                mask_key,
            } => {
                let shares = (
                    self_mask.iter().cloned().collect(),
                    mask_key.iter().cloned().collect(),
                );
                self.unmask.insert(sender, shares);
            }
        }
        Ok(())
    }

    fn require(&self, stage: Stage, have: usize, name: &'static str) -> Result<(), SecAggError> {
        self.require_at_least(stage, have, self.threshold, name)
    }

    fn require_at_least(
        &self,
        stage: Stage,
        have: usize,
        need: usize,
        name: &'static str,
    ) -> Result<(), SecAggError> {
        if self.stage != stage {
            return Err(SecAggError::OutOfOrder("stage closed out of order"));
        }
        if have < need {
            return Err(SecAggError::BelowThreshold {
                stage: name,
                have,
                need,
            });
        }
        Ok(())
    }

    /// Ends stage 0: fixes U1 and returns the roster to broadcast.
    pub fn close_advertise(&mut self) -> Result<Roster, SecAggError> {
        self.threshold = effective_threshold(self.config.threshold, self.adverts.len());
        self.require(Stage::Advertise, self.adverts.len(), "advertise")?;
        let entries: Vec<RosterEntry> = self.adverts.values().cloned().collect();
        let mut nonces = Vec::with_capacity(entries.len());
        self.u1 = entries
            .iter()
            .map(|e| match &e.advert.body {
                ClientBody::Advertise(a) => {
                    nonces.push(a.ring_nonce);
                    (e.advert.sender.clone(), a.s_pk)
                }
                _ => unreachable!("only adverts are stored in stage 0"),
            })
            .collect();
        let members: Vec<(&DeviceId, &[u8; 32])> = self
            .u1
            .iter()
            .zip(&nonces)
            .map(|((d, _), n)| (d, n))
            .collect();
        let graph = Graph::build(&self.config, &members)?;
        self.graph = Some(graph);
        self.stage = Stage::ShareKeys;
        Ok(Roster {
            round: self.config.round,
            entries,
        })
    }

    /// Ends stage 1: fixes U2 and returns each member's deliveries.
    pub fn close_shares(&mut self) -> Result<BTreeMap<DeviceId, ShareDelivery>, SecAggError> {
        self.require(Stage::ShareKeys, self.shares.len(), "shares")?;
        let mut out: BTreeMap<DeviceId, ShareDelivery> = self
            .shares
            .keys()
            .map(|v| {
                let delivery = ShareDelivery {
                    round: self.config.round,
                    shares: Vec::new(),
                };
                (v.clone(), delivery)
            })
            .collect();
        // The relayed shares move into the deliveries: the server keeps only who shared
        // (U2), not a second copy of every share for the rest of the round.
        for shares in self.shares.values_mut() {
            for share in std::mem::take(shares) {
                if let Some(d) = out.get_mut(&share.to) {
                    d.shares.push(share);
                }
            }
        }
        self.stage = Stage::MaskedInput;
        Ok(out)
    }

    /// Ends stage 2: fixes U3, the contributors, and returns the list for them to sign.
    pub fn close_masked_inputs(&mut self) -> Result<SurvivorList, SecAggError> {
        self.require(Stage::MaskedInput, self.digests.len(), "masked inputs")?;
        self.u3 = self.digests.keys().cloned().collect();
        self.u3_digest = survivors_digest(self.config.round, &self.u3);
        self.stage = Stage::Consistency;
        Ok(SurvivorList {
            round: self.config.round,
            survivors: self.u3.clone(),
        })
    }

    /// Ends stage 3: returns the unmask request with as many collected signatures as a
    /// client requires (the graph's threshold), so that its size does not grow with U3.
    pub fn close_consistency(&mut self) -> Result<UnmaskRequest, SecAggError> {
        let need = self.share_threshold();
        self.require_at_least(
            Stage::Consistency,
            self.consistency.len(),
            need,
            "consistency",
        )?;
        self.stage = Stage::Unmask;
        Ok(UnmaskRequest {
            round: self.config.round,
            survivors: self.u3.clone(),
            signatures: self.consistency.values().take(need).cloned().collect(),
        })
    }

    /// Ends stage 4: reconstructs each self mask of U3 and each mask key of U2 \ U3 from
    /// the graph's threshold of the responses of its holders, removes the masks, and
    /// returns the key sum of U3.
    pub fn close_unmask(&mut self) -> Result<KeyAggregate, SecAggError> {
        let t = self.share_threshold();
        self.require_at_least(Stage::Unmask, self.unmask.len(), t, "unmask")?;
        // Lagrange coefficients per set of x-coordinates: one set in the complete graph.
        let mut lagrange: BTreeMap<Vec<u32>, Vec<u64>> = BTreeMap::new();
        let mut reconstruct = |owner: &DeviceId, pick: &dyn Fn(&UnmaskShares) -> Option<&Share>| {
            let shares: Vec<&Share> = self
                .holders_of(owner)
                .into_iter()
                .filter_map(|h| self.unmask.get(h).and_then(pick))
                .take(t)
                .collect();
            if shares.len() < t {
                return Err(SecAggError::BelowThreshold {
                    stage: "unmask",
                    have: shares.len(),
                    need: t,
                });
            }
            let xs: Vec<u32> = shares.iter().map(|s| s.x).collect();
            let lambda = match lagrange.get(&xs) {
                Some(l) => l,
                None => {
                    let l = shamir::lagrange_at_zero(&xs)
                        .map_err(|e| SecAggError::Malformed(e.to_string()))?;
                    lagrange.entry(xs).or_insert(l)
                }
            };
            shamir::combine_with(&shares, lambda).map_err(|e| SecAggError::Malformed(e.to_string()))
        };
        let mut sum = self.masked_sum.clone();
        for u in &self.u3 {
            let b = reconstruct(u, &|r| r.0.get(u))?;
            apply_prg(&mut sum, &b, true);
        }
        let dropped: Vec<&DeviceId> = self
            .shares
            .keys()
            .filter(|v| self.u3.binary_search(v).is_err())
            .collect();
        for v in dropped {
            let s_sk = StaticSecret::from(reconstruct(v, &|r| r.1.get(v))?);
            let advertised = self.position(v).map(|i| self.u1[i].1);
            if Some(PublicKey::from(&s_sk).to_bytes()) != advertised {
                return Err(SecAggError::Malformed(format!(
                    "the shares of {v}'s mask key do not reconstruct its advertised key"
                )));
            }
            for j in self.neighbours_of(v) {
                let (u, s_pk_u) = &self.u1[j];
                if self.u3.binary_search(u).is_err() {
                    continue;
                }
                let shared = s_sk.diffie_hellman(&PublicKey::from(*s_pk_u)).to_bytes();
                // u added the pair mask if u < v, subtracted it otherwise: undo that.
                apply_prg(&mut sum, &pair_seed(self.config.round, &shared), u < v);
            }
        }
        self.stage = Stage::Done;
        Ok(KeyAggregate {
            contributors: self.u3.clone(),
            update_digests: self.digests.clone(),
            key_sum: sum,
        })
    }
}
