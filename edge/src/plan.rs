//! The memory planner: how a training step is run (layer-wise recomputation or not, which
//! base weights stay dequantized, how many sequences per micro-batch), what each way costs
//! in memory and time, and the fastest one that fits a budget. Pure arithmetic over the
//! model's and adapter's shapes: no libtorch, no I/O (the caller measures the process's
//! resident memory and the box's available memory and passes them in).
//!
//! # The peak-memory formula
//!
//! Bytes, for a micro-batch of `n = m x T` tokens (m sequences of at most T tokens), hidden
//! width H, MLP width I, L layers, q heads h, vocabulary V, LoRA rank r on M projections per
//! layer, compute precision e bytes (4 on the CPU, 2 for bf16 on CUDA), activations f32:
//!
//! ```text
//! peak = baseline                        resident set when planning: runtime, packed base,
//!                                        LoRA parameters (measured, not predicted)
//!      + 12 P                            LoRA gradients and AdamW's two moments (P values)
//!      + e x resident weights            dequantized copies kept (Plan::resident_layers
//!                                        layers of 7 projections, and the head)
//!      + step(n) + 48 MiB                the step's tensors (below) and libtorch's
//!                                        runtime overhead ([`RUNTIME_OVERHEAD_BYTES`])
//! ```
//!
//! What autograd keeps of one layer per token (f32), counted from `Llama::block_step` and
//! `Lora::delta`: `21 H + 6 I + M r + h + 2`: the layer input and its RMSNorm output (2 H),
//! the dropout mask and dropped input of each adapted projection's input (2 H for each of
//! q, k, v, o, gate and up, 2 I for down, without dropout none of them), the rank-r
//! products (M r), the attention's q, expanded k and v, output and its re-laid copy (5 H),
//! the mid-layer residual and its norm (2 H), gate, its SiLU, up and their product (4 I),
//! the attention's log-sum-exp (h) and the two norms' reciprocal RMS (2). The backward of a
//! layer adds a transient of about `6 (H + I)` per token (the gradients of its
//! intermediates while they flow through it; fitted to the measured per-layer growth of
//! the resident set on SmolLM2 and the benchmark model, where counting the saved tensors
//! alone underestimated it).
//!
//! ```text
//! layer(n)  = 4 n (21 H + 6 I + M r + h + 2)       saved by autograd for one layer
//! back(n)   = 4 n 6 (H + I)                         gradients in flight in one layer
//! weights_l = e x 7-projection values of one layer  when not resident (dequantized per call)
//! head(n)   = e V H (when not resident) + 4 min(16 Mi, n V) + 4 x 5 n H
//!                                                   the fused head: weight, one logit chunk
//!                                                   (softmax in place), the selected rows
//!                                                   and their gradients
//! without recomputation (every layer resident):
//!   step(n) = L layer(n) + 4 n H + head(n) + back(n)
//! with layer-wise recomputation:
//!   step(n) = 4 (L + 1) n H + max(head(n), 1.5 (layer(n) + back(n) + weights_l))
//! ```
//!
//! The factor 1.5 is the allocator's slack: glibc keeps each layer's freed graph for the
//! next one and fragments pile up (about a seventh of a layer's graph per layer), so the
//! trainer trims the heap (`train::release_free_memory`) before the head, after every
//! micro-batch, and whenever the backward pass has grown the resident set by half a
//! layer's footprint. `scripts/bench-train.sh --plans` checks the formula against the
//! measured peak (`target/bench/plan.json`).
//!
//! Without recomputation the graph keeps every layer's dequantized weights for the backward
//! pass anyway, so that mode is only planned with the whole base resident.
//!
//! # The speed model
//!
//! Plans are ranked by a cost in multiply-add equivalents per optimizer step: a frozen
//! layer's matmuls run twice per token (forward, and the input gradient in the backward),
//! three times with recomputation; the fused head twice; unpacking a packed weight costs
//! [`DEQUANT_COST`] per value per call (once per micro-batch, twice with recomputation); and
//! each micro-batch has a fixed overhead of [`MICRO_BATCH_COST`] per layer (kernel launches,
//! the dropout masks' setup). `scripts/bench-train.sh --plans` measures the real order.

use crate::llama::Module;
use fedshield_models::config::LlamaConfig;
use serde::{Deserialize, Serialize};

/// Multiply-add equivalents per unpacked weight value (on the 2-core CI machine unpacking a
/// 4-bit block costs about as much per value as 40 multiply-adds of a large matmul).
pub const DEQUANT_COST: f64 = 40.0;

/// Multiply-add equivalents of fixed cost per micro-batch and layer.
pub const MICRO_BATCH_COST: f64 = 2.0e6;

/// Elements of one logit chunk of the fused head (`train::fused_head`).
const HEAD_CHUNK: u64 = 1 << 24;

/// What libtorch adds to the resident set on its first training step beyond the tensors
/// the formula counts: the autograd engine's and OpenMP's worker threads with their stacks
/// and allocator arenas, kernels' workspaces. Fitted on the 2-core CI machine to the
/// benchmark's 20 plans (`target/bench/plan.json`: 16 to 108 MiB unaccounted, 48 MiB
/// typical).
pub const RUNTIME_OVERHEAD_BYTES: u64 = 48 << 20;

/// Reserve kept free for the rest of the box when the budget is taken from `MemAvailable`.
pub const DEFAULT_RESERVE_BYTES: u64 = 512 << 20;

/// What is trained: the model's and adapter's shapes and the step's batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// The base model.
    pub model: LlamaConfig,
    /// LoRA rank.
    pub lora_rank: u64,
    /// Adapted projections per layer.
    pub lora_modules: Vec<Module>,
    /// Whether LoRA dropout is on (its masks are kept for the backward pass).
    pub lora_dropout: bool,
    /// Sequences per optimizer step.
    pub batch: usize,
    /// Tokens per sequence (the longest).
    pub seq: usize,
    /// Bytes per value of the compute precision (4: f32, 2: bf16).
    pub compute_bytes: u64,
}

/// How a training step is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Plan {
    /// Layer-wise recomputation ("gradient checkpointing").
    pub checkpointing: bool,
    /// Decoder layers whose projections stay dequantized (the first ones).
    pub resident_layers: usize,
    /// Whether the LM head stays dequantized.
    pub resident_head: bool,
    /// Sequences per micro-batch (the step accumulates `batch / micro_batch` of them).
    pub micro_batch: usize,
}

impl Plan {
    /// Today's fixed plan and the smallest: recomputation, everything packed, the whole
    /// batch in one micro-batch.
    pub fn packed(batch: usize) -> Self {
        Self {
            checkpointing: true,
            resident_layers: 0,
            resident_head: false,
            micro_batch: batch.max(1),
        }
    }

    /// A short name: `{ckpt|full}-{packed|resK|resK+head|dense}-mbM`.
    pub fn name(&self, layers: usize) -> String {
        let mode = if self.checkpointing { "ckpt" } else { "full" };
        let residency = match (self.resident_layers.min(layers), self.resident_head) {
            (0, false) => "packed".to_string(),
            (k, true) if k == layers => "dense".to_string(),
            (0, true) => "head".to_string(),
            (k, false) => format!("res{k}"),
            (k, true) => format!("res{k}+head"),
        };
        format!("{mode}-{residency}-mb{}", self.micro_batch)
    }

    /// Parses [`Plan::name`].
    pub fn parse(name: &str, layers: usize) -> Result<Self, String> {
        let bad = || {
            format!(
                "plan {name:?}: expected {{ckpt|full}}-{{packed|head|resK|resK+head|dense}}-mbM"
            )
        };
        let mut parts = name.split('-');
        let (Some(mode), Some(res), Some(mb), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let checkpointing = match mode {
            "ckpt" => true,
            "full" => false,
            _ => return Err(bad()),
        };
        let (resident_layers, resident_head) = match res {
            "packed" => (0, false),
            "head" => (0, true),
            "dense" => (layers, true),
            other => {
                let (k, head) = match other.strip_suffix("+head") {
                    Some(k) => (k, true),
                    None => (other, false),
                };
                let k = k.strip_prefix("res").ok_or_else(bad)?;
                (k.parse::<usize>().map_err(|_| bad())?.min(layers), head)
            }
        };
        let micro_batch = mb
            .strip_prefix("mb")
            .and_then(|m| m.parse::<usize>().ok())
            .filter(|&m| m > 0)
            .ok_or_else(bad)?;
        if !checkpointing && (resident_layers < layers || !resident_head) {
            return Err(format!(
                "plan {name:?}: without recomputation every weight is kept by autograd anyway; use full-dense-mb{micro_batch}"
            ));
        }
        Ok(Self {
            checkpointing,
            resident_layers,
            resident_head,
            micro_batch,
        })
    }
}

/// A plan's predicted peak, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The resident set measured before the plan was applied.
    pub baseline: u64,
    /// LoRA gradients and AdamW moments.
    pub optimizer: u64,
    /// Dequantized weights kept resident.
    pub resident: u64,
    /// The step's peak on top of those (with the runtime overhead).
    pub step: u64,
    /// Their sum.
    pub total: u64,
}

impl Workload {
    /// A workload of `model` with a LoRA of rank `r` on `modules` (dropout on or off), `batch`
    /// sequences of `seq` tokens per step, computing in `compute_bytes`-byte values.
    pub fn new(
        model: &LlamaConfig,
        r: u64,
        modules: &[Module],
        dropout: bool,
        batch: usize,
        seq: usize,
        compute_bytes: u64,
    ) -> Self {
        Self {
            model: model.clone(),
            lora_rank: r,
            lora_modules: modules.to_vec(),
            lora_dropout: dropout,
            batch: batch.max(1),
            seq: seq.max(2),
            compute_bytes,
        }
    }

    fn dims(&self) -> (u64, u64, u64, u64, u64) {
        let c = &self.model;
        let hd = c.head_dim() as u64;
        (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.num_attention_heads as u64 * hd,
            c.num_key_value_heads as u64 * hd,
            c.vocab_size as u64,
        )
    }

    /// Values of one layer's seven projections.
    pub fn layer_values(&self) -> u64 {
        let (h, i, q, kv, _) = self.dims();
        2 * h * q + 2 * h * kv + 3 * h * i
    }

    /// Values of the LM head.
    pub fn head_values(&self) -> u64 {
        let (h, .., v) = self.dims();
        v * h
    }

    /// LoRA parameters (A and B of every adapted projection).
    pub fn lora_params(&self) -> u64 {
        let (h, i, q, kv, _) = self.dims();
        let per_layer: u64 = self
            .lora_modules
            .iter()
            .map(|m| {
                let (input, output) = match m {
                    Module::Q => (h, q),
                    Module::K | Module::V => (h, kv),
                    Module::O => (q, h),
                    Module::Gate | Module::Up => (h, i),
                    Module::Down => (i, h),
                };
                self.lora_rank * (input + output)
            })
            .sum();
        per_layer * self.model.num_hidden_layers as u64
    }

    /// Bytes autograd keeps of one layer per token (see the module docs).
    fn layer_per_token(&self) -> u64 {
        let (h, i, ..) = self.dims();
        let heads = self.model.num_attention_heads as u64;
        let m = &self.lora_modules;
        let dropped = if self.lora_dropout {
            m.iter()
                .map(|m| if *m == Module::Down { 2 * i } else { 2 * h })
                .sum::<u64>()
        } else {
            0
        };
        4 * (9 * h + 4 * i + dropped + m.len() as u64 * self.lora_rank + heads + 2)
    }

    fn micro_batch_tokens(&self, plan: &Plan) -> u64 {
        (plan.micro_batch.clamp(1, self.batch) * self.seq) as u64
    }

    /// The predicted peak of `plan`, on top of a process whose resident set is `baseline`.
    pub fn predict(&self, plan: &Plan, baseline: u64) -> Estimate {
        let (h, i, .., v) = self.dims();
        let layers = self.model.num_hidden_layers as u64;
        let e = self.compute_bytes;
        let n = self.micro_batch_tokens(plan);
        let resident_layers = plan.resident_layers.min(layers as usize) as u64;
        let resident = e
            * (resident_layers * self.layer_values()
                + if plan.resident_head {
                    self.head_values()
                } else {
                    0
                });
        let layer = n * self.layer_per_token();
        let back = 4 * n * 6 * (h + i);
        let head_weight = if plan.resident_head {
            0
        } else {
            e * self.head_values()
        };
        let head = head_weight + 4 * HEAD_CHUNK.min(n * v) + 4 * 5 * n * h;
        let step = if plan.checkpointing {
            let weights = if resident_layers < layers {
                e * self.layer_values()
            } else {
                0
            };
            // The trainer trims the heap when fragments grow the resident set by half a
            // layer's footprint (`train::backward_checkpointed`): count that slack.
            let footprint = layer + back + weights;
            4 * (layers + 1) * n * h + head.max(footprint + footprint / 2)
        } else {
            layers * layer + 4 * n * h + head + back
        };
        let optimizer = 12 * self.lora_params();
        let step = step + RUNTIME_OVERHEAD_BYTES;
        Estimate {
            baseline,
            optimizer,
            resident,
            step,
            total: baseline + optimizer + resident + step,
        }
    }

    /// The speed model's cost of one optimizer step under `plan` (multiply-add
    /// equivalents; lower is faster).
    pub fn cost(&self, plan: &Plan) -> f64 {
        let (_, _, q, _, _) = self.dims();
        let layers = self.model.num_hidden_layers as f64;
        let n = self.micro_batch_tokens(plan) as f64;
        let micro_batches = self.batch.div_ceil(plan.micro_batch.clamp(1, self.batch)) as f64;
        // Per token and layer: the projections, and causal attention over T / 2 keys.
        let lora = self.lora_params() as f64 / layers;
        let per_layer = self.layer_values() as f64 + lora + (self.seq as f64) * q as f64;
        let passes = if plan.checkpointing { 3.0 } else { 2.0 };
        let compute = n * (layers * per_layer * passes + 2.0 * self.head_values() as f64);
        let packed_layers = layers - (plan.resident_layers as f64).min(layers);
        let unpack_calls = if plan.checkpointing { 2.0 } else { 1.0 };
        let mut unpacked = packed_layers * self.layer_values() as f64 * unpack_calls;
        if !plan.resident_head {
            unpacked += self.head_values() as f64;
        }
        micro_batches * (compute + DEQUANT_COST * unpacked + MICRO_BATCH_COST * layers)
    }

    /// Every plan worth considering, fastest (by [`Workload::cost`]) first: with
    /// recomputation at 0, 1/4, 1/2, 3/4 or all layers resident, with or without the head;
    /// without recomputation only dense; each at every micro-batch that divides the batch.
    pub fn candidates(&self) -> Vec<Plan> {
        let layers = self.model.num_hidden_layers;
        let mut resident: Vec<usize> = (0..=4).map(|q| layers * q / 4).collect();
        resident.dedup();
        let mut plans = Vec::new();
        for micro_batch in (1..=self.batch).filter(|m| self.batch.is_multiple_of(*m)) {
            plans.push(Plan {
                checkpointing: false,
                resident_layers: layers,
                resident_head: true,
                micro_batch,
            });
            for &k in &resident {
                for head in [false, true] {
                    plans.push(Plan {
                        checkpointing: true,
                        resident_layers: k,
                        resident_head: head,
                        micro_batch,
                    });
                }
            }
        }
        plans.sort_by(|a, b| {
            self.cost(a)
                .total_cmp(&self.cost(b))
                .then(self.predict(a, 0).total.cmp(&self.predict(b, 0).total))
        });
        plans
    }

    /// The fastest plan whose predicted peak fits `budget` bytes, above a resident set of
    /// `baseline`. When none fits, the smallest plan, with `fits: false`.
    pub fn choose(&self, budget: u64, baseline: u64) -> Choice {
        self.choose_below(budget, baseline, None)
    }

    /// The fastest plan that fits and is predicted to need less memory than `failed` (a plan
    /// whose probe step failed): the planner's step down. `None` when `failed` was the
    /// smallest.
    pub fn step_down(&self, budget: u64, baseline: u64, failed: &Plan) -> Option<Choice> {
        let below = self.predict(failed, baseline).total;
        let choice = self.choose_below(budget, baseline, Some(below));
        (choice.estimate.total < below).then_some(choice)
    }

    fn choose_below(&self, budget: u64, baseline: u64, below: Option<u64>) -> Choice {
        let candidates = self.candidates();
        let limit = below.map_or(budget, |b| budget.min(b.saturating_sub(1)));
        let fitting = candidates
            .iter()
            .find(|p| self.predict(p, baseline).total <= limit);
        let (plan, fits) = match fitting {
            Some(p) => (*p, true),
            None => {
                let smallest = candidates
                    .iter()
                    .min_by_key(|p| self.predict(p, baseline).total)
                    .copied()
                    .unwrap_or_else(|| Plan::packed(1));
                (smallest, false)
            }
        };
        Choice {
            plan,
            name: plan.name(self.model.num_hidden_layers),
            estimate: self.predict(&plan, baseline),
            budget,
            fits,
            considered: candidates.len(),
        }
    }
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The plan.
    pub plan: Plan,
    /// Its name ([`Plan::name`]).
    pub name: String,
    /// Its predicted peak.
    pub estimate: Estimate,
    /// The budget it was chosen for (bytes).
    pub budget: u64,
    /// Whether the prediction fits the budget (when false, no plan did and this is the
    /// smallest).
    pub fits: bool,
    /// Plans considered.
    pub considered: usize,
}

impl Choice {
    /// One line for an operator.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let verdict = if self.fits {
            "fits"
        } else {
            "NO PLAN FITS; using the smallest"
        };
        format!(
            "plan {}: predicted peak {:.0} MiB of a {:.0} MiB budget ({verdict}; resident weights {:.0} MiB, step {:.0} MiB, {} plans considered)",
            self.name,
            mib(self.estimate.total),
            mib(self.budget),
            mib(self.estimate.resident),
            mib(self.estimate.step),
            self.considered
        )
    }
}

/// The default budget: `MemAvailable` less `reserve`, plus what this process already holds
/// (`resident`, which the prediction's baseline counts again).
pub fn default_budget(mem_available: u64, resident: u64, reserve: u64) -> u64 {
    mem_available.saturating_sub(reserve) + resident
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedshield_telemetry::{Telemetry, fixtures};

    const MIB: u64 = 1 << 20;

    fn smollm2() -> Workload {
        Workload::new(
            &LlamaConfig::smollm2_135m(),
            16,
            &Module::ALL,
            true,
            4,
            256,
            4,
        )
    }

    /// A 1.1B-parameter Llama (TinyLlama's shape): the size at which an 8 GB box must choose.
    fn tinyllama() -> Workload {
        let config = LlamaConfig {
            vocab_size: 32000,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 22,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
        };
        Workload::new(&config, 16, &Module::ALL, true, 8, 512, 4)
    }

    fn available(fixture: &str) -> u64 {
        let reading = Telemetry::discover(fixtures::path(fixture)).read();
        reading.memory.expect("fixture has meminfo").available.0
    }

    #[test]
    fn names_round_trip_and_bad_names_are_refused_with_the_grammar() {
        let w = smollm2();
        for plan in w.candidates() {
            let name = plan.name(30);
            assert_eq!(Plan::parse(&name, 30).unwrap(), plan, "{name}");
        }
        assert_eq!(
            Plan::parse("ckpt-res99-mb2", 30).unwrap().resident_layers,
            30
        );
        for bad in [
            "",
            "ckpt",
            "fast-dense-mb4",
            "ckpt-resx-mb4",
            "ckpt-dense-mb0",
            "ckpt-dense-4",
        ] {
            let e = Plan::parse(bad, 30).unwrap_err();
            assert!(e.contains("expected"), "{bad}: {e}");
        }
        let e = Plan::parse("full-packed-mb4", 30).unwrap_err();
        assert!(e.contains("full-dense-mb4"), "{e}");
    }

    #[test]
    fn the_prediction_grows_with_what_is_kept() {
        let w = smollm2();
        let p = |name: &str| w.predict(&Plan::parse(name, 30).unwrap(), 0).total;
        // Residency adds its dequantized bytes: 30 layers of 7 projections and the head.
        let dense = w.predict(&Plan::parse("ckpt-dense-mb4", 30).unwrap(), 0);
        assert_eq!(
            dense.resident,
            4 * (30 * w.layer_values() + w.head_values())
        );
        assert!(p("ckpt-packed-mb1") < p("ckpt-packed-mb2"));
        assert!(p("ckpt-packed-mb2") < p("ckpt-packed-mb4"));
        assert!(p("ckpt-res15-mb4") < p("ckpt-dense-mb4"));
        assert!(p("ckpt-dense-mb4") < p("full-dense-mb4"));
        assert!(p("full-dense-mb1") < p("full-dense-mb4"));
        // The baseline is added as measured.
        let plan = Plan::packed(4);
        assert_eq!(
            w.predict(&plan, 100 * MIB).total,
            w.predict(&plan, 0).total + 100 * MIB
        );
        // 12 bytes per LoRA value: SmolLM2 with r = 16 on all seven projections.
        assert_eq!(w.lora_params(), 4_884_480);
        assert_eq!(dense.optimizer, 12 * 4_884_480);
    }

    #[test]
    fn the_speed_model_ranks_keeping_more_and_recomputing_less_as_faster() {
        let w = smollm2();
        let c = |name: &str| w.cost(&Plan::parse(name, 30).unwrap());
        assert!(c("full-dense-mb4") < c("ckpt-dense-mb4"));
        assert!(c("ckpt-dense-mb4") < c("ckpt-res15-mb4"));
        assert!(c("ckpt-res15-mb4") < c("ckpt-packed-mb4"));
        assert!(c("ckpt-head-mb4") < c("ckpt-packed-mb4"));
        assert!(c("ckpt-packed-mb4") < c("ckpt-packed-mb1"));
        let all = w.candidates();
        assert_eq!(all[0].name(30), "full-dense-mb4");
        // 3 micro-batch sizes x (1 without recomputation + 5 residencies x 2 heads).
        assert_eq!(all.len(), 33);
    }

    #[test]
    fn an_8_gb_orin_nano_and_a_64_gb_agx_orin_get_the_plans_their_memory_allows() {
        let baseline = 600 * MIB;
        let nano = default_budget(available("orin-nano-jp6"), baseline, DEFAULT_RESERVE_BYTES);
        let agx = default_budget(available("agx-orin-jp5"), baseline, DEFAULT_RESERVE_BYTES);
        assert_eq!(nano, 5935104 * 1024 - DEFAULT_RESERVE_BYTES + baseline);
        // SmolLM2 fits everywhere at its fastest.
        assert_eq!(smollm2().choose(nano, baseline).name, "full-dense-mb4");
        // A 1.1B model: the AGX keeps everything dequantized and skips recomputation; the
        // Orin Nano holds the dequantized base (4.1 GiB of f32) but not every layer's graph
        // beside it, so it recomputes; a 4 GB Jetson Nano cannot hold the dequantized base
        // and unpacks most layers per call, more slowly still.
        let big = tinyllama();
        let on_agx = big.choose(agx, baseline);
        assert_eq!(on_agx.name, "full-dense-mb8");
        assert!(on_agx.fits);
        let on_nano = big.choose(nano, baseline);
        assert!(on_nano.fits);
        assert!(on_nano.plan.checkpointing, "{}", on_nano.name);
        assert!(on_nano.estimate.total <= nano);
        assert!(big.cost(&on_nano.plan) > big.cost(&on_agx.plan));
        let jetson_nano = default_budget(available("nano-jp4"), baseline, DEFAULT_RESERVE_BYTES);
        let on_jnano = big.choose(jetson_nano, baseline);
        assert!(on_jnano.fits, "{}", on_jnano.summary());
        assert!(on_jnano.plan.resident_layers < 22, "{}", on_jnano.name);
        assert!(on_jnano.estimate.total <= jetson_nano);
        assert!(big.cost(&on_jnano.plan) > big.cost(&on_nano.plan));
    }

    #[test]
    fn a_budget_too_small_for_any_plan_gets_the_smallest_and_says_so() {
        let w = smollm2();
        let c = w.choose(100 * MIB, 600 * MIB);
        assert!(!c.fits);
        let smallest = w
            .candidates()
            .iter()
            .map(|p| w.predict(p, 600 * MIB).total)
            .min()
            .unwrap();
        assert_eq!(c.estimate.total, smallest);
        // Recomputation, one sequence at a time, no layer kept (the head's copy costs the
        // same either way: the head phase dequantizes it when it is not kept).
        assert!(c.plan.checkpointing && c.plan.micro_batch == 1 && c.plan.resident_layers == 0);
        assert!(c.summary().contains("NO PLAN FITS"), "{}", c.summary());
        // Nothing is smaller to step down to.
        assert_eq!(w.step_down(u64::MAX, 600 * MIB, &c.plan), None);
    }

    #[test]
    fn stepping_down_after_failed_probes_ends_at_the_smallest_plan() {
        let w = smollm2();
        let mut c = w.choose(u64::MAX, 0);
        let mut seen = vec![c.estimate.total];
        while let Some(next) = w.step_down(u64::MAX, 0, &c.plan) {
            assert!(next.estimate.total < c.estimate.total);
            assert!(next.fits);
            c = next;
            seen.push(c.estimate.total);
        }
        assert_eq!(c.estimate.total, w.predict(&Plan::packed(1), 0).total);
        assert!(seen.len() >= 5, "{seen:?}");
    }
}
