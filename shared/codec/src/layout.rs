//! The flat layout of a LoRA update: which adapter pairs it holds, in which order, and where
//! each coordinate lives. Host and every client build the same layout from the fleet's
//! adapter configuration; its digest is part of the round configuration so that a client
//! with another layout is refused before it uploads anything.

use crate::CodecError;
use sha2::{Digest, Sha256};

/// One adapted projection: A [r, in] and B [out, r], stored in the flat vector as A
/// (row-major, only when A trains) followed by B (row-major).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairSpec {
    /// A name for logs and PEFT files, for example `layers.3.self_attn.q_proj`.
    pub name: String,
    /// Decoder layer index (the unit of per-layer schedules).
    pub layer: usize,
    /// LoRA rank r.
    pub r: usize,
    /// Input features (columns of A).
    pub in_features: usize,
    /// Output features (rows of B).
    pub out_features: usize,
    /// Whether A trains and travels (false for FFA-LoRA, where A stays at its seeded
    /// initial value on every client).
    pub train_a: bool,
}

impl PairSpec {
    /// Values of A in the update (0 when A is frozen).
    pub fn a_len(&self) -> usize {
        if self.train_a {
            self.r * self.in_features
        } else {
            0
        }
    }

    /// Values of B.
    pub fn b_len(&self) -> usize {
        self.out_features * self.r
    }

    /// Values of this pair in the update.
    pub fn len(&self) -> usize {
        self.a_len() + self.b_len()
    }

    /// Whether the pair has no values (never, for a valid spec).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The flat layout of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pairs: Vec<PairSpec>,
    offsets: Vec<usize>,
    len: usize,
    layers: usize,
}

impl Layout {
    /// A layout of `pairs` in the given order. Every dimension must be positive and the
    /// total below 2^32 (coordinates are u32 indices).
    pub fn new(pairs: Vec<PairSpec>) -> Result<Self, CodecError> {
        if pairs.is_empty() {
            return Err(CodecError::Layout("no adapter pairs".into()));
        }
        let mut offsets = Vec::with_capacity(pairs.len());
        let mut len = 0usize;
        for p in &pairs {
            if p.r == 0 || p.in_features == 0 || p.out_features == 0 {
                return Err(CodecError::Layout(format!(
                    "{}: every dimension must be positive (r {}, in {}, out {})",
                    p.name, p.r, p.in_features, p.out_features
                )));
            }
            offsets.push(len);
            len =
                p.r.checked_mul(p.in_features)
                    .zip(p.r.checked_mul(p.out_features))
                    .and_then(|(a, b)| a.checked_add(b))
                    .and_then(|_| len.checked_add(p.len()))
                    .ok_or_else(|| CodecError::Layout("layout size overflows".into()))?;
        }
        if len > u32::MAX as usize {
            return Err(CodecError::Layout(format!(
                "{len} values: more than 2^32 - 1"
            )));
        }
        let layers = pairs.iter().map(|p| p.layer).max().unwrap_or(0) + 1;
        Ok(Self {
            pairs,
            offsets,
            len,
            layers,
        })
    }

    /// Total values in an update.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the layout is empty (never, for a constructed layout).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of decoder layers (highest layer index + 1).
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// The pairs, in flat order.
    pub fn pairs(&self) -> &[PairSpec] {
        &self.pairs
    }

    /// Offset of pair `i` in the flat vector.
    pub fn offset(&self, i: usize) -> usize {
        self.offsets[i]
    }

    /// SHA-256 of the layout's canonical encoding: equal digests, equal layouts.
    pub fn digest(&self) -> [u8; 32] {
        let bytes = postcard::to_stdvec(&self.pairs).expect("pair specs serialize");
        let mut h = Sha256::new();
        h.update(b"fedshield-layout-1");
        h.update(bytes);
        h.finalize().into()
    }

    /// Calls `f` with the flat index range of every value of rank component `j` of pair
    /// `p`: A's row j (one contiguous range) and B's column j (one index per output row).
    pub(crate) fn for_each_rank_coord(&self, p: usize, j: usize, mut f: impl FnMut(usize)) {
        let spec = &self.pairs[p];
        let base = self.offsets[p];
        if spec.train_a {
            let row = base + j * spec.in_features;
            (row..row + spec.in_features).for_each(&mut f);
        }
        let b = base + spec.a_len();
        for o in 0..spec.out_features {
            f(b + o * spec.r + j);
        }
    }
}

/// The fleet's initial adapter, computed identically by host and edges from a public seed
/// (pure Rust, no libtorch): A uniform in +-1/sqrt(in) as PEFT initialises it (one ChaCha8
/// stream per pair), B zero, so the initial adapter changes nothing.
pub fn init_adapter(layout: &Layout, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut out = vec![0f32; layout.len()];
    for (p, spec) in layout.pairs().iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ (p as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let bound = 1.0 / (spec.in_features as f32).sqrt();
        let base = layout.offset(p);
        for v in &mut out[base..base + spec.a_len()] {
            *v = rng.random_range(-bound..bound);
        }
    }
    out
}

/// The adapter `values` (in layout order) as a safetensors file with PEFT's tensor names
/// (`base_model.model.model.{pair name}.lora_{A,B}.weight`), little-endian f32. Frozen A
/// matrices are not in the update and are not written.
pub fn to_safetensors(layout: &Layout, values: &[f32]) -> Result<Vec<u8>, CodecError> {
    CodecError::check_len("adapter values", layout.len(), values.len())?;
    let mut header = String::from("{");
    let mut at = 0usize;
    let mut first = true;
    for spec in layout.pairs() {
        let mut entry = |which: char, rows: usize, cols: usize| {
            let name = format!("base_model.model.model.{}.lora_{which}.weight", spec.name);
            let end = at + rows * cols * 4;
            header.push_str(&format!(
                "{}\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{rows},{cols}],\"data_offsets\":[{at},{end}]}}",
                if first { "" } else { "," }
            ));
            first = false;
            at = end;
        };
        if spec.train_a {
            entry('A', spec.r, spec.in_features);
        }
        entry('B', spec.out_features, spec.r);
    }
    header.push('}');
    // The data starts 8-byte aligned, as the format recommends.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + values.len() * 4);
    out.extend((header.len() as u64).to_le_bytes());
    out.extend(header.as_bytes());
    for v in values {
        out.extend(v.to_le_bytes());
    }
    Ok(out)
}

/// The devices' default LoRA dropout (`fedshield-edge --dropout`), recorded in the host's
/// federated adapter.
pub const DEFAULT_LORA_DROPOUT: f64 = 0.05;

/// A PEFT `adapter_config.json` for a LoRA adapter: one writer for the trainer's adapters
/// and the host's federated one, so that PEFT and `fedshield-edge generate` read both.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig<'a> {
    /// The base model's name or path.
    pub base_model: &'a str,
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA dropout used while training (PEFT ignores it in inference mode).
    pub dropout: f64,
    /// Target modules, PEFT names.
    pub targets: &'a [&'a str],
    /// Whether A stayed at its seeded initial value (FFA-LoRA).
    pub freeze_a: bool,
    /// The federated round the adapter is the global adapter of.
    pub round: Option<u64>,
}

impl PeftConfig<'_> {
    /// The file's text.
    pub fn to_json(&self) -> String {
        let mut config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
            "fedshield_freeze_a": self.freeze_a,
        });
        if let Some(round) = self.round {
            config["fedshield_round"] = round.into();
        }
        serde_json::to_string_pretty(&config).expect("JSON values encode")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pair(layer: usize, r: usize, inp: usize, out: usize, train_a: bool) -> PairSpec {
        PairSpec {
            name: format!("layers.{layer}.p{inp}x{out}"),
            layer,
            r,
            in_features: inp,
            out_features: out,
            train_a,
        }
    }

    #[test]
    fn offsets_and_lengths() {
        let l = Layout::new(vec![pair(0, 2, 3, 4, true), pair(1, 2, 3, 4, false)]).unwrap();
        assert_eq!(l.len(), 2 * 3 + 4 * 2 + 4 * 2);
        assert_eq!(l.offset(1), 14);
        assert_eq!(l.layers(), 2);
        let mut coords = Vec::new();
        l.for_each_rank_coord(0, 1, |i| coords.push(i));
        // A row 1 = 3..6, B column 1 = 6 + {1, 3, 5, 7}.
        assert_eq!(coords, vec![3, 4, 5, 7, 9, 11, 13]);
        let mut frozen = Vec::new();
        l.for_each_rank_coord(1, 0, |i| frozen.push(i));
        assert_eq!(frozen, vec![14, 16, 18, 20]);
    }

    #[test]
    fn rejects_bad_layouts_and_digests_differ() {
        assert!(Layout::new(vec![]).is_err());
        assert!(Layout::new(vec![pair(0, 0, 3, 4, true)]).is_err());
        let a = Layout::new(vec![pair(0, 2, 3, 4, true)]).unwrap();
        let b = Layout::new(vec![pair(0, 2, 3, 4, false)]).unwrap();
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.clone().digest());
    }
}
