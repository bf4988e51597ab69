//! `fedshield-host fold-worker`: the driver of one fold shard's worker
//! (`fedshield_protocol::shard::FoldWorker`). It subscribes to its shard's upload topics and
//! to the host's commands for it, feeds both to the machine, and publishes the machine's
//! reports. It keeps nothing on disk: a restarted worker says hello under a new instance,
//! and the host has the shard's devices send their uploads again.

use fedshield_host::fleet::FleetDir;
use fedshield_protocol::ProtocolError;
use fedshield_protocol::messages::{EdgeMessage, Route, Topics};
use fedshield_protocol::shard::{FoldWorker, ShardCommand, ShardUplink, WorkerEvent};
use fedshield_store::JsonLines;
use fedshield_telemetry::process;
use fedshield_transport::{BrokerArgs, Incoming};
use rand::Rng;
use std::path::PathBuf;
use std::time::Duration;

/// A fold worker's settings.
pub struct WorkerConfig {
    /// Fleet name.
    pub fleet: String,
    /// Fleet directory (the registry checks the devices' manifests).
    pub fleet_dir: FleetDir,
    /// Broker address, credentials (the host's), TLS and packet limit.
    pub broker: BrokerArgs,
    /// The shard this worker folds.
    pub shard: u32,
    /// The event file, if any.
    pub events: Option<PathBuf>,
}

/// Runs the worker until its link fails for good.
pub fn run(cfg: WorkerConfig) -> anyhow::Result<()> {
    let topics = Topics::new(&cfg.fleet)?;
    let (registry, _) = cfg.fleet_dir.registry()?;
    let instance: u64 = rand::rng().random();
    let mut worker = FoldWorker::new(cfg.shard, instance, registry);
    // Like the host's: what arrives faster than it folds waits at the broker.
    let link = crate::serve::held_link(
        &cfg.broker,
        format!("fedshield-fold-{}-{}", cfg.fleet, cfg.shard),
        vec![
            topics.shard_uploads(cfg.shard),
            topics.fold_command(cfg.shard),
        ],
    )?;
    let mut events = cfg.events.as_deref().map(JsonLines::open).transpose()?;
    let mut event = |e: WorkerEvent| {
        if let Some(file) = &mut events
            && let Err(err) = file.append(&e)
        {
            tracing::warn!("event not recorded: {err}");
        }
    };
    let report_topic = topics.fold_report(cfg.shard);
    let publish = |uplinks: Vec<ShardUplink>| -> anyhow::Result<()> {
        for u in uplinks {
            link.publish(&report_topic, postcard::to_stdvec(&u)?, false)?;
        }
        Ok(())
    };
    let limit = cfg.broker.max_packet_bytes;
    tracing::info!(
        "fold worker of shard {} (instance {instance:016x})",
        cfg.shard
    );
    loop {
        let Some(incoming) = link.recv(Duration::from_millis(500))? else {
            continue;
        };
        let (topic, payload) = match incoming {
            Incoming::Connected => {
                event(WorkerEvent::Connected {
                    shard: cfg.shard,
                    instance,
                });
                publish(vec![worker.hello()])?;
                continue;
            }
            Incoming::Disconnected(e) => {
                tracing::warn!("broker connection lost ({e}); reconnecting");
                continue;
            }
            Incoming::Cut => continue,
            Incoming::Message { topic, payload } => (topic, payload),
        };
        let (device, result) = match topics.route(&topic) {
            Some(Route::FoldCommand(s)) if s == cfg.shard => {
                let command = fedshield_protocol::decode::<ShardCommand>(&payload, limit);
                if let Ok(ShardCommand::Open { .. }) = &command {
                    // The fleet's enrolments as of this round.
                    match cfg.fleet_dir.registry() {
                        Ok((registry, _)) => worker.set_registry(registry),
                        Err(e) => tracing::warn!("registry not reloaded: {e:#}"),
                    }
                }
                let closing = match &command {
                    Ok(ShardCommand::Close { round }) => Some(*round),
                    _ => None,
                };
                let opened_before = worker.round();
                let result = command.and_then(|c| worker.on_command(c));
                if result.is_ok() {
                    if let Some(round) = worker.round().filter(|r| opened_before != Some(*r)) {
                        tracing::info!("round {round}: collecting shard {}", cfg.shard);
                        event(WorkerEvent::Opened { round });
                    }
                    if let Some(round) = closing {
                        tracing::info!(
                            "round {round}: shard {} closed with {} uploads folded",
                            cfg.shard,
                            worker.folded()
                        );
                        event(WorkerEvent::Closed {
                            round,
                            folded: worker.folded(),
                            cpu_s: process::process_cpu().as_secs_f64(),
                            peak_rss_mib: process::peak_rss().unwrap_or(0) as f64
                                / f64::from(1 << 20),
                        });
                    }
                }
                (None, result)
            }
            Some(Route::Upload(s, device)) if s == cfg.shard => {
                if worker.has_folded(&device) {
                    continue; // sent again: already in the sum
                }
                let result = fedshield_protocol::decode::<EdgeMessage>(&payload, limit)
                    .and_then(|m| worker.on_upload(&device, m));
                (Some(device), result)
            }
            _ => continue,
        };
        match result {
            Ok(uplinks) => publish(uplinks)?,
            Err(e) => refused(&mut event, device.as_ref().map(|d| d.0.as_str()), &e),
        }
    }
}

fn refused(event: &mut impl FnMut(WorkerEvent), device: Option<&str>, e: &ProtocolError) {
    match device {
        Some(d) => tracing::warn!("refused an upload message from {d}: {e}"),
        None => tracing::warn!("refused a command: {e}"),
    }
    event(WorkerEvent::Refused {
        device: device.map(str::to_string),
        kind: e.kind().to_string(),
        detail: e.to_string(),
    });
}
