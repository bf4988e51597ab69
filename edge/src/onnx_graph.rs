//! The base model as ONNX Runtime graphs, built from the loaded [`Llama`] with `ort`'s
//! model editor (no Python; [`OnnxDecoder::export`] has ONNX Runtime write the graph to a
//! `.onnx` file). 4-bit projections stay 4-bit as `com.microsoft.MatMulNBits`
//! ([`fedshield_models::nbits`]; Q4_1's block offsets added as block sums times the
//! offsets), other weights are f32 `MatMul`s; RMSNorm, rotate-half RoPE and SwiGLU in
//! standard ops. [`prefill_session`] gives the logits of every position (standard-ops
//! attention); [`decode_model`] is the serving graph: the prompt, then a token per run over
//! a KV cache, the attention ONNX Runtime's fused `GroupQueryAttention`, and the LoRA
//! adapter as inputs that [`OnnxDecoder::set_adapter`] swaps.

use crate::llama::weight::Weight;
use crate::llama::{Block, Llama, Module};
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
    /// The projections that take LoRA inputs.
    lora: Vec<Module>,
    /// The block sums already computed, by input (Q4_1's offsets).
    block_sums: std::collections::HashMap<String, String>,
    /// How the quantized products compute.
    precision: Precision,
    /// A merged adapter's `s B A` per adapted projection `[out, in]` (f32), added to the
    /// dequantized weight.
    merged: std::collections::BTreeMap<(usize, Module), tch::Tensor>,
    /// Standard ONNX ops only ([`Ops::Standard`]).
    standard: bool,
    /// f16 activations, weights' scales and KV cache ([`Float::F16`]).
    half: bool,
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

    /// The graph's float element type.
    fn float_type(&self) -> TensorElementType {
        if self.half {
            TensorElementType::Float16
        } else {
            TensorElementType::Float32
        }
    }

    /// A float constant: f32, or f16 in a half-precision graph.
    fn floats(&mut self, shape: &[i64], data: &[f32]) -> ort::Result<String> {
        if self.half {
            let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
            self.constant(shape, &halves)
        } else {
            self.constant(shape, data)
        }
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
        // Pow(x, 2) (not x * x): the pattern ONNX Runtime fuses into one
        // SimplifiedLayerNormalization kernel.
        let two = self.floats(&[], &[2.0])?;
        let sq = self.std("Pow", &[x, &two])?;
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

    /// `w` in MatMulNBits layout when the export computes its products that way: Q4_0 and
    /// Q4_1 always, Q8_0 (an 8-bit head) only with int8 activations. (8-bit MatMulNBits
    /// with f32 activations dequantizes the whole weight on every call: 222 ms against
    /// 3.9 ms per head call here, so the exact path keeps such a weight in f32.)
    fn nbits(&self, w: &Weight) -> ort::Result<Option<NBits>> {
        let Weight::Quant { ty, packed, .. } = w else {
            return Ok(None);
        };
        let wanted = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => true,
            GgmlType::Q8_0 => self.precision == Precision::Int8,
            _ => false,
        };
        if !wanted {
            return Ok(None);
        }
        let (rows, cols) = w.shape();
        let bytes = Vec::<u8>::try_from(packed.flatten(0, -1))
            .map_err(|e| ort::Error::new(e.to_string()))?;
        NBits::from_gguf(*ty, &bytes, rows as usize, cols as usize)
            .map(Some)
            .map_err(|e| ort::Error::new(e.to_string()))
    }

    /// `x @ [w_1; w_2; ...]^T` for `[out_i, in]` weights: their products side by side along
    /// the last axis. Weights of one 4-bit type (or 8-bit, see [`Builder::nbits`]) are
    /// stacked into one MatMulNBits (a fused q/k/v or gate/up projection: one kernel and one
    /// Q4_1 offset product instead of three or two); others are dequantized to f32.
    fn linear(&mut self, x: &str, ws: &[&Weight]) -> ort::Result<String> {
        let packed = ws
            .iter()
            .map(|w| self.nbits(w))
            .collect::<ort::Result<Vec<_>>>()?;
        if let Some(mut parts) = packed.into_iter().collect::<Option<Vec<NBits>>>() {
            let stacked = if parts.len() == 1 {
                parts.pop()
            } else {
                NBits::stack(&parts).ok()
            };
            match stacked {
                Some(nb) if !self.standard => return self.matmul_nbits(x, &nb),
                Some(nb) if nb.bits == 4 => return self.dq_matmul(x, &nb),
                _ => {}
            }
        }
        if let [w] = ws {
            let (rows, cols) = w.shape();
            let wt = tensor_f32(&w.dequantize(Kind::Float).tr().contiguous());
            let wt = self.floats(&[cols, rows], &wt)?;
            return self.std("MatMul", &[x, &wt]);
        }
        let parts = ws
            .iter()
            .map(|w| self.linear(x, &[*w]))
            .collect::<ort::Result<Vec<_>>>()?;
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.op(
            "Concat",
            ONNX_DOMAIN,
            &refs,
            vec![Attribute::new("axis", -1i64)?],
        )
    }

    /// `x @ w^T` for `w` in MatMulNBits layout, with int8 activations when the export's
    /// precision says so; Q4_1's offsets added as the input's block sums times the offsets.
    fn matmul_nbits(&mut self, x: &str, nb: &NBits) -> ort::Result<String> {
        let (rows, cols) = (nb.n as i64, nb.k as i64);
        let blocks = cols / BLOCK as i64;
        let b = self.constant(&[rows, blocks, nb.blob() as i64], &nb.codes)?;
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
        let mut attributes = vec![
            Attribute::new("K", cols)?,
            Attribute::new("N", rows)?,
            Attribute::new("bits", i64::from(nb.bits))?,
            Attribute::new("block_size", BLOCK as i64)?,
        ];
        if self.precision == Precision::Int8 {
            attributes.push(Attribute::new("accuracy_level", 4i64)?);
        }
        let y = self.op("MatMulNBits", "com.microsoft", &refs, attributes)?;
        match &nb.mins {
            Some(mins) => self.add_block_offsets(x, &y, nb.n, nb.k, mins),
            None => Ok(y),
        }
    }

    /// `x @ w^T` in standard ops for a 4-bit `w`: its codes as signed int4 (`code - 8`),
    /// transposed to `[k, n]` and block-quantized along k (`DequantizeLinear`, opset 21,
    /// `block_size = 32`, no zero point: the form TensorRT takes for 4-bit weights, and
    /// that ONNX Runtime fuses into MatMulNBits on the CPU), then a `MatMul`; the blocks'
    /// offsets `(8 - zero point) * scale + min` (0 for Q4_0) added as block sums times
    /// offsets. Exactly the GGUF values.
    fn dq_matmul(&mut self, x: &str, nb: &NBits) -> ort::Result<String> {
        let (n, k) = (nb.n, nb.k);
        let blocks = k / BLOCK;
        // Element (row r, column c) of w: nibble c % 2 of byte c / 2 of its block's blob.
        let code = |r: usize, c: usize| {
            let byte = nb.codes[(r * blocks + c / BLOCK) * BLOB + (c % BLOCK) / 2];
            if c.is_multiple_of(2) {
                byte & 0x0f
            } else {
                byte >> 4
            }
        };
        // w^T row-major, two int4 per byte, the first in the low nibble.
        let mut packed = vec![0u8; (n * k).div_ceil(2)];
        for c in 0..k {
            for r in 0..n {
                let i = c * n + r;
                let signed = code(r, c).wrapping_sub(8) & 0x0f;
                packed[i / 2] |= signed << (4 * (i % 2));
            }
        }
        let codes =
            self.packed_constant(TensorElementType::Int4, &[k as i64, n as i64], &packed)?;
        let mut scales_t = vec![0f32; n * blocks];
        let mut offsets = vec![0f32; n * blocks];
        let mut any_offset = false;
        for r in 0..n {
            for b in 0..blocks {
                let scale = nb.scales[r * blocks + b];
                scales_t[b * n + r] = scale;
                let min = nb.mins.as_ref().map_or(0.0, |m| m[r * blocks + b]);
                let offset = (8.0 - f32::from(nb.zero_point)) * scale + min;
                offsets[r * blocks + b] = offset;
                any_offset |= offset != 0.0;
            }
        }
        let scales = self.floats(&[blocks as i64, n as i64], &scales_t)?;
        let w = self.op(
            "DequantizeLinear",
            ONNX_DOMAIN,
            &[&codes, &scales],
            vec![
                Attribute::new("axis", 0i64)?,
                Attribute::new("block_size", BLOCK as i64)?,
            ],
        )?;
        let y = self.std("MatMul", &[x, &w])?;
        if any_offset {
            self.add_block_offsets(x, &y, n, k, &offsets)
        } else {
            Ok(y)
        }
    }

    /// A constant of a packed element type (4-bit) from its bytes.
    fn packed_constant(
        &mut self,
        ty: TensorElementType,
        shape: &[i64],
        bytes: &[u8],
    ) -> ort::Result<String> {
        self.next += 1;
        let name = format!("c{}", self.next);
        let mut t =
            ort::value::DynTensor::new(&ort::memory::Allocator::default(), ty, shape.to_vec())?;
        if t.size() != Some(bytes.len()) {
            return Err(ort::Error::new(format!(
                "{ty:?} {shape:?}: {} bytes given, {:?} wanted",
                bytes.len(),
                t.size()
            )));
        }
        // SAFETY: `t` was just allocated on the CPU by the default allocator with exactly
        // `bytes.len()` bytes (checked above), and nothing else refers to it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                t.data_ptr_mut().cast::<u8>(),
                bytes.len(),
            );
        }
        self.graph.add_initializer(&name, t, false)?;
        Ok(name)
    }

    /// `y + (block sums of x) @ offsets^T` for per-block offsets `[n, k / 32]` (Q4_1's
    /// mins): the sums computed once per input (the fused q/k/v and the fused gate/up each
    /// take one).
    fn add_block_offsets(
        &mut self,
        x: &str,
        y: &str,
        n: usize,
        k: usize,
        offsets: &[f32],
    ) -> ort::Result<String> {
        let blocks = k / BLOCK;
        let sums = match self.block_sums.get(x) {
            Some(sums) => sums.clone(),
            None => {
                let shape = self.ints(&[0, 0, blocks as i64, BLOCK as i64])?;
                let grouped = self.std("Reshape", &[x, &shape])?;
                let axes = self.ints(&[-1])?;
                let sums = self.op(
                    "ReduceSum",
                    ONNX_DOMAIN,
                    &[&grouped, &axes],
                    vec![Attribute::new("keepdims", 0i64)?],
                )?;
                self.block_sums.insert(x.to_string(), sums.clone());
                sums
            }
        };
        let mut transposed = vec![0f32; offsets.len()];
        for r in 0..n {
            for b in 0..blocks {
                transposed[b * n + r] = offsets[r * blocks + b];
            }
        }
        let m = self.floats(&[blocks as i64, n as i64], &transposed)?;
        let terms = self.std("MatMul", &[&sums, &m])?;
        self.std("Add", &[y, &terms])
    }

    /// Projections `group` of layer `layer` over the same input `x`, side by side along the
    /// last axis (see [`Builder::linear`]), each plus `(x @ A^T) @ (s B^T)` from the graph
    /// inputs "lora_a.{layer}.{module}" `[in, r]` and "lora_b.{layer}.{module}" `[r, out]`
    /// when the module takes LoRA inputs (zeros give the base model), padded to its place.
    fn projections(
        &mut self,
        layer: usize,
        group: &[(Module, &Weight)],
        x: &str,
    ) -> ort::Result<String> {
        // A merged adapter's projections: W + s B A in f32, exactly.
        let merged: Vec<Option<Weight>> = group
            .iter()
            .map(|(module, w)| {
                self.merged
                    .get(&(layer, *module))
                    .map(|delta| Weight::Dense(w.dequantize(Kind::Float) + delta))
            })
            .collect();
        let weights: Vec<&Weight> = group
            .iter()
            .zip(&merged)
            .map(|((_, w), m)| m.as_ref().unwrap_or(w))
            .collect();
        let mut y = self.linear(x, &weights)?;
        let width: i64 = weights.iter().map(|w| w.shape().0).sum();
        let mut offset = 0;
        for (module, w) in group {
            let rows = w.shape().0;
            if self.lora.contains(module) {
                let (a, b) = lora_names(layer, *module);
                let down = self.std("MatMul", &[x, &a])?;
                let mut delta = self.std("MatMul", &[&down, &b])?;
                if rows != width {
                    let pads = self.ints(&[0, 0, offset, 0, 0, width - offset - rows])?;
                    delta = self.std("Pad", &[&delta, &pads])?;
                }
                y = self.std("Add", &[&y, &delta])?;
            }
            offset += rows;
        }
        Ok(y)
    }

    /// `x` cut along its last axis into pieces of `sizes`.
    fn split(&mut self, x: &str, sizes: &[i64]) -> ort::Result<Vec<String>> {
        let split = self.ints(sizes)?;
        self.next += 1;
        let outs: Vec<String> = (0..sizes.len())
            .map(|i| format!("v{}_split{i}", self.next))
            .collect();
        self.graph.add_node(Node::new(
            "Split",
            ONNX_DOMAIN,
            format!("n{}", self.next),
            [x, split.as_str()],
            &outs,
            vec![Attribute::new("axis", -1i64)?],
        )?)?;
        Ok(outs)
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

    /// Attention in standard ops over the projections `q`, `k`, `v` `[1, t, heads * hd]`:
    /// rotate-half RoPE with the positions' tables, grouped heads repeated, a causal mask;
    /// `[1, t, heads * hd]` out.
    #[allow(clippy::too_many_arguments)]
    fn attention_standard(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        rope: (&str, &str),
        mask: &str,
        (h, kv, hd): (i64, i64, i64),
        cache: Option<usize>,
    ) -> ort::Result<String> {
        let (cos, sin) = rope;
        let q = self.heads(q, h, hd)?;
        let k = self.heads(k, kv, hd)?;
        let v = self.heads(v, kv, hd)?;
        let q = self.rope(&q, cos, sin, hd)?;
        let mut k = self.rope(&k, cos, sin, hd)?;
        let mut v = v;
        if let Some(layer) = cache {
            // The past keys and values before the new ones, also the layer's outputs.
            for (new, kind) in [(&mut k, "k"), (&mut v, "v")] {
                let past = format!("past_{kind}{layer}");
                let all = self.op(
                    "Concat",
                    ONNX_DOMAIN,
                    &[&past, new.as_str()],
                    vec![Attribute::new("axis", 2i64)?],
                )?;
                self.graph.add_node(Node::new(
                    "Identity",
                    ONNX_DOMAIN,
                    format!("present_{kind}{layer}_out"),
                    [all.as_str()],
                    [format!("present_{kind}{layer}").as_str()],
                    [],
                )?)?;
                *new = all;
            }
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
        let scores = self.std("Add", &[&scores, mask])?;
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
        self.std("Reshape", &[&attn, &merged])
    }

    /// One decoder layer over `x`, its attention computed as `attention` says.
    fn block(
        &mut self,
        model: &Llama,
        layer: usize,
        b: &Block,
        x: &str,
        attention: &Attention,
    ) -> ort::Result<String> {
        let c = &model.config;
        let (h, kv, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
        );
        let n = self.rms_norm(x, &b.attn_norm, c.rms_norm_eps)?;
        let qkv = self.projections(
            layer,
            &[
                (Module::Q, &b.q_proj),
                (Module::K, &b.k_proj),
                (Module::V, &b.v_proj),
            ],
            &n,
        )?;
        let attn = match attention {
            Attention::Standard { rope, mask } | Attention::Cached { rope, mask } => {
                let cache = matches!(attention, Attention::Cached { .. }).then_some(layer);
                let [q, k, v] =
                    <[String; 3]>::try_from(self.split(&qkv, &[h * hd, kv * hd, kv * hd])?)
                        .map_err(|_| ort::Error::new("split"))?;
                self.attention_standard(&q, &k, &v, *rope, mask, (h, kv, hd), cache)?
            }
            Attention::Fused {
                cos,
                sin,
                seqlens,
                total,
            } => {
                // ONNX Runtime's GroupQueryAttention over the packed q/k/v: rotate-half
                // RoPE at the positions after the past, the cache appended, grouped heads,
                // causal softmax.
                self.next += 1;
                let out = format!("v{}_gqa", self.next);
                let (past_k, past_v) = (format!("past_k{layer}"), format!("past_v{layer}"));
                let (present_k, present_v) =
                    (format!("present_k{layer}"), format!("present_v{layer}"));
                self.graph.add_node(Node::new(
                    "GroupQueryAttention",
                    "com.microsoft",
                    format!("n{}", self.next),
                    [
                        qkv.as_str(),
                        "",
                        "",
                        &past_k,
                        &past_v,
                        seqlens,
                        total,
                        cos,
                        sin,
                    ],
                    [out.as_str(), &present_k, &present_v],
                    vec![
                        Attribute::new("num_heads", h)?,
                        Attribute::new("kv_num_heads", kv)?,
                        Attribute::new("do_rotary", 1i64)?,
                        Attribute::new("rotary_interleaved", 0i64)?,
                        Attribute::new("scale", 1.0 / (hd as f32).sqrt())?,
                    ],
                )?)?;
                out
            }
        };
        let o = self.projections(layer, &[(Module::O, &b.o_proj)], &attn)?;
        let x = self.std("Add", &[x, &o])?;
        let n = self.rms_norm(&x, &b.ffn_norm, c.rms_norm_eps)?;
        let inter = b.gate_proj.shape().0;
        let gate_up = self.projections(
            layer,
            &[(Module::Gate, &b.gate_proj), (Module::Up, &b.up_proj)],
            &n,
        )?;
        let [gate, up] = <[String; 2]>::try_from(self.split(&gate_up, &[inter, inter])?)
            .map_err(|_| ort::Error::new("split"))?;
        let sig = self.std("Sigmoid", &[&gate])?;
        let gate = self.std("Mul", &[&gate, &sig])?;
        let prod = self.std("Mul", &[&gate, &up])?;
        let down = self.projections(layer, &[(Module::Down, &b.down_proj)], &prod)?;
        self.std("Add", &[&x, &down])
    }
}

/// How a layer's attention is computed.
enum Attention<'a> {
    /// In standard ops, over the whole sequence at once: the positions' RoPE tables (cos,
    /// sin) and the causal mask.
    Standard {
        rope: (&'a str, &'a str),
        mask: &'a str,
    },
    /// In standard ops over a KV cache (graph inputs `past_k{i}`/`past_v{i}`, outputs
    /// `present_k{i}`/`present_v{i}`), for heads `GroupQueryAttention` does not take
    /// (its CPU kernel wants a head width that is a multiple of 16): the new tokens'
    /// RoPE rows and their mask over past and new positions.
    Cached {
        rope: (&'a str, &'a str),
        mask: &'a str,
    },
    /// ONNX Runtime's fused `GroupQueryAttention` over a KV cache (graph inputs
    /// `past_k{i}`/`past_v{i}`, outputs `present_k{i}`/`present_v{i}`): its RoPE caches
    /// `[max_positions, head_dim / 2]` and the step's `seqlens_k` and
    /// `total_sequence_length`.
    Fused {
        cos: &'a str,
        sin: &'a str,
        seqlens: &'a str,
        total: &'a str,
    },
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
        lora: Vec::new(),
        block_sums: Default::default(),
        precision: Precision::Exact,
        merged: Default::default(),
        standard: false,
        half: false,
    };
    g.graph
        .set_inputs([outlet("ids", TensorElementType::Int64, &[1, t])])?;
    g.graph
        .set_outputs([outlet("logits", TensorElementType::Float32, &[1, t, vocab])])?;
    let (mut x, cos, sin) = g.embed_and_rope(model, t, false)?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = g.floats(&[t, t], &mask)?;
    for (layer, b) in model.blocks.iter().enumerate() {
        let attention = Attention::Standard {
            rope: (&cos, &sin),
            mask: &mask,
        };
        x = g.block(model, layer, b, &x, &attention)?;
    }
    let m = g.finish(model, &x)?;
    m.into_session(&Session::builder(env)?)
}

impl Builder {
    /// The embedding of the input "ids" (f32 table, `Gather`) and the RoPE tables of
    /// positions `0..positions` (`[positions, head_dim]`, or only the first half of each
    /// row when `half`: the caches `GroupQueryAttention` takes): the start of both graphs.
    fn embed_and_rope(
        &mut self,
        model: &Llama,
        positions: i64,
        half: bool,
    ) -> ort::Result<(String, String, String)> {
        let c = &model.config;
        let (hidden, vocab) = (c.hidden_size as i64, c.vocab_size as i64);
        let x = match &model.embed {
            // A Q8_0 table stays 8-bit (a quarter of the f32 table's bytes), exactly:
            // `GatherBlockQuantized` over the codes q + 128 with zero point 128.
            Weight::Quant {
                ty: GgmlType::Q8_0,
                packed,
                ..
            } if !self.standard => {
                let bytes = Vec::<u8>::try_from(packed.flatten(0, -1))
                    .map_err(|e| ort::Error::new(e.to_string()))?;
                let nb = NBits::from_gguf(GgmlType::Q8_0, &bytes, vocab as usize, hidden as usize)
                    .map_err(|e| ort::Error::new(e.to_string()))?;
                let blocks = hidden / BLOCK as i64;
                let data = self.constant(&[vocab, hidden], &nb.codes)?;
                let scales = self.floats(&[vocab, blocks], &nb.scales)?;
                let zero_points = self.constant(
                    &[vocab, blocks],
                    &vec![nb.zero_point; (vocab * blocks) as usize],
                )?;
                self.op(
                    "GatherBlockQuantized",
                    "com.microsoft",
                    &[&data, "ids", &scales, &zero_points],
                    vec![
                        Attribute::new("gather_axis", 0i64)?,
                        Attribute::new("quantize_axis", 1i64)?,
                        Attribute::new("block_size", BLOCK as i64)?,
                        Attribute::new("bits", 8i64)?,
                    ],
                )?
            }
            _ => {
                let embed = tensor_f32(&model.embed.dequantize(Kind::Float));
                let embed = self.floats(&[vocab, hidden], &embed)?;
                self.op(
                    "Gather",
                    ONNX_DOMAIN,
                    &[&embed, "ids"],
                    vec![Attribute::new("axis", 0i64)?],
                )?
            }
        };
        let (cos, sin) = model.rope_tables(positions, Kind::Float);
        let hd = c.head_dim() as i64;
        let width = if half { hd / 2 } else { hd };
        let (cos, sin) = (cos.narrow(1, 0, width), sin.narrow(1, 0, width));
        let cos = self.floats(&[positions, width], &tensor_f32(&cos.contiguous()))?;
        let sin = self.floats(&[positions, width], &tensor_f32(&sin.contiguous()))?;
        Ok((x, cos, sin))
    }

    /// From the inputs "ids" `[1, t]` and "total_sequence_length": the new tokens'
    /// positions `[t]` (past .. past + t) and their causal mask `[t, past + t]` (0 where a
    /// token may attend, -inf elsewhere).
    fn step_positions(&mut self) -> ort::Result<(String, String)> {
        let total = self.op(
            "Cast",
            ONNX_DOMAIN,
            &["total_sequence_length"],
            vec![Attribute::new("to", 7i64)?],
        )?;
        let t = self.op(
            "Shape",
            ONNX_DOMAIN,
            &["ids"],
            vec![Attribute::new("start", 1i64)?, Attribute::new("end", 2i64)?],
        )?;
        let zero = self.ints(&[0])?;
        let t = self.std("Squeeze", &[&t, &zero])?;
        let past = self.std("Sub", &[&total, &t])?;
        let one = self.constant::<i64>(&[], &[1])?;
        let start = self.constant::<i64>(&[], &[0])?;
        let positions = self.std("Range", &[&past, &total, &one])?;
        let all = self.std("Range", &[&start, &total, &one])?;
        let axis = self.ints(&[1])?;
        let rows = self.std("Unsqueeze", &[&positions, &axis])?;
        let allowed = self.std("LessOrEqual", &[&all, &rows])?;
        let (open, shut) = (
            self.floats(&[], &[0.0])?,
            self.floats(&[], &[f32::NEG_INFINITY])?,
        );
        let mask = self.std("Where", &[&allowed, &open, &shut])?;
        Ok((positions, mask))
    }

    /// The final norm and the LM head into the output "logits"; the model.
    fn finish(mut self, model: &Llama, x: &str) -> ort::Result<Model> {
        let n = self.rms_norm(x, &model.norm, model.config.rms_norm_eps)?;
        let head = model.lm_head.as_ref().unwrap_or(&model.embed);
        // An 8-bit head stays 8-bit with int8 activations, else f32 (`Builder::nbits`).
        let mut logits = self.linear(&n, &[head])?;
        if self.half {
            // The logits leave as f32 whatever the graph computes in.
            logits = self.op(
                "Cast",
                ONNX_DOMAIN,
                &[&logits],
                vec![Attribute::new("to", 1i64)?],
            )?;
        }
        self.graph.add_node(Node::new(
            "Identity",
            ONNX_DOMAIN,
            "out",
            [logits.as_str()],
            ["logits"],
            [],
        )?)?;
        let mut m = if self.standard {
            Model::new([Opset::new(ONNX_DOMAIN, 21)?])?
        } else {
            Model::new([
                Opset::new(ONNX_DOMAIN, 21)?,
                Opset::new("com.microsoft", 1)?,
            ])?
        };
        m.set_graph(self.graph)?;
        Ok(m)
    }
}

/// The names of the LoRA inputs of projection `module` of layer `layer`.
fn lora_names(layer: usize, module: Module) -> (String, String) {
    (
        format!("lora_a.{layer}.{}", module.peft_name()),
        format!("lora_b.{layer}.{}", module.peft_name()),
    )
}

/// What a decoding graph is built for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecodeOptions {
    /// The longest sequence (prompt and new tokens) it decodes.
    pub max_positions: usize,
    /// The projections that take LoRA inputs (empty: the base model only).
    pub lora: Vec<Module>,
    /// How the quantized products compute (exports before this field: exact).
    #[serde(default)]
    pub precision: Precision,
    /// Which operators the graph may use (exports before this field: ONNX Runtime's).
    #[serde(default)]
    pub ops: Ops,
    /// The float type the graph computes in (exports before this field: f32).
    #[serde(default)]
    pub float: Float,
}

/// The float type of an export's activations, KV cache, LoRA inputs and weight scales (the
/// logits leave as f32 either way).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Float {
    /// f32: the CPU.
    #[default]
    F32,
    /// f16: ONNX Runtime's CUDA execution provider, whose `GroupQueryAttention` has no f32
    /// kernel (Jetson). The CPU runs it too, casting where it has no f16 kernel.
    F16,
}

/// Where a decoder runs (ONNX Runtime's execution provider).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// The CPU.
    #[default]
    Cpu,
    /// NVIDIA's CUDA provider (an ONNX Runtime built with it: `onnxruntime-gpu`).
    Cuda,
    /// NVIDIA's TensorRT provider, CUDA for what TensorRT does not take (f16 engines).
    Tensorrt,
}

/// The operators an export may use.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Ops {
    /// ONNX Runtime's contrib ops where they are faster: `MatMulNBits`,
    /// `GroupQueryAttention` (CPU and CUDA execution providers).
    #[default]
    Ort,
    /// Standard ONNX ops only (opset 21), for TensorRT, which knows none of ONNX Runtime's
    /// contrib ops: 4-bit weights as int4 `DequantizeLinear` + `MatMul`, attention over the
    /// KV cache in standard ops.
    Standard,
}

/// How an export's quantized products compute. The weights are the GGUF's exactly either
/// way; what differs is the activations.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 activations: the libtorch model's logits to about 1e-4 and its greedy tokens
    /// (the parity path). An 8-bit head is dequantized to f32.
    #[default]
    Exact,
    /// Activations quantized to int8 per block of 32 (MatMulNBits `accuracy_level = 4`,
    /// integer dot products) and an 8-bit head kept 8-bit: the arithmetic llama.cpp uses
    /// for these weights, and its speed. Logits move by about 1 in 30 on SmolLM2, so greedy
    /// tokens can part from the exact path's after a while.
    Int8,
}

/// The graph that runs `t` new tokens against a KV cache (the whole prompt at once, then
/// one token per run), each layer's attention ONNX Runtime's fused `GroupQueryAttention`
/// (rotary inside, causal): inputs "ids" `[1, t]` (int64), "seqlens_k" `[1]` (int32: past +
/// t - 1, the last token's position, below `max_positions`), "total_sequence_length" `[]`
/// (int32: past + t), per layer i "past_k{i}" and
/// "past_v{i}" `[1, kv_heads, past, head_dim]` (f32, `past` may be 0), and per adapted
/// projection "lora_a.{i}.{module}" `[in, r]` and "lora_b.{i}.{module}" `[r, out]` (A^T
/// and B^T scaled by alpha / r; any r); outputs "logits" `[1, 1, vocab]` (the last new
/// token's) and "present_k{i}", "present_v{i}" `[1, kv_heads, past + t, head_dim]`.
///
/// With `merge`, that adapter is merged into the weights it adapts (those projections
/// become f32 `W + s B A`, exact); it must adapt no projection that takes LoRA inputs.
pub fn decode_model(
    model: &Llama,
    options: &DecodeOptions,
    merge: Option<&crate::lora::Lora>,
) -> ort::Result<Model> {
    if let Some(lora) = merge
        && let Some((layer, module)) = lora.pairs.keys().find(|(_, m)| options.lora.contains(m))
    {
        return Err(ort::Error::new(format!(
            "the merged adapter adapts layer {layer}'s {}, which also takes LoRA inputs: a swapped adapter would add to the merged one",
            module.peft_name()
        )));
    }
    let c = &model.config;
    let vocab = c.vocab_size as i64;
    let (kv, hd) = (c.num_key_value_heads as i64, c.head_dim() as i64);
    let layers = model.blocks.len();
    let mut g = Builder {
        graph: Graph::new()?,
        next: 0,
        lora: options.lora.clone(),
        block_sums: Default::default(),
        precision: options.precision,
        merged: merged_deltas(merge),
        standard: options.ops == Ops::Standard,
        half: options.float == Float::F16,
    };
    let float = g.float_type();
    let cache = |name: String, symbol: &str| {
        dyn_outlet(name, float, &[1, kv, -1, hd], ["", "", symbol, ""])
    };
    let mut inputs = vec![
        dyn_outlet("ids".into(), TensorElementType::Int64, &[1, -1], ["", "t"]),
        outlet("seqlens_k", TensorElementType::Int32, &[1]),
        outlet("total_sequence_length", TensorElementType::Int32, &[]),
    ];
    let mut outputs = vec![outlet("logits", TensorElementType::Float32, &[1, 1, vocab])];
    for i in 0..layers {
        inputs.push(cache(format!("past_k{i}"), "past"));
        inputs.push(cache(format!("past_v{i}"), "past"));
        outputs.push(cache(format!("present_k{i}"), "total"));
        outputs.push(cache(format!("present_v{i}"), "total"));
    }
    for spec in lora_inputs(model, &options.lora) {
        let rank = format!("r_{}_{}", spec.layer, spec.module.peft_name());
        let (a, b) = lora_names(spec.layer, spec.module);
        inputs.push(dyn_outlet(a, float, &[spec.inputs as i64, -1], ["", &rank]));
        inputs.push(dyn_outlet(
            b,
            float,
            &[-1, spec.outputs as i64],
            [&rank, ""],
        ));
    }
    g.graph.set_inputs(inputs)?;
    g.graph.set_outputs(outputs)?;
    let fused = c.head_dim().is_multiple_of(16) && options.ops == Ops::Ort;
    let (mut x, cos, sin) = g.embed_and_rope(model, options.max_positions as i64, fused)?;
    let (positions, mask) = if fused {
        (String::new(), String::new())
    } else {
        g.step_positions()?
    };
    let gather = |g: &mut Builder, table: &str| {
        g.op(
            "Gather",
            ONNX_DOMAIN,
            &[table, &positions],
            vec![Attribute::new("axis", 0i64)?],
        )
    };
    let rows = if fused {
        (String::new(), String::new())
    } else {
        (gather(&mut g, &cos)?, gather(&mut g, &sin)?)
    };
    let attention = if fused {
        Attention::Fused {
            cos: &cos,
            sin: &sin,
            seqlens: "seqlens_k",
            total: "total_sequence_length",
        }
    } else {
        Attention::Cached {
            rope: (&rows.0, &rows.1),
            mask: &mask,
        }
    };
    for (i, b) in model.blocks.iter().enumerate() {
        x = g.block(model, i, b, &x, &attention)?;
    }
    // Only the last new token's logits: the head runs once per call.
    let (from, to, axis) = (g.ints(&[-1])?, g.ints(&[i64::MAX])?, g.ints(&[1])?);
    let last = g.std("Slice", &[&x, &from, &to, &axis])?;
    g.finish(model, &last)
}

/// Each adapted projection's `s B A` `[out, in]` (f32) of `merge`.
fn merged_deltas(
    merge: Option<&crate::lora::Lora>,
) -> std::collections::BTreeMap<(usize, Module), tch::Tensor> {
    let Some(lora) = merge else {
        return Default::default();
    };
    let s = lora.scaling();
    lora.pairs
        .iter()
        .map(|(key, pair)| {
            let delta = tch::no_grad(|| {
                (pair
                    .b
                    .to_kind(Kind::Float)
                    .matmul(&pair.a.to_kind(Kind::Float))
                    * s)
                    .to_device(tch::Device::Cpu)
            });
            (*key, delta)
        })
        .collect()
}

/// What a merged adapter baked into an export (`model.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergedAdapter {
    /// Its target projections.
    pub targets: Vec<Module>,
    /// Its rank.
    pub r: i64,
    /// Its alpha.
    pub alpha: f64,
}

/// One adapted projection's LoRA inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoraInput {
    /// The layer.
    pub layer: usize,
    /// The projection.
    pub module: Module,
    /// Its input features (A^T's rows).
    pub inputs: usize,
    /// Its output features (B^T's columns).
    pub outputs: usize,
}

/// The LoRA inputs of `model` for the projections `modules`, layer by layer.
fn lora_inputs(model: &Llama, modules: &[Module]) -> Vec<LoraInput> {
    let mut out = Vec::new();
    for (layer, b) in model.blocks.iter().enumerate() {
        for &module in modules {
            let (rows, cols) = b.weight(module).shape();
            out.push(LoraInput {
                layer,
                module,
                inputs: cols as usize,
                outputs: rows as usize,
            });
        }
    }
    out
}

/// An input or output whose dimensions of -1 are named by `symbols` (empty: fixed).
fn dyn_outlet<const N: usize>(
    name: String,
    ty: TensorElementType,
    dims: &[i64],
    symbols: [&str; N],
) -> Outlet {
    Outlet::new(
        name,
        ValueType::Tensor {
            ty,
            shape: Shape::new(dims.to_vec()),
            dimension_symbols: SymbolicDimensions::new(symbols.map(str::to_string)),
        },
    )
}

/// What [`OnnxDecoder::export`] writes beside `model.onnx` (`model.json`), and
/// [`OnnxDecoder::open`] checks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportMeta {
    /// [`EXPORT_FORMAT`].
    pub format: u32,
    /// What the graph was built for.
    pub options: DecodeOptions,
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The LoRA inputs, in the graph's order.
    pub lora: Vec<LoraInput>,
    /// The GGUF file it was exported from (its name) and that file's size in bytes.
    pub source: (String, u64),
    /// The adapter merged into its weights, if any.
    #[serde(default)]
    pub merged: Option<MergedAdapter>,
}

/// Names the serialized model's producer and graph (ONNX requires a graph name; ONNX
/// Runtime's model editor leaves it empty) by appending the two fields to the `ModelProto`:
/// protobuf merges a repeated occurrence of a singular embedded message into the first,
/// so the appended `graph { name }` only sets the name.
fn name_the_model(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        // Length-delimited (wire type 2); the lengths here fit one varint byte.
        let mut out = vec![(number << 3) | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }
    let mut tail = field(2, b"fedshield-edge"); // ModelProto.producer_name
    tail.extend(field(7, &field(2, b"fedshield_decoder"))); // ModelProto.graph.name
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(&tail)?;
    file.sync_all()
}

/// The version of the export directory's layout and graph interface.
pub const EXPORT_FORMAT: u32 = 2;

/// Generation on ONNX Runtime: [`decode_model`]'s graph, the whole prompt in one run, then
/// one token per run, the KV cache handed from each run's outputs to the next run's
/// inputs (never copied), and the adapter as inputs that [`OnnxDecoder::set_adapter`]
/// swaps without rebuilding anything.
pub struct OnnxDecoder {
    session: Session,
    meta: ExportMeta,
    /// A^T and B^T (scaled) per LoRA input of the graph.
    adapter: Vec<(ort::value::DynValue, ort::value::DynValue)>,
}

/// A session builder with `threads` intra-op threads (0: ONNX Runtime's default), whose
/// workers spin while a run is in flight when there are several.
/// int4 `DequantizeLinear` + `MatMul` pairs (the standard-ops graph) are fused by ONNX
/// Runtime into `MatMulNBits` computing as `precision` says (its default would be int8).
/// On `provider` CUDA or TensorRT every node must run there: registering the provider
/// fails loudly instead of falling back to the CPU (`error_on_failure`), and so does a
/// node it cannot take (`session.disable_cpu_ep_fallback`).
fn session_builder(
    env: &ort::environment::Environment,
    threads: usize,
    precision: Precision,
    provider: Provider,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    let mut builder = Session::builder(env)?;
    let accelerated = match provider {
        Provider::Cpu => Vec::new(),
        Provider::Cuda => vec![ort::ep::CUDA::default().build().error_on_failure()],
        Provider::Tensorrt => vec![
            ort::ep::TensorRT::default()
                .with_fp16(true)
                .build()
                .error_on_failure(),
            ort::ep::CUDA::default().build().error_on_failure(),
        ],
    };
    if !accelerated.is_empty() {
        builder = builder
            .with_execution_providers(accelerated)
            .map_err(ort::Error::<()>::from)?
            .with_config_entry("session.disable_cpu_ep_fallback", "1")?;
    }
    if threads > 0 {
        builder = builder.with_intra_threads(threads)?;
    }
    // Several threads spin between the graph's many small kernels (measured here with two
    // threads: 49 against 45 tokens/s, prefill 93 against 124 ms); one thread never waits.
    let spin = if threads > 1 { "1" } else { "0" };
    let accuracy = match precision {
        Precision::Exact => "0",
        Precision::Int8 => "4",
    };
    Ok(builder
        .with_config_entry("session.intra_op.allow_spinning", spin)?
        .with_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy)?)
}

fn onnx_error(context: &str) -> impl Fn(ort::Error) -> crate::EdgeError + '_ {
    move |e| crate::EdgeError::Onnx(format!("{context}: {e}"))
}

impl OnnxDecoder {
    fn meta_of(
        model: &Llama,
        options: &DecodeOptions,
        source: (String, u64),
        merge: Option<&crate::lora::Lora>,
    ) -> ExportMeta {
        let c = &model.config;
        ExportMeta {
            format: EXPORT_FORMAT,
            options: options.clone(),
            layers: model.blocks.len(),
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
            lora: lora_inputs(model, &options.lora),
            source,
            merged: merge.map(|l| MergedAdapter {
                targets: l.config.target_modules.clone(),
                r: l.config.r,
                alpha: l.config.alpha,
            }),
        }
    }

    fn with_session(session: Session, meta: ExportMeta) -> Result<Self, crate::EdgeError> {
        let mut d = Self {
            session,
            meta,
            adapter: Vec::new(),
        };
        d.clear_adapter()?;
        Ok(d)
    }

    /// The decoder of `model`, its graph built in memory (`merge`: see [`decode_model`]).
    pub fn new(
        env: &ort::environment::Environment,
        model: &Llama,
        options: &DecodeOptions,
        merge: Option<&crate::lora::Lora>,
        threads: usize,
    ) -> Result<Self, crate::EdgeError> {
        let graph =
            decode_model(model, options, merge).map_err(onnx_error("building the graph"))?;
        let session = graph
            .into_session(
                &session_builder(env, threads, options.precision, Provider::Cpu)
                    .map_err(onnx_error("session"))?,
            )
            .map_err(onnx_error("session"))?;
        Self::with_session(
            session,
            Self::meta_of(model, options, (String::new(), 0), merge),
        )
    }

    /// Writes `model`'s decoding graph to `dir/model.onnx` (ONNX Runtime serializes the
    /// graph as built, before any optimization) and its description to `dir/model.json`
    /// (atomically); `source` names the GGUF file, `merge` an adapter merged into the
    /// weights (see [`decode_model`]). Returns the model file's path.
    pub fn export(
        env: &ort::environment::Environment,
        model: &Llama,
        options: &DecodeOptions,
        merge: Option<&crate::lora::Lora>,
        source: (String, u64),
        dir: &std::path::Path,
    ) -> Result<std::path::PathBuf, crate::EdgeError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::EdgeError::Onnx(format!("{}: {e}", dir.display())))?;
        let path = dir.join("model.onnx");
        let partial = dir.join("model.onnx.partial");
        let graph =
            decode_model(model, options, merge).map_err(onnx_error("building the graph"))?;
        let builder = (|| -> ort::Result<_> {
            Ok(Session::builder(env)?
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)?
                .with_optimized_model_path(&partial)?)
        })()
        .map_err(onnx_error("session"))?;
        drop(
            graph
                .into_session(&builder)
                .map_err(onnx_error("writing the graph"))?,
        );
        name_the_model(&partial)
            .map_err(|e| crate::EdgeError::Onnx(format!("{}: {e}", partial.display())))?;
        std::fs::rename(&partial, &path)
            .map_err(|e| crate::EdgeError::Onnx(format!("{}: {e}", path.display())))?;
        let meta = Self::meta_of(model, options, source, merge);
        let json = serde_json::to_vec_pretty(&meta).expect("the description encodes");
        fedshield_store::write_atomic(
            &dir.join("model.json"),
            &json,
            fedshield_store::Access::Public,
        )
        .map_err(|e| crate::EdgeError::Onnx(e.to_string()))?;
        Ok(path)
    }

    /// The decoder of an export directory (`model.onnx` and `model.json`) on the CPU; a
    /// missing, truncated or foreign file is refused with its path.
    pub fn open(
        env: &ort::environment::Environment,
        dir: &std::path::Path,
        threads: usize,
    ) -> Result<Self, crate::EdgeError> {
        Self::open_on(env, dir, threads, Provider::Cpu)
    }

    /// As [`OnnxDecoder::open`], on `provider`: CUDA takes an f16 export (its
    /// `GroupQueryAttention` has no f32 kernel), TensorRT a standard-ops one; a provider
    /// this ONNX Runtime build lacks is an error, never a silent run on the CPU.
    pub fn open_on(
        env: &ort::environment::Environment,
        dir: &std::path::Path,
        threads: usize,
        provider: Provider,
    ) -> Result<Self, crate::EdgeError> {
        let meta_path = dir.join("model.json");
        let text = std::fs::read(&meta_path)
            .map_err(|e| crate::EdgeError::Onnx(format!("{}: {e}", meta_path.display())))?;
        let meta: ExportMeta = serde_json::from_slice(&text).map_err(|e| {
            crate::EdgeError::Onnx(format!(
                "{}: not a fedshield export description ({e})",
                meta_path.display()
            ))
        })?;
        if meta.format != EXPORT_FORMAT {
            return Err(crate::EdgeError::Onnx(format!(
                "{}: export format {}, this build reads {EXPORT_FORMAT}: export again",
                meta_path.display(),
                meta.format
            )));
        }
        let path = dir.join("model.onnx");
        let context = path.display().to_string();
        let wrong = match provider {
            Provider::Cuda if meta.options.ops == Ops::Ort && meta.options.float == Float::F32 => {
                Some("the CUDA provider takes an f16 export (export-onnx --float f16)")
            }
            Provider::Tensorrt if meta.options.ops != Ops::Standard => Some(
                "the TensorRT provider takes a standard-ops export (export-onnx --ops standard)",
            ),
            _ => None,
        };
        if let Some(why) = wrong {
            return Err(crate::EdgeError::Onnx(format!("{context}: {why}")));
        }
        let session = session_builder(env, threads, meta.options.precision, provider)
            .and_then(|mut b| b.commit_from_file(&path))
            .map_err(onnx_error(&context))?;
        let want = 3 + 2 * meta.layers + 2 * meta.lora.len();
        let have = session.inputs().len();
        if have != want || session.inputs()[0].name() != "ids" {
            return Err(crate::EdgeError::Onnx(format!(
                "{context}: {have} inputs, model.json describes {want}: not this export's graph"
            )));
        }
        Self::with_session(session, meta)
    }

    /// What the decoder runs.
    pub fn meta(&self) -> &ExportMeta {
        &self.meta
    }

    /// Back to the base model: every LoRA input zero (rank 1).
    pub fn clear_adapter(&mut self) -> Result<(), crate::EdgeError> {
        self.adapter = self
            .meta
            .lora
            .iter()
            .map(|spec| self.zero_pair(spec))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Runs `lora` from the next generation on (the graph is not rebuilt): every adapted
    /// projection must be one the graph takes LoRA inputs for, with its shapes; projections
    /// the adapter leaves alone get zeros.
    pub fn set_adapter(&mut self, lora: &crate::lora::Lora) -> Result<(), crate::EdgeError> {
        let shape = |m: String| crate::EdgeError::Shape(m);
        for (layer, module) in lora.pairs.keys() {
            if !self
                .meta
                .lora
                .iter()
                .any(|s| s.layer == *layer && s.module == *module)
            {
                return Err(shape(format!(
                    "the adapter adapts layer {layer}'s {}, which this graph takes no LoRA input for (it takes {:?}): export with those targets",
                    module.peft_name(),
                    self.meta.options.lora
                )));
            }
        }
        let scaling = lora.scaling();
        let mut adapter = Vec::with_capacity(self.meta.lora.len());
        for spec in &self.meta.lora {
            let Some(pair) = lora.pairs.get(&(spec.layer, spec.module)) else {
                adapter.push(self.zero_pair(spec)?);
                continue;
            };
            let (sa, sb) = (pair.a.size(), pair.b.size());
            let r = sa.first().copied().unwrap_or(0);
            if sa != [r, spec.inputs as i64] || sb != [spec.outputs as i64, r] || r < 1 {
                return Err(shape(format!(
                    "adapter of another shape: layer {} {} has A {sa:?} and B {sb:?}, the graph takes [r, {}] and [{}, r]",
                    spec.layer,
                    spec.module.peft_name(),
                    spec.inputs,
                    spec.outputs
                )));
            }
            let at = tensor_f32(&pair.a.tr().contiguous());
            let bt = tensor_f32(&(pair.b.tr() * scaling).contiguous());
            let a = self.floats(vec![spec.inputs as i64, r], at)?;
            let b = self.floats(vec![r, spec.outputs as i64], bt)?;
            adapter.push((a, b));
        }
        self.adapter = adapter;
        Ok(())
    }

    fn zero_pair(
        &self,
        spec: &LoraInput,
    ) -> Result<(ort::value::DynValue, ort::value::DynValue), crate::EdgeError> {
        let a = self.floats(vec![spec.inputs as i64, 1], vec![0f32; spec.inputs])?;
        let b = self.floats(vec![1, spec.outputs as i64], vec![0f32; spec.outputs])?;
        Ok((a, b))
    }

    /// An input tensor of the graph's float type (f16 values rounded from `data`).
    fn floats(
        &self,
        shape: Vec<i64>,
        data: Vec<f32>,
    ) -> Result<ort::value::DynValue, crate::EdgeError> {
        let onnx = onnx_error("input");
        Ok(match self.meta.options.float {
            Float::F32 => Tensor::from_array((shape, data)).map_err(onnx)?.into_dyn(),
            Float::F16 => {
                let halves: Vec<half::f16> = data.into_iter().map(half::f16::from_f32).collect();
                Tensor::from_array((shape, halves))
                    .map_err(onnx)?
                    .into_dyn()
            }
        })
    }

    /// Up to `max_new` tokens after `prompt`, stopping at `eos`: greedy at temperature 0,
    /// else nucleus sampling (as [`Llama::generate`]). `on_token` sees each new token as it
    /// comes (streaming).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        sampling: &crate::llama::Sampling,
    ) -> Result<Vec<u32>, crate::EdgeError> {
        self.generate_streaming(prompt, max_new, eos, sampling, |_| {})
            .map(|(tokens, _)| tokens)
    }

    /// As [`OnnxDecoder::generate`], calling `on_token` with each new token as it comes;
    /// also returns the timings.
    pub fn generate_streaming(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        sampling: &crate::llama::Sampling,
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, DecodeTimings), crate::EdgeError> {
        use rand::{Rng, SeedableRng};
        let max_positions = self.meta.options.max_positions;
        if prompt.is_empty() || prompt.len() + max_new > max_positions {
            return Err(crate::EdgeError::Shape(format!(
                "{} prompt tokens and {max_new} new ones: the decoder holds 1 to {max_positions} positions",
                prompt.len(),
            )));
        }
        let started = std::time::Instant::now();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
        let mut cache = self.empty_cache()?;
        let mut out = Vec::new();
        let mut timings = DecodeTimings::default();
        // The whole prompt in the first run, then one token per run.
        let mut logits = self.step(&mut cache, prompt)?;
        while out.len() < max_new {
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
            if out.is_empty() {
                timings.first_token_s = started.elapsed().as_secs_f64();
            }
            if token == eos {
                break;
            }
            out.push(token);
            on_token(token);
            if out.len() < max_new {
                logits = self.step(&mut cache, &[token])?;
            }
        }
        timings.total_s = started.elapsed().as_secs_f64();
        timings.new_tokens = out.len();
        Ok((out, timings))
    }

    /// An empty KV cache for one sequence.
    pub fn empty_cache(&self) -> Result<KvCache, crate::EdgeError> {
        let (kv, hd) = (self.meta.kv_heads as i64, self.meta.head_dim as i64);
        let past = (0..2 * self.meta.layers)
            .map(|_| self.floats(vec![1, kv, 0, hd], Vec::new()))
            .collect::<Result<_, _>>()?;
        Ok(KvCache { past, len: 0 })
    }

    /// Runs `ids` after the tokens already in `cache` (extending it); returns the last
    /// token's logits. Refuses to run past the graph's positions.
    pub fn step(&mut self, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>, crate::EdgeError> {
        let max_positions = self.meta.options.max_positions;
        let (t, done) = (ids.len(), cache.len);
        let total = done + t;
        if t == 0 || total > max_positions {
            return Err(crate::EdgeError::Shape(format!(
                "{t} tokens after {done}: the decoder holds 1 to {max_positions} positions"
            )));
        }
        let onnx = onnx_error("decoding");
        let ids: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
        let mut inputs: Vec<(String, ort::session::SessionInputValue)> = vec![
            (
                "ids".into(),
                Tensor::from_array(([1i64, t as i64], ids))
                    .map_err(&onnx)?
                    .into(),
            ),
            (
                "seqlens_k".into(),
                Tensor::from_array(([1i64], vec![total as i32 - 1]))
                    .map_err(&onnx)?
                    .into(),
            ),
            (
                "total_sequence_length".into(),
                Tensor::from_array((Vec::<i64>::new(), vec![total as i32]))
                    .map_err(&onnx)?
                    .into(),
            ),
        ];
        let name = |kind: &str, i: usize| format!("{kind}_{}{}", ["k", "v"][i % 2], i / 2);
        for (i, value) in cache.past.drain(..).enumerate() {
            inputs.push((name("past", i), value.into()));
        }
        for (spec, (a, b)) in self.meta.lora.iter().zip(&self.adapter) {
            let (na, nb) = lora_names(spec.layer, spec.module);
            inputs.push((na, a.into()));
            inputs.push((nb, b.into()));
        }
        let mut outputs = self.session.run(inputs).map_err(&onnx)?;
        for i in 0..2 * self.meta.layers {
            let present = outputs
                .remove(name("present", i))
                .ok_or_else(|| crate::EdgeError::Onnx(format!("no {}", name("present", i))))?;
            cache.past.push(present);
        }
        cache.len = total;
        let logits = outputs["logits"]
            .try_extract_tensor::<f32>()
            .map_err(&onnx)?;
        Ok(logits.1.to_vec())
    }
}

/// One sequence's keys and values, layer by layer, as the last run returned them.
pub struct KvCache {
    past: Vec<ort::value::DynValue>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a generation's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeTimings {
    /// From the call to the first new token (the prompt's prefill and one head).
    pub first_token_s: f64,
    /// The whole call.
    pub total_s: f64,
    /// Tokens generated.
    pub new_tokens: usize,
}

impl DecodeTimings {
    /// Tokens per second after the first one.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let rest = self.total_s - self.first_token_s;
        if self.new_tokens > 1 && rest > 0.0 {
            (self.new_tokens - 1) as f64 / rest
        } else {
            0.0
        }
    }
}
