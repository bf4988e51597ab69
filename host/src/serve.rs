//! `fedshield-host serve`: the host's MQTT driver. The federation across rounds is the
//! protocol's [`HostFleet`] and each round its [`HostRound`]; this module moves their
//! messages over the broker, keeps the round journal and `state.bin`, tells the time, and
//! writes the PEFT adapter, `metrics.json` and a loss plot after every round.

use crate::records::{JournalFile, write_audit};
use anyhow::Context;
use fedshield_codec::{DEFAULT_LORA_DROPOUT, Layout, PeftConfig};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::{DeviceId, Registry};
use fedshield_host::fleet::FleetDir;
use fedshield_protocol::ProtocolError;
use fedshield_protocol::fleet::host::{
    FleetSettings, HostEvent, HostFleet, Publish, Sealed, Uplink,
};
use fedshield_protocol::host::{
    Deadlines, HostAction, HostRound, RoundResult, expected_update_bytes,
};
use fedshield_protocol::journal::{self, Entry, Replayed};
use fedshield_protocol::messages::{EdgeMessage, Route, Topics};
use fedshield_protocol::shard::ShardUplink;
use fedshield_protocol::signed::HostSigner;
use fedshield_store::JsonLines;
use fedshield_telemetry::process::{self, Stages};
use fedshield_transport::{BrokerArgs, Incoming, Link};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Fleet name (topic level).
    pub fleet: String,
    /// Fleet directory (authority, registry).
    pub fleet_dir: FleetDir,
    /// Broker address, credentials, TLS and packet limit.
    pub broker: BrokerArgs,
    /// The adapter layout.
    pub layout: Layout,
    /// LoRA hyper-parameters for the PEFT adapter_config.json: (r, alpha, targets).
    pub peft: (usize, f64, Vec<String>),
    /// Base model name or path recorded in the adapter.
    pub base_model: String,
    /// The federation's settings (rounds, pruning, clip, body width, local steps,
    /// threshold, chunk size, seed).
    pub settings: FleetSettings,
    /// Phase deadlines.
    pub deadlines: Deadlines,
    /// Output folder: adapter/, metrics.json, loss.svg, state.bin.
    pub out: PathBuf,
    /// Seconds to wait for the last round's evaluation reports.
    pub report_wait: Duration,
    /// Where to write each round's decrypted sums (`round-{r}.json`), for audits and the
    /// end-to-end tests; the host learns them anyway (they are the global update).
    pub audit_dir: Option<PathBuf>,
    /// Where to append what the host did and refused, one JSON object per line
    /// (`fedshield_protocol::fleet::host::HostEvent`).
    pub events: Option<PathBuf>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A round under way: its machine, its journal, when it started, and its outcome once over.
type Running = (
    HostRound,
    JournalFile,
    u64,
    Option<Result<RoundResult, String>>,
);

struct Host {
    cfg: ServeConfig,
    topics: Topics,
    link: Link,
    fleet: HostFleet,
    /// The registry as of the current round (checks the devices' evaluation reports).
    registry: Registry,
    /// The serial of the revocation list in force: a list with a lower one (which could
    /// un-revoke a device) is refused.
    revocation_serial: u64,
    /// The event file, if any.
    events: Option<JsonLines>,
    drops: fedshield_transport::DropMonitor,
    /// When serving began (the drop reports' clock).
    started: Instant,
}

/// Runs the federation; returns the paths of the adapter, the plot and metrics.json.
pub fn serve(cfg: ServeConfig) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let topics = Topics::new(&cfg.fleet)?;
    std::fs::create_dir_all(&cfg.out)?;
    let state_path = cfg.out.join("state.bin");
    let (identity, certificate) = cfg.fleet_dir.host(&cfg.fleet)?;
    let (registry, revocations) = cfg.fleet_dir.registry()?;
    let host_cert_path = cfg.fleet_dir.host_cert_path();
    // Devices refuse a host whose certificate expired or whose key is revoked: so does
    // the host itself, before it starts.
    anyhow::ensure!(
        !revocations.hosts.contains(&certificate.public_key),
        "{}: this host's key is revoked by revocation list {}: make a new key \
         (`fedshield-host keygen`) and have the authority certify it",
        host_cert_path.display(),
        revocations.serial
    );
    certificate
        .check_time(fedshield_store::unix_seconds())
        .with_context(|| host_cert_path.display().to_string())?;
    let mut signer = HostSigner::new(identity, certificate)?;
    signer.set_revocations(revocations.clone());
    // Checked here so that a bad clip stops the host before any round.
    FixedPoint::new(cfg.settings.clip)?;
    // Only a missing state starts fresh; one that does not read stops the host, untouched.
    let saved = fedshield_store::read_existing(&state_path)?;
    let fleet = HostFleet::new(
        cfg.settings.clone(),
        cfg.layout.clone(),
        topics.clone(),
        signer,
        saved.as_deref(),
        now_ms(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}; move it away to start the federation afresh",
            state_path.display()
        )
    })?;
    if saved.is_some() {
        tracing::info!(
            "resuming after round {} from {}",
            fleet.completed(),
            state_path.display()
        );
    }
    let link = held_link(
        &cfg.broker,
        format!("fedshield-host-{}", cfg.fleet),
        // Every device's uplink, and the fold workers' reports (of a sharded round).
        vec![topics.all_up(), topics.all_fold_reports()],
    )?;
    let events = cfg.events.as_deref().map(JsonLines::open).transpose()?;
    let mut host = Host {
        topics,
        cfg,
        link,
        fleet,
        registry,
        revocation_serial: revocations.serial,
        events,
        drops: Default::default(),
        started: Instant::now(),
    };
    host.wait_connected()?;
    host.publish(host.fleet.retained())?;
    while !host.fleet.finished() {
        host.run_round()?;
    }
    host.collect_reports()?;
    let paths = host.write_outputs()?;
    host.event(HostEvent::Finished {
        rounds: host.fleet.completed(),
    });
    host.link.disconnect();
    Ok(paths)
}

/// The host's (and a fold worker's) broker link: uploads from a whole fleet at once wait
/// at the broker until the process takes them, instead of overflowing its budget (and
/// costing a re-publish of the round); so a small budget does (8 packets, not 64).
pub(crate) fn held_link(
    broker: &BrokerArgs,
    client_id: String,
    subscriptions: Vec<String>,
) -> anyhow::Result<Link> {
    let mut link_config = broker.link_config(client_id, subscriptions, None, None)?;
    link_config.overflow = fedshield_transport::Overflow::Hold;
    if broker.incoming_budget.is_none() {
        link_config.incoming_budget = broker.max_packet_bytes.saturating_mul(8);
    }
    Ok(Link::start(link_config)?)
}

impl Host {
    /// Reports the link's drops (see `DropMonitor`); true when the round should be
    /// re-published for them now.
    fn check_drops(&mut self, round: u64, idle: bool) -> bool {
        let now = self.started.elapsed().as_secs_f64();
        let check = self.drops.check(self.link.dropped(), now, idle);
        if let Some(total) = check.report {
            tracing::warn!(
                "round {round}: {total} incoming messages dropped so far (more than the link's budget came at once)"
            );
            self.event(HostEvent::LinkDropped { round, total });
        }
        check.recover
    }

    /// Records an event; a failure to write it is logged and the host goes on.
    fn event(&mut self, event: HostEvent) {
        if let Some(file) = &mut self.events
            && let Err(e) = file.append(&event)
        {
            tracing::warn!("event not recorded: {e}");
        }
    }

    fn wait_connected(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.link.recv(Duration::from_millis(200))? {
                Some(Incoming::Connected) => return Ok(()),
                Some(Incoming::Disconnected(e)) => tracing::warn!("broker: {e}"),
                _ => {}
            }
        }
        anyhow::bail!(
            "no connection to the broker at {} within 30 s",
            self.cfg.broker.broker
        )
    }

    fn publish(&self, publish: Vec<Publish>) -> anyhow::Result<()> {
        for p in publish {
            self.link.publish(&p.topic, p.payload, p.retain)?;
        }
        Ok(())
    }

    /// Publishes the round machine's actions; returns the round's outcome when it ended.
    fn execute(
        &mut self,
        round: u64,
        actions: Vec<HostAction>,
    ) -> anyhow::Result<Option<Result<RoundResult, String>>> {
        let Sealed {
            publish,
            deliveries,
            refused,
            left_out,
            resent,
            outcome,
        } = self.fleet.seal(actions);
        for (device, reason) in left_out {
            tracing::info!("round {round}: {device} sits this round out ({reason})");
            self.event(HostEvent::LeftOut {
                round,
                device,
                reason,
            });
        }
        self.publish(publish)?;
        if deliveries > 0 {
            tracing::info!("share deliveries published to {deliveries} members; uploads open");
            self.event(HostEvent::UploadsOpen {
                round,
                members: deliveries,
            });
        }
        if resent > 0 {
            tracing::info!(
                "round {round}: a fold worker (re)started; {resent} devices asked to send their uploads again"
            );
            self.event(HostEvent::UploadsResent {
                round,
                devices: resent,
            });
        }
        for (device, round, reason) in refused {
            tracing::warn!(
                "round {round}: dropped the upload of {device} ({reason}); told the device"
            );
            self.event(HostEvent::UploadDropped {
                round,
                device,
                reason,
            });
        }
        Ok(outcome)
    }

    fn refused(&mut self, device: Option<&DeviceId>, e: &ProtocolError) {
        match device {
            Some(d) => tracing::warn!("refused a message from {d}: {e}"),
            None => tracing::warn!("ignored {e}"),
        }
        self.event(HostEvent::refused(device, e));
    }

    /// Sorts an uplink message: reports are recorded here, round messages returned.
    fn route(&mut self, topic: &str, payload: &[u8]) -> Option<(DeviceId, EdgeMessage)> {
        match self.fleet.on_uplink(
            topic,
            payload,
            self.cfg.broker.max_packet_bytes,
            &self.registry,
        ) {
            Uplink::Round(device, msg) => Some((device, msg)),
            Uplink::Report {
                device,
                round,
                report,
            } => {
                tracing::info!(
                    "round {round}: {device} reports held-out loss {:.4} of the global adapter (encrypted in {:.2} s)",
                    report.eval_loss,
                    report.encrypt_seconds
                );
                if let Some(e) = &report.training {
                    tracing::info!(
                        "round {round}: {device} trained {} of {} steps, {} tokens in {:.1} s ({:.1} s throttled){}{}",
                        e.steps,
                        e.assigned,
                        e.tokens,
                        e.seconds,
                        e.throttled_seconds,
                        e.joules
                            .map(|j| format!(
                                ", {j:.1} J ({:.4} J/token)",
                                e.joules_per_token().unwrap_or(0.0)
                            ))
                            .unwrap_or_default(),
                        e.stopped
                            .map(|s| format!(", stopped early: {s:?}"))
                            .unwrap_or_default(),
                    );
                }
                self.event(HostEvent::Reported {
                    round,
                    device,
                    eval_loss: report.eval_loss,
                });
                None
            }
            Uplink::Refused(device, e) => {
                self.refused(device.as_ref(), &e);
                None
            }
        }
    }

    fn journal_path(&self) -> PathBuf {
        self.cfg.out.join("round.journal")
    }

    /// Replaces the journalled messages of the folded uploads with `checkpoint`.
    fn compact_journal(
        &mut self,
        round: u64,
        checkpoint: fedshield_protocol::host::FoldCheckpoint,
    ) -> anyhow::Result<JournalFile> {
        let path = self.journal_path();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (entries, _) = journal::read(&bytes)?;
        let folded = checkpoint.folded.len();
        let compacted = journal::compact(&entries, checkpoint);
        let file = JournalFile::rewrite(&path, &compacted)?;
        let after = std::fs::metadata(&path).map_or(0, |m| m.len());
        tracing::info!(
            "round journal compacted: {folded} folded uploads checkpointed, {} -> {after} bytes",
            bytes.len(),
        );
        self.event(HostEvent::JournalCompacted {
            round,
            folded,
            bytes_before: bytes.len() as u64,
            bytes_after: after,
        });
        Ok(file)
    }

    /// Rebuilds the interrupted round `round` from its journal, if there is one that replays.
    fn resume(&self, round: u64) -> Option<(Replayed, u64, JournalFile)> {
        let path = self.journal_path();
        let bytes = std::fs::read(&path).ok()?;
        let attempt = || -> anyhow::Result<(Replayed, u64, JournalFile)> {
            let (entries, valid) = journal::read(&bytes)?;
            let Some(Entry::Start { config, now, .. }) = entries.first() else {
                anyhow::bail!("the journal has no start record");
            };
            anyhow::ensure!(
                config.round == round,
                "the journal is of round {}",
                config.round
            );
            let started = *now;
            let replayed = journal::replay(&entries, self.cfg.fleet_dir.registry()?.0)?;
            Ok((replayed, started, JournalFile::reopen(&path, valid as u64)?))
        };
        attempt()
            .inspect_err(|e| {
                tracing::warn!(
                    "round {round} cannot be resumed from {}: {e:#}",
                    path.display()
                )
            })
            .ok()
    }

    /// Reads the fleet directory's certificates and revocation list again, so that a
    /// device enrolled or revoked since takes part or is refused from this round on. A
    /// directory that does not read, or a revocation list older than the one in force,
    /// is reported and the registry in force is kept.
    fn reload_registry(&mut self) {
        match self.cfg.fleet_dir.registry() {
            Ok((_, list)) if list.serial < self.revocation_serial => tracing::error!(
                "{}: revocation list {} is older than the one in force ({}): refused, the registry is unchanged",
                self.cfg.fleet_dir.revocations_path().display(),
                list.serial,
                self.revocation_serial
            ),
            Ok((registry, list)) => {
                if list.serial > self.revocation_serial {
                    tracing::warn!(
                        "revocation list {}: {} device(s) revoked ({})",
                        list.serial,
                        list.revoked.len(),
                        list.revoked
                            .iter()
                            .map(|d| d.0.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if list.serial > self.revocation_serial
                    && list.hosts.contains(&self.fleet.host_key())
                {
                    tracing::error!(
                        "revocation list {} revokes this host's key: devices refuse it from now on; \
                         make a new key (`fedshield-host keygen`), have the authority certify it \
                         and restart the host",
                        list.serial
                    );
                }
                self.revocation_serial = list.serial;
                self.registry = registry;
                self.fleet.set_revocations(list);
            }
            Err(e) => tracing::error!(
                "the fleet directory does not read ({e}): the registry in force is kept"
            ),
        }
    }

    /// Takes a renewed certificate of this host's key from host.json (a higher serial,
    /// the same key: no restart needed), and says when the one in force is running out.
    fn reload_certificate(&mut self) {
        let now = fedshield_store::unix_seconds();
        match self.cfg.fleet_dir.host(&self.cfg.fleet) {
            Ok((_, cert)) if cert.serial > self.fleet.host_certificate().serial => {
                if cert.public_key != self.fleet.host_key() {
                    tracing::error!(
                        "host certificate {} certifies another key: restart the host to rotate to it",
                        cert.serial
                    );
                } else if let Err(e) = cert.check_time(now) {
                    tracing::error!("renewed host certificate refused: {e}");
                } else {
                    tracing::info!(
                        "host certificate {} (valid until {}) replaces {}",
                        cert.serial,
                        cert.not_after,
                        self.fleet.host_certificate().serial
                    );
                    if let Err(e) = self.fleet.renew_certificate(cert) {
                        tracing::error!("renewed host certificate refused: {e}");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(
                "the host certificate does not read ({e}): the one in force is kept"
            ),
        }
        let cert = self.fleet.host_certificate();
        let left = cert.not_after.saturating_sub(now);
        if left == 0 {
            tracing::error!(
                "host certificate {} has expired: devices refuse this host until the authority \
                 certifies it again (`fedshield-host authority certify-host`)",
                cert.serial
            );
        } else if left < 14 * 86_400 {
            tracing::warn!(
                "host certificate {} expires in {} hours: have the authority certify the host again",
                cert.serial,
                left / 3_600
            );
        }
    }

    /// Starts the next round: announces it, journals its start and publishes its state.
    fn start_round(&mut self) -> anyhow::Result<Running> {
        if let Some(round) = self.fleet.interrupted() {
            tracing::warn!(
                "round {round} was interrupted by a host restart; starting round {}",
                round + 1
            );
        }
        self.reload_registry();
        self.reload_certificate();
        let registry = self.registry.clone();
        let (config, selection) = self.fleet.announce(registry.len(), rand::random())?;
        self.save_state()?;
        let (round, selected) = (config.round, selection.len());
        tracing::info!(
            "round {round}: announcing ({selected} of {} values selected, {}-bit bodies: {:.3} bytes per parameter)",
            self.cfg.layout.len(),
            config.body_bits,
            expected_update_bytes(selected, config.body_bits) as f64 / self.cfg.layout.len() as f64
        );
        let now = now_ms();
        let start = Entry::Start {
            config: config.clone(),
            deadlines: self.cfg.deadlines,
            now,
        };
        let journal = JournalFile::create(&self.journal_path(), &start)?;
        let (machine, actions) = HostRound::start(config, registry, self.cfg.deadlines, now)?;
        self.event(HostEvent::Announced { round, selected });
        let outcome = self.execute(round, actions)?;
        journal.sync()?;
        Ok((machine, journal, now, outcome))
    }

    /// Runs one round to its end: the interrupted one when its journal replays, else the
    /// next one.
    fn run_round(&mut self) -> anyhow::Result<()> {
        let process_start = process::process_cpu();
        let mut cost = Stages::default();
        let resumed = cost.time("resume", || {
            self.fleet.interrupted().and_then(|r| self.resume(r))
        });
        let (mut machine, mut journal, started_ms, mut outcome) = match resumed {
            Some((replayed, started, mut journal)) => {
                tracing::info!(
                    "round {}: resumed after a host restart ({} journalled messages replayed)",
                    replayed.round.config().round,
                    replayed.messages
                );
                let round = replayed.round.config().round;
                self.event(HostEvent::Resumed {
                    round,
                    messages: replayed.messages,
                });
                let mut machine = replayed.round;
                let mut outcome = replayed.outcome.map(|a| match a {
                    HostAction::Finished(r) => Ok(r),
                    HostAction::Failed(why) => Err(why),
                    _ => unreachable!("replay returns outcomes only"),
                });
                if outcome.is_none() {
                    journal.append(&Entry::Republish)?;
                    let actions = machine.republish();
                    outcome = self.execute(round, actions)?;
                }
                (machine, journal, started, outcome)
            }
            None => self.start_round()?,
        };
        let config = machine.config().clone();
        let round = config.round;
        // The mask: the one the round was announced with, from the same history.
        let selection = self.fleet.selection(&config)?;
        let mut host_time = Duration::ZERO;
        // Folded bytes at the last compaction (see the compaction below: the journal stays
        // within about twice the checkpoint, the secure-aggregation records and the uploads
        // in flight).
        let mut compacted_at = machine.folded_bytes();
        let mut journal_peak = journal.len();
        while outcome.is_none() {
            let incoming = self.link.recv(Duration::from_millis(200))?;
            let recover = self.check_drops(round, incoming.is_none());
            let t = Instant::now();
            let cpu = process::thread_cpu();
            // Journal writes are disk I/O, not crypto: kept out of the host's crypto time.
            let mut io = Duration::ZERO;
            let mut io_cpu = Duration::ZERO;
            // The stage this iteration's CPU is charged to (`HostEvent::RoundCost`).
            let mut stage = "secagg";
            let mut actions = match incoming {
                // A fold worker's report (a round sharded over fold workers).
                Some(Incoming::Message { topic, payload })
                    if matches!(self.topics.route(&topic), Some(Route::FoldReport(_))) =>
                {
                    stage = "fold";
                    let now = now_ms();
                    let accepted = fedshield_protocol::decode::<ShardUplink>(
                        &payload,
                        self.cfg.broker.max_packet_bytes,
                    )
                    .and_then(|uplink| {
                        let actions = machine.on_shard(uplink.clone(), now)?;
                        Ok((uplink, actions))
                    });
                    match accepted {
                        Ok((uplink, a)) => {
                            let w = Instant::now();
                            let w_cpu = process::thread_cpu();
                            journal.append(&Entry::Shard { uplink, now })?;
                            journal_peak = journal_peak.max(journal.len());
                            io += w.elapsed();
                            io_cpu += process::thread_cpu().saturating_sub(w_cpu);
                            a
                        }
                        Err(e) => {
                            tracing::warn!("round {round}: {topic}: refused: {e}");
                            self.event(HostEvent::refused(None, &e));
                            vec![]
                        }
                    }
                }
                Some(Incoming::Message { topic, payload }) => match self.route(&topic, &payload) {
                    // An upload already in the sum, sent again: nothing to do or journal.
                    Some((device, EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_)))
                        if machine.has_folded(&device) =>
                    {
                        stage = "fold";
                        vec![]
                    }
                    Some((device, msg)) => {
                        if matches!(msg, EdgeMessage::Manifest(_) | EdgeMessage::Chunk(_)) {
                            stage = "fold";
                        }
                        let now = now_ms();
                        match machine.on_message(&device, msg.clone(), now) {
                            Ok(a) => {
                                let w = Instant::now();
                                let w_cpu = process::thread_cpu();
                                journal.append(&Entry::Message {
                                    from: device,
                                    message: msg,
                                    now,
                                })?;
                                journal_peak = journal_peak.max(journal.len());
                                // Compacted once the folded uploads spooled since the
                                // last compaction outweigh both the checkpoint and the
                                // rest of the journal (the devices' secure-aggregation
                                // records, the uploads in flight): a compaction rewrites
                                // at most twice what was spooled since the last, so its
                                // cost stays linear in the uploads at any fleet size.
                                let spooled = machine.folded_bytes() - compacted_at;
                                let rest = journal.len().saturating_sub(spooled);
                                if spooled > machine.checkpoint_bytes().max(rest)
                                    && let Some(checkpoint) = machine.checkpoint()
                                {
                                    journal = self.compact_journal(round, checkpoint)?;
                                    compacted_at = machine.folded_bytes();
                                }
                                io += w.elapsed();
                                io_cpu += process::thread_cpu().saturating_sub(w_cpu);
                                a
                            }
                            Err(e) => {
                                self.refused(Some(&device), &e);
                                vec![]
                            }
                        }
                    }
                    None => {
                        stage = "reports";
                        vec![]
                    }
                },
                Some(Incoming::Disconnected(e)) => {
                    tracing::warn!("broker connection lost ({e}); reconnecting");
                    vec![]
                }
                // The host never reports a cut network to its link.
                Some(Incoming::Cut) => vec![],
                Some(Incoming::Connected) => {
                    tracing::info!(
                        "round {round}: reconnected to the broker; re-publishing the round"
                    );
                    self.publish(self.fleet.retained())?;
                    journal.append(&Entry::Republish)?;
                    self.event(HostEvent::Republished { round });
                    machine.republish()
                }
                // Idle again after the link dropped messages: the round is re-published
                // under a new incarnation, and its devices send this phase's messages again.
                None if recover => {
                    tracing::info!("round {round}: re-publishing the round after dropped messages");
                    journal.append(&Entry::Republish)?;
                    self.event(HostEvent::Republished { round });
                    machine.republish()
                }
                None => vec![],
            };
            let now = now_ms();
            if machine.due(now) {
                let w = Instant::now();
                let w_cpu = process::thread_cpu();
                journal.append(&Entry::Tick { now })?;
                journal.sync()?;
                journal_peak = journal_peak.max(journal.len());
                io += w.elapsed();
                io_cpu += process::thread_cpu().saturating_sub(w_cpu);
                actions.extend(machine.on_tick(now));
            }
            if actions
                .iter()
                .any(|a| matches!(a, HostAction::Finished(_) | HostAction::Failed(_)))
            {
                stage = "finish";
            }
            host_time += t.elapsed().saturating_sub(io);
            outcome = self.execute(round, actions)?;
            let spent = process::thread_cpu().saturating_sub(cpu);
            cost.charge(stage, spent.saturating_sub(io_cpu));
            cost.charge("journal", io_cpu);
        }
        let apply_cpu = process::thread_cpu();
        let outcome = match outcome.expect("the loop ends with an outcome") {
            Ok(result) => {
                let t = Instant::now();
                let values = self.fleet.apply(&config, &selection, &result)?;
                host_time += t.elapsed();
                if let Some(dir) = &self.cfg.audit_dir {
                    write_audit(dir, &result, config.body_bits)?;
                }
                Ok((result, values))
            }
            Err(why) => Err(why),
        };
        let delivered: Vec<_> = machine.delivered_to().cloned().collect();
        let round_seconds = now_ms().saturating_sub(started_ms) as f64 / 1000.0;
        let summary = outcome
            .as_ref()
            .map(|(r, _)| r.clone())
            .map_err(Clone::clone);
        let closed = self.fleet.close(
            round,
            delivered,
            machine.devices().clone(),
            outcome,
            host_time.as_secs_f64(),
            round_seconds,
        );
        self.publish(closed.publish)?;
        cost.charge("apply", process::thread_cpu().saturating_sub(apply_cpu));
        match summary {
            Ok(result) => {
                let wire = closed.metrics.download_bytes_per_client;
                tracing::info!(
                    "snapshot of round {round} for devices catching up: {} bytes",
                    closed.snapshot_bytes
                );
                tracing::info!(
                    "round {round}: global update published, {wire} bytes ({} before zstd)",
                    closed.raw_bytes
                );
                let names: Vec<&str> = result.contributors.iter().map(|d| d.0.as_str()).collect();
                tracing::info!(
                    "round {round}: {} contributors ({}), {} bytes uploaded each; previous global's loss reported at join: {}",
                    names.len(),
                    names.join(", "),
                    result.upload_bytes,
                    result
                        .eval_loss
                        .map_or_else(|| "-".into(), |l| format!("{l:.4}"))
                );
            }
            Err(why) => tracing::warn!("round {round} failed: {why}"),
        }
        cost.time("outputs", || self.write_outputs())?;
        // The round is in state.bin now: its journal is done with.
        drop(journal);
        std::fs::remove_file(self.journal_path())?;
        let peak_rss_mib = process::peak_rss().unwrap_or(0) as f64 / f64::from(1 << 20);
        self.event(HostEvent::RoundCost {
            round,
            cpu_s: cost.0,
            process_cpu_s: process::process_cpu()
                .saturating_sub(process_start)
                .as_secs_f64(),
            peak_rss_mib,
            journal_peak_bytes: journal_peak,
        });
        Ok(())
    }

    fn save_state(&self) -> anyhow::Result<()> {
        fedshield_store::write_atomic(
            &self.cfg.out.join("state.bin"),
            &self.fleet.state_bytes(),
            fedshield_store::Access::Private,
        )?;
        Ok(())
    }

    /// Waits (at most `report_wait`) for every contributor's evaluation of the last round.
    fn collect_reports(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.cfg.report_wait;
        while Instant::now() < deadline && !self.fleet.reports_complete() {
            match self.link.recv(Duration::from_millis(200))? {
                Some(Incoming::Message { topic, payload }) => {
                    if let Some((device, _)) = self.route(&topic, &payload) {
                        tracing::debug!("late round message from {device} ignored");
                    }
                }
                Some(Incoming::Connected) => self.publish(self.fleet.retained())?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes adapter/, metrics.json, loss.svg and state.bin.
    fn write_outputs(&self) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        use fedshield_store::{Access, write_atomic};
        let out = &self.cfg.out;
        let adapter = out.join("adapter");
        std::fs::create_dir_all(&adapter)?;
        let tensors =
            fedshield_codec::to_safetensors(&self.cfg.layout, self.fleet.global().values())?;
        write_atomic(
            &adapter.join("adapter_model.safetensors"),
            &tensors,
            Access::Public,
        )?;
        let (r, alpha, targets) = &self.cfg.peft;
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let config = PeftConfig {
            base_model: &self.cfg.base_model,
            r: *r,
            alpha: *alpha,
            dropout: DEFAULT_LORA_DROPOUT,
            targets: &targets,
            freeze_a: false,
            round: Some(self.fleet.completed()),
        };
        let config = config.to_json();
        write_atomic(
            &adapter.join("adapter_config.json"),
            config.as_bytes(),
            Access::Public,
        )?;
        let metrics_path = out.join("metrics.json");
        write_atomic(
            &metrics_path,
            self.fleet.metrics_json(&self.cfg.fleet).as_bytes(),
            Access::Public,
        )?;
        let plot_path = out.join("loss.svg");
        write_atomic(
            &plot_path,
            self.fleet.loss_plot(&self.cfg.fleet).as_bytes(),
            Access::Public,
        )?;
        self.save_state()?;
        Ok((adapter, plot_path, metrics_path))
    }
}
