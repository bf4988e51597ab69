//! The client's side of secure key aggregation: one value per round, driven by the host's
//! messages. Each method checks what the host sent before answering, and answers at most
//! once per stage.

use super::{
    Advert, ClientBody, EncryptedShare, Graph, Roster, SecAggConfig, SecAggError, ShareDelivery,
    SharePair, SignedMessage, SurvivorList, UnmaskRequest, apply_prg, effective_threshold,
    pair_seed, share_key, share_nonce_aad, survivors_digest,
};
use crate::identity::{DeviceId, Identity};
use crate::shamir::{self, Share};
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use rand::CryptoRng;
use std::collections::{BTreeMap, BTreeSet};
use x25519_dalek::{PublicKey, StaticSecret};

/// A peer as the client learnt it from the roster.
struct Peer {
    id: DeviceId,
    identity_key: [u8; 32],
    c_pk: PublicKey,
    s_pk: PublicKey,
    x: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Advertised,
    SharesSent,
    InputSent,
    ConsistencySigned,
    Done,
}

/// One client's secure-aggregation session for one round.
pub struct Client {
    identity: Identity,
    id: DeviceId,
    config: SecAggConfig,
    authority: [u8; 32],
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    self_mask_seed: [u8; 32],
    ring_nonce: [u8; 32],
    state: State,
    /// The roster, in its order (sorted by id).
    peers: Vec<Peer>,
    /// This client's index in the roster.
    me: usize,
    graph: Option<Graph>,
    /// Shares that reconstruct a secret (the graph's threshold).
    threshold: usize,
    /// Fewest survivors this client helps to unmask (a strict majority of the roster).
    min_contributors: usize,
    /// Shares received from each neighbour in U2 (own shares included).
    held: BTreeMap<DeviceId, SharePair>,
    u2: BTreeSet<DeviceId>,
    u3: Vec<DeviceId>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("round", &self.config.round)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts a session: fresh X25519 keys and self-mask seed; returns the signed advert,
    /// which carries the client's claimed aggregation `weight`.
    pub fn new(
        identity: Identity,
        id: DeviceId,
        config: SecAggConfig,
        authority: [u8; 32],
        weight: u64,
        rng: &mut impl CryptoRng,
    ) -> (Self, SignedMessage) {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let c_sk = StaticSecret::from(bytes);
        rng.fill_bytes(&mut bytes);
        let s_sk = StaticSecret::from(bytes);
        let mut self_mask_seed = [0u8; 32];
        rng.fill_bytes(&mut self_mask_seed);
        let mut ring_nonce = [0u8; 32];
        rng.fill_bytes(&mut ring_nonce);
        let advert = Advert {
            c_pk: PublicKey::from(&c_sk).to_bytes(),
            s_pk: PublicKey::from(&s_sk).to_bytes(),
            weight,
            ring_nonce,
        };
        let message = SignedMessage::sign(
            &identity,
            id.clone(),
            config.round,
            ClientBody::Advertise(advert),
        );
        let client = Self {
            identity,
            id,
            config,
            authority,
            c_sk,
            s_sk,
            self_mask_seed,
            ring_nonce,
            state: State::Advertised,
            peers: Vec::new(),
            me: 0,
            graph: None,
            threshold: usize::MAX,
            min_contributors: usize::MAX,
            held: BTreeMap::new(),
            u2: BTreeSet::new(),
            u3: Vec::new(),
        };
        (client, message)
    }

    /// This client's device id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    fn expect_state(&self, state: State, what: &'static str) -> Result<(), SecAggError> {
        if self.state == state {
            Ok(())
        } else {
            Err(SecAggError::OutOfOrder(what))
        }
    }

    fn check_round(&self, round: u64) -> Result<(), SecAggError> {
        if round == self.config.round {
            Ok(())
        } else {
            Err(SecAggError::WrongRound {
                expected: self.config.round,
                got: round,
            })
        }
    }

    fn peer_index(&self, id: &DeviceId) -> Result<usize, SecAggError> {
        self.peers
            .binary_search_by(|p| p.id.cmp(id))
            .map_err(|_| SecAggError::NotAParticipant(id.clone()))
    }

    fn peer(&self, id: &DeviceId) -> Result<&Peer, SecAggError> {
        Ok(&self.peers[self.peer_index(id)?])
    }

    /// Whether `id` is one of this client's neighbours in the round's graph.
    fn is_neighbour(&self, id: &DeviceId) -> bool {
        match (&self.graph, self.peer_index(id)) {
            (Some(g), Ok(j)) => g.adjacent(self.me, j),
            _ => false,
        }
    }

    /// The round's graph, once the roster is known.
    pub fn graph(&self) -> Option<&Graph> {
        self.graph.as_ref()
    }

    fn sign(&self, body: ClientBody) -> SignedMessage {
        SignedMessage::sign(&self.identity, self.id.clone(), self.config.round, body)
    }

    /// Stage 1: checks the roster (certificates, signed adverts, this client's own entry,
    /// the threshold) and returns the signed, encrypted shares for every other member.
    pub fn on_roster(
        &mut self,
        roster: &Roster,
        rng: &mut impl CryptoRng,
    ) -> Result<SignedMessage, SecAggError> {
        self.expect_state(State::Advertised, "roster after the advert")?;
        self.check_round(roster.round)?;
        let mut peers = Vec::with_capacity(roster.entries.len());
        let mut nonces = Vec::with_capacity(roster.entries.len());
        for (i, entry) in roster.entries.iter().enumerate() {
            entry.enrolment.verify(&self.authority)?;
            let advert = &entry.advert;
            if advert.sender != entry.enrolment.device {
                return Err(SecAggError::Malformed(format!(
                    "roster entry {i}: advert from {} under the certificate of {}",
                    advert.sender, entry.enrolment.device
                )));
            }
            self.check_round(advert.round)?;
            advert.verify(&entry.enrolment.public_key)?;
            let ClientBody::Advertise(a) = &advert.body else {
                return Err(SecAggError::Malformed(format!(
                    "roster entry {i} is not an advert"
                )));
            };
            if let Some(prev) = peers.last().map(|p: &Peer| &p.id)
                && prev >= &advert.sender
            {
                return Err(SecAggError::Malformed(
                    "roster not sorted or duplicated".into(),
                ));
            }
            nonces.push(a.ring_nonce);
            peers.push(Peer {
                id: advert.sender.clone(),
                identity_key: entry.enrolment.public_key,
                c_pk: PublicKey::from(a.c_pk),
                s_pk: PublicKey::from(a.s_pk),
                x: i as u32 + 1,
            });
        }
        let me = peers
            .iter()
            .position(|p| p.id == self.id)
            .ok_or_else(|| SecAggError::NotAParticipant(self.id.clone()))?;
        if peers[me].c_pk != PublicKey::from(&self.c_sk)
            || peers[me].s_pk != PublicKey::from(&self.s_sk)
            || nonces[me] != self.ring_nonce
        {
            return Err(SecAggError::Malformed(
                "the roster changed this client's keys".into(),
            ));
        }
        let n = peers.len();
        let min_contributors = effective_threshold(self.config.threshold, n);
        if n < min_contributors {
            return Err(SecAggError::BelowThreshold {
                stage: "roster",
                have: n,
                need: min_contributors,
            });
        }
        let members: Vec<(&DeviceId, &[u8; 32])> =
            peers.iter().zip(&nonces).map(|(p, n)| (&p.id, n)).collect();
        let graph = Graph::build(&self.config, &members)?;
        let threshold = graph.threshold();
        let holders: Vec<&Peer> = graph.holders(me).into_iter().map(|j| &peers[j]).collect();
        let xs: Vec<u32> = holders.iter().map(|p| p.x).collect();
        let b_shares = shamir::split_at(&self.self_mask_seed, &xs, threshold, rng)
            .map_err(|e| SecAggError::Malformed(e.to_string()))?;
        let s_shares = shamir::split_at(&self.s_sk.to_bytes(), &xs, threshold, rng)
            .map_err(|e| SecAggError::Malformed(e.to_string()))?;
        let mut out = Vec::with_capacity(holders.len() - 1);
        for ((peer, b), s) in holders.into_iter().zip(b_shares).zip(s_shares) {
            let pair = SharePair { b, s };
            if peer.id == self.id {
                self.held.insert(self.id.clone(), pair);
                continue;
            }
            let shared = self.c_sk.diffie_hellman(&peer.c_pk).to_bytes();
            let cipher = ChaCha20Poly1305::new(&share_key(self.config.round, &shared).into());
            let (nonce, aad) = share_nonce_aad(self.config.round, &self.id, &peer.id);
            let plaintext = postcard::to_stdvec(&pair).expect("encodable");
            let ciphertext = cipher
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: &plaintext,
                        aad: &aad,
                    },
                )
                .map_err(|_| SecAggError::Malformed("share encryption failed".into()))?;
            out.push(EncryptedShare {
                from: self.id.clone(),
                to: peer.id.clone(),
                ciphertext,
            });
        }
        self.peers = peers;
        self.me = me;
        self.graph = Some(graph);
        self.threshold = threshold;
        self.min_contributors = min_contributors;
        self.state = State::SharesSent;
        Ok(self.sign(ClientBody::Shares(out)))
    }

    /// Stage 2: decrypts the shares the other members of U2 sent, and returns the masked
    /// `input` (the GLWE key vector) bound to `update_digest` (SHA-256 of the encrypted
    /// update it decrypts).
    pub fn on_shares(
        &mut self,
        delivery: &ShareDelivery,
        input: &[u64],
        update_digest: [u8; 32],
    ) -> Result<SignedMessage, SecAggError> {
        self.expect_state(State::SharesSent, "shares after the roster")?;
        self.check_round(delivery.round)?;
        if input.len() != self.config.vector_len {
            return Err(SecAggError::Malformed(format!(
                "input of {} values, the round aggregates {}",
                input.len(),
                self.config.vector_len
            )));
        }
        let mut received = BTreeMap::new();
        for share in &delivery.shares {
            if share.to != self.id {
                return Err(SecAggError::Malformed(format!(
                    "share for {} delivered to {}",
                    share.to, self.id
                )));
            }
            let peer = self.peer(&share.from)?;
            if !self.is_neighbour(&peer.id) {
                return Err(SecAggError::Malformed(format!(
                    "share from {}, which is not a neighbour of {} in this round's graph",
                    peer.id, self.id
                )));
            }
            if received.contains_key(&peer.id) {
                return Err(SecAggError::Duplicate {
                    sender: peer.id.clone(),
                    kind: "share",
                });
            }
            let shared = self.c_sk.diffie_hellman(&peer.c_pk).to_bytes();
            let cipher = ChaCha20Poly1305::new(&share_key(self.config.round, &shared).into());
            let (nonce, aad) = share_nonce_aad(self.config.round, &peer.id, &self.id);
            let plaintext = cipher
                .decrypt(
                    &nonce.into(),
                    Payload {
                        msg: &share.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| SecAggError::ShareDecryption(peer.id.clone()))?;
            let pair: SharePair = postcard::from_bytes(&plaintext)
                .map_err(|_| SecAggError::ShareDecryption(peer.id.clone()))?;
            let me = self.peers[self.me].x;
            if pair.b.x != me || pair.s.x != me {
                return Err(SecAggError::ShareDecryption(peer.id.clone()));
            }
            received.insert(peer.id.clone(), pair);
        }
        let u2: BTreeSet<DeviceId> = received
            .keys()
            .cloned()
            .chain(std::iter::once(self.id.clone()))
            .collect();
        if u2.len() < self.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: "shares",
                have: u2.len(),
                need: self.threshold,
            });
        }
        let mut masked = input.to_vec();
        apply_prg(&mut masked, &self.self_mask_seed, false);
        for peer in self
            .peers
            .iter()
            .filter(|p| p.id != self.id && u2.contains(&p.id))
        {
            let shared = self.s_sk.diffie_hellman(&peer.s_pk).to_bytes();
            // + for the smaller id, - for the larger: the pair's masks cancel in the sum.
            apply_prg(
                &mut masked,
                &pair_seed(self.config.round, &shared),
                self.id > peer.id,
            );
        }
        self.held.extend(received);
        self.u2 = u2;
        self.state = State::InputSent;
        Ok(self.sign(ClientBody::MaskedInput {
            masked,
            update_digest,
        }))
    }

    /// Stage 3: signs the survivor list U3 if it is consistent with what this client saw.
    pub fn on_survivors(&mut self, list: &SurvivorList) -> Result<SignedMessage, SecAggError> {
        self.expect_state(State::InputSent, "survivor list after the masked input")?;
        self.check_round(list.round)?;
        self.check_survivors(&list.survivors)?;
        self.u3 = list.survivors.clone();
        self.state = State::ConsistencySigned;
        Ok(self.sign(ClientBody::Consistency(survivors_digest(
            self.config.round,
            &list.survivors,
        ))))
    }

    fn check_survivors(&self, survivors: &[DeviceId]) -> Result<(), SecAggError> {
        if !survivors.windows(2).all(|w| w[0] < w[1]) {
            return Err(SecAggError::Malformed(
                "survivors not sorted or duplicated".into(),
            ));
        }
        if !survivors.contains(&self.id) {
            return Err(SecAggError::NotAParticipant(self.id.clone()));
        }
        for s in survivors {
            // Strangers are refused; a neighbour must have sent this client its shares.
            self.peer_index(s)?;
            if self.is_neighbour(s) && !self.u2.contains(s) {
                return Err(SecAggError::InconsistentRequest(format!(
                    "{s} is a survivor but sent this client no share"
                )));
            }
        }
        if survivors.len() < self.min_contributors {
            return Err(SecAggError::BelowThreshold {
                stage: "survivors",
                have: survivors.len(),
                need: self.min_contributors,
            });
        }
        Ok(())
    }

    /// Stage 4, once per round: checks that the request carries the survivor list this
    /// client signed and at least t valid signatures on it by distinct survivors, then
    /// reveals the `b` shares of U3 and the `s` shares of U2 \ U3.
    pub fn on_unmask(&mut self, request: &UnmaskRequest) -> Result<SignedMessage, SecAggError> {
        self.expect_state(
            State::ConsistencySigned,
            "unmask request after the consistency check",
        )?;
        self.check_round(request.round)?;
        if request.survivors != self.u3 {
            return Err(SecAggError::InconsistentRequest(
                "the survivor list differs from the one this client signed".into(),
            ));
        }
        let mut signers = BTreeSet::new();
        let digest = ClientBody::Consistency(survivors_digest(self.config.round, &self.u3));
        for sig in &request.signatures {
            let peer = self.peer(&sig.sender)?;
            if sig.round != self.config.round
                || sig.body != digest
                || self.u3.binary_search(&sig.sender).is_err()
                || sig.verify(&peer.identity_key).is_err()
            {
                return Err(SecAggError::InconsistentRequest(format!(
                    "invalid consistency signature from {}",
                    sig.sender
                )));
            }
            signers.insert(sig.sender.clone());
        }
        if signers.len() < self.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: "consistency signatures",
                have: signers.len(),
                need: self.threshold,
            });
        }
        let share_of = |v: &DeviceId, pick: fn(&SharePair) -> Share| {
            self.held
                .get(v)
                .map(|p| (v.clone(), pick(p)))
                .ok_or_else(|| SecAggError::InconsistentRequest(format!("no share held for {v}")))
        };
        // Only the secrets this client holds shares of: its own and its neighbours'.
        let self_mask = self
            .u3
            .iter()
            .filter(|v| **v == self.id || self.is_neighbour(v))
            .map(|v| share_of(v, |p| p.b))
            .collect::<Result<Vec<_>, _>>()?;
        let mask_key = self
            .u2
            .iter()
            .filter(|v| self.u3.binary_search(v).is_err())
            .map(|v| share_of(v, |p| p.s))
            .collect::<Result<Vec<_>, _>>()?;
        self.state = State::Done;
        Ok(self.sign(ClientBody::Unmask {
            self_mask,
            mask_key,
        }))
    }
}
