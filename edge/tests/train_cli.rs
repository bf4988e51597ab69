//! `fedshield-edge train --text`: a local fine-tune on plain-text documents (loss on every
//! token) with SmolLM2-135M lowers the held-out loss and writes a PEFT adapter.

use std::process::Command;

#[test]
fn plain_text_fine_tune_lowers_the_held_out_loss() {
    let dir = std::env::temp_dir().join(format!("fedshield-train-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 30 documents in one house style; every 5th is held out. Blank lines and `%` lines both
    // separate documents.
    let mut text = String::new();
    for i in 0..30 {
        let sep = if i % 2 == 0 { "\n" } else { "%\n" };
        text.push_str(&format!(
            "Site log {i}: crane inspected, scaffold tagged green, concrete pour number {} \
             signed off by the foreman at {}:00.\n{sep}",
            i * 7 % 23,
            6 + i % 12
        ));
    }
    let data = dir.join("logs.txt");
    std::fs::write(&data, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
        .args(["train", "--text"])
        .arg(&data)
        .args(["--eval-fraction", "0.2", "--steps", "6", "--batch", "4"])
        .args([
            "--lr",
            "2e-3",
            "--warmup",
            "2",
            "--max-len",
            "40",
            "--eval-every",
            "0",
        ])
        .args(["--rank", "8", "--alpha", "16", "--out"])
        .arg(dir.join("adapter"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("(24 train examples"), "{stderr}");
    assert!(stderr.contains("6 held out"), "{stderr}");
    // "eval      : held-out loss A -> B (perplexity ...)"
    let line = stderr
        .lines()
        .find(|l| l.contains("held-out loss") && l.contains("->"))
        .unwrap_or_else(|| panic!("no result line in {stderr}"));
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.trim_matches(|c| c == '(' || c == ')').parse().ok())
        .collect();
    let (before, after) = (nums[0], nums[1]);
    eprintln!("held-out loss {before:.4} -> {after:.4}");
    assert!(after < before - 0.3, "{line}");
    assert!(dir.join("adapter/adapter_model.safetensors").exists());
    assert!(dir.join("adapter/adapter_config.json").exists());
    // --data and --text together are refused.
    let both = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
        .args(["train", "--text"])
        .arg(&data)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A copy of the telemetry fixture `name` (shared/telemetry/fixtures).
fn fixture_copy(name: &str) -> tempfile::TempDir {
    use fedshield_telemetry::fixtures;
    let dir = tempfile::tempdir().unwrap();
    fixtures::copy_tree(&fixtures::path(name), dir.path()).unwrap();
    dir
}

/// On a box 4 C below its passive trip point every step is slowed; a box past it for
/// longer than --max-pause-seconds ends training before the first step, and the adapter is
/// still written. Both recorded in train_report.json.
#[test]
fn training_on_a_hot_box_is_slowed_or_stopped_as_its_sensors_say() {
    let hot = fixture_copy("orin-nano-jp6");
    let cpu = hot
        .path()
        .join("sys/devices/virtual/thermal/thermal_zone0/temp");
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("docs.txt");
    std::fs::write(
        &data,
        "one short document\n\nanother short document\n\na third\n",
    )
    .unwrap();
    let train = |celsius: i64, adapter: &str| {
        std::fs::write(&cpu, format!("{}\n", celsius * 1000)).unwrap();
        let run = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
            .args(["train", "--text"])
            .arg(&data)
            .args(["--steps", "2", "--batch", "1", "--max-len", "16"])
            .args(["--eval-every", "0", "--rank", "2", "--targets", "v_proj"])
            .args(["--max-pause-seconds", "0", "--telemetry-root"])
            .arg(hot.path())
            .arg("--out")
            .arg(out.path().join(adapter))
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let report =
            std::fs::read_to_string(out.path().join(adapter).join("train_report.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&report).unwrap()
    };
    let warm = train(95, "warm");
    let pacing = &warm["pacing"];
    assert_eq!(pacing["steps"], 2);
    assert_eq!(pacing["slowed_steps"], 2);
    assert!(
        (pacing["slept_s"].as_f64().unwrap() - 2.4).abs() < 1e-9,
        "{pacing}"
    );
    assert_eq!(pacing["throttles"][0]["cause"], "thermal");
    assert!(
        pacing["joules"].as_f64().unwrap() > 0.0,
        "the fixture's rails draw power"
    );
    let tripped = train(100, "tripped");
    assert_eq!(tripped["pacing"]["steps"], 0);
    assert_eq!(tripped["pacing"]["stops"], 1);
    assert!(
        out.path()
            .join("tripped/adapter_model.safetensors")
            .exists()
    );
}

/// The memory planner: with memory to spare the fastest plan is chosen, probed and
/// recorded; a named plan is used as named; a budget no plan fits and a plan name that does
/// not parse stop the run before training with a clear message.
#[test]
fn the_plan_is_chosen_probed_recorded_or_refused_with_a_reason() {
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("docs.txt");
    std::fs::write(
        &data,
        "alpha beta gamma delta\n\nepsilon zeta eta theta\n\niota kappa\n",
    )
    .unwrap();
    let train = |extra: &[&str], adapter: &str| {
        Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
            .args(["train", "--text"])
            .arg(&data)
            .args([
                "--steps",
                "1",
                "--batch",
                "2",
                "--max-len",
                "16",
                "--eval-every",
                "0",
            ])
            .args([
                "--rank",
                "2",
                "--targets",
                "v_proj,down_proj",
                "--no-pacing",
            ])
            .args(extra)
            .arg("--out")
            .arg(out.path().join(adapter))
            .output()
            .unwrap()
    };
    let report = |adapter: &str| -> serde_json::Value {
        let text =
            std::fs::read_to_string(out.path().join(adapter).join("train_report.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let auto = train(&[], "auto");
    let stderr = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "{stderr}");
    assert!(
        stderr.contains("plan      : plan full-dense-mb2"),
        "{stderr}"
    );
    let plan = &report("auto")["plan"];
    assert_eq!(plan["choice"]["name"], "full-dense-mb2");
    assert_eq!(plan["choice"]["fits"], true);
    assert!(plan["probe_peak"].as_u64().unwrap() > 0, "{plan}");
    assert!(
        plan["budget_source"]
            .as_str()
            .unwrap()
            .contains("MemAvailable")
    );

    let named = train(&["--plan", "ckpt-res10-mb1"], "named");
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    let plan = &report("named")["plan"]["choice"];
    assert_eq!(plan["name"], "ckpt-res10-mb1");
    assert_eq!(plan["plan"]["micro_batch"], 1);

    let starved = train(&["--memory-budget", "1"], "starved");
    let stderr = String::from_utf8_lossy(&starved.stderr);
    assert!(!starved.status.success());
    assert!(
        stderr.contains("no training plan works on this box"),
        "{stderr}"
    );
    assert!(
        !out.path()
            .join("starved/adapter_model.safetensors")
            .exists()
    );

    let bad = train(&["--plan", "turbo"], "bad");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(stderr.contains("plan \"turbo\": expected"), "{stderr}");
}
