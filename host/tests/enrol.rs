//! The fleet's keys: `fedshield-host enrol` (the one-machine convenience) and the offline
//! flow (`authority`, `keygen`): the fleet directory they write is what `serve` and the
//! devices read: a registry that accepts the devices' signatures, and key files that parse.

use fedshield_crypto::identity::{EnrolmentRequest, Identity};
use fedshield_host::fleet::{AuthorityDir, FleetDir};
use fedshield_protocol::keyfile::DeviceKey;
use std::process::Command;

#[test]
fn enrol_writes_a_registry_and_device_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(["enrol", "--fleet", "lab", "--fleet-dir"])
        .arg(dir.path().join("fleet"))
        .arg("--authority-dir")
        .arg(dir.path().join("authority"))
        .args(["--devices", "edge-0,edge-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet = FleetDir(dir.path().join("fleet"));
    let (registry, revocations) = fleet.registry().unwrap();
    assert_eq!(registry.len(), 2);
    assert_eq!(revocations.serial, 0);
    let (host, cert) = fleet.host("lab").unwrap();
    assert_eq!(cert.public_key, host.public_key());
    assert_eq!(cert.verify(&registry.authority, "lab"), Ok(()));
    // The host's directory holds no authority secret.
    assert!(!dir.path().join("fleet/authority.key").exists());
    assert!(dir.path().join("authority/authority.key").exists());
    for d in ["edge-0", "edge-1"] {
        let key =
            DeviceKey::parse(&std::fs::read_to_string(fleet.device_key_path(d)).unwrap()).unwrap();
        let (secret, authority) = key.keys().unwrap();
        assert_eq!(authority, registry.authority);
        // Every device learns the host's certificate with its key file.
        assert_eq!(key.host_certificate().unwrap(), cert);
        let identity = Identity::from_secret(secret);
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
        .arg(dir.path().join("fleet"))
        .arg("--authority-dir")
        .arg(dir.path().join("authority"))
        .args(["--devices", "a/b"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    // The directory is lab's: enrolling for another fleet is refused.
    let authority = AuthorityDir(dir.path().join("authority"));
    assert!(fleet.enrol(&authority, "prod", "edge-9").is_err());
    // Another authority's enrolment into this directory is refused.
    let other = AuthorityDir(dir.path().join("other"));
    assert!(fleet.enrol(&other, "lab", "edge-9").is_err());
}

/// Runs `fedshield-host` with `args`; its standard output (it must succeed).
fn host_cli(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `fedshield-host` with `args` fails.
fn host_cli_fails(args: &[&std::ffi::OsStr]) -> bool {
    !Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(args)
        .output()
        .unwrap()
        .status
        .success()
}

/// The fleet's keys as a real deployment makes them: an offline authority, the host's key
/// born in its directory, each device's request made apart; certificates carried by hand;
/// a revocation list that the host reads again.
#[test]
fn keys_are_born_where_they_are_used_and_the_authority_signs_offline() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).into_os_string();
    let o = std::ffi::OsStr::new;
    host_cli(&[o("authority"), o("init"), o("--dir"), &p("auth")]);
    // A second init would void every certificate: refused, the key unchanged.
    let key = std::fs::read(dir.path().join("auth/authority.key")).unwrap();
    assert!(host_cli_fails(&[
        o("authority"),
        o("init"),
        o("--dir"),
        &p("auth")
    ]));
    assert_eq!(
        std::fs::read(dir.path().join("auth/authority.key")).unwrap(),
        key
    );
    // The host: its key and request, certified, installed with the authority's public key.
    let request = host_cli(&[
        o("keygen"),
        o("--fleet"),
        o("lab"),
        o("--fleet-dir"),
        &p("host"),
    ]);
    assert_eq!(
        request.trim(),
        dir.path().join("host/host-request.json").to_str().unwrap()
    );
    host_cli(&[
        o("authority"),
        o("certify-host"),
        o("--dir"),
        &p("auth"),
        o("--request"),
        &p("host/host-request.json"),
        o("--out"),
        &p("host/host.json"),
    ]);
    std::fs::copy(
        dir.path().join("auth/authority.pub"),
        dir.path().join("host/authority.pub"),
    )
    .unwrap();
    let fleet = FleetDir(dir.path().join("host"));
    let (host, cert) = fleet.host("lab").unwrap();
    assert_eq!(cert.public_key, host.public_key());
    assert!(fleet.host("prod").is_err());
    // Devices' requests (made here as a device would make them) signed into certificates.
    std::fs::create_dir_all(dir.path().join("host/devices")).unwrap();
    for d in ["edge-0", "edge-1"] {
        let request = EnrolmentRequest::new(&Identity::generate(&mut rand::rng()), d);
        let req = dir.path().join(format!("{d}-request.json"));
        std::fs::write(&req, serde_json::to_string(&request).unwrap()).unwrap();
        host_cli(&[
            o("authority"),
            o("enrol"),
            o("--dir"),
            &p("auth"),
            o("--request"),
            req.as_os_str(),
            o("--out"),
            fleet.device_cert_path(d).as_os_str(),
        ]);
    }
    // A request whose signature is not its key's: refused, no certificate written.
    let mut request = EnrolmentRequest::new(&Identity::generate(&mut rand::rng()), "edge-2");
    request.public_key = [7; 32];
    std::fs::write(
        dir.path().join("forged.json"),
        serde_json::to_string(&request).unwrap(),
    )
    .unwrap();
    assert!(host_cli_fails(&[
        o("authority"),
        o("enrol"),
        o("--dir"),
        &p("auth"),
        o("--request"),
        &p("forged.json"),
        o("--out"),
        &p("forged-cert.json"),
    ]));
    assert!(!dir.path().join("forged-cert.json").exists());
    let (registry, _) = fleet.registry().unwrap();
    let names: Vec<_> = registry.devices().map(|d| d.0.clone()).collect();
    assert_eq!(names, ["edge-0", "edge-1"]);
    // Revoked at the authority, copied to the host: the next read leaves edge-1 out.
    host_cli(&[
        o("authority"),
        o("revoke"),
        o("--dir"),
        &p("auth"),
        o("--device"),
        o("edge-1"),
    ]);
    std::fs::copy(
        dir.path().join("auth/revocations.json"),
        fleet.revocations_path(),
    )
    .unwrap();
    let (registry, list) = fleet.registry().unwrap();
    assert_eq!(list.serial, 1);
    let names: Vec<_> = registry.devices().map(|d| d.0.clone()).collect();
    assert_eq!(names, ["edge-0"]);
    // A revoked id cannot be enrolled again.
    let again = EnrolmentRequest::new(&Identity::generate(&mut rand::rng()), "edge-1");
    assert!(AuthorityDir(dir.path().join("auth")).enrol(&again).is_err());
    // A tampered list (edge-1 taken off) or a certificate under another name: errors
    // naming the file, the files left as they are.
    let text = std::fs::read_to_string(fleet.revocations_path()).unwrap();
    let tampered = text.replace("edge-1", "edge-5");
    std::fs::write(fleet.revocations_path(), &tampered).unwrap();
    let e = fleet.registry().unwrap_err().to_string();
    assert!(e.contains("revocations.json"), "{e}");
    assert_eq!(
        std::fs::read_to_string(fleet.revocations_path()).unwrap(),
        tampered
    );
    std::fs::write(fleet.revocations_path(), &text).unwrap();
    std::fs::copy(
        fleet.device_cert_path("edge-0"),
        fleet.device_cert_path("edge-7"),
    )
    .unwrap();
    let e = fleet.registry().unwrap_err().to_string();
    assert!(e.contains("edge-7.cert.json"), "{e}");
}

#[test]
fn unreadable_fleet_files_are_reported_and_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = FleetDir(dir.path().join("fleet"));
    let authority = AuthorityDir(dir.path().join("authority"));
    fleet.enrol(&authority, "lab", "edge-0").unwrap();
    // A certificate that does not parse: an error naming it, and the file is left as it was.
    let cert = fleet.device_cert_path("edge-0");
    let good = std::fs::read(&cert).unwrap();
    std::fs::write(&cert, b"{ truncated").unwrap();
    let e = fleet.registry().unwrap_err();
    assert!(format!("{e:#}").contains("edge-0.cert.json"), "{e:#}");
    assert_eq!(std::fs::read(&cert).unwrap(), b"{ truncated");
    std::fs::write(&cert, &good).unwrap();
    // An authority key that is not a key: an error, never a new authority.
    let key = dir.path().join("authority/authority.key");
    let secret = std::fs::read(&key).unwrap();
    std::fs::write(&key, b"short").unwrap();
    assert!(fleet.enrol(&authority, "lab", "edge-1").is_err());
    assert_eq!(std::fs::read(&key).unwrap(), b"short");
    std::fs::write(&key, &secret).unwrap();
    assert!(fleet.host("lab").is_ok());
    // A fleet directory of the old layout (the authority's secret in it): refused with
    // the way out, the file left where it is.
    std::fs::write(dir.path().join("fleet/authority.key"), &secret).unwrap();
    let e = fleet.host("lab").unwrap_err().to_string();
    assert!(e.contains("offline"), "{e}");
    assert!(dir.path().join("fleet/authority.key").exists());
}

#[test]
fn serve_refuses_a_corrupt_state_file_and_leaves_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = FleetDir(dir.path().join("fleet"));
    fleet
        .enrol(&AuthorityDir(dir.path().join("authority")), "lab", "edge-0")
        .unwrap();
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

/// `serve` against `fleet` (a broker nobody listens on): its stderr when it fails to start.
fn serve_fails(fleet: &FleetDir, out: &std::path::Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_fedshield-host"))
        .args(["serve", "--fleet", "lab", "--rounds", "1"])
        .args([
            "--broker",
            "127.0.0.1:9",
            "--rank",
            "2",
            "--targets",
            "v_proj",
        ])
        .arg("--fleet-dir")
        .arg(&fleet.0)
        .arg("--out")
        .arg(out)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn host_certificates_get_rising_serials_expire_rotate_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let authority = AuthorityDir(dir.path().join("authority"));
    let fleet = FleetDir(dir.path().join("fleet"));
    let out = dir.path().join("out");
    fleet.enrol(&authority, "lab", "edge-0").unwrap();
    let (key, first) = fleet.host("lab").unwrap();
    assert_eq!(first.serial, 1);
    let now = fedshield_store::unix_seconds();
    assert!(first.not_after > now + 89 * 86_400, "{first:?}");
    // Certified again (a renewal of the same key): the next serial. An expired one: serve
    // refuses to start with it, naming the file.
    let request = EnrolmentRequest::new(&key, "lab");
    let renewed = authority.certify_host(&request, now, 3_600).unwrap();
    assert_eq!(renewed.serial, 2);
    let expired = authority.certify_host(&request, 1_000, 60).unwrap();
    assert_eq!(expired.serial, 3);
    let write = |cert: &fedshield_crypto::identity::HostCertificate| {
        std::fs::write(
            fleet.host_cert_path(),
            serde_json::to_vec_pretty(cert).unwrap(),
        )
        .unwrap();
    };
    write(&expired);
    let e = serve_fails(&fleet, &out);
    assert!(e.contains("expired") && e.contains("host.json"), "{e}");
    // Rotation: the key and certificate retire (renamed, kept), a new key and request.
    write(&renewed);
    assert_eq!(fleet.retire_host_key("lab").unwrap(), 2);
    assert!(fleet.0.join("host.key.retired-2").exists());
    assert!(fleet.0.join("host.json.retired-2").exists());
    fleet.keygen("lab").unwrap();
    let request: EnrolmentRequest =
        fedshield_host::fleet::read_json(&fleet.host_request_path()).unwrap();
    assert_ne!(request.public_key, key.public_key());
    // The retired key revoked: the authority will not certify it again, and a host still
    // holding a certificate of it refuses to start.
    let list = authority.revoke_host(key.public_key()).unwrap();
    assert!(list.hosts.contains(&key.public_key()));
    let again = authority.certify_host(&EnrolmentRequest::new(&key, "lab"), now, 3_600);
    assert!(again.unwrap_err().to_string().contains("revoked"));
    let cert = authority.certify_host(&request, now, 3_600).unwrap();
    assert_eq!(cert.serial, 4);
    std::fs::copy(authority.revocations_path(), fleet.revocations_path()).unwrap();
    std::fs::rename(fleet.0.join("host.key.retired-2"), fleet.0.join("host.key")).unwrap();
    write(&renewed);
    let e = serve_fails(&fleet, &out);
    assert!(e.contains("revoked"), "{e}");
    // A corrupt serial counter is reported, not reset.
    std::fs::write(authority.0.join("host-serial"), "four\n").unwrap();
    let e = authority
        .certify_host(&request, now, 3_600)
        .unwrap_err()
        .to_string();
    assert!(e.contains("host-serial"), "{e}");
}
