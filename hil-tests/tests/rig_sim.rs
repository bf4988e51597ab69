//! The rig simulator: scenario files, and the `fedshield-rig` binary on a real pty playing
//! a scenario against a device process (the power relay kills and restarts it) while an
//! edge-side link reads what the rig says.

use fedshield_edge::serial_link::SerialLink;
use fedshield_hil_tests::PtyPair;
use fedshield_hil_tests::rig_sim::ScenarioFile;
use fedshield_rig::messages::{BrownOut, FromRig, Relay, RelayChanged};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

const HEAD: &str = r#"
[rig]
firmware = "rig-sim 0.1"
supply_mv = 19000
idle_ma = 300
busy_ma = 1300
min_interval_ms = 50

[thermal]
ambient_c = 30.0
rise_c = 50.0
tau_s = 60.0
"#;

#[test]
fn scenario_files_parse_and_bad_ones_say_what_is_wrong() {
    let good = format!(
        "{HEAD}
[[step]]
round = 1
phase = \"training\"
fault = \"cut-power\"
warn_ms = 800
off_ms = 2000

[[step]]
at_ms = 5000
fault = \"cut-network\"
for_ms = 3000

[[step]]
round = 2
step = 3
fault = \"heat\"
celsius = 25.0
for_ms = 60000

[[step]]
round = 3
fault = \"noise\"
per_million = 10000
for_ms = 10000
"
    );
    let s = ScenarioFile::parse(&good).unwrap();
    assert_eq!(s.step.len(), 4);
    assert!(s.rig().is_ok());
    for (bad, says) in [
        (
            "[[step]]\nat_ms = 1\nround = 2\nfault = \"heat\"\ncelsius = 1.0\nfor_ms = 1\n",
            "step 1: one trigger",
        ),
        ("[[step]]\nround = 1\nfault = \"melt\"\n", "fault \"melt\""),
        (
            "[[step]]\nround = 1\nfault = \"cut-power\"\noff_ms = 5\n",
            "cut-power needs warn_ms",
        ),
        (
            "[[step]]\nround = 1\nphase = \"napping\"\nfault = \"cut-network\"\nfor_ms = 1\n",
            "phase \"napping\"",
        ),
        (
            "[[step]]\nat_ms = 1\nfault = \"noise\"\nper_million = 2000000\nfor_ms = 1\n",
            "at most 1000000",
        ),
        (
            "[[step]]\nat_ms = 1\nfault = \"heat\"\ncelsius = 1.0\nfor_ms = 1\ncolour = 3\n",
            "colour",
        ),
    ] {
        let e = ScenarioFile::parse(&format!("{HEAD}\n{bad}")).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
    let e = ScenarioFile::parse(&HEAD.replace("tau_s = 60.0", "tau_s = 0.0")).unwrap_err();
    assert!(e.contains("tau_s"), "{e}");
}

/// The binary plays a network cut and a warned power cut: the edge end of the link hears
/// both notices, its network relay (a TCP proxy) refuses connections while the network is
/// cut and forwards them before and after, the device process is killed when the power
/// goes and started again when it returns, and the log records each decision and a
/// measurement every second.
#[tokio::test]
async fn the_simulator_plays_a_scenario_against_a_device_process() {
    let pair = PtyPair::start().expect("socat pty pair");
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        format!(
            "{HEAD}
[[step]]
at_ms = 300
fault = \"cut-network\"
for_ms = 500

[[step]]
at_ms = 900
fault = \"cut-power\"
warn_ms = 300
off_ms = 1500
"
        ),
    )
    .unwrap();
    let log = dir.path().join("rig.jsonl");
    // The "broker" behind the relay greets every connection.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in upstream.incoming().flatten() {
            let _ = c.write_all(b"up");
        }
    });
    let listen = fedshield_hil_tests::free_local_addr();
    // A connection through the relay: what the far end sent before it closed.
    let through = move || {
        let mut c = std::net::TcpStream::connect(listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 2];
        match c.read(&mut got) {
            Ok(n) => got[..n].to_vec(),
            Err(e) => panic!("{e}"),
        }
    };
    let mut rig = Command::new(env!("CARGO_BIN_EXE_fedshield-rig"))
        .arg("--port")
        .arg(pair.b())
        .arg("--scenario")
        .arg(&scenario)
        .arg("--log")
        .arg(&log)
        .arg("--relay")
        .arg(format!("{listen}={upstream_addr}"))
        .args(["--seconds", "4", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    let mut edge = SerialLink::open(pair.a().to_str().unwrap(), 115_200).unwrap();
    let mut heard = Vec::new();
    let mut relayed = Vec::new();
    while heard.len() < 4 {
        let m = edge.recv(Duration::from_secs(5)).await.unwrap();
        heard.push(FromRig::decode(&m).unwrap());
        if heard.len() <= 2 {
            relayed.push(through()); // after the cut notice, then after the restore
        }
    }
    assert_eq!(relayed, [b"".to_vec(), b"up".to_vec()]);
    let relay = |relay, closed| FromRig::RelayChanged(RelayChanged { relay, closed });
    assert_eq!(
        heard,
        vec![
            relay(Relay::Network, false),
            relay(Relay::Network, true),
            FromRig::BrownOut(BrownOut { in_ms: 300 }),
            relay(Relay::Power, true),
        ]
    );
    assert!(rig.wait().unwrap().success());
    let entries: Vec<serde_json::Value> = fedshield_store::read_json_lines(&log).unwrap();
    let events: Vec<&str> = entries
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .filter(|e| *e != "measurement")
        .collect();
    assert_eq!(
        events,
        [
            "device-started",
            "fired",
            "network",
            "network",
            "fired",
            "power",
            "device-killed",
            "power",
            "device-started"
        ],
        "{entries:#?}"
    );
    let t = |i: usize| -> u64 {
        entries
            .iter()
            .filter(|e| e["event"] != "measurement")
            .nth(i)
            .unwrap()["t_ms"]
            .as_u64()
            .unwrap()
    };
    assert!(t(5) >= 1_200 && t(7) >= 2_700, "{entries:#?}");
    let killed = entries
        .iter()
        .find(|e| e["event"] == "device-killed")
        .unwrap();
    assert!(
        killed["status"].as_str().unwrap().contains("signal: 9"),
        "{killed}"
    );
    let measurements = entries
        .iter()
        .filter(|e| e["event"] == "measurement")
        .count();
    assert!((3..=6).contains(&measurements), "{measurements}");
    assert!(
        entries
            .iter()
            .any(|e| e["event"] == "measurement" && e["supply_ma"] == 0),
        "a measurement while the power was cut"
    );
}
