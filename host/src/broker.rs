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
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded broker stopped: {e}");
                }
            })
            .map_err(|e| HostError::Broker(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(HostError::Broker(format!(
                    "not listening on {listen} after 10 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { addr: listen })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
