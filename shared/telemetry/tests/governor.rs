//! The governor driven by a fixture tree (the Orin Nano's) whose temperature, power and
//! over-current files the test rewrites over simulated time.

use fedshield_telemetry::governor::{
    Cause, EnergyMeter, Governor, GovernorConfig, Observation, Pace, Throttle,
};
use fedshield_telemetry::{Telemetry, Watts};
use std::path::{Path, PathBuf};

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fedshield_telemetry::fixtures::copy_tree(
        &fedshield_telemetry::fixtures::path(name),
        dir.path(),
    )
    .unwrap();
    dir
}

/// Sets every online zone of the Orin Nano fixture to `celsius` (cpu-thermal the hottest).
fn set_temp(root: &Path, celsius: f64) {
    let zones = root.join("sys/devices/virtual/thermal");
    for n in [0, 1, 5, 6, 7, 8] {
        let m = (celsius * 1000.0) as i64 - if n == 0 { 0 } else { 1500 };
        std::fs::write(
            zones.join(format!("thermal_zone{n}/temp")),
            format!("{m}\n"),
        )
        .unwrap();
    }
}

fn rail_file(root: &Path, file: &str) -> PathBuf {
    root.join("sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1")
        .join(file)
}

/// Steps of 1 s done in an interval of `secs` at `pace`.
fn steps_in(secs: f64, pace: Pace) -> u32 {
    match pace {
        Pace::Full => secs as u32,
        Pace::Slow { sleep_s, .. } => (secs / (1.0 + sleep_s)) as u32,
        Pace::Pause { .. } => 0,
    }
}

#[test]
fn heating_past_the_trip_point_slows_then_pauses_and_resumes_with_hysteresis() {
    let dir = copy_fixture("orin-nano-jp6");
    let t = Telemetry::discover(dir.path());
    let mut g = Governor::new(GovernorConfig::default()).unwrap();
    // cpu-thermal's passive trip point is 99 C.
    let temps = [60.0, 85.0, 90.0, 95.0, 99.5, 97.0, 95.0, 93.5, 88.0, 70.0];
    let mut trace = Vec::new();
    for (i, &temp) in temps.iter().enumerate() {
        set_temp(dir.path(), temp);
        let now = 10.0 * i as f64;
        let pace = g.observe(&Observation::of(&t.read(), now));
        trace.push((now, temp, pace, steps_in(10.0, pace)));
    }
    for (now, temp, pace, steps) in &trace {
        eprintln!("t={now:>4} s  {temp:>5.1} C  {pace:?}  {steps} steps");
    }
    let paces: Vec<Pace> = trace.iter().map(|t| t.2).collect();
    let slow = |sleep_s: f64| Pace::Slow {
        sleep_s,
        cause: Cause::Thermal,
    };
    let pause = Pace::Pause {
        cause: Cause::Thermal,
    };
    let expected = [
        Pace::Full,
        Pace::Full,
        slow(0.2),
        slow(1.2),
        pause,
        pause, // 2 C below the trip: still paused (hysteresis 5 C)
        pause, // 4 C below
        slow(0.9),
        Pace::Full,
        Pace::Full,
    ];
    for (i, (got, want)) in paces.iter().zip(&expected).enumerate() {
        match (got, want) {
            (
                Pace::Slow {
                    sleep_s: a,
                    cause: x,
                },
                Pace::Slow {
                    sleep_s: b,
                    cause: y,
                },
            ) => {
                assert!(
                    (a - b).abs() < 1e-9 && x == y,
                    "step {i}: {got:?} vs {want:?}"
                )
            }
            _ => assert_eq!(got, want, "step {i}"),
        }
    }
    let steps: Vec<u32> = trace.iter().map(|t| t.3).collect();
    assert_eq!(steps, [10, 10, 8, 4, 0, 0, 0, 5, 10, 10]);
    let throttle = |from_s: f64, to_s: f64, paused: bool| Throttle {
        from_s,
        to_s: Some(to_s),
        paused,
        cause: Cause::Thermal,
    };
    assert_eq!(
        g.throttles(),
        [
            throttle(20.0, 40.0, false),
            throttle(40.0, 70.0, true),
            throttle(70.0, 80.0, false)
        ]
    );
}

#[test]
fn a_power_cap_slows_training_until_the_rails_are_well_under_it() {
    let dir = copy_fixture("orin-nano-jp6");
    let t = Telemetry::discover(dir.path());
    let mut g = Governor::new(GovernorConfig {
        power_cap: Some(Watts(5.0)),
        ..GovernorConfig::default()
    })
    .unwrap();
    // 6.77 W on VDD_IN: over the cap, the sleep grows.
    let mut sleeps = Vec::new();
    for i in 0..4 {
        match g.observe(&Observation::of(&t.read(), i as f64)) {
            Pace::Slow {
                sleep_s,
                cause: Cause::Power,
            } => sleeps.push(sleep_s),
            other => panic!("expected a power slow-down, got {other:?}"),
        }
    }
    assert!(sleeps.windows(2).all(|w| w[1] > w[0]), "{sleeps:?}");
    // 4.8 W: under the cap but not by 10%: the sleep holds.
    std::fs::write(rail_file(dir.path(), "curr1_input"), "948\n").unwrap();
    let held = g.observe(&Observation::of(&t.read(), 4.0));
    assert!(matches!(held, Pace::Slow { sleep_s, .. } if sleep_s == sleeps[3]));
    // 3.0 W: it decays to nothing.
    std::fs::write(rail_file(dir.path(), "curr1_input"), "600\n").unwrap();
    let mut last = Pace::Slow {
        sleep_s: 1.0,
        cause: Cause::Power,
    };
    for i in 5..20 {
        last = g.observe(&Observation::of(&t.read(), i as f64));
    }
    assert_eq!(last, Pace::Full);
    assert_eq!(g.throttles().len(), 1);
    assert!(g.throttles()[0].to_s.is_some());
}

#[test]
fn new_over_current_events_slow_training_for_a_few_observations() {
    let dir = copy_fixture("orin-nano-jp6");
    let t = Telemetry::discover(dir.path());
    let mut g = Governor::new(GovernorConfig::default()).unwrap();
    let oc = dir.path().join("sys/class/hwmon/hwmon3/oc2_event_cnt");
    // Events counted before the device started are not news.
    assert_eq!(g.observe(&Observation::of(&t.read(), 0.0)), Pace::Full);
    std::fs::write(&oc, "5\n").unwrap();
    let held: Vec<Pace> = (1..=4)
        .map(|i| g.observe(&Observation::of(&t.read(), i as f64)))
        .collect();
    let slow = Pace::Slow {
        sleep_s: 1.0,
        cause: Cause::OverCurrent,
    };
    assert_eq!(held, [slow, slow, slow, Pace::Full]);
}

#[test]
fn a_box_without_sensors_trains_at_full_speed_and_bad_settings_are_refused() {
    let dir = copy_fixture("x86-server");
    let t = Telemetry::discover(dir.path());
    let mut g = Governor::new(GovernorConfig {
        power_cap: Some(Watts(10.0)),
        ..GovernorConfig::default()
    })
    .unwrap();
    assert_eq!(g.observe(&Observation::of(&t.read(), 0.0)), Pace::Full);
    for bad in [
        GovernorConfig {
            slow_margin: 0.0,
            ..GovernorConfig::default()
        },
        GovernorConfig {
            max_sleep_s: f64::NAN,
            ..GovernorConfig::default()
        },
        GovernorConfig {
            power_cap: Some(Watts(-1.0)),
            ..GovernorConfig::default()
        },
    ] {
        assert!(Governor::new(bad).is_err());
    }
}

#[test]
fn energy_integrates_power_over_time() {
    let mut e = EnergyMeter::default();
    e.add(0.0, Watts(2.0));
    e.add(10.0, Watts(2.0));
    e.add(5.0, Watts(100.0)); // out of order: ignored
    e.add(20.0, Watts(4.0));
    assert!((e.joules - (20.0 + 30.0)).abs() < 1e-9, "{}", e.joules);
}
