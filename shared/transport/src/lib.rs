//! The MQTT link of the host and edge drivers: a rumqttc client whose event loop runs on its
//! own thread (plain TCP or TLS), reconnects with back-off, re-subscribes after every connection, and hands
//! incoming publishes to the driver over a channel. The driver stays a plain loop: receive
//! with a timeout, feed the state machine, publish what it returns.
//!
//! The channel is bounded in bytes ([`LinkConfig::incoming_budget`]): a driver that falls
//! behind, or a flood on a subscribed topic, never grows the process's memory past the
//! budget. A message that does not fit is dropped and counted ([`Link::dropped`]); the
//! event loop itself never blocks (a blocked loop would stop answering the broker's
//! keep-alive and, with the driver blocked on a full publish queue, deadlock). Retained
//! messages come back by subscribing again ([`Link::resubscribe`]); the rest is the
//! protocol's to re-send.
//!
//! A driver that learns from outside that the network beneath is cut (a test rig's network
//! relay, [`Link::network_cut`]) does not wait for the keep-alive to notice: the link drops
//! its connection at once (unacknowledged QoS 1 publishes are kept and sent again), retries
//! slowly while the cut lasts, and reconnects as soon as it is told the network is back.

use rumqttc::{
    Client, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, Publish,
    QoS, TlsConfiguration, Transport,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

/// A link accepts incoming packets up to this many times its `max_packet_bytes`.
pub const INCOMING_FACTOR: usize = 4;

/// The default incoming budget, in units of `max_packet_bytes` (32 MiB at the default
/// 512 KiB packets: a whole global update of the demo, 9 MB, with room to spare).
pub const INCOMING_BUDGET_PACKETS: usize = 64;

/// The first wait before reconnecting; doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// The longest wait between two connection attempts (and the wait while the network is
/// known to be cut).
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Bytes a queued message is counted for besides its topic and payload (so that a flood of
/// empty messages is bounded too).
const MESSAGE_OVERHEAD: usize = 64;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id (stable across restarts: the broker keeps the session).
    pub client_id: String,
    /// Username and password, if the broker requires them.
    pub credentials: Option<(String, String)>,
    /// Largest packet sent or received.
    pub max_packet_bytes: usize,
    /// Topic filters to (re)subscribe to after every connection.
    pub subscriptions: Vec<String>,
    /// Retained message published by the broker if this client vanishes: (topic, payload).
    pub last_will: Option<(String, Vec<u8>)>,
    /// Retained message published after every connection: (topic, payload).
    pub birth: Option<(String, Vec<u8>)>,
    /// TLS to the broker (`None`: plain TCP).
    pub tls: Option<Tls>,
    /// Most bytes of incoming messages held for the driver (at least one packet of
    /// `INCOMING_FACTOR * max_packet_bytes`); what does not fit is dropped and counted.
    pub incoming_budget: usize,
    /// What happens to messages the driver has not taken yet.
    pub overflow: Overflow,
}

/// What a link does when messages come faster than its driver takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Acknowledge each message on arrival and drop (and count) what does not fit in the
    /// incoming budget: the driver recovers from the retained messages (devices, whose
    /// downlink a flood must not stall).
    #[default]
    Drop,
    /// Read nothing more from the broker while the budget could not take the largest
    /// packet: TCP pushes back and the broker keeps the rest queued for this client (up to
    /// its `max_queued_messages`), so a busy driver slows its deliveries down instead of
    /// losing them (the host: a thousand devices uploading at once would otherwise
    /// overflow its budget and cost a re-publish of the round, which has every device send
    /// its phase again). Publishes never block the driver meanwhile ([`Link::publish`]).
    Hold,
}

/// TLS settings: the broker's certificate must chain to `ca_file`; `client_auth` adds a
/// client certificate and key (PEM) for brokers that require one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM file of the certificate authority that signed the broker's certificate.
    pub ca_file: std::path::PathBuf,
    /// PEM files of this client's certificate and private key.
    pub client_auth: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Tls {
    /// TLS from the command line's `--ca-file`, `--client-cert` and `--client-key`: none
    /// without a CA file; a certificate needs its key and the other way round.
    pub fn from_args(
        ca_file: Option<&std::path::Path>,
        client_cert: Option<&std::path::Path>,
        client_key: Option<&std::path::Path>,
    ) -> Result<Option<Self>, LinkError> {
        let client_auth = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some((c.to_path_buf(), k.to_path_buf())),
            (None, None) => None,
            _ => {
                return Err(LinkError::Config(
                    "--client-cert and --client-key go together".into(),
                ));
            }
        };
        match ca_file {
            Some(ca) => Ok(Some(Self {
                ca_file: ca.to_path_buf(),
                client_auth,
            })),
            None if client_auth.is_some() => Err(LinkError::Config(
                "a client certificate needs TLS: add --ca-file".into(),
            )),
            None => Ok(None),
        }
    }

    fn configuration(&self) -> Result<TlsConfiguration, LinkError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| LinkError::Config(format!("{}: {e}", p.display())))
        };
        // rustls with the ring provider (no C++ toolchain or cmake needed); installing it
        // twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(TlsConfiguration::Simple {
            ca: read(&self.ca_file)?,
            alpn: None,
            client_auth: match &self.client_auth {
                Some((c, k)) => Some((read(c)?, read(k)?)),
                None => None,
            },
        })
    }
}

/// The broker flags shared by `fedshield-host serve` and `fedshield-edge run`.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// MQTT broker, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: String,
    /// Broker username (the password comes from FEDSHIELD_MQTT_PASSWORD).
    #[arg(long)]
    pub username: Option<String>,
    /// Largest MQTT packet sent, and largest payload accepted, in bytes.
    #[arg(long, default_value_t = 512 * 1024)]
    pub max_packet_bytes: usize,
    /// TLS: PEM file of the CA that signed the broker's certificate (plain TCP without).
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// TLS client certificate (PEM), for brokers that require one.
    #[arg(long)]
    pub client_cert: Option<std::path::PathBuf>,
    /// TLS client private key (PEM).
    #[arg(long)]
    pub client_key: Option<std::path::PathBuf>,
    /// Most bytes of incoming messages held while the driver is busy (default: 64 packets,
    /// the host's 8); beyond it a device drops a message (counted and reported), the host
    /// reads nothing more until it has room (the broker holds the rest).
    #[arg(long)]
    pub incoming_budget: Option<usize>,
}

impl BrokerArgs {
    /// A link configuration for these flags: the address parsed, the password read from
    /// the environment, the TLS files named (read when the link starts).
    pub fn link_config(
        &self,
        client_id: String,
        subscriptions: Vec<String>,
        last_will: Option<(String, Vec<u8>)>,
        birth: Option<(String, Vec<u8>)>,
    ) -> Result<LinkConfig, LinkError> {
        let (host, port) = parse_broker(&self.broker)?;
        Ok(LinkConfig {
            host,
            port,
            client_id,
            credentials: credentials(self.username.as_deref())?,
            max_packet_bytes: self.max_packet_bytes,
            subscriptions,
            last_will,
            birth,
            tls: Tls::from_args(
                self.ca_file.as_deref(),
                self.client_cert.as_deref(),
                self.client_key.as_deref(),
            )?,
            incoming_budget: self.incoming_budget.unwrap_or(
                self.max_packet_bytes
                    .saturating_mul(INCOMING_BUDGET_PACKETS),
            ),
            overflow: Overflow::Drop,
        })
    }
}

/// Parses `host:port`.
pub fn parse_broker(address: &str) -> Result<(String, u16), LinkError> {
    address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| LinkError::Config(format!("broker {address:?}: expected host:port")))
}

/// Credentials for `username`, with the password from `FEDSHIELD_MQTT_PASSWORD` (never a
/// command-line argument, which other users could read).
pub fn credentials(username: Option<&str>) -> Result<Option<(String, String)>, LinkError> {
    let Some(user) = username else {
        return Ok(None);
    };
    let pass = std::env::var("FEDSHIELD_MQTT_PASSWORD")
        .map_err(|_| LinkError::Config("a broker username needs FEDSHIELD_MQTT_PASSWORD".into()))?;
    Ok(Some((user.to_string(), pass)))
}

/// What the link reports to the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message on a subscribed topic.
    Message {
        /// The topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
    },
    /// (Re)connected: subscriptions are renewed.
    Connected,
    /// The connection dropped; the link is retrying.
    Disconnected(String),
    /// The link dropped its connection because the driver said the network is cut
    /// ([`Link::network_cut`]); it reconnects when told the network is back.
    Cut,
}

/// Errors of the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The publish could not be queued (the event loop is gone).
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
    /// A bad broker address or credentials.
    #[error("{0}")]
    Config(String),
    /// The link's thread stopped.
    #[error("the MQTT link has stopped")]
    Closed,
    /// The link's thread could not be started.
    #[error("the MQTT link's thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// How much of the incoming budget is held, and how many messages did not fit.
#[derive(Debug, Default)]
struct Budget {
    limit: usize,
    held: AtomicUsize,
    dropped: AtomicU64,
    /// Signalled whenever the driver takes a message (room for the next).
    room: tokio::sync::Notify,
}

impl Budget {
    fn cost(topic: &str, payload: &[u8]) -> usize {
        topic.len() + payload.len() + MESSAGE_OVERHEAD
    }

    /// Reserves `cost` bytes; false (and counted) when they do not fit. Only the event
    /// loop's thread reserves, so check-then-add does not race with another reservation.
    fn reserve(&self, cost: usize) -> bool {
        if self.held.load(Ordering::Acquire).saturating_add(cost) > self.limit {
            self.dropped.fetch_add(1, Ordering::AcqRel);
            return false;
        }
        self.held.fetch_add(cost, Ordering::AcqRel);
        true
    }

    fn release(&self, cost: usize) {
        self.held.fetch_sub(cost, Ordering::AcqRel);
        self.room.notify_one();
    }

    /// Whether a message of `cost` bytes would fit now.
    fn fits(&self, cost: usize) -> bool {
        self.held.load(Ordering::Acquire).saturating_add(cost) <= self.limit
    }
}

/// A running link.
pub struct Link {
    client: Client,
    incoming: Receiver<Incoming>,
    overflow: Overflow,
    /// Publishes the event loop could not take yet ([`Overflow::Hold`]), in order.
    pending: std::sync::Mutex<std::collections::VecDeque<Publish>>,
    budget: Arc<Budget>,
    subscriptions: Vec<String>,
    /// Whether the network beneath is known to be cut (the driver's word).
    cut: NetworkWord,
}

/// A handle on a link's word about the network beneath it ([`Link::network_word`]), for a
/// thread that learns of cuts first (a rig's client).
#[derive(Debug, Clone)]
pub struct NetworkWord(Arc<tokio::sync::watch::Sender<bool>>);

impl NetworkWord {
    /// The network is cut (`false`) or back (`true`): see [`Link::network_cut`].
    pub fn set(&self, connected: bool) {
        self.0.send_replace(!connected);
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    /// Starts the link; connection happens in the background (see [`Incoming::Connected`]).
    pub fn start(config: LinkConfig) -> Result<Self, LinkError> {
        let largest = config.max_packet_bytes.saturating_mul(INCOMING_FACTOR);
        if config.incoming_budget < largest {
            return Err(LinkError::Config(format!(
                "an incoming budget of {} bytes cannot hold one packet of {largest}",
                config.incoming_budget
            )));
        }
        let budget = Arc::new(Budget {
            limit: config.incoming_budget,
            ..Budget::default()
        });
        let mut opts = MqttOptions::new(&config.client_id, &config.host, config.port);
        opts.set_keep_alive(Duration::from_secs(10));
        // Incoming packets may be larger than what the protocol accepts (the driver's
        // `decode` refuses those with a logged reason): a packet over rumqttc's own limit
        // breaks the connection, and the broker would redeliver it after every reconnection.
        // The broker's `max_packet_size` must stay below this (README, "Brokers").
        opts.set_max_packet_size(
            config.max_packet_bytes.saturating_mul(INCOMING_FACTOR),
            config.max_packet_bytes,
        );
        opts.set_clean_session(false);
        if let Some((user, pass)) = &config.credentials {
            opts.set_credentials(user, pass);
        }
        if let Some(tls) = &config.tls {
            opts.set_transport(Transport::tls_with_config(tls.configuration()?));
        }
        if let Some((topic, payload)) = &config.last_will {
            opts.set_last_will(LastWill::new(
                topic,
                payload.clone(),
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, connection) = Client::new(opts, 256);
        // The event loop runs on this link's own runtime (below), which lets the loop be
        // interrupted when the network is cut; the connection's runtime is not used.
        let mut eventloop = connection.eventloop;
        let (tx, rx) = channel();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let subscriber = client.clone();
        let subscriptions = config.subscriptions.clone();
        let overflow = config.overflow;
        let held = budget.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("mqtt-{}", config.client_id))
            .spawn(move || {
                runtime.block_on(drive(
                    &mut eventloop,
                    cut_rx,
                    &tx,
                    &subscriber,
                    &config,
                    &held,
                ));
            })?;
        Ok(Self {
            client,
            incoming: rx,
            overflow,
            pending: Default::default(),
            budget,
            subscriptions,
            cut: NetworkWord(Arc::new(cut)),
        })
    }

    /// Messages dropped so far because the incoming budget was full.
    pub fn dropped(&self) -> u64 {
        self.budget.dropped.load(Ordering::Acquire)
    }

    /// Bytes of incoming messages held now (at most the budget).
    pub fn held_bytes(&self) -> usize {
        self.budget.held.load(Ordering::Acquire)
    }

    /// Subscribes again to the link's own subscriptions, so that the broker sends their
    /// retained messages again (after drops).
    pub fn resubscribe(&self) -> Result<(), LinkError> {
        self.subscriptions
            .iter()
            .try_for_each(|f| self.subscribe(f))
    }

    /// Publishes with QoS 1 (queued; the event loop sends it when connected).
    /// A held link ([`Overflow::Hold`]) never blocks here: what the event loop cannot
    /// take now waits in the link, in order, and leaves on the next `publish` or `recv`
    /// (its event loop may be waiting for the driver to take a message).
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), LinkError> {
        if self.overflow == Overflow::Drop {
            return self
                .client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .map_err(LinkError::from);
        }
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.retain = retain;
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(publish);
        self.flush();
        Ok(())
    }

    /// Hands the event loop the publishes waiting in a held link, in order, as far as it
    /// takes them.
    fn flush(&self) {
        if self.overflow == Overflow::Drop {
            return;
        }
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(p) = pending.pop_front() {
            let (topic, retain, payload) = (p.topic, p.retain, p.payload);
            if let Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(back))) = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            {
                pending.push_front(back);
                return;
            }
        }
    }

    /// Publishes waiting in a held link for its event loop.
    pub fn pending_publishes(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Subscribes to `filter` now (QoS 1); retained messages on it arrive next. Not renewed
    /// by the link after a reconnection: the driver re-subscribes on
    /// [`Incoming::Connected`] while it still needs it.
    pub fn subscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .map_err(LinkError::from)
    }

    /// Unsubscribes from `filter`.
    pub fn unsubscribe(&self, filter: &str) -> Result<(), LinkError> {
        self.client.unsubscribe(filter).map_err(LinkError::from)
    }

    /// The next incoming event, waiting at most `timeout` (`None` on timeout).
    pub fn recv(&self, timeout: Duration) -> Result<Option<Incoming>, LinkError> {
        self.flush();
        match self.incoming.recv_timeout(timeout) {
            Ok(i) => {
                if let Incoming::Message { topic, payload } = &i {
                    self.budget.release(Budget::cost(topic, payload));
                }
                Ok(Some(i))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(LinkError::Closed),
        }
    }

    /// Disconnects cleanly (no last will); the link does not reconnect after.
    pub fn disconnect(&self) {
        let _ = self.client.disconnect();
    }

    /// The network beneath is cut (a rig's relay said so): the link drops its connection
    /// now ([`Incoming::Cut`]) instead of waiting for the keep-alive to find it dead, keeps
    /// what was not acknowledged for the next connection, and tries again only every
    /// [`BACKOFF_MAX`] until [`Link::network_restored`].
    pub fn network_cut(&self) {
        self.cut.set(false);
    }

    /// The network is back: the link reconnects at once.
    pub fn network_restored(&self) {
        self.cut.set(true);
    }

    /// A handle to tell the link about the network from another thread.
    pub fn network_word(&self) -> NetworkWord {
        self.cut.clone()
    }
}

/// The link thread's loop: polls the event loop, forwards what it yields, waits between
/// connection attempts, and follows the driver's word on the network. An event-loop poll is
/// cancelled only where that is safe: to drop the connection anyway (the network is cut),
/// or while no connection is up (a connection attempt, abandoned when the network is back).
async fn drive(
    eventloop: &mut EventLoop,
    mut cut: tokio::sync::watch::Receiver<bool>,
    tx: &Sender<Incoming>,
    client: &Client,
    config: &LinkConfig,
    budget: &Budget,
) {
    let mut backoff = BACKOFF_MIN;
    let mut known_cut = false;
    let largest = config.max_packet_bytes.saturating_mul(INCOMING_FACTOR);
    loop {
        // A held link reads nothing more while the largest packet would not fit: TCP
        // pushes back on the broker, which keeps the rest queued (the broker's in-flight
        // window alone does not bound what arrives: mosquitto 2.0.11 sent 14 messages
        // unacknowledged under `max_inflight_messages 4`). The driver takes a message
        // within a keep-alive as long as it runs.
        if config.overflow == Overflow::Hold && !budget.fits(largest) {
            tokio::select! {
                () = budget.room.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        let connected = eventloop.network.is_some();
        let target = !known_cut;
        let event = tokio::select! {
            event = eventloop.poll() => event,
            word = cut.wait_for(move |c| *c == target), if !known_cut || !connected => {
                if word.is_err() {
                    return; // the driver is gone
                }
                known_cut = target;
                if known_cut {
                    if connected {
                        eventloop.clean(); // unacknowledged publishes are kept for later
                        if tx.send(Incoming::Cut).is_err() {
                            return;
                        }
                    }
                } else {
                    backoff = BACKOFF_MIN;
                }
                continue;
            }
        };
        match forward(event, tx, client, config, budget) {
            Flow::Stop => return,
            Flow::Connected => {
                backoff = BACKOFF_MIN;
                // Connected although told the network was cut: it is evidently back.
                known_cut &= *cut.borrow();
            }
            Flow::Next => {}
            Flow::Retry => {
                let wait = if known_cut { BACKOFF_MAX } else { backoff };
                let target = !known_cut;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    word = cut.wait_for(move |c| *c == target) => {
                        if word.is_err() {
                            return;
                        }
                        known_cut = target;
                        backoff = BACKOFF_MIN;
                    }
                }
            }
        }
    }
}

/// What the link's loop does after one event.
enum Flow {
    /// Go on polling.
    Next,
    /// A connection is up.
    Connected,
    /// The connection failed: wait, then try again.
    Retry,
    /// The driver is gone or disconnected: stop.
    Stop,
}

/// Handles one event-loop event.
fn forward(
    event: Result<Event, ConnectionError>,
    tx: &Sender<Incoming>,
    client: &Client,
    config: &LinkConfig,
    budget: &Budget,
) -> Flow {
    let alive = |sent: bool, then: Flow| if sent { then } else { Flow::Stop };
    match event {
        Ok(Event::Incoming(Packet::ConnAck(_))) => {
            for filter in &config.subscriptions {
                if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                    tracing::warn!("subscribe {filter}: {e}");
                }
            }
            if let Some((topic, payload)) = &config.birth {
                let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload.clone());
            }
            alive(tx.send(Incoming::Connected).is_ok(), Flow::Connected)
        }
        Ok(Event::Incoming(Packet::Publish(p))) => {
            if !budget.reserve(Budget::cost(&p.topic, &p.payload)) {
                return Flow::Next; // counted; the driver reports it
            }
            let sent = tx.send(Incoming::Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
            });
            alive(sent.is_ok(), Flow::Next)
        }
        Ok(Event::Outgoing(Outgoing::Disconnect)) => Flow::Stop,
        Ok(_) => Flow::Next,
        Err(ConnectionError::RequestsDone) => Flow::Stop,
        Err(e) => alive(
            tx.send(Incoming::Disconnected(e.to_string())).is_ok(),
            Flow::Retry,
        ),
    }
}

/// How a driver reports the link's drops and when it recovers from them: a report at most
/// every [`DropMonitor::REPORT_EVERY_S`] seconds under a flood and the final total once the
/// link is idle; one recovery (the edge subscribes again for the retained messages, the host
/// re-publishes the round) once idle after new drops.
#[derive(Debug, Default)]
pub struct DropMonitor {
    seen: u64,
    reported: u64,
    at: Option<f64>,
    recover: bool,
}

/// What to do after [`DropMonitor::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCheck {
    /// Report this running total now.
    pub report: Option<u64>,
    /// Recover now (new drops since the last recovery, and the link is idle).
    pub recover: bool,
}

impl DropMonitor {
    /// Least seconds between two reports while messages keep coming.
    pub const REPORT_EVERY_S: f64 = 10.0;

    /// `total` messages dropped so far ([`Link::dropped`]) at `now_s` seconds; `idle`:
    /// nothing came in the last wait.
    pub fn check(&mut self, total: u64, now_s: f64, idle: bool) -> DropCheck {
        if total > self.seen {
            self.seen = total;
            self.recover = true;
        }
        let recent = self.at.is_some_and(|at| now_s - at < Self::REPORT_EVERY_S);
        let report = (total != self.reported && (idle || !recent)).then(|| {
            self.reported = total;
            self.at = Some(now_s);
            total
        });
        let recover = idle && std::mem::take(&mut self.recover);
        DropCheck { report, recover }
    }
}

/// Whether process `pid` holds the listening TCP socket on `addr`'s port (Linux, from
/// `/proc/net/tcp` and `/proc/{pid}/fd`; false where those cannot be read). A broker that
/// answers on a port is not proof that it is the broker just started: when two processes
/// pick the same free port, the one whose bind failed may find the other's broker there.
pub fn holds_listener(pid: u32, addr: std::net::SocketAddr) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let port = format!("{:04X}", addr.port());
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            (local.rsplit(':').next() == Some(port.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse() {
        assert_eq!(
            parse_broker("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_broker("broker.lan:8883").unwrap(),
            ("broker.lan".into(), 8883)
        );
        for bad in ["nohost", ":1883", "h:99999", "h:x"] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
        assert_eq!(credentials(None).unwrap(), None);
    }

    #[test]
    fn the_budget_holds_what_fits_and_counts_what_does_not() {
        let budget = Budget {
            limit: 1000,
            ..Budget::default()
        };
        let cost = Budget::cost("t", &[0; 400]);
        assert_eq!(cost, 465);
        assert!(budget.reserve(cost));
        assert!(budget.reserve(cost));
        assert!(!budget.reserve(cost), "a third does not fit");
        let empty = Budget::cost("t", &[]);
        assert!(
            budget.reserve(empty),
            "an empty one still fits (995 of 1000)"
        );
        assert!(!budget.reserve(empty), "empty messages are bounded too");
        assert_eq!(budget.dropped.load(Ordering::Acquire), 2);
        budget.release(cost);
        assert!(budget.reserve(cost), "room again once the driver took one");
        assert_eq!(budget.held.load(Ordering::Acquire), 2 * cost + empty);
    }

    #[test]
    fn drops_are_reported_at_most_every_ten_seconds_and_recovered_from_once_idle() {
        let mut d = DropMonitor::default();
        let check = |report, recover| DropCheck { report, recover };
        assert_eq!(d.check(0, 0.0, false), check(None, false));
        assert_eq!(d.check(0, 0.5, true), check(None, false), "nothing dropped");
        assert_eq!(
            d.check(3, 1.0, false),
            check(Some(3), false),
            "busy: no recovery"
        );
        assert_eq!(
            d.check(9, 2.0, false),
            check(None, false),
            "within ten seconds"
        );
        assert_eq!(d.check(12, 11.5, false), check(Some(12), false));
        assert_eq!(
            d.check(15, 12.0, true),
            check(Some(15), true),
            "idle: final total"
        );
        assert_eq!(d.check(15, 12.5, true), check(None, false), "once");
        assert_eq!(
            d.check(16, 13.0, true),
            check(Some(16), true),
            "new drops, idle"
        );
    }

    #[test]
    fn a_budget_smaller_than_one_packet_is_refused() {
        let config = LinkConfig {
            host: "127.0.0.1".into(),
            port: 1,
            client_id: "t".into(),
            credentials: None,
            max_packet_bytes: 1024,
            subscriptions: vec![],
            last_will: None,
            birth: None,
            tls: None,
            incoming_budget: 4095,
            overflow: Overflow::Drop,
        };
        assert!(matches!(Link::start(config), Err(LinkError::Config(_))));
    }

    #[test]
    fn the_holder_of_a_listening_port_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(holds_listener(std::process::id(), addr));
        // Not the parent's (nor any other process's) socket.
        assert!(!holds_listener(std::os::unix::process::parent_id(), addr));
        drop(l);
        assert!(!holds_listener(std::process::id(), addr));
    }
}
