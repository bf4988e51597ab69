//! `fedshield-edge run`: the MQTT driver of one fleet device (engine: `fleet.rs`).

use crate::{LoraArgs, ModelArgs, PacingArgs, PlanArgs};
use anyhow::Context;
use fedshield_edge::fleet::{
    Audit, Device, EdgeFleet, EdgeOutput, Event, RigNotice, TorchPlatform, open_state,
};
use fedshield_edge::lora::Lora;
use fedshield_edge::rig_client::{RigClient, RigEvent};
use fedshield_edge::sft;
use fedshield_models::Assets;
use fedshield_models::data::{read_instruction_jsonl, split_by_category};
use fedshield_protocol::edge::EdgeIdentity;
use fedshield_protocol::fleet::edge::Platform;
use fedshield_protocol::fleet::steps::DeviceStatus;
use fedshield_protocol::keyfile::DeviceKey;
use fedshield_protocol::messages::{EdgeMessage, Phase, Topics};
use fedshield_protocol::signed::{Downlink, HostCredentials, HostTrust, open_downlink};
use fedshield_rig::messages::{EdgePhase, EdgeStatus, Relay};
use fedshield_store::JsonLines;
use fedshield_transport::{Incoming, Link};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML file of settings (see `packaging/edge.toml`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    // Rank and targets must match the host's.
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    pacing: PacingArgs,
    #[command(flatten)]
    plan: PlanArgs,
    /// The device's key file (from `fedshield-host enrol`).
    #[arg(long)]
    key: PathBuf,
    /// Fleet name.
    #[arg(long, default_value = "demo")]
    fleet: String,
    #[command(flatten)]
    link: fedshield_transport::BrokerArgs,
    /// This device's share of the FAQ category split: client K ...
    #[arg(long)]
    client: usize,
    /// ... of N.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Learning rate (constant; AdamW restarts every round). 5e-3 was the best of 5e-4,
    /// 5e-3 and 1.5e-2 for FedAvg in the quality experiment (1.5e-2 diverges).
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Maximum tokens per example.
    #[arg(long, default_value_t = 192)]
    max_len: usize,
    /// Held-out examples evaluated after each global update.
    #[arg(long, default_value_t = 16)]
    eval_examples: usize,
    /// Seed of the data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave after this round's global update (0: run for ever).
    #[arg(long, default_value_t = 0)]
    rounds: u64,
    /// The device's state file (global adapter, selection history, error-feedback residual,
    /// an upload awaiting its outcome), restored at start (default: the key file with the
    /// extension .state).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Serve the fleet's adapter on ONNX Runtime: the export in DIR (`fedshield-edge
    /// export-onnx --lora-targets` the fleet's targets) is opened at start, and every global
    /// adapter the device applies is swapped into it in place (timed: `Event::Served`).
    #[arg(long)]
    serve_onnx: Option<PathBuf>,
    /// Where the device keeps the newest host certificate and revocation list it has seen
    /// (a rotated host key arrives with the round state; once seen, older ones are refused
    /// for good) (default: the key file with the extension .host.json).
    #[arg(long)]
    host_trust: Option<PathBuf>,
    /// Write each round's encoded update (before encryption) to DIR/round-{r}-{device}.json
    /// (audits, end-to-end tests).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Append what the device did and refused to FILE, one JSON object per line
    /// (`fedshield_edge::fleet::Event`: refused, encrypted, settled, evaluated).
    #[arg(long)]
    events: Option<PathBuf>,
    /// Serial port of an attached test rig (a USB-CDC `/dev/ttyACM0` or a UART
    /// `/dev/ttyTHS1`): its supply measurement feeds the governor and the energy figures in
    /// preference to the on-board rails, a power-cut warning makes the device save its
    /// state and stop, and the device reports its state to the rig.
    #[arg(long)]
    rig: Option<String>,
    /// The rig's baud rate.
    #[arg(long, default_value_t = 115_200)]
    rig_baud: u32,
    /// Milliseconds between the rig's readings.
    #[arg(long, default_value_t = 1_000)]
    rig_interval_ms: u32,
}

/// Where a device's output goes: log lines on stderr, the state file, audit records and
/// events.
struct Output {
    state: PathBuf,
    audit_dir: Option<PathBuf>,
    events: Option<JsonLines>,
}

impl Output {
    /// Carries out `out` up to its messages: the state first (an upload is on disk before
    /// it leaves), then audits, log lines and events; returns the messages to publish.
    fn carry_out(
        &mut self,
        fleet: &EdgeFleet,
        out: EdgeOutput,
    ) -> anyhow::Result<Vec<EdgeMessage>> {
        if out.persist {
            let written = fedshield_store::write_atomic(
                &self.state,
                &fleet.state_bytes(),
                // Owner-only: the residual and the pending upload derive from private data.
                fedshield_store::Access::Private,
            );
            if let Err(e) = written {
                tracing::warn!("state not saved to {}: {e}", self.state.display());
            }
        }
        for audit in &out.audits {
            if let Err(e) = self.write_audit(audit) {
                tracing::warn!("round {}: audit file not written: {e}", audit.round);
            }
        }
        for line in &out.lines {
            tracing::info!("{line}");
        }
        for event in &out.events {
            self.event(event);
        }
        Ok(out.send)
    }

    /// Writes the state file now (before a power cut).
    fn persist(&self, fleet: &EdgeFleet) -> anyhow::Result<()> {
        fedshield_store::write_atomic(
            &self.state,
            &fleet.state_bytes(),
            fedshield_store::Access::Private,
        )?;
        Ok(())
    }

    /// Records an event; a failure to write it is logged and the device goes on.
    fn event(&mut self, event: &Event) {
        if let Some(file) = &mut self.events
            && let Err(e) = file.append(event)
        {
            tracing::warn!("event not recorded: {e}");
        }
    }

    /// Writes a round's encoded update (before encryption) and its weight to
    /// `DIR/round-{r}-{device}.json`: the device's own data, for audits and for the
    /// end-to-end tests to recompute the aggregate.
    fn write_audit(&self, audit: &Audit) -> anyhow::Result<()> {
        let Some(dir) = &self.audit_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("round-{}-{}.json", audit.round, audit.device));
        fedshield_store::write_atomic(
            &path,
            serde_json::to_string(audit)?.as_bytes(),
            fedshield_store::Access::Private,
        )?;
        Ok(())
    }
}

/// The fleet's adapter served on ONNX Runtime (`--serve-onnx`).
struct Serving {
    decoder: fedshield_edge::onnx_graph::OnnxDecoder,
    /// Takes each global update's values.
    adapter: Lora,
    /// The round of the adapter in the decoder.
    round: Option<u64>,
}

impl Serving {
    /// Swaps the device's current global adapter into the decoder, once per round; a swap
    /// that fails is logged and the decoder keeps the adapter it had.
    fn refresh(&mut self, fleet: &EdgeFleet, output: &mut Output) {
        let global = fleet.global();
        if self.round == Some(global.round()) || global.round() == 0 {
            return;
        }
        let started = std::time::Instant::now();
        let swapped = self
            .adapter
            .load_flat(global.values())
            .and_then(|()| self.decoder.set_adapter(&self.adapter));
        match swapped {
            Ok(()) => {
                let swap_ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(
                    "serving round {}'s global adapter (swapped in {swap_ms:.1} ms)",
                    global.round()
                );
                self.round = Some(global.round());
                output.event(&Event::Served {
                    round: global.round(),
                    swap_ms,
                });
            }
            Err(e) => tracing::error!(
                "round {}'s global adapter not served ({e}); the previous one stays",
                global.round()
            ),
        }
    }
}

/// Saves what the device trusts of its host (atomically), and records it. A failed write
/// is logged; the trust in memory holds, and the next change writes again.
fn save_trust(path: &Path, trust: &HostTrust, output: &mut Output) {
    let saved = trust.saved();
    let written = serde_json::to_vec_pretty(saved)
        .map_err(anyhow::Error::from)
        .and_then(|json| {
            fedshield_store::write_atomic(path, &json, fedshield_store::Access::Private)
                .map_err(anyhow::Error::from)
        });
    match written {
        Ok(()) => tracing::info!(
            "now trusting host certificate {} (valid until {}), revocation list {} ({})",
            saved.certificate.serial,
            saved.certificate.not_after,
            saved.revocations.serial,
            path.display()
        ),
        Err(e) => tracing::error!(
            "{}: the host trust did not save ({e}); a restart before the next save would \
             go back to the older certificate",
            path.display()
        ),
    }
    output.event(&Event::HostTrust {
        certificate: saved.certificate.serial,
        revocations: saved.revocations.serial,
    });
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let key = DeviceKey::parse(
        &std::fs::read_to_string(&args.key)
            .with_context(|| format!("reading {}", args.key.display()))?,
    )?;
    let (secret, authority) = key.keys()?;
    let host = key.host_certificate()?;
    host.verify(&authority, &args.fleet).with_context(|| {
        format!(
            "{}: the host certificate is for fleet {:?}, not {:?}",
            args.key.display(),
            host.fleet,
            args.fleet
        )
    })?;
    let trust_path = args
        .host_trust
        .clone()
        .unwrap_or_else(|| args.key.with_extension("host.json"));
    // What it saved before wins over the key file's (older) certificate; a file that does
    // not read stops the device, untouched.
    let saved = fedshield_store::read_existing(&trust_path)?
        .map(|bytes| serde_json::from_slice::<HostCredentials>(&bytes))
        .transpose()
        .with_context(|| trust_path.display().to_string())?;
    let mut trust = HostTrust::new(authority, &args.fleet, host, saved)
        .with_context(|| trust_path.display().to_string())?;
    tracing::info!(
        "trusting host certificate {} (valid until {}), revocation list {}",
        trust.saved().certificate.serial,
        trust.saved().certificate.not_after,
        trust.saved().revocations.serial
    );
    let me = key.device.clone();
    // Every log line of this device names it.
    let _span = tracing::info_span!("edge", device = %me).entered();
    let (_path, _g, tok, mut model) = args.model.load()?;
    let examples = read_instruction_jsonl(&Assets::locate().faq_with_categories()?)?;
    let split = split_by_category(&examples, args.clients, 0.1, 0)?;
    anyhow::ensure!(
        args.client < args.clients,
        "--client must be below --clients"
    );
    let train = sft::tokenize_all(&tok, &split.clients[args.client], args.max_len)?;
    let eval_n = args.eval_examples.min(split.eval.len());
    let eval = sft::tokenize_all(&tok, &split.eval[..eval_n], args.max_len)?;
    let lora = Lora::new(&model, args.lora.config(false)?, 0);
    let layout = lora.layout()?;
    let eval = sft::batches(&eval, 8, tok.eos_id, model.device);
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let planned = args.plan.apply(
        &mut model,
        &lora,
        &train,
        tok.eos_id,
        args.batch,
        &args.pacing.telemetry_root,
    )?;
    for line in planned.lines() {
        tracing::info!("plan: {line}");
    }
    // What the device reports with each join: its plan and budget, and (from the sensors
    // at that moment) its power mode and thermal state.
    let status = DeviceStatus {
        plan: Some(planned.choice.name.clone()),
        memory_budget_mib: Some(planned.choice.budget >> 20),
        ..DeviceStatus::default()
    };
    let telemetry = Some(fedshield_telemetry::Telemetry::discover(
        &args.pacing.telemetry_root,
    ));
    // An attached rig: its power reading goes to the pacer, its notices to this loop.
    let rig = args
        .rig
        .as_deref()
        .map(|port| {
            tracing::info!("rig on {port} at {} baud", args.rig_baud);
            RigClient::start(port, args.rig_baud, args.rig_interval_ms)
        })
        .transpose()?;
    let mut pacer = args.pacing.pacer()?;
    if let Some(rig) = &rig {
        pacer = pacer.with_external_power(rig.power());
    }
    // The training step, told to the rig as it advances.
    let progress = pacer.progress();
    // The served model: the export and an adapter of the fleet's shape (its frozen parts,
    // if any, drawn from the same seed as the trainer's) that takes each global update.
    let mut serving = args
        .serve_onnx
        .as_deref()
        .map(|dir| -> anyhow::Result<Serving> {
            let env = fedshield_edge::inference::environment(&fedshield_models::Assets::locate())?;
            let threads = args.model.threads.max(1) as usize;
            let decoder = fedshield_edge::onnx_graph::OnnxDecoder::open(env, dir, threads)?;
            tracing::info!("serving {} on ONNX Runtime", dir.display());
            Ok(Serving {
                decoder,
                adapter: Lora::new(&model, args.lora.config(false)?, 0),
                round: None,
            })
        })
        .transpose()?;
    // libtorch works on a thread of its own; this one keeps the link drained.
    let mut platform = TorchPlatform::spawn(
        Device {
            model,
            lora,
            train,
            eval,
            lr: args.lr,
            batch_size: args.batch,
            plan: planned.choice.plan,
            pad: tok.eos_id,
            seed: args.seed ^ (args.client as u64) << 32,
            threads: args.model.threads,
            pacer,
        },
        status,
        telemetry,
    )?;
    let mut fleet = EdgeFleet::new(
        EdgeIdentity {
            id: me.clone(),
            secret,
            authority,
        },
        layout,
        platform.initial(),
        platform.samples(),
    );
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| args.key.with_extension("state"));
    // The plan in force, beside the device's state (for operators and the fleet's tools).
    fedshield_store::write_atomic(
        &state_path.with_extension("plan.json"),
        serde_json::to_string_pretty(&planned)?.as_bytes(),
        fedshield_store::Access::Public,
    )?;
    let mut resumed = None;
    // Only a missing state file starts fresh; one that cannot be read or is not this
    // device's stops the device and stays as it is.
    if let Some(line) = open_state(&mut fleet, &state_path)? {
        tracing::info!("resumed from {}: {line}", state_path.display());
        resumed = Some(Event::Resumed {
            applied: fleet.global().round(),
            pending: fleet.pending_round(),
        });
    }
    let topics = Topics::new(&args.fleet)?;
    let link = Link::start(args.link.link_config(
        format!("fedshield-edge-{}-{}", args.fleet, me.0),
        vec![topics.round(), topics.down(&me), topics.all_global()],
        Some((topics.status(&me), b"offline".to_vec())),
        Some((topics.status(&me), b"online".to_vec())),
    )?)?;
    // The rig's network relay: the link drops its connection the moment the rig cuts the
    // network and reconnects the moment it is back, instead of finding out from the
    // keep-alive (told from the rig's thread: this loop may be waiting on the link).
    if let Some(rig) = &rig {
        rig.follow_network(link.network_word());
    }
    let max_packet_bytes = args.link.max_packet_bytes;
    tracing::info!(
        "{} training examples, {eval_n} held out; waiting for rounds on {}:{}",
        fleet.samples(),
        args.link.broker,
        args.fleet
    );
    let mut output = Output {
        state: state_path,
        audit_dir: args.audit_dir.clone(),
        events: args.events.as_deref().map(JsonLines::open).transpose()?,
    };
    if let Some(event) = resumed {
        output.event(&event);
    }
    if let Some(serving) = &mut serving {
        serving.refresh(&fleet, &mut output);
    }
    // Manifests and chunks of a round sharded over fold workers go to the shard's topic.
    let publish = |fleet: &EdgeFleet, messages: Vec<EdgeMessage>| -> anyhow::Result<()> {
        for msg in messages {
            let topic = fleet.uplink_topic(&topics, &msg);
            link.publish(&topic, postcard::to_stdvec(&msg)?, false)?;
        }
        Ok(())
    };
    let mut done_round = 0u64;
    let mut snapshot_subscribed = false;
    let mut training = None;
    let mut drops = fedshield_transport::DropMonitor::default();
    let mut status = EdgeStatus {
        round: 0,
        phase: EdgePhase::Idle,
        step: 0,
        persisted_round: fleet.global().round(),
        duty_pct: 0,
    };
    if let Some(rig) = &rig {
        rig.report(status);
    }
    loop {
        while let Some(event) = rig.as_ref().and_then(RigClient::try_event) {
            if let RigEvent::BrownOut { in_ms } = event {
                // Save what the device holds and stop before the power goes.
                output.persist(&fleet)?;
                output.event(&Event::PowerWarning { in_ms });
                if let Some(rig) = &rig {
                    output.event(&rig_line(rig));
                }
                tracing::warn!(
                    "the rig cuts the power in {in_ms} ms: state saved to {}, stopping",
                    output.state.display()
                );
                link.disconnect();
                std::thread::sleep(Duration::from_millis(100)); // the DISCONNECT leaves
                // The state and the event are on disk; libtorch may be mid-step on the
                // trainer thread, and tearing its globals down under it (a normal exit
                // runs their destructors) would fail that step noisily: leave at once, as
                // the power cut would.
                // SAFETY: `_exit` ends the process without running destructors or atexit
                // handlers; nothing after this point needs them.
                unsafe { libc::_exit(0) };
            }
            if let Some(notice) = rig_notice(event) {
                tracing::info!("rig: {notice:?}");
                output.event(&Event::Rig { notice });
            }
        }
        // The step the trainer is on and how hard it works, for the rig's log, its step
        // triggers and its thermal model.
        if training.is_some()
            && status.phase == EdgePhase::Training
            && (progress.steps(), progress.duty_pct()) != (status.step, status.duty_pct)
            && let Some(rig) = &rig
        {
            status.step = progress.steps();
            status.duty_pct = progress.duty_pct();
            rig.report(status);
        }
        // Short waits while training (its end is polled) or with a rig attached (a
        // power-cut warning may give only a few hundred milliseconds).
        let short = training.is_some() || rig.is_some();
        let wait = Duration::from_millis(if short { 50 } else { 500 });
        let incoming = link.recv(wait)?;
        let idle = incoming.is_none();
        let mut out = EdgeOutput::default();
        if let Some(result) = platform.trained()
            && let Some(job) = training.take()
        {
            out.extend(fleet.finish_training(job, result, &mut platform));
        }
        match incoming {
            None => {}
            Some(Incoming::Connected) => {
                tracing::info!("connected to the broker");
                snapshot_subscribed = false; // a restarted broker forgot it: subscribe again
                output.event(&Event::LinkUp);
            }
            Some(Incoming::Disconnected(e)) => {
                tracing::warn!("broker connection lost ({e}); reconnecting");
                output.event(&Event::LinkDown { cut: false });
            }
            Some(Incoming::Cut) => {
                tracing::warn!(
                    "the rig cut the network: connection dropped; reconnecting when it is back"
                );
                output.event(&Event::LinkDown { cut: true });
            }
            // An empty retained publish deletes a retained message: nothing to handle.
            Some(Incoming::Message { payload, .. }) if payload.is_empty() => {}
            Some(Incoming::Message { topic, payload }) => {
                let opened = open_downlink(
                    &topics,
                    &mut trust,
                    fedshield_store::unix_seconds(),
                    &me,
                    &topic,
                    &payload,
                    max_packet_bytes,
                );
                if trust.take_changed() {
                    save_trust(&trust_path, &trust, &mut output);
                }
                match opened {
                    None => {}
                    Some(Err(e)) => out.refused(&topic, &e),
                    Some(Ok(message)) => {
                        if let Downlink::Round(state) = &message
                            && let Phase::Failed { reason } = &state.phase
                            && state.config.round >= args.rounds
                            && args.rounds > 0
                        {
                            done_round = state.config.round;
                            tracing::warn!("round {} failed: {reason}", state.config.round);
                        }
                        out.extend(fleet.on_downlink(message, &mut platform));
                    }
                }
            }
        }
        let check = drops.check(link.dropped(), platform.seconds(), idle);
        if let Some(total) = check.report {
            tracing::warn!(
                "{total} incoming messages dropped so far: more than the link's budget came at once"
            );
            output.event(&Event::LinkDropped { total });
        }
        if check.recover {
            // Idle again after drops: the retained messages come back.
            link.resubscribe()?;
            if snapshot_subscribed {
                link.subscribe(&topics.all_snapshot())?;
            }
        }
        if fleet.needs_snapshot() != snapshot_subscribed {
            snapshot_subscribed = fleet.needs_snapshot();
            if snapshot_subscribed {
                link.subscribe(&topics.all_snapshot())?;
            } else {
                link.unsubscribe(&topics.all_snapshot())?;
            }
        }
        for event in &out.events {
            if let Event::Evaluated { round, .. } = event {
                done_round = done_round.max(*round);
            }
        }
        if let Some(serving) = &mut serving
            && out
                .events
                .iter()
                .any(|e| matches!(e, Event::Evaluated { .. } | Event::CaughtUp { .. }))
        {
            serving.refresh(&fleet, &mut output);
        }
        report_status(rig.as_ref(), &mut status, &out.events);
        publish(&fleet, output.carry_out(&fleet, out)?)?;
        // Training starts after publishing what preceded it (the round's shares).
        if training.is_none() && fleet.has_training() {
            let (job, out) = fleet.take_training();
            if let Some(job) = &job {
                platform.start(&job.config, &job.task, &job.global);
            }
            training = job;
            report_status(rig.as_ref(), &mut status, &out.events);
            publish(&fleet, output.carry_out(&fleet, out)?)?;
        }
        if args.rounds > 0 && done_round >= args.rounds {
            // Let the last messages leave before disconnecting.
            std::thread::sleep(Duration::from_millis(500));
            link.disconnect();
            tracing::info!("done after round {done_round}");
            if let Some(rig) = &rig {
                output.event(&rig_line(rig));
            }
            output.event(&Event::Done { round: done_round });
            return Ok(());
        }
    }
}

/// Tells the rig the device's status when `events` change it.
fn report_status(rig: Option<&RigClient>, status: &mut EdgeStatus, events: &[Event]) {
    if let Some(rig) = rig
        && let Some(next) = next_status(*status, events)
    {
        *status = next;
        rig.report(next);
    }
}

/// The device's status for the rig after `events`, if they change it.
fn next_status(mut status: EdgeStatus, events: &[Event]) -> Option<EdgeStatus> {
    let before = status;
    for e in events {
        match e {
            Event::Joined { round } => {
                status.round = *round;
                status.phase = EdgePhase::Joined;
                status.step = 0;
                status.duty_pct = 0;
            }
            Event::Training { round } => {
                status.round = *round;
                status.phase = EdgePhase::Training;
                status.step = 0;
                status.duty_pct = 100;
            }
            Event::Encrypted { round, steps, .. } => {
                status.round = *round;
                status.phase = EdgePhase::Uploading;
                status.step = *steps as u32;
                status.duty_pct = 0;
            }
            Event::Settled { .. } => status.phase = EdgePhase::Waiting,
            Event::Evaluated { round, .. } | Event::CaughtUp { round } => {
                status.phase = EdgePhase::Idle;
                status.persisted_round = *round;
            }
            _ => {}
        }
    }
    (status != before).then_some(status)
}

/// A rig notice for the log and the event file (a power-cut warning has its own event,
/// [`Event::PowerWarning`]).
fn rig_notice(event: RigEvent) -> Option<RigNotice> {
    Some(match event {
        RigEvent::Connected(id) => RigNotice::Connected {
            firmware: id.firmware,
            protocol: id.protocol,
        },
        RigEvent::Mismatch {
            firmware,
            protocol,
            digest,
        } => RigNotice::Mismatch {
            firmware,
            protocol,
            digest,
        },
        RigEvent::Unusable(reason) => RigNotice::Unusable { reason },
        RigEvent::Relay(r) => match (r.relay, r.closed) {
            (Relay::Network, false) => RigNotice::NetworkCut,
            (Relay::Network, true) => RigNotice::NetworkRestored,
            (Relay::Power, false) => RigNotice::PowerCut,
            (Relay::Power, true) => RigNotice::PowerRestored,
        },
        RigEvent::BrownOut { .. } => return None,
        RigEvent::Silent => RigNotice::Silent,
        RigEvent::Back => RigNotice::Back,
    })
}

/// What the rig's serial line carried so far, for the event file.
fn rig_line(rig: &RigClient) -> Event {
    let s = rig.stats();
    Event::RigLine {
        frames: s.frames,
        messages: s.messages,
        bad_frames: s.bad_frames,
        crc_errors: s.crc_errors,
        broken_messages: s.broken_messages,
    }
}
