//! `fedshield-host enrol`: the fleet directory it writes is what `serve` and the devices
//! read: a registry that accepts the devices' signatures, and key files that parse.

use fedshield_host::fleet::FleetDir;
use fedshield_protocol::keyfile::DeviceKey;
use std::process::Command;

#[test]
fn enrol_writes_a_registry_and_device_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(["enrol", "--fleet", "lab", "--fleet-dir"])
        .arg(dir.path())
        .args(["--devices", "edge-0,edge-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet = FleetDir(dir.path().to_path_buf());
    let registry = fleet.registry().unwrap();
    assert_eq!(registry.len(), 2);
    let (host, cert) = fleet.host("lab").unwrap();
    assert_eq!(cert.public_key, host.public_key());
    assert_eq!(cert.verify(&registry.authority, "lab"), Ok(()));
    for d in ["edge-0", "edge-1"] {
        let key =
            DeviceKey::parse(&std::fs::read_to_string(fleet.device_key_path(d)).unwrap()).unwrap();
        let (secret, authority) = key.keys().unwrap();
        assert_eq!(authority, registry.authority);
        // Every device learns the host's certificate with its key file.
        assert_eq!(key.host_certificate().unwrap(), cert);
        let identity = fedshield_crypto::identity::Identity::from_secret(secret);
        assert_eq!(
            registry.enrolment(&key.device).unwrap().public_key,
            identity.public_key()
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(fleet.device_key_path(d))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "key files are private");
    }
    // A name that is not one topic level is refused.
    let bad = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(["enrol", "--fleet-dir"])
        .arg(dir.path())
        .args(["--devices", "a/b"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    // The directory is lab's: enrolling for another fleet is refused.
    assert!(fleet.enrol("prod", "edge-9").is_err());
}

#[test]
fn unreadable_fleet_files_are_reported_and_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = FleetDir(dir.path().to_path_buf());
    fleet.enrol("lab", "edge-0").unwrap();
    let authority = std::fs::read(dir.path().join("authority.key")).unwrap();
    // A registry that does not parse: an error, and the file is left as it was.
    std::fs::write(dir.path().join("registry.json"), b"{ truncated").unwrap();
    let e = fleet.enrol("lab", "edge-1").unwrap_err();
    assert!(format!("{e:#}").contains("registry.json"), "{e:#}");
    assert_eq!(
        std::fs::read(dir.path().join("registry.json")).unwrap(),
        b"{ truncated"
    );
    // An authority key that is not a key: an error, never a new authority.
    std::fs::write(dir.path().join("authority.key"), b"short").unwrap();
    assert!(fleet.registry().is_err());
    assert_eq!(
        std::fs::read(dir.path().join("authority.key")).unwrap(),
        b"short"
    );
    std::fs::write(dir.path().join("authority.key"), &authority).unwrap();
    assert!(fleet.host("lab").is_ok());
}

#[test]
fn serve_refuses_a_corrupt_state_file_and_leaves_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = FleetDir(dir.path().join("fleet"));
    fleet.enrol("lab", "edge-0").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let garbage = b"\xffnot a host state".to_vec();
    std::fs::write(out.join("state.bin"), &garbage).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args([
            "serve",
            "--fleet",
            "lab",
            "--rounds",
            "1",
            "--broker",
            "127.0.0.1:9",
        ])
        .args(["--rank", "2", "--targets", "v_proj", "--fleet-dir"])
        .arg(&fleet.0)
        .arg("--out")
        .arg(&out)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("state.bin"), "{stderr}");
    assert_eq!(std::fs::read(out.join("state.bin")).unwrap(), garbage);
}
