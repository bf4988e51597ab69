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

/// A fleet of three enrolled devices on a fresh mosquitto, with LoRA settings shared by
/// host and edges.
struct Fleet {
    _broker: Mosquitto,
    _dir: tempfile::TempDir,
    addr: String,
    name: &'static str,
    fleet: PathBuf,
    out: PathBuf,
    lora: [&'static str; 4],
}

impl Fleet {
    fn new(name: &'static str, lora: [&'static str; 4]) -> Self {
        let broker = Mosquitto::start(1 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fleet = dir.path().join("fleet");
        let status = Command::new(workspace_bin("fedshield-host"))
            .args(["enrol", "--devices", "edge-0,edge-1,edge-2", "--fleet-dir"])
            .arg(&fleet)
            .status()
            .unwrap();
        assert!(status.success());
        Self {
            addr: broker.addr().to_string(),
            _broker: broker,
            out: dir.path().join("out"),
            _dir: dir,
            name,
            fleet,
            lora,
        }
    }

    /// `fedshield-host serve` with `args`; its stdout lines.
    fn host(&self, args: &[&str]) -> (Killed, mpsc::Receiver<String>) {
        let mut child = Command::new(workspace_bin("fedshield-host"))
            .args(["serve", "--fleet", self.name, "--broker", &self.addr])
            .args(args)
            .args(self.lora)
            .arg("--fleet-dir")
            .arg(&self.fleet)
            .arg("--out")
            .arg(&self.out)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines_of(&mut child, "host".into(), true);
        (Killed(child), rx)
    }

    /// `fedshield-edge run` for device `i` with `args`; its stderr lines.
    fn edge(&self, i: usize, args: &[&str]) -> (Killed, mpsc::Receiver<String>) {
        let mut child = Command::new(workspace_bin("fedshield-edge"))
            .args([
                "run",
                "--threads",
                "1",
                "--fleet",
                self.name,
                "--broker",
                &self.addr,
            ])
            .args(["--client", &i.to_string()])
            .args(args)
            .args(self.lora)
            .arg("--key")
            .arg(self.fleet.join(format!("devices/edge-{i}.json")))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines_of(&mut child, format!("edge-{i}"), false);
        (Killed(child), rx)
    }

    fn rounds(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.out.join("metrics.json")).unwrap();
        let metrics: serde_json::Value = serde_json::from_str(&text).unwrap();
        metrics["rounds"].as_array().unwrap().clone()
    }
}

#[test]
fn fleet_of_three_survives_a_dead_edge_and_publishes_a_peft_adapter() {
    let fleet = Fleet::new("hil", ["--rank", "4", "--targets", "q_proj,v_proj"]);
    let (mut host, host_rx) = fleet.host(&[
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--rho",
        "0.25",
        "--join-seconds",
        "20",
        "--upload-seconds",
        "120",
        "--phase-seconds",
        "20",
        "--threshold",
        "2",
        "--alpha",
        "8",
        "--chunk-bytes",
        "16384",
    ]);
    let mut edges: Vec<_> = (0..3)
        .map(|i| {
            fleet.edge(
                i,
                &[
                    "--rounds",
                    "2",
                    "--batch",
                    "2",
                    "--max-len",
                    "64",
                    "--eval-examples",
                    "4",
                    "--alpha",
                    "8",
                ],
            )
        })
        .collect();
    // Kill edge-2 once it has applied round 1's global update.
    wait_for(&edges[2].1, "round 1: applied the global update", 400);
    drop(edges.pop());
    // The host prints the output paths when it is done.
    wait_for(&host_rx, "metrics", 400);
    assert!(host.0.wait().unwrap().success(), "host failed");
    let rounds = fleet.rounds();
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["contributors"], 3);
    assert_eq!(rounds[1]["contributors"], 2, "the dead edge is dropped");
    for r in &rounds {
        let loss = r["eval_loss"].as_f64().expect("devices reported a loss");
        assert!(loss.is_finite() && loss > 0.0);
        assert!(r["upload_bytes_per_client"].as_u64().unwrap() > 0);
        assert!(r["crypto_seconds"].as_f64().unwrap() > 0.0);
    }
    assert!(fleet.out.join("adapter/adapter_model.safetensors").exists());
    assert!(fleet.out.join("loss.svg").exists());
}

#[test]
fn a_host_killed_mid_round_resumes_with_the_next_round() {
    let fleet = Fleet::new("restart", ["--rank", "2", "--targets", "v_proj"]);
    let host_args = [
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--rho",
        "0.5",
        "--join-seconds",
        "60",
        "--upload-seconds",
        "120",
        "--phase-seconds",
        "20",
    ];
    let (first, first_rx) = fleet.host(&host_args);
    let edges: Vec<_> = (0..3)
        .map(|i| {
            fleet.edge(
                i,
                &[
                    "--rounds",
                    "3",
                    "--batch",
                    "1",
                    "--max-len",
                    "48",
                    "--eval-examples",
                    "2",
                ],
            )
        })
        .collect();
    // Kill the host once round 1 is under way (an edge has trained and uploaded).
    wait_for(&first_rx, "round 1: announcing", 60);
    wait_for(&edges[0].1, "round 1: trained", 300);
    drop(first);
    let (mut second, second_rx) = fleet.host(&host_args);
    wait_for(&second_rx, "interrupted by a host restart", 60);
    wait_for(&second_rx, "metrics", 400);
    assert!(second.0.wait().unwrap().success());
    let rounds: Vec<(u64, u64)> = fleet
        .rounds()
        .iter()
        .map(|r| {
            (
                r["round"].as_u64().unwrap(),
                r["contributors"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rounds, [(1, 0), (2, 3), (3, 3)]);
    // Every edge finished round 3.
    for (_, rx) in &edges {
        wait_for(rx, "done after round 3", 120);
    }
}
