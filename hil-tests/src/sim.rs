//! The fleet simulator's devices (`fedshield-sim devices`): many enrolled devices in one
//! process, each with its own identity, broker connection and host trust, each running the
//! real edge protocol and cryptography ([`EdgeFleet`]: join, SecAgg, encoding with the
//! residual, encryption, chunked upload, applying the global update, evaluation reports).
//! Only the training is synthetic: [`Synthetic`] draws each round's delta instead of
//! training a model. [`Dropouts`] takes chosen devices out of chosen rounds at chosen
//! stages: such a device withholds that stage's message and everything after it in the
//! round, as a device that lost its power or network there would, and comes back for the
//! next round.
//!
//! One thread drives every device of the process in turn (each device's MQTT link runs
//! on a thread of its own); the CPU time of that thread is charged to the round of the
//! device it served, and every payload published or received is counted by kind.

use anyhow::Context;
use fedshield_codec::Layout;
use fedshield_crypto::identity::DeviceId;
use fedshield_crypto::secagg::ClientBody;
use fedshield_protocol::edge::EdgeIdentity;
use fedshield_protocol::fleet::edge::{EdgeFleet, EdgeOutput, Event, Platform, Trained};
use fedshield_protocol::fleet::steps::{DeviceStatus, Effort, Task};
use fedshield_protocol::keyfile::DeviceKey;
use fedshield_protocol::messages::{DownMessage, EdgeMessage, Phase, RoundConfig, Topics};
use fedshield_protocol::signed::{Downlink, HostTrust, open_downlink};
use fedshield_telemetry::process;
use fedshield_transport::{Incoming, Link, LinkConfig};
use rand::{Rng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A device's platform without a model: each round's delta is drawn from a generator
/// seeded by the device and the round (values uniform in `[-spread, spread]`), training
/// takes no time, and the held-out loss is a function of the global adapter.
pub struct Synthetic {
    index: u64,
    spread: f32,
    clock: Instant,
}

impl Synthetic {
    /// Device number `index`, deltas of magnitude at most `spread`.
    pub fn new(index: u64, spread: f32) -> Self {
        Self {
            index,
            spread,
            clock: Instant::now(),
        }
    }
}

impl Synthetic {
    /// Round `round`'s delta of `len` values.
    pub fn delta(&self, round: u64, len: usize) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.index.rotate_left(32) ^ round);
        (0..len)
            .map(|_| rng.random_range(-self.spread..=self.spread))
            .collect()
    }
}

impl Platform for Synthetic {
    fn train(
        &mut self,
        config: &RoundConfig,
        task: &Task,
        global: &[f32],
    ) -> Result<Trained, String> {
        Ok(Trained {
            delta: self.delta(config.round, global.len()),
            seconds: 0.0,
            last_loss: 1.0,
            effort: Effort {
                assigned: task.steps as u32,
                steps: task.steps as u32,
                tokens: 0,
                seconds: 0.0,
                throttled_seconds: 0.0,
                throttled_steps: 0,
                joules: None,
                stopped: None,
            },
        })
    }

    fn status(&mut self) -> DeviceStatus {
        DeviceStatus::default()
    }

    fn evaluate(&mut self, global: &[f32]) -> f64 {
        let head = &global[..global.len().min(4096)];
        2.0 + head.iter().map(|v| f64::from(v.abs())).sum::<f64>() / (head.len().max(1) as f64)
    }

    fn seconds(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn entropy(&mut self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        bytes
    }
}

/// Where in a round a device drops out: it withholds that stage's message and all after.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Never joins the round.
    Join,
    /// Joins, then sends no shares.
    Shares,
    /// Sends its shares, then neither its masked input nor its upload.
    Upload,
    /// Uploads, then answers neither the consistency check nor the unmasking.
    Unmask,
}

impl Stage {
    /// Every stage, in round order.
    pub const ALL: [Stage; 4] = [Stage::Join, Stage::Shares, Stage::Upload, Stage::Unmask];

    /// The stage a message belongs to; `None` for evaluation reports (of the previous
    /// round's global adapter), which are never withheld.
    pub fn of(message: &EdgeMessage) -> Option<Stage> {
        Some(match message {
            EdgeMessage::Join { .. } => Stage::Join,
            EdgeMessage::SecAgg(m) => match &m.body {
                ClientBody::Advertise(_) => Stage::Join,
                ClientBody::Shares(_) => Stage::Shares,
                ClientBody::MaskedInput { .. } => Stage::Upload,
                ClientBody::Consistency(_) | ClientBody::Unmask { .. } => Stage::Unmask,
            },
            EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) => Stage::Upload,
            EdgeMessage::Evaluated(_) => return None,
        })
    }

    /// The stage's name in the records.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Join => "join",
            Stage::Shares => "shares",
            Stage::Upload => "upload",
            Stage::Unmask => "unmask",
        }
    }
}

/// Which devices drop out of which rounds, where: a device drops out of a round when a
/// hash of (seed, device, round) falls below `rate`; the stage is another draw of the same
/// hash among `stages`. Deterministic: the same seed drops the same devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropouts {
    /// Fraction of devices dropping out of each round.
    pub rate: f64,
    /// Stages to drop at (drawn uniformly).
    pub stages: Vec<Stage>,
    /// The draw's seed.
    pub seed: u64,
}

impl Dropouts {
    /// Nobody drops out.
    pub fn none() -> Self {
        Self {
            rate: 0.0,
            stages: Stage::ALL.to_vec(),
            seed: 0,
        }
    }

    /// Where `device` drops out of `round`, if it does.
    pub fn plan(&self, device: &DeviceId, round: u64) -> Option<Stage> {
        if self.rate <= 0.0 || self.stages.is_empty() {
            return None;
        }
        let mut h = self.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in device.0.bytes() {
            h = splitmix(h ^ u64::from(b));
        }
        let h = splitmix(h);
        let draw = (h >> 11) as f64 / (1u64 << 53) as f64;
        (draw < self.rate).then(|| self.stages[(splitmix(h) % self.stages.len() as u64) as usize])
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the simulated devices of one process did in one round.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundStats {
    /// CPU seconds of the driver thread serving the devices in this round (protocol,
    /// signatures, secure aggregation, encoding, encryption, applying the global update).
    pub device_cpu_s: f64,
    /// Devices that dropped out, by stage.
    pub dropped: BTreeMap<String, usize>,
    /// Payload bytes the devices published, by kind.
    pub up_bytes: BTreeMap<String, u64>,
    /// Payload bytes the devices received, by kind.
    pub down_bytes: BTreeMap<String, u64>,
    /// Devices whose upload this round was encrypted.
    pub encrypted: usize,
    /// Messages refused by the devices, by refusal kind.
    pub refused: BTreeMap<String, usize>,
}

impl RoundStats {
    /// Adds another process's figures.
    pub fn merge(&mut self, other: &RoundStats) {
        self.device_cpu_s += other.device_cpu_s;
        self.encrypted += other.encrypted;
        for (mine, theirs) in [
            (&mut self.dropped, &other.dropped),
            (&mut self.refused, &other.refused),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
        for (mine, theirs) in [
            (&mut self.up_bytes, &other.up_bytes),
            (&mut self.down_bytes, &other.down_bytes),
        ] {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
    }
}

/// One simulator process's record (`fedshield-sim devices --stats FILE`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SimStats {
    /// Devices simulated.
    pub devices: usize,
    /// Per round.
    pub rounds: BTreeMap<u64, RoundStats>,
    /// CPU seconds of the whole process (the links' threads included).
    pub process_cpu_s: f64,
    /// Peak resident set of the process, MiB.
    pub peak_rss_mib: f64,
    /// Incoming messages the links dropped (their budget full).
    pub link_dropped: u64,
    /// Whether every device finished its rounds (else the run timed out).
    pub finished: bool,
}

/// What `devices` simulates.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Fleet name.
    pub fleet: String,
    /// The broker's link settings (address, packet limit); each device gets its own.
    pub link: fedshield_transport::BrokerArgs,
    /// The devices' key files (from `fedshield-host enrol`).
    pub keys: Vec<PathBuf>,
    /// The fleet's adapter layout.
    pub layout: Layout,
    /// Leave after this round's global update.
    pub rounds: u64,
    /// Who drops out where.
    pub dropouts: Dropouts,
    /// Write each round's encoded update to DIR/round-{r}-{device}.json (as
    /// `fedshield-edge run --audit-dir`).
    pub audit_dir: Option<PathBuf>,
    /// Give up after this long.
    pub timeout: Duration,
}

struct SimDevice {
    me: DeviceId,
    fleet: EdgeFleet,
    trust: HostTrust,
    link: Link,
    platform: Synthetic,
    drops: fedshield_transport::DropMonitor,
    /// The newest round seen.
    round: u64,
    /// Withholding everything of this round (dropped out of it).
    silent: Option<u64>,
    snapshot_subscribed: bool,
    done: bool,
}

/// The kind of a device's message, for the byte counts.
fn up_kind(message: &EdgeMessage) -> &'static str {
    match message {
        EdgeMessage::Join { .. } => "join",
        EdgeMessage::SecAgg(m) => match &m.body {
            ClientBody::Advertise(_) => "join",
            ClientBody::Shares(_) => "shares",
            ClientBody::MaskedInput { .. } => "masked-input",
            ClientBody::Consistency(_) => "consistency",
            ClientBody::Unmask { .. } => "unmask",
        },
        EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_) => "upload",
        EdgeMessage::Evaluated(_) => "report",
    }
}

fn down_kind(message: &Downlink) -> &'static str {
    match message {
        Downlink::Round(_) => "round",
        Downlink::Down(DownMessage::Shares(_)) => "shares",
        Downlink::Down(DownMessage::UploadRefused { .. }) => "refusal",
        Downlink::Down(DownMessage::Resend { .. }) => "resend",
        Downlink::Global(_) => "global",
        Downlink::Snapshot(_) => "snapshot",
    }
}

struct Shared<'a> {
    cfg: &'a SimConfig,
    topics: &'a Topics,
    stats: &'a mut SimStats,
}

impl Shared<'_> {
    fn round(&mut self, round: u64) -> &mut RoundStats {
        self.stats.rounds.entry(round).or_default()
    }
}

impl SimDevice {
    fn start(
        index: u64,
        key_path: &Path,
        cfg: &SimConfig,
        topics: &Topics,
    ) -> anyhow::Result<Self> {
        let key = DeviceKey::parse(
            &std::fs::read_to_string(key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
        )
        .with_context(|| key_path.display().to_string())?;
        let (secret, authority) = key.keys()?;
        let host = key.host_certificate()?;
        let trust = HostTrust::new(authority, &cfg.fleet, host, None)
            .with_context(|| key_path.display().to_string())?;
        let me = key.device.clone();
        let platform = Synthetic::new(index, 0.02);
        let fleet = EdgeFleet::new(
            EdgeIdentity {
                id: me.clone(),
                secret,
                authority,
            },
            cfg.layout.clone(),
            vec![0.0; cfg.layout.len()],
            100 + index % 100,
        );
        let config: LinkConfig = cfg.link.link_config(
            format!("fedshield-sim-{}-{}", cfg.fleet, me.0),
            vec![topics.round(), topics.down(&me), topics.all_global()],
            Some((topics.status(&me), b"offline".to_vec())),
            Some((topics.status(&me), b"online".to_vec())),
        )?;
        Ok(Self {
            me,
            fleet,
            trust,
            link: Link::start(config)?,
            platform,
            drops: Default::default(),
            round: 0,
            silent: None,
            snapshot_subscribed: false,
            done: false,
        })
    }

    /// Serves the device: what its link holds (a few messages at most, so that every
    /// device gets its turn), then training if a round is ready. True if it did anything.
    fn serve(&mut self, shared: &mut Shared) -> anyhow::Result<bool> {
        let mut handled = 0;
        while handled < 8 {
            let Some(incoming) = self.link.recv(Duration::ZERO)? else {
                break;
            };
            handled += 1;
            self.on_incoming(incoming, shared)?;
        }
        let check = self
            .drops
            .check(self.link.dropped(), self.platform.seconds(), handled == 0);
        if check.recover {
            self.link.resubscribe()?;
            if self.snapshot_subscribed {
                self.link.subscribe(&shared.topics.all_snapshot())?;
            }
        }
        if self.fleet.needs_snapshot() != self.snapshot_subscribed {
            self.snapshot_subscribed = self.fleet.needs_snapshot();
            if self.snapshot_subscribed {
                self.link.subscribe(&shared.topics.all_snapshot())?;
            } else {
                self.link.unsubscribe(&shared.topics.all_snapshot())?;
            }
        }
        if self.silent.is_none() && self.fleet.has_training() {
            let out = self.fleet.train_ready(&mut self.platform);
            self.carry_out(out, shared)?;
            handled += 1;
        }
        Ok(handled > 0)
    }

    fn on_incoming(&mut self, incoming: Incoming, shared: &mut Shared) -> anyhow::Result<()> {
        let (topic, payload) = match incoming {
            Incoming::Message { topic, payload } if !payload.is_empty() => (topic, payload),
            Incoming::Connected => {
                self.snapshot_subscribed = false;
                return Ok(());
            }
            _ => return Ok(()),
        };
        let opened = open_downlink(
            shared.topics,
            &mut self.trust,
            fedshield_store::unix_seconds(),
            &self.me,
            &topic,
            &payload,
            shared.cfg.link.max_packet_bytes,
        );
        self.trust.take_changed();
        let message = match opened {
            None => return Ok(()),
            Some(Err(e)) => {
                *shared
                    .round(self.round)
                    .refused
                    .entry(e.kind().to_string())
                    .or_default() += 1;
                return Ok(());
            }
            Some(Ok(m)) => m,
        };
        *shared
            .round(self.round)
            .down_bytes
            .entry(down_kind(&message).to_string())
            .or_default() += payload.len() as u64;
        if let Downlink::Round(state) = &message {
            let round = state.config.round;
            match self.silent {
                // Back for the next round: the retained global update comes again.
                Some(r) if round > r => {
                    self.silent = None;
                    self.link.resubscribe()?;
                }
                Some(_) => return Ok(()),
                None => {}
            }
            self.round = self.round.max(round);
            if matches!(state.phase, Phase::Failed { .. }) && round >= shared.cfg.rounds {
                self.done = true;
            }
        } else if self.silent.is_some() {
            return Ok(());
        }
        let out = self.fleet.on_downlink(message, &mut self.platform);
        self.carry_out(out, shared)
    }

    /// Publishes what the fleet asks (unless the device dropped out of the round there),
    /// writes audits, and counts.
    fn carry_out(&mut self, out: EdgeOutput, shared: &mut Shared) -> anyhow::Result<()> {
        let round = self.round;
        for event in &out.events {
            match event {
                Event::Refused { kind, .. } => {
                    *shared.round(round).refused.entry(kind.clone()).or_default() += 1;
                }
                Event::Encrypted { .. } => shared.round(round).encrypted += 1,
                Event::Evaluated { round, .. } | Event::CaughtUp { round }
                    if *round >= shared.cfg.rounds =>
                {
                    self.done = true;
                }
                _ => {}
            }
        }
        if let Some(dir) = &shared.cfg.audit_dir {
            for audit in &out.audits {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("round-{}-{}.json", audit.round, audit.device));
                std::fs::write(&path, serde_json::to_vec(audit)?)?;
            }
        }
        let plan = shared.cfg.dropouts.plan(&self.me, round);
        for message in out.send {
            if self.silent.is_some() {
                break;
            }
            if let (Some(stage), Some(at)) = (Stage::of(&message), plan)
                && stage >= at
            {
                self.silent = Some(round);
                *shared
                    .round(round)
                    .dropped
                    .entry(at.name().to_string())
                    .or_default() += 1;
                if round >= shared.cfg.rounds {
                    self.done = true;
                }
                break;
            }
            let bytes = postcard::to_stdvec(&message)?;
            *shared
                .round(round)
                .up_bytes
                .entry(up_kind(&message).to_string())
                .or_default() += bytes.len() as u64;
            let topic = self.fleet.uplink_topic(shared.topics, &message);
            self.link.publish(&topic, bytes, false)?;
        }
        Ok(())
    }
}

/// Runs the devices of `cfg` until each has finished its rounds (applied the last
/// round's global update, or dropped out of the last round) or `cfg.timeout` passes.
pub fn run_devices(cfg: &SimConfig) -> anyhow::Result<SimStats> {
    let topics = Topics::new(&cfg.fleet)?;
    let cpu_start = process::process_cpu();
    let mut devices = Vec::with_capacity(cfg.keys.len());
    for (i, key) in cfg.keys.iter().enumerate() {
        let index = key_index(key).unwrap_or(i as u64);
        devices.push(SimDevice::start(index, key, cfg, &topics)?);
    }
    let mut stats = SimStats {
        devices: devices.len(),
        ..SimStats::default()
    };
    let started = Instant::now();
    loop {
        let mut busy = false;
        for device in devices.iter_mut().filter(|d| !d.done) {
            let cpu = process::thread_cpu();
            let round = device.round;
            let mut shared = Shared {
                cfg,
                topics: &topics,
                stats: &mut stats,
            };
            if device.serve(&mut shared)? {
                busy = true;
                // Charged to the round the device was in when served.
                let spent = process::thread_cpu().saturating_sub(cpu).as_secs_f64();
                shared.round(round.max(1)).device_cpu_s += spent;
            }
        }
        if devices.iter().all(|d| d.done) {
            stats.finished = true;
            break;
        }
        if started.elapsed() > cfg.timeout {
            let left: Vec<&str> = devices
                .iter()
                .filter(|d| !d.done)
                .map(|d| d.me.0.as_str())
                .take(10)
                .collect();
            tracing::warn!(
                "timed out after {:?} with {} devices unfinished ({}...)",
                cfg.timeout,
                devices.iter().filter(|d| !d.done).count(),
                left.join(", ")
            );
            break;
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Let the last messages (evaluation reports) leave.
    std::thread::sleep(Duration::from_millis(500));
    stats.link_dropped = devices.iter().map(|d| d.link.dropped()).sum();
    for d in &devices {
        d.link.disconnect();
    }
    stats.process_cpu_s = process::process_cpu()
        .saturating_sub(cpu_start)
        .as_secs_f64();
    stats.peak_rss_mib = process::peak_rss().unwrap_or(0) as f64 / f64::from(1 << 20);
    Ok(stats)
}

/// The number in a key file named `edge-{i}.json`.
fn key_index(path: &Path) -> Option<u64> {
    path.file_stem()?
        .to_str()?
        .strip_prefix("edge-")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropouts_take_about_the_rate_and_the_same_devices_for_the_same_seed() {
        let plan = Dropouts {
            rate: 0.1,
            stages: Stage::ALL.to_vec(),
            seed: 7,
        };
        let ids: Vec<DeviceId> = (0..4_000).map(|i| DeviceId(format!("edge-{i}"))).collect();
        let dropped: Vec<Option<Stage>> = ids.iter().map(|d| plan.plan(d, 3)).collect();
        let n = dropped.iter().flatten().count();
        assert!((340..460).contains(&n), "{n} of 4000 dropped at rate 0.1");
        for stage in Stage::ALL {
            let at = dropped.iter().flatten().filter(|s| **s == stage).count();
            assert!(at > 60, "{at} at {stage:?}");
        }
        assert_eq!(
            dropped,
            ids.iter().map(|d| plan.plan(d, 3)).collect::<Vec<_>>()
        );
        // Another round drops other devices.
        let next: Vec<Option<Stage>> = ids.iter().map(|d| plan.plan(d, 4)).collect();
        assert_ne!(dropped, next);
        assert!(ids.iter().all(|d| Dropouts::none().plan(d, 3).is_none()));
        let only = Dropouts {
            stages: vec![Stage::Upload],
            ..plan
        };
        assert!(
            ids.iter()
                .filter_map(|d| only.plan(d, 3))
                .all(|s| s == Stage::Upload)
        );
    }

    #[test]
    fn synthetic_deltas_are_bounded_and_differ_by_device_and_round() {
        let a = Synthetic::new(1, 0.02);
        let b = Synthetic::new(2, 0.02);
        let a1 = a.delta(1, 1000);
        assert_eq!(a1.len(), 1000);
        assert!(a1.iter().all(|v| v.abs() <= 0.02));
        assert!(a1.iter().any(|v| v.abs() > 0.01));
        assert_eq!(a1, a.delta(1, 1000));
        assert_ne!(a1, b.delta(1, 1000));
        assert_ne!(a1, a.delta(2, 1000));
        let mut a = a;
        assert!(a.evaluate(&a1).is_finite());
    }
}
