//! The device's [`Platform`] for the federation ([`fedshield_protocol::fleet::edge`]):
//! local training and held-out evaluation of the LoRA adapter with libtorch, the monotonic
//! clock and the OS's entropy. Everything across rounds (global adapter, history, residual,
//! pending uploads, snapshots) is the protocol's `EdgeFleet`; the MQTT link and the files
//! are `fedshield-edge run`'s.

use crate::llama::Llama;
use crate::lora::Lora;
use crate::sft::{LocalRun, Sequence, train_local};
use crate::train::{Batch, TrainConfig, Trainer, evaluate};
use fedshield_protocol::fleet::edge::{Platform, Trained};
use fedshield_protocol::messages::RoundConfig;
use rand::RngCore;
use std::time::Instant;

pub use fedshield_protocol::fleet::edge::{Audit, EdgeFleet, EdgeOutput, Event};

/// What the device trains with.
pub struct Device<'a> {
    /// The base model.
    pub model: &'a Llama,
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
    /// Padding token.
    pub pad: u32,
    /// Seed of data order and dropout.
    pub seed: u64,
}

/// [`Device`] as the federation's platform.
pub struct TorchPlatform<'a> {
    device: Device<'a>,
    clock: Instant,
}

impl<'a> TorchPlatform<'a> {
    /// The platform of `device`.
    pub fn new(device: Device<'a>) -> Self {
        Self {
            device,
            clock: Instant::now(),
        }
    }

    /// The adapter's values at start (its layout and seeded initial values).
    pub fn initial(&self) -> Vec<f32> {
        self.device.lora.flatten()
    }

    /// The adapter.
    pub fn lora(&self) -> &Lora {
        &self.device.lora
    }

    /// Samples on this device.
    pub fn samples(&self) -> u64 {
        self.device.train.len() as u64
    }

    fn load(&self, global: &[f32]) -> Result<(), String> {
        self.device
            .lora
            .load_flat(global)
            .map_err(|e| e.to_string())
    }
}

impl Platform for TorchPlatform<'_> {
    fn train(&mut self, config: &RoundConfig, global: &[f32]) -> Result<Trained, String> {
        let d = &self.device;
        let round = config.round;
        self.load(global)?;
        let t = Instant::now();
        let mut trainer = Trainer::new(
            &d.lora,
            TrainConfig::constant(d.lr, (d.seed ^ round) as i64),
        )
        .map_err(|e| e.to_string())?;
        let run = LocalRun {
            steps: config.local_steps,
            batch_size: d.batch_size,
            grad_accum: 1,
            eval_every: 0,
            seed: d.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            pad: d.pad,
        };
        let mut last_loss = f64::NAN;
        train_local(d.model, &d.lora, &mut trainer, &d.train, &[], &run, |p| {
            last_loss = p.stats.loss
        });
        let delta = d
            .lora
            .flatten()
            .iter()
            .zip(global)
            .map(|(l, g)| l - g)
            .collect();
        self.load(global)?;
        Ok(Trained {
            delta,
            seconds: t.elapsed().as_secs_f64(),
            last_loss,
        })
    }

    fn evaluate(&mut self, global: &[f32]) -> f64 {
        match self.load(global) {
            Ok(()) => evaluate(
                self.device.model,
                Some(&self.device.lora),
                &self.device.eval,
            ),
            Err(_) => f64::NAN, // not reportable: the fleet logs it and sends nothing
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
