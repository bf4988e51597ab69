//! The fleet end to end against a real mosquitto: `fedshield-host serve` and three
//! `fedshield-edge run` processes fine-tune SmolLM2 (tiny settings).
//!
//! - One edge is killed after round 1 and round 2 completes with the other two; restarted
//!   after round 2, it catches up from the fleet snapshot and is in round 3; a rogue
//!   client's replayed, unsigned, oversized and garbage messages are refused with a logged
//!   reason while round 2 goes on; the sums the host decrypts equal the sums of the
//!   plaintext updates the contributors encrypted, within the documented noise bound.
//! - The host is killed mid-upload and its restart resumes the same round from its journal.
//! - The broker is killed mid-upload (losing every session, queued and retained message)
//!   and restarted; the round completes with every device.
//! - An edge is killed right after preparing its upload and restarted: it settles that
//!   upload from its state file as the round decided and takes part in the next round.

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
    wait_for_line(rx, what, secs);
}

/// The first line containing `what` within `secs` seconds.
fn wait_for_line(rx: &mpsc::Receiver<String>, what: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("never saw {what:?}"));
        if line.contains(what) {
            return line;
        }
    }
}

/// A fleet of three enrolled devices on a fresh mosquitto, with LoRA settings shared by
/// host and edges.
struct Fleet {
    broker: Mosquitto,
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
            broker,
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

/// The settings of the three-device tests: (host args, edge args).
const HOST_TINY: [&str; 14] = [
    "--local-steps",
    "1",
    "--join-seconds",
    "60",
    "--upload-seconds",
    "120",
    "--phase-seconds",
    "20",
    "--threshold",
    "2",
    "--chunk-bytes",
    "16384",
    "--rho",
    "0.5",
];
const EDGE_TINY: [&str; 6] = ["--batch", "1", "--max-len", "48", "--eval-examples", "2"];

/// (round, contributors) of every round in metrics.json.
fn contributors(fleet: &Fleet) -> Vec<(u64, u64)> {
    fleet
        .rounds()
        .iter()
        .map(|r| {
            (
                r["round"].as_u64().unwrap(),
                r["contributors"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Checks every audited round: the host's decrypted sums against what its contributors'
/// ciphertexts delivered (their plaintexts plus body rounding, as each computed it): equal up
/// to the encryption noise, at most n 2^17 units; and against the plaintexts themselves within
/// the noise and rounding budget of the round's body width (SECURITY.md).
fn check_audited_sums(host_audit: &std::path::Path, edge_audit: &std::path::Path, rounds: u64) {
    for round in 1..=rounds {
        let text = std::fs::read_to_string(host_audit.join(format!("round-{round}.json")))
            .expect("the host audited the round");
        let host: serde_json::Value = serde_json::from_str(&text).unwrap();
        let contributors: Vec<String> = host["contributors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        let body_bits = host["body_bits"].as_u64().unwrap() as u32;
        let sums: Vec<u64> = host["sums"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let mut plain = vec![0u64; sums.len()];
        let mut delivered = vec![0u64; sums.len()];
        let mut weight = 0.0;
        for d in &contributors {
            let text = std::fs::read_to_string(edge_audit.join(format!("round-{round}-{d}.json")))
                .expect("the contributor audited its update");
            let edge: serde_json::Value = serde_json::from_str(&text).unwrap();
            weight += edge["weight"].as_f64().unwrap();
            for (key, acc) in [("plaintexts", &mut plain), ("delivered", &mut delivered)] {
                let values = edge[key].as_array().unwrap();
                assert_eq!(values.len(), sums.len());
                for (p, v) in acc.iter_mut().zip(values) {
                    *p = p.wrapping_add(v.as_u64().unwrap());
                }
            }
        }
        let n = contributors.len() as i64;
        let worst = |want: &[u64]| {
            sums.iter()
                .zip(want)
                .map(|(s, p)| (s.wrapping_sub(*p) as i64).abs())
                .max()
                .unwrap()
        };
        let noise = n * (1 << 17);
        let off = worst(&delivered);
        assert!(
            off <= noise,
            "round {round}: decrypted sums off what was delivered by {off} units (noise {noise})"
        );
        let bound = n * ((1 << 17) + (1i64 << (63 - body_bits))) + n;
        let off = worst(&plain);
        assert!(
            off <= bound,
            "round {round}: decrypted sums off by {off} units (bound {bound}, {body_bits}-bit bodies)"
        );
        assert!(
            (host["total_weight"].as_f64().unwrap() - weight).abs() < 1e-12,
            "round {round}: total weight"
        );
        assert!(plain.iter().any(|&p| p != 0), "round {round}: empty update");
    }
}

/// A rogue client on the broker: records what the devices send, and publishes forgeries.
struct Rogue {
    link: fedshield_transport::Link,
}

impl Rogue {
    fn new(fleet: &Fleet) -> Self {
        let (host, port) = fedshield_transport::parse_broker(&fleet.addr).unwrap();
        let link = fedshield_transport::Link::start(fedshield_transport::LinkConfig {
            host,
            port,
            client_id: "rogue".into(),
            credentials: None,
            max_packet_bytes: 1 << 20,
            subscriptions: vec![format!("fedshield/{}/up/+", fleet.name)],
            last_will: None,
            birth: None,
            tls: None,
        })
        .unwrap();
        Self { link }
    }

    /// The first manifest a device sent, as its raw payload.
    fn first_manifest(&self, device: &str) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(400);
        while Instant::now() < deadline {
            if let Some(fedshield_transport::Incoming::Message { topic, payload }) =
                self.link.recv(Duration::from_millis(200)).unwrap()
                && topic.ends_with(&format!("/up/{device}"))
                && matches!(
                    postcard::from_bytes::<EdgeMessage>(&payload),
                    Ok(EdgeMessage::Manifest(_))
                )
            {
                return payload;
            }
        }
        panic!("never saw a manifest from {device}");
    }

    fn publish(&self, fleet: &Fleet, device: &str, payload: Vec<u8>) {
        self.link
            .publish(
                &format!("fedshield/{}/up/{device}", fleet.name),
                payload,
                false,
            )
            .unwrap();
    }
}

use fedshield_protocol::messages::EdgeMessage;

#[test]
fn fleet_survives_a_dead_edge_and_forgeries_and_decrypts_exactly_the_contributors_sum() {
    let mut fleet = Fleet::new("hil", ["--rank", "4", "--targets", "q_proj,v_proj"]);
    let rogue = Rogue::new(&fleet);
    let host_audit = fleet.out.join("audit-host");
    let edge_audit = fleet.out.join("audit-edges");
    let (mut host, host_rx) = fleet.host(
        &[
            &HOST_TINY[..],
            // The dead edge never joins round 2: a shorter join window (flags given twice:
            // the last wins).
            &["--rounds", "3", "--alpha", "8", "--join-seconds", "30"],
            &["--audit-dir", host_audit.to_str().unwrap()],
        ]
        .concat(),
    );
    let edge_args = [
        &EDGE_TINY[..],
        &["--rounds", "3", "--alpha", "8", "--audit-dir"],
        &[edge_audit.to_str().unwrap()],
    ]
    .concat();
    let mut edges: Vec<_> = (0..3).map(|i| fleet.edge(i, &edge_args)).collect();
    let round1_manifest = rogue.first_manifest("edge-0");
    // Kill edge-2 once it has applied round 1's global update.
    wait_for(&edges[2].1, "round 1: applied the global update", 400);
    drop(edges.pop());
    // Round 2's uploads are open: forgeries on the devices' uplinks.
    wait_for(&host_rx, "round 2: announcing", 60);
    wait_for(&host_rx, "uploads open", 120);
    rogue.publish(&fleet, "edge-0", round1_manifest.clone()); // replayed from round 1
    let Ok(EdgeMessage::Manifest(mut unsigned)) = postcard::from_bytes(&round1_manifest) else {
        unreachable!()
    };
    unsigned.round = 2;
    unsigned.signature.clear();
    let unsigned = postcard::to_stdvec(&EdgeMessage::Manifest(unsigned)).unwrap();
    rogue.publish(&fleet, "edge-0", unsigned);
    rogue.publish(&fleet, "edge-1", vec![0xff; 64]); // garbage
    rogue.publish(&fleet, "edge-1", vec![0; 600 * 1024]); // over the host's 512 KiB limit
    let mut refusals = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let line = host_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the host finished");
        if line.contains("refused a message") {
            refusals.push(line.clone());
        }
        if line.contains("round 3: announcing") {
            // edge-2 comes back having missed round 2, and the broker lost its session
            // (restarted meanwhile) with the round-2 messages queued for it: round 2's
            // global update cannot be applied without that round's configuration, so the
            // edge catches up from the snapshot.
            fleet.broker.restart(Duration::from_millis(500)).unwrap();
            edges.push(fleet.edge(2, &edge_args));
        }
        if line.contains("metrics") {
            break;
        }
    }
    for (device, reason) in [
        ("edge-0", "manifest for round 1"),
        ("edge-0", "signature does not verify"),
        ("edge-1", "malformed payload"),
        ("edge-1", "the limit is 524288"),
    ] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(&format!("from {device}")) && l.contains(reason)),
            "no refusal of {device} for {reason:?} in {refusals:#?}"
        );
    }
    assert!(host.0.wait().unwrap().success(), "host failed");
    assert_eq!(
        contributors(&fleet),
        [(1, 3), (2, 2), (3, 3)],
        "the dead edge is dropped, and back once caught up"
    );
    wait_for(
        &edges[2].1,
        "caught up from the fleet snapshot of round 2",
        60,
    );
    for r in &fleet.rounds() {
        let loss = r["eval_loss"].as_f64().expect("devices reported a loss");
        assert!(loss.is_finite() && loss > 0.0);
        assert!(r["upload_bytes_per_client"].as_u64().unwrap() > 0);
        assert!(r["crypto_seconds"].as_f64().unwrap() > 0.0);
    }
    check_audited_sums(&host_audit, &edge_audit, 3);
    assert!(fleet.out.join("adapter/adapter_model.safetensors").exists());
    assert!(fleet.out.join("loss.svg").exists());
    assert!(
        !fleet.out.join("round.journal").exists(),
        "the journal is removed with its round"
    );
}

fn three_edges(fleet: &Fleet) -> Vec<(Killed, mpsc::Receiver<String>)> {
    (0..3)
        .map(|i| fleet.edge(i, &[&EDGE_TINY[..], &["--rounds", "2"]].concat()))
        .collect()
}

#[test]
fn a_host_killed_mid_upload_resumes_the_same_round_from_its_journal() {
    let fleet = Fleet::new("restart", ["--rank", "2", "--targets", "v_proj"]);
    let host_args = [&HOST_TINY[..], &["--rounds", "2"]].concat();
    let (first, first_rx) = fleet.host(&host_args);
    let edges = three_edges(&fleet);
    // Kill the host once round 1's uploads have started arriving.
    wait_for(&first_rx, "round 1: announcing", 60);
    wait_for(&edges[0].1, "round 1: trained", 300);
    drop(first);
    assert!(fleet.out.join("round.journal").exists());
    let (mut second, second_rx) = fleet.host(&host_args);
    wait_for(&second_rx, "round 1: resumed after a host restart", 60);
    wait_for(&second_rx, "metrics", 400);
    assert!(second.0.wait().unwrap().success());
    assert_eq!(contributors(&fleet), [(1, 3), (2, 3)]);
    for (_, rx) in &edges {
        wait_for(rx, "done after round 2", 120);
    }
}

#[test]
fn a_broker_restarted_mid_upload_loses_nothing_the_round_needs() {
    let mut fleet = Fleet::new("brokerdown", ["--rank", "2", "--targets", "v_proj"]);
    let (mut host, host_rx) = fleet.host(&[&HOST_TINY[..], &["--rounds", "2"]].concat());
    let edges = three_edges(&fleet);
    wait_for(&host_rx, "round 1: announcing", 60);
    wait_for(&edges[0].1, "round 1: trained", 300);
    fleet.broker.restart(Duration::from_secs(1)).unwrap();
    wait_for(&host_rx, "re-publishing the round", 60);
    wait_for(&host_rx, "metrics", 400);
    assert!(host.0.wait().unwrap().success());
    assert_eq!(contributors(&fleet), [(1, 3), (2, 3)]);
    for (_, rx) in &edges {
        wait_for(rx, "done after round 2", 120);
    }
}

#[test]
fn an_edge_restarted_mid_round_settles_its_upload_from_its_state_file_and_rejoins() {
    let fleet = Fleet::new("edgerestart", ["--rank", "2", "--targets", "v_proj"]);
    let (mut host, host_rx) = fleet.host(&[&HOST_TINY[..], &["--rounds", "2"]].concat());
    let edge_args = [&EDGE_TINY[..], &["--rounds", "2"]].concat();
    let mut edges = three_edges(&fleet);
    // Kill edge-1 as soon as it has prepared its round-1 upload, and start it again.
    wait_for(&edges[1].1, "round 1: trained", 300);
    drop(edges.remove(1));
    edges.insert(1, fleet.edge(1, &edge_args));
    wait_for(&edges[1].1, "round 1's upload awaiting its outcome", 60);
    wait_for(&host_rx, "metrics", 400);
    assert!(host.0.wait().unwrap().success());
    let rounds = contributors(&fleet);
    assert_eq!(
        rounds[1],
        (2, 3),
        "the restarted edge is in round 2: {rounds:?}"
    );
    // Its round-1 upload is settled as the round decided: counted if the host folded it
    // (it may have gone out before the kill), kept in the residual otherwise.
    let want = if rounds[0].1 == 3 {
        "before the restart counted"
    } else {
        "before the restart did not count"
    };
    wait_for(&edges[1].1, want, 60);
    for (_, rx) in &edges {
        wait_for(rx, "done after round 2", 120);
    }
}

/// The round's shares leave before local training: with a share phase far shorter than the
/// training, every device still makes it into the round.
#[test]
fn shares_are_sent_before_local_training_so_a_short_share_phase_loses_nobody() {
    let fleet = Fleet::new("slowtrain", ["--rank", "2", "--targets", "v_proj"]);
    let (mut host, host_rx) = fleet.host(&[
        "--rounds",
        "1",
        "--local-steps",
        "40",
        "--join-seconds",
        "60",
        "--upload-seconds",
        "300",
        "--phase-seconds",
        "5",
        "--threshold",
        "3",
        "--chunk-bytes",
        "16384",
        "--rho",
        "0.5",
    ]);
    let edges: Vec<_> = (0..3)
        .map(|i| fleet.edge(i, &[&EDGE_TINY[..], &["--rounds", "1"]].concat()))
        .collect();
    let trained = edges
        .iter()
        .map(|(_, rx)| {
            let line = wait_for_line(rx, "round 1: trained", 300);
            let secs: f64 = line
                .split(" in ")
                .nth(1)
                .and_then(|s| s.split(" s").next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no training time in {line:?}"));
            secs
        })
        .collect::<Vec<_>>();
    // The test means something only when training outlasts the share phase.
    assert!(
        trained.iter().all(|&s| s > 5.0),
        "training took {trained:?} s"
    );
    wait_for(&host_rx, "metrics", 300);
    assert!(host.0.wait().unwrap().success());
    assert_eq!(contributors(&fleet), [(1, 3)]);
}
