//! The thermal and power governor of local training, as a pure state machine: each
//! observation (time passed in, from [`crate::Reading`]s) gives the pace of the next
//! training step. It slows training before the hottest zone reaches its passive trip point
//! (where the kernel would throttle the clocks under it), pauses at the trip point, and
//! resumes only once the zone is [`GovernorConfig::hysteresis`] degrees below it again; it
//! slows under an optional power cap, and after over-current events. Every interval spent
//! slowed or paused is recorded with its cause.

use crate::{Celsius, Reading, Watts};
use serde::Serialize;

/// The governor's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GovernorConfig {
    /// Slow down when the hottest zone is less than this many degrees below its passive
    /// trip point (the sleep grows linearly to `max_sleep_s` at the trip point).
    pub slow_margin: f64,
    /// Once paused at the trip point, resume this many degrees below it.
    pub hysteresis: f64,
    /// Longest sleep between two steps, in seconds.
    pub max_sleep_s: f64,
    /// Keep the module's power (the rails' total) under this (`--power-cap-watts`).
    pub power_cap: Option<Watts>,
    /// Observations to stay slowed after new over-current events.
    pub over_current_hold: u32,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            slow_margin: 10.0,
            hysteresis: 5.0,
            max_sleep_s: 2.0,
            power_cap: None,
            over_current_hold: 3,
        }
    }
}

impl GovernorConfig {
    /// Refuses settings that cannot work (clear message, nothing half-applied).
    pub fn check(&self) -> Result<(), String> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.slow_margin) || !positive(self.hysteresis) {
            return Err("the slow margin and the hysteresis must be positive degrees".into());
        }
        if !positive(self.max_sleep_s) {
            return Err("the longest sleep must be a positive number of seconds".into());
        }
        if let Some(cap) = self.power_cap
            && !positive(cap.0)
        {
            return Err(format!("a power cap of {} W cannot be met", cap.0));
        }
        Ok(())
    }
}

/// Why training is slowed or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// The hottest zone is near (or past) its passive trip point.
    Thermal,
    /// The module draws more than the power cap.
    Power,
    /// The SoC counted over-current events.
    OverCurrent,
}

/// The pace of the next training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "pace", rename_all = "kebab-case")]
pub enum Pace {
    /// Train at full speed.
    Full,
    /// Sleep this long before the next step.
    Slow {
        /// Seconds.
        sleep_s: f64,
        /// The strictest cause.
        cause: Cause,
    },
    /// Do not train until the next observation says so.
    Pause {
        /// Why.
        cause: Cause,
    },
}

impl Pace {
    fn rank(&self) -> (u8, f64) {
        match self {
            Pace::Full => (0, 0.0),
            Pace::Slow { sleep_s, .. } => (1, *sleep_s),
            Pace::Pause { .. } => (2, 0.0),
        }
    }

    fn cause(&self) -> Option<Cause> {
        match self {
            Pace::Full => None,
            Pace::Slow { cause, .. } | Pace::Pause { cause } => Some(*cause),
        }
    }

    /// The stricter of two paces.
    fn max(self, other: Pace) -> Pace {
        let (a, b) = (self.rank(), other.rank());
        if b.0 > a.0 || (b.0 == a.0 && b.1 > a.1) {
            other
        } else {
            self
        }
    }
}

/// What the governor sees at one time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// Seconds on the device's monotonic clock.
    pub now_s: f64,
    /// The hottest zone's name and its headroom to its passive trip point.
    pub hottest: Option<(String, Celsius)>,
    /// The module's power.
    pub power: Option<Watts>,
    /// Over-current events since boot.
    pub over_current_events: Option<u64>,
}

impl Observation {
    /// What the governor needs of `reading`, taken at `now_s`.
    pub fn of(reading: &Reading, now_s: f64) -> Self {
        Self {
            now_s,
            hottest: reading.hottest().map(|(z, h)| (z.name.clone(), h)),
            power: reading.power.as_ref().map(|p| p.total),
            over_current_events: reading.over_current_events,
        }
    }
}

/// An interval spent slowed or paused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Throttle {
    /// When it began (seconds).
    pub from_s: f64,
    /// When it ended (`None`: still going).
    pub to_s: Option<f64>,
    /// Paused (else slowed).
    pub paused: bool,
    /// Why.
    pub cause: Cause,
}

/// The governor.
#[derive(Debug, Clone)]
pub struct Governor {
    config: GovernorConfig,
    paused: bool,
    power_sleep: f64,
    last_over_current: Option<u64>,
    over_current_left: u32,
    pace: Pace,
    throttles: Vec<Throttle>,
}

impl Governor {
    /// A governor with `config` (see [`GovernorConfig::check`]).
    pub fn new(config: GovernorConfig) -> Result<Self, String> {
        config.check()?;
        Ok(Self {
            config,
            paused: false,
            power_sleep: 0.0,
            last_over_current: None,
            over_current_left: 0,
            pace: Pace::Full,
            throttles: Vec::new(),
        })
    }

    /// The pace decided last.
    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// Every interval spent slowed or paused so far.
    pub fn throttles(&self) -> &[Throttle] {
        &self.throttles
    }

    /// The pace after observing `obs`.
    pub fn observe(&mut self, obs: &Observation) -> Pace {
        let c = &self.config;
        let mut pace = Pace::Full;
        // Thermal: slow inside the margin, pause at the trip point, resume with hysteresis.
        if let Some((_, Celsius(headroom))) = obs.hottest {
            if headroom <= 0.0 {
                self.paused = true;
            } else if headroom >= c.hysteresis {
                self.paused = false;
            }
            pace = if self.paused {
                Pace::Pause {
                    cause: Cause::Thermal,
                }
            } else if headroom < c.slow_margin {
                Pace::Slow {
                    sleep_s: c.max_sleep_s * (c.slow_margin - headroom) / c.slow_margin,
                    cause: Cause::Thermal,
                }
            } else {
                Pace::Full
            };
        }
        // Power: the sleep grows while over the cap, and decays once under it by 10%.
        if let (Some(cap), Some(Watts(w))) = (c.power_cap, obs.power) {
            if w > cap.0 {
                self.power_sleep = (self.power_sleep * 1.5 + 0.05).min(c.max_sleep_s);
            } else if w < 0.9 * cap.0 {
                self.power_sleep *= 0.5;
                if self.power_sleep < 0.01 {
                    self.power_sleep = 0.0;
                }
            }
            if self.power_sleep > 0.0 {
                pace = pace.max(Pace::Slow {
                    sleep_s: self.power_sleep,
                    cause: Cause::Power,
                });
            }
        }
        // Over-current: new events hold half the longest sleep for a few observations.
        if let Some(n) = obs.over_current_events {
            if self.last_over_current.is_some_and(|last| n > last) {
                self.over_current_left = c.over_current_hold;
            }
            self.last_over_current = Some(n);
        }
        if self.over_current_left > 0 {
            self.over_current_left -= 1;
            pace = pace.max(Pace::Slow {
                sleep_s: c.max_sleep_s / 2.0,
                cause: Cause::OverCurrent,
            });
        }
        self.record(obs.now_s, pace);
        self.pace = pace;
        pace
    }

    /// Opens, closes or switches the throttle interval as the pace changes.
    fn record(&mut self, now_s: f64, pace: Pace) {
        let state = |p: &Pace| p.cause().map(|c| (matches!(p, Pace::Pause { .. }), c));
        if state(&pace) == state(&self.pace) {
            return;
        }
        if let Some(open) = self.throttles.last_mut().filter(|t| t.to_s.is_none()) {
            open.to_s = Some(now_s);
        }
        if let Some((paused, cause)) = state(&pace) {
            self.throttles.push(Throttle {
                from_s: now_s,
                to_s: None,
                paused,
                cause,
            });
        }
    }
}

/// Energy from power readings over time (trapezoids between readings).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EnergyMeter {
    last: Option<(f64, f64)>,
    /// Joules so far.
    pub joules: f64,
}

impl EnergyMeter {
    /// Adds a reading of `watts` at `now_s` (a reading out of order is ignored).
    pub fn add(&mut self, now_s: f64, watts: Watts) {
        if let Some((t, w)) = self.last {
            if now_s < t {
                return;
            }
            self.joules += (now_s - t) * (w + watts.0) / 2.0;
        }
        self.last = Some((now_s, watts.0));
    }

    /// Forgets the last reading: the time until the next one is not counted (between two
    /// training runs).
    pub fn gap(&mut self) {
        self.last = None;
    }
}
