//! The memory planner applied to a loaded model (`crate::plan` is its arithmetic): measures
//! this process and the box, chooses the fastest plan that fits the budget, applies its
//! weight residency, checks it with one probe step (forward and backward of the
//! longest micro-batch, the adapter left as it was) and steps down while the probe fails.

use crate::llama::Llama;
use crate::lora::{Lora, LoraConfig};
use crate::plan::{Choice, DEFAULT_RESERVE_BYTES, Plan, Workload, default_budget};
use crate::sft::Sequence;
use crate::train::{Batch, accumulate_gradients, resident_set_bytes};
use serde::Serialize;
use std::path::Path;

/// What the caller asks of the planner.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    /// A plan by name (`crate::plan::Plan::name`), or `None` for the fastest that fits.
    pub plan: Option<&'a str>,
    /// Memory budget for the whole process, bytes; `None`: the box's `MemAvailable` less
    /// [`DEFAULT_RESERVE_BYTES`], plus what the process already holds.
    pub budget: Option<u64>,
    /// Where the box's `/proc/meminfo` is (`/` on a device).
    pub telemetry_root: &'a Path,
    /// Sequences per optimizer step.
    pub batch: usize,
    /// Run the probe step.
    pub probe: bool,
}

/// The planner's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// The plan in force.
    pub choice: Choice,
    /// Peak resident set of the probe step (bytes; on the CPU, where it is measurable).
    pub probe_peak: Option<u64>,
    /// Plans given up, each with why.
    pub stepped_down: Vec<String>,
    /// Where the budget came from.
    pub budget_source: String,
}

impl Planned {
    /// Lines for an operator.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .stepped_down
            .iter()
            .map(|s| format!("stepped down from {s}"))
            .collect();
        let probe = match self.probe_peak {
            Some(p) => format!(
                "; probe step peaked at {:.0} MiB",
                p as f64 / (1 << 20) as f64
            ),
            None => String::new(),
        };
        lines.push(format!(
            "{} [budget: {}]{probe}",
            self.choice.summary(),
            self.budget_source
        ));
        lines
    }
}

/// The workload of training `model` with `lora` on `sequences`, `batch` per step.
pub fn workload(
    model: &Llama,
    lora: &LoraConfig,
    sequences: &[Sequence],
    batch: usize,
) -> Workload {
    let seq = sequences.iter().map(|s| s.0.len()).max().unwrap_or(2);
    Workload::new(
        &model.config,
        lora.r.max(0) as u64,
        &lora.target_modules,
        lora.dropout > 0.0,
        batch,
        seq,
        model.compute_kind.elt_size_in_bytes() as u64,
    )
}

/// Peak resident set since the last [`reset_peak`] (`VmHWM`), bytes.
pub fn peak_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Resets `VmHWM` to the current resident set (Linux 4.0 and later).
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One probe step: forward and backward of the `micro_batch` longest sequences under
/// `plan`, gradients discarded. `Err` with libtorch's message when it fails (out of
/// memory, most likely).
fn probe(
    model: &Llama,
    lora: &Lora,
    sequences: &[Sequence],
    pad: u32,
    plan: &Plan,
) -> Result<(), String> {
    let mut longest: Vec<&Sequence> = sequences.iter().collect();
    longest.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
    let picked: Vec<Sequence> = longest
        .into_iter()
        .cycle()
        .take(plan.micro_batch.max(1))
        .cloned()
        .collect();
    let batch = Batch::from_sequences(&picked, pad, model.device);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lora.set_training(true);
        accumulate_gradients(
            model,
            lora,
            std::slice::from_ref(&batch),
            plan.checkpointing,
            0,
        );
        lora.set_training(false);
    }));
    for mut v in lora.vs.trainable_variables() {
        v.zero_grad();
    }
    crate::train::release_free_memory();
    outcome.map_err(|p| crate::fleet::panic_text(p.as_ref()))
}

/// Chooses, applies and probes the plan for training `model` with `lora` on `sequences`
/// (padding `pad`). Errors: a named plan that does not parse, or no plan whose probe step
/// succeeds.
pub fn plan_training(
    model: &mut Llama,
    lora: &Lora,
    sequences: &[Sequence],
    pad: u32,
    request: &PlanRequest<'_>,
) -> Result<Planned, crate::EdgeError> {
    let w = workload(model, &lora.config, sequences, request.batch);
    let layers = model.config.num_hidden_layers;
    // Loading leaves freed memory in the heap: measure what the process really holds.
    crate::train::release_free_memory();
    let baseline = resident_set_bytes().unwrap_or(0);
    let (budget, budget_source) = match request.budget {
        Some(b) => (b, "--memory-budget".to_string()),
        None => {
            let reading = fedshield_telemetry::Telemetry::discover(request.telemetry_root).read();
            match reading.memory {
                Some(m) => (
                    default_budget(m.available.0, baseline, DEFAULT_RESERVE_BYTES),
                    format!(
                        "MemAvailable {:.0} MiB - {} MiB reserve + {:.0} MiB held",
                        m.available.0 as f64 / (1 << 20) as f64,
                        DEFAULT_RESERVE_BYTES >> 20,
                        baseline as f64 / (1 << 20) as f64
                    ),
                ),
                None => (u64::MAX, "none (no /proc/meminfo)".to_string()),
            }
        }
    };
    let mut choice = match request.plan {
        Some(name) => {
            let plan = Plan::parse(name, layers).map_err(crate::EdgeError::Plan)?;
            let estimate = w.predict(&plan, baseline);
            Choice {
                plan,
                name: plan.name(layers),
                estimate,
                budget,
                fits: estimate.total <= budget,
                considered: 1,
            }
        }
        None => w.choose(budget, baseline),
    };
    let mut stepped_down = Vec::new();
    let cpu = model.device == tch::Device::Cpu;
    loop {
        model.set_residency(choice.plan.resident_layers, choice.plan.resident_head);
        if !request.probe || sequences.is_empty() {
            return Ok(Planned {
                choice,
                probe_peak: None,
                stepped_down,
                budget_source,
            });
        }
        let measured = reset_peak();
        let outcome = probe(model, lora, sequences, pad, &choice.plan);
        let peak = (measured && cpu).then(peak_bytes).flatten();
        let failure = match (&outcome, peak) {
            (Err(e), _) => Some(format!("{}: probe step failed: {e}", choice.name)),
            (Ok(()), Some(p)) if p > budget && request.plan.is_none() => Some(format!(
                "{}: probe step peaked at {:.0} MiB, over the {:.0} MiB budget",
                choice.name,
                p as f64 / (1 << 20) as f64,
                budget as f64 / (1 << 20) as f64
            )),
            _ => None,
        };
        let Some(why) = failure else {
            return Ok(Planned {
                choice,
                probe_peak: peak,
                stepped_down,
                budget_source,
            });
        };
        tracing::warn!("{why}");
        stepped_down.push(why.clone());
        let next = if request.plan.is_some() {
            None
        } else {
            w.step_down(budget, baseline, &choice.plan)
        };
        match next {
            Some(n) => choice = n,
            None => {
                model.set_residency(0, false);
                return Err(crate::EdgeError::Plan(format!(
                    "no training plan works on this box: {}",
                    stepped_down.join("; ")
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::Module;
    use fedshield_models::config::LlamaConfig;
    use tch::Device;

    fn tiny() -> (Llama, Lora, Vec<Sequence>) {
        let config = LlamaConfig {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
        };
        let model = Llama::random(config, Device::Cpu, 1).quantized_q4_0();
        let lora = Lora::new(
            &model,
            LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.05,
                target_modules: Module::ALL.to_vec(),
                freeze_a: false,
            },
            0,
        );
        let seqs = (0..6)
            .map(|s| {
                let n = 10 + 3 * s;
                (
                    (0..n).map(|i| ((i * 7 + s) % 256) as u32).collect(),
                    vec![true; n],
                )
            })
            .collect();
        (model, lora, seqs)
    }

    fn request(plan: Option<&str>, budget: Option<u64>) -> PlanRequest<'_> {
        PlanRequest {
            plan,
            budget,
            telemetry_root: Path::new("/"),
            batch: 4,
            probe: true,
        }
    }

    #[test]
    fn an_ample_budget_gets_the_fastest_plan_applied_and_the_adapter_is_untouched() {
        let (mut model, lora, seqs) = tiny();
        let before = lora.flatten();
        let planned =
            plan_training(&mut model, &lora, &seqs, 0, &request(None, Some(u64::MAX))).unwrap();
        assert_eq!(planned.choice.name, "full-dense-mb4");
        assert!(planned.stepped_down.is_empty());
        assert_eq!(
            model.resident_bytes() as u64,
            planned.choice.estimate.resident
        );
        assert!(planned.probe_peak.is_some());
        assert_eq!(lora.flatten(), before);
        for v in lora.vs.trainable_variables() {
            let g = v.grad();
            assert!(!g.defined() || g.abs().sum(tch::Kind::Float).double_value(&[]) == 0.0);
        }
    }

    #[test]
    fn a_budget_below_every_plan_steps_down_to_the_smallest_and_reports_why() {
        let (mut model, lora, seqs) = tiny();
        // Below what the process already holds: every probe is over budget; the planner
        // steps down plan by plan and then says no plan works.
        let err = plan_training(&mut model, &lora, &seqs, 0, &request(None, Some(1))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no training plan works"), "{text}");
        assert!(text.contains("over the 0 MiB budget"), "{text}");
        assert_eq!(model.resident_bytes(), 0);
    }

    #[test]
    fn a_named_plan_is_applied_and_a_bad_name_is_a_clear_error() {
        let (mut model, lora, seqs) = tiny();
        let planned = plan_training(
            &mut model,
            &lora,
            &seqs,
            0,
            &request(Some("ckpt-res2-mb2"), None),
        )
        .unwrap();
        assert_eq!(planned.choice.plan.resident_layers, 2);
        assert!(!planned.choice.plan.resident_head);
        assert!(
            planned.budget_source.contains("MemAvailable"),
            "{}",
            planned.budget_source
        );
        let err =
            plan_training(&mut model, &lora, &seqs, 0, &request(Some("turbo"), None)).unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
    }
}
