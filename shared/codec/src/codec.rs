//! From a client's LoRA delta to the plaintexts it encrypts, and from the decrypted sums back
//! to the global update. The same functions serve the plaintext baseline (which sums the
//! plaintexts without encrypting them), so that any difference between the two is the
//! encryption's alone.
//!
//! Error budget of one coordinate of the global update (weights w_k summing to W):
//! clipping moves nothing out of the system (the clipped excess stays in the client's
//! residual); fixed-point rounding costs at most half an ulp of `clip * w_k / 2^scale_log2`
//! per client, i.e. at most `clip * 2^-(scale_log2 + 1) * n / W` after dividing by W (the
//! residual also keeps this); encryption adds the body rounding, at most 2^(63 - body_bits)
//! units of 2^-64 of the modulus per client, i.e. `clip * 2^(63 - body_bits - scale_log2) *
//! n / W` in value units (the residual keeps this too, through [`Prepared::record_delivery`],
//! so it only delays that part of the update), and the encryption noise, `n * 2^17` units,
//! which is the one error nothing compensates (SECURITY.md, "Noise and rounding budget").

use crate::CodecError;
use crate::select::Selection;
use fedshield_crypto::encoding::FixedPoint;

/// A client's error-feedback memory: the part of its past deltas not yet delivered to the
/// global model. Kept across rounds (and persisted by the edge).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

/// A prepared upload. The residual changes only when the client learns the round's outcome
/// ([`ErrorFeedback::settle`]): if its update counted, the residual keeps what was not
/// sent; if the round went on without it (dropped, late, refused), everything is kept.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prepared {
    /// The fixed-point plaintexts to encrypt (or to sum in the plaintext baseline), one per
    /// selected coordinate.
    pub plaintexts: Vec<u64>,
    /// Selected coordinates whose value was clipped.
    pub clipped: usize,
    round: u64,
    /// Delta plus residual, the whole vector.
    carried: Vec<f32>,
    /// The value each plaintext stands for, unweighted.
    sent: Vec<f32>,
    indices: Vec<u32>,
}

impl Prepared {
    /// The round this upload is for.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Records what the encryption actually delivers for each plaintext (the plaintext plus
    /// the ciphertext body's rounding: `fedshield_crypto::packed::Encryptor::encrypt_chunk`),
    /// so that the rounding of narrow bodies, like the clipping and the fixed-point rounding,
    /// stays in the residual and reaches the global model in a later round. `encoding` and
    /// `weight` must be those of [`ErrorFeedback::prepare`].
    pub fn record_delivery(
        &mut self,
        delivered: &[u64],
        encoding: &FixedPoint,
        weight: f64,
    ) -> Result<(), CodecError> {
        CodecError::check_len("delivered values", self.sent.len(), delivered.len())?;
        for (s, &d) in self.sent.iter_mut().zip(delivered) {
            *s = encoding.value_of(d, weight) as f32;
        }
        Ok(())
    }

    /// Squared L2 norm of what is sent and of what stays behind, for logs.
    pub fn norms(&self) -> (f64, f64) {
        let sent: f64 = self.sent.iter().map(|&v| (v as f64).powi(2)).sum();
        let total: f64 = self.carried.iter().map(|&v| (v as f64).powi(2)).sum();
        (sent, (total - sent).max(0.0))
    }
}

impl ErrorFeedback {
    /// An empty residual for updates of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            residual: vec![0.0; len],
        }
    }

    /// The residual.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes `delta` (local minus global, in layout order) plus the residual at the
    /// selected coordinates, clipped to the encoding's range, with the client's `weight`.
    pub fn prepare(
        &self,
        delta: &[f32],
        selection: &Selection,
        encoding: &FixedPoint,
        weight: f64,
    ) -> Result<Prepared, CodecError> {
        CodecError::check_len("delta", self.residual.len(), delta.len())?;
        if selection
            .indices
            .last()
            .is_some_and(|&i| i as usize >= delta.len())
        {
            return Err(CodecError::Config(
                "selection index beyond the layout".into(),
            ));
        }
        // A non-finite delta coordinate (a diverged step) is dropped, not carried: carrying
        // it would poison every later round of this client.
        let carried: Vec<f32> = delta
            .iter()
            .zip(&self.residual)
            .map(|(&d, &r)| if d.is_finite() { d + r } else { r })
            .collect();
        let values: Vec<f32> = selection
            .indices
            .iter()
            .map(|&i| carried[i as usize])
            .collect();
        let clip = encoding.clip;
        let clipped = values.iter().filter(|v| v.abs() > clip).count();
        let mut plaintexts = vec![0u64; values.len()];
        encoding.encode_weighted(&values, weight, &mut plaintexts)?;
        let sent = plaintexts
            .iter()
            .map(|&p| encoding.value_of(p, weight) as f32)
            .collect();
        Ok(Prepared {
            plaintexts,
            clipped,
            round: selection.round,
            carried,
            sent,
            indices: selection.indices.clone(),
        })
    }

    /// Applies the outcome of the round `prepared` was for: `counted` when the client's
    /// update is in the published aggregate.
    pub fn settle(&mut self, prepared: Prepared, counted: bool) {
        let mut residual = prepared.carried;
        if counted {
            for (&i, &s) in prepared.indices.iter().zip(&prepared.sent) {
                residual[i as usize] -= s;
            }
        }
        self.residual = residual;
    }
}

/// The global update's values at the selected coordinates, from the decrypted (or plain)
/// sums of the contributors' plaintexts and the sum of their weights.
pub fn decode_values(
    selection: &Selection,
    sums: &[u64],
    encoding: &FixedPoint,
    total_weight: f64,
) -> Result<Vec<f32>, CodecError> {
    CodecError::check_len("aggregate", selection.len(), sums.len())?;
    if !(total_weight > 0.0 && total_weight.is_finite()) {
        return Err(CodecError::Config(format!(
            "total weight must be positive, got {total_weight}"
        )));
    }
    Ok(encoding.decode_sum(sums, total_weight))
}

/// Adds a sparse update (`values` at `selection`) to a dense vector.
pub fn apply(dense: &mut [f32], selection: &Selection, values: &[f32]) -> Result<(), CodecError> {
    CodecError::check_len("update values", selection.len(), values.len())?;
    if selection
        .indices
        .last()
        .is_some_and(|&i| i as usize >= dense.len())
    {
        return Err(CodecError::Config(
            "selection index beyond the layout".into(),
        ));
    }
    for (&i, &v) in selection.indices.iter().zip(values) {
        dense[i as usize] += v;
    }
    Ok(())
}

/// The plaintext baseline's aggregate: wrapping sums of the clients' plaintexts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainSum {
    sums: Vec<u64>,
    contributions: usize,
}

impl PlainSum {
    /// An empty sum of `len` plaintexts.
    pub fn new(len: usize) -> Self {
        Self {
            sums: vec![0; len],
            contributions: 0,
        }
    }

    /// Adds one client's plaintexts.
    pub fn add(&mut self, plaintexts: &[u64]) -> Result<(), CodecError> {
        CodecError::check_len("plaintexts", self.sums.len(), plaintexts.len())?;
        for (s, &p) in self.sums.iter_mut().zip(plaintexts) {
            *s = s.wrapping_add(p);
        }
        self.contributions += 1;
        Ok(())
    }

    /// The sums.
    pub fn sums(&self) -> &[u64] {
        &self.sums
    }

    /// Clients added.
    pub fn contributions(&self) -> usize {
        self.contributions
    }
}
