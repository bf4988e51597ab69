//! `fedshield-rig`: a simulated test rig on a serial port (one end of a pty pair, or a
//! USB-serial adapter wired to a real device's UART). It runs `fedshield_rig::sim::Rig` (the
//! logic rig firmware runs) with a scenario file, writes a JSON-lines log of every decision
//! and a measurement every second, and plays the power relay on the device's process: the
//! command after `--` is started at once, killed with SIGKILL when the scenario cuts the
//! power, and started again when the power comes back. With `--relay LISTEN=UPSTREAM` it
//! plays the network relay too: a TCP proxy from LISTEN to UPSTREAM (the broker) that
//! stops forwarding while the scenario cuts the network; point the device at LISTEN.
//!
//!     fedshield-rig --port /dev/pts/7 --scenario cut.toml --log rig.jsonl \
//!         --relay 127.0.0.1:18830=127.0.0.1:1883 -- fedshield-edge run --broker 127.0.0.1:18830 ...

use anyhow::Context;
use clap::Parser;
use fedshield_hil_tests::net_relay::NetRelay;
use fedshield_hil_tests::rig_sim::{ScenarioFile, SimOptions, SimRig};
use fedshield_rig::sim::Output;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "A simulated hardware-in-the-loop rig on a serial port")]
struct Args {
    /// The serial port the device's rig link is wired to.
    #[arg(long)]
    port: PathBuf,
    /// The scenario (TOML; see `fedshield_hil_tests::rig_sim::ScenarioFile`).
    #[arg(long)]
    scenario: PathBuf,
    /// The log, one JSON object per line.
    #[arg(long)]
    log: PathBuf,
    /// Seed of the line noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Play the network relay as a TCP proxy: LISTEN=UPSTREAM (two socket addresses).
    #[arg(long, value_parser = relay_addrs)]
    relay: Option<(SocketAddr, SocketAddr)>,
    /// Stop after this many seconds (0: once the device has exited by itself, or, without a
    /// device, once the scenario is done).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// The device's command.
    #[arg(last = true)]
    device: Vec<String>,
}

fn relay_addrs(text: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, upstream) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected LISTEN=UPSTREAM, two socket addresses"))?;
    let parse = |a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|e| format!("{a:?}: {e} (expected an address like 127.0.0.1:1883)"))
    };
    Ok((parse(listen)?, parse(upstream)?))
}

fn start(device: &[String]) -> anyhow::Result<Option<Child>> {
    let Some((program, args)) = device.split_first() else {
        return Ok(None);
    };
    let child = Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("starting the device: {program}"))?;
    Ok(Some(child))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let scenario = ScenarioFile::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.scenario.display()))?;
    let rig = scenario.rig().map_err(anyhow::Error::msg)?;
    let relay = args
        .relay
        .map(|(listen, upstream)| {
            NetRelay::start_on(listen, upstream)
                .with_context(|| format!("the network relay on {listen}"))
        })
        .transpose()?;
    let options = SimOptions {
        noise_seed: args.seed,
        network: relay.as_ref().map(NetRelay::switch),
        ..SimOptions::default()
    };
    let sim = SimRig::spawn_with(&args.port, rig, options)?;
    let mut log = fedshield_store::JsonLines::open(&args.log)?;
    let started = Instant::now();
    let ms = || started.elapsed().as_millis() as u64;
    let mut device = start(&args.device)?;
    if device.is_some() {
        log.append(&json!({"t_ms": ms(), "event": "device-started"}))?;
    }
    let mut seen = 0;
    let mut next_measurement = 0;
    loop {
        let entries = sim.log();
        for (t, out) in &entries[seen.min(entries.len())..] {
            seen += 1;
            let entry = match out {
                Output::Fired(i) => json!({"t_ms": t, "event": "fired", "step": i,
                    "fault": scenario.step[*i].fault}),
                Output::Power(on) => json!({"t_ms": t, "event": "power", "on": on}),
                Output::Network(on) => json!({"t_ms": t, "event": "network", "on": on}),
                Output::Noise(ppm) => json!({"t_ms": t, "event": "noise", "per_million": ppm}),
                Output::Send(_) => continue,
            };
            log.append(&entry)?;
            match out {
                Output::Power(false) => {
                    if let Some(mut child) = device.take() {
                        let _ = child.kill(); // SIGKILL: the power is gone
                        let status = child.wait()?;
                        log.append(&json!({"t_ms": ms(), "event": "device-killed",
                            "status": status.to_string()}))?;
                    }
                }
                Output::Power(true) if device.is_none() && !args.device.is_empty() => {
                    device = start(&args.device)?;
                    log.append(&json!({"t_ms": ms(), "event": "device-started"}))?;
                }
                _ => {}
            }
        }
        let now = ms();
        if now >= next_measurement {
            next_measurement = now + 1_000;
            let (sensors, temperature, relays) =
                sim.with(|r| (r.sensors(now), r.temperature(), r.relays()));
            log.append(&json!({"t_ms": now, "event": "measurement",
                "supply_mv": sensors.supply_mv, "supply_ma": sensors.supply_ma,
                "temperature_c": temperature, "power": relays.power, "network": relays.network,
                "device": sim.with(|r| r.device_status()).map(|s| json!({
                    "round": s.round, "phase": format!("{:?}", s.phase), "step": s.step,
                    "duty_pct": s.duty_pct, "persisted_round": s.persisted_round}))}))?;
        }
        if let Some(child) = &mut device
            && let Some(status) = child.try_wait()?
        {
            log.append(&json!({"t_ms": ms(), "event": "device-exited",
                "status": status.to_string()}))?;
            device = None;
            if args.seconds == 0 {
                return Ok(());
            }
        }
        let done = if args.seconds > 0 {
            started.elapsed() >= Duration::from_secs(args.seconds)
        } else {
            args.device.is_empty() && sim.with(|r| r.scenario_done())
        };
        if done {
            if let Some(mut child) = device.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
