//! Paces local training by the box's telemetry: before every optimizer step the
//! [`Pacer`] reads the sensors (`fedshield_telemetry`), asks the governor for the pace, and
//! sleeps, waits out a pause, or tells the trainer to stop (a pause longer than
//! [`Pacer::max_pause_s`], or the run's deadline passed after at least one step: the steps
//! done so far are kept). The clock and the sleep are passed in, so tests drive it over
//! simulated time.

use fedshield_telemetry::Telemetry;
use fedshield_telemetry::governor::{
    EnergyMeter, Governor, GovernorConfig, Observation, Pace, Throttle,
};
use serde::Serialize;

/// The clock (seconds, monotonic) and the sleep a [`Pacer`] uses.
pub struct Time {
    /// Seconds since some fixed start.
    pub now: Box<dyn FnMut() -> f64 + Send>,
    /// Sleeps this many seconds.
    pub sleep: Box<dyn FnMut(f64) + Send>,
}

impl Time {
    /// The real monotonic clock and `thread::sleep`.
    pub fn real() -> Self {
        let start = std::time::Instant::now();
        Self {
            now: Box::new(move || start.elapsed().as_secs_f64()),
            sleep: Box::new(|s| std::thread::sleep(std::time::Duration::from_secs_f64(s))),
        }
    }
}

/// What pacing did to a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PaceReport {
    /// Steps allowed to run.
    pub steps: usize,
    /// Of them, steps that were slowed.
    pub slowed_steps: usize,
    /// Seconds slept between steps.
    pub slept_s: f64,
    /// Seconds spent paused.
    pub paused_s: f64,
    /// Runs that a pause longer than `max_pause_s` ended early.
    pub stops: u32,
    /// Runs that their deadline ended early.
    pub deadline_stops: u32,
    /// The governor's throttle intervals.
    pub throttles: Vec<Throttle>,
    /// Energy drawn while training, from the rails (where the box has them).
    pub joules: Option<f64>,
}

/// The training pacer.
pub struct Pacer {
    telemetry: Option<Telemetry>,
    governor: Governor,
    energy: EnergyMeter,
    time: Time,
    /// While paused, the sensors are read again this often (seconds).
    pub poll_s: f64,
    /// A pause longer than this stops the run (seconds).
    pub max_pause_s: f64,
    report: PaceReport,
    /// The current run's deadline (the clock's seconds) and steps allowed in it so far.
    deadline: Option<f64>,
    run_steps: usize,
    /// An attached rig's measurement of the supply, preferred to the on-board rails.
    external: Option<crate::rig_client::ExternalPower>,
    /// `run_steps` and the duty cycle, for other threads.
    progress: Progress,
    /// When the last step was let go (the clock's seconds), and how long the step before
    /// it computed: the duty cycle's terms.
    released: Option<f64>,
    compute_s: Option<f64>,
}

/// Steps begun in the pacer's current run and the trainer's duty cycle, readable from
/// another thread (the driver tells an attached rig which step the device is on and how
/// hard it works).
#[derive(Debug, Clone)]
pub struct Progress(std::sync::Arc<[std::sync::atomic::AtomicU32; 2]>);

impl Default for Progress {
    fn default() -> Self {
        let zero = || std::sync::atomic::AtomicU32::new(0);
        Self(std::sync::Arc::new([
            zero(),
            std::sync::atomic::AtomicU32::new(100),
        ]))
    }
}

impl Progress {
    /// Steps begun in the current run.
    pub fn steps(&self) -> u32 {
        self.0[0].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The trainer's duty cycle over its last step, in percent: the step's compute time
    /// over that time plus the wait before the next step (100 unthrottled, 0 while paused).
    pub fn duty_pct(&self) -> u8 {
        self.0[1].load(std::sync::atomic::Ordering::Relaxed) as u8
    }

    fn set(&self, steps: usize) {
        let steps = u32::try_from(steps).unwrap_or(u32::MAX);
        self.0[0].store(steps, std::sync::atomic::Ordering::Relaxed);
    }

    fn set_duty(&self, fraction: f64) {
        let pct = (fraction.clamp(0.0, 1.0) * 100.0).round() as u32;
        self.0[1].store(pct, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Pacer {
    /// No pacing: every step runs at once (a box without sensors, or pacing turned off).
    pub fn off() -> Self {
        Self {
            telemetry: None,
            governor: Governor::new(GovernorConfig::default()).expect("the defaults are valid"),
            energy: EnergyMeter::default(),
            time: Time::real(),
            poll_s: 1.0,
            max_pause_s: 600.0,
            report: PaceReport::default(),
            deadline: None,
            run_steps: 0,
            external: None,
            progress: Progress::default(),
            released: None,
            compute_s: None,
        }
    }

    /// The current run's steps, for another thread.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Takes the power from `external` (an attached rig's supply measurement) while it is
    /// fresh, in preference to the on-board rails (which miss the carrier board).
    pub fn with_external_power(mut self, external: crate::rig_client::ExternalPower) -> Self {
        self.external = Some(external);
        self
    }

    /// Starts a run that may last `seconds` (`None`: no deadline): once they have passed,
    /// [`Pacer::before_step`] ends the run, after its first step at least.
    pub fn start_run(&mut self, seconds: Option<f64>) {
        self.run_steps = 0;
        self.progress.set(0);
        self.released = None; // the time between two runs is not a step's
        self.energy.gap(); // nor is its energy
        self.deadline = seconds.map(|s| (self.time.now)() + s);
    }

    /// Ends the current run: one more power reading closes the energy of its last step.
    pub fn end_run(&mut self) {
        self.released = None;
        self.deadline = None;
        let now = (self.time.now)();
        if let Some(w) = self.power_now(now) {
            self.energy.add(now, w);
            self.report.joules = Some(self.energy.joules);
        }
    }

    /// The supply's power now: the rig's while fresh, else the on-board rails'.
    fn power_now(&self, now: f64) -> Option<fedshield_telemetry::Watts> {
        if let Some(w) = self.external.as_ref().and_then(|e| e.fresh()) {
            return Some(fedshield_telemetry::Watts(w));
        }
        let reading = self.telemetry.as_ref()?.read();
        Observation::of(&reading, now).power
    }

    /// Paces by the sensors under `root` with `config`.
    pub fn new(root: &std::path::Path, config: GovernorConfig, time: Time) -> Result<Self, String> {
        Ok(Self {
            telemetry: Some(Telemetry::discover(root)),
            governor: Governor::new(config)?,
            time,
            ..Self::off()
        })
    }

    /// Waits as the governor says before the next step; false: stop training (paused for
    /// longer than `max_pause_s`, or past the run's deadline).
    pub fn before_step(&mut self) -> bool {
        if let Some(released) = self.released.take() {
            self.compute_s = Some((self.time.now)() - released);
        }
        // Checked before and after the governor's wait (a sleep may cross the deadline).
        if self.past_deadline() {
            return false;
        }
        let throttled = |r: &PaceReport| r.slept_s + r.paused_s;
        let before = throttled(&self.report);
        let go = self.pace();
        if !go || self.past_deadline() {
            return false;
        }
        let now = (self.time.now)();
        let waited = throttled(&self.report) - before;
        // Without a step measured yet, a step that did not wait counts as full duty.
        let duty = match self.compute_s {
            Some(c) if c + waited > 0.0 => c / (c + waited),
            _ if waited > 0.0 => 0.0,
            _ => 1.0,
        };
        self.progress.set_duty(duty);
        self.released = Some(now);
        self.run_steps += 1;
        self.progress.set(self.run_steps);
        true
    }

    /// Whether the run has had its first step and its deadline has passed (counted once).
    fn past_deadline(&mut self) -> bool {
        match self.deadline {
            Some(deadline) if self.run_steps > 0 && (self.time.now)() >= deadline => {
                self.report.deadline_stops += 1;
                self.deadline = None;
                true
            }
            _ => false,
        }
    }

    fn pace(&mut self) -> bool {
        let Some(telemetry) = &self.telemetry else {
            self.report.steps += 1;
            return true;
        };
        let mut paused_since = None;
        loop {
            let now = (self.time.now)();
            let reading = telemetry.read();
            let mut observation = Observation::of(&reading, now);
            if let Some(w) = self.external.as_ref().and_then(|e| e.fresh()) {
                observation.power = Some(fedshield_telemetry::Watts(w));
            }
            if let Some(w) = observation.power {
                self.energy.add(now, w);
                self.report.joules = Some(self.energy.joules);
            }
            match self.governor.observe(&observation) {
                Pace::Full => {}
                Pace::Slow { sleep_s, .. } => {
                    (self.time.sleep)(sleep_s);
                    self.report.slept_s += sleep_s;
                    self.report.slowed_steps += 1;
                }
                Pace::Pause { .. } => {
                    self.progress.set_duty(0.0);
                    let since = *paused_since.get_or_insert(now);
                    if now - since >= self.max_pause_s {
                        self.report.paused_s += now - since;
                        self.report.stops += 1;
                        return false;
                    }
                    (self.time.sleep)(self.poll_s);
                    continue;
                }
            }
            if let Some(since) = paused_since {
                self.report.paused_s += now - since;
            }
            self.report.steps += 1;
            return true;
        }
    }

    /// What pacing did so far.
    pub fn report(&self) -> PaceReport {
        PaceReport {
            throttles: self.governor.throttles().to_vec(),
            ..self.report.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A copy of the Orin Nano fixture whose CPU zone the test heats.
    fn orin() -> tempfile::TempDir {
        use fedshield_telemetry::fixtures;
        let dir = tempfile::tempdir().unwrap();
        fixtures::copy_tree(&fixtures::path("orin-nano-jp6"), dir.path()).unwrap();
        dir
    }

    fn set_cpu(root: &std::path::Path, celsius: f64) {
        let temp = root.join("sys/devices/virtual/thermal/thermal_zone0/temp");
        std::fs::write(temp, format!("{}\n", (celsius * 1000.0) as i64)).unwrap();
    }

    /// Simulated time: sleeping advances the clock, and `on_sleep` sees the new time.
    fn simulated(on_sleep: impl FnMut(f64) + Send + 'static) -> (Time, Arc<Mutex<f64>>) {
        let clock = Arc::new(Mutex::new(0.0));
        let (c1, c2) = (clock.clone(), clock.clone());
        let on_sleep = Arc::new(Mutex::new(on_sleep));
        let time = Time {
            now: Box::new(move || *c1.lock().unwrap()),
            sleep: Box::new(move |s| {
                let mut t = c2.lock().unwrap();
                *t += s;
                (on_sleep.lock().unwrap())(*t);
            }),
        };
        (time, clock)
    }

    #[test]
    fn a_hot_box_slows_pauses_until_it_cools_and_counts_the_energy() {
        let dir = orin();
        let root = dir.path().to_path_buf();
        set_cpu(&root, 95.0);
        // The zone cools to 90 C once 30 simulated seconds have passed.
        let cooling = root.clone();
        let (time, clock) = simulated(move |t| {
            if t >= 30.0 {
                set_cpu(&cooling, 90.0);
            }
        });
        let mut p = Pacer::new(&root, GovernorConfig::default(), time).unwrap();
        // 95 C: 4 C below the passive trip: slowed by 1.2 s.
        assert!(p.before_step());
        assert!((*clock.lock().unwrap() - 1.2).abs() < 1e-9);
        // 99.5 C: paused, polled every second until it cools (30 s), then slowed (90 C is
        // 9 C below the trip: 0.2 s).
        set_cpu(&root, 99.5);
        assert!(p.before_step());
        let r = p.report();
        assert_eq!((r.steps, r.slowed_steps, r.stops), (2, 2, 0));
        assert!((r.paused_s - 29.0).abs() < 1e-6, "{r:?}");
        assert!((r.slept_s - 1.4).abs() < 1e-9, "{r:?}");
        assert_eq!(r.throttles.len(), 3, "slow, pause, slow: {:?}", r.throttles);
        // VDD_IN draws 6.77 W throughout: about 30.2 s of it.
        let joules = r.joules.unwrap();
        assert!((joules - 6.765_504 * 30.2).abs() < 1e-6, "{joules}");
    }

    #[test]
    fn the_duty_cycle_is_the_steps_compute_over_compute_and_wait() {
        let dir = orin();
        let root = dir.path().to_path_buf();
        set_cpu(&root, 50.0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let progress = Arc::new(Mutex::new(None::<Progress>));
        let (s, p2) = (seen.clone(), progress.clone());
        let (time, clock) = simulated(move |_| {
            if let Some(p) = &*p2.lock().unwrap() {
                s.lock().unwrap().push(p.duty_pct());
            }
        });
        let mut p = Pacer::new(&root, GovernorConfig::default(), time).unwrap();
        *progress.lock().unwrap() = Some(p.progress());
        let compute = |c: f64| *clock.lock().unwrap() += c;
        let duty = || progress.lock().unwrap().as_ref().unwrap().duty_pct();
        // Cool: no wait, full duty.
        assert!(p.before_step());
        assert_eq!(duty(), 100);
        compute(0.3);
        assert!(p.before_step());
        assert_eq!(duty(), 100);
        // 95 C: 0.3 s of compute, then 1.2 s of sleep: 20 %.
        set_cpu(&root, 95.0);
        compute(0.3);
        assert!(p.before_step());
        assert_eq!(duty(), 20);
        // At the trip point: 0 % while paused (seen from the sleeps).
        set_cpu(&root, 99.5);
        compute(0.3);
        seen.lock().unwrap().clear();
        p.max_pause_s = 2.5;
        assert!(!p.before_step(), "paused past the limit");
        assert!(
            !seen.lock().unwrap().is_empty() && seen.lock().unwrap().iter().all(|d| *d == 0),
            "{:?}",
            seen.lock().unwrap()
        );
        // A new run starts without a measured step of its own: no wait, full duty again.
        set_cpu(&root, 50.0);
        p.start_run(None);
        assert!(p.before_step());
        assert_eq!(duty(), 100);
    }

    #[test]
    fn a_runs_energy_covers_its_last_step_and_not_the_idle_time_between_runs() {
        let dir = orin();
        set_cpu(dir.path(), 50.0);
        let (time, clock) = simulated(|_| {});
        let mut p = Pacer::new(dir.path(), GovernorConfig::default(), time).unwrap();
        let watts = 6.765_504; // the fixture's VDD_IN
        p.start_run(None);
        assert!(p.before_step());
        *clock.lock().unwrap() += 2.0; // one step of 2 s
        p.end_run();
        let one = p.report().joules.unwrap();
        assert!((one - 2.0 * watts).abs() < 1e-6, "{one}");
        *clock.lock().unwrap() += 100.0; // idle between rounds
        p.start_run(None);
        assert!(p.before_step());
        *clock.lock().unwrap() += 1.0;
        p.end_run();
        let two = p.report().joules.unwrap() - one;
        assert!((two - watts).abs() < 1e-6, "{two}");
    }

    #[test]
    fn a_pause_longer_than_the_limit_stops_training() {
        let dir = orin();
        set_cpu(dir.path(), 104.0);
        let (time, clock) = simulated(|_| {});
        let mut p = Pacer::new(dir.path(), GovernorConfig::default(), time).unwrap();
        p.max_pause_s = 10.0;
        assert!(!p.before_step());
        assert_eq!(p.report().stops, 1);
        assert_eq!(*clock.lock().unwrap(), 10.0);
    }

    #[test]
    fn a_run_ends_at_its_deadline_after_one_step_at_least() {
        let dir = orin();
        set_cpu(dir.path(), 95.0); // slowed by 1.2 s before each step
        let (time, clock) = simulated(|_| {});
        let mut p = Pacer::new(dir.path(), GovernorConfig::default(), time).unwrap();
        // A deadline shorter than one step's sleep: the first step still runs.
        p.start_run(Some(0.5));
        assert!(p.before_step());
        assert!(!p.before_step());
        assert_eq!(p.report().deadline_stops, 1);
        // 3 s from t = 1.2: steps after the sleeps ending at 2.4 and 3.6; the next sleep
        // ends at 4.8, past the deadline (4.2), so no third step starts.
        let start = *clock.lock().unwrap();
        let progress = p.progress();
        assert_eq!(progress.steps(), 1);
        p.start_run(Some(3.0));
        assert_eq!(progress.steps(), 0);
        let mut steps = 0;
        while p.before_step() {
            steps += 1;
            assert_eq!(progress.steps(), steps);
        }
        assert_eq!(steps, 2);
        assert!((*clock.lock().unwrap() - start - 3.6).abs() < 1e-9);
        assert_eq!(p.report().deadline_stops, 2);
        // Without a deadline nothing stops.
        p.start_run(None);
        for _ in 0..5 {
            assert!(p.before_step());
        }
    }

    #[test]
    fn a_rigs_power_reading_is_preferred_to_the_rails_while_fresh() {
        let dir = orin();
        set_cpu(dir.path(), 50.0);
        let (time, clock) = simulated(|_| {});
        let external = crate::rig_client::ExternalPower::default();
        let mut p = Pacer::new(dir.path(), GovernorConfig::default(), time)
            .unwrap()
            .with_external_power(external.clone());
        // No rig reading yet: the rails' 6.77 W.
        assert!(p.before_step());
        *clock.lock().unwrap() = 10.0;
        external.set(24.7); // 19 V x 1.3 A at the rig
        assert!(p.before_step());
        let j = p.report().joules.unwrap();
        // Trapezoid from 6.77 W at t = 0 to 24.7 W at t = 10.
        assert!((j - (6.765_504 + 24.7) / 2.0 * 10.0).abs() < 1e-6, "{j}");
        external.clear();
        *clock.lock().unwrap() = 20.0;
        assert!(p.before_step());
        let j2 = p.report().joules.unwrap() - j;
        assert!((j2 - (24.7 + 6.765_504) / 2.0 * 10.0).abs() < 1e-6, "{j2}");
    }

    #[test]
    fn no_sensors_or_no_pacing_never_waits() {
        let mut off = Pacer::off();
        assert!(off.before_step() && off.before_step());
        assert_eq!(off.report().steps, 2);
        let empty = tempfile::tempdir().unwrap();
        let (time, clock) = simulated(|_| panic!("slept"));
        let mut p = Pacer::new(empty.path(), GovernorConfig::default(), time).unwrap();
        assert!(p.before_step());
        assert_eq!(*clock.lock().unwrap(), 0.0);
        assert_eq!(p.report().joules, None);
    }
}
