//! Fixtures for whole-system tests: real external processes (mosquitto, socat) started on
//! free resources and stopped when the guard drops. Nothing here is a mock.

pub mod audit;
pub mod net_relay;
pub mod rig_sim;
pub mod scale;
pub mod sim;

use anyhow::{Context, bail};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback address with a port that was free a moment ago, below the kernel's ephemeral
/// range: the kernel hands ephemeral ports to every outgoing connection and `bind(0)` of
/// every test running beside this one, so a port from that range can be taken between this
/// check and the broker's own bind (the embedded-broker test lost its port that way).
pub fn free_local_addr() -> SocketAddr {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (first, last) = (10_000u16, low.saturating_sub(1).max(10_001));
    let span = u32::from(last - first);
    let mut seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1_000 {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = first + (seed % span) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().expect("local address of a bound listener");
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    l.local_addr().expect("local address of a bound listener")
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn find_program(name: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{name} not found: run scripts/setup.sh (it installs Debian's {name})")
        })
}

/// A real mosquitto broker on a free loopback port, killed on drop.
pub struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto with a generated config: one listener on a free port, anonymous
    /// access, `max_packet_size` as given, no persistence.
    pub fn start(max_packet_size: usize) -> anyhow::Result<Self> {
        Self::launch(tempfile::tempdir()?, "", max_packet_size)
    }

    /// As [`Mosquitto::start`], with `options` (lines of mosquitto.conf) added.
    pub fn start_with(max_packet_size: usize, options: &str) -> anyhow::Result<Self> {
        Self::launch(tempfile::tempdir()?, options, max_packet_size)
    }

    /// Writes the config (one loopback listener on a free port with `listener_options`,
    /// anonymous access, `max_packet_size`, no persistence) into `dir` and starts it.
    fn launch(
        dir: tempfile::TempDir,
        listener_options: &str,
        max_packet_size: usize,
    ) -> anyhow::Result<Self> {
        Self::launch_with(dir, |d, addr| {
            let conf = d.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {} 127.0.0.1\n{listener_options}allow_anonymous true\n\
                     max_packet_size {max_packet_size}\npersistence false\n\
                     max_queued_messages 10000\n",
                    addr.port()
                ),
            )?;
            Ok(conf)
        })
    }

    /// Starts mosquitto with a configuration that `make` writes into a fresh folder for a
    /// free loopback port (for example `fedshield-host broker-config --listen ADDR`),
    /// returning the configuration file's path. The folder is readable by the
    /// `mosquitto` user (mosquitto started as root reads its files as that user).
    pub fn start_configured(
        make: impl Fn(&Path, SocketAddr) -> anyhow::Result<PathBuf>,
    ) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Self::launch_with(dir, make)
    }

    /// Has `make` write the configuration for a free port into `dir` and starts mosquitto
    /// on it; a port another process took between the check and mosquitto's bind: another
    /// port, five times at most.
    fn launch_with(
        dir: tempfile::TempDir,
        make: impl Fn(&Path, SocketAddr) -> anyhow::Result<PathBuf>,
    ) -> anyhow::Result<Self> {
        let mut attempts = 0;
        loop {
            let addr = free_local_addr();
            let conf = make(dir.path(), addr)?;
            attempts += 1;
            match Self::spawn(&conf, addr) {
                Ok(child) => {
                    return Ok(Self {
                        child,
                        addr,
                        conf,
                        _dir: dir,
                    });
                }
                Err(e) if attempts >= 5 => return Err(e),
                Err(_) => {}
            }
        }
    }

    /// Starts mosquitto with a TLS listener: a fresh private CA (written to
    /// [`Mosquitto::ca_file`]) signs a server certificate for localhost / 127.0.0.1.
    /// Certificates come from the `openssl` command line tool.
    pub fn start_tls(max_packet_size: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let openssl = find_program("openssl", &[])?;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new(&openssl).current_dir(d).args(args).output()?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-days", "2", "-subj", "/CN=fedshield test CA"],
        ]
        .concat())?;
        run(&[
            &["req"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
            &["-subj", "/CN=localhost"],
        ]
        .concat())?;
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ])?;
        // mosquitto started as root reads its certificates as the `mosquitto` user: this
        // throwaway test CA is made readable to it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        let options = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            d.join("ca.pem").display(),
            d.join("server.pem").display(),
            d.join("server.key").display(),
        );
        Self::launch(dir, &options, max_packet_size)
    }

    /// The CA certificate of a TLS broker (see [`Mosquitto::start_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.conf.with_file_name("ca.pem")
    }

    fn spawn(conf: &Path, addr: SocketAddr) -> anyhow::Result<Child> {
        let bin = find_program("mosquitto", &["/usr/sbin"])?;
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        // A probe that connected to itself (TCP simultaneous open on a loopback port nobody
        // listens on yet) does not count.
        // And the listener must be this mosquitto's: when another test's broker took the
        // same port first, this one exits and the probe would find the other.
        let pid = child.id();
        let ready = wait_until("mosquitto", Duration::from_secs(10), || {
            child.try_wait().is_ok_and(|s| s.is_some())
                || (TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                    .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
                    && fedshield_transport::holds_listener(pid, addr))
        });
        if let Some(status) = child.try_wait()? {
            bail!(
                "mosquitto exited at start (port {} taken?): {status}",
                addr.port()
            );
        }
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(child)
    }

    /// Kills the broker (everything it held is lost: sessions, queued and retained
    /// messages), waits `down`, and starts a fresh one on the same port.
    pub fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(&self.conf, self.addr)?;
        Ok(())
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pair of connected pseudo-terminals made by socat, killed on drop: what one end writes,
/// the other reads, as over a null-modem cable.
pub struct PtyPair {
    child: Child,
    a: PathBuf,
    b: PathBuf,
    _dir: tempfile::TempDir,
}

impl PtyPair {
    /// Starts socat with two raw, echo-free ptys linked under a temporary folder.
    pub fn start() -> anyhow::Result<Self> {
        let bin = find_program("socat", &[])?;
        let dir = tempfile::tempdir()?;
        let a = dir.path().join("tty-a");
        let b = dir.path().join("tty-b");
        let child = Command::new(bin)
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting socat")?;
        let me = Self {
            child,
            a,
            b,
            _dir: dir,
        };
        wait_until("socat ptys", Duration::from_secs(10), || {
            me.a.exists() && me.b.exists()
        })?;
        Ok(me)
    }

    /// One end.
    pub fn a(&self) -> &Path {
        &self.a
    }

    /// The other end.
    pub fn b(&self) -> &Path {
        &self.b
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
