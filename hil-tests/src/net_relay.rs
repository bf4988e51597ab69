//! A network relay for the whole-system tests: a TCP proxy between one device and the broker
//! that a simulated rig opens and closes, as a rig's relay would the device's Ethernet.
//!
//! While the relay is open (the network cut), the proxy forwards nothing in either
//! direction and reads nothing: bytes and closes wait in the kernel's buffers, as they would
//! wait in a TCP stack retransmitting over a pulled cable, and neither end learns of the cut
//! from the socket. New connections are accepted and closed at once (an attempt to connect
//! fails). When the relay closes again, forwarding resumes where it stopped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a stopped pump or the listener looks again.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// When the network was last restored, and how long after it the first connection
    /// was forwarded.
    restored: Mutex<(Option<Instant>, Option<Duration>)>,
}

/// A running relay; stops (and closes every connection through it) when dropped.
#[derive(Debug)]
pub struct NetRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// What the rig holds to open and close a relay.
#[derive(Debug, Clone)]
pub struct RelaySwitch(Arc<Shared>);

impl RelaySwitch {
    /// Closes (`true`: the network connected) or opens (`false`: cut) the relay.
    pub fn set(&self, connected: bool) {
        let was_cut = self.0.cut.swap(!connected, Ordering::SeqCst);
        if was_cut && connected {
            *self.0.restored.lock().unwrap() = (Some(Instant::now()), None);
        }
    }
}

impl NetRelay {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, upstream)
    }

    /// Listens on `listen` and forwards every connection to `upstream`.
    pub fn start_on(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("net-relay".into())
            .spawn(move || accept_loop(&listener, upstream, &s))?;
        Ok(Self {
            addr,
            shared,
            threads: Mutex::new(vec![accept]),
        })
    }

    /// Where the device connects instead of the broker.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The switch, for the rig that plays the relay.
    pub fn switch(&self) -> RelaySwitch {
        RelaySwitch(self.shared.clone())
    }

    /// How long after the network was last restored the device's first new connection
    /// came (`None`: not restored yet, or no connection since).
    pub fn reconnected_after(&self) -> Option<Duration> {
        self.shared.restored.lock().unwrap().1
    }

    /// Connections forwarded, and connections refused while the network was cut.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.accepted.load(Ordering::SeqCst),
            self.shared.refused.load(Ordering::SeqCst),
        )
    }
}

impl Drop for NetRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    let mut pumps = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((device, _)) => {
                if shared.cut.load(Ordering::SeqCst) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    let _ = device.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(broker) = TcpStream::connect(upstream) else {
                    let _ = device.shutdown(Shutdown::Both);
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let mut restored = shared.restored.lock().unwrap();
                if let (Some(at), None) = *restored {
                    restored.1 = Some(at.elapsed());
                }
                drop(restored);
                for (from, to) in [(&device, &broker), (&broker, &device)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let s = shared.clone();
                    if let Ok(t) = std::thread::Builder::new()
                        .name("net-relay-pump".into())
                        .spawn(move || pump(from, to, &s))
                    {
                        pumps.push(t);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
        pumps.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
    }
    for t in pumps {
        let _ = t.join();
    }
}

/// Copies `from` to `to` while the network is connected; at the end of either, closes
/// both.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let _ = from.set_nonblocking(false);
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.cut.load(Ordering::SeqCst) {
            std::thread::sleep(POLL);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
