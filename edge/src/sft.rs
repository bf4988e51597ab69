//! Supervised fine-tuning data: chat-formatted examples with loss on the response only, and
//! the local training loop (also what each federated round runs on the device).

use crate::llama::Llama;
use crate::lora::Lora;
use crate::pacing::Pacer;
use crate::train::{Batch, StepStats, Trainer, evaluate};
use fedshield_models::data::Example;
use fedshield_models::tokenizer::{Message, Tokenizer, TokenizerError};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tch::Device;

/// A tokenized example: ids, and which of them are loss targets.
pub type Sequence = (Vec<u32>, Vec<bool>);

/// Tokenizes one example in ChatML: the (default system and) user turn as the prompt, the
/// output and `<|im_end|>` as the target, so the model learns to answer and to stop. At most
/// `max_len` tokens: the prompt is cut from the left, then the response from the right.
pub fn example_tokens(
    tok: &Tokenizer,
    example: &Example,
    max_len: usize,
) -> Result<Sequence, TokenizerError> {
    let prompt = tok.chat_prompt(
        &[Message {
            role: "user".into(),
            content: example.user_text(),
        }],
        true,
    );
    let mut ids = tok.encode(&prompt)?;
    let response = tok.encode(&format!("{}<|im_end|>\n", example.output))?;
    // Over budget: the prompt keeps what the response leaves, but at least half the budget.
    let keep_prompt = if ids.len() + response.len() <= max_len {
        ids.len()
    } else {
        ids.len()
            .min(max_len.saturating_sub(response.len()).max(max_len / 2))
    };
    if ids.len() > keep_prompt {
        ids.drain(..ids.len() - keep_prompt);
    }
    let room = max_len.saturating_sub(ids.len());
    let mut mask = vec![false; ids.len()];
    ids.extend(response.iter().take(room));
    mask.resize(ids.len(), true);
    Ok((ids, mask))
}

/// Tokenizes plain-text documents for language modelling (loss on every token): each document
/// is followed by the end-of-text token and cut into windows of at most `max_len` tokens
/// (a window of one token predicts nothing and is dropped).
pub fn text_sequences(
    tok: &Tokenizer,
    docs: &[String],
    max_len: usize,
) -> Result<Vec<Sequence>, TokenizerError> {
    let max_len = max_len.max(2);
    let mut out = Vec::new();
    for doc in docs {
        let mut ids = tok.encode(doc)?;
        ids.push(tok.eos_id);
        for window in ids.chunks(max_len).filter(|w| w.len() > 1) {
            out.push((window.to_vec(), vec![true; window.len()]));
        }
    }
    Ok(out)
}

/// Tokenizes `examples`.
pub fn tokenize_all(
    tok: &Tokenizer,
    examples: &[Example],
    max_len: usize,
) -> Result<Vec<Sequence>, TokenizerError> {
    examples
        .iter()
        .map(|e| example_tokens(tok, e, max_len))
        .collect()
}

/// Batches of `batch_size` sequences in the given order.
pub fn batches(sequences: &[Sequence], batch_size: usize, pad: u32, device: Device) -> Vec<Batch> {
    sequences
        .chunks(batch_size.max(1))
        .map(|chunk| Batch::from_sequences(chunk, pad, device))
        .collect()
}

/// Settings of a local training run.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRun {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Shuffling seed.
    pub seed: u64,
    /// Padding token id.
    pub pad: u32,
}

/// Progress of a local run, reported after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// The step's statistics.
    pub stats: StepStats,
    /// Tokens (inputs, padding excluded) processed per second since the start.
    pub tokens_per_s: f64,
    /// Tokens processed since the start.
    pub tokens: usize,
    /// Held-out loss, when evaluated at this step.
    pub eval_loss: Option<f64>,
}

/// A local run's data: training sequences and held-out batches.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    /// Sequences to train on.
    pub train: &'a [Sequence],
    /// Held-out batches (evaluated every `eval_every` steps and at the end).
    pub eval: &'a [Batch],
}

/// Trains `lora` on `data.train` for `run.steps` optimizer steps, cycling through the data
/// in a seeded shuffled order, paced by `pacer` (fewer steps when it ends the run), and
/// reports progress. Returns the held-out loss at the end.
pub fn train_local(
    model: &Llama,
    lora: &Lora,
    trainer: &mut Trainer,
    data: Data<'_>,
    run: &LocalRun,
    pacer: &mut Pacer,
    mut report: impl FnMut(&Progress),
) -> f64 {
    let Data { train, eval } = data;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(run.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut cursor = order.len();
    let start = std::time::Instant::now();
    let mut tokens = 0usize;
    for step in 1..=run.steps {
        // The box's sensors may slow, pause or (after a long pause) end the run.
        if !pacer.before_step() {
            break;
        }
        let mut micro = Vec::with_capacity(run.grad_accum.max(1));
        for _ in 0..run.grad_accum.max(1) {
            let mut chunk = Vec::with_capacity(run.batch_size);
            while chunk.len() < run.batch_size.max(1) {
                if cursor == order.len() {
                    order.shuffle(&mut rng);
                    cursor = 0;
                }
                chunk.push(train[order[cursor]].clone());
                cursor += 1;
            }
            tokens += chunk.iter().map(|s| s.0.len()).sum::<usize>();
            micro.push(Batch::from_sequences(&chunk, run.pad, model.device));
        }
        let stats = trainer.step(model, lora, &micro);
        let eval_loss = (run.eval_every > 0 && step % run.eval_every == 0 && step != run.steps)
            .then(|| evaluate(model, Some(lora), eval));
        report(&Progress {
            step,
            stats,
            tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
            tokens,
            eval_loss,
        });
    }
    evaluate(model, Some(lora), eval)
}
