//! Fixtures for whole-system tests: real external processes (mosquitto, socat) started on
//! free resources and stopped when the guard drops. Nothing here is a mock.

use anyhow::{Context, bail};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback address with a port that was free a moment ago.
pub fn free_local_addr() -> SocketAddr {
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
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto with a generated config: one listener on a free port, anonymous
    /// access, `max_packet_size` as given, no persistence.
    pub fn start(max_packet_size: usize) -> anyhow::Result<Self> {
        let bin = find_program("mosquitto", &["/usr/sbin"])?;
        let dir = tempfile::tempdir()?;
        let addr = free_local_addr();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\nmax_packet_size {max_packet_size}\npersistence false\n",
                addr.port()
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        let mut me = Self {
            child,
            addr,
            _dir: dir,
        };
        wait_until("mosquitto", Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        })?;
        if let Some(status) = me.child.try_wait()? {
            bail!("mosquitto exited at start: {status}");
        }
        Ok(me)
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
