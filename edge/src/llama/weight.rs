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

    /// Bytes the weight occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Quant { packed, .. } => packed.numel(),
            Self::Dense(t) => t.numel() * 4,
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
            } => Self::Quant {
                ty,
                rows,
                cols,
                packed: permute(&packed),
            },
            Self::Dense(t) => Self::Dense(permute(&t)),
        }
    }

    /// The full matrix as `kind` [rows, cols]. Never tracked by autograd.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        tch::no_grad(|| match self {
            Self::Quant {
                ty,
                rows,
                cols,
                packed,
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
    let values = match ty {
        GgmlType::Q8_0 => {
            let q = blocks.narrow(1, 2, 32).contiguous().view_dtype(Kind::Int8);
            q.to_kind(Kind::Float) * half(0)
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let offset = if ty == GgmlType::Q4_0 { 2 } else { 4 };
            let qs = blocks.narrow(1, offset, 16);
            let lo = qs.bitwise_and(15);
            let hi = qs.bitwise_right_shift_tensor_scalar(4);
            let q = Tensor::cat(&[lo, hi], 1).to_kind(Kind::Float);
            if ty == GgmlType::Q4_0 {
                (q - 8.0) * half(0)
            } else {
                q * half(0) + half(2)
            }
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
    fn rope_row_permutation_is_exact_on_packed_rows() {
        let dense = Tensor::arange(4 * 64, (Kind::Float, Device::Cpu)).reshape([4, 64]);
        let w = Weight::Dense(dense.shallow_clone()).unpermute_rope_rows(1);
        // rows [0, 1, 2, 3] = [j0p0, j0p1, j1p0, j1p1] -> [j0p0, j1p0, j0p1, j1p1]
        let got = w.dequantize(Kind::Float);
        let want = Tensor::stack(&[dense.get(0), dense.get(2), dense.get(1), dense.get(3)], 0);
        assert!(got.equal(&want));
    }
}
