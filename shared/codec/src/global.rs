//! The global adapter and the public selection history it was built with: the one place
//! where a round's mask is computed and a round's global update is decoded and applied, on
//! the host, on every device and in the quality experiment alike.

use crate::{
    CodecError, History, Layout, PruneConfig, Selection, decode_values, init_adapter, select,
};
use fedshield_crypto::encoding::FixedPoint;

/// The global adapter's values (in layout order) and the selection history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Global {
    values: Vec<f32>,
    history: History,
}

impl Global {
    /// The fleet's initial adapter for `seed` (identical on the host and every device), no
    /// round applied.
    pub fn initial(layout: &Layout, seed: u64) -> Self {
        Self::starting_from(init_adapter(layout, seed))
    }

    /// An adapter starting from `values`, no round applied.
    pub fn starting_from(values: Vec<f32>) -> Self {
        let history = History::new(values.len());
        Self { values, history }
    }

    /// An adapter and history received together (a fleet snapshot); their lengths must
    /// agree with `layout`.
    pub fn from_parts(
        layout: &Layout,
        values: Vec<f32>,
        history: History,
    ) -> Result<Self, CodecError> {
        CodecError::check_len("global adapter", layout.len(), values.len())?;
        CodecError::check_len("history", layout.len(), history.len())?;
        Ok(Self { values, history })
    }

    /// The values, in layout order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The selection history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The last round whose global update is applied (0: none).
    pub fn round(&self) -> u64 {
        self.history.round()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the adapter has no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The mask of round `round` (after [`Global::round`]) with the round's public seed.
    pub fn mask(
        &self,
        layout: &Layout,
        prune: &PruneConfig,
        round: u64,
        seed: u64,
    ) -> Result<Selection, CodecError> {
        CodecError::check_len("global adapter", layout.len(), self.values.len())?;
        select(layout, prune, &self.history, round, seed)
    }

    /// Applies round `selection.round`'s global update (`values` at `selection`) and records
    /// it in the history. Checked before anything changes: an update that does not fit
    /// leaves the adapter and the history as they were.
    pub fn apply(&mut self, selection: &Selection, values: &[f32]) -> Result<(), CodecError> {
        // The history checks lengths, round and indices before it changes (its length is
        // the adapter's by construction), so the adapter changes only when it does.
        self.history.observe(selection, values)?;
        crate::apply(&mut self.values, selection, values)
    }

    /// Decodes a round's aggregate (the decrypted or plain sums of the contributors'
    /// plaintexts and the sum of their weights) and applies it; returns the global
    /// update's values (what the host publishes).
    pub fn apply_sums(
        &mut self,
        selection: &Selection,
        sums: &[u64],
        encoding: &FixedPoint,
        total_weight: f64,
    ) -> Result<Vec<f32>, CodecError> {
        let values = decode_values(selection, sums, encoding, total_weight)?;
        self.apply(selection, &values)?;
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PairSpec, Schedule, Structure};

    fn layout() -> Layout {
        let pair = |layer: usize| PairSpec {
            name: format!("layers.{layer}.q_proj"),
            layer,
            r: 4,
            in_features: 8,
            out_features: 8,
            train_a: true,
        };
        Layout::new(vec![pair(0), pair(1)]).unwrap()
    }

    fn prune() -> PruneConfig {
        PruneConfig {
            schedule: Schedule::Uniform { rho: 0.25 },
            structure: Structure::Element,
            explore: 0.0,
        }
    }

    #[test]
    fn applying_a_round_changes_values_and_history_together() {
        let layout = layout();
        let mut g = Global::initial(&layout, 7);
        let before = g.values().to_vec();
        let mask = g.mask(&layout, &prune(), 1, 3).unwrap();
        let values: Vec<f32> = (0..mask.len()).map(|j| 0.5 + j as f32).collect();
        g.apply(&mask, &values).unwrap();
        assert_eq!(g.round(), 1);
        for (j, &i) in mask.indices.iter().enumerate() {
            assert_eq!(g.values()[i as usize], before[i as usize] + values[j]);
        }
        let changed = (0..g.len()).filter(|&i| g.values()[i] != before[i]).count();
        assert_eq!(changed, mask.len());
        // The next round's mask follows from the new history, identically for everyone.
        let again = Global::initial(&layout, 7);
        let mut twin = again.clone();
        twin.apply(&mask, &values).unwrap();
        assert_eq!(
            twin.mask(&layout, &prune(), 2, 3).unwrap(),
            g.mask(&layout, &prune(), 2, 3).unwrap()
        );
    }

    #[test]
    fn an_update_that_does_not_fit_changes_nothing() {
        let layout = layout();
        let mut g = Global::initial(&layout, 7);
        let mask = g.mask(&layout, &prune(), 1, 3).unwrap();
        let values = vec![1.0; mask.len()];
        let pristine = g.clone();
        // Wrong number of values.
        assert!(matches!(
            g.apply(&mask, &values[1..]),
            Err(CodecError::Length { .. })
        ));
        // An index beyond the layout.
        let mut wide = mask.clone();
        wide.indices.push(layout.len() as u32 + 5);
        assert!(
            g.apply(&wide, &[values.clone(), vec![1.0]].concat())
                .is_err()
        );
        assert_eq!(g, pristine);
        g.apply(&mask, &values).unwrap();
        let applied = g.clone();
        // The same round twice, or an earlier one.
        assert!(matches!(
            g.apply(&mask, &values),
            Err(CodecError::Round { .. })
        ));
        assert_eq!(g, applied);
    }

    #[test]
    fn sums_decode_to_the_weighted_mean_before_applying() {
        let layout = layout();
        let mut g = Global::starting_from(vec![0.0; layout.len()]);
        let mask = g.mask(&layout, &prune(), 1, 1).unwrap();
        let encoding = FixedPoint::new(1.0).unwrap();
        let a: Vec<f32> = (0..mask.len()).map(|j| 0.01 * j as f32).collect();
        let mut half = vec![0u64; a.len()];
        encoding.encode_weighted(&a, 0.5, &mut half).unwrap();
        let sums: Vec<u64> = half.iter().map(|x| x.wrapping_add(*x)).collect();
        let values = g.apply_sums(&mask, &sums, &encoding, 1.0).unwrap();
        for (v, x) in values.iter().zip(&a) {
            assert!((v - x).abs() < 1e-6, "{v} vs {x}");
        }
        assert!(g.apply_sums(&mask, &sums, &encoding, 0.0).is_err());
        let short = Global::starting_from(vec![0.0; 3]);
        assert!(short.mask(&layout, &prune(), 1, 1).is_err());
        assert!(Global::from_parts(&layout, vec![0.0; 3], History::new(3)).is_err());
    }
}
