//! Llama-family model configurations.

use serde::{Deserialize, Serialize};

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
