//! A Llama-family decoder in tch over a quantized, frozen base: RMSNorm, rotate-half RoPE
//! (llama.cpp's Q/K row permutation undone at load), grouped-query attention with a causal
//! mask, SwiGLU MLP, tied or untied LM head. Base weights stay packed and are dequantized per
//! linear, per call ([`weight::Weight`]).

pub mod weight;

use fedshield_models::config::LlamaConfig;
use fedshield_models::gguf::{Gguf, GgufError};
use tch::{Device, Kind, Tensor};
use weight::Weight;

/// One decoder layer's frozen weights.
#[derive(Debug)]
pub struct Block {
    /// RMSNorm before attention.
    pub attn_norm: Tensor,
    /// Query projection [heads * head_dim, hidden].
    pub q_proj: Weight,
    /// Key projection [kv_heads * head_dim, hidden].
    pub k_proj: Weight,
    /// Value projection.
    pub v_proj: Weight,
    /// Output projection.
    pub o_proj: Weight,
    /// RMSNorm before the MLP.
    pub ffn_norm: Tensor,
    /// SwiGLU gate.
    pub gate_proj: Weight,
    /// SwiGLU up.
    pub up_proj: Weight,
    /// SwiGLU down.
    pub down_proj: Weight,
}

impl Block {
    /// The seven projections.
    pub fn weights(&self) -> [&Weight; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// The seven projections, mutably.
    pub fn weights_mut(&mut self) -> [&mut Weight; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }

    /// The weight of one projection.
    pub fn weight(&self, module: Module) -> &Weight {
        match module {
            Module::Q => &self.q_proj,
            Module::K => &self.k_proj,
            Module::V => &self.v_proj,
            Module::O => &self.o_proj,
            Module::Gate => &self.gate_proj,
            Module::Up => &self.up_proj,
            Module::Down => &self.down_proj,
        }
    }
}

/// The frozen base model.
#[derive(Debug)]
pub struct Llama {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// Token embedding [vocab, hidden].
    pub embed: Weight,
    /// Decoder layers.
    pub blocks: Vec<Block>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// LM head [vocab, hidden]; `None` when tied to the embedding.
    pub lm_head: Option<Weight>,
    /// Where the weights live.
    pub device: Device,
    /// Precision of the matmuls (projections, attention, LM head): f32, or bf16 on CUDA
    /// (mixed precision as autocast does it: the residual stream, norms, RoPE tables, the
    /// softmax of the loss and the LoRA parameters stay f32). See [`Llama::with_compute_kind`].
    pub compute_kind: Kind,
}

impl Llama {
    /// Loads a GGUF Llama onto `device`, weights packed as stored.
    pub fn from_gguf(g: &Gguf, device: Device) -> Result<Self, GgufError> {
        let config = LlamaConfig::from_gguf(g)?;
        let (h, kv) = (
            config.num_attention_heads as i64,
            config.num_key_value_heads as i64,
        );
        let w = |name: &str| Weight::from_gguf(g, name, device);
        let norm = |name: &str| -> Result<Tensor, GgufError> {
            Ok(Tensor::from_slice(&g.dequantize(name)?).to_device(device))
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("blk.{i}.{s}.weight");
                Ok(Block {
                    attn_norm: norm(&p("attn_norm"))?,
                    q_proj: w(&p("attn_q"))?.unpermute_rope_rows(h),
                    k_proj: w(&p("attn_k"))?.unpermute_rope_rows(kv),
                    v_proj: w(&p("attn_v"))?,
                    o_proj: w(&p("attn_output"))?,
                    ffn_norm: norm(&p("ffn_norm"))?,
                    gate_proj: w(&p("ffn_gate"))?,
                    up_proj: w(&p("ffn_up"))?,
                    down_proj: w(&p("ffn_down"))?,
                })
            })
            .collect::<Result<Vec<_>, GgufError>>()?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(w("output.weight")?)
        };
        Ok(Self {
            embed: w("token_embd.weight")?,
            norm: norm("output_norm.weight")?,
            blocks,
            lm_head,
            config,
            device,
            compute_kind: Kind::Float,
        })
    }

    /// A model of `config` with random dense f32 weights (normal, std 0.02; norms at 1) from
    /// libtorch's generator seeded with `seed`: for tests and the training benchmark.
    pub fn random(config: LlamaConfig, device: Device, seed: i64) -> Self {
        tch::manual_seed(seed);
        let c = &config;
        let hd = c.head_dim() as i64;
        let (hidden, inter) = (c.hidden_size as i64, c.intermediate_size as i64);
        let (h, kv) = (c.num_attention_heads as i64, c.num_key_value_heads as i64);
        let dense = |rows: i64, cols: i64| {
            Weight::Dense(Tensor::randn([rows, cols], (Kind::Float, device)) * 0.02)
        };
        let ones = || Tensor::ones([hidden], (Kind::Float, device));
        let blocks = (0..c.num_hidden_layers)
            .map(|_| Block {
                attn_norm: ones(),
                q_proj: dense(h * hd, hidden),
                k_proj: dense(kv * hd, hidden),
                v_proj: dense(kv * hd, hidden),
                o_proj: dense(hidden, h * hd),
                ffn_norm: ones(),
                gate_proj: dense(inter, hidden),
                up_proj: dense(inter, hidden),
                down_proj: dense(hidden, inter),
            })
            .collect();
        let vocab = c.vocab_size as i64;
        let lm_head = (!c.tie_word_embeddings).then(|| dense(vocab, hidden));
        Self {
            embed: dense(vocab, hidden),
            norm: ones(),
            blocks,
            lm_head,
            config,
            device,
            compute_kind: Kind::Float,
        }
    }

    /// The same model with every dense projection, the embedding and the LM head quantized
    /// to packed Q4_0 ([`Weight::quantize_q4_0`]): a packed base from random weights.
    pub fn quantized_q4_0(mut self) -> Self {
        let quantize = |w: &mut Weight| {
            if let Weight::Dense(t) = w {
                *w = Weight::quantize_q4_0(t);
            }
        };
        for b in &mut self.blocks {
            for w in b.weights_mut() {
                quantize(w);
            }
        }
        quantize(&mut self.embed);
        if let Some(head) = self.lm_head.as_mut() {
            quantize(head);
        }
        self
    }

    /// The same model computing its matmuls in `kind` (f32, bf16 or f16).
    pub fn with_compute_kind(mut self, kind: Kind) -> Self {
        self.compute_kind = kind;
        self
    }

    /// Bytes held by the base weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let mut total = self.embed.bytes() + self.norm.numel() * 4;
        total += self.lm_head.as_ref().map_or(0, Weight::bytes);
        for b in &self.blocks {
            total += b.weights().iter().map(|w| w.bytes()).sum::<usize>();
            total += (b.attn_norm.numel() + b.ffn_norm.numel()) * 4;
        }
        total
    }

    /// Keeps the first `layers` decoder layers' projections (and, with `head`, the LM head,
    /// or the embedding it is tied to) dequantized in the compute precision, and drops the
    /// dequantized copies of the others: the weight residency of a training plan
    /// (`crate::plan`). Results are unchanged; calls on resident weights skip the unpacking.
    pub fn set_residency(&mut self, layers: usize, head: bool) {
        let kind = self.compute_kind;
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let keep = (i < layers).then_some(kind);
            for w in b.weights_mut() {
                w.set_resident(keep);
            }
        }
        let head_weight = self.lm_head.as_mut().unwrap_or(&mut self.embed);
        head_weight.set_resident(head.then_some(kind));
    }

    /// Bytes of the resident dequantized copies ([`Llama::set_residency`]).
    pub fn resident_bytes(&self) -> usize {
        let head = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .resident_bytes();
        head + self
            .blocks
            .iter()
            .flat_map(Block::weights)
            .map(Weight::resident_bytes)
            .sum::<usize>()
    }

    /// cos and sin tables [t, head_dim] for positions 0..t (rotate-half layout).
    pub fn rope_tables(&self, t: i64, kind: Kind) -> (Tensor, Tensor) {
        let hd = self.config.head_dim() as i64;
        let inv_freq = (Tensor::arange_start_step(0, hd, 2, (Kind::Float, self.device))
            / hd as f64
            * -(self.config.rope_theta.ln()))
        .exp();
        let pos = Tensor::arange(t, (Kind::Float, self.device));
        let freqs = pos.outer(&inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// Logits [batch, t, vocab] for token ids [batch, t] (no adapters).
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let hidden = self.hidden_states(ids, &NoAdapter);
        self.logits(&hidden)
    }

    /// Final hidden states [batch, t, hidden] (after the final norm), with `adapter` adding
    /// its terms to every projection.
    pub fn hidden_states(&self, ids: &Tensor, adapter: &dyn Adapter) -> Tensor {
        let kind = Kind::Float;
        let t = ids.size()[1];
        let (cos, sin) = self.rope_tables(t, kind);
        let mut x = self.embed.rows(ids, kind);
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(i, block, &x, &cos, &sin, adapter);
        }
        self.final_norm(&x)
    }

    /// Final hidden states [batch, t, hidden] of `ids` [batch, t] that continue the positions
    /// held in `cache` (empty: from position 0), which gains their keys and values: prefill
    /// with the prompt, then one token per call, each costing one position's work instead
    /// of the whole sequence's.
    pub fn hidden_states_cached(
        &self,
        ids: &Tensor,
        adapter: &dyn Adapter,
        cache: &mut KvCache,
    ) -> Tensor {
        let kind = Kind::Float;
        let t = ids.size()[1];
        let start = cache.len;
        let (cos, sin) = self.rope_tables(start + t, kind);
        let (cos, sin) = (cos.narrow(0, start, t), sin.narrow(0, start, t));
        let mut x = self.embed.rows(ids, kind);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = &mut cache.layers[i];
            x = self.block_step(i, block, &x, &cos, &sin, adapter, Some(slot));
        }
        cache.len += t;
        self.final_norm(&x)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        x.rms_norm(
            [self.config.hidden_size as i64],
            Some(&self.norm),
            self.config.rms_norm_eps,
        )
    }

    /// Logits of hidden states [.., hidden] -> [.., vocab].
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let ck = self.compute_kind;
        hidden
            .to_kind(ck)
            .matmul(&self.head_weight(ck).tr())
            .to_kind(hidden.kind())
    }

    /// The LM head's weight [vocab, hidden] (the embedding when tied), dequantized to `kind`.
    pub fn head_weight(&self, kind: Kind) -> Tensor {
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .dequantize(kind)
    }

    /// One decoder layer over whole sequences (causal attention among the positions of `x`).
    pub fn block_forward(
        &self,
        index: usize,
        b: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        adapter: &dyn Adapter,
    ) -> Tensor {
        self.block_step(index, b, x, cos, sin, adapter, None)
    }

    /// One decoder layer over `x` [b, t, hidden] at positions `cached..cached + t`, where
    /// `cache` holds the keys and values of positions `0..cached` (after RoPE, before the
    /// grouped-query expansion) and gains those of `x`; `cos` and `sin` are the tables of
    /// the new positions.
    #[allow(clippy::too_many_arguments)]
    fn block_step(
        &self,
        index: usize,
        b: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        adapter: &dyn Adapter,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let c = &self.config;
        let (bsz, t) = (x.size()[0], x.size()[1]);
        let (h, kv, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
        );
        let eps = c.rms_norm_eps;
        let hidden = c.hidden_size as i64;
        let ck = self.compute_kind;
        // In the compute precision: inputs cast, output left in it (a residual add in f32
        // promotes it back, as under autocast).
        let linear = |x: &Tensor, w: &Weight, module: Module| {
            let x = x.to_kind(ck);
            let y = x.matmul(&w.dequantize(ck).tr());
            match adapter.delta(index, module, &x) {
                Some(d) => y + d.to_kind(ck),
                None => y,
            }
        };
        let n = x.rms_norm([hidden], Some(&b.attn_norm), eps);
        let q = linear(&n, &b.q_proj, Module::Q)
            .view([bsz, t, h, hd])
            .transpose(1, 2);
        let k = linear(&n, &b.k_proj, Module::K)
            .view([bsz, t, kv, hd])
            .transpose(1, 2);
        let mut v = linear(&n, &b.v_proj, Module::V)
            .view([bsz, t, kv, hd])
            .transpose(1, 2);
        let (cos, sin) = (cos.to_kind(ck), sin.to_kind(ck));
        let q = apply_rope(&q, &cos, &sin);
        let mut k = apply_rope(&k, &cos, &sin);
        let cached = match cache {
            None => 0,
            Some(slot) => {
                let (k_all, v_all) = match slot.take() {
                    Some((k_old, v_old)) => {
                        (Tensor::cat(&[k_old, k], 2), Tensor::cat(&[v_old, v], 2))
                    }
                    None => (k, v),
                };
                *slot = Some((k_all.shallow_clone(), v_all.shallow_clone()));
                (k, v) = (k_all, v_all);
                k.size()[2] - t
            }
        };
        let (k, v) = if kv != h {
            (
                k.repeat_interleave_self_int(h / kv, 1, None),
                v.repeat_interleave_self_int(h / kv, 1, None),
            )
        } else {
            (k, v)
        };
        let attn = if cached == 0 {
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)
        } else {
            // New position i (absolute cached + i) sees keys 0..=cached + i.
            let rows = Tensor::arange(t, (Kind::Int64, x.device())).unsqueeze(1) + cached;
            let cols = Tensor::arange(cached + t, (Kind::Int64, x.device())).unsqueeze(0);
            let allowed = cols.le_tensor(&rows);
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(allowed), 0.0, false, None, false)
        };
        let attn = attn.transpose(1, 2).reshape([bsz, t, h * hd]);
        let x = x + linear(&attn, &b.o_proj, Module::O).to_kind(x.kind());
        let n = x.rms_norm([hidden], Some(&b.ffn_norm), eps);
        let gate = linear(&n, &b.gate_proj, Module::Gate).silu();
        let up = linear(&n, &b.up_proj, Module::Up);
        &x + linear(&(gate * up), &b.down_proj, Module::Down).to_kind(x.kind())
    }

    /// Greedy decoding of up to `max_new` tokens after `prompt`, stopping at `eos`.
    pub fn generate_greedy(&self, prompt: &[u32], max_new: usize, eos: u32) -> Vec<u32> {
        self.generate(&NoAdapter, prompt, max_new, eos, &Sampling::greedy())
    }

    /// Decodes up to `max_new` tokens after `prompt` with `adapter`, stopping at `eos`:
    /// greedy at temperature 0, else nucleus (top-p) sampling.
    pub fn generate(
        &self,
        adapter: &dyn Adapter,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        sampling: &Sampling,
    ) -> Vec<u32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
        let mut next_input: Vec<i64> = prompt.iter().map(|&i| i as i64).collect();
        let mut out = Vec::new();
        let mut cache = KvCache::new(self);
        tch::no_grad(|| {
            for _ in 0..max_new {
                if next_input.is_empty() {
                    break;
                }
                let input = Tensor::from_slice(&next_input)
                    .to_device(self.device)
                    .unsqueeze(0);
                let hidden = self.hidden_states_cached(&input, adapter, &mut cache);
                let logits = self.logits(&hidden.select(1, -1)).squeeze_dim(0);
                let next = if sampling.temperature <= 0.0 {
                    logits.argmax(-1, false).int64_value(&[])
                } else {
                    let probs: Vec<f32> = (logits / sampling.temperature)
                        .softmax(-1, Kind::Float)
                        .to_device(Device::Cpu)
                        .try_into()
                        .unwrap_or_default();
                    top_p_sample(&probs, sampling.top_p, rng.random::<f64>()) as i64
                };
                if next as u32 == eos {
                    break;
                }
                next_input = vec![next];
                out.push(next as u32);
            }
        });
        out
    }
}

/// Keys and values of the positions decoded so far, per layer (see
/// [`Llama::hidden_states_cached`]).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &Llama) -> Self {
        Self {
            layers: (0..model.blocks.len()).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Decoding settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass: sample among the most likely tokens whose probabilities sum to top_p.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Index drawn from the smallest set of most likely tokens whose mass reaches `top_p`, with
/// `u` uniform in [0, 1).
pub fn top_p_sample(probs: &[f32], top_p: f64, u: f64) -> usize {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0.0f64;
    for &i in &order {
        kept.push(i);
        mass += probs[i] as f64;
        if mass >= top_p {
            break;
        }
    }
    let mut target = u * mass;
    for &i in &kept {
        target -= probs[i] as f64;
        if target < 0.0 {
            return i;
        }
    }
    *kept.last().unwrap_or(&0)
}

/// The seven projections LoRA can adapt, named (and serialized) as PEFT names them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Module {
    /// q_proj
    #[serde(rename = "q_proj")]
    Q,
    /// k_proj
    #[serde(rename = "k_proj")]
    K,
    /// v_proj
    #[serde(rename = "v_proj")]
    V,
    /// o_proj
    #[serde(rename = "o_proj")]
    O,
    /// gate_proj
    #[serde(rename = "gate_proj")]
    Gate,
    /// up_proj
    #[serde(rename = "up_proj")]
    Up,
    /// down_proj
    #[serde(rename = "down_proj")]
    Down,
}

impl Module {
    /// All seven, in PEFT's usual order.
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// PEFT's module name.
    pub fn peft_name(&self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// Parses a PEFT module name.
    pub fn from_peft_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.peft_name() == name)
    }

    /// Its parent in the HF module tree (`self_attn` or `mlp`).
    pub fn parent(&self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }
}

/// Something that adds a term to a projection's output (LoRA).
pub trait Adapter {
    /// The term added to projection `module` of layer `layer` for input `x`, if any.
    fn delta(&self, layer: usize, module: Module, x: &Tensor) -> Option<Tensor>;
}

/// No adapter: the base model alone.
pub struct NoAdapter;

impl Adapter for NoAdapter {
    fn delta(&self, _: usize, _: Module, _: &Tensor) -> Option<Tensor> {
        None
    }
}

/// Rotate-half RoPE on x [b, heads, t, hd] with tables [t, hd].
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = x.size()[3];
    let x1 = x.narrow(3, 0, hd / 2);
    let x2 = x.narrow(3, hd / 2, hd / 2);
    let rotated = Tensor::cat(&[-x2, x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::top_p_sample;

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        let probs = [0.1f32, 0.5, 0.3, 0.1];
        // Nucleus at 0.7: tokens 1 and 2 (mass 0.8).
        for k in 0..100 {
            let i = top_p_sample(&probs, 0.7, k as f64 / 100.0);
            assert!(i == 1 || i == 2, "drew {i}");
        }
        assert_eq!(top_p_sample(&probs, 0.7, 0.0), 1);
        assert_eq!(top_p_sample(&probs, 0.7, 0.99), 2);
        // top_p = 1 can draw everything.
        assert_eq!(top_p_sample(&probs, 1.0, 0.999), 3);
    }
}
