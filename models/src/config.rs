//! Llama-family model configurations.

use crate::gguf::{Gguf, GgufError};
use fedshield_codec::{CodecError, Layout, PairSpec};
use serde::{Deserialize, Serialize};

/// The seven adaptable projections, in the order of a layer's adapters in an update:
/// (PEFT name, parent module).
pub const PROJECTIONS: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// Hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Whether the LM head shares the token embedding.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// SmolLM2-135M-Instruct, as read from its GGUF metadata.
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            tie_word_embeddings: true,
        }
    }

    /// The training benchmark configuration (same as the PyTorch + PEFT anchor).
    pub fn bench_small() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 512,
            intermediate_size: 1408,
            num_hidden_layers: 6,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
        }
    }

    /// Reads the hyper-parameters from GGUF metadata (llama architecture only).
    pub fn from_gguf(g: &Gguf) -> Result<Self, GgufError> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::Corrupt(format!(
                "architecture {arch:?}: only llama-family models are supported"
            )));
        }
        let u = |k: &str| g.get_u64(&format!("llama.{k}")).map(|v| v as usize);
        let heads = u("attention.head_count")?;
        Ok(Self {
            vocab_size: g.get_strings("tokenizer.ggml.tokens")?.len(),
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
            rms_norm_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: g.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            tie_word_embeddings: g.tensor("output.weight").is_err(),
        })
    }

    /// (in, out) features of a projection.
    pub fn projection_shape(&self, name: &str) -> Option<(usize, usize)> {
        let (h, ff) = (self.hidden_size, self.intermediate_size);
        let kv = self.num_key_value_heads * self.head_dim();
        Some(match name {
            "q_proj" | "o_proj" => (h, h),
            "k_proj" | "v_proj" => (h, kv),
            "gate_proj" | "up_proj" => (h, ff),
            "down_proj" => (ff, h),
            _ => return None,
        })
    }

    /// The update layout of rank-`r` LoRA adapters on `targets` (PEFT names) of every
    /// layer: what the host aggregates without a copy of the model's weights. Equal to the
    /// edge trainer's `Lora::layout` (tested there).
    pub fn lora_layout(
        &self,
        r: usize,
        targets: &[&str],
        train_a: bool,
    ) -> Result<Layout, CodecError> {
        if let Some(bad) = targets.iter().find(|t| self.projection_shape(t).is_none()) {
            return Err(CodecError::Layout(format!("unknown target module {bad:?}")));
        }
        let mut pairs = Vec::new();
        for layer in 0..self.num_hidden_layers {
            for (name, parent) in PROJECTIONS {
                if !targets.contains(&name) {
                    continue;
                }
                let (inp, out) = self.projection_shape(name).expect("known");
                pairs.push(PairSpec {
                    name: format!("layers.{layer}.{parent}.{name}"),
                    layer,
                    r,
                    in_features: inp,
                    out_features: out,
                    train_a,
                });
            }
        }
        Layout::new(pairs)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims() {
        assert_eq!(LlamaConfig::smollm2_135m().head_dim(), 64);
        assert_eq!(LlamaConfig::bench_small().head_dim(), 64);
    }
}
