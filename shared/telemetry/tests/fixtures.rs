//! The telemetry reader on fixture trees written from the documented layouts of four
//! boxes (fixtures/: an Orin Nano on JetPack 6, an AGX Orin on JetPack 5, a Jetson Nano on
//! JetPack 4, a plain x86 server), and on broken copies of them.

use fedshield_telemetry::{Bytes, Celsius, Hertz, Reading, Telemetry, Watts};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    fedshield_telemetry::fixtures::path(name)
}

fn read(name: &str) -> Reading {
    Telemetry::discover(fixture(name)).read()
}

fn zone<'a>(r: &'a Reading, name: &str) -> &'a fedshield_telemetry::Zone {
    r.zones.iter().find(|z| z.name == name).unwrap()
}

fn near(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn an_orin_nano_on_jetpack_6_reads_completely() {
    let r = read("orin-nano-jp6");
    assert!(r.faults.is_empty(), "{:?}", r.faults);
    assert!(r.lacks.is_empty(), "{:?}", r.lacks);
    assert_eq!(
        r.model.as_deref(),
        Some("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super")
    );
    let m = r.memory.as_ref().unwrap();
    assert_eq!(m.total, Bytes(7_802_536 * 1024));
    assert_eq!(m.available, Bytes(5_935_104 * 1024));
    assert_eq!(m.nvmap_used, Some(Bytes(412_672 * 1024)));
    // Zones by type, sorted by name; the CV engines are powered down (offline).
    let names: Vec<&str> = r.zones.iter().map(|z| z.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cpu-thermal",
            "cv0-thermal",
            "cv1-thermal",
            "cv2-thermal",
            "gpu-thermal",
            "soc0-thermal",
            "soc1-thermal",
            "soc2-thermal",
            "tj-thermal"
        ]
    );
    assert_eq!(zone(&r, "cv1-thermal").temp, None);
    let cpu = zone(&r, "cpu-thermal");
    assert_eq!(cpu.temp, Some(Celsius(51.375)));
    assert_eq!(cpu.passive(), Some(Celsius(99.0)));
    let (hottest, headroom) = r.hottest().unwrap();
    assert_eq!(hottest.name, "cpu-thermal");
    assert!(near(headroom.0, 99.0 - 51.375));
    // Three rails (the sum-of-shunts channel skipped); the total is VDD_IN.
    let p = r.power.as_ref().unwrap();
    let rails: Vec<&str> = p.rails.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(rails, ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]);
    assert_eq!(p.total_from, "VDD_IN");
    assert!(near(p.total.0, 5.064 * 1.336), "{:?}", p.total);
    let gpu = r.gpu.as_ref().unwrap();
    assert_eq!(gpu.name, "gpu");
    assert_eq!(gpu.freq, Some(Hertz(306_000_000)));
    assert!(near(gpu.load.unwrap(), 0.087));
    assert_eq!(r.cpu.online, [0, 1, 2, 3, 4, 5]);
    assert_eq!(r.cpu.freqs[1], Some(Hertz(1_510_400_000)));
    let mode = r.power_mode.as_ref().unwrap();
    assert_eq!((mode.id, mode.name.as_deref()), (2, Some("MAXN_SUPER")));
    assert!(!mode.default);
    assert_eq!(r.over_current_events, Some(2));
}

#[test]
fn an_agx_orin_on_jetpack_5_sums_its_rails_and_reports_its_default_mode() {
    let r = read("agx-orin-jp5");
    assert!(r.faults.is_empty(), "{:?}", r.faults);
    assert_eq!(zone(&r, "Tj-therm").temp, Some(Celsius(47.593)));
    assert_eq!(zone(&r, "CV0-therm").temp, None);
    // Two INA3221 chips, NC channels skipped; no input rail: the total is the sum.
    let p = r.power.as_ref().unwrap();
    let rails: Vec<&str> = p.rails.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        rails,
        [
            "VDD_GPU_SOC",
            "VDD_CPU_CV",
            "VIN_SYS_5V0",
            "VDDQ_VDD2_1V8AO"
        ]
    );
    assert_eq!(p.total_from, "sum");
    let sum = 19.952 * 1.664 + 19.952 * 0.520 + 5.016 * 1.056 + 4.992 * 0.232;
    assert!(near(p.total.0, sum), "{:?} vs {sum}", p.total);
    // The GPU is the ga10b devfreq device, not the DLA's.
    let gpu = r.gpu.as_ref().unwrap();
    assert_eq!(
        (gpu.name.as_str(), gpu.freq),
        ("ga10b", Some(Hertz(1_300_500_000)))
    );
    assert!(near(gpu.load.unwrap(), 0.912));
    assert_eq!(r.cpu.online.len(), 12);
    // No status file: the configured default, by name.
    let mode = r.power_mode.as_ref().unwrap();
    assert_eq!((mode.id, mode.name.as_deref()), (3, Some("MODE_50W")));
    assert!(mode.default);
    assert_eq!(r.over_current_events, Some(0));
    assert_eq!(r.memory.as_ref().unwrap().total, Bytes(64_335_136 * 1024));
}

#[test]
fn a_jetson_nano_on_jetpack_4_reads_its_iio_rails() {
    let r = read("nano-jp4");
    assert!(r.faults.is_empty(), "{:?}", r.faults);
    let p = r.power.as_ref().unwrap();
    assert_eq!(p.total_from, "POM_5V_IN");
    // The sensor's own power figure (mW), not volts x amps.
    assert_eq!(p.total, Watts(3.446));
    assert_eq!(p.rails.len(), 3);
    assert_eq!(r.gpu.as_ref().unwrap().load, Some(0.0));
    assert_eq!(r.memory.as_ref().unwrap().nvmap_used, None);
    let mode = r.power_mode.as_ref().unwrap();
    assert_eq!((mode.id, mode.name.as_deref()), (1, Some("5W")));
    // The PMIC die zone has no passive trip: it never counts as the hottest.
    assert_eq!(r.hottest().unwrap().0.name, "AO-therm");
    assert_eq!(
        r.lacks,
        ["over-current counters (no soctherm_oc hwmon)".to_string()]
    );
}

#[test]
fn a_plain_server_says_what_it_lacks() {
    let r = read("x86-server");
    assert!(r.faults.is_empty(), "{:?}", r.faults);
    assert!(r.power.is_none() && r.gpu.is_none() && r.power_mode.is_none());
    assert_eq!(r.over_current_events, None);
    assert_eq!(r.lacks.len(), 3, "{:?}", r.lacks);
    assert!(r.lacks.iter().any(|l| l.contains("power rails")));
    assert!(r.lacks.iter().any(|l| l.contains("integrated GPU")));
    assert_eq!(zone(&r, "x86_pkg_temp").temp, Some(Celsius(41.0)));
    assert_eq!(r.hottest(), None, "no passive trip point anywhere");
    assert_eq!(r.cpu.freqs[1], Some(Hertz(3_100_000_000)));
}

#[test]
fn an_empty_root_reads_as_a_box_with_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = Telemetry::discover(dir.path()).read();
    assert!(r.memory.is_none() && r.zones.is_empty() && r.cpu.online.is_empty());
    assert_eq!(r.lacks.len(), 4);
    assert_eq!(r.faults.len(), 1, "{:?}", r.faults);
    assert!(r.faults[0].starts_with("proc/meminfo"));
}

/// Copies fixture `name` into a temporary directory.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fedshield_telemetry::fixtures::copy_tree(&fixture(name), dir.path()).unwrap();
    dir
}

#[test]
fn garbage_and_missing_files_are_faults_of_that_reading_not_failures() {
    let dir = copy("orin-nano-jp6");
    let root = dir.path();
    let t = Telemetry::discover(root);
    let zones = root.join("sys/devices/virtual/thermal");
    std::fs::write(zones.join("thermal_zone0/temp"), "hot\n").unwrap();
    std::fs::write(zones.join("thermal_zone1/temp"), "").unwrap();
    let hw = root.join("sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1");
    std::fs::write(hw.join("curr2_input"), "\u{fffd}\u{fffd}").unwrap();
    std::fs::remove_file(hw.join("in3_input")).unwrap();
    std::fs::write(root.join("proc/meminfo"), "MemTotal: lots\n").unwrap();
    std::fs::write(root.join("sys/devices/system/cpu/online"), "0-x\n").unwrap();
    std::fs::write(root.join("var/lib/nvpmodel/status"), "pmode:\n").unwrap();
    let r = t.read();
    assert_eq!(
        zone(&r, "cpu-thermal").temp,
        None,
        "garbage reads as offline"
    );
    assert_eq!(zone(&r, "gpu-thermal").temp, None, "empty reads as offline");
    // VDD_IN still reads; the two broken rails are left out.
    let p = r.power.as_ref().unwrap();
    assert_eq!(p.rails.len(), 1);
    assert_eq!(p.total_from, "VDD_IN");
    assert!(r.memory.is_none());
    assert!(r.cpu.online.is_empty());
    // A broken status file falls back to the configured default.
    assert_eq!(r.power_mode.as_ref().unwrap().name.as_deref(), Some("15W"));
    let faults = r.faults.join("\n");
    for expected in [
        "zone cpu-thermal: temperature \"hot\"",
        "curr2_input: not a number",
        "in3_input",
        "proc/meminfo: meminfo has no MemTotal",
        "cpu/online: not a CPU list",
    ] {
        assert!(faults.contains(expected), "{expected} not in:\n{faults}");
    }
    // The same sources read again once the files are sound.
    std::fs::write(zones.join("thermal_zone0/temp"), "60500\n").unwrap();
    assert_eq!(zone(&t.read(), "cpu-thermal").temp, Some(Celsius(60.5)));
}

#[test]
fn readings_serialize_with_their_units_as_plain_numbers() {
    let r = read("orin-nano-jp6");
    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["memory"]["total"], 7_802_536u64 * 1024);
    assert_eq!(json["zones"][0]["temp"], 51.375);
    assert_eq!(json["zones"][1]["temp"], serde_json::Value::Null);
    assert_eq!(json["power"]["total_from"], "VDD_IN");
    assert_eq!(json["power_mode"]["name"], "MAXN_SUPER");
}

#[test]
fn cpu_lists_and_power_modes_parse() {
    use fedshield_telemetry::{parse_cpu_list, parse_power_mode};
    assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(vec![0, 1, 2, 3, 5, 7, 8]));
    assert_eq!(parse_cpu_list("0"), Some(vec![0]));
    assert_eq!(parse_cpu_list(""), Some(vec![]));
    for bad in ["3-1", "a", "0-99999", "1,,x"] {
        assert_eq!(parse_cpu_list(bad), None, "{bad}");
    }
    let conf =
        "< POWER_MODEL ID=0 NAME=MAXN >\n< POWER_MODEL ID=1 NAME=5W >\n< PM_CONFIG DEFAULT=0 >\n";
    let m = parse_power_mode(Some("pmode:0001"), Some(conf)).unwrap();
    assert_eq!((m.id, m.name.as_deref(), m.default), (1, Some("5W"), false));
    let m = parse_power_mode(None, Some(conf)).unwrap();
    assert_eq!(
        (m.id, m.name.as_deref(), m.default),
        (0, Some("MAXN"), true)
    );
    let m = parse_power_mode(Some("pmode:0007"), Some(conf)).unwrap();
    assert_eq!((m.id, m.name), (7, None), "an id the file does not name");
    assert_eq!(parse_power_mode(None, None), None);
}

#[test]
fn summaries_name_what_matters_for_people() {
    let orin = read("orin-nano-jp6").summary().join("\n");
    for expected in [
        "memory      : 5.7 GiB available of 7.4 GiB, GPU-mapped 403 MiB",
        "(3 offline); 47.6 C below cpu-thermal's passive trip",
        "power       : 6.77 W (VDD_IN); VDD_IN 6.77 W, VDD_CPU_GPU_CV 1.94 W, VDD_SOC 2.59 W",
        "gpu         : gpu 8.7% busy at 306 MHz",
        "cpu         : 6 online at 729-1510 MHz",
        "power mode  : MAXN_SUPER (id 2)",
        "over-current: 2 events since boot",
    ] {
        assert!(orin.contains(expected), "{expected:?} not in:\n{orin}");
    }
    let server = read("x86-server").summary().join("\n");
    assert!(server.contains("lacks       : power rails"), "{server}");
    assert!(!server.contains("power mode"), "{server}");
}
