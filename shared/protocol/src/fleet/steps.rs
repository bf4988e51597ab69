//! Capability-aware rounds: what each device says about itself when it joins
//! ([`DeviceStatus`]: its training plan, measured speed, memory budget, power mode and
//! thermal state), the host's rule for each device's local steps ([`StepRule`]), the
//! round's public step plan ([`RoundPlan`]) and what each device reports of its training
//! afterwards ([`Effort`]: steps, tokens, throttling and energy).
//!
//! The rule: a device that reports a critical state (a thermal zone at or past its passive
//! trip point) is left out; a device of unknown speed (its first round) trains the
//! configured steps; any other trains `min(configured, floor(train_seconds /
//! seconds_per_step))` steps, and is left out when that is below the round's
//! `min_local_steps` (it could not contribute enough to be worth its upload). The slowest
//! device kept therefore finishes within `train_seconds` at its reported pace, and every
//! device also stops at `train_seconds` by its own clock (the deadline-aware stop): it
//! uploads the steps it has instead of missing the round.
//!
//! Update weights: devices that train different numbers of steps make plain FedAvg favour
//! the ones that trained more (the objective inconsistency FedNova corrects, Wang et al.,
//! NeurIPS 2020). The FedAvg weights stay the signed sample-count weights; each device
//! scales its own delta by `tau_eff / tau_i` ([`normalisation`], `tau_i` the steps it
//! actually trained) before encrypting it, where `tau_eff` is the FedAvg-weighted mean of
//! the assigned steps ([`effective_steps`]), public with the round and recomputed by every
//! member. The aggregate is then `tau_eff` times the weighted mean of the per-step updates,
//! and is plain FedAvg, bit for bit, when every device trains the same steps.

use crate::signed::{MAX_REPORTED_SECONDS, ReportRefusal, check_value};
use fedshield_crypto::identity::DeviceId;
use std::collections::BTreeMap;

/// Longest text a status may carry (plan, power mode, zone, reason), in bytes.
pub const MAX_STATUS_TEXT: usize = 128;

/// The share of the upload window a device may spend training (the rest is for
/// encryption, the upload and clock differences).
pub const TRAIN_SHARE: f64 = 0.5;

/// The hottest thermal zone of a device, as it reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Thermal {
    /// The zone's type (`cpu-thermal`, `tj-therm`, ...).
    pub zone: String,
    /// Its temperature, in degrees Celsius.
    pub celsius: f64,
    /// Degrees below its passive trip point (negative: past it).
    pub headroom: f64,
}

/// What a device says about itself when it joins a round (signed with its join).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStatus {
    /// Its training plan (`fedshield_edge::plan::Plan`'s name).
    pub plan: Option<String>,
    /// The memory budget the plan was chosen for, in MiB.
    pub memory_budget_mib: Option<u64>,
    /// Training tokens per second in its last round.
    pub tokens_per_second: Option<f64>,
    /// Seconds per local step in its last round, throttling included.
    pub seconds_per_step: Option<f64>,
    /// The power mode by name (nvpmodel's).
    pub power_mode: Option<String>,
    /// The zone closest to its passive trip point.
    pub thermal: Option<Thermal>,
    /// Why it should sit the round out, when it should.
    pub critical: Option<String>,
}

fn check_text(what: &'static str, text: &Option<String>) -> Result<(), ReportRefusal> {
    match text {
        Some(t) if t.len() > MAX_STATUS_TEXT => Err(ReportRefusal::TextTooLong {
            what,
            len: t.len(),
            max: MAX_STATUS_TEXT,
        }),
        _ => Ok(()),
    }
}

fn check_between(what: &'static str, value: f64, low: f64, high: f64) -> Result<(), ReportRefusal> {
    if value.is_finite() && (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(ReportRefusal::OutOfInterval {
            what,
            value,
            low,
            high,
        })
    }
}

impl DeviceStatus {
    /// Refuses a status with an absurd value or an over-long text (the host records what
    /// it accepts in its metrics).
    pub fn check(&self) -> Result<(), ReportRefusal> {
        check_text("plan", &self.plan)?;
        check_text("power mode", &self.power_mode)?;
        check_text("critical state", &self.critical)?;
        if let Some(t) = &self.thermal {
            check_text("thermal zone", &Some(t.zone.clone()))?;
            check_between("temperature", t.celsius, -100.0, 300.0)?;
            check_between("thermal headroom", t.headroom, -400.0, 400.0)?;
        }
        if let Some(v) = self.tokens_per_second {
            check_value("tokens per second", v, 1e9)?;
        }
        if let Some(v) = self.seconds_per_step {
            check_value("seconds per step", v, MAX_REPORTED_SECONDS)?;
        }
        Ok(())
    }
}

/// Why a device's local training ended before its assigned steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stopped {
    /// The round's training time ran out (the deadline-aware stop).
    Deadline,
    /// The box stayed too hot for longer than the pacer waits.
    Paused,
}

/// What a device reports of its local training of a round (signed with its evaluation).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Effort {
    /// Steps assigned.
    pub assigned: u32,
    /// Steps trained.
    pub steps: u32,
    /// Tokens trained.
    pub tokens: u64,
    /// Seconds of training, throttling included.
    pub seconds: f64,
    /// Seconds slept or paused by the thermal and power governor.
    pub throttled_seconds: f64,
    /// Steps the governor slowed or paused.
    pub throttled_steps: u32,
    /// Energy drawn while training, integrated over the rails (`None`: the box has none).
    pub joules: Option<f64>,
    /// Why training ended early, when it did.
    pub stopped: Option<Stopped>,
}

impl Effort {
    /// Refuses absurd values.
    pub fn check(&self) -> Result<(), ReportRefusal> {
        check_value(
            "steps trained",
            f64::from(self.steps),
            f64::from(self.assigned),
        )?;
        check_value("tokens", self.tokens as f64, 1e12)?;
        check_value("training seconds", self.seconds, MAX_REPORTED_SECONDS)?;
        check_value(
            "throttled seconds",
            self.throttled_seconds,
            MAX_REPORTED_SECONDS,
        )?;
        if let Some(j) = self.joules {
            check_value("joules", j, 1e9)?;
        }
        Ok(())
    }

    /// Joules per trained token.
    pub fn joules_per_token(&self) -> Option<f64> {
        self.joules
            .filter(|_| self.tokens > 0)
            .map(|j| j / self.tokens as f64)
    }
}

/// The host's rule for local steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRule {
    /// The configured local steps (the most any device trains).
    pub steps: usize,
    /// Fewer steps than this and a device is left out.
    pub min_steps: usize,
    /// Seconds a device may train ([`TRAIN_SHARE`] of the upload window).
    pub train_seconds: f64,
}

/// Why a device is left out of a round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeftOut {
    /// It reported a critical state.
    Critical(String),
    /// It could train only `can_do` steps in the time.
    TooSlow {
        /// Its reported seconds per step.
        seconds_per_step: f64,
        /// Steps it could train.
        can_do: usize,
    },
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Critical(why) => write!(f, "critical: {why}"),
            Self::TooSlow {
                seconds_per_step,
                can_do,
            } => write!(
                f,
                "too slow: {seconds_per_step:.2} s per step, {can_do} steps in the round's time"
            ),
        }
    }
}

/// A device's part in the round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assignment {
    /// Trains this many local steps.
    Train {
        /// Steps.
        steps: usize,
    },
    /// Sits the round out.
    LeftOut(LeftOut),
}

/// A device's status as it joined a round, and its part in the round (the host's
/// metrics keep both).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRound {
    /// What it reported.
    pub status: DeviceStatus,
    /// What the host gave it.
    pub assignment: Assignment,
}

/// A member's local training of a round, from the roster's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Steps to train.
    pub steps: usize,
    /// The round's `tau_eff` (see [`normalisation`]).
    pub effective_steps: f64,
    /// Seconds it may train, by its own clock (it uploads what it has then).
    pub train_seconds: f64,
}

/// The round's public step plan, broadcast with its roster.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundPlan {
    /// Each member's local steps.
    pub steps: Vec<(DeviceId, usize)>,
    /// The FedAvg-weighted mean of the members' steps ([`effective_steps`]).
    pub effective_steps: f64,
    /// Seconds each member may train (by its own clock, from the roster).
    pub train_seconds: f64,
    /// Devices that joined and were left out, with why.
    pub left_out: Vec<(DeviceId, LeftOut)>,
}

impl RoundPlan {
    /// `me`'s steps and the round's `tau_eff`, checked against the weights this device
    /// verified (`weights`) and the round's configured `local_steps`: every member must be
    /// given between 1 and `local_steps` steps, and `effective_steps` must be the weighted
    /// mean of them.
    pub fn check(
        &self,
        me: &DeviceId,
        weights: &[(DeviceId, f64)],
        local_steps: usize,
    ) -> Result<(usize, f64), String> {
        let steps: BTreeMap<&DeviceId, usize> = self.steps.iter().map(|(d, s)| (d, *s)).collect();
        if steps.len() != weights.len() || weights.iter().any(|(d, _)| !steps.contains_key(d)) {
            return Err("the step plan does not name exactly the roster's members".into());
        }
        if let Some((d, s)) = self
            .steps
            .iter()
            .find(|(_, s)| !(1..=local_steps).contains(s))
        {
            return Err(format!("{d} is given {s} steps, outside 1..={local_steps}"));
        }
        let tau = effective_steps(weights, &self.steps);
        if (tau - self.effective_steps).abs() > 1e-9 * tau.max(1.0) {
            return Err(format!(
                "the plan's effective steps {} are not the weighted mean {tau} of its steps",
                self.effective_steps
            ));
        }
        if !(self.train_seconds.is_finite() && self.train_seconds > 0.0) {
            return Err(format!("{} s of training time", self.train_seconds));
        }
        Ok((steps[me], tau))
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

    /// The part of a device that reported `status` (its own, independent of the others').
    /// A reported speed that is not a positive finite number counts as unknown.
    pub fn assign(&self, status: &DeviceStatus) -> Assignment {
        if let Some(why) = &status.critical {
            return Assignment::LeftOut(LeftOut::Critical(why.clone()));
        }
        let Some(sps) = status
            .seconds_per_step
            .filter(|s| s.is_finite() && *s > 0.0)
        else {
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

/// `tau_eff`: the mean of `steps` weighted by `weights` (devices without a weight count
/// for nothing); exactly the common value when every device trains the same steps, 0
/// when none does.
pub fn effective_steps(weights: &[(DeviceId, f64)], steps: &[(DeviceId, usize)]) -> f64 {
    if let Some((_, first)) = steps.first()
        && steps.iter().all(|(_, s)| s == first)
    {
        return *first as f64;
    }
    let weight: BTreeMap<&DeviceId, f64> = weights.iter().map(|(d, w)| (d, *w)).collect();
    let (mut weighted, mut total) = (0.0, 0.0);
    for (d, s) in steps {
        if let Some(w) = weight.get(d) {
            weighted += w * *s as f64;
            total += w;
        }
    }
    if total > 0.0 { weighted / total } else { 0.0 }
}

/// The factor a device that trained `steps` local steps scales its delta by before
/// encrypting it: `effective_steps / steps` (exactly 1 when every device trains the
/// same steps).
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

    fn status(sps: Option<f64>, critical: Option<&str>) -> DeviceStatus {
        DeviceStatus {
            seconds_per_step: sps,
            critical: critical.map(String::from),
            ..DeviceStatus::default()
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
        let fleet = [
            ("agx-orin", status(Some(0.5), None), 0.2),
            ("orin-nano", status(Some(2.0), None), 0.2),
            ("jetson-nano", status(Some(9.0), None), 0.2),
            ("too-slow", status(Some(20.0), None), 0.1),
            ("hot", status(Some(1.0), Some("tj-therm 99.5 C")), 0.1),
            ("new", status(None, None), 0.1),
            ("garbled", status(Some(f64::NAN), None), 0.1),
        ];
        let a: BTreeMap<&str, Assignment> =
            fleet.iter().map(|(n, s, _)| (*n, rule.assign(s))).collect();
        assert_eq!(a["agx-orin"], Assignment::Train { steps: 40 });
        assert_eq!(a["orin-nano"], Assignment::Train { steps: 30 });
        assert_eq!(a["jetson-nano"], Assignment::Train { steps: 6 });
        assert_eq!(
            a["too-slow"],
            Assignment::LeftOut(LeftOut::TooSlow {
                seconds_per_step: 20.0,
                can_do: 3
            })
        );
        assert_eq!(
            a["hot"],
            Assignment::LeftOut(LeftOut::Critical("tj-therm 99.5 C".into()))
        );
        assert_eq!(a["new"], Assignment::Train { steps: 40 });
        assert_eq!(a["garbled"], Assignment::Train { steps: 40 });
        // The slowest kept device (the Jetson Nano) finishes within the window.
        let mut steps = Vec::new();
        let mut weights = Vec::new();
        for (n, s, w) in &fleet {
            if let Assignment::Train { steps: k } = a[n] {
                if let Some(sps) = s.seconds_per_step.filter(|v| v.is_finite()) {
                    assert!(k as f64 * sps <= rule.train_seconds, "{n}");
                }
                steps.push((id(n), k));
                weights.push((id(n), *w));
            }
        }
        // tau_eff over the kept devices: (0.2*40 + 0.2*30 + 0.2*6 + 0.1*40 + 0.1*40) / 0.8.
        let tau = (8.0 + 6.0 + 1.2 + 4.0 + 4.0) / 0.8;
        assert!((effective_steps(&weights, &steps) - tau).abs() < 1e-12);
        assert!((normalisation(tau, 6) - tau / 6.0).abs() < 1e-12);
        // Every member checks the plan against the weights it verified.
        let plan = RoundPlan {
            steps: steps.clone(),
            effective_steps: tau,
            train_seconds: 60.0,
            left_out: vec![],
        };
        assert_eq!(plan.check(&id("jetson-nano"), &weights, 40), Ok((6, tau)));
        let inflated = RoundPlan {
            effective_steps: tau * 2.0,
            ..plan.clone()
        };
        assert!(inflated.check(&id("agx-orin"), &weights, 40).is_err());
        let too_many = RoundPlan {
            steps: vec![(id("agx-orin"), 41)],
            ..plan.clone()
        };
        assert!(
            too_many
                .check(&id("agx-orin"), &[(id("agx-orin"), 1.0)], 40)
                .is_err()
        );
        let missing = RoundPlan {
            steps: steps[1..].to_vec(),
            ..plan
        };
        assert!(missing.check(&id("orin-nano"), &weights, 40).is_err());
    }

    #[test]
    fn equal_steps_leave_fedavg_exactly_as_it_was_and_bad_rules_are_refused() {
        let rule = StepRule {
            steps: 3,
            min_steps: 1,
            train_seconds: 100.0,
        };
        let weights: Vec<_> = (0..3).map(|i| (id(&format!("d{i}")), 1.0 / 3.0)).collect();
        let steps: Vec<_> = (0..3).map(|i| (id(&format!("d{i}")), 3)).collect();
        let tau = effective_steps(&weights, &steps);
        assert_eq!(tau, 3.0);
        assert_eq!(normalisation(tau, 3), 1.0);
        // Nobody kept: no steps, and nothing to scale.
        assert_eq!(effective_steps(&weights, &[]), 0.0);
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

    #[test]
    fn statuses_and_efforts_with_absurd_values_are_refused() {
        let good = DeviceStatus {
            plan: Some("ckpt-packed-mb4".into()),
            memory_budget_mib: Some(6000),
            tokens_per_second: Some(110.0),
            seconds_per_step: Some(1.5),
            power_mode: Some("15W".into()),
            thermal: Some(Thermal {
                zone: "cpu-thermal".into(),
                celsius: 51.5,
                headroom: 47.5,
            }),
            critical: None,
        };
        good.check().unwrap();
        let long = DeviceStatus {
            plan: Some("x".repeat(MAX_STATUS_TEXT + 1)),
            ..good.clone()
        };
        assert!(matches!(
            long.check(),
            Err(ReportRefusal::TextTooLong { what: "plan", .. })
        ));
        let hot = DeviceStatus {
            thermal: Some(Thermal {
                zone: "cpu-thermal".into(),
                celsius: f64::NAN,
                headroom: 0.0,
            }),
            ..good.clone()
        };
        assert!(hot.check().is_err());
        let fast = DeviceStatus {
            seconds_per_step: Some(-1.0),
            ..good
        };
        assert!(fast.check().is_err());
        let effort = Effort {
            assigned: 10,
            steps: 7,
            tokens: 7000,
            seconds: 30.0,
            throttled_seconds: 4.0,
            throttled_steps: 3,
            joules: Some(210.0),
            stopped: Some(Stopped::Deadline),
        };
        effort.check().unwrap();
        assert_eq!(effort.joules_per_token(), Some(0.03));
        let overdone = Effort {
            steps: 11,
            ..effort.clone()
        };
        assert!(overdone.check().is_err());
        let no_rails = Effort {
            joules: None,
            ..effort
        };
        assert_eq!(no_rails.joules_per_token(), None);
    }
}
