//! The FedShield host's library: the fleet directory ([`fleet::FleetDir`]) and the embedded
//! MQTT broker used for one-machine runs. The round driver is the binary's `serve` command
//! (host/src/serve.rs) around the protocol's `HostFleet`.

pub mod broker;
pub mod broker_config;
pub mod fleet;

/// Errors of the host library.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The embedded broker could not start.
    #[error("embedded MQTT broker: {0}")]
    Broker(String),
    /// A file of the fleet directory could not be read or written.
    #[error(transparent)]
    Store(#[from] fedshield_store::StoreError),
    /// A file of the fleet directory that exists but is not valid (it is left as it is).
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A configuration that cannot work (what is wrong, and what to change).
    #[error("{0}")]
    Config(String),
    /// A fleet or device name that is not one topic level.
    #[error(transparent)]
    Name(#[from] fedshield_protocol::ProtocolError),
}

impl HostError {
    fn invalid(path: &std::path::Path, why: impl std::fmt::Display) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            why: why.to_string(),
        }
    }
}
