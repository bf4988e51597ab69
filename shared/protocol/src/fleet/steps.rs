//! Local steps per device from what each device reports about itself (its measured seconds
//! per step, whether it is in a critical state), so that the slowest device the host keeps
//! still finishes before the round's upload deadline.
//!
//! The rule: a device in a critical state (thermal pause, memory below its smallest plan)
//! is left out; a device of unknown speed trains the configured steps, as before; any other
//! trains `min(configured, floor(train_seconds / seconds_per_step))` steps, and is left out
//! when that is below `min_steps` (it could not contribute enough to be worth its upload).
//!
//! Update weights: devices that train different numbers of steps make plain FedAvg favour
//! the ones that trained more (the objective inconsistency FedNova corrects, Wang et al.,
//! NeurIPS 2020). The FedAvg weights stay the signed sample-count weights; each device
//! scales its own delta by `tau_eff / tau_i` ([`normalisation`]) before encrypting it, where
//! `tau_eff` is the weighted mean of the assigned steps ([`StepPlan::effective_steps`]),
//! public with the round. The aggregate is then `tau_eff` times the weighted mean of the
//! per-step updates, and equals plain FedAvg when every device trains the same steps.

use fedshield_crypto::identity::DeviceId;
use std::collections::BTreeMap;

/// What a device reports about itself when it joins.
#[derive(Debug, Clone, PartialEq)]
pub struct Capability {
    /// Seconds per local step of its chosen plan, as measured (`None`: not measured yet).
    pub seconds_per_step: Option<f64>,
    /// It reports a critical state and should sit the round out.
    pub critical: bool,
}

/// The host's rule for local steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRule {
    /// The configured local steps (the most any device trains).
    pub steps: usize,
    /// Fewer steps than this and a device is left out.
    pub min_steps: usize,
    /// Seconds of the upload window left for training (the window minus the encryption and
    /// upload time the host allows for).
    pub train_seconds: f64,
}

/// Why a device is left out of a round.
#[derive(Debug, Clone, PartialEq)]
pub enum LeftOut {
    /// It reported a critical state.
    Critical,
    /// It could train only `can_do` steps in the time.
    TooSlow {
        /// Its reported seconds per step.
        seconds_per_step: f64,
        /// Steps it could train.
        can_do: usize,
    },
}

/// A device's part in the round.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    /// Trains this many local steps.
    Train {
        /// Steps.
        steps: usize,
    },
    /// Sits the round out.
    LeftOut(LeftOut),
}

/// The round's assignments.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// Per device.
    pub assignments: BTreeMap<DeviceId, Assignment>,
    /// The FedAvg-weighted mean of the kept devices' steps (`tau_eff`); 0 when none is kept.
    pub effective_steps: f64,
}

impl StepPlan {
    /// The devices that train.
    pub fn kept(&self) -> impl Iterator<Item = (&DeviceId, usize)> {
        self.assignments.iter().filter_map(|(d, a)| match a {
            Assignment::Train { steps } => Some((d, *steps)),
            Assignment::LeftOut(_) => None,
        })
    }
}

impl StepRule {
    /// Refuses a rule that cannot work.
    pub fn check(&self) -> Result<(), String> {
        if self.steps == 0 || self.min_steps == 0 || self.min_steps > self.steps {
            return Err(format!(
                "local steps {} with a minimum of {}: need 1 <= minimum <= steps",
                self.steps, self.min_steps
            ));
        }
        if !(self.train_seconds.is_finite() && self.train_seconds > 0.0) {
            return Err(format!(
                "{} s for training: need a positive time",
                self.train_seconds
            ));
        }
        Ok(())
    }

    /// The steps of each device of `devices` (its capability and FedAvg weight). A
    /// reported speed that is not a positive finite number counts as unknown.
    pub fn plan(&self, devices: &BTreeMap<DeviceId, (Capability, f64)>) -> StepPlan {
        let assignments: BTreeMap<DeviceId, Assignment> = devices
            .iter()
            .map(|(id, (cap, _))| (id.clone(), self.assign(cap)))
            .collect();
        let (mut weighted, mut total) = (0.0, 0.0);
        for (id, (_, weight)) in devices {
            if let Some(Assignment::Train { steps }) = assignments.get(id) {
                weighted += weight * *steps as f64;
                total += weight;
            }
        }
        StepPlan {
            assignments,
            effective_steps: if total > 0.0 { weighted / total } else { 0.0 },
        }
    }

    fn assign(&self, cap: &Capability) -> Assignment {
        if cap.critical {
            return Assignment::LeftOut(LeftOut::Critical);
        }
        let Some(sps) = cap.seconds_per_step.filter(|s| s.is_finite() && *s > 0.0) else {
            return Assignment::Train { steps: self.steps };
        };
        let can_do = (self.train_seconds / sps).floor().min(self.steps as f64) as usize;
        if can_do < self.min_steps {
            Assignment::LeftOut(LeftOut::TooSlow {
                seconds_per_step: sps,
                can_do,
            })
        } else {
            Assignment::Train { steps: can_do }
        }
    }
}

/// The factor a device that trained `steps` local steps scales its delta by before
/// encrypting it: `effective_steps / steps` (1 when every device trains the same steps).
pub fn normalisation(effective_steps: f64, steps: usize) -> f64 {
    if steps == 0 {
        return 0.0;
    }
    effective_steps / steps as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId(s.into())
    }

    fn cap(sps: Option<f64>, critical: bool) -> Capability {
        Capability {
            seconds_per_step: sps,
            critical,
        }
    }

    #[test]
    fn a_mixed_fleet_gets_steps_that_fit_the_window() {
        let rule = StepRule {
            steps: 40,
            min_steps: 4,
            train_seconds: 60.0,
        };
        rule.check().unwrap();
        let fleet: BTreeMap<DeviceId, (Capability, f64)> = [
            ("agx-orin", cap(Some(0.5), false), 0.2),
            ("orin-nano", cap(Some(2.0), false), 0.2),
            ("jetson-nano", cap(Some(9.0), false), 0.2),
            ("too-slow", cap(Some(20.0), false), 0.1),
            ("hot", cap(Some(1.0), true), 0.1),
            ("new", cap(None, false), 0.1),
            ("garbled", cap(Some(f64::NAN), false), 0.1),
        ]
        .into_iter()
        .map(|(n, c, w)| (id(n), (c, w)))
        .collect();
        let plan = rule.plan(&fleet);
        let a = |n: &str| plan.assignments[&id(n)].clone();
        assert_eq!(a("agx-orin"), Assignment::Train { steps: 40 });
        assert_eq!(a("orin-nano"), Assignment::Train { steps: 30 });
        assert_eq!(a("jetson-nano"), Assignment::Train { steps: 6 });
        assert_eq!(
            a("too-slow"),
            Assignment::LeftOut(LeftOut::TooSlow {
                seconds_per_step: 20.0,
                can_do: 3
            })
        );
        assert_eq!(a("hot"), Assignment::LeftOut(LeftOut::Critical));
        assert_eq!(a("new"), Assignment::Train { steps: 40 });
        assert_eq!(a("garbled"), Assignment::Train { steps: 40 });
        // The slowest kept device (the Jetson Nano) finishes within the window.
        for (d, steps) in plan.kept() {
            if let Some(sps) = fleet[d].0.seconds_per_step.filter(|s| s.is_finite()) {
                assert!(steps as f64 * sps <= rule.train_seconds, "{d}");
            }
        }
        // tau_eff over the kept devices: (0.2*40 + 0.2*30 + 0.2*6 + 0.1*40 + 0.1*40) / 0.8.
        let tau = (8.0 + 6.0 + 1.2 + 4.0 + 4.0) / 0.8;
        assert!((plan.effective_steps - tau).abs() < 1e-12);
        assert!((normalisation(tau, 6) - tau / 6.0).abs() < 1e-12);
    }

    #[test]
    fn equal_steps_leave_fedavg_as_it_was_and_bad_rules_are_refused() {
        let rule = StepRule {
            steps: 3,
            min_steps: 1,
            train_seconds: 100.0,
        };
        let fleet: BTreeMap<_, _> = (0..3)
            .map(|i| (id(&format!("d{i}")), (cap(Some(1.0), false), 1.0 / 3.0)))
            .collect();
        let plan = rule.plan(&fleet);
        assert!((plan.effective_steps - 3.0).abs() < 1e-12);
        assert_eq!(normalisation(plan.effective_steps, 3), 1.0);
        // Nobody kept: no steps, and nothing to scale.
        let all_hot: BTreeMap<_, _> = [(id("x"), (cap(Some(1.0), true), 1.0))].into();
        assert_eq!(rule.plan(&all_hot).effective_steps, 0.0);
        assert_eq!(normalisation(0.0, 0), 0.0);
        for bad in [
            StepRule {
                steps: 0,
                ..rule.clone()
            },
            StepRule {
                min_steps: 4,
                ..rule.clone()
            },
            StepRule {
                train_seconds: f64::INFINITY,
                ..rule.clone()
            },
            StepRule {
                train_seconds: -1.0,
                ..rule.clone()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
