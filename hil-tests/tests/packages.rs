//! The Debian packages (`scripts/build-deb.sh`) built from this build's binaries: the files
//! they hold with their modes, their control data, units that `systemd-analyze verify`
//! accepts inside the unpacked package, and packaged settings files that the binaries
//! parse (they stop at the missing key file or fleet directory, after parsing).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The directory of the workspace binaries built by the same `cargo test` run.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn packages_hold_the_binary_unit_and_settings_with_their_modes_and_the_units_verify() {
    let out = tempfile::tempdir().unwrap();
    let built = run(Command::new(repo().join("scripts/build-deb.sh"))
        .args(["--arch", "amd64", "--bin-dir"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .env("DEB_COMPRESSION", "none"));
    let debs: Vec<&str> = built.lines().collect();
    assert_eq!(debs.len(), 2, "{built}");
    // The system's units (targets the packaged units depend on) under the test root.
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "target") {
            std::fs::copy(&path, units.join(path.file_name().unwrap())).unwrap();
        }
    }
    for (who, deb) in ["edge", "host"].iter().zip(&debs) {
        assert!(
            deb.ends_with(&format!("fedshield-{who}_0.1.0_amd64.deb")),
            "{deb}"
        );
        let listing = run(Command::new("dpkg-deb").args(["-c", deb]));
        let mode_of = |path: &str| {
            listing
                .lines()
                .find(|l| l.ends_with(&format!(" .{path}")))
                .unwrap_or_else(|| panic!("{path} not in {deb}:\n{listing}"))
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            mode_of(&format!("/usr/bin/fedshield-{who}")),
            "-rwxr-xr-x root/root"
        );
        assert_eq!(
            mode_of(&format!("/lib/systemd/system/fedshield-{who}.service")),
            "-rw-r--r-- root/root"
        );
        // Settings and environment (the MQTT password): not world-readable; postinst
        // gives them to the group fedshield. The host's package also holds the fold
        // workers' template unit and settings.
        let mut etc = vec![
            format!("/etc/fedshield/{who}.toml"),
            format!("/etc/fedshield/{who}.env"),
        ];
        let mut units = vec![format!("fedshield-{who}.service")];
        if *who == "host" {
            etc.push("/etc/fedshield/fold-worker.toml".into());
            assert_eq!(
                mode_of("/lib/systemd/system/fedshield-fold-worker@.service"),
                "-rw-r--r-- root/root"
            );
            units.push("fedshield-fold-worker@3.service".into());
        }
        for etc in &etc {
            assert_eq!(mode_of(etc), "-rw-r----- root/root");
        }
        let field = |name: &str| run(Command::new("dpkg-deb").args(["-f", deb, name]));
        assert_eq!(field("Package").trim(), format!("fedshield-{who}"));
        assert_eq!(field("Architecture").trim(), "amd64");
        let control = tempfile::tempdir().unwrap();
        run(Command::new("dpkg-deb")
            .args(["-e", deb])
            .arg(control.path()));
        assert_eq!(
            std::fs::read_to_string(control.path().join("conffiles")).unwrap(),
            etc.iter().map(|e| format!("{e}\n")).collect::<String>()
        );
        let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
        assert!(postinst.contains("adduser --system"), "{postinst}");
        // The units (a template's as one instance), inside the unpacked package: no
        // error, no warning.
        run(Command::new("dpkg-deb").args(["-x", deb]).arg(root.path()));
        for unit in &units {
            let verify = Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(format!("--root={}", root.path().display()))
                .arg(unit)
                .output()
                .expect("systemd-analyze (scripts/setup.sh installs systemd)");
            let said = String::from_utf8_lossy(&verify.stderr);
            assert!(verify.status.success(), "{unit}: {said}");
            assert!(
                !said.contains("fedshield-"),
                "systemd-analyze warns: {said}"
            );
        }
    }
    // A unit whose binary is missing does not verify (the check can fail).
    std::fs::remove_file(root.path().join("usr/bin/fedshield-edge")).unwrap();
    let missing = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg("/lib/systemd/system/fedshield-edge.service")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    // A binary of another architecture is refused.
    let wrong = Command::new(repo().join("scripts/build-deb.sh"))
        .args(["--arch", "arm64", "--bin-dir"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not an arm64 binary"));
}

#[test]
fn the_packaged_settings_files_parse() {
    let dir = tempfile::tempdir().unwrap();
    // The edge: every key is one of run's flags; it stops at the missing key file.
    let missing_key = dir.path().join("no-key.json");
    let edge = Command::new(bin_dir().join("fedshield-edge"))
        .args(["run", "--config"])
        .arg(repo().join("packaging/edge.toml"))
        .arg("--key")
        .arg(&missing_key)
        .arg("--events")
        .arg(dir.path().join("events.jsonl"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&edge.stderr);
    assert_eq!(edge.status.code(), Some(1), "{said}");
    assert!(said.contains(missing_key.to_str().unwrap()), "{said}");
    // The host: it stops at the fleet directory's missing authority.pub.
    let host = Command::new(bin_dir().join("fedshield-host"))
        .args(["serve", "--config"])
        .arg(repo().join("packaging/host.toml"))
        .arg("--fleet-dir")
        .arg(dir.path().join("fleet"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .arg("--events")
        .arg(dir.path().join("host-events.jsonl"))
        .env("FEDSHIELD_MQTT_PASSWORD", "x")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&host.stderr);
    assert_eq!(host.status.code(), Some(1), "{said}");
    assert!(said.contains("authority.pub"), "{said}");
    // A fold worker: the same.
    let worker = Command::new(bin_dir().join("fedshield-host"))
        .args(["fold-worker", "--config"])
        .arg(repo().join("packaging/fold-worker.toml"))
        .args(["--shard", "0", "--fleet-dir"])
        .arg(dir.path().join("fleet"))
        .env("FEDSHIELD_MQTT_PASSWORD", "x")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&worker.stderr);
    assert_eq!(worker.status.code(), Some(1), "{said}");
    assert!(said.contains("authority.pub"), "{said}");
    // A key that is no flag: refused by the parser (exit 2), naming it.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "no-such-setting = 1\n").unwrap();
    let refused = Command::new(bin_dir().join("fedshield-edge"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no-such-setting"));
}
