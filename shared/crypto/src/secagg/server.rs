//! The host's side of secure key aggregation. The driver feeds every incoming message to
//! [`Server::receive`] and closes each stage (on its deadline, or when everyone answered)
//! with the matching `close_*` method, which refuses to go on below the threshold.

use super::{
    ClientBody, EncryptedShare, Roster, RosterEntry, SecAggConfig, SecAggError, ShareDelivery,
    SignedMessage, SurvivorList, UnmaskRequest, apply_prg, effective_threshold, pair_seed,
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

type UnmaskShares = (Vec<(DeviceId, Share)>, Vec<(DeviceId, Share)>);

/// The host's secure-aggregation session for one round.
#[derive(Debug)]
pub struct Server {
    config: SecAggConfig,
    registry: Registry,
    stage: Stage,
    adverts: BTreeMap<DeviceId, RosterEntry>,
    /// U1 in roster order (sorted), with each member's s public key.
    u1: Vec<(DeviceId, [u8; 32])>,
    threshold: usize,
    shares: BTreeMap<DeviceId, Vec<EncryptedShare>>,
    masked_sum: Vec<u64>,
    digests: BTreeMap<DeviceId, [u8; 32]>,
    u3: Vec<DeviceId>,
    consistency: BTreeMap<DeviceId, SignedMessage>,
    unmask: BTreeMap<DeviceId, UnmaskShares>,
}

impl Server {
    /// A session for `config` accepting devices of `registry`.
    pub fn new(config: SecAggConfig, registry: Registry) -> Result<Self, SecAggError> {
        if config.vector_len == 0 {
            return Err(SecAggError::Malformed("vector length 0".into()));
        }
        Ok(Self {
            config,
            registry,
            stage: Stage::Advertise,
            adverts: BTreeMap::new(),
            u1: Vec::new(),
            threshold: effective_threshold(config.threshold, 0),
            shares: BTreeMap::new(),
            masked_sum: vec![0; config.vector_len],
            digests: BTreeMap::new(),
            u3: Vec::new(),
            consistency: BTreeMap::new(),
            unmask: BTreeMap::new(),
        })
    }

    /// The stage being collected.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The threshold in force (known once the roster is fixed).
    pub fn threshold(&self) -> usize {
        self.threshold
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
        self.u1
            .iter()
            .position(|(d, _)| d == id)
            .map(|i| i as u32 + 1)
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
                let valid = shares.len() == self.u1.len() - 1
                    && recipients.len() == shares.len()
                    && shares.iter().all(|s| {
                        &s.from == sender && &s.to != sender && self.x_of(&s.to).is_some()
                    });
                if !valid {
                    return Err(SecAggError::Malformed(format!(
                        "shares from {sender}: need one per other roster member"
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
                if !self.u3.contains(sender) {
                    return Err(SecAggError::NotAParticipant(sender.clone()));
                }
                if self.consistency.contains_key(sender) {
                    return Err(duplicate("consistency"));
                }
                if list != &self.u3 {
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
                let dropped: Vec<&DeviceId> = self
                    .shares
                    .keys()
                    .filter(|v| !self.u3.contains(v))
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
                if !matches(self_mask, &mut self.u3.iter())
                    || !matches(mask_key, &mut dropped.into_iter())
                {
                    return Err(SecAggError::Malformed(format!(
                        "unmask response from {sender}: shares must cover U3 and U2 \\ U3"
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
                let shares = (self_mask.clone(), mask_key.clone());
                self.unmask.insert(sender, shares);
            }
        }
        Ok(())
    }

    fn require(&self, stage: Stage, have: usize, name: &'static str) -> Result<(), SecAggError> {
        if self.stage != stage {
            return Err(SecAggError::OutOfOrder("stage closed out of order"));
        }
        if have < self.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: name,
                have,
                need: self.threshold,
            });
        }
        Ok(())
    }

    /// Ends stage 0: fixes U1 and returns the roster to broadcast.
    pub fn close_advertise(&mut self) -> Result<Roster, SecAggError> {
        self.threshold = effective_threshold(self.config.threshold, self.adverts.len());
        self.require(Stage::Advertise, self.adverts.len(), "advertise")?;
        let entries: Vec<RosterEntry> = self.adverts.values().cloned().collect();
        self.u1 = entries
            .iter()
            .map(|e| match &e.advert.body {
                ClientBody::Advertise(a) => (e.advert.sender.clone(), a.s_pk),
                _ => unreachable!("only adverts are stored in stage 0"),
            })
            .collect();
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
        for share in self.shares.values().flatten() {
            if let Some(d) = out.get_mut(&share.to) {
                d.shares.push(share.clone());
            }
        }
        self.stage = Stage::MaskedInput;
        Ok(out)
    }

    /// Ends stage 2: fixes U3, the contributors, and returns the list for them to sign.
    pub fn close_masked_inputs(&mut self) -> Result<SurvivorList, SecAggError> {
        self.require(Stage::MaskedInput, self.digests.len(), "masked inputs")?;
        self.u3 = self.digests.keys().cloned().collect();
        self.stage = Stage::Consistency;
        Ok(SurvivorList {
            round: self.config.round,
            survivors: self.u3.clone(),
        })
    }

    /// Ends stage 3: returns the unmask request with the collected signatures.
    pub fn close_consistency(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.require(Stage::Consistency, self.consistency.len(), "consistency")?;
        self.stage = Stage::Unmask;
        Ok(UnmaskRequest {
            round: self.config.round,
            survivors: self.u3.clone(),
            signatures: self.consistency.values().cloned().collect(),
        })
    }

    /// Ends stage 4: reconstructs the self masks of U3 and the mask keys of U2 \ U3 from
    /// t responses, removes the masks, and returns the key sum of U3.
    pub fn close_unmask(&mut self) -> Result<KeyAggregate, SecAggError> {
        self.require(Stage::Unmask, self.unmask.len(), "unmask")?;
        let responders: Vec<(&DeviceId, &UnmaskShares)> =
            self.unmask.iter().take(self.threshold).collect();
        let xs: Vec<u32> = responders
            .iter()
            .map(|(id, _)| self.x_of(id).expect("responders are roster members"))
            .collect();
        let lambda =
            shamir::lagrange_at_zero(&xs).map_err(|e| SecAggError::Malformed(e.to_string()))?;
        let reconstruct = |pick: &dyn Fn(&UnmaskShares) -> &Share| {
            let shares: Vec<&Share> = responders.iter().map(|(_, r)| pick(r)).collect();
            shamir::combine_with(&shares, &lambda)
                .map_err(|e| SecAggError::Malformed(e.to_string()))
        };
        let mut sum = self.masked_sum.clone();
        for k in 0..self.u3.len() {
            let b = reconstruct(&|r| &r.0[k].1)?;
            apply_prg(&mut sum, &b, true);
        }
        let dropped: Vec<DeviceId> = self
            .shares
            .keys()
            .filter(|v| !self.u3.contains(v))
            .cloned()
            .collect();
        for (k, v) in dropped.iter().enumerate() {
            let s_sk = StaticSecret::from(reconstruct(&|r| &r.1[k].1)?);
            let advertised = self.u1.iter().find(|(d, _)| d == v).map(|(_, pk)| *pk);
            if Some(PublicKey::from(&s_sk).to_bytes()) != advertised {
                return Err(SecAggError::Malformed(format!(
                    "the shares of {v}'s mask key do not reconstruct its advertised key"
                )));
            }
            for (u, s_pk_u) in self.u1.iter().filter(|(u, _)| self.u3.contains(u)) {
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
