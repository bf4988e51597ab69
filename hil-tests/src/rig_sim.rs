//! A simulated rig on a real serial port: `fedshield_rig::sim::Rig` (the same logic rig
//! firmware runs) driven over a pty by a thread of its own, with line noise applied to what
//! it sends and every decision logged with its time. The whole-system tests put one beside
//! each edge.

use crate::net_relay::RelaySwitch;
use fedshield_edge::serial_link::SerialLink;
use fedshield_rig::frame::encode;
use fedshield_rig::sim::{Output, Rig};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The rig of the tests: a 19 V supply, 300 mA idle and 1.3 A at training load, readings
/// no faster than `min_interval_ms`, the device's `thermal` behaviour, playing `scenario`.
pub fn bench_rig(
    thermal: fedshield_rig::sim::Thermal,
    min_interval_ms: u32,
    scenario: Vec<fedshield_rig::sim::Step>,
) -> Rig {
    Rig::new(
        fedshield_rig::sim::RigConfig {
            firmware: "rig-sim 0.1".into(),
            supply_mv: 19_000,
            idle_ma: 300,
            busy_ma: 1_300,
            thermal,
            min_interval_ms,
        },
        scenario,
    )
}

/// A running simulated rig; stops when dropped.
pub struct SimRig {
    log: Arc<Mutex<Vec<(u64, Output)>>>,
    rig: Arc<Mutex<Rig>>,
    stop: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    line: Arc<LineCounts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a [`SimRig`] put on the line.
#[derive(Debug, Default)]
struct LineCounts {
    frames: AtomicU64,
    corrupted: AtomicU64,
}

/// How a [`SimRig`] plays its outputs beyond the serial line.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Seed of the line noise.
    pub noise_seed: u64,
    /// Where to write the modelled device temperature (millidegrees, as sysfs does) as it
    /// changes: the device's own thermal zone in its telemetry fixture, so that its
    /// governor sees the heat the rig models.
    pub zone_temp: Option<std::path::PathBuf>,
    /// The device's network relay, played on the rig's network output.
    pub network: Option<RelaySwitch>,
    /// The protocol version and digest this rig's identity claims instead of its own: a
    /// rig flashed with firmware of another protocol version.
    pub claims: Option<(u16, u64)>,
}

impl SimRig {
    /// Serves `rig` on the serial port `port` (one end of a pty pair).
    pub fn spawn(port: &std::path::Path, rig: Rig, noise_seed: u64) -> anyhow::Result<Self> {
        Self::spawn_with(
            port,
            rig,
            SimOptions {
                noise_seed,
                ..SimOptions::default()
            },
        )
    }

    /// As [`SimRig::spawn`], with the relays and sensors of `options`.
    pub fn spawn_with(
        port: &std::path::Path,
        rig: Rig,
        options: SimOptions,
    ) -> anyhow::Result<Self> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let rig = Arc::new(Mutex::new(rig));
        let stop = Arc::new(AtomicBool::new(false));
        let mute = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let link = {
            let _inside = runtime.enter();
            SerialLink::open(&port.to_string_lossy(), 115_200)?
        };
        let line = Arc::new(LineCounts::default());
        let (l, r, s, m, c) = (
            log.clone(),
            rig.clone(),
            stop.clone(),
            mute.clone(),
            line.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("sim-rig".into())
            .spawn(move || runtime.block_on(serve(link, r, l, s, m, c, options)))?;
        Ok(Self {
            log,
            rig,
            stop,
            mute,
            line,
            thread: Some(thread),
        })
    }

    /// What the rig decided so far, with the milliseconds since it started.
    pub fn log(&self) -> Vec<(u64, Output)> {
        self.log.lock().unwrap().clone()
    }

    /// The rig's state (readings, relays, the device's last status).
    pub fn with<T>(&self, f: impl FnOnce(&Rig) -> T) -> T {
        f(&self.rig.lock().unwrap())
    }

    /// Frames sent to the edge, and of them frames the line noise corrupted.
    pub fn frames_sent(&self) -> (u64, u64) {
        (
            self.line.frames.load(Ordering::SeqCst),
            self.line.corrupted.load(Ordering::SeqCst),
        )
    }

    /// Stops sending anything (a rig that went silent) or starts again.
    pub fn mute(&self, mute: bool) {
        self.mute.store(mute, Ordering::SeqCst);
    }
}

impl Drop for SimRig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    mut link: SerialLink,
    rig: Arc<Mutex<Rig>>,
    log: Arc<Mutex<Vec<(u64, Output)>>>,
    stop: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    line: Arc<LineCounts>,
    options: SimOptions,
) {
    let mut written = i64::MIN;
    let start = Instant::now();
    let mut noise_ppm = 0u32;
    let mut state = options.noise_seed | 1;
    while !stop.load(Ordering::SeqCst) {
        let received = link.recv(Duration::from_millis(20)).await;
        let now = start.elapsed().as_millis() as u64;
        let mut outputs = match &received {
            Ok(m) => rig.lock().unwrap().on_message(m, now),
            Err(_) => Vec::new(),
        };
        outputs.extend(rig.lock().unwrap().tick(now));
        if let Some(path) = &options.zone_temp {
            let milli = (rig.lock().unwrap().temperature() * 1000.0) as i64;
            if milli != written {
                written = milli;
                // Replaced whole (write, then rename), as a sysfs read sees it.
                let tmp = path.with_extension("rig-tmp");
                if std::fs::write(&tmp, format!("{milli}\n")).is_ok() {
                    let _ = std::fs::rename(&tmp, path);
                }
            }
        }
        for out in outputs {
            match out {
                Output::Send(mut m) => {
                    if mute.load(Ordering::SeqCst) {
                        continue;
                    }
                    if let Some(claims) = options.claims {
                        claim(&mut m, claims);
                    }
                    let Ok(frames) = encode(&m) else { continue };
                    let mut bytes = Vec::new();
                    for mut frame in frames {
                        let mut corrupted = false;
                        for b in &mut frame {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            if noise_ppm > 0 && (state % 1_000_000) < u64::from(noise_ppm) {
                                *b ^= 1 + ((state >> 20) % 255) as u8;
                                corrupted = true;
                            }
                        }
                        line.frames.fetch_add(1, Ordering::SeqCst);
                        if corrupted {
                            line.corrupted.fetch_add(1, Ordering::SeqCst);
                        }
                        bytes.extend(frame);
                    }
                    let _ = link.send_raw(&bytes).await;
                }
                other => {
                    match &other {
                        Output::Noise(ppm) => noise_ppm = *ppm,
                        Output::Network(connected) => {
                            if let Some(relay) = &options.network {
                                relay.set(*connected);
                            }
                        }
                        _ => {}
                    }
                    log.lock().unwrap().push((now, other));
                }
            }
        }
    }
}

/// Rewrites an identity answer to claim another protocol version and digest.
fn claim(m: &mut fedshield_rig::frame::Message, (protocol, digest): (u16, u64)) {
    use fedshield_rig::messages::{Endpoint, IdentifyEndpoint, Identity};
    if m.key != IdentifyEndpoint::RESPONSE_KEY {
        return;
    }
    if let Ok(mut identity) = postcard::from_bytes::<Identity>(&m.body) {
        identity.protocol = protocol;
        identity.digest = digest;
        if let Ok(body) = postcard::to_stdvec(&identity) {
            m.body = body;
        }
    }
}

/// A scenario file (TOML): the rig's properties and its fault steps.
///
/// ```toml
/// [rig]
/// firmware = "rig-sim 0.1"
/// supply_mv = 19000
/// idle_ma = 300
/// busy_ma = 1300
/// min_interval_ms = 50
///
/// [thermal]
/// ambient_c = 30.0
/// rise_c = 50.0
/// tau_s = 60.0
///
/// [[step]]                  # one trigger: at_ms, or round (+ phase, or + step)
/// round = 1
/// phase = "training"        # idle, joined, training, uploading, waiting
/// fault = "cut-power"       # cut-network, cut-power, heat, noise
/// warn_ms = 800
/// off_ms = 2000
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// The rig.
    pub rig: RigSection,
    /// The device's thermal behaviour.
    pub thermal: ThermalSection,
    /// The faults, in order.
    #[serde(default)]
    pub step: Vec<StepSection>,
}

/// `[rig]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RigSection {
    /// Firmware name.
    #[serde(default = "default_firmware")]
    pub firmware: String,
    /// Supply voltage, mV.
    pub supply_mv: u32,
    /// Idle current, mA.
    pub idle_ma: u32,
    /// Full-load current, mA.
    pub busy_ma: u32,
    /// Shortest telemetry interval, ms.
    #[serde(default = "default_interval")]
    pub min_interval_ms: u32,
}

fn default_firmware() -> String {
    "fedshield-rig-sim".into()
}

fn default_interval() -> u32 {
    50
}

/// `[thermal]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThermalSection {
    /// Ambient, C.
    pub ambient_c: f64,
    /// Rise at full load, C.
    pub rise_c: f64,
    /// Time constant, s.
    pub tau_s: f64,
}

/// `[[step]]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSection {
    /// At this many ms after the rig started ...
    pub at_ms: Option<u64>,
    /// ... or when the device reports this round ...
    pub round: Option<u64>,
    /// ... in this phase ...
    pub phase: Option<String>,
    /// ... or with at least this many steps trained.
    pub step: Option<u32>,
    /// cut-network, cut-power, heat or noise.
    pub fault: String,
    /// How long (cut-network, heat, noise).
    pub for_ms: Option<u64>,
    /// Warning before a power cut.
    pub warn_ms: Option<u32>,
    /// Time without power.
    pub off_ms: Option<u64>,
    /// Degrees added (heat).
    pub celsius: Option<f64>,
    /// Byte errors per million (noise).
    pub per_million: Option<u32>,
}

fn phase_named(name: &str) -> Result<fedshield_rig::messages::EdgePhase, String> {
    use fedshield_rig::messages::EdgePhase::*;
    Ok(match name {
        "idle" => Idle,
        "joined" => Joined,
        "training" => Training,
        "uploading" => Uploading,
        "waiting" => Waiting,
        other => {
            return Err(format!(
                "phase {other:?}: one of idle, joined, training, uploading, waiting"
            ));
        }
    })
}

impl StepSection {
    fn step(&self, i: usize) -> Result<fedshield_rig::sim::Step, String> {
        use fedshield_rig::sim::{Fault, Step, Trigger};
        let at = |what: &str| format!("step {}: {what}", i + 1);
        let when = match (self.at_ms, self.round, &self.phase, self.step) {
            (Some(t), None, None, None) => Trigger::At(t),
            (None, Some(r), None, None) => Trigger::Round(r),
            (None, Some(r), Some(p), None) => {
                Trigger::Phase(r, phase_named(p).map_err(|e| at(&e))?)
            }
            (None, Some(r), None, Some(k)) => Trigger::Step(r, k),
            _ => {
                return Err(at(
                    "one trigger: at_ms, or round, or round with phase, or round with step",
                ));
            }
        };
        let need = |v: Option<u64>, name: &str| {
            v.ok_or_else(|| at(&format!("{} needs {name}", self.fault)))
        };
        let fault = match self.fault.as_str() {
            "cut-network" => Fault::CutNetwork {
                for_ms: need(self.for_ms, "for_ms")?,
            },
            "cut-power" => Fault::CutPower {
                warn_ms: self.warn_ms.ok_or_else(|| at("cut-power needs warn_ms"))?,
                off_ms: need(self.off_ms, "off_ms")?,
            },
            "heat" => Fault::Heat {
                celsius: self.celsius.ok_or_else(|| at("heat needs celsius"))?,
                for_ms: need(self.for_ms, "for_ms")?,
            },
            "noise" => Fault::Noise {
                per_million: self
                    .per_million
                    .filter(|p| *p <= 1_000_000)
                    .ok_or_else(|| at("noise needs per_million, at most 1000000"))?,
                for_ms: need(self.for_ms, "for_ms")?,
            },
            other => {
                return Err(at(&format!(
                    "fault {other:?}: one of cut-network, cut-power, heat, noise"
                )));
            }
        };
        Ok(Step { when, fault })
    }
}

impl ScenarioFile {
    /// Parses a scenario; a clear message for anything it cannot use.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(file.thermal.tau_s.is_finite() && file.thermal.tau_s > 0.0) {
            return Err("thermal.tau_s must be a positive number of seconds".into());
        }
        file.steps()?;
        Ok(file)
    }

    /// The rig's state machine for this scenario.
    pub fn rig(&self) -> Result<Rig, String> {
        use fedshield_rig::sim::{RigConfig, Thermal};
        Ok(Rig::new(
            RigConfig {
                firmware: self.rig.firmware.clone(),
                supply_mv: self.rig.supply_mv,
                idle_ma: self.rig.idle_ma,
                busy_ma: self.rig.busy_ma,
                thermal: Thermal {
                    ambient_c: self.thermal.ambient_c,
                    rise_c: self.thermal.rise_c,
                    tau_s: self.thermal.tau_s,
                },
                min_interval_ms: self.rig.min_interval_ms,
            },
            self.steps()?,
        ))
    }

    fn steps(&self) -> Result<Vec<fedshield_rig::sim::Step>, String> {
        self.step
            .iter()
            .enumerate()
            .map(|(i, s)| s.step(i))
            .collect()
    }
}
