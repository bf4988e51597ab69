//! A simulated rig on a real serial port: `fedshield_rig::sim::Rig` (the same logic rig
//! firmware runs) driven over a pty by a thread of its own, with line noise applied to what
//! it sends and every decision logged with its time. The whole-system tests put one beside
//! each edge.

use fedshield_edge::serial_link::SerialLink;
use fedshield_rig::frame::encode;
use fedshield_rig::sim::{Output, Rig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running simulated rig; stops when dropped.
pub struct SimRig {
    log: Arc<Mutex<Vec<(u64, Output)>>>,
    rig: Arc<Mutex<Rig>>,
    stop: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimRig {
    /// Serves `rig` on the serial port `port` (one end of a pty pair).
    pub fn spawn(port: &std::path::Path, rig: Rig, noise_seed: u64) -> anyhow::Result<Self> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let rig = Arc::new(Mutex::new(rig));
        let stop = Arc::new(AtomicBool::new(false));
        let mute = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let link = {
            let _inside = runtime.enter();
            SerialLink::open(&port.to_string_lossy(), 115_200)?
        };
        let (l, r, s, m) = (log.clone(), rig.clone(), stop.clone(), mute.clone());
        let thread = std::thread::Builder::new()
            .name("sim-rig".into())
            .spawn(move || runtime.block_on(serve(link, r, l, s, m, noise_seed)))?;
        Ok(Self {
            log,
            rig,
            stop,
            mute,
            thread: Some(thread),
        })
    }

    /// What the rig decided so far, with the milliseconds since it started.
    pub fn log(&self) -> Vec<(u64, Output)> {
        self.log.lock().unwrap().clone()
    }

    /// The rig's state (readings, relays, the device's last status).
    pub fn with<T>(&self, f: impl FnOnce(&Rig) -> T) -> T {
        f(&self.rig.lock().unwrap())
    }

    /// Stops sending anything (a rig that went silent) or starts again.
    pub fn mute(&self, mute: bool) {
        self.mute.store(mute, Ordering::SeqCst);
    }
}

impl Drop for SimRig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    mut link: SerialLink,
    rig: Arc<Mutex<Rig>>,
    log: Arc<Mutex<Vec<(u64, Output)>>>,
    stop: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    seed: u64,
) {
    let start = Instant::now();
    let mut noise_ppm = 0u32;
    let mut state = seed | 1;
    while !stop.load(Ordering::SeqCst) {
        let received = link.recv(Duration::from_millis(20)).await;
        let now = start.elapsed().as_millis() as u64;
        let mut outputs = match &received {
            Ok(m) => rig.lock().unwrap().on_message(m, now),
            Err(_) => Vec::new(),
        };
        outputs.extend(rig.lock().unwrap().tick(now));
        for out in outputs {
            match &out {
                Output::Send(m) => {
                    if mute.load(Ordering::SeqCst) {
                        continue;
                    }
                    let Ok(frames) = encode(m) else { continue };
                    let mut bytes = frames.concat();
                    for b in &mut bytes {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        if noise_ppm > 0 && (state % 1_000_000) < u64::from(noise_ppm) {
                            *b ^= 1 + ((state >> 20) % 255) as u8;
                        }
                    }
                    let _ = link.send_raw(&bytes).await;
                }
                Output::Noise(ppm) => {
                    noise_ppm = *ppm;
                    log.lock().unwrap().push((now, out.clone()));
                }
                _ => log.lock().unwrap().push((now, out.clone())),
            }
        }
    }
}
