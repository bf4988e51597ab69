//! A mosquitto configuration for one fleet (`fedshield-host broker-config`): a password
//! file with one credential per enrolled device and one for the host, topic ACLs derived
//! from the protocol's topic tree, the packet limit, and the listeners.
//!
//! ```text
//! {out}/mosquitto.conf             include it from /etc/mosquitto/conf.d/ (or run it alone)
//! {out}/passwd                     mosquitto password file ($7$: PBKDF2-HMAC-SHA512)
//! {out}/acl                        mosquitto ACL file
//! {out}/credentials/{user}.password   one secret per MQTT user (0600), to install beside
//!                                  the device's key file (FEDSHIELD_MQTT_PASSWORD)
//! ```
//!
//! The ACLs (fleet `f`, a device's username is its device id):
//!
//! | who | write | read |
//! |---|---|---|
//! | the host | `fedshield/f/#` | `fedshield/f/#` |
//! | device `d` | `up/d`, `status/d` | `round`, `down/d`, `global/+`, `snapshot/+` |
//!
//! so a device can neither publish as another device nor read another device's share
//! deliveries (which are encrypted to their recipient anyway: the ACL is defence in depth,
//! and it keeps one device from flooding another's downlink). Re-running the command
//! after enrolling more devices keeps every existing password (a device's credential
//! changes only when its file is deleted) and adds the new ones.
//!
//! The passwords are 256 random bits, so the password file's small PBKDF2 iteration count
//! (mosquitto_passwd's default, [`PBKDF2_ITERATIONS`]) does not matter: there is nothing
//! to guess.

use crate::HostError;
use fedshield_protocol::keyfile::hex;
use fedshield_protocol::messages::check_level;
use fedshield_store::{Access, read_existing, write_atomic};
use rand::RngCore;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// PBKDF2 iterations in the password file: mosquitto_passwd 2.0's default.
pub const PBKDF2_ITERATIONS: u32 = 101;

/// Salt bytes of a password entry: mosquitto_passwd's.
pub const SALT_BYTES: usize = 12;

/// Random bytes of a generated password (hex in the credential file).
pub const PASSWORD_BYTES: usize = 32;

/// The TLS listener of the broker (the one devices use over any network but loopback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// PEM file of the CA that signed the broker's certificate (and the devices' client
    /// certificates, when they are required).
    pub cafile: PathBuf,
    /// The broker's certificate (PEM).
    pub certfile: PathBuf,
    /// The broker's private key (PEM).
    pub keyfile: PathBuf,
    /// Whether clients must present a certificate signed by `cafile` (as well as their
    /// password).
    pub require_client_cert: bool,
}

/// What the configuration is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// The fleet (one topic level).
    pub fleet: String,
    /// The host's MQTT username (no device may have this id).
    pub host_user: String,
    /// The enrolled devices' ids (their MQTT usernames).
    pub devices: Vec<String>,
    /// mosquitto's `max_packet_size`: the links' `--max-packet-bytes`.
    pub max_packet_bytes: usize,
    /// A plain-TCP listener (for the host on the same machine, or a trusted network).
    pub listen: Option<SocketAddr>,
    /// The TLS listener.
    pub tls: Option<TlsListener>,
    /// Where the files will be on the broker's machine (the paths in `mosquitto.conf`).
    pub install_dir: PathBuf,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `mosquitto.conf`.
    pub conf: PathBuf,
    /// Users whose password was generated now.
    pub new_users: Vec<String>,
    /// Users whose existing password was kept.
    pub kept_users: Vec<String>,
}

impl BrokerConfig {
    /// Checks the names (topic levels, the host's name not a device's) and that there is
    /// a listener.
    pub fn check(&self) -> Result<(), HostError> {
        check_level(&self.fleet)?;
        check_level(&self.host_user)?;
        for d in &self.devices {
            check_level(d)?;
            if *d == self.host_user {
                return Err(HostError::Config(format!(
                    "device {d:?} has the host's MQTT username: choose another --host-user"
                )));
            }
        }
        if self.listen.is_none() && self.tls.is_none() {
            return Err(HostError::Config(
                "no listener: give --listen, or --tls-cert and --tls-key".into(),
            ));
        }
        if self.max_packet_bytes < 1024 {
            return Err(HostError::Config(format!(
                "max packet size {} bytes is too small for any of the fleet's messages",
                self.max_packet_bytes
            )));
        }
        Ok(())
    }

    /// The ACL file's text.
    pub fn acl(&self) -> String {
        let f = &self.fleet;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# FedShield fleet {f:?}: written by fedshield-host broker-config"
        );
        let _ = writeln!(s, "# The host: the fleet's whole tree.");
        let _ = writeln!(s, "user {}", self.host_user);
        let _ = writeln!(s, "topic readwrite fedshield/{f}/#");
        let _ = writeln!(
            s,
            "\n# Every device (its username is its device id): its own uplink and status, the"
        );
        let _ = writeln!(
            s,
            "# fleet's broadcasts and its own downlink; nothing of another device."
        );
        for (access, topic) in device_patterns(f) {
            let _ = writeln!(s, "pattern {access} {topic}");
        }
        s
    }

    /// `mosquitto.conf`'s text.
    pub fn mosquitto_conf(&self) -> String {
        let dir = &self.install_dir;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# FedShield fleet {:?}: written by fedshield-host broker-config",
            self.fleet
        );
        let _ = writeln!(s, "per_listener_settings false");
        let _ = writeln!(s, "allow_anonymous false");
        let _ = writeln!(s, "password_file {}", dir.join("passwd").display());
        let _ = writeln!(s, "acl_file {}", dir.join("acl").display());
        let _ = writeln!(
            s,
            "# the links' --max-packet-bytes: a larger packet is refused by both ends"
        );
        let _ = writeln!(s, "max_packet_size {}", self.max_packet_bytes);
        let _ = writeln!(
            s,
            "# the host reads no faster than it folds: a whole round's uploads (a few \
             messages per device) wait for it here, and a round's share deliveries for a \
             device that reconnects"
        );
        let _ = writeln!(
            s,
            "max_queued_messages {}",
            max_queued_messages(self.devices.len())
        );
        if let Some(l) = self.listen {
            let _ = writeln!(s, "\nlistener {} {}", l.port(), l.ip());
        }
        if let Some(t) = &self.tls {
            let _ = writeln!(s, "\nlistener {} {}", t.listen.port(), t.listen.ip());
            let _ = writeln!(s, "cafile {}", t.cafile.display());
            let _ = writeln!(s, "certfile {}", t.certfile.display());
            let _ = writeln!(s, "keyfile {}", t.keyfile.display());
            let _ = writeln!(s, "tls_version tlsv1.2");
            let _ = writeln!(s, "require_certificate {}", t.require_client_cert);
        }
        s
    }

    /// Every MQTT user: the host first, then the devices.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.host_user.as_str()).chain(self.devices.iter().map(String::as_str))
    }
}

/// The ACL patterns of every device of fleet `f` (`%u`: the username, its device id).
pub fn device_patterns(f: &str) -> [(&'static str, String); 7] {
    [
        ("write", format!("fedshield/{f}/up/%u")),
        // Its uploads to a fold shard (any shard: the worker refuses another shard's).
        ("write", format!("fedshield/{f}/upload/+/%u")),
        ("write", format!("fedshield/{f}/status/%u")),
        ("read", format!("fedshield/{f}/down/%u")),
        ("read", format!("fedshield/{f}/round")),
        ("read", format!("fedshield/{f}/global/+")),
        ("read", format!("fedshield/{f}/snapshot/+")),
    ]
}

/// One line of a mosquitto password file: `user:$7$iterations$salt$hash`, the hash
/// PBKDF2-HMAC-SHA512 of the password with the salt, both in standard base64.
pub fn password_line(user: &str, password: &str, salt: &[u8; SALT_BYTES]) -> String {
    use base64::Engine as _;
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2::<hmac::Hmac<sha2::Sha512>>(
        password.as_bytes(),
        salt,
        PBKDF2_ITERATIONS,
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user}:$7${PBKDF2_ITERATIONS}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

/// The credential file of `user` under `out`.
pub fn credential_path(out: &Path, user: &str) -> PathBuf {
    out.join("credentials").join(format!("{user}.password"))
}

/// Writes the configuration into `out`: each user's password is read from its credential
/// file when it exists (a credential file that exists but is not a password is an error,
/// never replaced) and generated with `rng` otherwise; then the password file, the ACL
/// file and `mosquitto.conf`, each atomically.
pub fn write(
    config: &BrokerConfig,
    out: &Path,
    rng: &mut impl RngCore,
) -> Result<Written, HostError> {
    config.check()?;
    let credentials = out.join("credentials");
    std::fs::create_dir_all(&credentials).map_err(|e| HostError::invalid(&credentials, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| HostError::invalid(&credentials, e))?;
    }
    let mut passwd = String::new();
    let (mut new_users, mut kept_users) = (Vec::new(), Vec::new());
    for user in config.users() {
        let path = credential_path(out, user);
        let password = match read_existing(&path)? {
            Some(bytes) => {
                let text = String::from_utf8(bytes).map_err(|e| HostError::invalid(&path, e))?;
                let password = text.trim().to_string();
                if password.len() < 16 || password.contains([':', '\n']) {
                    return Err(HostError::invalid(
                        &path,
                        "not a password of at least 16 characters without ':' (delete it to generate a new one)",
                    ));
                }
                kept_users.push(user.to_string());
                password
            }
            None => {
                let mut secret = [0u8; PASSWORD_BYTES];
                rng.fill_bytes(&mut secret);
                let password = hex(&secret);
                write_atomic(&path, format!("{password}\n").as_bytes(), Access::Private)?;
                new_users.push(user.to_string());
                password
            }
        };
        let mut salt = [0u8; SALT_BYTES];
        rng.fill_bytes(&mut salt);
        passwd.push_str(&password_line(user, &password, &salt));
        passwd.push('\n');
    }
    // The broker reads these as its own user: readable, the passwords in them hashed.
    write_atomic(&out.join("passwd"), passwd.as_bytes(), Access::Public)?;
    write_atomic(&out.join("acl"), config.acl().as_bytes(), Access::Public)?;
    let conf = out.join("mosquitto.conf");
    write_atomic(&conf, config.mosquitto_conf().as_bytes(), Access::Public)?;
    Ok(Written {
        conf,
        new_users,
        kept_users,
    })
}

/// mosquitto's `max_queued_messages` for a fleet of `devices`: the messages waiting for
/// the host in a round (each device's join, shares, masked input, consistency, unmasking,
/// evaluation report and upload chunks: 16 per device covers uploads of up to 9 chunks) and
/// never fewer than 10,000.
pub fn max_queued_messages(devices: usize) -> usize {
    devices.saturating_mul(16).max(10_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn config(dir: &Path) -> BrokerConfig {
        BrokerConfig {
            fleet: "plant-a".into(),
            host_user: "fedshield-host".into(),
            devices: vec!["edge-0".into(), "edge-1".into()],
            max_packet_bytes: 512 * 1024,
            listen: Some("127.0.0.1:1883".parse().unwrap()),
            tls: None,
            install_dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn password_lines_are_mosquitto_pbkdf2_sha512() {
        // Python: base64(hashlib.pbkdf2_hmac('sha512', b'hunter2', bytes(range(12)), 101)).
        let salt: [u8; 12] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            password_line("edge-0", "hunter2", &salt),
            "edge-0:$7$101$AAECAwQFBgcICQoL$VWxVANxkFeHCm5uOn8rOPTQDMK9mSE/ohhmzvuRzpMN2gHRxlNxYm7W8MbMYzkkdo0UinpiCpO1MXzUiHFrHig=="
        );
    }

    #[test]
    fn the_acl_gives_the_host_the_tree_and_each_device_its_own_topics() {
        let dir = tempfile::tempdir().unwrap();
        let acl = config(dir.path()).acl();
        let lines: Vec<&str> = acl.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "user fedshield-host",
                "topic readwrite fedshield/plant-a/#",
                "",
                "pattern write fedshield/plant-a/up/%u",
                "pattern write fedshield/plant-a/upload/+/%u",
                "pattern write fedshield/plant-a/status/%u",
                "pattern read fedshield/plant-a/down/%u",
                "pattern read fedshield/plant-a/round",
                "pattern read fedshield/plant-a/global/+",
                "pattern read fedshield/plant-a/snapshot/+",
            ]
        );
    }

    #[test]
    fn the_conf_names_the_files_the_limit_and_both_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(Path::new("/etc/fedshield/broker"));
        c.tls = Some(TlsListener {
            listen: "0.0.0.0:8883".parse().unwrap(),
            cafile: "/etc/fedshield/broker/ca.pem".into(),
            certfile: "/etc/fedshield/broker/server.pem".into(),
            keyfile: "/etc/fedshield/broker/server.key".into(),
            require_client_cert: false,
        });
        let conf = c.mosquitto_conf();
        for line in [
            "allow_anonymous false",
            "password_file /etc/fedshield/broker/passwd",
            "acl_file /etc/fedshield/broker/acl",
            "max_packet_size 524288",
            "listener 1883 127.0.0.1",
            "listener 8883 0.0.0.0",
            "certfile /etc/fedshield/broker/server.pem",
            "require_certificate false",
            "max_queued_messages 10000",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line:?} in\n{conf}");
        }
        drop(dir);
        // A large fleet's round of uploads waits for the host at the broker.
        assert_eq!(max_queued_messages(3), 10_000);
        assert_eq!(max_queued_messages(5_000), 80_000);
    }

    #[test]
    fn passwords_are_generated_once_and_kept_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let c = config(dir.path());
        let first = write(&c, dir.path(), &mut rng).unwrap();
        assert_eq!(first.new_users, ["fedshield-host", "edge-0", "edge-1"]);
        let path = credential_path(dir.path(), "edge-0");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let password = std::fs::read_to_string(&path).unwrap();
        assert_eq!(password.trim().len(), 2 * PASSWORD_BYTES);
        // A device enrolled later: the others keep their passwords.
        let mut more = c.clone();
        more.devices.push("edge-2".into());
        let second = write(&more, dir.path(), &mut rng).unwrap();
        assert_eq!(second.new_users, ["edge-2"]);
        assert_eq!(second.kept_users, ["fedshield-host", "edge-0", "edge-1"]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), password);
        let passwd = std::fs::read_to_string(dir.path().join("passwd")).unwrap();
        let users: Vec<&str> = passwd
            .lines()
            .map(|l| l.split(':').next().unwrap())
            .collect();
        assert_eq!(users, ["fedshield-host", "edge-0", "edge-1", "edge-2"]);
    }

    #[test]
    fn bad_inputs_are_refused_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let mut c = config(dir.path());
        c.devices.push("fedshield-host".into());
        let e = write(&c, dir.path(), &mut rng).unwrap_err().to_string();
        assert!(e.contains("host's MQTT username"), "{e}");
        let mut c = config(dir.path());
        c.devices.push("a/b".into());
        assert!(write(&c, dir.path(), &mut rng).is_err());
        let mut c = config(dir.path());
        c.listen = None;
        let e = write(&c, dir.path(), &mut rng).unwrap_err().to_string();
        assert!(e.contains("no listener"), "{e}");
        // A credential file that is not a password stays as it is.
        let c = config(dir.path());
        let path = credential_path(dir.path(), "edge-1");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "short\n").unwrap();
        let e = write(&c, dir.path(), &mut rng).unwrap_err().to_string();
        assert!(e.contains("edge-1.password"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "short\n");
        assert!(!dir.path().join("passwd").exists());
    }
}
