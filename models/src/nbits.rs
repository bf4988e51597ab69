//! GGUF 4-bit and 8-bit weights in ONNX Runtime's `com.microsoft.MatMulNBits` layout
//! (`bits = 4` or `8`, `block_size = 32`), for the ONNX export of the base model. Q8_0
//! (`q * d`, q signed) is MatMulNBits with `bits = 8`: codes `q + 128`, one per byte, and
//! its default zero point 128. For 4 bits `B` is
//! `[N, K / 32, 16]` uint8 with the 4-bit codes packed low nibble first along K (element
//! `2j` in the low nibble of byte `j`, `2j + 1` in its high nibble), `scales` is
//! `[N, K / 32]`, and a block's value is `(code - zero_point) * scale`.
//!
//! GGUF packs a block differently: byte `j` holds element `j` (low nibble) and `j + 16`
//! (high nibble), so the codes are repacked. Q4_0 (`(q - 8) * d`) is exactly MatMulNBits
//! with its default zero point 8. Q4_1 (`q * d + m`) is MatMulNBits with zero point 0 plus
//! a per-block offset `m` ([`NBits::mins`]): the graph adds, for each output, the sum over
//! blocks of `m` times the block's sum of inputs. A float zero point `-m / d` would be exact
//! too, but ONNX Runtime then dequantizes the whole weight on every call.

use crate::gguf::{GgmlType, GgufError};
use half::f16;

/// Elements per block.
pub const BLOCK: usize = 32;
/// Bytes of packed 4-bit codes per block.
pub const BLOB: usize = BLOCK / 2;

/// A `[n, k]` weight in MatMulNBits layout.
#[derive(Debug, Clone, PartialEq)]
pub struct NBits {
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns), a multiple of [`BLOCK`].
    pub k: usize,
    /// Bits per code: 4 or 8.
    pub bits: u8,
    /// `B`: `[n, k / 32, 32 * bits / 8]` packed codes.
    pub codes: Vec<u8>,
    /// `scales`: `[n, k / 32]`.
    pub scales: Vec<f32>,
    /// The zero point of every block: 8 (Q4_0) or 128 (Q8_0), MatMulNBits' defaults, or 0
    /// (Q4_1).
    pub zero_point: u8,
    /// Q4_1's per-block offsets `[n, k / 32]` (`None` for Q4_0).
    pub mins: Option<Vec<f32>>,
}

impl NBits {
    /// Repacks the GGUF `ty` (Q4_0, Q4_1 or Q8_0) blocks `bytes` of a `[n, k]` weight.
    pub fn from_gguf(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Result<Self, GgufError> {
        let (block_bytes, zero_point, bits) = match ty {
            GgmlType::Q4_0 => (18, 8, 4),
            GgmlType::Q4_1 => (20, 0, 4),
            GgmlType::Q8_0 => (34, 128, 8),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "MatMulNBits takes Q4_0, Q4_1 or Q8_0 blocks, not {}",
                    other.name()
                )));
            }
        };
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(GgufError::Corrupt(format!(
                "{k} input features: not a multiple of {BLOCK}"
            )));
        }
        let blocks = n * (k / BLOCK);
        if bytes.len() != blocks * block_bytes {
            return Err(GgufError::Corrupt(format!(
                "{} bytes for {blocks} blocks of {}",
                bytes.len(),
                ty.name()
            )));
        }
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        if bits == 8 {
            let mut codes = Vec::with_capacity(blocks * BLOCK);
            let mut scales = Vec::with_capacity(blocks);
            for block in bytes.chunks_exact(block_bytes) {
                scales.push(half(&block[..2]));
                codes.extend(block[2..].iter().map(|&q| (q as i8 as i16 + 128) as u8));
            }
            return Ok(Self {
                n,
                k,
                bits,
                codes,
                scales,
                zero_point,
                mins: None,
            });
        }
        let mut codes = Vec::with_capacity(blocks * BLOB);
        let mut scales = Vec::with_capacity(blocks);
        let mut mins = (ty == GgmlType::Q4_1).then(|| Vec::with_capacity(blocks));
        for block in bytes.chunks_exact(block_bytes) {
            scales.push(half(&block[..2]));
            let qs = match &mut mins {
                Some(m) => {
                    m.push(half(&block[2..4]));
                    &block[4..]
                }
                None => &block[2..],
            };
            // Element e of the block: e < 16 in qs[e]'s low nibble, else qs[e - 16]'s high.
            let code = |e: usize| {
                if e < BLOB {
                    qs[e] & 0x0f
                } else {
                    qs[e - BLOB] >> 4
                }
            };
            codes.extend((0..BLOB).map(|j| code(2 * j) | (code(2 * j + 1) << 4)));
        }
        Ok(Self {
            n,
            k,
            bits,
            codes,
            scales,
            zero_point,
            mins,
        })
    }

    /// The weights `parts` stacked along the output features (`[sum n, k]`), so that one
    /// MatMulNBits computes all of their products (a fused q/k/v or gate/up projection):
    /// they must share `k`, the bits and the zero point, and all or none have offsets.
    pub fn stack(parts: &[NBits]) -> Result<Self, GgufError> {
        let first = parts
            .first()
            .ok_or_else(|| GgufError::Corrupt("no weights to stack".into()))?;
        let mut out = NBits {
            n: 0,
            k: first.k,
            bits: first.bits,
            codes: Vec::new(),
            scales: Vec::new(),
            zero_point: first.zero_point,
            mins: first.mins.as_ref().map(|_| Vec::new()),
        };
        for p in parts {
            if (p.k, p.bits, p.zero_point, p.mins.is_some())
                != (out.k, out.bits, out.zero_point, out.mins.is_some())
            {
                return Err(GgufError::Corrupt(format!(
                    "cannot stack a {}-bit [{}, {}] weight (zero point {}) on a {}-bit [.., {}] one (zero point {})",
                    p.bits, p.n, p.k, p.zero_point, out.bits, out.k, out.zero_point
                )));
            }
            out.n += p.n;
            out.codes.extend_from_slice(&p.codes);
            out.scales.extend_from_slice(&p.scales);
            if let (Some(all), Some(m)) = (out.mins.as_mut(), p.mins.as_ref()) {
                all.extend_from_slice(m);
            }
        }
        Ok(out)
    }

    /// Bytes of codes per block.
    pub fn blob(&self) -> usize {
        BLOCK * usize::from(self.bits) / 8
    }

    /// The weight's values `[n, k]`, as MatMulNBits (plus the offsets) computes them.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for (b, blob) in self.codes.chunks_exact(self.blob()).enumerate() {
            let scale = self.scales[b];
            let offset = self.mins.as_ref().map(|m| m[b]);
            for &byte in blob {
                let codes = if self.bits == 8 {
                    vec![byte]
                } else {
                    vec![byte & 0x0f, byte >> 4]
                };
                for code in codes {
                    let q = (i32::from(code) - i32::from(self.zero_point)) as f32 * scale;
                    out.push(match offset {
                        Some(m) => q + m,
                        None => q,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Gguf, dequantize_into};
    use rand::{Rng, SeedableRng};

    /// Random GGUF blocks of `ty` for a `[n, k]` weight.
    fn random_blocks(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..n * k / BLOCK {
            bytes.extend(f16::from_f32(rng.random_range(-0.1..0.1)).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                bytes.extend(f16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes());
            }
            let codes = if ty == GgmlType::Q8_0 { BLOCK } else { BLOB };
            bytes.extend((0..codes).map(|_| rng.random::<u8>()));
        }
        bytes
    }

    #[test]
    fn repacked_blocks_give_exactly_the_gguf_values() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for (n, k, seed) in [(1, 32, 1), (3, 64, 2), (7, 576, 3)] {
                let bytes = random_blocks(ty, n, k, seed);
                let mut want = vec![0f32; n * k];
                dequantize_into(ty, &bytes, &mut want).unwrap();
                let packed = NBits::from_gguf(ty, &bytes, n, k).unwrap();
                assert_eq!(packed.codes.len(), n * k * usize::from(packed.bits) / 8);
                assert_eq!(packed.scales.len(), n * k / BLOCK);
                assert_eq!(packed.dequantize(), want, "{} {n}x{k}", ty.name());
            }
        }
    }

    #[test]
    fn the_fixture_tensors_repack_exactly_and_the_nibble_order_is_matmulnbits() {
        let g = Gguf::open(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quant_types.gguf"),
        )
        .unwrap();
        for name in ["q4_0", "q4_1", "q8_0"] {
            let info = g.tensor(name).unwrap();
            let packed =
                NBits::from_gguf(info.ggml_type, g.tensor_bytes(info).unwrap(), 3, 64).unwrap();
            assert_eq!(packed.dequantize(), g.dequantize(name).unwrap(), "{name}");
        }
        // One Q4_1 block whose codes are 0..=15 then 15..=0: byte j of the repacked block
        // holds elements 2j (low) and 2j + 1 (high).
        let mut block = Vec::new();
        block.extend(f16::from_f32(1.0).to_le_bytes());
        block.extend(f16::from_f32(0.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let p = NBits::from_gguf(GgmlType::Q4_1, &block, 1, 32).unwrap();
        assert_eq!(p.codes[0], 0x10, "elements 0 and 1: codes 0 and 1");
        assert_eq!(
            p.codes[8], 0xef,
            "elements 16 and 17: codes 15 (low) and 14 (high)"
        );
    }

    #[test]
    fn stacked_weights_are_their_rows_one_after_the_other() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let parts: Vec<NBits> = [(3, 5), (1, 6), (2, 7)]
                .iter()
                .map(|&(n, seed)| {
                    NBits::from_gguf(ty, &random_blocks(ty, n, 64, seed), n, 64).unwrap()
                })
                .collect();
            let stacked = NBits::stack(&parts).unwrap();
            assert_eq!((stacked.n, stacked.k), (6, 64));
            let want: Vec<f32> = parts.iter().flat_map(NBits::dequantize).collect();
            assert_eq!(stacked.dequantize(), want, "{}", ty.name());
        }
        let q40 = NBits::from_gguf(
            GgmlType::Q4_0,
            &random_blocks(GgmlType::Q4_0, 1, 64, 1),
            1,
            64,
        )
        .unwrap();
        let q41 = NBits::from_gguf(
            GgmlType::Q4_1,
            &random_blocks(GgmlType::Q4_1, 1, 64, 1),
            1,
            64,
        )
        .unwrap();
        let wide = NBits::from_gguf(
            GgmlType::Q4_0,
            &random_blocks(GgmlType::Q4_0, 1, 96, 1),
            1,
            96,
        )
        .unwrap();
        assert!(
            NBits::stack(&[q40.clone(), q41]).is_err(),
            "zero points differ"
        );
        assert!(NBits::stack(&[q40, wide]).is_err(), "input features differ");
        assert!(NBits::stack(&[]).is_err());
    }

    #[test]
    fn other_types_and_shapes_are_refused() {
        let q = random_blocks(GgmlType::Q4_1, 2, 64, 4);
        assert!(NBits::from_gguf(GgmlType::F32, &q, 2, 64).is_err());
        assert!(NBits::from_gguf(GgmlType::Q4_1, &q, 2, 48).is_err());
        assert!(NBits::from_gguf(GgmlType::Q4_1, &q[1..], 2, 64).is_err());
        assert!(NBits::from_gguf(GgmlType::Q4_1, &q, 3, 64).is_err());
    }
}
