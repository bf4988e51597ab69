//! The fleet end to end against a real mosquitto: `fedshield-host serve` and three
//! `fedshield-edge run` processes fine-tune SmolLM2 (tiny settings) for two rounds; one edge
//! is killed after round 1 and round 2 completes with the other two at its deadline.

use fedshield_hil_tests::Mosquitto;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A workspace binary built by the same `cargo test` run (target/<profile>/<name>).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} not built (run cargo test --workspace)",
        bin.display()
    );
    bin
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fleet_of_three_survives_a_dead_edge_and_publishes_a_peft_adapter() {
    let broker = Mosquitto::start(1 << 20).unwrap();
    let addr = broker.addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let out = dir.path().join("out");
    let host_bin = workspace_bin("fedshield-host");
    let status = Command::new(&host_bin)
        .args(["enrol", "--devices", "edge-0,edge-1,edge-2", "--fleet-dir"])
        .arg(&fleet)
        .status()
        .unwrap();
    assert!(status.success());
    let common = ["--rank", "4", "--targets", "q_proj,v_proj"];
    let host = Killed(
        Command::new(&host_bin)
            .args([
                "serve", "--fleet", "hil", "--broker", &addr, "--rounds", "2",
            ])
            .args([
                "--local-steps",
                "1",
                "--rho",
                "0.25",
                "--join-seconds",
                "20",
            ])
            .args([
                "--upload-seconds",
                "120",
                "--phase-seconds",
                "20",
                "--threshold",
                "2",
            ])
            .args(["--alpha", "8", "--chunk-bytes", "16384"])
            .args(common)
            .arg("--fleet-dir")
            .arg(&fleet)
            .arg("--out")
            .arg(&out)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let mut edges = Vec::new();
    for i in 0..3 {
        let mut child = Command::new(workspace_bin("fedshield-edge"))
            .args(["run", "--threads", "1", "--fleet", "hil", "--broker", &addr])
            .args(["--client", &i.to_string(), "--rounds", "2", "--batch", "2"])
            .args(["--max-len", "64", "--eval-examples", "4", "--alpha", "8"])
            .args(common)
            .arg("--key")
            .arg(fleet.join(format!("devices/edge-{i}.json")))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = tx.send((i, line));
            }
        });
        edges.push(Killed(child));
    }
    // Kill edge-2 once it has applied round 1's global update.
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        let (i, line) = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("edge-2 never finished round 1");
        if i == 2 && line.contains("round 1: applied the global update") {
            break;
        }
    }
    drop(edges.pop());
    let mut host = host;
    let output = BufReader::new(host.0.stdout.take().unwrap());
    let mut lines = Vec::new();
    for line in output.lines().map_while(Result::ok) {
        eprintln!("[host] {line}");
        lines.push(line);
    }
    assert!(host.0.wait().unwrap().success(), "host failed");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let rounds = metrics["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["contributors"], 3);
    assert_eq!(rounds[1]["contributors"], 2, "the dead edge is dropped");
    for r in rounds {
        let loss = r["eval_loss"].as_f64().expect("devices reported a loss");
        assert!(loss.is_finite() && loss > 0.0);
        assert!(r["upload_bytes_per_client"].as_u64().unwrap() > 0);
        assert!(r["crypto_seconds"].as_f64().unwrap() > 0.0);
    }
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    assert!(out.join("loss.svg").exists());
    assert!(
        lines.iter().any(|l| l.contains("metrics")),
        "host prints the output paths"
    );
}
