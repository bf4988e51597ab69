//! The base model as an ONNX Runtime graph, built in memory from the loaded [`Llama`] with
//! `ort`'s model editor (no `.onnx` file, no Python): token ids `[1, t]` in, logits
//! `[1, t, vocab]` out, for a fixed prompt length `t` (prefill). 4-bit projections stay
//! 4-bit as `com.microsoft.MatMulNBits` ([`fedshield_models::nbits`]; Q4_1's block offsets
//! added as block sums times the offsets), other weights are f32 `MatMul`s; standard ops
//! for RMSNorm, rotate-half RoPE, grouped-query attention with a causal mask, and SwiGLU.
//! [`decode_session`] decodes one token at a time with a KV cache. The adapter is the next
//! step (issue 15).

use crate::llama::weight::Weight;
use crate::llama::{Block, Llama};
use fedshield_models::gguf::GgmlType;
use fedshield_models::nbits::{BLOB, BLOCK, NBits};
use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::operator::Attribute;
use ort::session::Session;
use ort::value::{
    Outlet, PrimitiveTensorElementType, Shape, SymbolicDimensions, Tensor, TensorElementType,
    ValueType,
};
use tch::Kind;

/// Builds a graph node by node, naming every value.
struct Builder {
    graph: Graph,
    next: usize,
}

impl Builder {
    /// Adds `op` over `inputs`; returns the name of its (single) output.
    fn op(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        attributes: Vec<Attribute>,
    ) -> ort::Result<String> {
        self.next += 1;
        let out = format!("v{}_{op}", self.next);
        self.graph.add_node(Node::new(
            op,
            domain,
            format!("n{}", self.next),
            inputs,
            [&out],
            attributes,
        )?)?;
        Ok(out)
    }

    fn std(&mut self, op: &str, inputs: &[&str]) -> ort::Result<String> {
        self.op(op, ONNX_DOMAIN, inputs, Vec::new())
    }

    /// A constant of `shape` (the editor takes only tensors it allocated).
    fn constant<T: PrimitiveTensorElementType + Copy + std::fmt::Debug>(
        &mut self,
        shape: &[i64],
        data: &[T],
    ) -> ort::Result<String> {
        self.next += 1;
        let name = format!("c{}", self.next);
        let mut t = Tensor::<T>::new(&ort::memory::Allocator::default(), shape.to_vec())?;
        t.extract_tensor_mut().1.copy_from_slice(data);
        self.graph.add_initializer(&name, t, false)?;
        Ok(name)
    }

    fn floats(&mut self, shape: &[i64], data: &[f32]) -> ort::Result<String> {
        self.constant(shape, data)
    }

    fn ints(&mut self, data: &[i64]) -> ort::Result<String> {
        self.constant(&[data.len() as i64], data)
    }

    /// RMSNorm of `x` over its last axis with weight `w`.
    fn rms_norm(&mut self, x: &str, w: &tch::Tensor, eps: f64) -> ort::Result<String> {
        let w = tensor_f32(w);
        let w = self.floats(&[w.len() as i64], &w)?;
        let axes = self.ints(&[-1])?;
        let eps = self.floats(&[], &[eps as f32])?;
        let sq = self.std("Mul", &[x, x])?;
        let mean = self.op(
            "ReduceMean",
            ONNX_DOMAIN,
            &[&sq, &axes],
            vec![Attribute::new("keepdims", 1i64)?],
        )?;
        let var = self.std("Add", &[&mean, &eps])?;
        let rms = self.std("Sqrt", &[&var])?;
        let n = self.std("Div", &[x, &rms])?;
        self.std("Mul", &[&n, &w])
    }

    /// `x @ w^T` for a `[out, in]` weight.
    fn linear(&mut self, x: &str, w: &Weight) -> ort::Result<String> {
        let (rows, cols) = w.shape();
        match w {
            Weight::Quant { ty, packed, .. } if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) => {
                let bytes = Vec::<u8>::try_from(packed.flatten(0, -1))
                    .map_err(|e| ort::Error::new(e.to_string()))?;
                let nb = NBits::from_gguf(*ty, &bytes, rows as usize, cols as usize)
                    .map_err(|e| ort::Error::new(e.to_string()))?;
                let blocks = cols / BLOCK as i64;
                let b = self.constant(&[rows, blocks, BLOB as i64], &nb.codes)?;
                let scales = self.floats(&[rows, blocks], &nb.scales)?;
                let mut inputs = vec![x.to_string(), b, scales];
                if nb.zero_point == 0 {
                    let per_row = (blocks as usize).div_ceil(2);
                    inputs.push(self.constant(
                        &[rows * per_row as i64],
                        &vec![0u8; rows as usize * per_row],
                    )?);
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let y = self.op(
                    "MatMulNBits",
                    "com.microsoft",
                    &refs,
                    vec![
                        Attribute::new("K", cols)?,
                        Attribute::new("N", rows)?,
                        Attribute::new("bits", 4i64)?,
                        Attribute::new("block_size", BLOCK as i64)?,
                    ],
                )?;
                let Some(mins) = &nb.mins else {
                    return Ok(y);
                };
                // + (block sums of x) @ mins^T.
                let shape = self.ints(&[0, 0, blocks, BLOCK as i64])?;
                let grouped = self.std("Reshape", &[x, &shape])?;
                let axes = self.ints(&[-1])?;
                let sums = self.op(
                    "ReduceSum",
                    ONNX_DOMAIN,
                    &[&grouped, &axes],
                    vec![Attribute::new("keepdims", 0i64)?],
                )?;
                let mut mins_t = vec![0f32; mins.len()];
                for r in 0..rows as usize {
                    for b in 0..blocks as usize {
                        mins_t[b * rows as usize + r] = mins[r * blocks as usize + b];
                    }
                }
                let m = self.floats(&[blocks, rows], &mins_t)?;
                let offsets = self.std("MatMul", &[&sums, &m])?;
                self.std("Add", &[&y, &offsets])
            }
            _ => {
                let wt = tensor_f32(&w.dequantize(Kind::Float).tr().contiguous());
                let wt = self.floats(&[cols, rows], &wt)?;
                self.std("MatMul", &[x, &wt])
            }
        }
    }

    /// `[1, t, heads * hd]` -> `[1, heads, t, hd]`.
    fn heads(&mut self, x: &str, heads: i64, hd: i64) -> ort::Result<String> {
        let shape = self.ints(&[0, 0, heads, hd])?;
        let split = self.std("Reshape", &[x, &shape])?;
        self.op(
            "Transpose",
            ONNX_DOMAIN,
            &[&split],
            vec![Attribute::new("perm", vec![0i64, 2, 1, 3])?],
        )
    }

    /// Rotate-half RoPE of `x` `[1, heads, t, hd]` with tables `cos`, `sin` `[t, hd]`.
    fn rope(&mut self, x: &str, cos: &str, sin: &str, hd: i64) -> ort::Result<String> {
        let axes = self.ints(&[-1])?;
        let (zero, half, end) = (self.ints(&[0])?, self.ints(&[hd / 2])?, self.ints(&[hd])?);
        let x1 = self.std("Slice", &[x, &zero, &half, &axes])?;
        let x2 = self.std("Slice", &[x, &half, &end, &axes])?;
        let neg = self.std("Neg", &[&x2])?;
        let rotated = self.op(
            "Concat",
            ONNX_DOMAIN,
            &[&neg, &x1],
            vec![Attribute::new("axis", -1i64)?],
        )?;
        let a = self.std("Mul", &[x, cos])?;
        let b = self.std("Mul", &[&rotated, sin])?;
        self.std("Add", &[&a, &b])
    }

    /// `[1, kv, t, hd]` -> `[1, kv * rep, t, hd]`, each head repeated `rep` times in place
    /// (any `t`).
    fn repeat_kv(&mut self, x: &str, kv: i64, rep: i64, hd: i64) -> ort::Result<String> {
        if rep == 1 {
            return Ok(x.to_string());
        }
        let s5 = self.ints(&[1, kv, 1, -1, hd])?;
        let x5 = self.std("Reshape", &[x, &s5])?;
        let e = self.ints(&[1, 1, rep, 1, 1])?;
        let expanded = self.std("Expand", &[&x5, &e])?;
        let s4 = self.ints(&[1, kv * rep, -1, hd])?;
        self.std("Reshape", &[&expanded, &s4])
    }

    /// One decoder layer over `x`; `rope` are the positions' cos and sin, `mask` the causal
    /// mask (none when one new token attends to everything), `cache` the layer's past keys
    /// and values (graph inputs) and the names to give the present ones (graph outputs).
    fn block(
        &mut self,
        model: &Llama,
        b: &Block,
        x: &str,
        rope: (&str, &str),
        mask: Option<&str>,
        cache: Option<[&str; 4]>,
    ) -> ort::Result<String> {
        let c = &model.config;
        let (h, kv, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
        );
        let (cos, sin) = rope;
        let n = self.rms_norm(x, &b.attn_norm, c.rms_norm_eps)?;
        let q = self.linear(&n, &b.q_proj)?;
        let k = self.linear(&n, &b.k_proj)?;
        let v = self.linear(&n, &b.v_proj)?;
        let q = self.heads(&q, h, hd)?;
        let k = self.heads(&k, kv, hd)?;
        let v = self.heads(&v, kv, hd)?;
        let q = self.rope(&q, cos, sin, hd)?;
        let mut k = self.rope(&k, cos, sin, hd)?;
        let mut v = v;
        if let Some([past_k, past_v, present_k, present_v]) = cache {
            let concat = |g: &mut Self, past: &str, new: &str, name: &str| -> ort::Result<String> {
                let all = g.op(
                    "Concat",
                    ONNX_DOMAIN,
                    &[past, new],
                    vec![Attribute::new("axis", 2i64)?],
                )?;
                g.graph.add_node(Node::new(
                    "Identity",
                    ONNX_DOMAIN,
                    format!("{name}_out"),
                    [all.as_str()],
                    [name],
                    [],
                )?)?;
                Ok(all)
            };
            k = concat(self, past_k, &k, present_k)?;
            v = concat(self, past_v, &v, present_v)?;
        }
        let k = self.repeat_kv(&k, kv, h / kv, hd)?;
        let v = self.repeat_kv(&v, kv, h / kv, hd)?;
        let kt = self.op(
            "Transpose",
            ONNX_DOMAIN,
            &[&k],
            vec![Attribute::new("perm", vec![0i64, 1, 3, 2])?],
        )?;
        let scores = self.std("MatMul", &[&q, &kt])?;
        let scale = self.floats(&[], &[1.0 / (hd as f32).sqrt()])?;
        let scores = self.std("Mul", &[&scores, &scale])?;
        let scores = match mask {
            Some(mask) => self.std("Add", &[&scores, mask])?,
            None => scores,
        };
        let p = self.op(
            "Softmax",
            ONNX_DOMAIN,
            &[&scores],
            vec![Attribute::new("axis", -1i64)?],
        )?;
        let attn = self.std("MatMul", &[&p, &v])?;
        let attn = self.op(
            "Transpose",
            ONNX_DOMAIN,
            &[&attn],
            vec![Attribute::new("perm", vec![0i64, 2, 1, 3])?],
        )?;
        let merged = self.ints(&[0, 0, h * hd])?;
        let attn = self.std("Reshape", &[&attn, &merged])?;
        let o = self.linear(&attn, &b.o_proj)?;
        let x = self.std("Add", &[x, &o])?;
        let n = self.rms_norm(&x, &b.ffn_norm, c.rms_norm_eps)?;
        let gate = self.linear(&n, &b.gate_proj)?;
        let sig = self.std("Sigmoid", &[&gate])?;
        let gate = self.std("Mul", &[&gate, &sig])?;
        let up = self.linear(&n, &b.up_proj)?;
        let prod = self.std("Mul", &[&gate, &up])?;
        let down = self.linear(&prod, &b.down_proj)?;
        self.std("Add", &[&x, &down])
    }
}

fn tensor_f32(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default()
}

fn outlet(name: &str, ty: TensorElementType, dims: &[i64]) -> Outlet {
    Outlet::new(
        name,
        ValueType::Tensor {
            ty,
            shape: Shape::new(dims.to_vec()),
            dimension_symbols: SymbolicDimensions::empty(dims.len()),
        },
    )
}

/// A session computing `model`'s logits `[1, t, vocab]` ("logits") for token ids `[1, t]`
/// ("ids", int64).
pub fn prefill_session(
    env: &ort::environment::Environment,
    model: &Llama,
    t: usize,
) -> ort::Result<Session> {
    let c = &model.config;
    let t = t as i64;
    let vocab = c.vocab_size as i64;
    let mut g = Builder {
        graph: Graph::new()?,
        next: 0,
    };
    g.graph
        .set_inputs([outlet("ids", TensorElementType::Int64, &[1, t])])?;
    g.graph
        .set_outputs([outlet("logits", TensorElementType::Float32, &[1, t, vocab])])?;
    let (mut x, cos, sin) = g.embed_and_rope(model, t)?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = g.floats(&[t, t], &mask)?;
    for b in &model.blocks {
        x = g.block(model, b, &x, (&cos, &sin), Some(&mask), None)?;
    }
    g.finish(env, model, &x)
}

impl Builder {
    /// The embedding of the input "ids" (f32 table, `Gather`) and the RoPE tables of
    /// positions `0..positions`: the start of both graphs.
    fn embed_and_rope(
        &mut self,
        model: &Llama,
        positions: i64,
    ) -> ort::Result<(String, String, String)> {
        let c = &model.config;
        let (hidden, vocab) = (c.hidden_size as i64, c.vocab_size as i64);
        let embed = tensor_f32(&model.embed.dequantize(Kind::Float));
        let embed = self.floats(&[vocab, hidden], &embed)?;
        let x = self.op(
            "Gather",
            ONNX_DOMAIN,
            &[&embed, "ids"],
            vec![Attribute::new("axis", 0i64)?],
        )?;
        let (cos, sin) = model.rope_tables(positions, Kind::Float);
        let hd = c.head_dim() as i64;
        let cos = self.floats(&[positions, hd], &tensor_f32(&cos))?;
        let sin = self.floats(&[positions, hd], &tensor_f32(&sin))?;
        Ok((x, cos, sin))
    }

    /// The final norm and the LM head into the output "logits"; the session.
    fn finish(
        mut self,
        env: &ort::environment::Environment,
        model: &Llama,
        x: &str,
    ) -> ort::Result<Session> {
        let n = self.rms_norm(x, &model.norm, model.config.rms_norm_eps)?;
        let head = model.lm_head.as_ref().unwrap_or(&model.embed);
        let logits = self.linear(&n, head)?;
        self.graph.add_node(Node::new(
            "Identity",
            ONNX_DOMAIN,
            "out",
            [logits.as_str()],
            ["logits"],
            [],
        )?)?;
        let mut m = Model::new([
            Opset::new(ONNX_DOMAIN, 21)?,
            Opset::new("com.microsoft", 1)?,
        ])?;
        m.set_graph(self.graph)?;
        m.into_session(&Session::builder(env)?)
    }
}

/// A session decoding one token with a KV cache: inputs "ids" `[1, 1]` (int64), "pos" `[1]`
/// (int64, the token's position, below `max_positions`) and, per layer i, "past_k{i}" and
/// "past_v{i}" `[1, kv_heads, past, head_dim]` (f32, `past` may be 0); outputs "logits"
/// `[1, 1, vocab]` and "present_k{i}", "present_v{i}" `[1, kv_heads, past + 1, head_dim]`.
pub fn decode_session(
    env: &ort::environment::Environment,
    model: &Llama,
    max_positions: usize,
) -> ort::Result<Session> {
    let c = &model.config;
    let vocab = c.vocab_size as i64;
    let (kv, hd) = (c.num_key_value_heads as i64, c.head_dim() as i64);
    let layers = model.blocks.len();
    let mut g = Builder {
        graph: Graph::new()?,
        next: 0,
    };
    let cache = |name: String, symbol: &str| {
        Outlet::new(
            name,
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                shape: Shape::new([1, kv, -1, hd]),
                dimension_symbols: SymbolicDimensions::new([
                    String::new(),
                    String::new(),
                    symbol.to_string(),
                    String::new(),
                ]),
            },
        )
    };
    let mut inputs = vec![
        outlet("ids", TensorElementType::Int64, &[1, 1]),
        outlet("pos", TensorElementType::Int64, &[1]),
    ];
    let mut outputs = vec![outlet("logits", TensorElementType::Float32, &[1, 1, vocab])];
    for i in 0..layers {
        inputs.push(cache(format!("past_k{i}"), "past"));
        inputs.push(cache(format!("past_v{i}"), "past"));
        outputs.push(cache(format!("present_k{i}"), "total"));
        outputs.push(cache(format!("present_v{i}"), "total"));
    }
    g.graph.set_inputs(inputs)?;
    g.graph.set_outputs(outputs)?;
    let (mut x, cos, sin) = g.embed_and_rope(model, max_positions as i64)?;
    let gather = |g: &mut Builder, table: &str| {
        g.op(
            "Gather",
            ONNX_DOMAIN,
            &[table, "pos"],
            vec![Attribute::new("axis", 0i64)?],
        )
    };
    let (cos, sin) = (gather(&mut g, &cos)?, gather(&mut g, &sin)?);
    for (i, b) in model.blocks.iter().enumerate() {
        let names = [
            format!("past_k{i}"),
            format!("past_v{i}"),
            format!("present_k{i}"),
            format!("present_v{i}"),
        ];
        let cache = [
            names[0].as_str(),
            names[1].as_str(),
            names[2].as_str(),
            names[3].as_str(),
        ];
        x = g.block(model, b, &x, (&cos, &sin), None, Some(cache))?;
    }
    g.finish(env, model, &x)
}

/// Generation on ONNX Runtime: [`decode_session`] run one token at a time, the KV cache
/// carried from each run's outputs to the next run's inputs.
pub struct OnnxDecoder {
    session: Session,
    kv: i64,
    head_dim: i64,
    layers: usize,
    max_positions: usize,
}

impl OnnxDecoder {
    /// The decoder of `model` for sequences of at most `max_positions` tokens.
    pub fn new(
        env: &ort::environment::Environment,
        model: &Llama,
        max_positions: usize,
    ) -> Result<Self, crate::EdgeError> {
        let onnx = |e: ort::Error| crate::EdgeError::Onnx(e.to_string());
        let c = &model.config;
        Ok(Self {
            session: decode_session(env, model, max_positions).map_err(onnx)?,
            kv: c.num_key_value_heads as i64,
            head_dim: c.head_dim() as i64,
            layers: model.blocks.len(),
            max_positions,
        })
    }

    /// Up to `max_new` tokens after `prompt`, stopping at `eos`: greedy at temperature 0,
    /// else nucleus sampling (as [`Llama::generate`]).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        sampling: &crate::llama::Sampling,
    ) -> Result<Vec<u32>, crate::EdgeError> {
        use rand::{Rng, SeedableRng};
        let onnx = |e: ort::Error| crate::EdgeError::Onnx(e.to_string());
        if prompt.is_empty() || prompt.len() + max_new > self.max_positions {
            return Err(crate::EdgeError::Shape(format!(
                "{} prompt tokens and {max_new} new ones: the decoder holds 1 to {} positions",
                prompt.len(),
                self.max_positions
            )));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
        let mut past: Vec<(Vec<i64>, Vec<f32>)> = (0..2 * self.layers)
            .map(|_| (vec![1, self.kv, 0, self.head_dim], Vec::new()))
            .collect();
        let name = |kind: &str, i: usize| format!("{kind}_{}{}", ["k", "v"][i % 2], i / 2);
        let mut out = Vec::new();
        let mut next = prompt[0];
        for pos in 0..prompt.len() + max_new - 1 {
            let mut inputs: Vec<(String, ort::session::SessionInputValue)> = vec![
                (
                    "ids".into(),
                    Tensor::from_array(([1i64, 1], vec![i64::from(next)]))
                        .map_err(onnx)?
                        .into(),
                ),
                (
                    "pos".into(),
                    Tensor::from_array(([1i64], vec![pos as i64]))
                        .map_err(onnx)?
                        .into(),
                ),
            ];
            for (i, (shape, data)) in past.drain(..).enumerate() {
                inputs.push((
                    name("past", i),
                    Tensor::from_array((shape, data)).map_err(onnx)?.into(),
                ));
            }
            let outputs = self.session.run(inputs).map_err(onnx)?;
            for i in 0..2 * self.layers {
                let (shape, data) = outputs[name("present", i).as_str()]
                    .try_extract_tensor::<f32>()
                    .map_err(onnx)?;
                past.push((shape.to_vec(), data.to_vec()));
            }
            if pos + 1 < prompt.len() {
                next = prompt[pos + 1];
                continue;
            }
            let logits = outputs["logits"]
                .try_extract_tensor::<f32>()
                .map_err(onnx)?
                .1;
            let token = if sampling.temperature <= 0.0 {
                (0..logits.len())
                    .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                    .unwrap_or(0)
            } else {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits
                    .iter()
                    .map(|l| ((l - max) as f64 / sampling.temperature).exp() as f32)
                    .collect();
                let sum: f32 = exp.iter().sum();
                let probs: Vec<f32> = exp.iter().map(|e| e / sum).collect();
                crate::llama::top_p_sample(&probs, sampling.top_p, rng.random::<f64>())
            } as u32;
            if token == eos {
                break;
            }
            out.push(token);
            next = token;
        }
        Ok(out)
    }
}
