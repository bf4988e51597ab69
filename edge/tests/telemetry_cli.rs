//! `fedshield-edge telemetry` and `doctor` on the telemetry fixture trees
//! (shared/telemetry/fixtures).

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    fedshield_telemetry::fixtures::path(name)
}

#[test]
fn telemetry_streams_one_json_line_per_reading() {
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
        .args(["telemetry", "--count", "3", "--interval", "0.01", "--root"])
        .arg(fixture("orin-nano-jp6"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["t"].as_f64().unwrap() <= lines[2]["t"].as_f64().unwrap());
    for l in &lines {
        assert_eq!(l["power"]["total_from"], "VDD_IN");
        assert_eq!(l["power_mode"]["name"], "MAXN_SUPER");
        assert_eq!(l["gpu"]["name"], "gpu");
        assert_eq!(l["faults"], serde_json::json!([]));
    }
}

#[test]
fn telemetry_refuses_a_bad_interval_and_doctor_says_what_a_server_lacks() {
    let bad = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
        .args(["telemetry", "--interval", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--interval"));
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
        .args(["doctor", "--root"])
        .arg(fixture("x86-server"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("lacks       : power rails"), "{text}");
    assert!(
        text.contains("thermal     : acpitz 27.8 C, x86_pkg_temp 41.0 C"),
        "{text}"
    );
    assert!(text.contains("libtorch  : forward/backward ok"), "{text}");
}
