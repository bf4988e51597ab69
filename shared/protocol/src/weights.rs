//! The FedAvg weights of a round, as every member computes them from the signed roster.
//!
//! Each device's sample count travels inside its signed secure-aggregation advert
//! (`Advert::weight`), and the roster the host broadcasts carries every member's signed
//! advert. So every device recomputes all members' weights from the roster with
//! [`fedavg_weights`] and refuses ([`check_announced`]) a round whose announced weights are
//! not exactly these: a host cannot give one member weight 1 and the others next to nothing,
//! which would make a valid aggregate of t members decrypt to that one member's update.
//!
//! The rule (SECURITY.md, "FedAvg weights"): a claim `s_i` is valid in `1..=MAX_SAMPLES`;
//! each claim is capped at [`MAX_WEIGHT_RATIO`] times the smallest claim of the roster,
//! `e_i = min(s_i, R * min_j s_j)`, and `w_i = e_i / sum_j e_j`. Hence no member's weight is
//! more than `R` times another's, and every member's weight is at least
//! [`weight_floor`]`(n) = 1 / (1 + (n - 1) R)`. A device that lies about its own count can
//! move its weight only within that ratio (at most `R / (R + n - 1)`), and its contribution
//! stays bounded by the clip times that weight; it can never shrink another member's weight
//! below the floor.

use crate::ProtocolError;
use fedshield_crypto::identity::DeviceId;
use fedshield_crypto::secagg::{ClientBody, Roster};

/// The largest sample count a device may claim.
pub const MAX_SAMPLES: u64 = 1 << 40;

/// No member's FedAvg weight is more than this many times another member's.
pub const MAX_WEIGHT_RATIO: u64 = 16;

/// Relative difference between an announced and a computed weight that counts as rounding.
/// Host and devices compute the same f64 operations on the same integers, so the weights
/// agree exactly; the tolerance only absorbs a host built with another float library.
pub const WEIGHT_TOLERANCE: f64 = 1e-9;

/// Why a round's weights were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightRefusal {
    /// A member's signed claim is outside `1..=MAX_SAMPLES`.
    #[error("{member} claims {samples} samples (valid: 1 to {MAX_SAMPLES})")]
    ClaimOutOfRange {
        /// The member.
        member: DeviceId,
        /// Its claim.
        samples: u64,
    },
    /// A roster entry that is not an advert (no claim to compute from).
    #[error("roster entry of {0} carries no advert")]
    NoClaim(DeviceId),
    /// The announced weights name other devices than the roster.
    #[error("weights announced for {announced:?}, the roster is {roster:?}")]
    Members {
        /// Who the weights name.
        announced: Vec<DeviceId>,
        /// Who the roster names.
        roster: Vec<DeviceId>,
    },
    /// An announced weight that is not the one the signed claims give.
    #[error(
        "{member}'s announced weight {announced} is not {computed}, its share of the signed sample counts"
    )]
    Mismatch {
        /// The member.
        member: DeviceId,
        /// What the host announced.
        announced: f64,
        /// What the signed claims give.
        computed: f64,
    },
    /// An announced weight below the floor of the roster's size.
    #[error("{member}'s announced weight {weight} is below the floor {floor}")]
    BelowFloor {
        /// The member.
        member: DeviceId,
        /// Its announced weight.
        weight: f64,
        /// The floor.
        floor: f64,
    },
}

/// The smallest weight a member of a roster of `n` can have: `1 / (1 + (n - 1) R)`.
pub fn weight_floor(n: usize) -> f64 {
    1.0 / (1.0 + (n.saturating_sub(1) as f64) * MAX_WEIGHT_RATIO as f64)
}

/// Checks one claimed sample count.
pub fn check_claim(member: &DeviceId, samples: u64) -> Result<(), WeightRefusal> {
    if samples == 0 || samples > MAX_SAMPLES {
        return Err(WeightRefusal::ClaimOutOfRange {
            member: member.clone(),
            samples,
        });
    }
    Ok(())
}

/// The weights of `claims` (member, signed sample count): capped at [`MAX_WEIGHT_RATIO`]
/// times the smallest claim, then normalised; in the claims' order.
pub fn weights_of(claims: &[(DeviceId, u64)]) -> Result<Vec<(DeviceId, f64)>, WeightRefusal> {
    for (member, samples) in claims {
        check_claim(member, *samples)?;
    }
    let Some(smallest) = claims.iter().map(|(_, s)| *s).min() else {
        return Ok(Vec::new());
    };
    // At most 2^40 * 16 each and at most ~2^20 members: the sum fits in u64 (and is exact
    // in f64 up to 2^53, far above any real fleet's total).
    let cap = smallest.saturating_mul(MAX_WEIGHT_RATIO);
    let effective: Vec<u64> = claims.iter().map(|(_, s)| (*s).min(cap)).collect();
    let total: u64 = effective.iter().sum();
    Ok(claims
        .iter()
        .zip(effective)
        .map(|((member, _), e)| (member.clone(), e as f64 / total as f64))
        .collect())
}

/// The weights of every member of `roster`, from the sample counts in their signed adverts
/// (the caller has checked the adverts' signatures: `secagg::Client::on_roster` does).
pub fn fedavg_weights(roster: &Roster) -> Result<Vec<(DeviceId, f64)>, WeightRefusal> {
    let claims = roster
        .entries
        .iter()
        .map(|e| match &e.advert.body {
            ClientBody::Advertise(a) => Ok((e.advert.sender.clone(), a.weight)),
            _ => Err(WeightRefusal::NoClaim(e.advert.sender.clone())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    weights_of(&claims)
}

/// Checks the weights a host announced with `roster`; returns the weights computed from the
/// signed claims, which are the ones a device encodes with (never the announced ones).
pub fn check_announced(
    roster: &Roster,
    announced: &[(DeviceId, f64)],
) -> Result<Vec<(DeviceId, f64)>, ProtocolError> {
    let computed = fedavg_weights(roster)?;
    let names = |w: &[(DeviceId, f64)]| w.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>();
    let (mut a, mut c) = (names(announced), names(&computed));
    a.sort();
    c.sort();
    if a != c {
        return Err(WeightRefusal::Members {
            announced: names(announced),
            roster: names(&computed),
        }
        .into());
    }
    let floor = weight_floor(computed.len());
    for (member, weight) in announced {
        let want = computed
            .iter()
            .find(|(d, _)| d == member)
            .map(|(_, w)| *w)
            .expect("same members");
        if !weight.is_finite() || (weight - want).abs() > WEIGHT_TOLERANCE * want {
            return Err(WeightRefusal::Mismatch {
                member: member.clone(),
                announced: *weight,
                computed: want,
            }
            .into());
        }
        // Implied by the rule; checked on its own so that the floor holds even if the rule
        // above ever changes.
        if *weight < floor * (1.0 - WEIGHT_TOLERANCE) {
            return Err(WeightRefusal::BelowFloor {
                member: member.clone(),
                weight: *weight,
                floor,
            }
            .into());
        }
    }
    Ok(computed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(counts: &[u64]) -> Vec<(DeviceId, u64)> {
        counts
            .iter()
            .enumerate()
            .map(|(i, &s)| (DeviceId(format!("d{i}")), s))
            .collect()
    }

    #[test]
    fn weights_are_sample_shares_within_the_ratio() {
        let w = weights_of(&claims(&[10, 20, 30])).unwrap();
        let values: Vec<f64> = w.iter().map(|(_, w)| *w).collect();
        assert_eq!(values, [10.0 / 60.0, 20.0 / 60.0, 30.0 / 60.0]);
        // A claim of 2^40 against 1 and 1 is capped at 16: 16/18, and the others 1/18.
        let w = weights_of(&claims(&[MAX_SAMPLES, 1, 1])).unwrap();
        assert_eq!(w[0].1, 16.0 / 18.0);
        assert_eq!(w[1].1, 1.0 / 18.0);
        // The floor is reached when every other member claims the most.
        let w = weights_of(&claims(&[MAX_SAMPLES, MAX_SAMPLES, 1])).unwrap();
        assert_eq!(w[2].1, weight_floor(3));
        assert_eq!(weight_floor(3), 1.0 / 33.0);
        assert!(weights_of(&claims(&[0, 5])).is_err());
        assert!(weights_of(&claims(&[MAX_SAMPLES + 1, 5])).is_err());
    }

    #[test]
    fn the_floor_holds_for_any_claims() {
        // Whatever the claims, no weight is below the floor nor above R times another.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for n in 1..40usize {
            let counts: Vec<u64> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    1 + x % (1 << (x % 41))
                })
                .collect();
            let w = weights_of(&claims(&counts)).unwrap();
            let (lo, hi) = w.iter().fold((1.0f64, 0.0f64), |(lo, hi), (_, w)| {
                (lo.min(*w), hi.max(*w))
            });
            assert!(lo >= weight_floor(n) * (1.0 - 1e-12), "n {n}: {lo}");
            assert!(hi <= lo * MAX_WEIGHT_RATIO as f64 * (1.0 + 1e-12));
            let sum: f64 = w.iter().map(|(_, w)| w).sum();
            assert!((sum - 1.0).abs() < 1e-12);
        }
    }
}
