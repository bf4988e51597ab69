//! LoRA adapters on the seven Llama projections, initialised, named and saved as PEFT does.
//!
//! Each adapted projection gets A [r, in] (Kaiming-uniform with a = sqrt(5), i.e. uniform in
//! +-1/sqrt(in), PEFT's default) and B [out, r] (zeros); the projection's output gains
//! `dropout(x) A^T B^T * alpha / r`. With `freeze_a` (FFA-LoRA) only B trains: the update
//! is then linear in B, so averaging the clients' B is exactly the adapter of the averaged
//! update.

use crate::EdgeError;
use crate::llama::{Adapter, Llama, Module};
use fedshield_codec::{Layout, PairSpec};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

/// LoRA hyper-parameters, named as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub r: i64,
    /// lora_alpha: the update is scaled by alpha / r.
    pub alpha: f64,
    /// lora_dropout, applied to the adapter's input while training.
    pub dropout: f64,
    /// target_modules.
    pub target_modules: Vec<Module>,
    /// FFA-LoRA: A stays at its initial value, only B trains.
    pub freeze_a: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: Module::ALL.to_vec(),
            freeze_a: false,
        }
    }
}

/// One adapted projection.
#[derive(Debug)]
pub struct LoraPair {
    /// A [r, in].
    pub a: Tensor,
    /// B [out, r].
    pub b: Tensor,
}

/// The adapters of a whole model.
pub struct Lora {
    /// Hyper-parameters.
    pub config: LoraConfig,
    /// The trainable tensors (B, and A unless frozen), for the optimizer.
    pub vs: nn::VarStore,
    /// Adapters by (layer, module).
    pub pairs: BTreeMap<(usize, Module), LoraPair>,
    training: std::cell::Cell<bool>,
    /// Seed of the dropout masks of the current forward pass (see [`Lora::set_dropout_seed`]).
    dropout_seed: std::cell::Cell<u64>,
    /// 0/1 masks of the update tensors (layout order) while training is restricted to a
    /// selection of coordinates.
    grad_masks: std::cell::RefCell<Option<Vec<Tensor>>>,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lora")
            .field("config", &self.config)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

/// PEFT's tensor name of A or B of one projection.
pub fn peft_tensor_name(layer: usize, module: Module, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        module.parent(),
        module.peft_name()
    )
}

impl Lora {
    /// Fresh adapters for `model` with PEFT's initialisation, drawn from libtorch's
    /// generator seeded with `seed`.
    pub fn new(model: &Llama, config: LoraConfig, seed: i64) -> Self {
        let shapes: Vec<Vec<(Module, (i64, i64))>> = model
            .blocks
            .iter()
            .map(|block| {
                config
                    .target_modules
                    .iter()
                    .map(|&m| (m, block.weight(m).shape()))
                    .collect()
            })
            .collect();
        Self::with_shapes(&shapes, model.device, config, seed)
    }

    /// Fresh adapters as [`Lora::new`] for the layers `shapes` describes (per layer, each
    /// target's weight `[out, in]`), on `device`, without a model.
    fn with_shapes(
        shapes: &[Vec<(Module, (i64, i64))>],
        device: Device,
        config: LoraConfig,
        seed: i64,
    ) -> Self {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let mut pairs = BTreeMap::new();
        let root = vs.root();
        for (layer, targets) in shapes.iter().enumerate() {
            for &(module, (out, inp)) in targets {
                let path = &root / format!("layer{layer}") / module.peft_name();
                let bound = 1.0 / (inp as f64).sqrt();
                let init = nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                };
                let a = if config.freeze_a {
                    Tensor::empty([config.r, inp], (Kind::Float, device)).uniform_(-bound, bound)
                } else {
                    path.var("lora_A", &[config.r, inp], init)
                };
                let b = path.zeros("lora_B", &[out, config.r]);
                pairs.insert((layer, module), LoraPair { a, b });
            }
        }
        Self {
            config,
            vs,
            pairs,
            training: std::cell::Cell::new(false),
            dropout_seed: std::cell::Cell::new(0),
            grad_masks: std::cell::RefCell::new(None),
        }
    }

    /// alpha / r.
    pub fn scaling(&self) -> f64 {
        self.config.alpha / self.config.r as f64
    }

    /// Turns dropout on (training) or off (evaluation, generation).
    pub fn set_training(&self, on: bool) {
        self.training.set(on);
    }

    /// Seeds the dropout masks of the next forward passes: the mask of (layer, projection)
    /// is a function of this seed, the layer and the projection only, so a recomputed layer
    /// (gradient checkpointing) draws exactly the masks of its first forward pass.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.set(seed);
    }

    /// Number of trainable values.
    pub fn trainable_len(&self) -> usize {
        self.vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum()
    }

    /// All adapter tensors with their PEFT names, A and B of every projection.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2);
        for (&(layer, module), p) in &self.pairs {
            out.push((peft_tensor_name(layer, module, 'A'), &p.a));
            out.push((peft_tensor_name(layer, module, 'B'), &p.b));
        }
        out
    }

    /// The flat layout of this adapter's update (the codec's order: pairs by layer and
    /// module, A then B of each, A only when it trains).
    pub fn layout(&self) -> Result<Layout, fedshield_codec::CodecError> {
        Layout::new(
            self.pairs
                .iter()
                .map(|(&(layer, module), p)| {
                    let (r, inp) = (p.a.size()[0] as usize, p.a.size()[1] as usize);
                    PairSpec {
                        name: format!("layers.{layer}.{}.{}", module.parent(), module.peft_name()),
                        layer,
                        r,
                        in_features: inp,
                        out_features: p.b.size()[0] as usize,
                        train_a: !self.config.freeze_a,
                    }
                })
                .collect(),
        )
    }

    /// The tensors of the update, in layout order.
    fn update_tensors(&self) -> impl Iterator<Item = &Tensor> {
        let with_a = !self.config.freeze_a;
        self.pairs
            .values()
            .flat_map(move |p| with_a.then_some(&p.a).into_iter().chain([&p.b]))
    }

    /// The adapter's trainable values as one vector in layout order.
    pub fn flatten(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.trainable_len());
        for t in self.update_tensors() {
            let flat = t.detach().to_device(Device::Cpu).reshape([-1]);
            out.extend(Vec::<f32>::try_from(&flat).expect("f32 adapter tensor"));
        }
        out
    }

    /// Restricts training to the coordinates `indices` of the layout (ascending), or lifts
    /// the restriction (`None`): the gradients of every other coordinate are zeroed before
    /// each optimizer step and [`Self::decay`] skips them, so under [`crate::train::Trainer`]
    /// (AdamW, weight decay included) they keep their values exactly. Used for masked local
    /// training, where the round's public mask is known before training starts.
    pub fn restrict_training(&self, indices: Option<&[u32]>) -> Result<(), EdgeError> {
        let Some(indices) = indices else {
            *self.grad_masks.borrow_mut() = None;
            return Ok(());
        };
        let len = self.update_tensors().map(Tensor::numel).sum::<usize>();
        let mut flat = vec![0f32; len];
        for &i in indices {
            *flat.get_mut(i as usize).ok_or_else(|| {
                EdgeError::Shape(format!("coordinate {i} outside the adapter's {len} values"))
            })? = 1.0;
        }
        let mut at = 0;
        let masks = self
            .update_tensors()
            .map(|t| {
                let n = t.numel();
                let m = Tensor::from_slice(&flat[at..at + n])
                    .reshape(t.size())
                    .to_device(t.device());
                at += n;
                m
            })
            .collect();
        *self.grad_masks.borrow_mut() = Some(masks);
        Ok(())
    }

    /// Zeroes the gradients outside the selection set by [`Self::restrict_training`].
    pub fn mask_gradients(&self) {
        let masks = self.grad_masks.borrow();
        let Some(masks) = masks.as_ref() else {
            return;
        };
        tch::no_grad(|| {
            for (t, m) in self.update_tensors().zip(masks) {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.g_mul_(m);
                }
            }
        });
    }

    /// AdamW's decoupled weight decay: multiplies every trainable value by `factor`
    /// (1 - lr * weight decay), except the coordinates outside a
    /// [`Self::restrict_training`] selection.
    pub fn decay(&self, factor: f64) {
        if factor == 1.0 {
            return;
        }
        let masks = self.grad_masks.borrow();
        tch::no_grad(|| {
            for (i, t) in self.update_tensors().enumerate() {
                let mut t = t.shallow_clone();
                match masks.as_ref().map(|m| &m[i]) {
                    // t * (1 - m (1 - factor)): factor where selected, 1 elsewhere.
                    Some(m) => {
                        let _ = t.g_mul_(&(m * (factor - 1.0) + 1.0));
                    }
                    None => {
                        let _ = t.g_mul_scalar_(factor);
                    }
                }
            }
        });
    }

    /// Sets the trainable values from a vector in layout order.
    pub fn load_flat(&self, values: &[f32]) -> Result<(), EdgeError> {
        let len = self.update_tensors().map(Tensor::numel).sum::<usize>();
        if values.len() != len {
            return Err(EdgeError::Shape(format!(
                "adapter has {len} trainable values, got {}",
                values.len()
            )));
        }
        tch::no_grad(|| {
            let mut at = 0;
            for t in self.update_tensors() {
                let n = t.numel();
                let src = Tensor::from_slice(&values[at..at + n])
                    .reshape(t.size())
                    .to_device(t.device());
                t.shallow_clone().copy_(&src);
                at += n;
            }
        });
        Ok(())
    }

    /// Saves `adapter_model.safetensors` (PEFT's tensor names) and `adapter_config.json` in
    /// `dir`, recording `base_model` (the base model's name or path).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), EdgeError> {
        let bad = |why: String| EdgeError::Adapter {
            dir: dir.to_path_buf(),
            why,
        };
        std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&tensors, dir.join("adapter_model.safetensors"))?;
        let targets: Vec<&str> = self
            .config
            .target_modules
            .iter()
            .map(|m| m.peft_name())
            .collect();
        let config = fedshield_codec::PeftConfig {
            base_model,
            r: self.config.r as usize,
            alpha: self.config.alpha,
            dropout: self.config.dropout,
            targets: &targets,
            freeze_a: self.config.freeze_a,
            round: None,
        };
        std::fs::write(dir.join("adapter_config.json"), config.to_json())
            .map_err(|e| bad(format!("adapter_config.json: {e}")))
    }

    /// Loads a PEFT adapter directory for `model`. Every expected tensor must be present with
    /// its shape; extra tensors are an error (the adapter belongs to another model).
    pub fn load_peft(dir: &Path, model: &Llama) -> Result<Self, EdgeError> {
        let layers: Vec<_> = model.blocks.iter().collect();
        Self::load_peft_with(dir, model.device, layers.len(), |layer, module| {
            layers.get(layer).map(|b| b.weight(module).shape())
        })
    }

    /// As [`Lora::load_peft`], the projections' shapes `[out, in]` given by `shape` for
    /// `layers` layers (for instance an ONNX export's LoRA inputs) instead of a loaded
    /// model; a target `shape` does not know is an error.
    pub fn load_peft_with(
        dir: &Path,
        device: Device,
        layers: usize,
        shape: impl Fn(usize, Module) -> Option<(i64, i64)>,
    ) -> Result<Self, EdgeError> {
        let bad = |why: String| EdgeError::Adapter {
            dir: dir.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(dir.join("adapter_config.json"))
            .map_err(|e| bad(format!("adapter_config.json: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("adapter_config.json: {e}")))?;
        let targets = json["target_modules"]
            .as_array()
            .ok_or_else(|| bad("adapter_config.json: target_modules missing".into()))?
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(Module::from_peft_name)
                    .ok_or_else(|| bad(format!("unknown target module {v}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let config = LoraConfig {
            r: json["r"]
                .as_i64()
                .ok_or_else(|| bad("adapter_config.json: r missing".into()))?,
            alpha: json["lora_alpha"]
                .as_f64()
                .ok_or_else(|| bad("adapter_config.json: lora_alpha missing".into()))?,
            dropout: json["lora_dropout"].as_f64().unwrap_or(0.0),
            target_modules: targets,
            freeze_a: json["fedshield_freeze_a"].as_bool().unwrap_or(false),
        };
        let shapes = (0..layers)
            .map(|layer| {
                config
                    .target_modules
                    .iter()
                    .map(|&m| {
                        shape(layer, m).map(|s| (m, s)).ok_or_else(|| {
                            bad(format!(
                                "adapts layer {layer}'s {}, which takes no adapter here (an ONNX export takes them only on the projections it was exported with)",
                                m.peft_name()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lora = Self::with_shapes(&shapes, device, config, 0);
        let mut stored: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("adapter_model.safetensors"))?
                .into_iter()
                .collect();
        tch::no_grad(|| -> Result<(), EdgeError> {
            for (name, t) in lora.named_tensors() {
                let src = stored
                    .remove(&name)
                    .ok_or_else(|| bad(format!("no tensor {name}")))?;
                if src.size() != t.size() {
                    return Err(bad(format!(
                        "{name}: shape {:?}, the model needs {:?}",
                        src.size(),
                        t.size()
                    )));
                }
                let mut dst = t.shallow_clone();
                dst.copy_(&src.to_kind(Kind::Float).to_device(t.device()));
            }
            Ok(())
        })?;
        if let Some(extra) = stored.keys().next() {
            return Err(bad(format!("a tensor this model does not have: {extra}")));
        }
        Ok(lora)
    }
}

impl Adapter for Lora {
    fn delta(&self, layer: usize, module: Module, x: &Tensor) -> Option<Tensor> {
        let p = self.pairs.get(&(layer, module))?;
        let p_drop = self.config.dropout;
        let x = if self.training.get() && p_drop > 0.0 {
            if x.device() == Device::Cpu {
                let seed = self.dropout_seed.get() ^ ((layer as u64) << 8 | module as u64) << 40;
                let mask = dropout_mask(x.numel(), p_drop, seed);
                x * Tensor::from_slice(&mask)
                    .reshape(x.size())
                    .to_kind(x.kind())
            } else {
                x.dropout(p_drop, true)
            }
        } else {
            x.shallow_clone()
        };
        // Scaled at rank width ([.., r]), not at the projection's output width.
        // In the input's precision; the f32 parameters receive f32 gradients through the cast.
        let (a, b) = (p.a.to_kind(x.kind()), p.b.to_kind(x.kind()));
        Some((x.matmul(&a.tr()) * self.scaling()).matmul(&b.tr()))
    }
}

/// Inverted-dropout mask of `n` values: 0 with probability `p` (to 1/65536: each value draws
/// 16 bits from ChaCha8 seeded with `seed`), 1/(1 - p) otherwise. On the CPU this is several
/// times faster than libtorch's per-element Bernoulli draws, which cost as much as the
/// projection's own matmul at these sizes.
fn dropout_mask(n: usize, p: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let threshold = (p * 65536.0).round().clamp(0.0, 65536.0) as u32;
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut bits = vec![0u16; n];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill(&mut bits[..]);
    bits.iter()
        .map(|&b| if u32::from(b) < threshold { 0.0 } else { keep })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::dropout_mask;

    #[test]
    fn dropout_masks_drop_at_the_rate_and_repeat_with_the_seed() {
        let n = 1 << 20;
        let m = dropout_mask(n, 0.05, 7);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // 1M draws: the standard deviation of the rate is 2.2e-4.
        assert!((dropped - 0.05).abs() < 1.5e-3, "{dropped}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.95).abs() < 1e-6));
        assert_eq!(m, dropout_mask(n, 0.05, 7));
        assert_ne!(m, dropout_mask(n, 0.05, 8));
        assert!(dropout_mask(1000, 0.0, 1).iter().all(|&v| v == 1.0));
    }
}
