//! The round protocol end to end in memory: the host's and the edges' state machines wired
//! through a simulated broker (a queue), real cryptography, a simulated clock. No threads,
//! no sleeps: every path is deterministic.

use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::{DeviceId, Identity, Registry};
use fedshield_crypto::packed::{BodyBits, ClientKey, MaskSeed, encrypt};
use fedshield_crypto::params::worst_case_error;
use fedshield_crypto::secagg::{GraphPolicy, SecAggError};
use fedshield_protocol::edge::{EdgeAction, EdgeIdentity, EdgeSession};
use fedshield_protocol::fleet::steps::{DeviceStatus, LeftOut, Task};
use fedshield_protocol::host::{Deadlines, HostAction, HostRound, RoundResult};
use fedshield_protocol::journal::{self, Entry};
use fedshield_protocol::messages::{
    DownMessage, EdgeMessage, Phase, RoundConfig, RoundState, Route, Topics, UploadRefusal,
};
use fedshield_protocol::shard::{FoldWorker, ShardUplink, shard_of};
use fedshield_protocol::signed::{ReportRefusal, join_report_bytes};
use fedshield_protocol::weights::{WeightRefusal, weight_floor};
use fedshield_protocol::{ProtocolError, decode};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

const SELECTED: usize = 3000; // two ciphertexts
const DEADLINES: Deadlines = Deadlines {
    join_ms: 1000,
    shares_ms: 1000,
    upload_ms: 10_000,
    finish_ms: 1000,
};

/// How an edge misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Never sends anything after its shares (killed mid-round).
    DiesAfterShares,
    /// Sends its manifest and the first chunk, then dies (killed mid-upload).
    DiesMidUpload,
    /// Sends every upload message twice (QoS 1 redelivery).
    Duplicates,
    /// A buggy device: its signed manifest names another digest than its masked input.
    LyingManifest,
}

struct Edge {
    session: EdgeSession,
    identity: Identity,
    samples: u64,
    values: Vec<f32>,
    fault: Fault,
    settled: Option<bool>,
    /// What it reports when it joins.
    status: DeviceStatus,
    /// The task it was given.
    task: Option<Task>,
    /// Why the host left it out, if it did.
    left_out: Option<LeftOut>,
}

struct Fleet {
    host: HostRound,
    edges: Vec<Edge>,
    rng: ChaCha20Rng,
    noise: DeterministicSeeder<DefaultRandomGenerator>,
    now: u64,
    /// Edge messages in flight, by sender.
    uplink: Vec<(DeviceId, EdgeMessage)>,
    result: Option<RoundResult>,
    failed: Option<String>,
    refused: Vec<String>,
    /// Refusals by the edges (index, error).
    edge_refused: Vec<(usize, ProtocolError)>,
    /// Upload refusals the host sent.
    notices: Vec<(DeviceId, UploadRefusal)>,
    /// The host's downlink messages as a driver publishes them: (topic, payload), before
    /// the host's signature.
    downlink: Vec<(String, Vec<u8>)>,
    topics: Topics,
    /// Weights the edges encoded with, by index.
    trained_with: Vec<Option<f64>>,
    /// Rewrites every broadcast before the edges see it (a malicious host).
    tamper: Option<fn(&mut RoundState)>,
    encoding: FixedPoint,
    /// What the host driver journals: the round's accepted inputs.
    journal: Vec<Entry>,
    registry: Registry,
    /// Compact the journal after every fold, as the driver does when the folded uploads
    /// outweigh the checkpoint.
    compacting: bool,
    /// The fold workers of a sharded round (`None`: down), and the last instance drawn.
    workers: Vec<Option<FoldWorker>>,
    instances: u64,
    /// Commands and uploads the workers refused.
    worker_refused: Vec<String>,
    /// Devices the host asked to send their upload again.
    resent: usize,
}

fn config(round: u64, threshold: usize) -> RoundConfig {
    RoundConfig {
        epoch: 1,
        round,
        mask_seed: 77,
        select_seed: 5,
        prune: fedshield_codec::PruneConfig::default(),
        clip: 1.0,
        scale_log2: 60,
        body_bits: BodyBits::FULL,
        layout_digest: [7; 32],
        selected: SELECTED,
        history_round: round - 1,
        init_seed: 0,
        local_steps: 1,
        min_local_steps: 1,
        threshold,
        secagg_graph: GraphPolicy::Complete,
        chunk_bytes: 5000,
        fold_shards: 0,
    }
}

fn fleet(faults: &[Fault], threshold: usize) -> Fleet {
    fleet_with(faults, config(1, threshold))
}

fn fleet_with(faults: &[Fault], round: RoundConfig) -> Fleet {
    let samples: Vec<u64> = (0..faults.len() as u64).map(|i| 10 * (i + 1)).collect();
    fleet_of(faults, round, &samples)
}

/// A fleet whose devices claim `samples`.
fn fleet_of(faults: &[Fault], round: RoundConfig, samples: &[u64]) -> Fleet {
    fleet_reporting(
        faults,
        round,
        samples,
        &vec![DeviceStatus::default(); faults.len()],
    )
}

/// A fleet whose devices claim `samples` and report `statuses` when they join.
fn fleet_reporting(
    faults: &[Fault],
    round: RoundConfig,
    samples: &[u64],
    statuses: &[DeviceStatus],
) -> Fleet {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let authority = Identity::generate(&mut rng);
    let mut registry = Registry::new(authority.public_key());
    let mut edges = Vec::new();
    for (i, &fault) in faults.iter().enumerate() {
        let id = DeviceId(format!("edge-{i}"));
        let identity = Identity::generate(&mut rng);
        registry
            .enrol(authority.enrol(id.clone(), identity.public_key()))
            .unwrap();
        edges.push(Edge {
            session: EdgeSession::new(
                EdgeIdentity {
                    id,
                    secret: identity.secret(),
                    authority: authority.public_key(),
                },
                [7; 32],
            ),
            identity: Identity::from_secret(identity.secret()),
            samples: samples[i],
            values: (0..SELECTED)
                .map(|j| ((i * 31 + j) % 17) as f32 / 17.0 - 0.5)
                .collect(),
            fault,
            settled: None,
            status: statuses[i].clone(),
            task: None,
            left_out: None,
        });
    }
    let (host, actions) = HostRound::start(round.clone(), registry.clone(), DEADLINES, 0).unwrap();
    let n = edges.len();
    let mut f = Fleet {
        host,
        edges,
        rng,
        noise: DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(3)),
        now: 0,
        uplink: Vec::new(),
        result: None,
        failed: None,
        refused: Vec::new(),
        edge_refused: Vec::new(),
        notices: Vec::new(),
        downlink: Vec::new(),
        topics: Topics::new("lab").unwrap(),
        trained_with: vec![None; n],
        tamper: None,
        encoding: FixedPoint::new(1.0).unwrap(),
        journal: vec![Entry::Start {
            config: round,
            deadlines: DEADLINES,
            now: 0,
        }],
        registry,
        compacting: false,
        workers: Vec::new(),
        instances: 0,
        worker_refused: Vec::new(),
        resent: 0,
    };
    f.host_actions(actions);
    f
}

impl Fleet {
    fn host_actions(&mut self, actions: Vec<HostAction>) {
        for a in actions {
            match a {
                HostAction::Broadcast(state) => {
                    self.downlink
                        .push((self.topics.round(), postcard::to_stdvec(&state).unwrap()));
                    self.broadcast(state)
                }
                HostAction::Deliver(d, delivery) => {
                    self.downlink.push((
                        self.topics.down(&d),
                        postcard::to_stdvec(&DownMessage::Shares(delivery.clone())).unwrap(),
                    ));
                    let i = self.index(&d);
                    let out = self.edges[i].session.on_delivery(delivery).unwrap();
                    self.edge_actions(i, out);
                }
                HostAction::RefuseUpload {
                    device,
                    round,
                    reason,
                } => {
                    let i = self.index(&device);
                    self.notices.push((device, reason.clone()));
                    let notice = DownMessage::UploadRefused { round, reason };
                    let out = self.edges[i].session.on_down(notice).unwrap();
                    self.edge_actions(i, out);
                }
                HostAction::LeftOut { device, reason } => {
                    self.refused.push(format!("{device} left out: {reason}"))
                }
                HostAction::Finished(r) => self.result = Some(r),
                HostAction::Failed(why) => self.failed = Some(why),
                HostAction::Shard(s, command) => {
                    // Through the wire format, to the worker if it is up (else lost).
                    let bytes = postcard::to_stdvec(&command).unwrap();
                    let command = decode(&bytes, 1 << 20).unwrap();
                    let out = self.workers[s as usize]
                        .as_mut()
                        .map(|w| w.on_command(command));
                    if let Some(out) = out {
                        self.worker_output(out);
                    }
                }
                HostAction::Resend { device, round } => {
                    self.resent += 1;
                    let i = self.index(&device);
                    let out = self.edges[i]
                        .session
                        .on_down(DownMessage::Resend { round })
                        .unwrap();
                    self.edge_actions(i, out);
                }
            }
        }
    }

    /// Hands a worker's reports to the host, as the host driver does: through the wire
    /// format, journalled when accepted.
    fn worker_output(&mut self, out: Result<Vec<ShardUplink>, ProtocolError>) {
        match out {
            Ok(reports) => {
                for uplink in reports {
                    let bytes = postcard::to_stdvec(&uplink).unwrap();
                    let uplink: ShardUplink = decode(&bytes, 1 << 24).unwrap();
                    match self.host.on_shard(uplink.clone(), self.now) {
                        Ok(actions) => {
                            self.journal.push(Entry::Shard {
                                uplink,
                                now: self.now,
                            });
                            self.host_actions(actions);
                        }
                        Err(e) => self.refused.push(e.to_string()),
                    }
                }
            }
            Err(e) => self.worker_refused.push(e.to_string()),
        }
    }

    /// Starts (or restarts, losing what it held) the worker of shard `s`: a new process
    /// that says hello.
    fn start_worker(&mut self, s: u32) {
        self.instances += 1;
        let worker = FoldWorker::new(s, 1000 + self.instances, self.registry.clone());
        let hello = worker.hello();
        if self.workers.len() <= s as usize {
            self.workers.resize_with(s as usize + 1, || None);
        }
        self.workers[s as usize] = Some(worker);
        self.worker_output(Ok(vec![hello]));
    }

    fn index(&self, d: &DeviceId) -> usize {
        d.0.strip_prefix("edge-").unwrap().parse().unwrap()
    }

    fn broadcast(&mut self, mut state: RoundState) {
        if let Some(tamper) = self.tamper {
            tamper(&mut state);
        }
        // Retained: every edge sees it, twice for good measure (reconnection re-delivery).
        for i in 0..self.edges.len() {
            for _ in 0..2 {
                let edge = &mut self.edges[i];
                match edge.session.on_round(
                    state.clone(),
                    edge.samples,
                    Some(2.0 + i as f64),
                    &edge.status,
                    &mut self.rng,
                ) {
                    Ok(out) => self.edge_actions(i, out),
                    Err(e) => self.edge_refused.push((i, e)),
                }
            }
        }
    }

    fn edge_actions(&mut self, i: usize, actions: Vec<EdgeAction>) {
        let id = DeviceId(format!("edge-{i}"));
        let fault = self.edges[i].fault;
        for a in actions {
            match a {
                EdgeAction::Send(msg) => {
                    let upload = matches!(msg, EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_))
                        || matches!(&msg, EdgeMessage::SecAgg(m) if m.body.kind() == "masked-input");
                    let late = !matches!(&msg, EdgeMessage::Join { .. })
                        && !matches!(&msg, EdgeMessage::SecAgg(m) if m.body.kind() == "shares");
                    match fault {
                        Fault::DiesAfterShares if late => continue,
                        Fault::DiesMidUpload if late => {
                            let first_chunk = matches!(&msg, EdgeMessage::Chunk(c) if c.index == 0);
                            if matches!(msg, EdgeMessage::Manifest(_)) || first_chunk {
                                self.uplink.push((id.clone(), msg));
                            }
                            continue;
                        }
                        Fault::Duplicates if upload => self.uplink.push((id.clone(), msg.clone())),
                        _ => {}
                    }
                    let msg = match (fault, msg) {
                        (Fault::LyingManifest, EdgeMessage::Manifest(mut m)) => {
                            m.digest[0] ^= 1;
                            m.signature = self.edges[i].identity.sign(&m.signed_bytes(&id));
                            EdgeMessage::Manifest(m)
                        }
                        (_, msg) => msg,
                    };
                    self.uplink.push((id.clone(), msg));
                }
                EdgeAction::LeftOut { reason, .. } => self.edges[i].left_out = Some(reason),
                EdgeAction::Train {
                    config,
                    weight,
                    task,
                } => {
                    self.trained_with[i] = Some(weight);
                    self.edges[i].task = Some(task);
                    let mut plain = vec![0u64; config.selected];
                    self.encoding
                        .encode_weighted(&self.edges[i].values, weight, &mut plain)
                        .unwrap();
                    let key = ClientKey::generate(&mut self.noise);
                    let seed = MaskSeed(config.mask_seed);
                    let ct = encrypt(&key, seed, config.body_bits, &plain, &mut self.noise);
                    let bytes = postcard::to_stdvec(&ct).unwrap();
                    let out = self.edges[i]
                        .session
                        .on_trained(config.round, bytes, key.coefficients().to_vec())
                        .unwrap();
                    self.edge_actions(i, out);
                }
                EdgeAction::Settle { counted, .. } => self.edges[i].settled = Some(counted),
            }
        }
    }

    /// Delivers queued uplink messages until the queue is empty, then advances the clock
    /// past the current deadline; stops when the round is over.
    fn run(&mut self) {
        for _ in 0..20 {
            while !self.uplink.is_empty() {
                self.deliver_one();
            }
            if self.host.is_done() {
                return;
            }
            self.now += 20_000;
            if self.host.due(self.now) {
                self.journal.push(Entry::Tick { now: self.now });
            }
            let actions = self.host.on_tick(self.now);
            self.host_actions(actions);
        }
        panic!("round did not finish");
    }

    /// Hands the oldest uplink message to the host, as the driver does: through the wire
    /// format, journalled when accepted.
    fn deliver_one(&mut self) {
        let (from, msg) = self.uplink.remove(0);
        let bytes = postcard::to_stdvec(&msg).unwrap();
        let msg: EdgeMessage = decode(&bytes, 1 << 20).unwrap();
        let shards = self.host.config().fold_shards;
        if shards > 0 && matches!(msg, EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_)) {
            // On the shard's upload topic: its worker has it, if it is up.
            let topic = self.topics.uplink(&from, &msg, shards);
            let Some(Route::Upload(s, d)) = self.topics.route(&topic) else {
                panic!("{topic} is not an upload topic");
            };
            assert_eq!((s, &d), (shard_of(&from, shards), &from));
            let out = self.workers[s as usize]
                .as_mut()
                .map(|w| w.on_upload(&from, msg));
            if let Some(out) = out {
                self.worker_output(out);
            }
            return;
        }
        let folded = self.host.folded_bytes();
        match self.host.on_message(&from, msg.clone(), self.now) {
            Ok(actions) => {
                self.journal.push(Entry::Message {
                    from,
                    message: msg,
                    now: self.now,
                });
                if self.compacting
                    && self.host.folded_bytes() > folded
                    && let Some(checkpoint) = self.host.checkpoint()
                {
                    self.journal = journal::compact(&self.journal, checkpoint);
                }
                self.host_actions(actions)
            }
            Err(e) => self.refused.push(e.to_string()),
        }
    }

    fn weighted_mean(&self, who: &[usize]) -> Vec<f64> {
        let total: u64 = self.edges.iter().map(|e| e.samples).sum();
        (0..SELECTED)
            .map(|j| {
                let sum: f64 = who
                    .iter()
                    .map(|&i| {
                        self.edges[i].values[j] as f64 * self.edges[i].samples as f64 / total as f64
                    })
                    .sum();
                let w: f64 = who
                    .iter()
                    .map(|&i| self.edges[i].samples as f64 / total as f64)
                    .sum();
                sum / w
            })
            .collect()
    }

    fn check_mean(&self, who: &[usize]) {
        self.check_mean_within(who, 1e-6);
    }

    fn check_mean_within(&self, who: &[usize], tolerance: f64) {
        let r = self.result.as_ref().expect("round finished");
        let mut ids: Vec<DeviceId> = who.iter().map(|i| DeviceId(format!("edge-{i}"))).collect();
        ids.sort();
        assert_eq!(r.contributors, ids);
        let got = self.encoding.decode_sum(&r.sums, r.total_weight);
        let want = self.weighted_mean(who);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(worst < tolerance, "decrypted mean off by {worst}");
    }
}

#[test]
fn three_edges_complete_a_round_and_the_host_decrypts_only_the_weighted_mean() {
    let mut f = fleet(&[Fault::None; 3], 2);
    f.run();
    assert!(f.failed.is_none(), "{:?}", f.failed);
    f.check_mean(&[0, 1, 2]);
    let r = f.result.as_ref().unwrap();
    assert_eq!(
        r.eval_loss,
        Some(3.0),
        "mean of the reported losses 2, 3, 4"
    );
    assert_eq!(
        r.upload_bytes,
        fedshield_protocol::host::expected_update_bytes(SELECTED, BodyBits::FULL)
    );
    assert!(f.edges.iter().all(|e| e.settled == Some(true)));
    // Every phase finished because everyone answered: no deadline was needed.
    assert_eq!(f.now, 0);
    assert!(f.refused.is_empty(), "{:?}", f.refused);
}

#[test]
fn a_round_with_16_bit_bodies_decrypts_the_mean_within_their_rounding_and_costs_half() {
    let body = BodyBits::new(16).unwrap();
    let mut f = fleet_with(
        &[Fault::None; 3],
        RoundConfig {
            body_bits: body,
            ..config(1, 2)
        },
    );
    f.run();
    assert!(f.failed.is_none(), "{:?}", f.failed);
    // Three roundings of at most 2^47 and three noises of 2^17, at scale 2^60 (clip 1).
    let bound = worst_case_error(3, body) as f64 / 2f64.powi(60);
    f.check_mean_within(&[0, 1, 2], bound + 1e-6);
    let r = f.result.as_ref().unwrap();
    let full = fedshield_protocol::host::expected_update_bytes(SELECTED, BodyBits::FULL);
    assert_eq!(
        r.upload_bytes,
        fedshield_protocol::host::expected_update_bytes(SELECTED, body)
    );
    // Half the bytes, up to the few header bytes.
    assert!(
        r.upload_bytes * 2 <= full + 8,
        "{} vs {full}",
        r.upload_bytes
    );
    assert!(f.refused.is_empty(), "{:?}", f.refused);
}

#[test]
fn rounds_refuse_more_clients_than_their_body_width_can_sum() {
    // 8-bit bodies at scale 2^62 can sum 127 contributions: a threshold above that is a
    // configuration error, and the 128th join is refused without harm to the others.
    let narrow = |threshold| RoundConfig {
        body_bits: BodyBits::new(8).unwrap(),
        scale_log2: 62,
        ..config(1, threshold)
    };
    let registry =
        Registry::new(Identity::generate(&mut ChaCha20Rng::seed_from_u64(2)).public_key());
    assert!(matches!(
        HostRound::start(narrow(128), registry, DEADLINES, 0),
        Err(fedshield_protocol::ProtocolError::Config(_))
    ));
    let mut f = fleet_with(&[Fault::None; 128], narrow(2));
    let joins = f.uplink.len();
    assert_eq!(joins, 128);
    while !f.uplink.is_empty() {
        f.deliver_one();
    }
    assert_eq!(f.refused.len(), 1, "{:?}", f.refused);
    assert!(
        f.refused[0].contains("the round is full"),
        "{}",
        f.refused[0]
    );
}

#[test]
fn an_edge_dying_mid_upload_is_dropped_and_the_round_completes_at_the_deadline() {
    let mut f = fleet(&[Fault::None, Fault::DiesMidUpload, Fault::None], 2);
    f.run();
    f.check_mean(&[0, 2]);
    assert_eq!(f.edges[1].settled, Some(false));
    assert!(f.now > 0, "the upload deadline closed the phase");
}

#[test]
fn an_edge_dying_after_its_shares_is_dropped() {
    let mut f = fleet(&[Fault::DiesAfterShares, Fault::None, Fault::None], 2);
    f.run();
    f.check_mean(&[1, 2]);
}

#[test]
fn duplicate_uploads_are_ignored_without_harm() {
    let mut f = fleet(&[Fault::Duplicates, Fault::None, Fault::Duplicates], 2);
    f.run();
    f.check_mean(&[0, 1, 2]);
    // Duplicate masked inputs and late chunks are refused with a reason; nothing counted twice.
    assert!(
        f.refused
            .iter()
            .any(|r| r.contains("duplicate masked input")),
        "{:?}",
        f.refused
    );
}

#[test]
fn below_threshold_the_round_fails_and_edges_keep_their_residual() {
    let mut f = fleet(
        &[Fault::None, Fault::DiesMidUpload, Fault::DiesMidUpload],
        2,
    );
    f.run();
    assert!(f.result.is_none());
    assert!(
        f.failed.as_ref().unwrap().contains("threshold"),
        "{:?}",
        f.failed
    );
    assert_eq!(f.edges[0].settled, Some(false));
}

/// The uplink messages a round takes to finish when nothing is lost.
fn messages_to_finish(mut f: Fleet) -> usize {
    let mut n = 0;
    while !f.uplink.is_empty() {
        f.deliver_one();
        n += 1;
    }
    assert!(f.host.is_done());
    n
}

/// Kills the host after `delivered` uplink messages: the messages still in flight are lost,
/// and a new host rebuilds the round from the journal (through its record encoding, with a
/// torn last record) and re-publishes it.
fn restart_host_after(f: &mut Fleet, delivered: usize) {
    for _ in 0..delivered {
        f.deliver_one();
    }
    f.uplink.clear();
    let mut bytes: Vec<u8> = f.journal.iter().flat_map(Entry::to_record).collect();
    let whole = bytes.len();
    let torn = Entry::Tick { now: 99 }.to_record();
    bytes.extend_from_slice(&torn[..torn.len() - 1]);
    let (entries, valid) = journal::read(&bytes).unwrap();
    assert_eq!((entries.len(), valid), (f.journal.len(), whole));
    let replayed = journal::replay(&entries, f.registry.clone()).unwrap();
    assert!(replayed.outcome.is_none());
    f.host = replayed.round;
    f.journal.push(Entry::Republish);
    let actions = f.host.republish();
    f.host_actions(actions);
}

#[test]
fn a_host_restarted_mid_upload_resumes_the_round_from_its_journal() {
    let mut f = fleet(&[Fault::None; 3], 2);
    // Joins and shares flow without an upload at first; then edge-0's manifest and part of
    // its chunks arrive before the host dies.
    let mut delivered = 0;
    let mut seen_chunks = 0;
    while seen_chunks < 1 {
        if matches!(f.uplink[0].1, EdgeMessage::Chunk(_)) {
            seen_chunks += 1;
        }
        f.deliver_one();
        delivered += 1;
    }
    assert!(delivered > 6, "joins and shares came first");
    restart_host_after(&mut f, 0);
    f.run();
    f.check_mean(&[0, 1, 2]);
    assert!(f.edges.iter().all(|e| e.settled == Some(true)));
    assert_eq!(f.now, 0, "nothing waited for a deadline");
    // What was re-sent and already there is refused as a duplicate, nothing counted twice.
    assert!(!f.refused.is_empty());
}

#[test]
fn a_host_restarted_in_any_phase_resumes_and_the_round_completes() {
    // Restart after every possible number of delivered messages, then once more later on.
    let total = messages_to_finish(fleet(&[Fault::None; 3], 2));
    for cut in (0..total).step_by(3) {
        let mut f = fleet(&[Fault::None; 3], 2);
        restart_host_after(&mut f, cut);
        restart_host_after(&mut f, 2);
        f.run();
        f.check_mean(&[0, 1, 2]);
        assert!(
            f.edges.iter().all(|e| e.settled == Some(true)),
            "restart after {cut} messages"
        );
    }
}

#[test]
fn over_a_sparse_graph_dropouts_and_host_restarts_still_decrypt_the_survivors_mean() {
    // A Harary graph of degree 4 and threshold 3 over 12 devices (each shares with 4 of the
    // other 11): one dies after its shares, one mid-upload; every secret keeps 3 holders.
    let sparse = RoundConfig {
        secagg_graph: GraphPolicy::Fixed {
            degree: 4,
            threshold: 3,
        },
        ..config(1, 2)
    };
    let mut faults = vec![Fault::None; 12];
    faults[3] = Fault::DiesAfterShares;
    faults[8] = Fault::DiesMidUpload;
    let survivors: Vec<usize> = (0..12).filter(|i| ![3, 8].contains(i)).collect();
    let mut f = fleet_with(&faults, sparse.clone());
    f.run();
    assert!(f.failed.is_none(), "{:?}", f.failed);
    f.check_mean(&survivors);
    assert!(f.edge_refused.is_empty(), "{:?}", f.edge_refused);
    // Each share delivery holds the 4 neighbours' shares, not 11.
    let deliveries: Vec<usize> = f
        .downlink
        .iter()
        .filter_map(|(_, payload)| match postcard::from_bytes(payload) {
            Ok(DownMessage::Shares(d)) => Some(d.shares.len()),
            _ => None,
        })
        .collect();
    assert!(
        !deliveries.is_empty() && deliveries.iter().all(|&n| n <= 4),
        "{deliveries:?}"
    );
    // The journal rebuilds the same graph: a host killed in any phase resumes the round.
    for cut in [0, 9, 23, 40, 61] {
        let mut f = fleet_with(&faults, sparse.clone());
        restart_host_after(&mut f, cut);
        f.run();
        assert!(f.failed.is_none(), "restart after {cut}: {:?}", f.failed);
        f.check_mean(&survivors);
    }
}

#[test]
fn a_journal_compacted_after_every_fold_stays_small_and_resumes_the_round_exactly() {
    // 12 devices (one dies mid-upload, one after its shares), the journal compacted after
    // every fold: it never holds a folded upload, and a host killed anywhere resumes from it.
    let mut faults = vec![Fault::None; 12];
    faults[5] = Fault::DiesMidUpload;
    faults[9] = Fault::DiesAfterShares;
    let survivors: Vec<usize> = (0..12).filter(|i| ![5, 9].contains(i)).collect();
    let journal_bytes =
        |f: &Fleet| -> usize { f.journal.iter().map(|e| e.to_record().len()).sum() };
    let upload = fedshield_protocol::host::expected_update_bytes(SELECTED, BodyBits::FULL) as usize;
    // Uncompacted, for comparison: the journal spools every upload.
    let mut plain = fleet(&faults, 2);
    while !plain.uplink.is_empty() && !plain.host.is_done() {
        plain.deliver_one();
    }
    let mut f = fleet(&faults, 2);
    f.compacting = true;
    let mut largest = 0;
    while !f.uplink.is_empty() && !f.host.is_done() {
        f.deliver_one();
        largest = largest.max(journal_bytes(&f));
    }
    assert!(
        journal_bytes(&plain) > 9 * upload,
        "{} bytes uncompacted",
        journal_bytes(&plain)
    );
    assert!(
        largest < journal_bytes(&plain) / 2,
        "compacted journal up to {largest} bytes, {} uncompacted",
        journal_bytes(&plain)
    );
    assert_eq!(
        f.journal
            .iter()
            .filter(|e| matches!(e, Entry::Checkpoint(_)))
            .count(),
        1
    );
    f.run();
    f.check_mean(&survivors);
    let mut resumed_from_checkpoints = 0;
    for cut in [30, 45, 60, 75] {
        let mut f = fleet(&faults, 2);
        f.compacting = true;
        restart_host_after(&mut f, cut);
        resumed_from_checkpoints +=
            f.journal.iter().any(|e| matches!(e, Entry::Checkpoint(_))) as usize;
        f.run();
        assert!(f.failed.is_none(), "restart after {cut}: {:?}", f.failed);
        f.check_mean(&survivors);
    }
    assert!(resumed_from_checkpoints >= 2, "{resumed_from_checkpoints}");
    // A checkpoint that does not fit the round is refused on replay.
    let mut f = fleet(&faults, 2);
    f.compacting = true;
    for _ in 0..60 {
        f.deliver_one();
    }
    let mut entries = f.journal.clone();
    if let Some(Entry::Checkpoint(c)) = entries.last_mut() {
        c.sum.pop();
    }
    assert!(journal::replay(&entries, f.registry.clone()).is_err());
}

#[test]
fn a_journal_that_does_not_start_with_the_round_or_is_corrupt_is_refused() {
    let f = fleet(&[Fault::None; 3], 2);
    assert!(journal::replay(&[Entry::Tick { now: 1 }], f.registry.clone()).is_err());
    // A complete record whose body does not decode (an unknown entry kind).
    let mut bytes = f.journal[0].to_record();
    bytes[4] = 9;
    let e = journal::read(&bytes).unwrap_err();
    assert!(e.to_string().contains("journal record at byte 0"), "{e}");
    // Two starts.
    let twice = [f.journal[0].clone(), f.journal[0].clone()];
    assert!(journal::replay(&twice, f.registry.clone()).is_err());
}

#[test]
fn forged_unsigned_replayed_and_malformed_messages_are_refused() {
    let mut f = fleet(&[Fault::None; 3], 2);
    // Run the joins and shares only: stop when the first upload is queued.
    let mut queued = std::mem::take(&mut f.uplink);
    let mut round_msgs = Vec::new();
    while !queued.is_empty() {
        let (from, msg) = queued.remove(0);
        round_msgs.push((from.clone(), msg.clone()));
        let actions = f.host.on_message(&from, msg, 0).unwrap();
        f.host_actions(actions);
        queued.append(&mut f.uplink);
        if round_msgs
            .iter()
            .any(|(_, m)| matches!(m, EdgeMessage::Manifest(_)))
        {
            break;
        }
    }
    let (from, manifest) = round_msgs
        .iter()
        .find(|(_, m)| matches!(m, EdgeMessage::Manifest(_)))
        .cloned()
        .unwrap();
    let EdgeMessage::Manifest(m) = manifest else {
        unreachable!()
    };
    // Unsigned manifest.
    let mut unsigned = m.clone();
    unsigned.signature.clear();
    let other = DeviceId("edge-1".into());
    let e = f
        .host
        .on_message(&other, EdgeMessage::Manifest(unsigned), 0)
        .unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
    // Another device's manifest replayed on this uplink.
    let e = f
        .host
        .on_message(&other, EdgeMessage::Manifest(m.clone()), 0)
        .unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
    // A join signed by edge-0 on edge-1's uplink.
    let (_, join) = round_msgs
        .iter()
        .find(|(d, m)| d.0 == "edge-0" && matches!(m, EdgeMessage::Join { .. }))
        .cloned()
        .unwrap();
    let e = f.host.on_message(&other, join.clone(), 0).unwrap_err();
    assert!(e.to_string().contains("uplink"), "{e}");
    // The same join replayed on its own uplink, in the wrong phase.
    let e = f
        .host
        .on_message(&DeviceId("edge-0".into()), join, 0)
        .unwrap_err();
    assert!(e.to_string().contains("phase"), "{e}");
    // A chunk that does not match its manifest.
    let bad = EdgeMessage::Chunk(fedshield_protocol::messages::Chunk {
        round: 1,
        index: 0,
        bytes: vec![0; 5000],
    });
    let e = f.host.on_message(&from, bad, 0).unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    // Garbage and oversized payloads never reach the state machine.
    assert!(matches!(
        decode::<EdgeMessage>(&[0xff; 9], 1 << 20),
        Err(ProtocolError::Malformed(_))
    ));
    assert!(matches!(
        decode::<EdgeMessage>(&[0; 100], 10),
        Err(ProtocolError::Malformed(_))
    ));
    // After all that, the round still completes with everyone.
    f.uplink = queued;
    f.run();
    f.check_mean(&[0, 1, 2]);
}

#[test]
fn edges_refuse_rounds_for_another_layout_and_the_topic_tree_routes() {
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let mut s = EdgeSession::new(
        EdgeIdentity {
            id: DeviceId("a".into()),
            secret: [1; 32],
            authority: [2; 32],
        },
        [0; 32],
    );
    let state = RoundState {
        config: config(1, 2),
        phase: Phase::Announce { deadline_ms: 5 },
        incarnation: 0,
    };
    assert!(
        s.on_round(state, 1, None, &DeviceStatus::default(), &mut rng)
            .is_err()
    );
    let t = Topics::new("lab").unwrap();
    use fedshield_protocol::messages::Route;
    assert_eq!(t.route(&t.round()), Some(Route::Round));
    assert_eq!(
        t.route(&t.up(&DeviceId("x".into()))),
        Some(Route::Up(DeviceId("x".into())))
    );
    assert_eq!(t.route("fedshield/lab/up/x/y"), None);
    let x = DeviceId("x".into());
    assert_eq!(t.route(&t.upload(3, &x)), Some(Route::Upload(3, x.clone())));
    assert_eq!(t.route(&t.fold_command(2)), Some(Route::FoldCommand(2)));
    assert_eq!(t.route(&t.fold_report(2)), Some(Route::FoldReport(2)));
    assert_eq!(t.route("fedshield/lab/upload/x/x"), None);
    assert_eq!(t.route("fedshield/lab/fold/1/other"), None);
    assert_eq!(t.shard_uploads(3), "fedshield/lab/upload/3/+");
    assert_eq!(t.all_fold_reports(), "fedshield/lab/fold/+/report");
    assert_eq!(t.route("fedshield/other/round"), None);
    assert!(Topics::new("a/b").is_err() && Topics::new("#").is_err() && Topics::new("").is_err());
}

#[test]
fn every_host_message_round_trips_through_postcard() {
    // Schedules, phases and configurations are all postcard-encodable (no self-describing
    // serde features such as internally tagged enums).
    for schedule in [
        fedshield_codec::Schedule::Uniform { rho: 0.1 },
        fedshield_codec::Schedule::Ramp {
            first: 0.8,
            last: 0.5,
        },
    ] {
        let mut c = config(3, 2);
        c.prune.schedule = schedule;
        for phase in [
            Phase::Announce { deadline_ms: 9 },
            Phase::Closed {
                contributors: vec![DeviceId("a".into())],
            },
            Phase::Failed { reason: "x".into() },
        ] {
            let state = RoundState {
                config: c.clone(),
                phase,
                incarnation: 2,
            };
            let bytes = postcard::to_stdvec(&state).unwrap();
            assert_eq!(decode::<RoundState>(&bytes, 1 << 20).unwrap(), state);
        }
    }
    use fedshield_protocol::messages::GlobalValues;
    let exact: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let parts = fedshield_protocol::messages::GlobalPart::split(
        1,
        4,
        &[DeviceId("a".into())],
        &GlobalValues::F32(exact.clone()),
        12,
    );
    assert_eq!(parts.len(), 4);
    let mut asm = fedshield_protocol::messages::GlobalAssembler::default();
    // Out of order, with a duplicate and a stale part.
    let mut stale = parts[0].clone();
    stale.round = 3;
    assert!(asm.add(stale, 3).is_none());
    for i in [2, 0, 2, 3] {
        let p: fedshield_protocol::messages::GlobalPart =
            decode(&postcard::to_stdvec(&parts[i]).unwrap(), 1 << 20).unwrap();
        assert!(asm.add(p, 3).is_none());
    }
    let (round, who, values) = asm.add(parts[1].clone(), 3).unwrap();
    assert_eq!((round, who.len()), (4, 1));
    assert_eq!(values, GlobalValues::F32(exact));
    // A quantized update travels in whole blocks of codes with their scales, and
    // reassembles to the same codes; parts of mixed kinds are dropped.
    let long: Vec<f32> = (0..2000).map(|i| (i as f32 * 0.1).sin() * 1e-2).collect();
    let q = fedshield_codec::Q8::quantize(&long);
    let parts = fedshield_protocol::messages::GlobalPart::split(
        1,
        5,
        &[DeviceId("a".into())],
        &GlobalValues::Q8(q.clone()),
        600,
    );
    assert_eq!(
        parts.len(),
        4,
        "512 codes and a scale per part of 600 bytes"
    );
    for p in &parts {
        assert!(postcard::to_stdvec(p).unwrap().len() < 600 + 64);
    }
    let mut asm = fedshield_protocol::messages::GlobalAssembler::default();
    for p in parts.iter().rev() {
        if let Some((_, _, values)) = asm.add(p.clone(), 4) {
            assert_eq!(values, GlobalValues::Q8(q.clone()));
            assert_eq!(values.decode().unwrap(), q.dequantize().unwrap());
        }
    }
    let mut mixed = parts.clone();
    mixed[1].values = GlobalValues::F32(vec![0.0; 512]);
    let mut asm = fedshield_protocol::messages::GlobalAssembler::default();
    assert!(mixed.into_iter().all(|p| asm.add(p, 4).is_none()));
}

#[test]
fn snapshots_reassemble_from_parts_in_any_order_and_refuse_mixed_or_corrupt_ones() {
    use fedshield_protocol::messages::{Snapshot, SnapshotAssembler};
    let len = 50_000;
    let mut history = fedshield_codec::History::new(len);
    let selection = fedshield_codec::Selection {
        round: 1,
        indices: (0..len as u32).step_by(7).collect(),
    };
    let values: Vec<f32> = (0..selection.indices.len())
        .map(|i| (i as f32).sin() * 1e-3)
        .collect();
    history.observe(&selection, &values).unwrap();
    let snapshot = Snapshot {
        epoch: 1,
        round: 1,
        global: (0..len).map(|i| (i as f32 * 0.37).cos() * 0.01).collect(),
        history,
        recent: vec![(1, vec![DeviceId("edge-0".into())])],
    };
    let parts = snapshot.split(16 * 1024);
    assert!(parts.len() > 3);
    // An older publication's part, then the parts backwards with a duplicate.
    let mut older = snapshot.clone();
    older.round = 0;
    older.global[0] = 9.0;
    let older_part = older.split(16 * 1024)[1].clone();
    let mut asm = SnapshotAssembler::default();
    // A replayed part of a snapshot no newer than what the device has is refused, and does
    // not disturb the publication being assembled.
    assert!(matches!(
        asm.add(older_part.clone(), 0, 1 << 26),
        Some(Err(ProtocolError::Stale { .. }))
    ));
    let mut got = None;
    for (k, p) in parts
        .iter()
        .rev()
        .chain(std::iter::once(&parts[0]))
        .enumerate()
    {
        if k == 1 {
            assert!(asm.add(older_part.clone(), 0, 1 << 26).unwrap().is_err());
        }
        if let Some(r) = asm.add(p.clone(), 0, 1 << 26) {
            got = Some(r.unwrap());
            break;
        }
    }
    assert_eq!(got.unwrap(), snapshot);
    // A part whose bytes were altered: the digest refuses the whole.
    let mut asm = SnapshotAssembler::default();
    let mut bad = parts.clone();
    bad[1].bytes[0] ^= 1;
    let out: Vec<_> = bad
        .into_iter()
        .filter_map(|p| asm.add(p, 0, 1 << 26))
        .collect();
    assert!(matches!(out.as_slice(), [Err(ProtocolError::Malformed(_))]));
    // Over the size limit: refused.
    let mut asm = SnapshotAssembler::default();
    let out: Vec<_> = parts
        .into_iter()
        .filter_map(|p| asm.add(p, 0, 1000))
        .collect();
    assert!(matches!(out.as_slice(), [Err(_)]));
}

/// The isolation attack of a malicious host: weight 1 for edge-0, next to nothing for the
/// others. Before the devices checked the weights, every device encrypted under the weight
/// announced, and the decrypted "aggregate" of three members was edge-0's update alone.
fn isolate_edge_0(state: &mut RoundState) {
    if let Phase::Roster { weights, .. } = &mut state.phase {
        for (d, w) in weights.iter_mut() {
            *w = if d.0 == "edge-0" { 1.0 } else { 1e-12 };
        }
    }
}

#[test]
fn a_host_announcing_skewed_weights_is_refused_by_every_device_and_nobody_encrypts() {
    let mut f = fleet(&[Fault::None; 3], 2);
    f.tamper = Some(isolate_edge_0);
    f.run();
    // Every device refused the roster (and ignored its retained copy: it left the round),
    // and none trained or sent shares.
    assert_eq!(f.edge_refused.len(), 3, "{:?}", f.edge_refused);
    for (_, e) in &f.edge_refused {
        assert!(
            matches!(
                e,
                ProtocolError::Weights(WeightRefusal::Mismatch { member, .. }) if member.0 == "edge-0"
            ),
            "{e}"
        );
    }
    assert_eq!(f.trained_with, [None, None, None]);
    assert!(f.result.is_none());
    assert!(
        f.failed.as_ref().unwrap().contains("threshold"),
        "{:?}",
        f.failed
    );
}

#[test]
fn weights_that_follow_the_raw_sample_counts_past_the_ratio_cap_are_refused() {
    // Claims 1600, 10, 10: FedAvg's raw shares would give the small devices 0.6% each, below
    // the floor; the rule caps the large claim at 16 x 10.
    fn raw_shares(state: &mut RoundState) {
        if let Phase::Roster { weights, .. } = &mut state.phase {
            let raw = [1600.0, 10.0, 10.0];
            for (i, (_, w)) in weights.iter_mut().enumerate() {
                *w = raw[i] / 1620.0;
            }
        }
    }
    let claims = [1600, 10, 10];
    let mut f = fleet_of(&[Fault::None; 3], config(1, 2), &claims);
    f.tamper = Some(raw_shares);
    f.run();
    assert_eq!(f.edge_refused.len(), 3, "{:?}", f.edge_refused);
    assert_eq!(f.trained_with, [None, None, None]);
    // Untampered, the same claims give the capped weights, which every device checks and
    // encodes with, and the round decrypts their weighted mean.
    let mut f = fleet_of(&[Fault::None; 3], config(1, 2), &claims);
    f.run();
    assert!(f.edge_refused.is_empty(), "{:?}", f.edge_refused);
    let w: Vec<f64> = f.trained_with.iter().map(|w| w.unwrap()).collect();
    assert_eq!(w, [160.0 / 180.0, 10.0 / 180.0, 10.0 / 180.0]);
    assert!(w.iter().all(|&w| w >= weight_floor(3)));
    let r = f.result.as_ref().unwrap();
    let got = f.encoding.decode_sum(&r.sums, r.total_weight);
    for (j, g) in got.iter().enumerate() {
        let want: f64 = (0..3).map(|i| f.edges[i].values[j] as f64 * w[i]).sum();
        assert!((*g as f64 - want).abs() < 1e-6);
    }
}

#[test]
fn a_roster_whose_weights_leave_out_or_add_a_member_is_refused() {
    fn drop_edge_2(state: &mut RoundState) {
        if let Phase::Roster { weights, .. } = &mut state.phase {
            weights.retain(|(d, _)| d.0 != "edge-2");
        }
    }
    let mut f = fleet(&[Fault::None; 3], 2);
    f.tamper = Some(drop_edge_2);
    f.run();
    // edge-2 is not admitted (it sits out); edge-0 and edge-1 refuse the roster.
    assert_eq!(f.edge_refused.len(), 2, "{:?}", f.edge_refused);
    assert!(
        f.edge_refused
            .iter()
            .all(|(i, e)| *i < 2
                && matches!(e, ProtocolError::Weights(WeightRefusal::Members { .. })))
    );
    assert_eq!(f.trained_with, [None, None, None]);
}

/// The joins of a fresh fleet, before the host saw any of them.
fn joins(f: &mut Fleet) -> Vec<(DeviceId, EdgeMessage)> {
    std::mem::take(&mut f.uplink)
}

#[test]
fn forged_joins_are_refused_and_the_weights_are_the_signed_claims() {
    let mut f = fleet(&[Fault::None; 3], 2);
    let joins = joins(&mut f);
    let (
        from,
        EdgeMessage::Join {
            advert,
            eval_loss,
            status,
            signature,
        },
    ) = joins[1].clone()
    else {
        unreachable!()
    };
    // The advert replayed with another sample count: the advert's signature fails.
    let mut inflated = advert.clone();
    let fedshield_crypto::secagg::ClientBody::Advertise(a) = &mut inflated.body else {
        unreachable!()
    };
    a.weight = 1 << 40;
    let forged = EdgeMessage::Join {
        advert: inflated,
        eval_loss,
        status: status.clone(),
        signature: signature.clone(),
    };
    let e = f.host.on_message(&from, forged, 0).unwrap_err();
    assert!(
        matches!(e, ProtocolError::SecAgg(SecAggError::BadSignature(_))),
        "{e}"
    );
    // Another loss under the device's join signature, or no signature: refused.
    for (loss, sig) in [(Some(0.0), signature.clone()), (eval_loss, Vec::new())] {
        let forged = EdgeMessage::Join {
            advert: advert.clone(),
            eval_loss: loss,
            status: status.clone(),
            signature: sig,
        };
        let e = f.host.on_message(&from, forged, 0).unwrap_err();
        assert!(
            matches!(e, ProtocolError::Report(ReportRefusal::BadSignature(_))),
            "{e}"
        );
    }
    // A device's own signed but insane loss is refused too.
    for bad in [f64::NAN, -1.0, 1e77, f64::INFINITY] {
        let sig = f.edges[1]
            .identity
            .sign(&join_report_bytes(&from, 1, Some(bad), &status));
        let e = f
            .host
            .on_message(
                &from,
                EdgeMessage::Join {
                    advert: advert.clone(),
                    eval_loss: Some(bad),
                    status: status.clone(),
                    signature: sig,
                },
                0,
            )
            .unwrap_err();
        assert!(
            matches!(e, ProtocolError::Report(ReportRefusal::OutOfRange { .. })),
            "{e}"
        );
    }
    // The genuine joins go through, and the round's weights are the signed claims' shares.
    f.uplink = joins;
    f.run();
    f.check_mean(&[0, 1, 2]);
    assert_eq!(
        f.trained_with,
        [Some(10.0 / 60.0), Some(20.0 / 60.0), Some(30.0 / 60.0)]
    );
    assert_eq!(f.result.as_ref().unwrap().eval_loss, Some(3.0));
}

#[test]
fn a_forged_or_replayed_masked_input_never_takes_the_place_of_the_real_one() {
    // The cause of a real device's upload being dropped after a burst of forgeries: the host
    // held any masked input on a device's uplink before checking it, so a forged one took
    // the real one's place, the real one was refused as a duplicate, and the upload then
    // failed its digest check.
    let mut f = fleet(&[Fault::None; 3], 2);
    let mut forged_first = false;
    for _ in 0..10_000 {
        if f.uplink.is_empty() {
            break;
        }
        let is_masked =
            matches!(&f.uplink[0].1, EdgeMessage::SecAgg(m) if m.body.kind() == "masked-input");
        if is_masked && !forged_first {
            let (from, EdgeMessage::SecAgg(real)) = f.uplink[0].clone() else {
                unreachable!()
            };
            let i = f.index(&from);
            // A tampered copy (signature broken), an unsigned one, and a correctly signed
            // masked input of another round (a replay).
            let mut tampered = real.clone();
            if let fedshield_crypto::secagg::ClientBody::MaskedInput { update_digest, .. } =
                &mut tampered.body
            {
                update_digest[0] ^= 1;
            }
            let mut unsigned = real.clone();
            unsigned.signature.clear();
            let replay = fedshield_crypto::secagg::SignedMessage::sign(
                &f.edges[i].identity,
                from.clone(),
                0,
                real.body.clone(),
            );
            for forged in [tampered, unsigned, replay] {
                let e = f
                    .host
                    .on_message(&from, EdgeMessage::SecAgg(forged), 0)
                    .unwrap_err();
                assert!(matches!(e, ProtocolError::SecAgg(_)), "{e}");
            }
            forged_first = true;
        }
        f.deliver_one();
    }
    assert!(forged_first);
    f.run();
    f.check_mean(&[0, 1, 2]);
    assert!(f.refused.is_empty(), "{:?}", f.refused);
    assert_eq!(f.now, 0, "nothing waited for a deadline");
}

#[test]
fn a_device_whose_upload_the_host_drops_is_told_and_the_round_does_not_wait_for_it() {
    let mut f = fleet(&[Fault::None, Fault::LyingManifest, Fault::None], 2);
    f.run();
    f.check_mean(&[0, 2]);
    assert_eq!(
        f.edges[1].settled,
        Some(false),
        "the device sat the round out"
    );
    assert_eq!(
        f.now, 0,
        "the round closed without waiting for the upload deadline"
    );
    assert_eq!(
        f.notices,
        [(DeviceId("edge-1".into()), UploadRefusal::DigestMismatch)]
    );
    // The drop is part of the journal: a restarted host drops it again and ends the same.
    let replayed = journal::replay(&f.journal, f.registry.clone()).unwrap();
    let Some(HostAction::Finished(r)) = replayed.outcome else {
        panic!("the replayed round did not finish")
    };
    assert_eq!(&r, f.result.as_ref().unwrap());
}

/// Mutates `bytes` with `rng`: a bit flip, a truncation, an inserted byte, a run of junk, a
/// changed length prefix, or a splice of two messages.
fn mutate(bytes: &[u8], other: &[u8], rng: &mut ChaCha20Rng) -> Vec<u8> {
    use rand::Rng;
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return vec![rng.random()];
    }
    match rng.random_range(0..6) {
        0 => {
            let i = rng.random_range(0..b.len());
            b[i] ^= 1 << rng.random_range(0..8);
        }
        1 => b.truncate(rng.random_range(0..b.len())),
        2 => {
            let i = rng.random_range(0..=b.len());
            b.insert(i, rng.random());
        }
        3 => {
            let i = rng.random_range(0..b.len());
            let n = rng.random_range(1..=16).min(b.len() - i);
            for x in &mut b[i..i + n] {
                *x = rng.random();
            }
        }
        4 => {
            // Postcard's first bytes are variant tags and length prefixes.
            let i = rng.random_range(0..b.len().min(4));
            b[i] = [0x00, 0x7f, 0xff, 0x80][rng.random_range(0..4)];
        }
        _ => {
            let cut = rng.random_range(0..b.len());
            let from = rng.random_range(0..other.len().max(1));
            b.truncate(cut);
            b.extend_from_slice(other.get(from..).unwrap_or(&[]));
        }
    }
    b
}

#[test]
fn a_corpus_of_mutated_real_messages_is_refused_without_panic_and_the_round_completes() {
    use fedshield_protocol::signed::{Downlink, HostSigned, HostTrust, open_downlink};
    // Capture a clean round's uplink messages and the host's broadcasts, as wire bytes.
    let mut clean = fleet(&[Fault::None; 3], 2);
    let mut uplink: Vec<(DeviceId, Vec<u8>)> = Vec::new();
    let topics = Topics::new("lab").unwrap();
    let host = Identity::generate(&mut ChaCha20Rng::seed_from_u64(77));
    let authority = Identity::generate(&mut ChaCha20Rng::seed_from_u64(78));
    // A device's trust in `key` as the host's (certificate 1, valid until t = 1,000 s).
    let trust = |key: [u8; 32]| {
        let cert = authority.certify_host("lab", key, 1, 1_000);
        HostTrust::new(authority.public_key(), "lab", cert, None).unwrap()
    };
    let mut trusted = trust(host.public_key());
    let me = DeviceId("edge-0".into());
    for _ in 0..10_000 {
        if clean.uplink.is_empty() {
            break;
        }
        let (from, msg) = clean.uplink[0].clone();
        uplink.push((from, postcard::to_stdvec(&msg).unwrap()));
        clean.deliver_one();
    }
    // The round's broadcasts and edge-0's share delivery, sealed as the host driver does,
    // and a global update part in its zstd envelope.
    let mut downlink: Vec<(String, Vec<u8>)> = clean
        .downlink
        .iter()
        .filter(|(t, _)| *t == topics.round() || *t == topics.down(&me))
        .map(|(t, p)| (t.clone(), HostSigned::seal(&host, t, p.clone())))
        .collect();
    let part = &fedshield_protocol::messages::GlobalPart::split(
        1,
        1,
        std::slice::from_ref(&me),
        &fedshield_protocol::messages::GlobalValues::F32(vec![0.5; 900]),
        4096,
    )[0];
    let envelope = fedshield_wire::compress_if_smaller(&postcard::to_stdvec(part).unwrap());
    downlink.push((
        topics.global(0),
        HostSigned::seal_message(&host, &topics.global(0), &envelope),
    ));
    assert!(downlink.len() >= 6, "{}", downlink.len());
    assert!(uplink.len() > 20);
    // The corpus: 2,000 mutations from a seed, fed to a fresh round between its real
    // messages. Every mutant either fails to decode or is refused; none panics, and the
    // round still decrypts the exact mean.
    let mut rng = ChaCha20Rng::seed_from_u64(2026);
    let mut f = fleet(&[Fault::None; 3], 2);
    let mut mutants = 0;
    let mut accepted = 0;
    let mut refused_by_round = 0;
    for _ in 0..200 {
        for _ in 0..10 {
            use rand::Rng;
            let (from, bytes) = &uplink[rng.random_range(0..uplink.len())];
            let other = &uplink[rng.random_range(0..uplink.len())].1;
            let bad = mutate(bytes, other, &mut rng);
            mutants += 1;
            let decoded = decode::<EdgeMessage>(&bad, 1 << 20);
            let outcome = decoded
                .as_ref()
                .ok()
                .map(|msg| f.host.on_message(from, msg.clone(), f.now));
            if matches!(outcome, Some(Err(_))) {
                refused_by_round += 1;
            }
            if let (Ok(msg), Some(Ok(_))) = (decoded, outcome) {
                // Only a mutant that decodes to a message identical to a genuine one (a
                // no-op mutation of padding) may pass, and then it is a duplicate.
                accepted += 1;
                assert!(
                    uplink.iter().any(
                        |(d, b)| d == from && decode::<EdgeMessage>(b, 1 << 20).unwrap() == msg
                    ),
                    "a mutated message was accepted: {msg:?}"
                );
            }
            // Mutated host broadcasts never open.
            let (topic, down) = &downlink[rng.random_range(0..downlink.len())];
            let bad = mutate(down, other, &mut rng);
            if bad != *down {
                let opened = open_downlink(&topics, &mut trusted, 5, &me, topic, &bad, 1 << 20);
                assert!(matches!(opened, Some(Err(_))), "{opened:?}");
            }
        }
        if !f.uplink.is_empty() {
            f.deliver_one();
        }
    }
    assert_eq!(mutants, 2000);
    // Many mutants decode and reach the state machine, which refuses them.
    assert!(
        refused_by_round > 200,
        "{refused_by_round} refused by the round"
    );
    assert!(accepted <= 10, "{accepted} mutants accepted");
    eprintln!(
        "corpus: {mutants} mutants, {refused_by_round} refused by the round, {accepted} no-op duplicates accepted"
    );
    // The genuine messages open; the same bytes on another topic or under another key do
    // not, and other devices' topics are not for this one.
    for (topic, bytes) in &downlink {
        let opened = open_downlink(&topics, &mut trusted, 5, &me, topic, bytes, 1 << 20);
        assert!(
            matches!(
                opened,
                Some(Ok(Downlink::Round(_)
                    | Downlink::Down(_)
                    | Downlink::Global(_)))
            ),
            "{topic}: {opened:?}"
        );
    }
    let stranger = Identity::generate(&mut rng);
    let round_state = &downlink[0].1;
    for (topic, key) in [
        (topics.global(0), host.public_key()),
        (topics.down(&me), host.public_key()),
        (topics.round(), stranger.public_key()),
    ] {
        assert!(matches!(
            open_downlink(
                &topics,
                &mut trust(key),
                5,
                &me,
                &topic,
                round_state,
                1 << 20
            ),
            Some(Err(ProtocolError::HostSignature(_)))
        ));
    }
    // Once the host's certificate has expired, even its genuine messages are refused.
    let expired = open_downlink(
        &topics,
        &mut trusted,
        1_000,
        &me,
        &topics.round(),
        round_state,
        1 << 20,
    );
    assert!(
        matches!(&expired, Some(Err(e)) if e.kind() == "host-expired"),
        "{expired:?}"
    );
    let other_device = topics.down(&DeviceId("edge-1".into()));
    assert!(
        open_downlink(
            &topics,
            &mut trusted,
            5,
            &me,
            &other_device,
            round_state,
            1 << 20
        )
        .is_none()
    );
    f.run();
    f.check_mean(&[0, 1, 2]);
}

#[test]
fn replayed_round_states_of_an_earlier_round_or_incarnation_are_refused() {
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let authority = Identity::generate(&mut rng);
    let mut s = EdgeSession::new(
        EdgeIdentity {
            id: DeviceId("a".into()),
            secret: [1; 32],
            authority: authority.public_key(),
        },
        [7; 32],
    );
    let state = |round, incarnation, phase| RoundState {
        config: config(round, 2),
        phase,
        incarnation,
    };
    let announce = || Phase::Announce { deadline_ms: 5 };
    assert_eq!(
        s.on_round(
            state(2, 1, announce()),
            1,
            None,
            &DeviceStatus::default(),
            &mut rng
        )
        .unwrap()
        .len(),
        1
    );
    // The same round under an older incarnation, and an earlier round's outcome: refused.
    for old in [
        state(2, 0, announce()),
        state(1, 3, Phase::Failed { reason: "x".into() }),
    ] {
        let e = s
            .on_round(old, 1, None, &DeviceStatus::default(), &mut rng)
            .unwrap_err();
        assert!(matches!(e, ProtocolError::Stale { .. }), "{e}");
    }
    // A device restored after round 5's global update never joins round 5 again.
    s.resume_after(5);
    assert!(
        s.on_round(
            state(5, 0, announce()),
            1,
            None,
            &DeviceStatus::default(),
            &mut rng
        )
        .unwrap()
        .is_empty()
    );
    assert_eq!(
        s.on_round(
            state(6, 0, announce()),
            1,
            None,
            &DeviceStatus::default(),
            &mut rng
        )
        .unwrap()
        .len(),
        1
    );
}

/// The host's step rule over a mixed fleet: a device in a critical state and one too slow
/// for the round's time are left out (and told why in the roster's plan), joining closes
/// as soon as every device has answered, the others get the steps that fit the training
/// time, `tau_eff` is their weighted mean, and the round completes with them. A host that
/// announces another `tau_eff` is refused by every member.
#[test]
fn the_step_plan_leaves_out_critical_and_slow_devices_and_fits_the_others_to_the_time() {
    let round = RoundConfig {
        local_steps: 8,
        min_local_steps: 2,
        ..config(1, 2)
    };
    let status = |sps: Option<f64>, critical: Option<&str>| DeviceStatus {
        plan: Some("ckpt-packed-mb4".into()),
        seconds_per_step: sps,
        critical: critical.map(String::from),
        ..DeviceStatus::default()
    };
    // The upload window is 10 s: 5 s of training (TRAIN_SHARE).
    let statuses = [
        status(None, None),
        status(Some(1.0), None),
        status(
            Some(0.5),
            Some("tj-therm 99.5 C at its passive trip point 99 C"),
        ),
        status(Some(4.0), None),
    ];
    let mut f = fleet_reporting(&[Fault::None; 4], round, &[10, 20, 30, 40], &statuses);
    while !f.uplink.is_empty() {
        f.deliver_one();
    }
    // Every device answered: the roster is out before the join deadline.
    assert_eq!(f.now, 0);
    assert!(f.edges[0].task.is_some(), "{:?}", f.refused);
    assert_eq!(
        f.edges[2].left_out,
        Some(LeftOut::Critical(
            "tj-therm 99.5 C at its passive trip point 99 C".into()
        ))
    );
    assert_eq!(
        f.edges[3].left_out,
        Some(LeftOut::TooSlow {
            seconds_per_step: 4.0,
            can_do: 1
        })
    );
    let (t0, t1) = (
        f.edges[0].task.clone().unwrap(),
        f.edges[1].task.clone().unwrap(),
    );
    assert_eq!((t0.steps, t1.steps), (8, 5));
    // Weights 10:20 of the members: tau_eff = (8 + 2 * 5) / 3 = 6.
    assert!((t0.effective_steps - 6.0).abs() < 1e-12, "{t0:?}");
    assert_eq!(t0.effective_steps, t1.effective_steps);
    assert_eq!(t0.train_seconds, 5.0);
    f.run();
    let result = f.result.clone().expect("the round completes");
    assert_eq!(
        result.contributors,
        vec![DeviceId("edge-0".into()), DeviceId("edge-1".into())]
    );
    assert!((result.effective_steps - 6.0).abs() < 1e-12);
    let parts = f.host.devices();
    assert_eq!(parts.len(), 4);
    assert_eq!(
        parts[&DeviceId("edge-1".into())].assignment,
        fedshield_protocol::fleet::steps::Assignment::Train { steps: 5 }
    );
    assert_eq!(
        parts[&DeviceId("edge-0".into())].status.plan.as_deref(),
        Some("ckpt-packed-mb4")
    );

    // A host that inflates tau_eff (to blow up one device's delta) is refused by all.
    let mut f = fleet_reporting(
        &[Fault::None; 2],
        RoundConfig {
            local_steps: 8,
            ..config(1, 2)
        },
        &[10, 20],
        &statuses[..2],
    );
    fn inflate(state: &mut RoundState) {
        if let Phase::Roster { plan, .. } = &mut state.phase {
            plan.effective_steps *= 4.0;
        }
    }
    f.tamper = Some(inflate);
    while !f.uplink.is_empty() {
        f.deliver_one();
    }
    assert!(f.edges.iter().all(|e| e.task.is_none()));
    // Each device refuses once (the retained copy after that finds it out of the round).
    assert_eq!(f.edge_refused.len(), 2, "{:?}", f.edge_refused);
    assert!(
        f.edge_refused
            .iter()
            .all(|(_, e)| e.to_string().contains("effective steps")),
        "{:?}",
        f.edge_refused
    );
}

/// A round of `faults.len()` devices sharded over `k` fold workers, all up.
fn sharded(faults: &[Fault], k: u32) -> Fleet {
    let mut f = fleet_with(
        faults,
        RoundConfig {
            fold_shards: k,
            ..config(1, 2)
        },
    );
    for s in 0..k {
        f.start_worker(s);
    }
    f
}

fn ids_in_shard(n: usize, k: u32, s: u32) -> Vec<usize> {
    (0..n)
        .filter(|&i| shard_of(&DeviceId(format!("edge-{i}")), k) == s)
        .collect()
}

#[test]
fn rounds_sharded_over_1_2_and_4_fold_workers_decrypt_exactly_the_sums_of_the_host_alone() {
    let all: Vec<usize> = (0..8).collect();
    let mut alone = fleet(&[Fault::None; 8], 2);
    alone.run();
    alone.check_mean(&all);
    let want = alone.result.clone().unwrap();
    for k in [1, 2, 4] {
        let mut f = sharded(&[Fault::None; 8], k);
        f.run();
        assert!(f.failed.is_none(), "{k} workers: {:?}", f.failed);
        f.check_mean(&all);
        let got = f.result.as_ref().unwrap();
        assert_eq!(got.sums, want.sums, "{k} workers");
        assert_eq!(got.upload_bytes, want.upload_bytes);
        assert!(f.edges.iter().all(|e| e.settled == Some(true)));
        assert_eq!(f.now, 0, "every phase closed without a deadline");
        assert!(f.refused.is_empty(), "{:?}", f.refused);
        assert!(f.worker_refused.is_empty(), "{:?}", f.worker_refused);
        assert_eq!(f.resent, 0, "nobody was asked to send an upload again");
        // The host saw no upload: its journal holds no manifest or chunk.
        assert!(!f.journal.iter().any(|e| matches!(
            e,
            Entry::Message {
                message: EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_),
                ..
            }
        )));
        // And it resumes from that journal to the same end.
        let replayed = journal::replay(&f.journal, f.registry.clone()).unwrap();
        let Some(HostAction::Finished(r)) = replayed.outcome else {
            panic!("the replayed round did not finish")
        };
        assert_eq!(&r, got);
    }
}

/// Delivers uplink messages until `n` uploads are folded by the workers.
fn until_folded(f: &mut Fleet, n: usize) {
    while f
        .workers
        .iter()
        .flatten()
        .map(FoldWorker::folded)
        .sum::<usize>()
        < n
    {
        assert!(!f.uplink.is_empty(), "ran out of messages");
        f.deliver_one();
    }
}

#[test]
fn a_fold_worker_restarted_mid_upload_has_its_devices_resend_and_the_sum_stays_exact() {
    let k = 2;
    let mut f = sharded(&[Fault::None; 8], k);
    until_folded(&mut f, 3);
    // Shard 0's worker dies with what it folded, and the uploads on its topic meanwhile
    // are lost; a new process starts.
    let victim = (0..k)
        .find(|&s| f.workers[s as usize].as_ref().unwrap().folded() > 0)
        .unwrap();
    f.workers[victim as usize] = None;
    for _ in 0..4 {
        f.deliver_one();
    }
    f.start_worker(victim);
    assert_eq!(
        f.resent,
        ids_in_shard(8, k, victim).len(),
        "the restarted worker's devices were asked again"
    );
    f.run();
    assert!(f.failed.is_none(), "{:?}", f.failed);
    f.check_mean(&(0..8).collect::<Vec<_>>());
    assert!(f.edges.iter().all(|e| e.settled == Some(true)));
    assert_eq!(f.now, 0, "nobody waited for a deadline");
}

#[test]
fn a_fold_worker_down_at_the_close_leaves_its_devices_out_and_the_others_decrypt() {
    let k = 2;
    let mut f = sharded(&[Fault::None; 8], k);
    until_folded(&mut f, 6);
    let victim = 1;
    f.workers[victim as usize] = None;
    f.run();
    assert!(f.failed.is_none(), "{:?}", f.failed);
    let kept = ids_in_shard(8, k, 0);
    assert!(kept.len() >= 2 && kept.len() < 8, "{kept:?}");
    f.check_mean(&kept);
    for i in ids_in_shard(8, k, victim) {
        assert_eq!(f.edges[i].settled, Some(false), "edge-{i}");
    }
    assert!(
        f.now > 0,
        "the close waited for the lost worker's partial sum"
    );
}

#[test]
fn a_host_restarted_in_any_phase_of_a_sharded_round_resumes_with_its_workers() {
    let total = messages_to_finish(sharded(&[Fault::None; 6], 2));
    for cut in (0..total).step_by(3) {
        let mut f = sharded(&[Fault::None; 6], 2);
        restart_host_after(&mut f, cut);
        f.run();
        assert!(f.failed.is_none(), "restart after {cut}: {:?}", f.failed);
        f.check_mean(&(0..6).collect::<Vec<_>>());
        assert!(f.edges.iter().all(|e| e.settled == Some(true)), "cut {cut}");
    }
}

#[test]
fn in_a_sharded_round_a_lying_upload_is_refused_by_its_worker_and_misrouted_parts_by_all() {
    let mut f = sharded(
        &[Fault::None, Fault::LyingManifest, Fault::None, Fault::None],
        2,
    );
    f.run();
    f.check_mean(&[0, 2, 3]);
    assert_eq!(
        f.notices,
        [(DeviceId("edge-1".into()), UploadRefusal::DigestMismatch)]
    );
    assert_eq!(f.edges[1].settled, Some(false));

    // An upload on the host's uplink, or on another shard's topic, is refused.
    let mut f = sharded(&[Fault::None; 4], 2);
    while !matches!(f.uplink.first(), Some((_, EdgeMessage::Manifest(_)))) {
        f.deliver_one();
    }
    let (from, manifest) = f.uplink[0].clone();
    let err = f.host.on_message(&from, manifest.clone(), 0).unwrap_err();
    assert_eq!(err.kind(), "sharded-upload");
    let other = 1 - shard_of(&from, 2) as usize;
    let err = f.workers[other]
        .as_mut()
        .unwrap()
        .on_upload(&from, manifest)
        .unwrap_err();
    assert_eq!(err.kind(), "not-in-roster");
    f.run();
    f.check_mean(&[0, 1, 2, 3]);
}

fn part0(u: &mut ShardUplink) -> &mut fedshield_protocol::shard::PartialPart {
    match &mut u.report {
        fedshield_protocol::shard::ShardReport::Partial(p) => p,
        _ => panic!("a part of a partial sum"),
    }
}

#[test]
fn partial_sums_that_name_devices_the_host_did_not_admit_or_are_misshapen_are_refused() {
    use fedshield_protocol::shard::{ShardCommand, ShardReport};
    let mut f = sharded(&[Fault::None; 6], 2);
    let folded = |f: &Fleet| {
        f.workers
            .iter()
            .flatten()
            .map(FoldWorker::folded)
            .sum::<usize>()
    };
    // Five of six folded (the sixth would close the phase at once); then the deadline
    // closes it, the workers kept from answering.
    while folded(&f) < 5 {
        f.deliver_one();
    }
    let mut workers = std::mem::take(&mut f.workers);
    f.now = 20_000;
    let actions = f.host.on_tick(f.now);
    assert!(
        actions
            .iter()
            .all(|a| matches!(a, HostAction::Shard(_, ShardCommand::Close { .. })))
    );
    let mut answers: Vec<Vec<ShardUplink>> = (0..2)
        .map(|s| {
            workers[s]
                .as_mut()
                .unwrap()
                .on_command(ShardCommand::Close { round: 1 })
                .unwrap()
        })
        .collect();
    assert!(answers[0].len() > 1, "a partial sum travels in parts");
    // Shard 0's parts but the first arrive; then bad first parts, each refused whole.
    let first = answers[0].remove(0);
    for part in answers[0].drain(..) {
        f.worker_output(Ok(vec![part]));
    }
    let other_devices = part0(&mut answers[1][0].clone()).folded.clone();
    let mut foreign = first.clone();
    part0(&mut foreign).folded = other_devices;
    let mut digest = first.clone();
    part0(&mut digest).folded[0].1[0] ^= 1;
    let mut short = first.clone();
    part0(&mut short).bodies.pop();
    let mut misplaced = first.clone();
    part0(&mut misplaced).count += 1;
    let mut stranger = first.clone();
    stranger.instance ^= 1;
    for bad in [foreign, digest, short, misplaced, stranger] {
        assert_eq!(f.host.on_shard(bad, f.now).unwrap_err().kind(), "malformed");
    }
    let mut kept: Vec<usize> = answers
        .iter()
        .flat_map(|a| a.first().into_iter().chain(std::iter::once(&first)))
        .flat_map(|u| match &u.report {
            ShardReport::Partial(p) => p.folded.clone(),
            _ => unreachable!(),
        })
        .map(|(d, _)| f.index(&d))
        .collect();
    kept.sort();
    kept.dedup();
    assert_eq!(kept.len(), 5);
    f.workers = workers;
    f.worker_output(Ok(vec![first]));
    for part in answers.remove(1) {
        f.worker_output(Ok(vec![part]));
    }
    assert!(f.refused.is_empty(), "{:?}", f.refused);
    f.run();
    f.check_mean(&kept);
    // After the round, a part is out of phase.
    let mut late = f.workers[0]
        .as_mut()
        .unwrap()
        .on_command(ShardCommand::Close { round: 1 })
        .unwrap();
    let err = f.host.on_shard(late.remove(0), f.now).unwrap_err();
    assert_eq!(err.kind(), "wrong-phase");
}
