//! Fixed-point encoding of real-valued updates into the plaintext space Z/2^64.
//!
//! A value x is clipped to [-clip, clip], multiplied by the client's public weight w (its
//! share of the round's samples, so that the sum over clients is the weighted mean) and
//! scaled so that `clip` maps to 2^`scale_log2`. Because the weights of the contributors sum
//! to at most 1, every partial sum stays in [-2^scale_log2, 2^scale_log2] and never wraps
//! when `scale_log2` <= 62. The bits below the scale absorb the encryption noise and the
//! body rounding (SECURITY.md, "Noise and rounding budget").

use crate::CryptoError;

/// Default position of the clip value: 2^60 leaves 3 bits of headroom above the largest
/// possible weighted mean and 60 bits of precision below it.
pub const DEFAULT_SCALE_LOG2: u32 = 60;

/// A fixed-point encoding.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FixedPoint {
    /// Values are clipped to [-clip, clip] before encoding.
    pub clip: f32,
    /// `clip` maps to 2^scale_log2.
    pub scale_log2: u32,
}

impl FixedPoint {
    /// An encoding with the given clip value and [`DEFAULT_SCALE_LOG2`].
    pub fn new(clip: f32) -> Result<Self, CryptoError> {
        Self::with_scale(clip, DEFAULT_SCALE_LOG2)
    }

    /// An encoding with an explicit scale.
    pub fn with_scale(clip: f32, scale_log2: u32) -> Result<Self, CryptoError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(CryptoError::InvalidParameter(format!(
                "clip must be finite and positive, got {clip}"
            )));
        }
        if !(8..=62).contains(&scale_log2) {
            return Err(CryptoError::InvalidParameter(format!(
                "scale_log2 must be in 8..=62, got {scale_log2}"
            )));
        }
        Ok(Self { clip, scale_log2 })
    }

    /// Size of one unit in the last place, in value units.
    pub fn ulp(&self) -> f64 {
        self.clip as f64 / (1u64 << self.scale_log2) as f64
    }

    /// Encodes `values` with the client's `weight` (in (0, 1]) into `out`.
    pub fn encode_weighted(
        &self,
        values: &[f32],
        weight: f64,
        out: &mut [u64],
    ) -> Result<(), CryptoError> {
        if !(weight > 0.0 && weight <= 1.0) {
            return Err(CryptoError::InvalidParameter(format!(
                "weight must be in (0, 1], got {weight}"
            )));
        }
        if values.len() != out.len() {
            return Err(CryptoError::LengthMismatch {
                what: "encode output",
                expected: values.len(),
                got: out.len(),
            });
        }
        let factor = weight * (1u64 << self.scale_log2) as f64 / self.clip as f64;
        let clip = self.clip as f64;
        for (o, &x) in out.iter_mut().zip(values) {
            // NaN clips to 0: a broken client cannot poison the aggregate with it.
            let x = if x.is_nan() {
                0.0
            } else {
                (x as f64).clamp(-clip, clip)
            };
            *o = ((x * factor).round() as i64) as u64;
        }
        Ok(())
    }

    /// The unweighted value one client's plaintext `p`, encoded with `weight`, stands for
    /// (what the client actually sent, after clipping and rounding).
    pub fn value_of(&self, p: u64, weight: f64) -> f64 {
        (p as i64) as f64 * self.ulp() / weight
    }

    /// Decodes a sum of weighted encodings, dividing by the total weight that contributed.
    pub fn decode_sum(&self, sums: &[u64], total_weight: f64) -> Vec<f32> {
        let factor = self.ulp() / total_weight;
        sums.iter()
            .map(|&s| ((s as i64) as f64 * factor) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_decodes_to_weighted_mean() {
        let fp = FixedPoint::new(1.0).unwrap();
        let a = [0.5f32, -1.0, 2.0, f32::NAN];
        let b = [0.25f32, 1.0, -0.5, 0.0];
        let (wa, wb) = (0.75, 0.25);
        let mut ea = [0u64; 4];
        let mut eb = [0u64; 4];
        fp.encode_weighted(&a, wa, &mut ea).unwrap();
        fp.encode_weighted(&b, wb, &mut eb).unwrap();
        let sum: Vec<u64> = ea
            .iter()
            .zip(&eb)
            .map(|(x, y)| x.wrapping_add(*y))
            .collect();
        let got = fp.decode_sum(&sum, 1.0);
        // 2.0 clips to 1.0; NaN encodes as 0.
        let want = [0.4375f32, -0.5, 0.625, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(FixedPoint::new(0.0).is_err());
        assert!(FixedPoint::with_scale(1.0, 63).is_err());
        let fp = FixedPoint::new(1.0).unwrap();
        assert!(fp.encode_weighted(&[1.0], 1.5, &mut [0]).is_err());
        assert!(fp.encode_weighted(&[1.0], 0.5, &mut [0, 0]).is_err());
    }
}
