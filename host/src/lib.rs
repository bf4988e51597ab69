//! The FedShield host: the aggregator side of the fleet, and the embedded MQTT broker used
//! for one-machine runs.

pub mod broker;
pub mod fleet;
pub mod serve;

/// Errors of the host library.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The embedded broker could not start.
    #[error("embedded MQTT broker: {0}")]
    Broker(String),
}
