//! `fedshield-host enrol`: the fleet directory it writes is what `serve` and the devices
//! read: a registry that accepts the devices' signatures, and key files that parse.

use fedshield_host::fleet::FleetDir;
use fedshield_protocol::keyfile::DeviceKey;
use std::process::Command;

#[test]
fn enrol_writes_a_registry_and_device_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(["enrol", "--fleet-dir"])
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
    for d in ["edge-0", "edge-1"] {
        let key =
            DeviceKey::parse(&std::fs::read_to_string(fleet.device_key_path(d)).unwrap()).unwrap();
        let (secret, authority) = key.keys().unwrap();
        assert_eq!(authority, registry.authority);
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
}
