//! `keygen` and `install-cert`: the device's identity is born on the device and never
//! leaves it; only its enrolment request goes to the fleet authority, and the
//! authority's answer (the device's certificate, the host's certificate, the authority's
//! public key) comes back to be checked and assembled into the key file `run --key` reads.

use anyhow::Context;
use fedshield_crypto::identity::{Enrolment, EnrolmentRequest, HostCertificate, Identity};
use fedshield_protocol::keyfile::{DeviceIdentity, DeviceKey, hex, unhex32};
use fedshield_protocol::messages::check_level;
use fedshield_store::{Access, read_existing, write_atomic};
use std::path::{Path, PathBuf};

/// `keygen`'s flags.
#[derive(clap::Args)]
pub struct KeygenArgs {
    /// This device's id in the fleet (one MQTT topic level).
    #[arg(long)]
    pub device: String,
    /// Folder for identity.key (owner-only) and enrolment-request.json.
    #[arg(long)]
    pub out: PathBuf,
}

/// `install-cert`'s flags.
#[derive(clap::Args)]
pub struct InstallCertArgs {
    /// The identity file `keygen` wrote.
    #[arg(long)]
    pub identity: PathBuf,
    /// The authority's public key (authority.pub).
    #[arg(long)]
    pub authority: PathBuf,
    /// This device's certificate from the authority.
    #[arg(long)]
    pub cert: PathBuf,
    /// The host's certificate (host.json).
    #[arg(long)]
    pub host_cert: PathBuf,
    /// The key file to write (what `run --key` reads; owner-only).
    #[arg(long)]
    pub out: PathBuf,
}

/// Creates the device's identity (refusing to replace one) and its enrolment request.
pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    check_level(&args.device)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("identity.key");
    anyhow::ensure!(
        read_existing(&path)?.is_none(),
        "{} exists: this device already has an identity (delete it only to re-enrol under a new key)",
        path.display()
    );
    let identity = Identity::generate(&mut rand::rng());
    let file = DeviceIdentity {
        device: args.device.as_str().into(),
        secret: hex(&identity.secret()),
    };
    write_atomic(
        &path,
        serde_json::to_string_pretty(&file)?.as_bytes(),
        Access::Private,
    )?;
    let request = EnrolmentRequest::new(&identity, &args.device);
    let request_path = args.out.join("enrolment-request.json");
    write_atomic(
        &request_path,
        serde_json::to_string_pretty(&request)?.as_bytes(),
        Access::Public,
    )?;
    println!("{}", request_path.display());
    eprintln!(
        "identity of {} in {} (public key {}); carry {} to the fleet authority",
        args.device,
        path.display(),
        hex(&identity.public_key()),
        request_path.display()
    );
    Ok(())
}

/// Checks the authority's answer against the device's identity and writes the key file.
pub fn install_cert(args: InstallCertArgs) -> anyhow::Result<()> {
    let identity = DeviceIdentity::parse(&read_text(&args.identity)?)
        .with_context(|| args.identity.display().to_string())?;
    let authority = unhex32(&read_text(&args.authority)?)
        .with_context(|| args.authority.display().to_string())?;
    let cert: Enrolment = serde_json::from_str(&read_text(&args.cert)?)
        .with_context(|| args.cert.display().to_string())?;
    let host: HostCertificate = serde_json::from_str(&read_text(&args.host_cert)?)
        .with_context(|| args.host_cert.display().to_string())?;
    let key = DeviceKey::assemble(&identity, authority, &cert, &host)?;
    host.check_time(fedshield_store::unix_seconds())
        .with_context(|| args.host_cert.display().to_string())?;
    write_atomic(
        &args.out,
        serde_json::to_string_pretty(&key)?.as_bytes(),
        Access::Private,
    )?;
    println!("{}", args.out.display());
    eprintln!(
        "key file of {} for fleet {} written to {}",
        key.device,
        host.fleet,
        args.out.display()
    );
    Ok(())
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
