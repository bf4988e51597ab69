//! The quality experiment: what pruning and encryption cost in model quality, on one data
//! split and seed.
//!
//! Runs, all from the same initial adapter, with the same per-client data order and the same
//! local steps per round:
//! - `local-only`: each client trains alone; the mean of the clients' held-out losses.
//! - `fedavg-dense-plain`: FedAvg of the clients' deltas through the codec at rho = 100%,
//!   summed in plaintext (the baseline: same clipping and fixed point as the encrypted runs).
//! - `fedavg-enc-rhoXX` (`fedavg-enc-rhoXX-bYY` for YY-bit ciphertext bodies, 32 otherwise):
//!   the same through the codec at each rho, encrypted with the packed GLWE scheme,
//!   aggregated on ciphertexts and decrypted with the clients' key sum; each client records
//!   what its ciphertext delivered, so the body rounding stays in its residual. The
//!   fixed-point scale is the finest the body width allows for the clients
//!   (`fedshield_crypto::params::finest_scale`).
//!   Clients train every coordinate; what the round's mask drops waits in their
//!   error-feedback residual. The ablation [`LocalTraining::Masked`] trains only the kept
//!   coordinates instead.
//! - `fedavg-enc-...-q8down`: the last encrypted run again, its global update sent down as
//!   8-bit codes with per-block scales, the quantization error carried into the next round's
//!   update (`fedshield_codec::quant`, as the host does by default).
//! - `centralised`: one adapter on the pooled data, as many steps per round as all clients
//!   together.
//!
//! The key sum is computed here by adding the clients' keys; in a deployment the secure
//! aggregation protocol delivers exactly that sum (shared/crypto, `secagg`).

use crate::llama::Llama;
use crate::lora::{Lora, LoraConfig};
use crate::sft::{LocalRun, Sequence, train_local};
use crate::train::{Batch, TrainConfig, Trainer, evaluate};
use fedshield_codec::{
    Downlink, DownlinkFormat, ErrorFeedback, Global, Layout, PlainSum, PruneConfig, Schedule,
    Structure, decode_values,
};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::packed::{Aggregate, BodyBits, ClientKey, Encryptor, MaskSeed};
use fedshield_crypto::params::{POLYNOMIAL_SIZE, finest_scale};
use std::time::Instant;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

/// What clients train in the pruned runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalTraining {
    /// Every coordinate; what the mask drops waits in the error-feedback residual (what
    /// the fleet does).
    Full,
    /// Only the round's kept coordinates (the mask is public and known before training),
    /// at the learning rate times 1/rho, so that a round moves as much in total as a dense
    /// one. An ablation: on SmolLM2 + FAQ (seed 0, 6 rounds, rho = 10%) it ended at 3.387,
    /// below dense FedAvg at the base rate 5e-4 (3.419) but above full training with error
    /// feedback at the masked runs' per-coordinate rate 5e-3, which reached 3.383 by round 4.
    Masked,
}

impl LocalTraining {
    /// Parses `full` or `masked`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "masked" => Ok(Self::Masked),
            _ => Err(format!("local training {s:?}: full or masked")),
        }
    }
}

/// One encrypted configuration: a keep fraction and a body width.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EncryptedRun {
    /// Kept fraction.
    pub rho: f64,
    /// Ciphertext body width.
    pub body_bits: BodyBits,
}

impl EncryptedRun {
    /// Parses `RHO` (32-bit bodies) or `RHO@BITS`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (rho, bits) = match s.trim().split_once('@') {
            Some((r, b)) => (r, b.parse::<u32>().map_err(|e| format!("{s:?}: {e}"))?),
            None => (s.trim(), 32),
        };
        let rho = rho.parse::<f64>().map_err(|e| format!("{s:?}: {e}"))?;
        if !(rho > 0.0 && rho <= 1.0) {
            return Err(format!("{s:?}: rho must be in (0, 1]"));
        }
        let body_bits = BodyBits::new(bits).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Self { rho, body_bits })
    }

    /// The run's name in the report.
    pub fn name(&self) -> String {
        let rho = (self.rho * 100.0).round();
        if self.body_bits == BodyBits::FULL {
            format!("fedavg-enc-rho{rho}")
        } else {
            format!("fedavg-enc-rho{rho}-b{}", self.body_bits)
        }
    }
}

/// Settings of the experiment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QualityConfig {
    /// Federated rounds.
    pub rounds: usize,
    /// Optimizer steps per client per round.
    pub local_steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Learning rate (constant; AdamW restarts every round, as FedAvg clients do).
    pub lr: f64,
    /// The encrypted runs.
    pub encrypted: Vec<EncryptedRun>,
    /// Mask structure.
    pub structure: Structure,
    /// Exploration share of the mask.
    pub explore: f64,
    /// Clip value of the fixed-point encoding.
    pub clip: f32,
    /// What clients train in the pruned runs.
    pub local: LocalTraining,
    /// Runs to do (names as in the report; empty: all).
    pub only: Vec<String>,
    /// Seed of the initial adapter, the data order and the masks.
    pub seed: u64,
    /// Padding token id.
    pub pad: u32,
}

/// One run's results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunReport {
    /// Run name.
    pub name: String,
    /// Kept fraction (None for runs without a codec).
    pub rho: Option<f64>,
    /// Whether updates were encrypted.
    pub encrypted: bool,
    /// Ciphertext body width (encrypted runs).
    pub body_bits: Option<BodyBits>,
    /// Fixed-point scale (runs with a codec).
    pub scale_log2: Option<u32>,
    /// Held-out loss after each round.
    pub eval_loss_per_round: Vec<f64>,
    /// Bytes each client uploaded per round, divided by the adapter's trainable values.
    pub upload_bytes_per_param_per_round: f64,
    /// Bytes each client uploaded per round.
    pub upload_bytes_per_client_per_round: f64,
    /// How the global update went down (`f32`, or `q8` with the host's error feedback;
    /// `None` for runs without a codec).
    pub downlink: Option<DownlinkFormat>,
    /// Bytes of the global update each client downloaded per round (before zstd).
    pub download_bytes_per_client_per_round: f64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Encryption, aggregation and decryption time of the run.
    pub crypto_seconds: f64,
    /// Selected coordinates clipped, summed over clients and rounds.
    pub clipped: usize,
}

impl RunReport {
    /// A run in which nothing is uploaded (local-only, centralised).
    fn without_uploads(name: &str, losses: Vec<f64>, start: Instant) -> Self {
        Self {
            name: name.into(),
            rho: None,
            encrypted: false,
            body_bits: None,
            scale_log2: None,
            eval_loss_per_round: losses,
            upload_bytes_per_param_per_round: 0.0,
            upload_bytes_per_client_per_round: 0.0,
            downlink: None,
            download_bytes_per_client_per_round: 0.0,
            seconds: start.elapsed().as_secs_f64(),
            crypto_seconds: 0.0,
            clipped: 0,
        }
    }
}

/// Everything the runs share.
pub struct Setup<'a> {
    /// The base model.
    pub model: &'a Llama,
    /// Adapter hyper-parameters.
    pub lora: LoraConfig,
    /// Each client's tokenized training data.
    pub clients: Vec<Vec<Sequence>>,
    /// Held-out batches.
    pub eval: Vec<Batch>,
}

/// How a federated run aggregates.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Aggregation {
    Plain,
    Encrypted(BodyBits),
}

impl Setup<'_> {
    fn fresh_lora(&self, cfg: &QualityConfig) -> Lora {
        Lora::new(self.model, self.lora.clone(), cfg.seed as i64)
    }

    fn trainer(&self, lora: &Lora, cfg: &QualityConfig, stream: u64) -> Trainer {
        self.trainer_lr(lora, cfg.lr, cfg, stream)
    }

    fn trainer_lr(&self, lora: &Lora, lr: f64, cfg: &QualityConfig, stream: u64) -> Trainer {
        Trainer::new(lora, TrainConfig::constant(lr, (cfg.seed ^ stream) as i64))
            .expect("AdamW over the adapter")
    }

    /// `steps` local steps on `data`, with the data order of (client, round).
    fn local(
        &self,
        lora: &Lora,
        trainer: &mut Trainer,
        data: &[Sequence],
        steps: usize,
        cfg: &QualityConfig,
        stream: u64,
    ) {
        let run = LocalRun {
            steps,
            batch_size: cfg.batch_size,
            grad_accum: 1,
            eval_every: 0,
            seed: cfg.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            pad: cfg.pad,
        };
        train_local(
            self.model,
            lora,
            trainer,
            crate::sft::Data {
                train: data,
                eval: &[],
            },
            &run,
            &mut crate::pacing::Pacer::off(),
            |_| {},
        );
    }

    fn eval(&self, lora: &Lora) -> f64 {
        evaluate(self.model, Some(lora), &self.eval)
    }

    /// Held-out loss of the initial adapter (B = 0: the base model's loss).
    pub fn initial_loss(&self, cfg: &QualityConfig) -> f64 {
        self.eval(&self.fresh_lora(cfg))
    }

    /// Each client trains alone; the mean held-out loss per round.
    pub fn local_only(&self, cfg: &QualityConfig, mut log: impl FnMut(&str)) -> RunReport {
        let start = Instant::now();
        let lora = self.fresh_lora(cfg);
        let mut params = vec![lora.flatten(); self.clients.len()];
        let mut losses = Vec::new();
        for round in 1..=cfg.rounds {
            let mut sum = 0.0;
            for (k, data) in self.clients.iter().enumerate() {
                lora.load_flat(&params[k]).expect("same layout");
                let stream = stream_id(k, round);
                let mut trainer = self.trainer(&lora, cfg, stream);
                self.local(&lora, &mut trainer, data, cfg.local_steps, cfg, stream);
                params[k] = lora.flatten();
                sum += self.eval(&lora);
            }
            losses.push(sum / self.clients.len() as f64);
            log(&format!(
                "local-only round {round}: mean held-out loss {:.4}",
                losses[round - 1]
            ));
        }
        RunReport::without_uploads("local-only", losses, start)
    }

    /// One adapter on the pooled data.
    pub fn centralised(&self, cfg: &QualityConfig, mut log: impl FnMut(&str)) -> RunReport {
        let start = Instant::now();
        let lora = self.fresh_lora(cfg);
        let pooled: Vec<Sequence> = self.clients.concat();
        let mut trainer = self.trainer(&lora, cfg, u64::MAX);
        let mut losses = Vec::new();
        for round in 1..=cfg.rounds {
            let steps = cfg.local_steps * self.clients.len();
            self.local(
                &lora,
                &mut trainer,
                &pooled,
                steps,
                cfg,
                stream_id(usize::MAX, round),
            );
            losses.push(self.eval(&lora));
            log(&format!(
                "centralised round {round}: held-out loss {:.4}",
                losses[round - 1]
            ));
        }
        RunReport::without_uploads("centralised", losses, start)
    }

    /// FedAvg through the codec, plaintext or encrypted, the global update going down as
    /// `downlink`. Clients are weighted by their sample counts.
    fn fedavg(
        &self,
        cfg: &QualityConfig,
        name: String,
        rho: f64,
        aggregation: Aggregation,
        downlink: DownlinkFormat,
        mut log: impl FnMut(&str),
    ) -> RunReport {
        let start = Instant::now();
        let lora = self.fresh_lora(cfg);
        let layout: Layout = lora.layout().expect("adapter layout");
        let prune = PruneConfig {
            schedule: Schedule::Uniform { rho },
            structure: cfg.structure,
            explore: cfg.explore,
        };
        let body_bits = match aggregation {
            Aggregation::Plain => None,
            Aggregation::Encrypted(b) => Some(b),
        };
        let encoding = match body_bits {
            None => FixedPoint::new(cfg.clip),
            Some(b) => {
                let scale = finest_scale(b, self.clients.len()).expect("clients within the cap");
                FixedPoint::with_scale(cfg.clip, scale)
            }
        }
        .expect("positive clip");
        let samples: Vec<usize> = self.clients.iter().map(Vec::len).collect();
        let total: usize = samples.iter().sum();
        let mut global = Global::starting_from(lora.flatten());
        let mut owed = Downlink::new(layout.len());
        let mut downloaded = 0usize;
        let mut feedback = vec![ErrorFeedback::new(layout.len()); self.clients.len()];
        let mut noise = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(cfg.seed as u128));
        let masked = cfg.local == LocalTraining::Masked && rho < 1.0;
        let lr = if masked { cfg.lr / rho } else { cfg.lr };
        let (mut losses, mut uploaded, mut crypto, mut clipped) = (Vec::new(), 0usize, 0.0, 0);
        for round in 1..=cfg.rounds {
            let selection = global
                .mask(&layout, &prune, round as u64, cfg.seed)
                .expect("valid mask");
            let mask_seed = MaskSeed(((cfg.seed as u128) << 64) | round as u128);
            let mut plain = PlainSum::new(selection.len());
            let mut encrypted =
                Aggregate::new(selection.len(), body_bits.unwrap_or(BodyBits::FULL));
            let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
            let mut prepared = Vec::with_capacity(self.clients.len());
            lora.restrict_training(masked.then_some(selection.indices.as_slice()))
                .expect("selection in layout");
            for (k, data) in self.clients.iter().enumerate() {
                lora.load_flat(global.values()).expect("same layout");
                let stream = stream_id(k, round);
                let mut trainer = self.trainer_lr(&lora, lr, cfg, stream);
                self.local(&lora, &mut trainer, data, cfg.local_steps, cfg, stream);
                let delta: Vec<f32> = lora
                    .flatten()
                    .iter()
                    .zip(global.values())
                    .map(|(l, g)| l - g)
                    .collect();
                let weight = samples[k] as f64 / total as f64;
                let mut p = feedback[k]
                    .prepare(&delta, &selection, &encoding, weight)
                    .expect("delta in layout");
                clipped += p.clipped;
                match aggregation {
                    Aggregation::Plain => {
                        plain.add(&p.plaintexts).expect("selection length");
                        uploaded += 4 * p.plaintexts.len();
                    }
                    Aggregation::Encrypted(body) => {
                        let t = Instant::now();
                        let key = ClientKey::generate(&mut noise);
                        let (ct, delivered) = Encryptor::new(&key, mask_seed, body, &mut noise)
                            .encrypt_delivered(&p.plaintexts);
                        p.record_delivery(&delivered, &encoding, weight)
                            .expect("one delivered value per plaintext");
                        let bytes = postcard::to_stdvec(&ct).expect("serializable");
                        encrypted.add(&ct).expect("selection length");
                        crypto += t.elapsed().as_secs_f64();
                        uploaded += bytes.len();
                        for (s, b) in key_sum.iter_mut().zip(key.coefficients()) {
                            *s = s.wrapping_add(*b);
                        }
                    }
                }
                prepared.push(p);
            }
            lora.restrict_training(None).expect("no restriction");
            let sums = match aggregation {
                Aggregation::Plain => plain.sums().to_vec(),
                Aggregation::Encrypted(_) => {
                    let t = Instant::now();
                    let sums = encrypted.decrypt(mask_seed, &key_sum).expect("key sum");
                    crypto += t.elapsed().as_secs_f64();
                    sums
                }
            };
            // What the host publishes: the exact mean, or its 8-bit form with the error
            // owed from earlier rounds (as `fleet::host::HostFleet::apply`).
            let exact = decode_values(&selection, &sums, &encoding, 1.0).expect("selection sums");
            let applied = match downlink {
                DownlinkFormat::F32 => {
                    downloaded += 4 * exact.len();
                    exact
                }
                DownlinkFormat::Q8 => {
                    let (q, sent) = owed.quantize(&selection, &exact).expect("in layout");
                    downloaded += postcard::to_stdvec(&q).expect("serializable").len();
                    sent
                }
            };
            global
                .apply(&selection, &applied)
                .expect("the selection's values, next round");
            for (f, p) in feedback.iter_mut().zip(prepared) {
                f.settle(p, true);
            }
            lora.load_flat(global.values()).expect("same layout");
            losses.push(self.eval(&lora));
            log(&format!(
                "{name} round {round}: held-out loss {:.4}, {} of {} values sent",
                losses[round - 1],
                selection.len(),
                layout.len()
            ));
        }
        let per_client_round = uploaded as f64 / (cfg.rounds * self.clients.len()) as f64;
        RunReport {
            downlink: Some(downlink),
            download_bytes_per_client_per_round: downloaded as f64 / cfg.rounds as f64,
            name,
            rho: Some(rho),
            encrypted: body_bits.is_some(),
            body_bits,
            scale_log2: Some(encoding.scale_log2),
            eval_loss_per_round: losses,
            upload_bytes_per_param_per_round: per_client_round / layout.len() as f64,
            upload_bytes_per_client_per_round: per_client_round,
            seconds: start.elapsed().as_secs_f64(),
            crypto_seconds: crypto,
            clipped,
        }
    }

    /// Every run of the experiment (or those named in `cfg.only`), in the order of the
    /// module documentation.
    pub fn run_all(&self, cfg: &QualityConfig, mut log: impl FnMut(&str)) -> Vec<RunReport> {
        let wanted = |name: &str| cfg.only.is_empty() || cfg.only.iter().any(|n| n == name);
        let mut runs = Vec::new();
        if wanted("local-only") {
            runs.push(self.local_only(cfg, &mut log));
        }
        if wanted("fedavg-dense-plain") {
            let name = "fedavg-dense-plain".to_string();
            let f32 = DownlinkFormat::F32;
            runs.push(self.fedavg(cfg, name, 1.0, Aggregation::Plain, f32, &mut log));
        }
        for run in &cfg.encrypted {
            let name = run.name();
            if wanted(&name) {
                let aggregation = Aggregation::Encrypted(run.body_bits);
                let f32 = DownlinkFormat::F32;
                runs.push(self.fedavg(cfg, name, run.rho, aggregation, f32, &mut log));
            }
        }
        // The last encrypted run again, its global update sent down in 8 bits.
        if let Some(run) = cfg.encrypted.last() {
            let name = format!("{}-q8down", run.name());
            if wanted(&name) {
                let aggregation = Aggregation::Encrypted(run.body_bits);
                let q8 = DownlinkFormat::Q8;
                runs.push(self.fedavg(cfg, name, run.rho, aggregation, q8, &mut log));
            }
        }
        if wanted("centralised") {
            runs.push(self.centralised(cfg, &mut log));
        }
        runs
    }
}

/// The data-order and dropout stream of (client, round), the same in every run.
fn stream_id(client: usize, round: usize) -> u64 {
    ((client as u64) << 32) ^ round as u64
}
