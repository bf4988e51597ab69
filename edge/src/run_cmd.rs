//! `fedshield-edge run`: the MQTT driver of one fleet device (engine: `fleet.rs`).

use crate::{LoraArgs, ModelArgs};
use anyhow::Context;
use fedshield_edge::fleet::{Device, FleetClient, Log};
use fedshield_edge::lora::Lora;
use fedshield_edge::sft;
use fedshield_models::Assets;
use fedshield_models::data::{read_instruction_jsonl, split_by_category};
use fedshield_protocol::edge::EdgeIdentity;
use fedshield_protocol::keyfile::DeviceKey;
use fedshield_protocol::messages::{Phase, Topics};
use fedshield_protocol::signed::{Downlink, open_downlink};
use fedshield_transport::{Incoming, Link};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    // Rank and targets must match the host's.
    #[command(flatten)]
    lora: LoraArgs,
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
    /// Write each round's encoded update (before encryption) to DIR/round-{r}-{device}.json
    /// (audits, end-to-end tests).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Append what the device did and refused to FILE, one JSON object per line
    /// (`fedshield_edge::fleet::Event`: refused, encrypted, settled, evaluated).
    #[arg(long)]
    events: Option<PathBuf>,
}

/// The device's output: log lines on stderr, events in the event file.
struct Output {
    me: String,
    events: Option<std::fs::File>,
}

impl Output {
    fn emit(&mut self, log: &mut Log) -> anyhow::Result<()> {
        for line in log.lines.drain(..) {
            eprintln!("{}: {line}", self.me);
        }
        if let Some(file) = &mut self.events {
            for event in log.events.drain(..) {
                let mut line = serde_json::to_vec(&event)?;
                line.push(b'\n');
                file.write_all(&line).context("writing the event file")?;
            }
        }
        log.events.clear();
        Ok(())
    }
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
    let me = key.device.clone();
    let (_path, _g, tok, model) = args.model.load()?;
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
    let client = FleetClient::new(
        Device {
            model: &model,
            lora,
            train,
            eval: sft::batches(&eval, 8, tok.eos_id, model.device),
            lr: args.lr,
            batch_size: args.batch,
            pad: tok.eos_id,
            seed: args.seed ^ (args.client as u64) << 32,
        },
        EdgeIdentity {
            id: me.clone(),
            secret,
            authority,
        },
    )?
    .with_audit_dir(args.audit_dir);
    let (mut client, restored) = client.with_state(
        args.state
            .clone()
            .unwrap_or_else(|| args.key.with_extension("state")),
    )?;
    if let Some(line) = restored {
        eprintln!("{me}: {line}");
    }
    let topics = Topics::new(&args.fleet)?;
    let link = Link::start(args.link.link_config(
        format!("fedshield-edge-{}-{}", args.fleet, me.0),
        vec![topics.round(), topics.down(&me), topics.all_global()],
        Some((topics.status(&me), b"offline".to_vec())),
        Some((topics.status(&me), b"online".to_vec())),
    )?)?;
    let max_packet_bytes = args.link.max_packet_bytes;
    eprintln!(
        "{me}: {} training examples, {eval_n} held out; waiting for rounds on {}:{}",
        client.samples(),
        args.link.broker,
        args.fleet
    );
    let mut out_log = Output {
        me: me.0.clone(),
        events: args
            .events
            .as_ref()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))
            })
            .transpose()?,
    };
    let mut done_round = 0u64;
    let mut snapshot_subscribed = false;
    loop {
        let Some(incoming) = link.recv(Duration::from_millis(500))? else {
            continue;
        };
        let mut log = Log::new();
        let out = match incoming {
            Incoming::Connected => {
                eprintln!("{me}: connected to the broker");
                snapshot_subscribed = false; // a restarted broker forgot it: subscribe again
                vec![]
            }
            Incoming::Disconnected(e) => {
                eprintln!("{me}: broker connection lost ({e}); reconnecting");
                vec![]
            }
            // An empty retained publish deletes a retained message: nothing to handle.
            Incoming::Message { payload, .. } if payload.is_empty() => vec![],
            Incoming::Message { topic, payload } => {
                match open_downlink(
                    &topics,
                    &host.public_key,
                    &me,
                    &topic,
                    &payload,
                    max_packet_bytes,
                ) {
                    None => vec![],
                    Some(Err(e)) => {
                        log.refused(&topic, &e);
                        vec![]
                    }
                    Some(Ok(Downlink::Round(state))) => {
                        if let Phase::Failed { reason } = &state.phase
                            && state.config.round >= args.rounds
                            && args.rounds > 0
                        {
                            done_round = state.config.round;
                            eprintln!("{me}: round {} failed: {reason}", state.config.round);
                        }
                        client.on_round(state, &mut log)
                    }
                    Some(Ok(Downlink::Down(message))) => client.on_down(message, &mut log),
                    Some(Ok(Downlink::Global(part))) => {
                        let round = part.round;
                        let out = client.on_global(part, &mut log);
                        if !out.is_empty() {
                            done_round = done_round.max(round);
                        }
                        out
                    }
                    Some(Ok(Downlink::Snapshot(part))) => client.on_snapshot(part, &mut log),
                }
            }
        };
        if client.needs_snapshot() != snapshot_subscribed {
            snapshot_subscribed = client.needs_snapshot();
            if snapshot_subscribed {
                link.subscribe(&topics.all_snapshot())?;
            } else {
                link.unsubscribe(&topics.all_snapshot())?;
            }
        }
        out_log.emit(&mut log)?;
        for msg in out {
            link.publish(&topics.up(&me), postcard::to_stdvec(&msg)?, false)?;
        }
        // Training comes after publishing what preceded it (the round's shares).
        if client.has_training() {
            let out = client.train_ready(&mut log);
            out_log.emit(&mut log)?;
            for msg in out {
                link.publish(&topics.up(&me), postcard::to_stdvec(&msg)?, false)?;
            }
        }
        if args.rounds > 0 && done_round >= args.rounds {
            // Let the last messages leave before disconnecting.
            std::thread::sleep(Duration::from_millis(500));
            link.disconnect();
            eprintln!("{me}: done after round {done_round}");
            return Ok(());
        }
    }
}
