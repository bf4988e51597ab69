//! Frozen base weights: kept packed (GGUF Q4_0 / Q4_1 / Q8_0 blocks) on the device and
//! dequantized with tensor ops (on the GPU when there is one) only when a layer needs them.

use fedshield_models::gguf::{GgmlType, Gguf, GgufError};
use tch::{Device, Kind, Tensor};

/// A frozen weight matrix [rows, cols] (rows = output features).
#[derive(Debug)]
pub enum Weight {
    /// Packed GGUF blocks, one row of blocks per output feature: u8 [rows, row_bytes].
    Quant {
        /// Block type.
        ty: GgmlType,
        /// Output features.
        rows: i64,
        /// Input features.
        cols: i64,
        /// The packed bytes.
        packed: Tensor,
        /// The whole matrix dequantized once and kept (see [`Weight::set_resident`]):
        /// faster calls at 4 (f32) or 2 (bf16) bytes per value instead of about 0.56.
        resident: Option<Tensor>,
    },
    /// A dense f32 matrix.
    Dense(Tensor),
}

impl Weight {
    /// Loads tensor `name` of a GGUF file onto `device`: quantized types stay packed, float
    /// types become dense f32.
    pub fn from_gguf(g: &Gguf, name: &str, device: Device) -> Result<Self, GgufError> {
        let info = g.tensor(name)?;
        let shape = info.shape();
        let (rows, cols) = match shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => {
                return Err(GgufError::Corrupt(format!(
                    "{name}: {} dimensions",
                    shape.len()
                )));
            }
        };
        match info.ggml_type {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let (per_block, block_bytes) = info.ggml_type.block_layout().expect("supported");
                if cols % per_block as i64 != 0 {
                    return Err(GgufError::Corrupt(format!(
                        "{name}: {cols} columns is not a multiple of the block size"
                    )));
                }
                let row_bytes = cols / per_block as i64 * block_bytes as i64;
                let bytes = g.tensor_bytes(info)?;
                let packed = Tensor::from_data_size(bytes, &[rows, row_bytes], Kind::Uint8)
                    .to_device(device);
                Ok(Self::Quant {
                    ty: info.ggml_type,
                    rows,
                    cols,
                    packed,
                    resident: None,
                })
            }
            _ => {
                let values = g.dequantize(name)?;
                Ok(Self::Dense(
                    Tensor::from_slice(&values)
                        .reshape([rows, cols])
                        .to_device(device),
                ))
            }
        }
    }

    /// Quantizes a dense f32 matrix [rows, cols] (cols a multiple of 32) to packed GGUF Q4_0
    /// blocks as llama.cpp's reference quantizer does: per block of 32 values the scale
    /// d = max / -8 of the value of largest magnitude, nibbles min(15, floor(x / d + 8.5)),
    /// value j in the low and j + 16 in the high nibble of byte j. For benchmarks and tests
    /// of packed models built from random weights.
    pub fn quantize_q4_0(dense: &Tensor) -> Self {
        let (rows, cols) = (dense.size()[0], dense.size()[1]);
        assert!(cols % 32 == 0, "Q4_0 needs whole blocks of 32 columns");
        let packed = tch::no_grad(|| {
            let x = dense.to_kind(Kind::Float).reshape([-1, 32]);
            let pick = x.abs().argmax(1, true);
            let max = x.gather(1, &pick, false);
            let d = &max / -8.0;
            let inv = d.reciprocal().masked_fill(&d.eq(0.0), 0.0);
            let q = (x * inv + 8.5)
                .floor()
                .clamp(0.0, 15.0)
                .to_kind(Kind::Uint8);
            let bytes = q
                .narrow(1, 0, 16)
                .bitwise_or_tensor(&q.narrow(1, 16, 16).bitwise_left_shift_tensor_scalar(4));
            let scale = d.to_kind(Kind::Half).contiguous().view_dtype(Kind::Uint8);
            Tensor::cat(&[scale, bytes], 1).reshape([rows, cols / 32 * 18])
        });
        Self::Quant {
            ty: GgmlType::Q4_0,
            rows,
            cols,
            packed,
            resident: None,
        }
    }

    /// [rows, cols].
    pub fn shape(&self) -> (i64, i64) {
        match self {
            Self::Quant { rows, cols, .. } => (*rows, *cols),
            Self::Dense(t) => {
                let s = t.size();
                (s[0], s[1])
            }
        }
    }

    /// Bytes the packed (or dense) weight occupies, without a resident copy.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Quant { packed, .. } => packed.numel(),
            Self::Dense(t) => t.numel() * 4,
        }
    }

    /// Bytes of the resident dequantized copy (0 when there is none or the weight is dense).
    pub fn resident_bytes(&self) -> usize {
        match self {
            Self::Quant {
                resident: Some(t), ..
            } => t.numel() * t.kind().elt_size_in_bytes(),
            _ => 0,
        }
    }

    /// Keeps (`Some(kind)`) or drops (`None`) a dequantized copy in `kind` of a packed weight,
    /// so that [`Weight::dequantize`] in that kind costs nothing. Dense weights are always
    /// resident; the values are the same either way (dequantization is exact).
    pub fn set_resident(&mut self, kind: Option<Kind>) {
        if let Self::Quant {
            ty,
            rows,
            cols,
            packed,
            resident,
        } = self
        {
            *resident = match kind {
                Some(k) if resident.as_ref().is_some_and(|t| t.kind() == k) => resident.take(),
                Some(k) => Some(tch::no_grad(|| {
                    dequantize_blocks(*ty, packed, *rows, *cols).to_kind(k)
                })),
                None => None,
            };
        }
    }

    /// Reorders rows `[h, j, pair]` -> `[h, pair, j]` within each of `heads` heads: undoes
    /// llama.cpp's Q/K permutation (interleaved RoPE pairs) so that the rotate-half RoPE of
    /// Hugging Face applies. Rows are whole blocks, so packed data is permuted exactly.
    pub fn unpermute_rope_rows(self, heads: i64) -> Self {
        let permute = |t: &Tensor| {
            let s = t.size();
            let (rows, width) = (s[0], s[1]);
            let half = rows / heads / 2;
            t.reshape([heads, half, 2, width])
                .transpose(1, 2)
                .reshape([rows, width])
                .contiguous()
        };
        match self {
            Self::Quant {
                ty,
                rows,
                cols,
                packed,
                resident,
            } => Self::Quant {
                ty,
                rows,
                cols,
                packed: permute(&packed),
                resident: resident.as_ref().map(permute),
            },
            Self::Dense(t) => Self::Dense(permute(&t)),
        }
    }

    /// The full matrix as `kind` [rows, cols]. Never tracked by autograd.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        tch::no_grad(|| match self {
            Self::Quant {
                resident: Some(t), ..
            } => {
                if t.kind() == kind {
                    t.shallow_clone()
                } else {
                    t.to_kind(kind)
                }
            }
            Self::Quant {
                ty,
                rows,
                cols,
                packed,
                resident: None,
            } => dequantize_blocks(*ty, packed, *rows, *cols).to_kind(kind),
            Self::Dense(t) => t.to_kind(kind),
        })
    }

    /// Rows `ids` (any shape of i64) as `kind`: [ids..., cols]. Only those rows are unpacked
    /// (embedding lookups).
    pub fn rows(&self, ids: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let flat = ids.flatten(0, -1);
            let mut shape = ids.size();
            match self {
                Self::Quant {
                    resident: Some(t), ..
                } => {
                    shape.push(t.size()[1]);
                    t.index_select(0, &flat).to_kind(kind).reshape(shape)
                }
                Self::Quant {
                    ty, cols, packed, ..
                } => {
                    let picked = packed.index_select(0, &flat);
                    shape.push(*cols);
                    dequantize_blocks(*ty, &picked, flat.size()[0], *cols)
                        .to_kind(kind)
                        .reshape(shape)
                }
                Self::Dense(t) => {
                    shape.push(t.size()[1]);
                    t.index_select(0, &flat).to_kind(kind).reshape(shape)
                }
            }
        })
    }
}

/// Unpacks u8 blocks [rows, row_bytes] of type `ty` into f32 [rows, cols].
fn dequantize_blocks(ty: GgmlType, packed: &Tensor, rows: i64, cols: i64) -> Tensor {
    let (_, block_bytes) = ty.block_layout().expect("quantized type");
    let blocks = packed.reshape([-1, block_bytes as i64]);
    let half = |offset: i64| {
        blocks
            .narrow(1, offset, 2)
            .contiguous()
            .view_dtype(Kind::Half)
            .to_kind(Kind::Float)
    };
    // In place after the one f32 allocation: the transient peak of unpacking is the result
    // plus one byte per value (the nibbles), not three f32 copies (the memory planner counts
    // on it; the head of SmolLM2 is 113 MiB of f32).
    let values = match ty {
        GgmlType::Q8_0 => {
            let q = blocks.narrow(1, 2, 32).contiguous().view_dtype(Kind::Int8);
            let mut v = q.to_kind(Kind::Float);
            let _ = v.g_mul_(&half(0));
            v
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let offset = if ty == GgmlType::Q4_0 { 2 } else { 4 };
            let qs = blocks.narrow(1, offset, 16);
            let lo = qs.bitwise_and(15);
            let hi = qs.bitwise_right_shift_tensor_scalar(4);
            let mut q = Tensor::cat(&[lo, hi], 1).to_kind(Kind::Float);
            if ty == GgmlType::Q4_0 {
                let _ = q.g_sub_scalar_(8.0).g_mul_(&half(0));
            } else {
                let _ = q.g_mul_(&half(0)).g_add_(&half(2));
            }
            q
        }
        _ => unreachable!("only quantized types are packed"),
    };
    values.reshape([rows, cols])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn tensor_dequantization_matches_the_reference_reader() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/quant_types.gguf");
        let g = Gguf::open(&path).unwrap();
        for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] {
            let w = Weight::from_gguf(&g, name, Device::Cpu).unwrap();
            let want = g.dequantize(name).unwrap();
            let got: Vec<f32> = w.dequantize(Kind::Float).flatten(0, -1).try_into().unwrap();
            assert_eq!(got, want, "{name}");
            // Row lookup unpacks the same values.
            let ids = Tensor::from_slice(&[2i64, 0]);
            let rows: Vec<f32> = w.rows(&ids, Kind::Float).flatten(0, -1).try_into().unwrap();
            assert_eq!(&rows[..64], &want[128..192], "{name}");
            assert_eq!(&rows[64..], &want[..64], "{name}");
        }
    }

    #[test]
    fn q4_0_quantization_round_trips_within_half_a_step() {
        tch::manual_seed(5);
        let dense = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
        let w = Weight::quantize_q4_0(&dense);
        assert_eq!(w.bytes(), 3 * 2 * 18);
        let back = w.dequantize(Kind::Float);
        // Per block the step is |d| = max|x| / 8; rounding is within half a step, except the
        // top of the range, which clamps at nibble 15 (7 d instead of up to 8 d above).
        let blocks = dense.reshape([-1, 32]);
        let step = blocks.abs().amax([1i64], true) / 8.0;
        let err = (back.reshape([-1, 32]) - &blocks).abs();
        let ratio = (&err / &step).max().double_value(&[]);
        assert!(ratio <= 1.0 + 1e-4, "error {ratio} steps");
        let within_half = err.le_tensor(&(&step * 0.5 + 1e-6)).to_kind(Kind::Float);
        assert!(within_half.mean(Kind::Float).double_value(&[]) > 0.9);
        // The largest-magnitude value of each block is exact (it defines the scale).
        let pick = blocks.abs().argmax(1, true);
        let exact = (back.reshape([-1, 32]).gather(1, &pick, false)
            - blocks.gather(1, &pick, false))
        .abs()
        .max()
        .double_value(&[]);
        assert!(exact < 1e-2, "{exact}");
    }

    #[test]
    fn resident_copies_change_nothing_but_memory() {
        tch::manual_seed(6);
        let dense = Tensor::randn([4, 64], (Kind::Float, Device::Cpu));
        let mut w = Weight::quantize_q4_0(&dense);
        let packed = w.dequantize(Kind::Float);
        assert_eq!(w.resident_bytes(), 0);
        w.set_resident(Some(Kind::Float));
        assert_eq!(w.resident_bytes(), 4 * 64 * 4);
        assert!(w.dequantize(Kind::Float).equal(&packed));
        let ids = Tensor::from_slice(&[3i64, 1]);
        let rows = w.rows(&ids, Kind::Float);
        assert!(rows.equal(&packed.index_select(0, &ids)));
        w.set_resident(Some(Kind::BFloat16));
        assert_eq!(w.resident_bytes(), 4 * 64 * 2);
        w.set_resident(None);
        assert_eq!(w.resident_bytes(), 0);
        assert!(w.dequantize(Kind::Float).equal(&packed));
    }

    #[test]
    fn rope_row_permutation_is_exact_on_packed_rows() {
        let dense = Tensor::arange(4 * 64, (Kind::Float, Device::Cpu)).reshape([4, 64]);
        let w = Weight::Dense(dense.shallow_clone()).unpermute_rope_rows(1);
        // rows [0, 1, 2, 3] = [j0p0, j0p1, j1p0, j1p1] -> [j0p0, j1p0, j0p1, j1p1]
        let got = w.dequantize(Kind::Float);
        let want = Tensor::stack(&[dense.get(0), dense.get(2), dense.get(1), dense.get(3)], 0);
        assert!(got.equal(&want));
    }
}
