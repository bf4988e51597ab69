//! The round's pruning mask: which coordinates of the update every client sends.
//!
//! # The rule
//! The mask is a function of public data only: the layout, the pruning configuration, the
//! round number and seed from the round announcement, and the [`History`] of previous
//! global updates (which the host publishes anyway). Every client computes the same mask,
//! so the kept coordinates line up in the ciphertexts, only they are encrypted (the
//! ciphertext shrinks by the pruning ratio, no index travels), and the mask says nothing
//! about any client's data.
//!
//! Each client keeps what it did not send in an error-feedback residual (see
//! [`crate::ErrorFeedback`]), so a coordinate's pending mass grows with the rounds it waits.
//! The mask therefore keeps, within each layer's quota, the coordinates with the largest
//! *expected pending mass* `rate x age`: `age` is the number of rounds since the coordinate
//! was last sent, `rate` the magnitude per round of the global update it produced then
//! (`|update| / age at that time`), and coordinates never sent take the mean rate of their
//! tensor (A or B of the same pair). Rounds start with every coordinate equally pending, so the first masks
//! are uniform random; coordinates whose global update moves fast come back often, slow
//! ones come back when their pending mass has caught up, none waits for ever. A fraction
//! `explore` of each quota is drawn uniformly at random among the rest, so a coordinate
//! whose clients cancel each other (small mean, large residuals) is still revisited.
//! Ties are broken by a keyed hash of the round seed, never by client data.

use crate::CodecError;
use crate::layout::Layout;

/// Keep fraction rho per decoder layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The same fraction in every layer.
    Uniform {
        /// Kept fraction.
        rho: f64,
    },
    /// A linear ramp from the first layer to the last (the reference's per-layer schedule
    /// ramps its pruned fraction from 0.2 to 0.5, i.e. a keep fraction from 0.8 to 0.5).
    Ramp {
        /// Kept fraction in layer 0.
        first: f64,
        /// Kept fraction in the last layer.
        last: f64,
    },
}

impl Schedule {
    /// Parses `0.1`, `uniform:0.1` or `ramp:0.05:0.15`.
    pub fn parse(s: &str) -> Result<Self, CodecError> {
        let num = |v: &str| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| CodecError::Config(format!("not a number: {v:?} in schedule {s:?}")))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let schedule = match parts.as_slice() {
            [rho] => Self::Uniform { rho: num(rho)? },
            ["uniform", rho] => Self::Uniform { rho: num(rho)? },
            ["ramp", first, last] => Self::Ramp {
                first: num(first)?,
                last: num(last)?,
            },
            _ => {
                return Err(CodecError::Config(format!(
                    "schedule {s:?}: expected RHO, uniform:RHO or ramp:FIRST:LAST"
                )));
            }
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// Every fraction must be finite and in (0, 1].
    pub fn validate(&self) -> Result<(), CodecError> {
        let ok = |v: f64| v.is_finite() && v > 0.0 && v <= 1.0;
        let fine = match *self {
            Self::Uniform { rho } => ok(rho),
            Self::Ramp { first, last } => ok(first) && ok(last),
        };
        if fine {
            Ok(())
        } else {
            Err(CodecError::Config(format!(
                "{self:?}: keep fractions must be in (0, 1]"
            )))
        }
    }

    /// Keep fraction of `layer` out of `layers`, clamped to (0, 1] (a ramp's ends may be
    /// any values that validate; the interpolation cannot leave the range).
    pub fn rho(&self, layer: usize, layers: usize) -> f64 {
        let v = match *self {
            Self::Uniform { rho } => rho,
            Self::Ramp { first, last } => {
                let t = if layers > 1 {
                    layer as f64 / (layers - 1) as f64
                } else {
                    0.0
                };
                first + (last - first) * t
            }
        };
        v.clamp(f64::MIN_POSITIVE, 1.0)
    }

    /// The fraction kept over the whole layout (layers weighted by their sizes).
    pub fn overall(&self, layout: &Layout) -> f64 {
        let kept: f64 = layout
            .pairs()
            .iter()
            .map(|p| p.len() as f64 * self.rho(p.layer, layout.layers()))
            .sum();
        kept / layout.len() as f64
    }
}

/// What the mask keeps or drops as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// Single coordinates.
    Element,
    /// Whole rank components: row j of A with column j of B (the update of one rank-1
    /// term of the adapter).
    Rank,
}

impl Structure {
    /// Parses `element` or `rank`.
    pub fn parse(s: &str) -> Result<Self, CodecError> {
        match s {
            "element" => Ok(Self::Element),
            "rank" => Ok(Self::Rank),
            _ => Err(CodecError::Config(format!(
                "structure {s:?}: element or rank"
            ))),
        }
    }
}

/// Pruning configuration, part of the round configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PruneConfig {
    /// Keep fraction per layer.
    pub schedule: Schedule,
    /// Granularity of the mask.
    pub structure: Structure,
    /// Fraction of each layer's quota drawn uniformly at random (in [0, 1]).
    pub explore: f64,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self {
            schedule: Schedule::Uniform { rho: 0.1 },
            structure: Structure::Element,
            explore: 0.1,
        }
    }
}

impl PruneConfig {
    /// Dense: every coordinate, every round.
    pub fn dense() -> Self {
        Self {
            schedule: Schedule::Uniform { rho: 1.0 },
            ..Self::default()
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), CodecError> {
        self.schedule.validate()?;
        if !(0.0..=1.0).contains(&self.explore) {
            return Err(CodecError::Config(format!(
                "explore must be in [0, 1], got {}",
                self.explore
            )));
        }
        Ok(())
    }
}

/// The public history the mask is computed from: for each coordinate, the round it was
/// last sent in and the magnitude per round of the global update it produced then. Host
/// and clients update it identically from each published global update.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct History {
    round: u64,
    last_sent: Vec<u32>,
    /// Negative: never sent.
    rate: Vec<f32>,
}

impl History {
    /// No round yet, for updates of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            round: 0,
            last_sent: vec![0; len],
            rate: vec![-1.0; len],
        }
    }

    /// The last round observed (0: none).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The round coordinate `i` was last sent in (0: never).
    pub fn last_sent(&self, i: usize) -> u64 {
        self.last_sent[i] as u64
    }

    /// Number of coordinates.
    pub fn len(&self) -> usize {
        self.rate.len()
    }

    /// Whether there are no coordinates.
    pub fn is_empty(&self) -> bool {
        self.rate.is_empty()
    }

    /// Records round `selection.round`'s global update: `values[j]` is the update of
    /// coordinate `selection.indices[j]`.
    pub fn observe(&mut self, selection: &Selection, values: &[f32]) -> Result<(), CodecError> {
        CodecError::check_len(
            "global update values",
            selection.indices.len(),
            values.len(),
        )?;
        if selection.round <= self.round || selection.round > u32::MAX as u64 {
            return Err(CodecError::Round {
                expected_after: self.round,
                got: selection.round,
            });
        }
        if selection
            .indices
            .last()
            .is_some_and(|&i| i as usize >= self.len())
        {
            return Err(CodecError::Config(
                "selection index beyond the layout".into(),
            ));
        }
        for (&i, &v) in selection.indices.iter().zip(values) {
            let i = i as usize;
            let age = (selection.round - self.last_sent[i] as u64) as f32;
            self.rate[i] = if v.is_finite() { v.abs() / age } else { 0.0 };
            self.last_sent[i] = selection.round as u32;
        }
        self.round = selection.round;
        Ok(())
    }
}

/// The coordinates kept in one round, ascending.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    /// The round.
    pub round: u64,
    /// Kept coordinates, strictly ascending.
    pub indices: Vec<u32>,
}

impl Selection {
    /// Number of kept coordinates (the plaintext length each client encrypts).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether nothing is kept (never, for a computed selection).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// SplitMix64's finaliser: a keyed hash good enough for tie-breaking and exploration (the
/// seed is public; nothing here needs to be unpredictable).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One candidate of a layer's quota.
#[derive(Clone, Copy)]
struct Unit {
    priority: f64,
    key: u64,
    /// Element: the coordinate. Rank: pair index << 32 | component.
    id: u64,
}

/// The mask of round `round` (which must come after `history.round()`), with the round's
/// public `seed`.
pub fn select(
    layout: &Layout,
    config: &PruneConfig,
    history: &History,
    round: u64,
    seed: u64,
) -> Result<Selection, CodecError> {
    config.validate()?;
    CodecError::check_len("history", layout.len(), history.len())?;
    if round <= history.round || round > u32::MAX as u64 {
        return Err(CodecError::Round {
            expected_after: history.round,
            got: round,
        });
    }
    let round_key = mix(seed ^ mix(round));
    let priors = prior_rates(layout, history);
    let pending = |i: usize, prior: f64| -> f64 {
        let rate = match history.rate[i] {
            r if r >= 0.0 => r as f64,
            _ => prior,
        };
        rate * (round - history.last_sent[i] as u64) as f64
    };
    let mut indices = Vec::new();
    let mut units: Vec<Unit> = Vec::new();
    for layer in 0..layout.layers() {
        units.clear();
        for (p, spec) in layout.pairs().iter().enumerate() {
            if spec.layer != layer {
                continue;
            }
            let base = layout.offset(p);
            let (prior_a, prior_b) = priors[p];
            let b_start = base + spec.a_len();
            let prior = |i: usize| if i < b_start { prior_a } else { prior_b };
            match config.structure {
                Structure::Element => units.extend((base..base + spec.len()).map(|i| Unit {
                    priority: pending(i, prior(i)),
                    key: mix(round_key ^ i as u64),
                    id: i as u64,
                })),
                Structure::Rank => units.extend((0..spec.r).map(|j| {
                    let mut priority = 0.0;
                    layout.for_each_rank_coord(p, j, |i| priority += pending(i, prior(i)));
                    let id = ((p as u64) << 32) | j as u64;
                    Unit {
                        priority,
                        key: mix(round_key ^ mix(id ^ 1 << 63)),
                        id,
                    }
                })),
            }
        }
        if units.is_empty() {
            continue;
        }
        let rho = config.schedule.rho(layer, layout.layers());
        let keep = ((rho * units.len() as f64).round() as usize).clamp(1, units.len());
        let explore = ((config.explore * keep as f64).round() as usize).min(keep);
        let exploit = keep - explore;
        // Largest pending mass first; the keyed hash breaks ties.
        let by_priority = |a: &Unit, b: &Unit| {
            b.priority
                .total_cmp(&a.priority)
                .then_with(|| a.key.cmp(&b.key))
        };
        if exploit > 0 && exploit < units.len() {
            units.select_nth_unstable_by(exploit - 1, by_priority);
        }
        let rest = &mut units[exploit..];
        if explore > 0 && explore < rest.len() {
            rest.select_nth_unstable_by(explore - 1, |a, b| a.key.cmp(&b.key));
        }
        for u in &units[..keep] {
            match config.structure {
                Structure::Element => indices.push(u.id as u32),
                Structure::Rank => layout.for_each_rank_coord(
                    (u.id >> 32) as usize,
                    (u.id & 0xffff_ffff) as usize,
                    |i| indices.push(i as u32),
                ),
            }
        }
    }
    indices.sort_unstable();
    Ok(Selection { round, indices })
}

/// The rates assumed for coordinates never sent, per pair (A, B): the mean known rate of
/// the same tensor, else of the whole update, else 1. (A and B move at different speeds:
/// A does not move at all while B is still zero.)
fn prior_rates(layout: &Layout, history: &History) -> Vec<(f64, f64)> {
    let mean = |range: std::ops::Range<usize>| {
        history.rate[range]
            .iter()
            .filter(|&&r| r >= 0.0)
            .fold((0.0, 0usize), |(s, n), &r| (s + r as f64, n + 1))
    };
    let sums: Vec<[(f64, usize); 2]> = layout
        .pairs()
        .iter()
        .enumerate()
        .map(|(p, spec)| {
            let base = layout.offset(p);
            let b = base + spec.a_len();
            [mean(base..b), mean(b..base + spec.len())]
        })
        .collect();
    let (total, count) = sums
        .iter()
        .flatten()
        .fold((0.0, 0), |(s, n), &(ps, pn)| (s + ps, n + pn));
    let global = if count > 0 { total / count as f64 } else { 1.0 };
    let prior = |(s, n): (f64, usize)| if n > 0 { s / n as f64 } else { global };
    sums.iter().map(|&[a, b]| (prior(a), prior(b))).collect()
}
