//! Fleets of simulated devices (`fedshield-sim devices`: the real edge protocol and
//! cryptography on synthetic updates) against a real mosquitto and the real
//! `fedshield-host serve`:
//!
//! - devices dropping out at every stage of a round (before joining, after joining, after
//!   their shares, after their upload) leave an aggregate that is exactly the sum of the
//!   updates that were folded, and come back for the next round;
//! - a host killed mid-round at 100 devices, after compacting its journal, resumes the
//!   round from the checkpoint, every device counted, the aggregate exact, the journal under
//!   a quarter of the uploads it stands for;
//! - rounds sharded over 1, 2 and 4 fold workers (`fedshield-host fold-worker`) decrypt
//!   exactly the devices' sum, and a worker killed and restarted mid-round loses nothing
//!   (its shard's devices send their uploads again).

use fedshield_crypto::identity::DeviceId;
use fedshield_hil_tests::audit::check_audited_sums;
use fedshield_hil_tests::scale::{Adapter, HostSettings, Process, SimFleet};
use fedshield_hil_tests::sim::{Dropouts, Stage};
use fedshield_protocol::fleet::host::HostEvent;
use fedshield_protocol::shard::{WorkerEvent, shard_of};
use std::path::PathBuf;
use std::time::Duration;

/// The folder of the workspace's binaries (target/<profile>).
fn bins() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    for bin in ["fedshield-host", "fedshield-sim"] {
        assert!(
            dir.join(bin).exists(),
            "{} not built (run cargo test --workspace)",
            dir.join(bin).display()
        );
    }
    dir
}

/// A small adapter: rank 1 on SmolLM2's q_proj, 34,560 values.
fn small() -> Adapter {
    Adapter {
        rank: 1,
        targets: "q_proj".into(),
        model: None,
    }
}

fn settings(
    rounds: u64,
    join: u64,
    upload: u64,
    phase: u64,
    audit: &std::path::Path,
) -> HostSettings {
    HostSettings {
        rounds,
        rho: "0.5".into(),
        join_seconds: join,
        upload_seconds: upload,
        phase_seconds: phase,
        extra: vec!["--audit-dir".into(), audit.display().to_string()],
    }
}

/// Waits for the host to finish within `timeout`, then for the simulators (a minute more);
/// each must succeed.
fn finish(fleet: &SimFleet, host: &mut Process, devices: &mut [Process], timeout: Duration) {
    let status = host.wait(timeout).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "host: {status:?}; see {}",
        fleet.out().display()
    );
    for d in devices {
        let status = d.wait(Duration::from_secs(60)).unwrap();
        assert!(status.is_some_and(|s| s.success()), "simulator: {status:?}");
    }
}

#[test]
fn devices_dropping_out_at_every_stage_leave_an_exact_aggregate_and_come_back() {
    const N: usize = 16;
    let ids: Vec<DeviceId> = (0..N).map(|i| DeviceId(format!("edge-{i}"))).collect();
    // The first seed that drops out of round 1 at every stage and out of each round at
    // most four devices: each round must reach its threshold (a majority), and each stage
    // must be exercised.
    let dropouts = (0..10_000)
        .map(|seed| Dropouts {
            rate: 0.2,
            stages: Stage::ALL.to_vec(),
            seed,
        })
        .find(|d| {
            let planned =
                |round| -> Vec<Stage> { ids.iter().filter_map(|id| d.plan(id, round)).collect() };
            let first = planned(1);
            first.len() <= 4
                && planned(2).len() <= 4
                && Stage::ALL.iter().all(|s| first.contains(s))
        })
        .expect("a seed that drops out at every stage");
    let mut fleet = SimFleet::enrol(&bins(), N, small()).unwrap();
    let audit_host = fleet.out().join("audit-host");
    let audit_edges = fleet.out().join("audit-edges");
    let mut devices = fleet
        .devices(
            2,
            2,
            &dropouts,
            Some(&audit_edges),
            Duration::from_secs(400),
        )
        .unwrap();
    let mut host = fleet.host(&settings(2, 10, 30, 10, &audit_host)).unwrap();
    finish(&fleet, &mut host, &mut devices, Duration::from_secs(400));
    let record = fedshield_hil_tests::scale::record(&fleet, &dropouts, 2, (0, 0)).unwrap();
    let round1 = &record.rounds[0];
    for stage in Stage::ALL {
        assert!(
            round1
                .devices
                .dropped
                .get(stage.name())
                .copied()
                .unwrap_or(0)
                >= 1,
            "round 1: nobody dropped at {stage:?}: {:?}",
            round1.devices.dropped
        );
    }
    for round in &record.rounds {
        // Devices that withheld their upload are not counted; those that left after
        // uploading are (their masked input arrived, so their self-mask is unmasked).
        let withheld = round.devices.dropped.get("upload").copied().unwrap_or(0);
        assert_eq!(
            round.contributors,
            round.devices.encrypted - withheld,
            "round {}: {:?}",
            round.round,
            round.devices
        );
        assert!(
            round.devices.refused.is_empty(),
            "{:?}",
            round.devices.refused
        );
        assert!(round.host_cpu_s["finish"] > 0.0 && round.host_cpu_s["fold"] > 0.0);
    }
    // Every device that dropped out of round 1 came back: each encrypted in round 2 unless
    // it dropped out of round 2 before its upload.
    let round2 = &record.rounds[1];
    let before_encrypting = ids
        .iter()
        .filter(|id| dropouts.plan(id, 2).is_some_and(|s| s < Stage::Upload))
        .count();
    assert_eq!(round2.devices.encrypted, N - before_encrypting);
    check_audited_sums(&audit_host, &audit_edges, 2);
}

#[test]
fn a_host_killed_mid_round_at_100_devices_resumes_it_from_its_compacted_journal() {
    const N: usize = 100;
    // Rank 4: 138,240 values, uploads of 138 KB that outweigh each device's secure-
    // aggregation records (its masked key vector alone is 16 KB).
    let adapter = Adapter { rank: 4, ..small() };
    let mut fleet = SimFleet::enrol(&bins(), N, adapter).unwrap();
    let audit_host = fleet.out().join("audit-host");
    let audit_edges = fleet.out().join("audit-edges");
    let mut devices = fleet
        .devices(
            2,
            2,
            &Dropouts::none(),
            Some(&audit_edges),
            Duration::from_secs(600),
        )
        .unwrap();
    let host_settings = settings(2, 60, 120, 60, &audit_host);
    let mut host = fleet.host(&host_settings).unwrap();
    // Killed once the journal has been compacted (a checkpoint of folded uploads in it),
    // while uploads still come in.
    fleet
        .wait_event("journal compacted", Duration::from_secs(300), |e| {
            matches!(e, HostEvent::JournalCompacted { round: 1, .. })
        })
        .unwrap();
    host.0.kill().unwrap();
    host.0.wait().unwrap();
    assert!(
        !fleet
            .host_events()
            .iter()
            .any(|e| matches!(e, HostEvent::Closed { round: 1, .. })),
        "round 1 closed before the host was killed: nothing to resume"
    );
    let mut host = fleet.host(&host_settings).unwrap();
    finish(&fleet, &mut host, &mut devices, Duration::from_secs(500));
    let events = fleet.host_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, HostEvent::Resumed { round: 1, .. })),
        "the restarted host did not resume round 1"
    );
    let record = fedshield_hil_tests::scale::record(&fleet, &Dropouts::none(), 2, (0, 0)).unwrap();
    for round in &record.rounds {
        assert_eq!(round.contributors, N, "round {}", round.round);
        let uploads = round.devices.up_bytes["upload"];
        eprintln!(
            "round {}: journal peak {} bytes, uploads {uploads} bytes",
            round.round, round.journal_peak_bytes
        );
        // The journal holds a checkpoint, the devices' secure-aggregation records and the
        // uploads in flight, not every upload (nor the uploads every device sends again
        // after the restart: those already in the checkpoint are not journalled).
        assert!(
            round.journal_peak_bytes * 4 < uploads,
            "round {}: journal peaked at {} bytes for {uploads} bytes of uploads",
            round.round,
            round.journal_peak_bytes
        );
    }
    check_audited_sums(&audit_host, &audit_edges, 2);
}

/// A fleet of `n` simulated devices whose host shards the uploads over `k` fold workers,
/// with the host's and devices' audits; `rounds` rounds.
struct Sharded {
    fleet: SimFleet,
    audit_host: PathBuf,
    audit_edges: PathBuf,
    devices: Vec<Process>,
    workers: Vec<Process>,
    host: Process,
}

fn sharded(n: usize, k: u32, rounds: u64) -> Sharded {
    let mut fleet = SimFleet::enrol(&bins(), n, small()).unwrap();
    let audit_host = fleet.out().join("audit-host");
    let audit_edges = fleet.out().join("audit-edges");
    let devices = fleet
        .devices(
            2,
            rounds,
            &Dropouts::none(),
            Some(&audit_edges),
            Duration::from_secs(400),
        )
        .unwrap();
    let workers = (0..k).map(|s| fleet.fold_worker(s).unwrap()).collect();
    let mut host_settings = settings(rounds, 30, 60, 20, &audit_host);
    host_settings
        .extra
        .extend(["--fold-shards".to_string(), k.to_string()]);
    let host = fleet.host(&host_settings).unwrap();
    Sharded {
        fleet,
        audit_host,
        audit_edges,
        devices,
        workers,
        host,
    }
}

#[test]
fn rounds_sharded_over_1_2_and_4_fold_workers_decrypt_exactly_the_devices_sum() {
    const N: usize = 12;
    for k in [1, 2, 4] {
        let mut s = sharded(N, k, 1);
        finish(
            &s.fleet,
            &mut s.host,
            &mut s.devices,
            Duration::from_secs(300),
        );
        let record =
            fedshield_hil_tests::scale::record(&s.fleet, &Dropouts::none(), 2, (0, 0)).unwrap();
        let round = &record.rounds[0];
        assert_eq!(round.contributors, N, "{k} workers");
        // The host folded nothing itself: the workers did, every upload once.
        assert!(round.workers_cpu_s > 0.0, "{k} workers: {round:?}");
        let folded: usize = s
            .fleet
            .worker_events()
            .iter()
            .flatten()
            .filter_map(|e| match e {
                WorkerEvent::Closed {
                    round: 1, folded, ..
                } => Some(*folded),
                _ => None,
            })
            .sum();
        assert_eq!(folded, N, "{k} workers");
        assert!(
            !s.fleet
                .host_events()
                .iter()
                .any(|e| matches!(e, HostEvent::UploadsResent { .. })),
            "{k} workers: nobody was asked to send an upload again"
        );
        assert!(
            round.devices.refused.is_empty(),
            "{:?}",
            round.devices.refused
        );
        check_audited_sums(&s.audit_host, &s.audit_edges, 1);
        drop(s.workers);
    }
}

#[test]
fn a_fold_worker_killed_before_the_uploads_and_restarted_loses_nothing() {
    const N: usize = 16;
    let mut s = sharded(N, 2, 2);
    // Shard 0's worker dies once it has the round; the uploads sent to it meanwhile are
    // lost at the broker (its session is gone).
    let opened = |fleet: &SimFleet| {
        fleet.worker_events().first().is_some_and(|e| {
            e.iter()
                .any(|e| matches!(e, WorkerEvent::Opened { round: 1 }))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !opened(&s.fleet) {
        assert!(
            std::time::Instant::now() < deadline,
            "worker 0 never opened round 1"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.workers[0].0.kill().unwrap();
    s.workers[0].0.wait().unwrap();
    s.fleet
        .wait_event("uploads open", Duration::from_secs(120), |e| {
            matches!(e, HostEvent::UploadsOpen { round: 1, .. })
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    s.workers[0] = s.fleet.fold_worker(0).unwrap();
    finish(
        &s.fleet,
        &mut s.host,
        &mut s.devices,
        Duration::from_secs(300),
    );
    let resent: usize = s
        .fleet
        .host_events()
        .iter()
        .filter_map(|e| match e {
            HostEvent::UploadsResent { round: 1, devices } => Some(*devices),
            _ => None,
        })
        .sum();
    let shard0 = (0..N)
        .filter(|i| shard_of(&DeviceId(format!("edge-{i}")), 2) == 0)
        .count();
    assert_eq!(resent, shard0, "shard 0's devices were asked to send again");
    let record =
        fedshield_hil_tests::scale::record(&s.fleet, &Dropouts::none(), 2, (0, 0)).unwrap();
    for round in &record.rounds {
        assert_eq!(round.contributors, N, "round {}", round.round);
    }
    check_audited_sums(&s.audit_host, &s.audit_edges, 2);
}
