//! The embedded MQTT broker (rumqttd), the default for a one-machine run. Real fleets use
//! any MQTT 3.1.1/5 broker (mosquitto, EMQX, ...) instead; nothing else in FedShield depends
//! on which broker carries the messages.

use crate::HostError;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Largest MQTT packet the embedded broker accepts by default: room for a 256 KiB chunk
/// plus its envelope.
pub const DEFAULT_MAX_PACKET_BYTES: usize = 512 * 1024;

/// A running embedded broker. rumqttd has no shutdown call: the broker lives until the
/// process exits, which is how the host and the tests use it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts an MQTT 3.1.1 broker listening on `listen` and waits until it accepts TCP
    /// connections (at most 10 s).
    pub fn start(listen: SocketAddr, max_packet_bytes: usize) -> Result<Self, HostError> {
        let server = rumqttd::ServerSettings {
            name: "fedshield-v4".into(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: max_packet_bytes,
                max_inflight_count: 200,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 10_010,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 * 1024 * 1024,
                max_segment_count: 10,
                ..Default::default()
            },
            v4: Some(HashMap::from([("1".to_string(), server)])),
            ..Default::default()
        };
        let mut broker = rumqttd::Broker::new(config);
        // rumqttd only logs a failure to bind its port, and its start returns once its
        // server thread ended: a start that returns at all is a broker that is not running.
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let why = match broker.start() {
                    Ok(()) => "its server stopped (is the port in use?)".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!("embedded broker stopped: {why}");
                let _ = stopped_tx.send(why);
            })
            .map_err(|e| HostError::Broker(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_mqtt(&listen) {
            if let Ok(why) = stopped.try_recv() {
                return Err(HostError::Broker(format!("on {listen}: {why}")));
            }
            if Instant::now() > deadline {
                return Err(HostError::Broker(format!(
                    "not listening on {listen} after 10 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !fedshield_transport::holds_listener(std::process::id(), listen) {
            return Err(HostError::Broker(format!(
                "{listen} is held by another process (the embedded broker could not bind it)"
            )));
        }
        Ok(Self { addr: listen })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Whether an MQTT broker answers on `addr`: a CONNECT gets a CONNACK that accepts it. A
/// bare TCP connect is not enough: to a loopback port in the ephemeral range that nobody
/// listens on yet, the kernel may connect the probe to itself (TCP simultaneous open),
/// which then holds the port that the broker is about to bind.
fn answers_mqtt(addr: &SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(addr, Duration::from_millis(200)) else {
        return false;
    };
    if stream.local_addr().ok() == stream.peer_addr().ok() {
        return false; // connected to itself; dropping it frees the port
    }
    // MQTT 3.1.1 CONNECT: clean session, keep-alive 10 s, client id "fedshield-probe".
    let id = b"fedshield-probe";
    let mut connect = vec![0x10, (10 + 2 + id.len()) as u8];
    connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
    connect.extend_from_slice(&[0, id.len() as u8]);
    connect.extend_from_slice(id);
    let mut connack = [0u8; 4];
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_ok()
        && stream.write_all(&connect).is_ok()
        && stream.read_exact(&mut connack).is_ok()
        && connack == [0x20, 0x02, 0x00, 0x00]
        && stream.write_all(&[0xe0, 0x00]).is_ok() // DISCONNECT
}
