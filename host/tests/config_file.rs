//! `fedshield-host serve --config FILE`: the file's settings apply, flags override them, and
//! a bad file is refused with its name and the offending key.

use std::process::Command;

fn serve(config: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(extra)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn a_config_file_sets_serve_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = dir.path().join("out");
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "fleet = \"from-file\"\nbroker = \"127.0.0.1:{port}\"\nembedded_broker = true\n\
             rounds = 0\nrho = \"7\"\ntargets = [\"q_proj\", \"v_proj\"]\nrank = 2\n\
             fleet-dir = \"{}\"\nout = \"{}\"\n",
            dir.path().join("fleet").display(),
            out.display()
        ),
    )
    .unwrap();
    // The file's keep rate 7 is refused ...
    let o = serve(&config, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains('7'), "{err}");
    // ... and overridden by the flag; no rounds to run, so serve writes its outputs (for
    // the fleet's host key and certificate, made by the one-machine enrolment).
    let enrolled = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args([
            "enrol",
            "--fleet",
            "from-file",
            "--devices",
            "edge-0",
            "--fleet-dir",
        ])
        .arg(dir.path().join("fleet"))
        .arg("--authority-dir")
        .arg(dir.path().join("authority"))
        .status()
        .unwrap();
    assert!(enrolled.success());
    let o = serve(&config, &["--rho", "ramp:0.8:0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["fleet"], "from-file");
    assert_eq!(
        metrics["prune"]["schedule"]["ramp"]["first"].as_f64(),
        Some(0.8)
    );
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["r"], 2);
    assert_eq!(adapter["target_modules"][1], "v_proj");
}

#[test]
fn a_bad_config_file_is_refused_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(&config, "no_such_setting = 3\n").unwrap();
    let o = serve(&config, &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--no-such-setting"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&config, "rounds = {a = 1}\n").unwrap();
    let o = serve(&config, &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("rounds"));
    let o = serve(&dir.path().join("missing.toml"), &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.toml"));
}
