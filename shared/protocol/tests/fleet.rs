//! The federation across rounds, in memory: the host's [`HostFleet`] with its round machine
//! and journal, devices' [`EdgeFleet`]s on a synthetic platform, a simulated broker with
//! retained messages and signed downlinks, a simulated clock. Restarts, lost and duplicated
//! messages and late joiners, deterministic: no threads, no sleeps, seeded entropy.

use fedshield_codec::{Layout, PairSpec, PruneConfig, Schedule, Structure};
use fedshield_crypto::identity::{DeviceId, HostCertificate, Identity, Registry, RevocationList};
use fedshield_protocol::edge::EdgeIdentity;
use fedshield_protocol::fleet::edge::{
    EdgeFleet, EdgeOutput, Event, MAX_DEFERRED, Platform, Trained, Training,
};
use fedshield_protocol::fleet::host::{
    FleetSettings, HostFleet, HostStateRefusal, Publish, Uplink,
};
use fedshield_protocol::fleet::steps::{DeviceStatus, Effort, Stopped, Task};
use fedshield_protocol::host::{Deadlines, HostAction, HostRound, RoundResult};
use fedshield_protocol::journal::{self, Entry};
use fedshield_protocol::messages::{RoundConfig, Route, Topics};
use fedshield_protocol::signed::{HostSigner, HostTrust, open_downlink};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::{BTreeMap, VecDeque};

const LIMIT: usize = 1 << 22;
const DEADLINES: Deadlines = Deadlines {
    join_ms: 2_000,
    shares_ms: 2_000,
    upload_ms: 10_000,
    finish_ms: 2_000,
};

fn layout(width: usize) -> Layout {
    let pair = |layer: usize| PairSpec {
        name: format!("layers.{layer}.v_proj"),
        layer,
        r: 2,
        in_features: width,
        out_features: width,
        train_a: true,
    };
    Layout::new(vec![pair(0), pair(1)]).unwrap()
}

fn settings(rounds: u64) -> FleetSettings {
    FleetSettings {
        seed: 11,
        rounds,
        prune: PruneConfig {
            schedule: Schedule::Uniform { rho: 0.5 },
            structure: Structure::Element,
            explore: 0.1,
        },
        clip: 1.0,
        body_bits: None,
        local_steps: 1,
        min_local_steps: 1,
        threshold: 2,
        secagg_graph: fedshield_crypto::secagg::GraphPolicy::DEFAULT,
        downlink: fedshield_codec::DownlinkFormat::Q8,
        chunk_bytes: 700,
        fold_shards: 0,
    }
}

/// A device whose "training" moves its adapter half-way towards its own target per step,
/// and whose held-out loss is the distance to the mean of all targets. Each step takes
/// `seconds_per_step`; it stops at the task's training time (after one step at least).
struct Synthetic {
    target: Vec<f32>,
    truth: Vec<f32>,
    entropy: [u8; 32],
    clock: f64,
    status: DeviceStatus,
    seconds_per_step: f64,
}

impl Platform for Synthetic {
    fn train(&mut self, _: &RoundConfig, task: &Task, global: &[f32]) -> Result<Trained, String> {
        let fit = (task.train_seconds / self.seconds_per_step)
            .floor()
            .max(1.0) as usize;
        let steps = task.steps.min(fit);
        let delta = self
            .target
            .iter()
            .zip(global)
            .map(|(t, g)| 0.5 * (t - g) * steps as f32)
            .collect();
        let seconds = steps as f64 * self.seconds_per_step;
        Ok(Trained {
            delta,
            seconds,
            last_loss: 0.5,
            effort: Effort {
                assigned: task.steps as u32,
                steps: steps as u32,
                tokens: 100 * steps as u64,
                seconds,
                throttled_seconds: 0.0,
                throttled_steps: 0,
                joules: Some(3.0 * seconds),
                stopped: (steps < task.steps).then_some(Stopped::Deadline),
            },
        })
    }

    fn status(&mut self) -> DeviceStatus {
        self.status.clone()
    }

    fn evaluate(&mut self, global: &[f32]) -> f64 {
        let d: f64 = self
            .truth
            .iter()
            .zip(global)
            .map(|(t, g)| ((t - g) as f64).powi(2))
            .sum();
        d / global.len() as f64
    }

    fn seconds(&self) -> f64 {
        self.clock
    }

    /// The same bytes on every call: each draw is then independent of how many messages
    /// (duplicates included) came before it, so runs compare exactly.
    fn entropy(&mut self) -> [u8; 32] {
        self.clock += 0.01;
        self.entropy
    }
}

struct Edge {
    me: EdgeIdentity,
    /// The host certificate and revocation list it trusts (kept across its restarts).
    trust: HostTrust,
    fleet: EdgeFleet,
    platform: Synthetic,
    /// The state file.
    disk: Option<Vec<u8>>,
    online: bool,
    inbox: VecDeque<(String, Vec<u8>)>,
    events: Vec<Event>,
    snapshot_subscribed: bool,
    /// Turns of the simulation a training takes (0: trained at once, in the device's step),
    /// for the device's first trainings; the ones after are instantaneous.
    train_steps: Vec<usize>,
    trainings: usize,
    /// A training in progress and the turns it still takes.
    job: Option<(Training, usize)>,
    /// Verified host messages that came while the device trained.
    received_while_training: usize,
}

/// The host's driver, as `fedshield-host serve` runs it, with its files in memory.
struct Host {
    fleet: HostFleet,
    running: Option<(HostRound, RoundConfig)>,
    /// state.bin and round.journal.
    disk_state: Option<Vec<u8>>,
    disk_journal: Option<Vec<Entry>>,
}

struct Sim {
    layout: Layout,
    settings: FleetSettings,
    topics: Topics,
    authority: [u8; 32],
    /// The host's secret and certificate.
    signer: ([u8; 32], HostCertificate),
    /// The authority's revocation list the host shows from its next start.
    revocations: Option<RevocationList>,
    registry: Registry,
    host: Host,
    edges: Vec<Edge>,
    retained: BTreeMap<String, Vec<u8>>,
    uplink: VecDeque<(String, Vec<u8>)>,
    now: u64,
    rng: ChaCha20Rng,
    /// Every message is delivered twice (QoS 1 redelivery, both directions).
    duplicate: bool,
    /// Drops every n-th uplink message.
    drop_every: Option<usize>,
    uplinks_seen: usize,
    /// Host steps taken (one per message handled or tick).
    steps: usize,
    /// The clock ticks while devices train (else training holds it).
    clock_runs: bool,
}

fn truth(targets: &[Vec<f32>]) -> Vec<f32> {
    let n = targets.len() as f32;
    (0..targets[0].len())
        .map(|j| targets.iter().map(|t| t[j]).sum::<f32>() / n)
        .collect()
}

impl Sim {
    fn new(devices: usize, rounds: u64) -> Self {
        Self::with_settings(devices, settings(rounds))
    }

    fn with_settings(devices: usize, settings: FleetSettings) -> Self {
        let layout = layout(16);
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let authority = Identity::generate(&mut rng);
        let host_id = Identity::generate(&mut rng);
        let host_cert = authority.certify_host("lab", host_id.public_key(), 1, u64::MAX);
        let mut registry = Registry::new(authority.public_key());
        let targets: Vec<Vec<f32>> = (0..devices)
            .map(|i| {
                (0..layout.len())
                    .map(|j| ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.5)
                    .collect()
            })
            .collect();
        let truth = truth(&targets);
        let mut edges = Vec::new();
        for (i, target) in targets.into_iter().enumerate() {
            let id = DeviceId(format!("edge-{i}"));
            let identity = Identity::generate(&mut rng);
            registry
                .enrol(authority.enrol(id.clone(), identity.public_key()))
                .unwrap();
            let me = EdgeIdentity {
                id,
                secret: identity.secret(),
                authority: authority.public_key(),
            };
            let mut entropy = [0u8; 32];
            rng.fill_bytes(&mut entropy);
            edges.push(Edge {
                fleet: EdgeFleet::new(me.clone(), layout.clone(), vec![0.0; layout.len()], 10),
                me,
                trust: HostTrust::new(authority.public_key(), "lab", host_cert.clone(), None)
                    .unwrap(),
                platform: Synthetic {
                    target,
                    truth: truth.clone(),
                    entropy,
                    clock: 0.0,
                    status: DeviceStatus::default(),
                    seconds_per_step: 1.0,
                },
                disk: None,
                online: false,
                inbox: VecDeque::new(),
                events: Vec::new(),
                snapshot_subscribed: false,
                train_steps: Vec::new(),
                trainings: 0,
                job: None,
                received_while_training: 0,
            });
        }
        let topics = Topics::new("lab").unwrap();
        let host = Host {
            fleet: HostFleet::new(
                settings.clone(),
                layout.clone(),
                topics.clone(),
                HostSigner::new(Identity::from_secret(host_id.secret()), host_cert.clone())
                    .unwrap(),
                None,
                1_000,
            )
            .unwrap(),
            running: None,
            disk_state: None,
            disk_journal: None,
        };
        Self {
            layout,
            settings,
            topics,
            authority: authority.secret(),
            signer: (host_id.secret(), host_cert),
            revocations: None,
            registry,
            host,
            edges,
            retained: BTreeMap::new(),
            uplink: VecDeque::new(),
            now: 0,
            rng,
            duplicate: false,
            drop_every: None,
            uplinks_seen: 0,
            steps: 0,
            clock_runs: false,
        }
    }

    fn subscribed(&self, i: usize, topic: &str) -> bool {
        let e = &self.edges[i];
        let t = &self.topics;
        match t.route(topic) {
            Some(Route::Round | Route::Global(_)) => true,
            Some(Route::Down(d)) => d == e.me.id,
            Some(Route::Snapshot(_)) => e.snapshot_subscribed,
            _ => false,
        }
    }

    fn publish(&mut self, publish: Vec<Publish>) {
        for p in publish {
            if p.retain {
                if p.payload.is_empty() {
                    self.retained.remove(&p.topic);
                } else {
                    self.retained.insert(p.topic.clone(), p.payload.clone());
                }
            }
            if p.payload.is_empty() {
                continue;
            }
            for i in 0..self.edges.len() {
                if self.edges[i].online && self.subscribed(i, &p.topic) {
                    let copies = if self.duplicate { 2 } else { 1 };
                    for _ in 0..copies {
                        self.edges[i]
                            .inbox
                            .push_back((p.topic.clone(), p.payload.clone()));
                    }
                }
            }
        }
    }

    /// Connects (or reconnects) a device: the broker hands it the retained messages of its
    /// subscriptions.
    fn connect(&mut self, i: usize) {
        self.edges[i].online = true;
        self.edges[i].snapshot_subscribed = false;
        let retained: Vec<_> = self
            .retained
            .iter()
            .filter(|(t, _)| self.subscribed(i, t))
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        self.edges[i].inbox.extend(retained);
    }

    /// Kills a device and starts it again from its state file.
    fn restart_edge(&mut self, i: usize) {
        let e = &mut self.edges[i];
        e.fleet = EdgeFleet::new(
            e.me.clone(),
            self.layout.clone(),
            vec![0.0; self.layout.len()],
            10,
        );
        if let Some(bytes) = &e.disk {
            e.fleet.restore(bytes).unwrap();
        }
        e.inbox.clear();
        e.job = None; // the training dies with the process
        self.connect(i);
    }

    /// The host's signer, from its secret and certificate.
    fn host_signer(&self) -> HostSigner {
        HostSigner::new(Identity::from_secret(self.signer.0), self.signer.1.clone()).unwrap()
    }

    /// Kills the host and starts it again from state.bin and its journal.
    fn restart_host(&mut self) {
        let mut fleet = HostFleet::new(
            self.settings.clone(),
            self.layout.clone(),
            self.topics.clone(),
            self.host_signer(),
            self.host.disk_state.as_deref(),
            self.now,
        )
        .unwrap();
        if let Some(list) = &self.revocations {
            fleet.set_revocations(list.clone());
        }
        self.host.fleet = fleet;
        self.host.running = None;
        // The broker keeps its retained messages; the host re-publishes on connecting.
        self.publish(self.host.fleet.retained());
        self.start_or_resume();
    }

    fn save_host(&mut self) {
        self.host.disk_state = Some(self.host.fleet.state_bytes());
    }

    fn host_actions(&mut self, actions: Vec<HostAction>) -> Option<Result<RoundResult, String>> {
        let sealed = self.host.fleet.seal(actions);
        self.publish(sealed.publish);
        sealed.outcome
    }

    /// `fedshield-host serve`'s round start: the interrupted round from its journal, else
    /// the next round.
    fn start_or_resume(&mut self) {
        if self.host.fleet.finished() {
            return;
        }
        let resumed = match (self.host.fleet.interrupted(), &self.host.disk_journal) {
            (Some(round), Some(entries)) => journal::replay(entries, self.registry.clone())
                .ok()
                .filter(|r| r.round.config().round == round),
            _ => None,
        };
        let outcome = match resumed {
            Some(mut replayed) => {
                let config = replayed.round.config().clone();
                let outcome = match replayed.outcome.take() {
                    Some(HostAction::Finished(r)) => Some(Ok(r)),
                    Some(HostAction::Failed(why)) => Some(Err(why)),
                    _ => {
                        self.journal(Entry::Republish);
                        None
                    }
                };
                let actions = match outcome {
                    Some(_) => vec![],
                    None => replayed.round.republish(),
                };
                self.host.running = Some((replayed.round, config));
                self.host_actions(actions).or(outcome)
            }
            None => {
                let entropy = self.rng.next_u64();
                let (config, _) = self
                    .host
                    .fleet
                    .announce(self.registry.len(), entropy)
                    .unwrap();
                self.save_host();
                self.host.disk_journal = Some(vec![Entry::Start {
                    config: config.clone(),
                    deadlines: DEADLINES,
                    now: self.now,
                }]);
                let (machine, actions) =
                    HostRound::start(config.clone(), self.registry.clone(), DEADLINES, self.now)
                        .unwrap();
                self.host.running = Some((machine, config));
                self.host_actions(actions)
            }
        };
        if let Some(outcome) = outcome {
            self.finish(outcome);
        }
    }

    fn journal(&mut self, entry: Entry) {
        self.host.disk_journal.as_mut().unwrap().push(entry);
    }

    fn finish(&mut self, outcome: Result<RoundResult, String>) {
        let (machine, config) = self.host.running.take().unwrap();
        let selection = self.host.fleet.selection(&config).unwrap();
        let outcome = outcome.map(|r| {
            let values = self.host.fleet.apply(&config, &selection, &r).unwrap();
            (r, values)
        });
        let delivered = machine.delivered_to().cloned().collect();
        let closed = self.host.fleet.close(
            config.round,
            delivered,
            machine.devices().clone(),
            outcome,
            0.0,
            0.0,
        );
        self.publish(closed.publish);
        self.save_host();
        self.host.disk_journal = None;
        self.start_or_resume();
    }

    /// One host step: an uplink message, or the clock's tick when nothing is in flight.
    fn host_step(&mut self, (topic, payload): (String, Vec<u8>)) {
        self.steps += 1;
        let uplink = self
            .host
            .fleet
            .on_uplink(&topic, &payload, LIMIT, &self.registry);
        let Uplink::Round(device, msg) = uplink else {
            return;
        };
        let Some((machine, _)) = self.host.running.as_mut() else {
            return;
        };
        let Ok(actions) = machine.on_message(&device, msg.clone(), self.now) else {
            return;
        };
        let now = self.now;
        self.journal(Entry::Message {
            from: device,
            message: msg,
            now,
        });
        if let Some(outcome) = self.host_actions(actions) {
            self.finish(outcome);
        }
    }

    fn tick(&mut self) {
        self.now += 500;
        let now = self.now;
        let due = matches!(&self.host.running, Some((m, _)) if m.due(now));
        if due {
            self.steps += 1;
            self.journal(Entry::Tick { now });
            let actions = self.host.running.as_mut().unwrap().0.on_tick(now);
            if let Some(outcome) = self.host_actions(actions) {
                self.finish(outcome);
            }
        }
    }

    fn carry_out(&mut self, i: usize, out: EdgeOutput) {
        let e = &mut self.edges[i];
        if out.persist {
            e.disk = Some(e.fleet.state_bytes());
        }
        e.events.extend(out.events);
        let topic = self.topics.up(&e.me.id);
        for m in out.send {
            let bytes = postcard::to_stdvec(&m).unwrap();
            let copies = if self.duplicate { 2 } else { 1 };
            for _ in 0..copies {
                self.uplinks_seen += 1;
                if self
                    .drop_every
                    .is_some_and(|n| self.uplinks_seen.is_multiple_of(n))
                {
                    continue;
                }
                self.uplink.push_back((topic.clone(), bytes.clone()));
            }
        }
    }

    /// One device step: the next message in its inbox, then training if it became ready.
    fn edge_step(&mut self, i: usize) {
        let Some((topic, payload)) = self.edges[i].inbox.pop_front() else {
            return;
        };
        let e = &mut self.edges[i];
        let out = match open_downlink(
            &self.topics,
            &mut e.trust,
            self.now / 1_000,
            &e.me.id,
            &topic,
            &payload,
            LIMIT,
        ) {
            None => EdgeOutput::default(),
            Some(Err(err)) => {
                let mut out = EdgeOutput::default();
                out.refused(&topic, &err);
                out
            }
            Some(Ok(message)) => {
                if e.fleet.is_training() {
                    e.received_while_training += 1;
                }
                e.fleet.on_downlink(message, &mut e.platform)
            }
        };
        self.carry_out(i, out);
        let e = &mut self.edges[i];
        if e.fleet.needs_snapshot() && !e.snapshot_subscribed {
            e.snapshot_subscribed = true;
            let parts: Vec<_> = self
                .retained
                .iter()
                .filter(|(t, _)| matches!(self.topics.route(t), Some(Route::Snapshot(_))))
                .map(|(t, p)| (t.clone(), p.clone()))
                .collect();
            self.edges[i].inbox.extend(parts);
        }
        let e = &mut self.edges[i];
        if e.fleet.has_training() {
            let steps = e.train_steps.get(e.trainings).copied().unwrap_or(0);
            e.trainings += 1;
            let out = match steps {
                0 => e.fleet.train_ready(&mut e.platform),
                steps => {
                    // Trained elsewhere (as `fedshield-edge run` does on its worker) for
                    // `steps` turns of the simulation.
                    let (job, out) = e.fleet.take_training();
                    e.job = job.map(|j| (j, steps));
                    out
                }
            };
            self.carry_out(i, out);
        }
    }

    /// One turn of the devices' worker threads: a training that is due finishes. True while
    /// any device trains.
    fn train_step(&mut self) -> bool {
        let mut busy = false;
        for i in 0..self.edges.len() {
            let e = &mut self.edges[i];
            let Some((job, left)) = e.job.take() else {
                continue;
            };
            busy = true;
            if left > 1 {
                e.job = Some((job, left - 1));
                continue;
            }
            let trained = e.platform.train(&job.config, &job.task, &job.global);
            let out = e.fleet.finish_training(job, trained, &mut e.platform);
            self.carry_out(i, out);
        }
        busy
    }

    /// Runs until the host has finished every round, calling `hook` before each host step
    /// (restarts, devices coming online). Panics if the fleet stalls.
    fn run(&mut self, mut hook: impl FnMut(&mut Sim)) {
        if self.host.running.is_none() {
            self.start_or_resume();
        }
        let mut idle = 0;
        while !self.host.fleet.finished() {
            assert!(idle < 2_000, "the fleet stalled at {:?}", self.host.fleet);
            let mut progressed = false;
            for i in 0..self.edges.len() {
                while !self.edges[i].inbox.is_empty() {
                    self.edge_step(i);
                    progressed = true;
                }
            }
            if let Some(msg) = self.uplink.pop_front() {
                hook(self);
                self.host_step(msg);
                progressed = true;
            }
            // A device still training holds the clock (its round waits for it) unless the
            // clock runs while devices train.
            let training = self.train_step();
            progressed |= training && !self.clock_runs;
            if !progressed {
                self.tick();
                idle += 1;
            } else {
                idle = 0;
            }
        }
        // The last round's global update reaches the devices.
        for _ in 0..4 {
            for i in 0..self.edges.len() {
                while !self.edges[i].inbox.is_empty() {
                    self.edge_step(i);
                }
            }
            while let Some((topic, payload)) = self.uplink.pop_front() {
                self.host
                    .fleet
                    .on_uplink(&topic, &payload, LIMIT, &self.registry);
            }
        }
    }

    fn online(mut self) -> Self {
        for i in 0..self.edges.len() {
            self.connect(i);
        }
        self
    }

    /// Every online device holds exactly the host's global adapter and history.
    fn assert_agreement(&self) {
        for e in self.edges.iter().filter(|e| e.online) {
            assert_eq!(
                e.fleet.global(),
                self.host.fleet.global(),
                "{} disagrees with the host",
                e.me.id
            );
            assert_eq!(
                e.fleet.pending_round(),
                None,
                "{} has an upload pending",
                e.me.id
            );
        }
    }

    fn contributors(&self) -> Vec<usize> {
        self.host
            .fleet
            .metrics()
            .iter()
            .map(|m| m.contributors)
            .collect()
    }

    fn losses(&self) -> Vec<f64> {
        self.host
            .fleet
            .metrics()
            .iter()
            .map(|m| m.eval_loss.unwrap_or(f64::NAN))
            .collect()
    }
}

#[test]
fn a_fleet_runs_its_rounds_and_every_device_ends_with_the_hosts_adapter() {
    let mut sim = Sim::new(3, 4).online();
    sim.run(|_| {});
    assert_eq!(sim.host.fleet.completed(), 4);
    assert_eq!(sim.contributors(), vec![3, 3, 3, 3]);
    sim.assert_agreement();
    // Every device reported on every round, and the global adapter improves each round.
    assert!(sim.host.fleet.reports_complete());
    let losses = sim.losses();
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
    for e in &sim.edges {
        let settled = e
            .events
            .iter()
            .filter(|ev| matches!(ev, Event::Settled { counted: true, .. }))
            .count();
        assert_eq!(settled, 4, "{}: {:?}", e.me.id, e.events);
    }
}

#[test]
fn duplicated_messages_change_nothing() {
    let mut clean = Sim::new(3, 3).online();
    clean.run(|_| {});
    let mut doubled = Sim::new(3, 3).online();
    doubled.duplicate = true;
    doubled.run(|_| {});
    doubled.assert_agreement();
    assert_eq!(doubled.contributors(), vec![3, 3, 3]);
    assert_eq!(doubled.host.fleet.global(), clean.host.fleet.global());
    assert_eq!(doubled.losses(), clean.losses());
}

/// Drops one uplink message in this many (a device's upload is a dozen messages).
const DROP_EVERY: usize = 29;

/// Devices that train off their message loop (as `fedshield-edge run` does, on a worker
/// thread) for several turns of the simulation, with messages arriving once or twice: what
/// comes meanwhile waits, and the fleet ends exactly where it ends when training is
/// instantaneous.
#[test]
fn devices_training_while_messages_arrive_end_exactly_where_instant_training_ends() {
    let mut clean = Sim::new(3, 3).online();
    clean.run(|_| {});
    for duplicate in [false, true] {
        let mut slow = Sim::new(3, 3).online();
        slow.duplicate = duplicate;
        for (e, steps) in slow.edges.iter_mut().zip([1, 7, 40]) {
            e.train_steps = vec![steps; 3];
        }
        slow.run(|_| {});
        slow.assert_agreement();
        assert_eq!(slow.contributors(), vec![3, 3, 3], "duplicate: {duplicate}");
        assert_eq!(slow.host.fleet.global(), clean.host.fleet.global());
        assert_eq!(slow.losses(), clean.losses());
        for e in &slow.edges {
            let trained = e
                .events
                .iter()
                .filter(|ev| matches!(ev, Event::Training { .. }))
                .count();
            assert_eq!(trained, 3, "{}", e.me.id);
        }
        assert!(
            slow.edges[2].received_while_training > 0,
            "the slowest device got nothing while it trained"
        );
    }
}

/// A device whose first training outlasts the upload deadline: the round closes without
/// it while it trains, and what the host publishes meanwhile (the closed round, its global
/// update) waits for the end of training; the device then keeps its update in the residual,
/// applies the global update it held (no snapshot needed) and contributes to the next rounds.
#[test]
fn a_device_slower_than_the_upload_deadline_sits_that_round_out_and_goes_on() {
    let mut sim = Sim::new(3, 3).online();
    sim.clock_runs = true;
    // 40 turns: past round 1's upload deadline (the clock ticks 0.5 s on idle turns), and
    // over before round 2's join phase closes.
    sim.edges[2].train_steps = vec![40];
    sim.run(|_| {});
    sim.assert_agreement();
    assert_eq!(sim.contributors(), vec![2, 3, 3]);
    let events = &sim.edges[2].events;
    assert!(
        events.contains(&Event::Settled {
            round: 1,
            counted: false
        }),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::CaughtUp { .. })),
        "the device needed the snapshot: {events:?}"
    );
    assert!(sim.edges[2].received_while_training > 0);
}

/// More host messages than a training device holds (replays, or a host far ahead): the
/// newest beyond [`MAX_DEFERRED`] are dropped, counted in an event, and the fleet finishes.
#[test]
fn a_training_device_holds_at_most_max_deferred_messages_and_counts_the_rest() {
    let mut sim = Sim::new(3, 2).online();
    sim.edges[0].train_steps = vec![20];
    let extra = 10;
    let mut flooded = false;
    sim.run(|sim| {
        let e = &mut sim.edges[0];
        if flooded || !e.fleet.is_training() {
            return;
        }
        flooded = true;
        for index in 0..(MAX_DEFERRED + extra) as u32 {
            // Parts of another federation: held, then ignored once training is over.
            let part = fedshield_protocol::messages::GlobalPart {
                epoch: 1,
                round: 1,
                contributors: vec![],
                index,
                parts: u32::MAX,
                offset: 0,
                values: fedshield_protocol::messages::GlobalValues::F32(vec![0.0]),
            };
            let out = e.fleet.on_global(part, &mut e.platform);
            assert!(out.send.is_empty() && out.events.is_empty());
        }
    });
    assert!(flooded, "device 0 never trained");
    sim.assert_agreement();
    assert_eq!(sim.contributors(), vec![3, 3]);
    let dropped: u64 = sim.edges[0]
        .events
        .iter()
        .filter_map(|ev| match ev {
            Event::DeferredDropped { count } => Some(*count),
            _ => None,
        })
        .sum();
    assert!(dropped >= extra as u64, "{dropped} dropped");
}

#[test]
fn lost_uplink_messages_fail_rounds_but_never_the_fleet() {
    let mut sim = Sim::new(3, 5).online();
    sim.drop_every = Some(DROP_EVERY);
    sim.run(|_| {});
    assert_eq!(sim.host.fleet.completed(), 5);
    let metrics = sim.host.fleet.metrics();
    assert!(
        metrics
            .iter()
            .all(|m| m.contributors >= 2 || m.failure.is_some()),
        "{metrics:?}"
    );
    assert!(metrics.iter().any(|m| m.contributors >= 2), "{metrics:?}");
    assert!(
        metrics.iter().any(|m| m.contributors < 3),
        "no message that mattered was lost: {metrics:?}"
    );
    sim.assert_agreement();
}

#[test]
fn a_host_restarted_at_any_step_finishes_every_round_with_its_devices_in_agreement() {
    let mut reference = Sim::new(3, 3).online();
    reference.run(|_| {});
    let total = reference.steps;
    for at in (1..total).step_by(7) {
        let mut sim = Sim::new(3, 3).online();
        let mut done = false;
        sim.run(|s| {
            if !done && s.steps == at {
                done = true;
                s.restart_host();
            }
        });
        assert_eq!(sim.host.fleet.completed(), 3, "restart at step {at}");
        assert_eq!(
            sim.contributors(),
            vec![3, 3, 3],
            "restart at step {at}: the journal resumes the round"
        );
        sim.assert_agreement();
        // Replaying the journal reproduces the round exactly.
        assert_eq!(
            sim.host.fleet.global(),
            reference.host.fleet.global(),
            "step {at}"
        );
    }
}

#[test]
fn a_host_restarted_without_its_journal_fails_that_round_and_its_devices_keep_their_updates() {
    let mut sim = Sim::new(3, 3).online();
    let mut done = false;
    sim.run(|s| {
        // Mid-round 2, after its uploads began: the journal is lost with the host.
        if !done && s.edges.iter().any(|e| e.fleet.pending_round() == Some(2)) {
            done = true;
            s.host.disk_journal = None;
            s.restart_host();
        }
    });
    assert!(done);
    // The interrupted round is recorded and does not count: three rounds still run.
    assert_eq!(sim.host.fleet.completed(), 3);
    let metrics = sim.host.fleet.metrics();
    assert_eq!(metrics.len(), 4, "{metrics:?}");
    assert_eq!(
        metrics[1].failure.as_deref(),
        Some("interrupted by a host restart")
    );
    assert_eq!(
        metrics
            .iter()
            .map(|m| (m.round, m.contributors))
            .collect::<Vec<_>>(),
        vec![(1, 3), (2, 0), (3, 3), (4, 3)]
    );
    sim.assert_agreement();
    // Devices that uploaded into the lost round settled it as not counted.
    let not_counted = sim
        .edges
        .iter()
        .filter(|e| {
            e.events.iter().any(|ev| {
                matches!(
                    ev,
                    Event::Settled {
                        round: 2,
                        counted: false
                    }
                )
            })
        })
        .count();
    assert!(not_counted > 0);
}

#[test]
fn a_device_restarted_at_any_step_settles_its_upload_exactly_once() {
    let mut reference = Sim::new(3, 3).online();
    reference.run(|_| {});
    for at in (1..reference.steps).step_by(5) {
        let mut sim = Sim::new(3, 3).online();
        let mut done = false;
        sim.run(|s| {
            if !done && s.steps == at {
                done = true;
                s.restart_edge(1);
            }
        });
        assert_eq!(sim.host.fleet.completed(), 3, "restart at step {at}");
        sim.assert_agreement();
        let settled: Vec<u64> = sim.edges[1]
            .events
            .iter()
            .filter_map(|ev| match ev {
                Event::Settled { round, .. } => Some(*round),
                _ => None,
            })
            .collect();
        let mut unique = settled.clone();
        unique.dedup();
        assert_eq!(
            unique, settled,
            "restart at step {at}: a round settled twice"
        );
    }
}

#[test]
fn a_late_joiner_catches_up_from_the_snapshot_and_contributes() {
    let mut sim = Sim::new(3, 4);
    sim.connect(0);
    sim.connect(1);
    sim.run(|s| {
        if !s.edges[2].online && s.host.fleet.completed() == 2 {
            s.connect(2);
        }
    });
    assert!(
        sim.edges[2]
            .events
            .iter()
            .any(|e| matches!(e, Event::CaughtUp { .. })),
        "{:?}",
        sim.edges[2].events
    );
    let contributors = sim.contributors();
    assert_eq!(&contributors[..2], &[2, 2]);
    assert_eq!(contributors[3], 3, "{contributors:?}");
    sim.assert_agreement();
}

#[test]
fn another_adapter_layout_is_refused_by_devices_and_by_the_host_state() {
    let mut sim = Sim::new(2, 1).online();
    let other = layout(8);
    // A device of another layout refuses the round and takes no part.
    let e = &mut sim.edges[1];
    e.fleet = EdgeFleet::new(e.me.clone(), other.clone(), vec![0.0; other.len()], 10);
    let state = sim.host.fleet.state_bytes();
    sim.run(|_| {});
    assert_eq!(sim.contributors(), vec![0]);
    assert!(
        sim.edges[1]
            .events
            .iter()
            .any(|e| matches!(e, Event::Refused { kind, .. } if kind == "other-layout")),
        "{:?}",
        sim.edges[1].events
    );
    // The host's state of one layout does not load for another.
    let refused = HostFleet::new(
        sim.settings.clone(),
        other.clone(),
        sim.topics.clone(),
        sim.host_signer(),
        Some(&state),
        0,
    )
    .unwrap_err();
    assert_eq!(refused, HostStateRefusal::OtherLayout);
    // Neither does a device's state, nor garbage; nothing changes.
    let mut fresh = EdgeFleet::new(
        sim.edges[0].me.clone(),
        other.clone(),
        vec![0.0; other.len()],
        10,
    );
    let before = fresh.state_bytes();
    assert!(fresh.restore(&sim.edges[0].fleet.state_bytes()).is_err());
    assert!(fresh.restore(b"\x01\x02garbage").is_err());
    assert_eq!(fresh.state_bytes(), before);
}

#[test]
fn devices_ahead_of_a_wiped_host_start_over_with_its_new_epoch_and_refuse_the_old_one() {
    let mut sim = Sim::new(3, 2).online();
    sim.run(|_| {});
    assert_eq!(sim.contributors(), vec![3, 3]);
    let old_round = sim.retained[&sim.topics.round()].clone();
    let old_epoch = sim.host.fleet.epoch();
    // The host's state and journal are lost; it starts a new federation later on.
    sim.now += 60_000;
    sim.host.disk_state = None;
    sim.host.disk_journal = None;
    sim.settings.rounds = 2;
    sim.restart_host();
    assert!(sim.host.fleet.epoch() > old_epoch);
    sim.run(|_| {});
    // Every device dropped the old federation and took part in both new rounds.
    assert_eq!(sim.contributors(), vec![3, 3]);
    sim.assert_agreement();
    for e in &sim.edges {
        assert!(
            e.events.iter().any(|ev| *ev
                == Event::Reset {
                    from: old_epoch,
                    to: sim.host.fleet.epoch()
                }),
            "{}: {:?}",
            e.me.id,
            e.events
        );
    }
    // A replay of the old federation's round state is refused; nothing changes.
    let before = sim.edges[0].fleet.state_bytes();
    let topic = sim.topics.round();
    sim.edges[0].inbox.push_back((topic.clone(), old_round));
    sim.edge_step(0);
    let e = &sim.edges[0];
    assert!(
        e.events
            .iter()
            .any(|ev| matches!(ev, Event::Refused { kind, .. } if kind == "stale-epoch")),
        "{:?}",
        e.events
    );
    assert_eq!(e.fleet.state_bytes(), before);
}

#[test]
fn a_rotated_host_key_reaches_the_devices_with_the_round_state_and_a_revoked_one_is_refused() {
    let mut sim = Sim::new(3, 2).online();
    sim.run(|_| {});
    assert_eq!(sim.contributors(), vec![3, 3], "{:?}", &sim.edges[0].events);
    let old_round = sim.retained[&sim.topics.round()].clone();
    // The operator rotates the host key: a new key, certificate 2 from the authority, and
    // a host restart (its state and journal kept). The devices learn it from the round
    // state and follow it into two more rounds.
    let authority = Identity::from_secret(sim.authority);
    let new_key = Identity::generate(&mut sim.rng);
    let cert = authority.certify_host("lab", new_key.public_key(), 2, u64::MAX);
    sim.signer = (new_key.secret(), cert.clone());
    sim.settings.rounds = 4;
    sim.restart_host();
    sim.run(|_| {});
    assert_eq!(sim.contributors(), vec![3, 3, 3, 3]);
    sim.assert_agreement();
    for e in &mut sim.edges {
        assert_eq!(e.trust.saved().certificate, cert, "{}", e.me.id);
        assert!(
            e.trust.take_changed(),
            "{} saves the new certificate",
            e.me.id
        );
    }
    // A host still running with the rotated-out key is refused, though its certificate
    // and its signatures are genuine.
    let before = sim.edges[0].fleet.state_bytes();
    let refused = |sim: &Sim, kind: &str| {
        sim.edges.iter().all(|e| {
            e.events
                .iter()
                .any(|ev| matches!(ev, Event::Refused { kind: k, .. } if k == kind))
        })
    };
    for i in 0..3 {
        sim.edges[i]
            .inbox
            .push_back((sim.topics.round(), old_round.clone()));
        sim.edge_step(i);
    }
    assert!(
        refused(&sim, "host-superseded"),
        "{:?}",
        sim.edges[0].events
    );
    assert_eq!(sim.edges[0].fleet.state_bytes(), before);
    // The authority revokes the new key; the host (restarted for a fifth round) shows the
    // list with its round state, and from then on the devices refuse everything it signs.
    sim.revocations = Some(RevocationList::default().revoke_host(&authority, new_key.public_key()));
    sim.settings.rounds = 5;
    sim.restart_host();
    for i in 0..3 {
        while !sim.edges[i].inbox.is_empty() {
            sim.edge_step(i);
        }
    }
    assert!(refused(&sim, "host-revoked"), "{:?}", sim.edges[0].events);
    assert_eq!(sim.edges[0].fleet.state_bytes(), before);
}

/// Devices of different speeds: a device slower than the round's training time stops at
/// it (the deadline-aware stop) and uploads the steps it has; from its reported pace the
/// host then gives it fewer steps; every member scales its delta by `tau_eff / steps` and
/// the host's metrics record each device's status, part, tokens and energy.
#[test]
fn a_slow_device_stops_at_the_deadline_then_gets_fewer_steps_and_energy_is_recorded() {
    let mut sim = Sim::with_settings(
        3,
        FleetSettings {
            local_steps: 4,
            ..settings(2)
        },
    )
    .online();
    for e in &mut sim.edges {
        e.platform.status.plan = Some("full-dense-mb4".into());
        e.platform.status.power_mode = Some("15W".into());
    }
    // 5 s of training per round (half the 10 s upload window): 4 steps at 1 s, 2 at 2 s.
    sim.edges[2].platform.seconds_per_step = 2.0;
    sim.run(|_| {});
    sim.assert_agreement();
    assert_eq!(sim.contributors(), vec![3, 3]);
    let encrypted = |i: usize| -> Vec<(usize, f64)> {
        sim.edges[i]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Encrypted { steps, scaled, .. } => Some((*steps, *scaled)),
                _ => None,
            })
            .collect()
    };
    // Round 1: everyone is given 4 steps (speeds unknown), edge-2 stops after 2 and counts
    // them as the round's 4. Round 2: edge-2 is given 2 steps; tau_eff = (4 + 4 + 2) / 3.
    let tau = 10.0 / 3.0;
    assert_eq!(encrypted(0)[0], (4, 1.0));
    assert_eq!(encrypted(2)[0], (2, 2.0));
    assert_eq!(encrypted(0)[1].0, 4);
    assert!((encrypted(0)[1].1 - tau / 4.0).abs() < 1e-12);
    assert_eq!(encrypted(2)[1].0, 2);
    assert!((encrypted(2)[1].1 - tau / 2.0).abs() < 1e-12);
    let metrics = sim.host.fleet.metrics();
    use fedshield_protocol::fleet::steps::Assignment;
    let edge2 = DeviceId("edge-2".into());
    assert_eq!(
        metrics[0].devices[&edge2].assignment,
        Assignment::Train { steps: 4 }
    );
    assert_eq!(
        metrics[1].devices[&edge2].assignment,
        Assignment::Train { steps: 2 }
    );
    assert_eq!(
        metrics[1].devices[&edge2].status.seconds_per_step,
        Some(2.0)
    );
    assert_eq!(
        metrics[1].devices[&edge2].status.plan.as_deref(),
        Some("full-dense-mb4")
    );
    assert_eq!(metrics[0].effective_steps, Some(4.0));
    assert!((metrics[1].effective_steps.unwrap() - tau).abs() < 1e-12);
    let r1 = &metrics[0].reports[&edge2];
    assert_eq!(
        r1.training.as_ref().unwrap().stopped,
        Some(Stopped::Deadline)
    );
    // 3 W while training: 4 s, 4 s and 4 s in round 1; 400 + 400 + 200 tokens.
    assert_eq!(metrics[0].trained_tokens, Some(1000));
    assert!((metrics[0].joules.unwrap() - 36.0).abs() < 1e-9);
    assert!((metrics[0].joules_per_token.unwrap() - 0.036).abs() < 1e-12);
    let json: serde_json::Value =
        serde_json::from_str(&sim.host.fleet.metrics_json("lab")).unwrap();
    assert_eq!(
        json["rounds"][1]["devices"]["edge-2"]["assignment"]["train"]["steps"],
        2
    );
}
