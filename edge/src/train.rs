//! LoRA fine-tuning: next-token loss on response tokens only, AdamW with linear warm-up and
//! cosine decay, gradient accumulation (token-weighted), gradient clipping, and layer-wise
//! recomputation ("gradient checkpointing") so that the dequantized base weights of at most
//! one layer exist at a time, in the backward pass as in the forward pass.

use crate::llama::{Llama, NoAdapter};
use crate::lora::Lora;
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

/// Label of positions that carry no loss (prompt, padding), as in Hugging Face.
pub const IGNORE: i64 = -100;

/// One micro-batch: token ids and next-token labels, both [batch, t].
#[derive(Debug)]
pub struct Batch {
    /// Input ids.
    pub ids: Tensor,
    /// `labels[b, i]` is the target of position i - 1, or [`IGNORE`].
    pub labels: Tensor,
}

impl Batch {
    /// Right-pads `sequences` (token ids, and whether each token is a loss target) to the
    /// longest, with `pad` ids and no loss on padding.
    pub fn from_sequences(sequences: &[(Vec<u32>, Vec<bool>)], pad: u32, device: Device) -> Self {
        let t = sequences
            .iter()
            .map(|s| s.0.len())
            .max()
            .unwrap_or(1)
            .max(2);
        let mut ids = Vec::with_capacity(sequences.len() * t);
        let mut labels = Vec::with_capacity(sequences.len() * t);
        for (tokens, target) in sequences {
            for i in 0..t {
                let id = tokens.get(i).copied();
                ids.push(id.unwrap_or(pad) as i64);
                let is_target = id.is_some() && target.get(i).copied().unwrap_or(false);
                labels.push(if is_target {
                    id.unwrap_or(pad) as i64
                } else {
                    IGNORE
                });
            }
        }
        let shape = [sequences.len() as i64, t as i64];
        Self {
            ids: Tensor::from_slice(&ids).reshape(shape).to_device(device),
            labels: Tensor::from_slice(&labels).reshape(shape).to_device(device),
        }
    }

    /// Number of loss targets (labels other than [`IGNORE`] after the first position).
    pub fn target_count(&self) -> i64 {
        let t = self.labels.size()[1];
        self.labels
            .narrow(1, 1, t - 1)
            .ne(IGNORE)
            .sum(Kind::Int64)
            .int64_value(&[])
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Steps of the whole schedule (cosine decay to 0 at the end).
    pub total_steps: usize,
    /// Gradient L2-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Layer-wise recomputation: keeps only each layer's input between the forward and the
    /// backward pass, so dequantized base weights never accumulate. Costs one more forward.
    pub checkpointing: bool,
    /// Seed of the dropout masks (step and layer are mixed in).
    pub seed: i64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 10,
            total_steps: 200,
            max_grad_norm: 1.0,
            checkpointing: true,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// A constant learning rate, no warm-up, clipping at 1, layer-wise recomputation: what
    /// every federated round uses (AdamW restarts each round, as FedAvg clients do).
    pub fn constant(lr: f64, seed: i64) -> Self {
        Self {
            lr,
            weight_decay: 0.0,
            warmup_steps: 0,
            // The cosine never leaves its start.
            total_steps: usize::MAX / 2,
            max_grad_norm: 1.0,
            checkpointing: true,
            seed,
        }
    }
}

/// Learning rate at optimizer step `step` (0-based): linear warm-up to `lr`, then cosine
/// decay to 0 at `total_steps`.
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = cfg.total_steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps) as f64 / span as f64).min(1.0);
    cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Sum of the next-token cross-entropy over the targets of `labels`, from final-norm hidden
/// states [b, t, hidden]. Logits are computed for target positions only. Keeps the autograd
/// graph (the reference path; training uses [`fused_head`]).
fn head_loss_sum(model: &Llama, normed: &Tensor, labels: &Tensor) -> Tensor {
    let (h, y, keep) = head_targets(normed, labels);
    let logits = model.logits(&h.index_select(0, &keep));
    logits.cross_entropy_loss::<Tensor>(
        &y.index_select(0, &keep),
        None,
        tch::Reduction::Sum,
        IGNORE,
        0.0,
    )
}

/// Hidden states [b (t-1), hidden] that predict a next token, their targets [b (t-1)] and the
/// indices of the rows whose target is not [`IGNORE`].
fn head_targets(normed: &Tensor, labels: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (t, hidden) = (normed.size()[1], normed.size()[2]);
    let h = normed.narrow(1, 0, t - 1).reshape([-1, hidden]);
    let y = labels.narrow(1, 1, t - 1).reshape([-1]);
    let keep = y.ne(IGNORE).nonzero().squeeze_dim(1);
    (h, y, keep)
}

/// Logit elements per chunk of the fused head (64 MiB of f32: 2 chunks for a batch of 4 x 256
/// at vocab 32000). Smaller chunks re-read the head weight once per chunk and were no faster
/// in the training benchmark; one chunk per batch peaks higher.
const HEAD_CHUNK_ELEMENTS: i64 = 1 << 24;

/// The LM head and cross-entropy fused and chunked over target rows, without autograd:
/// returns the loss sum over the targets and, with `grad_scale`, the gradient of
/// `grad_scale * loss_sum` with respect to `normed` ([b, t, hidden], zero where no target).
/// Per chunk: logits = h W^T, loss = logsumexp - logit[target], and in place
/// softmax - one_hot(target), whose product with W is the chunk's gradient. Autograd would
/// keep the [tokens, vocab] logits, their log-softmax and its gradient (130 MB each at
/// 1020 x 32000) and stream each through memory; here each chunk's logits are overwritten
/// in place by their gradient, and the head weight is dequantized once per call.
pub fn fused_head(
    model: &Llama,
    normed: &Tensor,
    labels: &Tensor,
    grad_scale: Option<f64>,
) -> (f64, Option<Tensor>) {
    fused_head_chunked(model, normed, labels, grad_scale, HEAD_CHUNK_ELEMENTS)
}

/// [`fused_head`] with at most `chunk_elements` logits per chunk (at least one row).
fn fused_head_chunked(
    model: &Llama,
    normed: &Tensor,
    labels: &Tensor,
    grad_scale: Option<f64>,
    chunk_elements: i64,
) -> (f64, Option<Tensor>) {
    tch::no_grad(|| {
        let (h, y, keep) = head_targets(normed, labels);
        let (hk, yk) = (h.index_select(0, &keep), y.index_select(0, &keep));
        let ck = model.compute_kind;
        let w = model.head_weight(ck);
        let vocab = w.size()[0];
        let rows = hk.size()[0];
        let chunk = (chunk_elements / vocab).max(1);
        let mut loss = Tensor::zeros([], (Kind::Double, normed.device()));
        let mut grads = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = chunk.min(rows - start);
            let hc = hk.narrow(0, start, n);
            let target = yk.narrow(0, start, n).unsqueeze(1);
            let mut logits = hc.to_kind(ck).matmul(&w.tr()).to_kind(Kind::Float);
            // log-sum-exp in place (libtorch's allocates two chunk-sized temporaries): the
            // chunk becomes exp(logits - max), its row sums give lse, and dividing by them
            // leaves the softmax.
            let picked = logits.gather(1, &target, false);
            let max = logits.amax([1i64], true);
            let _ = logits.g_sub_(&max).exp_();
            let sum = logits.sum_dim_intlist(&[1i64][..], true, Kind::Float);
            let lse = sum.log() + &max;
            loss += (&lse - picked).sum(Kind::Double);
            if let Some(scale) = grad_scale {
                let _ = logits.g_div_(&sum);
                let minus_one = Tensor::full([n, 1], -1.0, (logits.kind(), logits.device()));
                let _ = logits.scatter_add_(1, &target, &minus_one);
                grads.push(logits.to_kind(ck).matmul(&w).to_kind(normed.kind()) * scale);
            }
            start += n;
        }
        let grad = grad_scale.map(|_| {
            let (b, t, hidden) = (normed.size()[0], normed.size()[1], normed.size()[2]);
            let full = Tensor::zeros([b, t, hidden], (normed.kind(), normed.device()));
            if rows > 0 {
                let flat = Tensor::zeros([b * (t - 1), hidden], (normed.kind(), normed.device()));
                let flat = flat.index_copy(0, &keep, &Tensor::cat(&grads, 0));
                full.narrow(1, 0, t - 1)
                    .copy_(&flat.reshape([b, t - 1, hidden]));
            }
            full
        });
        (loss.double_value(&[]), grad)
    })
}

/// Mean loss per target token over `batch` (autograd graph kept, no recomputation).
pub fn loss(model: &Llama, lora: &Lora, batch: &Batch) -> Tensor {
    let normed = model.hidden_states(&batch.ids, lora);
    head_loss_sum(model, &normed, &batch.labels) / batch.target_count().max(1) as f64
}

/// Mean evaluation loss per target token over `batches` (no dropout, no gradients).
pub fn evaluate(model: &Llama, lora: Option<&Lora>, batches: &[Batch]) -> f64 {
    if let Some(l) = lora {
        l.set_training(false);
    }
    tch::no_grad(|| {
        let (mut sum, mut n) = (0.0, 0i64);
        for b in batches {
            let normed = match lora {
                Some(l) => model.hidden_states(&b.ids, l),
                None => model.hidden_states(&b.ids, &NoAdapter),
            };
            sum += fused_head(model, &normed, &b.labels, None).0;
            n += b.target_count();
        }
        sum / n.max(1) as f64
    })
}

/// Accumulates into the adapters' gradients d(scale * loss_sum(batch)) with layer-wise
/// recomputation; returns the loss sum.
fn backward_checkpointed(model: &Llama, lora: &Lora, batch: &Batch, scale: f64, seed: i64) -> f64 {
    let t = batch.ids.size()[1];
    let (cos, sin) = model.rope_tables(t, Kind::Float);
    let layer_seed = |i: usize| seed.wrapping_mul(1_000_003).wrapping_add(i as i64);
    let mut inputs = Vec::with_capacity(model.blocks.len() + 1);
    tch::no_grad(|| {
        let mut x = model.embed.rows(&batch.ids, Kind::Float);
        for (i, block) in model.blocks.iter().enumerate() {
            tch::manual_seed(layer_seed(i));
            let y = model.block_forward(i, block, &x, &cos, &sin, lora);
            inputs.push(x);
            x = y;
        }
        inputs.push(x);
    });
    // The forward's transients sit freed in the heap; the head's chunks would come on top.
    release_free_memory();
    let top = inputs
        .pop()
        .expect("final hidden state")
        .set_requires_grad(true);
    let normed = model.final_norm(&top);
    let (value, head_grad) = fused_head(model, &normed, &batch.labels, Some(scale));
    (normed * head_grad.expect("asked for"))
        .sum(Kind::Float)
        .backward();
    let mut grad = top.grad();
    // The head's freed rows and gradients, likewise, before the layers start from the live set.
    release_free_memory();
    // glibc keeps a layer's freed graph for the next layer to reuse, but fragments pile up
    // (about a seventh of a layer's graph per layer: +45% of SmolLM2's peak after 30
    // layers). The resident set before and after the first layer's backward gives that
    // layer's footprint; the heap is trimmed whenever the set grows by half of it again.
    // (Trimming after every layer would cost 15-20% of the throughput in page faults.)
    let before = resident_set_bytes();
    let mut limit = None;
    for (i, block) in model.blocks.iter().enumerate().rev() {
        let x = inputs.pop().expect("layer input");
        let x = if i > 0 { x.set_requires_grad(true) } else { x };
        tch::manual_seed(layer_seed(i));
        let y = model.block_forward(i, block, &x, &cos, &sin, lora);
        (y * &grad).sum(Kind::Float).backward();
        if i > 0 {
            grad = x.grad();
        }
        if let (Some(before), Some(now)) = (before, resident_set_bytes()) {
            let limit = *limit.get_or_insert(now + now.saturating_sub(before) / 2);
            if now > limit {
                release_free_memory();
            }
        }
    }
    value
}

/// Statistics of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss per target token over the step's micro-batches.
    pub loss: f64,
    /// Target tokens in the step.
    pub tokens: i64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// AdamW over a LoRA's trainable tensors with the schedule of a [`TrainConfig`].
pub struct Trainer {
    /// Hyper-parameters.
    pub config: TrainConfig,
    opt: nn::Optimizer,
    step: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// An optimizer for `lora`'s trainable tensors.
    pub fn new(lora: &Lora, config: TrainConfig) -> Result<Self, tch::TchError> {
        // Weight decay is applied by `step` (`Lora::decay`, decoupled as in AdamW), so that
        // it honours a training restriction.
        let opt = nn::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: 0.0,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&lora.vs, config.lr)?;
        Ok(Self {
            config,
            opt,
            step: 0,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One optimizer step over `micro_batches` (gradient accumulation): the gradient is that
    /// of the mean loss over all their target tokens.
    pub fn step(&mut self, model: &Llama, lora: &Lora, micro_batches: &[Batch]) -> StepStats {
        lora.set_training(true);
        self.opt.zero_grad();
        let seed = self.config.seed ^ ((self.step * 64) as i64);
        let (loss_sum, tokens) =
            accumulate_gradients(model, lora, micro_batches, self.config.checkpointing, seed);
        let scale = 1.0 / tokens.max(1) as f64;
        lora.mask_gradients();
        let grad_norm = grad_norm(lora);
        if self.config.max_grad_norm > 0.0 {
            self.opt.clip_grad_norm(self.config.max_grad_norm);
        }
        let lr = lr_at(&self.config, self.step);
        self.opt.set_lr(lr);
        lora.decay(1.0 - lr * self.config.weight_decay);
        self.opt.step();
        self.step += 1;
        lora.set_training(false);
        StepStats {
            loss: loss_sum * scale,
            tokens,
            lr,
            grad_norm,
        }
    }
}

/// Adds to the adapters' gradients those of the mean loss over all target tokens of
/// `micro_batches` (with layer-wise recomputation if `checkpointing`; dropout streams seeded
/// from `seed`); returns the loss sum and the target count. The LM head and loss run through
/// [`fused_head`].
pub fn accumulate_gradients(
    model: &Llama,
    lora: &Lora,
    micro_batches: &[Batch],
    checkpointing: bool,
    seed: i64,
) -> (f64, i64) {
    let tokens: i64 = micro_batches.iter().map(Batch::target_count).sum();
    let scale = 1.0 / tokens.max(1) as f64;
    let mut loss_sum = 0.0;
    for (k, batch) in micro_batches.iter().enumerate() {
        lora.set_dropout_seed((seed ^ k as i64) as u64);
        if checkpointing {
            loss_sum += backward_checkpointed(model, lora, batch, scale, seed ^ k as i64);
        } else {
            let normed = model.hidden_states(&batch.ids, lora);
            let (l, head_grad) = fused_head(model, &normed, &batch.labels, Some(scale));
            loss_sum += l;
            (normed * head_grad.expect("asked for"))
                .sum(Kind::Float)
                .backward();
        }
        release_free_memory();
    }
    (loss_sum, tokens)
}

/// This process's resident set (`/proc/self/statm`), where the system tells.
pub fn resident_set_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    #[cfg(unix)]
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(unix))]
    let page = 4096;
    Some(pages * u64::try_from(page).ok()?)
}

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`). A
/// micro-batch's backward pass frees its activations into glibc's heap, which keeps them
/// (the tensors are smaller than its adaptive mmap threshold); the next micro-batch's LM-head
/// chunks (mmapped) would then come on top, and the step's peak would grow by the retained
/// heap (about one layer's activations: +35% on the small benchmark config). Trimming after
/// every micro-batch keeps the peak at what `crate::plan` predicts, for a few page faults
/// per step; on the box's shared memory the freed pages go back to the GPU too.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// L2 norm of all trainable gradients.
pub fn grad_norm(lora: &Lora) -> f64 {
    tch::no_grad(|| {
        lora.vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad())
            .filter(Tensor::defined)
            .map(|g| g.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedshield_models::config::LlamaConfig;
    use tch::Device;

    #[test]
    fn fused_head_matches_autograd_over_any_chunking() {
        let config = LlamaConfig {
            vocab_size: 53,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
        };
        let model = Llama::random(config, Device::Cpu, 3);
        let seqs: Vec<(Vec<u32>, Vec<bool>)> = (0..3)
            .map(|s| {
                let n = 7 + 2 * s;
                let ids = (0..n).map(|i| ((i * 11 + s * 5 + 2) % 53) as u32).collect();
                (ids, (0..n).map(|i| i % 3 != 0).collect())
            })
            .collect();
        let batch = Batch::from_sequences(&seqs, 0, Device::Cpu);
        let normed =
            tch::no_grad(|| model.hidden_states(&batch.ids, &NoAdapter)).set_requires_grad(true);
        let reference = head_loss_sum(&model, &normed, &batch.labels);
        let want = reference.double_value(&[]);
        (reference * 0.25).backward();
        let want_grad = normed.grad();
        // One row per chunk, a few rows, everything at once.
        for chunk in [1, 53 * 4, 1 << 22] {
            let (got, grad) = fused_head_chunked(&model, &normed, &batch.labels, Some(0.25), chunk);
            assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
            let d = (grad.unwrap() - &want_grad).abs().max().double_value(&[]);
            assert!(d < 1e-6, "chunk {chunk}: gradient differs by {d}");
            let (no_grad_loss, none) =
                fused_head_chunked(&model, &normed, &batch.labels, None, chunk);
            assert_eq!(no_grad_loss, got);
            assert!(none.is_none());
        }
    }
}
