//! The quality experiment's CI version (`fedshield-edge quality --quick`) on SmolLM2 and the
//! FAQ split: it writes the documented report and plot, every federated run learns, the
//! encrypted dense run matches plaintext FedAvg within 0.1%, and the pruned uploads shrink
//! with rho and the body width (at most 0.5 bytes per LoRA parameter at rho = 10%, and at
//! rho = 50% with 8-bit bodies).

use std::process::Command;

#[test]
fn quick_quality_experiment_writes_its_report_and_meets_the_byte_targets() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_fedshield-edge"))
        .args(["quality", "--quick", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("quality.json")).unwrap())
            .unwrap();
    let svg = std::fs::read_to_string(out.path().join("quality.svg")).unwrap();
    let runs = json["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "local-only",
            "fedavg-dense-plain",
            "fedavg-enc-rho100",
            "fedavg-enc-rho50",
            "fedavg-enc-rho25",
            "fedavg-enc-rho10",
            "fedavg-enc-rho50-b8",
            "fedavg-enc-rho50-b8-q8down",
            "centralised"
        ]
    );
    assert_eq!(svg.matches("<polyline").count(), runs.len());
    let initial = json["initial_eval_loss"].as_f64().unwrap();
    let run = |name: &str| runs.iter().find(|r| r["name"] == name).unwrap();
    let last = |name: &str| {
        let losses = run(name)["eval_loss_per_round"].as_array().unwrap();
        assert_eq!(losses.len(), 2, "{name}: one loss per round");
        losses.last().unwrap().as_f64().unwrap()
    };
    for name in &names {
        assert!(
            last(name) < initial,
            "{name} did not learn: {} vs {initial}",
            last(name)
        );
    }
    // The 8-bit downlink: a quarter of the f32 downlink's bytes and below the upload, the
    // loss within 0.1% of the f32 downlink's.
    let down = |name: &str| {
        run(name)["download_bytes_per_client_per_round"]
            .as_f64()
            .unwrap()
    };
    let (q8, f32) = (
        down("fedavg-enc-rho50-b8-q8down"),
        down("fedavg-enc-rho50-b8"),
    );
    assert!(q8 * 3.9 < f32, "downlink {q8} vs {f32} bytes");
    assert!(
        q8 <= run("fedavg-enc-rho50-b8")["upload_bytes_per_client_per_round"]
            .as_f64()
            .unwrap()
            * 1.02,
        "downlink {q8} bytes against the upload"
    );
    let (lq, lf) = (
        last("fedavg-enc-rho50-b8-q8down"),
        last("fedavg-enc-rho50-b8"),
    );
    assert!(
        ((lq - lf) / lf).abs() < 1e-3,
        "q8 downlink {lq} vs f32 {lf}"
    );
    let dense = last("fedavg-dense-plain");
    let enc = last("fedavg-enc-rho100");
    assert!(
        ((enc - dense) / dense).abs() < 1e-3,
        "rho 100%: {enc} vs {dense}"
    );
    let bytes = |name: &str| {
        run(name)["upload_bytes_per_param_per_round"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(bytes("fedavg-dense-plain"), 4.0);
    assert!(
        bytes("fedavg-enc-rho10") <= 0.5,
        "{}",
        bytes("fedavg-enc-rho10")
    );
    let narrow = bytes("fedavg-enc-rho50-b8");
    assert!(
        (0.5..=0.51).contains(&narrow),
        "rho 50% with 8-bit bodies: {narrow} bytes per parameter"
    );
    assert_eq!(run("fedavg-enc-rho50-b8")["body_bits"], 8);
    assert_eq!(run("fedavg-enc-rho50")["body_bits"], 32);
    for (a, b) in [
        ("fedavg-enc-rho100", "fedavg-enc-rho50"),
        ("fedavg-enc-rho50", "fedavg-enc-rho25"),
        ("fedavg-enc-rho25", "fedavg-enc-rho10"),
    ] {
        assert!(
            bytes(b) < bytes(a) * 0.55,
            "{b} is not about half of {a} or less"
        );
    }
    for r in runs {
        assert!(r["rho"].is_null() || r["rho"].as_f64().unwrap() > 0.0);
        assert!(r["encrypted"].is_boolean());
    }
}
