//! The device's [`Platform`] for the federation ([`fedshield_protocol::fleet::edge`]):
//! local training and held-out evaluation of the LoRA adapter with libtorch on a worker
//! thread of its own (so that the MQTT driver keeps draining its link, verifying what comes
//! and answering its downlink while a round trains), the monotonic clock and the OS's
//! entropy. Everything across rounds (global adapter, history, residual, pending uploads,
//! snapshots) is the protocol's `EdgeFleet`; the MQTT link and the files are
//! `fedshield-edge run`'s.

use crate::llama::Llama;
use crate::lora::Lora;
use crate::sft::{LocalRun, Sequence, train_local};
use crate::train::{Batch, TrainConfig, Trainer, evaluate};
#[cfg(doc)]
use fedshield_protocol::fleet::edge::Training;
use fedshield_protocol::fleet::edge::{Platform, Trained};
use fedshield_protocol::fleet::steps::{DeviceStatus, Effort, Stopped, Task, Thermal};
use fedshield_protocol::messages::RoundConfig;
use fedshield_telemetry::{Reading, Telemetry};
use rand::RngCore;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::Instant;

pub use fedshield_protocol::fleet::edge::{Audit, EdgeFleet, EdgeOutput, Event, RigNotice};

/// What the device trains with (moved onto the worker thread: every libtorch object of
/// the device lives there).
pub struct Device {
    /// The base model.
    pub model: Llama,
    /// The adapter (holds the values being trained or evaluated).
    pub lora: Lora,
    /// Local training data.
    pub train: Vec<Sequence>,
    /// Held-out batches.
    pub eval: Vec<Batch>,
    /// Learning rate.
    pub lr: f64,
    /// Sequences per step.
    pub batch_size: usize,
    /// How a step runs (the memory planner's choice, applied to `model` already).
    pub plan: crate::plan::Plan,
    /// Padding token.
    pub pad: u32,
    /// Seed of data order and dropout.
    pub seed: u64,
    /// libtorch CPU threads (OpenMP's setting is per thread: set again on the worker).
    pub threads: i32,
    /// Paces training by the box's sensors.
    pub pacer: crate::pacing::Pacer,
}

impl Device {
    fn load(&self, global: &[f32]) -> Result<(), String> {
        self.lora.load_flat(global).map_err(|e| e.to_string())
    }

    fn train(
        &mut self,
        config: &RoundConfig,
        task: &Task,
        global: &[f32],
    ) -> Result<Trained, String> {
        let round = config.round;
        if self.train.is_empty() {
            return Err("this device has no training examples".into());
        }
        self.load(global)?;
        let t = Instant::now();
        let mut trainer = Trainer::new(
            &self.lora,
            TrainConfig {
                checkpointing: self.plan.checkpointing,
                ..TrainConfig::constant(self.lr, (self.seed ^ round) as i64)
            },
        )
        .map_err(|e| e.to_string())?;
        let micro = self.plan.micro_batch.clamp(1, self.batch_size.max(1));
        let run = LocalRun {
            steps: task.steps,
            batch_size: micro,
            grad_accum: self.batch_size.max(1).div_ceil(micro),
            eval_every: 0,
            seed: self.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            pad: self.pad,
        };
        let (mut last_loss, mut steps, mut tokens) = (f64::NAN, 0, 0);
        let before = self.pacer.report();
        self.pacer.start_run(Some(task.train_seconds));
        train_local(
            &self.model,
            &self.lora,
            &mut trainer,
            crate::sft::Data {
                train: &self.train,
                eval: &[],
            },
            &run,
            &mut self.pacer,
            |p| {
                last_loss = p.stats.loss;
                steps = p.step;
                tokens = p.tokens;
            },
        );
        self.pacer.end_run();
        let after = self.pacer.report();
        if after.slowed_steps > before.slowed_steps
            || after.paused_s > before.paused_s
            || after.stops > before.stops
        {
            tracing::info!(
                "round {round}: pacing: {} of {} steps slowed ({:.1} s of sleep), {:.1} s paused{}",
                after.slowed_steps - before.slowed_steps,
                after.steps - before.steps,
                after.slept_s - before.slept_s,
                after.paused_s - before.paused_s,
                if after.stops > before.stops {
                    "; a long pause ended the round's training early"
                } else {
                    ""
                }
            );
        }
        if after.deadline_stops > before.deadline_stops {
            tracing::info!(
                "round {round}: the round's {:.0} s of training ran out after {steps} of {} steps; uploading those",
                task.train_seconds,
                task.steps
            );
        }
        let delta = self
            .lora
            .flatten()
            .iter()
            .zip(global)
            .map(|(l, g)| l - g)
            .collect();
        self.load(global)?;
        let seconds = t.elapsed().as_secs_f64();
        let effort = Effort {
            assigned: task.steps as u32,
            steps: steps as u32,
            tokens: tokens as u64,
            seconds,
            throttled_seconds: (after.slept_s - before.slept_s)
                + (after.paused_s - before.paused_s),
            throttled_steps: (after.slowed_steps - before.slowed_steps) as u32,
            joules: after.joules.map(|j| j - before.joules.unwrap_or(0.0)),
            stopped: if after.deadline_stops > before.deadline_stops {
                Some(Stopped::Deadline)
            } else if after.stops > before.stops {
                Some(Stopped::Paused)
            } else {
                None
            },
        };
        Ok(Trained {
            delta,
            seconds,
            last_loss,
            effort,
        })
    }

    fn evaluate(&self, global: &[f32]) -> f64 {
        match self.load(global) {
            Ok(()) => evaluate(&self.model, Some(&self.lora), &self.eval),
            Err(_) => f64::NAN, // not reportable: the fleet logs it and sends nothing
        }
    }
}

enum Request {
    Train(Box<(RoundConfig, Task)>, Vec<f32>),
    Evaluate(Vec<f32>),
}

enum Reply {
    Trained(Result<Trained, String>),
    Evaluated(f64),
}

/// The text of a panic's payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// [`Device`] on its worker thread, as the federation's platform. A panic in libtorch (out
/// of memory, for one) fails that request, not the device.
pub struct TorchPlatform {
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    clock: Instant,
    training: bool,
    initial: Vec<f32>,
    samples: u64,
    /// The plan and budget reported with each join.
    status: DeviceStatus,
    /// The box's sensors, read for each join's power mode and thermal state.
    telemetry: Option<Telemetry>,
}

/// The status of a box from one reading: its power mode and the zone closest to its
/// passive trip point; critical when that zone is at or past the trip point (the governor
/// would pause training there, so the device sits the round out instead).
pub fn status_of(reading: &Reading, mut status: DeviceStatus) -> DeviceStatus {
    status.power_mode = reading
        .power_mode
        .as_ref()
        .map(|m| m.name.clone().unwrap_or_else(|| format!("mode {}", m.id)));
    status.thermal = reading.hottest().and_then(|(zone, headroom)| {
        Some(Thermal {
            zone: zone.name.clone(),
            celsius: zone.temp?.0,
            headroom: headroom.0,
        })
    });
    status.critical = status.thermal.as_ref().and_then(|t| {
        (t.headroom <= 0.0).then(|| {
            format!(
                "{} at {:.1} C, {:.1} C past its passive trip point",
                t.zone, t.celsius, -t.headroom
            )
        })
    });
    status
}

impl TorchPlatform {
    /// Moves `device` onto a worker thread; `status` (its plan and memory budget) and the
    /// readings of `telemetry` are what it reports when it joins a round.
    pub fn spawn(
        device: Device,
        status: DeviceStatus,
        telemetry: Option<Telemetry>,
    ) -> Result<Self, crate::EdgeError> {
        let initial = device.lora.flatten();
        let samples = device.train.len() as u64;
        let (requests, work) = channel::<Request>();
        let (done, replies) = channel();
        let mut device = device;
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || {
                tch::set_num_threads(device.threads);
                for request in work {
                    let reply =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &request {
                            Request::Train(job, global) => {
                                Reply::Trained(device.train(&job.0, &job.1, global))
                            }
                            Request::Evaluate(global) => Reply::Evaluated(device.evaluate(global)),
                        }))
                        .unwrap_or_else(|panic| {
                            let why = panic_text(panic.as_ref());
                            match request {
                                Request::Train(..) => {
                                    Reply::Trained(Err(format!("training panicked: {why}")))
                                }
                                Request::Evaluate(_) => Reply::Evaluated(f64::NAN),
                            }
                        });
                    if done.send(reply).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| crate::EdgeError::Thread {
                what: "trainer",
                source,
            })?;
        Ok(Self {
            requests,
            replies,
            clock: Instant::now(),
            training: false,
            initial,
            samples,
            status,
            telemetry,
        })
    }

    /// The adapter's values at start (its layout and seeded initial values).
    pub fn initial(&self) -> Vec<f32> {
        self.initial.clone()
    }

    /// Samples on this device.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Starts training `config` from `global` (a [`Training`]'s) on the worker;
    /// [`TorchPlatform::trained`] has the result. Until then, requests that need the
    /// model are refused (the fleet defers them).
    pub fn start(&mut self, config: &RoundConfig, task: &Task, global: &[f32]) {
        // A worker that is gone answers through `trained` (disconnected).
        let _ = self.requests.send(Request::Train(
            Box::new((config.clone(), task.clone())),
            global.to_vec(),
        ));
        self.training = true;
    }

    /// The result of the training started last, once it is there.
    pub fn trained(&mut self) -> Option<Result<Trained, String>> {
        if !self.training {
            return None;
        }
        match self.replies.try_recv() {
            Ok(Reply::Trained(result)) => {
                self.training = false;
                Some(result)
            }
            Ok(Reply::Evaluated(_)) => None, // cannot happen: one request at a time
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.training = false;
                Some(Err("the training thread stopped".into()))
            }
        }
    }

    /// Sends `request` and waits for its reply; `None` if the worker is gone or busy.
    fn ask(&mut self, request: Request) -> Option<Reply> {
        if self.training {
            return None; // the fleet defers what needs the model while it trains
        }
        self.requests.send(request).ok()?;
        self.replies.recv().ok()
    }
}

impl Platform for TorchPlatform {
    fn train(
        &mut self,
        config: &RoundConfig,
        task: &Task,
        global: &[f32],
    ) -> Result<Trained, String> {
        match self.ask(Request::Train(
            Box::new((config.clone(), task.clone())),
            global.to_vec(),
        )) {
            Some(Reply::Trained(result)) => result,
            _ => Err("the training thread is busy or stopped".into()),
        }
    }

    fn status(&mut self) -> DeviceStatus {
        match &self.telemetry {
            Some(t) => status_of(&t.read(), self.status.clone()),
            None => self.status.clone(),
        }
    }

    fn evaluate(&mut self, global: &[f32]) -> f64 {
        match self.ask(Request::Evaluate(global.to_vec())) {
            Some(Reply::Evaluated(loss)) => loss,
            _ => f64::NAN,
        }
    }

    fn seconds(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn entropy(&mut self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        // ThreadRng: ChaCha12 seeded from the OS and reseeded as it goes.
        rand::rng().fill_bytes(&mut bytes);
        bytes
    }
}

/// Restores `fleet` from its state file at `path`: `None` when the file is missing (a
/// fresh start), else the log line of what was restored. A file that cannot be read, does
/// not decode or is another device's or layout's is refused, naming the file, and left as it
/// is: the operator decides.
pub fn open_state(
    fleet: &mut EdgeFleet,
    path: &std::path::Path,
) -> Result<Option<String>, crate::EdgeError> {
    let bad = |why: String| crate::EdgeError::State {
        path: path.to_path_buf(),
        why,
    };
    match fedshield_store::read_existing(path).map_err(|e| bad(e.to_string()))? {
        None => Ok(None),
        Some(bytes) => fleet
            .restore(&bytes)
            .map(Some)
            .map_err(|e| bad(e.to_string())),
    }
}
