//! The fleet end to end against a real mosquitto: `fedshield-host serve` and three
//! `fedshield-edge run` processes fine-tune SmolLM2 (tiny settings). One edge is killed after
//! round 1 and round 2 completes with the other two; the host is killed mid-round and its
//! restart goes on with the next round.

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

/// Forwards a child's output lines to a channel (and to the test's stderr).
fn lines_of(child: &mut Child, tag: String, stdout: bool) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stream: Box<dyn std::io::Read + Send> = if stdout {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("never saw {what:?}"));
        if line.contains(what) {
            return;
        }
    }
}

#[test]
fn a_host_killed_mid_round_resumes_with_the_next_round() {
    let broker = Mosquitto::start(1 << 20).unwrap();
    let addr = broker.addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let out = dir.path().join("out");
    let host_bin = workspace_bin("fedshield-host");
    assert!(
        Command::new(&host_bin)
            .args(["enrol", "--devices", "edge-0,edge-1,edge-2", "--fleet-dir"])
            .arg(&fleet)
            .status()
            .unwrap()
            .success()
    );
    let common = ["--rank", "2", "--targets", "v_proj"];
    let host = || {
        let mut child = Command::new(&host_bin)
            .args([
                "serve", "--fleet", "restart", "--broker", &addr, "--rounds", "2",
            ])
            .args(["--local-steps", "1", "--rho", "0.5", "--join-seconds", "60"])
            .args(["--upload-seconds", "120", "--phase-seconds", "20"])
            .args(common)
            .arg("--fleet-dir")
            .arg(&fleet)
            .arg("--out")
            .arg(&out)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines_of(&mut child, "host".into(), true);
        (Killed(child), rx)
    };
    let (first, first_rx) = host();
    let mut edges = Vec::new();
    let mut edge_rx = Vec::new();
    for i in 0..3 {
        let mut child = Command::new(workspace_bin("fedshield-edge"))
            .args([
                "run",
                "--threads",
                "1",
                "--fleet",
                "restart",
                "--broker",
                &addr,
            ])
            .args(["--client", &i.to_string(), "--rounds", "3", "--batch", "1"])
            .args(["--max-len", "48", "--eval-examples", "2"])
            .args(common)
            .arg("--key")
            .arg(fleet.join(format!("devices/edge-{i}.json")))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        edge_rx.push(lines_of(&mut child, format!("edge-{i}"), false));
        edges.push(Killed(child));
    }
    // Kill the host once round 1 is under way (an edge has trained and uploaded).
    wait_for(&first_rx, "round 1: announcing", 60);
    wait_for(&edge_rx[0], "round 1: trained", 300);
    drop(first);
    let (mut second, second_rx) = host();
    wait_for(&second_rx, "interrupted by a host restart", 60);
    wait_for(&second_rx, "metrics", 400);
    assert!(second.0.wait().unwrap().success());
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let rounds: Vec<(u64, u64)> = metrics["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["round"].as_u64().unwrap(),
                r["contributors"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rounds, [(1, 0), (2, 3), (3, 3)]);
    // Every edge settled round 1 as not counted and finished round 3.
    for (i, rx) in edge_rx.iter().enumerate() {
        wait_for(rx, "done after round 3", 120);
        let _ = i;
    }
}
