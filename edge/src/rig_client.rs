//! The edge's client of an attached test rig (`fedshield-edge run --rig PORT`): a thread of
//! its own runs the serial link (`serial_link::SerialLink`, `fedshield-rig` messages),
//! identifies the rig, asks for its telemetry stream, keeps the rig's external power
//! reading for the governor and the energy figures ([`ExternalPower`], preferred to the
//! on-board rails while fresh), passes the rig's notices to the driver ([`RigEvent`]) and
//! sends the device's status to the rig. A rig that goes silent, sends garbage or speaks
//! another protocol version never stops the device: it is reported once, its frames are
//! counted, and the device falls back to its on-board telemetry.

use crate::EdgeError;
use crate::serial_link::SerialLink;
use fedshield_rig::frame::Stats;
use fedshield_rig::messages::{
    EdgeStatus, FromRig, Identity, Relay, RelayChanged, StartTelemetry, StatusTopic,
    TelemetryEndpoint, Topic, message,
};
use fedshield_transport::NetworkWord;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a rig's power reading counts as current.
pub const POWER_FRESH: Duration = Duration::from_secs(5);

/// The latest external power reading (watts), shared between the rig's thread and the
/// trainer's pacer.
#[derive(Debug, Clone, Default)]
pub struct ExternalPower(Arc<Mutex<Option<(Instant, f64)>>>);

impl ExternalPower {
    /// Records a reading now.
    pub fn set(&self, watts: f64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), watts));
    }

    /// Forgets the reading (the rig went silent).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The reading, if it is at most [`POWER_FRESH`] old.
    pub fn fresh(&self) -> Option<f64> {
        let held = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.filter(|(at, _)| at.elapsed() <= POWER_FRESH)
            .map(|(_, w)| w)
    }
}

/// What the rig told the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RigEvent {
    /// The rig identified itself (same protocol).
    Connected(Identity),
    /// The rig speaks another protocol version or message set: the device goes on with
    /// on-board telemetry; the thread keeps trying to identify it (a rig re-flashed while
    /// the device runs).
    Mismatch {
        /// Its firmware.
        firmware: String,
        /// Its protocol version.
        protocol: u16,
        /// Its protocol digest.
        digest: u64,
    },
    /// No identity could be read (no answer, or none this edge can decode): as for
    /// [`RigEvent::Mismatch`].
    Unusable(String),
    /// The rig will cut the device's power in `in_ms`.
    BrownOut {
        /// Milliseconds of warning.
        in_ms: u32,
    },
    /// Power or network cut or restored by the rig.
    Relay(RelayChanged),
    /// No message from the rig for a while: on-board telemetry from now on.
    Silent,
    /// Messages again after silence.
    Back,
}

/// The rig's thread, seen from the driver.
pub struct RigClient {
    events: Receiver<RigEvent>,
    status: Sender<EdgeStatus>,
    power: ExternalPower,
    stats: Arc<Mutex<Stats>>,
    network: Arc<Mutex<Option<NetworkWord>>>,
}

impl RigClient {
    /// Opens `port` at `baud` and starts the rig's thread, asking for a reading every
    /// `interval_ms`.
    pub fn start(port: &str, baud: u32, interval_ms: u32) -> Result<Self, EdgeError> {
        let (events_tx, events) = channel();
        let (status, status_rx) = channel();
        let power = ExternalPower::default();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let network = Arc::new(Mutex::new(None));
        let shared = Shared {
            power: power.clone(),
            stats: stats.clone(),
            network: network.clone(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| EdgeError::Thread {
                what: "rig",
                source,
            })?;
        // The port registers with the runtime's reactor: opened inside it.
        let link = {
            let _inside = runtime.enter();
            SerialLink::open(port, baud)?
        };
        std::thread::Builder::new()
            .name("rig".into())
            .spawn(move || {
                runtime.block_on(serve(link, interval_ms, events_tx, status_rx, shared));
            })
            .map_err(|source| EdgeError::Thread {
                what: "rig",
                source,
            })?;
        Ok(Self {
            events,
            status,
            power,
            stats,
            network,
        })
    }

    /// Tells `word`'s link of the rig's network relay as soon as the rig reports it, from
    /// the rig's thread (the driver may be waiting on its link).
    pub fn follow_network(&self, word: NetworkWord) {
        *self.network.lock().unwrap_or_else(|p| p.into_inner()) = Some(word);
    }

    /// The next notice from the rig, if one is waiting.
    pub fn try_event(&self) -> Option<RigEvent> {
        self.events.try_recv().ok()
    }

    /// Waits at most `timeout` for the next notice.
    pub fn event_within(&self, timeout: Duration) -> Option<RigEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Sends the device's status to the rig.
    pub fn report(&self, status: EdgeStatus) {
        let _ = self.status.send(status); // a stopped thread: nothing to tell
    }

    /// The rig's external power reading, for the pacer.
    pub fn power(&self) -> ExternalPower {
        self.power.clone()
    }

    /// Frames the serial line delivered and dropped.
    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the rig's thread shares with the device.
struct Shared {
    power: ExternalPower,
    stats: Arc<Mutex<Stats>>,
    network: Arc<Mutex<Option<NetworkWord>>>,
}

/// The rig thread's loop: identify (again every few seconds until it works), ask for the
/// stream, then pass on what comes and send what the device reports.
async fn serve(
    mut link: SerialLink,
    interval_ms: u32,
    events: Sender<RigEvent>,
    status: Receiver<EdgeStatus>,
    shared: Shared,
) {
    let Shared {
        power,
        stats,
        network,
    } = shared;
    let answer = Duration::from_secs(2);
    let silence = Duration::from_millis(u64::from(interval_ms) * 3) + Duration::from_secs(2);
    let mut unusable_told = false;
    loop {
        match link.identify(answer).await {
            Ok(identity) => {
                tracing::info!("rig: {:?} ({:?})", identity.firmware, identity.capabilities);
                if events.send(RigEvent::Connected(identity)).is_err() {
                    return;
                }
                break;
            }
            Err(e) => {
                if !unusable_told {
                    tracing::warn!("rig unusable, on-board telemetry only: {e}");
                    unusable_told = true;
                    let event = match e {
                        EdgeError::RigVersion {
                            firmware,
                            protocol,
                            digest,
                            ..
                        } => RigEvent::Mismatch {
                            firmware,
                            protocol,
                            digest,
                        },
                        e => RigEvent::Unusable(e.to_string()),
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
                // Statuses reported meanwhile are for a rig that is not there.
                while status.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
    let rate = StartTelemetry { interval_ms };
    if let Err(e) = link.request::<TelemetryEndpoint>(&rate, answer).await {
        tracing::warn!("rig: no telemetry stream ({e})");
    }
    let mut last_heard = Instant::now();
    let mut silent = false;
    loop {
        loop {
            match status.try_recv() {
                Ok(s) => {
                    let seq = link.next_seq();
                    if let Err(e) = link.send(&message(StatusTopic::KEY, seq, &s)).await {
                        tracing::warn!("rig: status not sent ({e})");
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let received = link.recv(Duration::from_millis(100)).await;
        *stats.lock().unwrap_or_else(|p| p.into_inner()) = link.stats();
        let m = match received {
            Ok(m) => m,
            Err(EdgeError::Timeout(_)) => {
                if !silent && last_heard.elapsed() > silence {
                    silent = true;
                    power.clear();
                    tracing::warn!("rig silent for {silence:?}: on-board telemetry only");
                    if events.send(RigEvent::Silent).is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("rig link failed ({e}); on-board telemetry only");
                power.clear();
                let _ = events.send(RigEvent::Silent);
                return;
            }
        };
        last_heard = Instant::now();
        if silent {
            silent = false;
            if events.send(RigEvent::Back).is_err() {
                return;
            }
        }
        let event = match FromRig::decode(&m) {
            Ok(FromRig::Telemetry(s) | FromRig::Sensors(s)) => {
                if let (Some(mv), Some(ma)) = (s.supply_mv, s.supply_ma) {
                    power.set(f64::from(mv) * f64::from(ma) / 1e6);
                }
                None
            }
            Ok(FromRig::BrownOut(b)) => Some(RigEvent::BrownOut { in_ms: b.in_ms }),
            Ok(FromRig::RelayChanged(r)) => {
                if r.relay == Relay::Power && !r.closed {
                    power.clear();
                }
                if r.relay == Relay::Network
                    && let Some(word) = &*network.lock().unwrap_or_else(|p| p.into_inner())
                {
                    word.set(r.closed);
                }
                Some(RigEvent::Relay(r))
            }
            Ok(_) => None, // a late answer to a request
            Err(e) => {
                tracing::debug!("rig: {e}");
                None
            }
        };
        if let Some(ev) = event
            && events.send(ev).is_err()
        {
            return;
        }
    }
}
