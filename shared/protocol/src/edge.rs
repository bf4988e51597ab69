//! The edge's round: a pure state machine. The driver feeds it the retained round state
//! ([`EdgeSession::on_round`]), its share delivery ([`EdgeSession::on_delivery`]) and the
//! result of local training ([`EdgeSession::on_trained`]); it returns what to send and when
//! to train or settle the error-feedback residual. Training itself (minutes of libtorch)
//! runs in the driver.

use crate::ProtocolError;
use crate::fleet::steps::{DeviceStatus, LeftOut, Task};
use crate::messages::{DownMessage, EdgeMessage, Manifest, Phase, RoundConfig, RoundState};
use crate::signed::{MAX_REPORTED_LOSS, check_value, join_report_bytes};
use fedshield_crypto::identity::{DeviceId, Identity};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use fedshield_crypto::secagg::{Client, SecAggConfig, ShareDelivery};
use rand::CryptoRng;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum EdgeAction {
    /// Publish on this device's uplink.
    Send(EdgeMessage),
    /// Train locally for `task.steps` (at most `task.train_seconds`), scale the delta by
    /// `tau_eff / steps trained`, encode with `weight`, encrypt under a fresh key and call
    /// [`EdgeSession::on_trained`].
    Train {
        /// The round's configuration.
        config: RoundConfig,
        /// This device's FedAvg weight, as the device computed it from the signed roster
        /// (`weights::check_announced`), never merely as announced.
        weight: f64,
        /// Its steps, the round's `tau_eff` and the training time, from the roster's
        /// checked plan.
        task: Task,
    },
    /// The host left this device out of the round (it joined, but is not in the roster).
    LeftOut {
        /// The round.
        round: u64,
        /// The host's reason.
        reason: LeftOut,
    },
    /// The round is over for this device: settle the residual (`counted`: the update is in
    /// the published aggregate).
    Settle {
        /// The round.
        round: u64,
        /// Whether this device's update counted.
        counted: bool,
    },
}

/// Who this device is.
#[derive(Debug, Clone)]
pub struct EdgeIdentity {
    /// Device id (its uplink topic level).
    pub id: DeviceId,
    /// ed25519 secret of the enrolled identity.
    pub secret: [u8; 32],
    /// The fleet authority's public key (checks the roster's certificates).
    pub authority: [u8; 32],
}

struct Member {
    client: Client,
    config: RoundConfig,
    delivery: Option<ShareDelivery>,
    trained: Option<(Vec<u8>, Vec<u64>)>,
    uploaded: bool,
    training: bool,
    /// The last phase answered (1 survivors, 2 unmask): retained copies are not answered
    /// twice.
    answered: u8,
}

enum State {
    Idle,
    Joined(Box<(Client, RoundConfig)>),
    Member(Box<Member>),
}

/// This device's view of the federation.
pub struct EdgeSession {
    me: EdgeIdentity,
    layout_digest: [u8; 32],
    state: State,
    last_round: u64,
    /// What this device sent in the current round, by the phase it answered (see
    /// [`phase_slot`]): re-sent when the host re-publishes the round under a higher
    /// incarnation.
    sent: Vec<(u8, EdgeMessage)>,
    incarnation: u32,
}

/// The round phase a message answers (0 announce, 1 roster: shares and upload, 2 survivors,
/// 3 unmask); the slot of a broadcast phase is the same number (4: closed or failed).
fn phase_slot(phase: &Phase) -> u8 {
    match phase {
        Phase::Announce { .. } => 0,
        Phase::Roster { .. } => 1,
        Phase::Survivors(_) => 2,
        Phase::Unmask(_) => 3,
        Phase::Closed { .. } | Phase::Failed { .. } => 4,
    }
}

fn message_slot(message: &EdgeMessage) -> u8 {
    match message {
        EdgeMessage::Join { .. } => 0,
        EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) => 1,
        EdgeMessage::SecAgg(m) => match m.body.kind() {
            "consistency" => 2,
            "unmask" => 3,
            _ => 1,
        },
        EdgeMessage::Evaluated { .. } => 4,
    }
}

impl std::fmt::Debug for EdgeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeSession")
            .field("id", &self.me.id)
            .field("last_round", &self.last_round)
            .finish_non_exhaustive()
    }
}

impl EdgeSession {
    /// A session for `me`, whose adapter has the layout of `layout_digest`.
    pub fn new(me: EdgeIdentity, layout_digest: [u8; 32]) -> Self {
        Self {
            me,
            layout_digest,
            state: State::Idle,
            last_round: 0,
            sent: Vec::new(),
            incarnation: 0,
        }
    }

    /// Remembers the messages among `actions` for re-sending; returns `actions`.
    fn record(&mut self, actions: Vec<EdgeAction>) -> Vec<EdgeAction> {
        for a in &actions {
            if let EdgeAction::Send(m) = a {
                self.sent.push((message_slot(m), m.clone()));
            }
            if let EdgeAction::Settle { .. } = a {
                self.sent.clear();
            }
        }
        actions
    }

    fn identity(&self) -> Identity {
        Identity::from_secret(self.me.secret)
    }

    /// Refuses announcements of rounds up to `round` from now on: a restarted device that
    /// has applied round `round`'s global update never joins it or an earlier one again.
    pub fn resume_after(&mut self, round: u64) {
        if round > self.last_round {
            self.last_round = round;
            self.incarnation = 0;
        }
    }

    /// Handles the (host-signed, verified) round state. `samples` (the device's FedAvg
    /// claim, signed in its advert), `eval_loss` and `status` are what the device reports
    /// when it joins; a loss that is not a sane value is not reported. A state of the current round
    /// under a higher incarnation (the host restarted or reconnected) first re-sends this
    /// device's messages of that phase; one under a lower incarnation, or of an earlier
    /// round, is a replay and refused.
    pub fn on_round(
        &mut self,
        state: RoundState,
        samples: u64,
        eval_loss: Option<f64>,
        status: &DeviceStatus,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<EdgeAction>, ProtocolError> {
        let round = state.config.round;
        let announce = matches!(state.phase, Phase::Announce { .. });
        let stale = (round < self.last_round && !announce)
            || (round == self.last_round && state.incarnation < self.incarnation);
        if stale {
            return Err(ProtocolError::Stale {
                what: "round state",
                got_round: round,
                got_incarnation: state.incarnation,
                round: self.last_round,
                incarnation: self.incarnation,
            });
        }
        let eval_loss = eval_loss.filter(|l| check_value("loss", *l, MAX_REPORTED_LOSS).is_ok());
        let mut resend = Vec::new();
        if state.config.round == self.last_round && state.incarnation > self.incarnation {
            self.incarnation = state.incarnation;
            let slot = phase_slot(&state.phase);
            resend = self
                .sent
                .iter()
                .filter(|(s, _)| *s == slot)
                .map(|(_, m)| EdgeAction::Send(m.clone()))
                .collect();
        }
        let actions = self.on_round_inner(state, samples, eval_loss, status, rng)?;
        resend.extend(self.record(actions));
        Ok(resend)
    }

    fn on_round_inner(
        &mut self,
        state: RoundState,
        samples: u64,
        eval_loss: Option<f64>,
        status: &DeviceStatus,
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<EdgeAction>, ProtocolError> {
        let round = state.config.round;
        if let Phase::Announce { .. } = state.phase {
            if round <= self.last_round {
                return Ok(vec![]); // a retained copy of a round already joined
            }
            if state.config.layout_digest != self.layout_digest {
                return Err(crate::Refusal::OtherLayout(round).into());
            }
            let mut actions = self.abandon();
            self.sent.clear();
            self.incarnation = state.incarnation;
            let identity = self.identity();
            let signature =
                identity.sign(&join_report_bytes(&self.me.id, round, eval_loss, status));
            let (client, advert) = Client::new(
                identity,
                self.me.id.clone(),
                SecAggConfig {
                    round,
                    threshold: state.config.threshold,
                    vector_len: POLYNOMIAL_SIZE,
                    graph: state.config.secagg_graph,
                },
                self.me.authority,
                samples,
                rng,
            );
            self.last_round = round;
            self.state = State::Joined(Box::new((client, state.config)));
            actions.push(EdgeAction::Send(EdgeMessage::Join {
                advert,
                eval_loss,
                status: Box::new(status.clone()),
                signature,
            }));
            return Ok(actions);
        }
        if round != self.last_round {
            return Ok(vec![]); // a round this device is not part of
        }
        match (std::mem::replace(&mut self.state, State::Idle), state.phase) {
            (
                State::Joined(joined),
                Phase::Roster {
                    roster,
                    weights,
                    plan,
                },
            ) => {
                let (mut client, config) = *joined;
                if !weights.iter().any(|(d, _)| *d == self.me.id) {
                    // Not admitted: left out by the host's step rule, or joined too late.
                    return Ok(plan
                        .left_out
                        .iter()
                        .find(|(d, _)| *d == self.me.id)
                        .map(|(_, reason)| EdgeAction::LeftOut {
                            round,
                            reason: reason.clone(),
                        })
                        .into_iter()
                        .collect());
                }
                // The adverts' signatures first (they carry the sample counts), then the
                // weights: nothing leaves this device for a round whose weights it did not
                // verify, and it encodes with the weight it computed.
                let shares = client.on_roster(&roster, rng)?;
                let computed = crate::weights::check_announced(&roster, &weights)?;
                let weight = computed
                    .iter()
                    .find(|(d, _)| *d == self.me.id)
                    .map(|(_, w)| *w)
                    .expect("a member of the announced weights is in the roster");
                let (steps, effective_steps) = plan
                    .check(&self.me.id, &computed, config.local_steps)
                    .map_err(|why| ProtocolError::Config(format!("round {round}: {why}")))?;
                let task = Task {
                    steps,
                    effective_steps,
                    train_seconds: plan.train_seconds,
                };
                self.state = State::Member(Box::new(Member {
                    client,
                    config: config.clone(),
                    delivery: None,
                    trained: None,
                    uploaded: false,
                    training: true,
                    answered: 0,
                }));
                Ok(vec![
                    EdgeAction::Send(EdgeMessage::SecAgg(shares)),
                    EdgeAction::Train {
                        config,
                        weight,
                        task,
                    },
                ])
            }
            (State::Member(mut m), Phase::Survivors(list))
                if m.uploaded && list.survivors.contains(&self.me.id) =>
            {
                if m.answered >= 1 {
                    self.state = State::Member(m);
                    return Ok(vec![]);
                }
                let msg = m.client.on_survivors(&list);
                m.answered = 1;
                self.state = State::Member(m);
                Ok(vec![EdgeAction::Send(EdgeMessage::SecAgg(msg?))])
            }
            (State::Member(mut m), Phase::Unmask(request))
                if m.uploaded && request.survivors.contains(&self.me.id) =>
            {
                if m.answered >= 2 {
                    self.state = State::Member(m);
                    return Ok(vec![]);
                }
                let msg = m.client.on_unmask(&request);
                m.answered = 2;
                self.state = State::Member(m);
                Ok(vec![EdgeAction::Send(EdgeMessage::SecAgg(msg?))])
            }
            (State::Member(m), Phase::Closed { contributors }) => Ok(vec![EdgeAction::Settle {
                round,
                counted: m.uploaded && contributors.contains(&self.me.id),
            }]),
            (State::Member(m), Phase::Failed { .. }) => {
                self.state = State::Member(m);
                Ok(self.abandon())
            }
            (State::Member(m), Phase::Survivors(_) | Phase::Unmask(_)) => {
                // The round went on without this device's upload.
                self.state = State::Member(m);
                Ok(self.abandon())
            }
            (other, _) => {
                // Retained duplicates and phases this device has nothing to do in.
                self.state = other;
                Ok(vec![])
            }
        }
    }

    /// Leaves the current round; a device that trained settles as not counted.
    fn abandon(&mut self) -> Vec<EdgeAction> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Member(m) if m.training || m.trained.is_some() => vec![EdgeAction::Settle {
                round: m.config.round,
                counted: false,
            }],
            _ => vec![],
        }
    }

    /// A (host-signed, verified) message on this device's downlink topic.
    pub fn on_down(&mut self, message: DownMessage) -> Result<Vec<EdgeAction>, ProtocolError> {
        match message {
            DownMessage::Shares(delivery) => self.on_delivery(delivery),
            DownMessage::UploadRefused { round, .. } => {
                let ours = matches!(&self.state, State::Member(m) if m.config.round == round && m.uploaded);
                if !ours {
                    return Ok(vec![]); // another round's notice, or nothing uploaded
                }
                // The host will not count this upload: sit the round out now (the residual
                // keeps the update) instead of waiting for the round to close.
                let actions = self.abandon();
                Ok(self.record(actions))
            }
            DownMessage::Resend { round } => {
                let ours = matches!(&self.state, State::Member(m) if m.config.round == round && m.uploaded);
                if !ours {
                    return Ok(vec![]); // another round's request, or nothing uploaded yet
                }
                // The upload as first sent, masked input included (a fold worker lost the
                // upload and its masked input's share of the host's sums).
                Ok(self
                    .sent
                    .iter()
                    .filter(|(_, m)| match m {
                        EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) => true,
                        EdgeMessage::SecAgg(m) => m.body.kind() == "masked-input",
                        _ => false,
                    })
                    .map(|(_, m)| EdgeAction::Send(m.clone()))
                    .collect())
            }
        }
    }

    /// The host's delivery of the shares addressed to this device.
    pub fn on_delivery(
        &mut self,
        delivery: ShareDelivery,
    ) -> Result<Vec<EdgeAction>, ProtocolError> {
        let State::Member(m) = &mut self.state else {
            return Ok(vec![]);
        };
        if delivery.round != m.config.round || m.delivery.is_some() {
            return Ok(vec![]); // stale or duplicate
        }
        m.delivery = Some(delivery);
        let actions = self.try_upload()?;
        Ok(self.record(actions))
    }

    /// Local training finished for `round`: the serialized encrypted update and the key it
    /// was encrypted under.
    pub fn on_trained(
        &mut self,
        round: u64,
        update: Vec<u8>,
        key: Vec<u64>,
    ) -> Result<Vec<EdgeAction>, ProtocolError> {
        let State::Member(m) = &mut self.state else {
            return Ok(vec![]);
        };
        if m.config.round != round || m.trained.is_some() {
            return Ok(vec![]);
        }
        m.training = false;
        m.trained = Some((update, key));
        let actions = self.try_upload()?;
        Ok(self.record(actions))
    }

    /// Sends manifest, chunks and masked input once both the training result and the share
    /// delivery are here.
    fn try_upload(&mut self) -> Result<Vec<EdgeAction>, ProtocolError> {
        let identity = self.identity();
        let State::Member(m) = &mut self.state else {
            return Ok(vec![]);
        };
        let (Some(delivery), Some((update, key)), false) = (&m.delivery, &m.trained, m.uploaded)
        else {
            return Ok(vec![]);
        };
        let (manifest, chunks) = Manifest::build(
            &identity,
            &self.me.id,
            m.config.round,
            update,
            m.config.chunk_bytes,
        );
        let masked = m.client.on_shares(delivery, key, manifest.digest)?;
        m.uploaded = true;
        let mut actions = vec![EdgeAction::Send(EdgeMessage::Manifest(manifest))];
        actions.extend(
            chunks
                .into_iter()
                .map(|c| EdgeAction::Send(EdgeMessage::Chunk(c))),
        );
        actions.push(EdgeAction::Send(EdgeMessage::SecAgg(masked)));
        Ok(actions)
    }
}
