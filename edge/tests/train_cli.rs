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
