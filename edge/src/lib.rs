//! The FedShield edge: on-device training (libtorch through `tch`), on-device inference
//! (ONNX Runtime through `ort`) and the serial link to attached boards and test rigs.

pub mod compute;
pub mod fleet;
pub mod inference;
pub mod llama;
pub mod lora;
pub mod onnx_graph;
pub mod pacing;
pub mod plan;
pub mod planner;
pub mod quality;
pub mod rig_client;
pub mod serial_link;
pub mod sft;
pub mod train;

/// Errors of the edge library.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// ONNX Runtime reported an error.
    #[error("ONNX Runtime: {0}")]
    Onnx(String),
    /// A model asset is missing.
    #[error(transparent)]
    Asset(#[from] fedshield_models::ModelError),
    /// The serial port failed.
    #[error("serial port {port}: {source}")]
    Serial {
        /// The port's path.
        port: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The rig on a serial port broke its protocol (another version, a bad answer).
    #[error("rig on {port}: {why}")]
    Rig {
        /// The port's path.
        port: String,
        /// What it did.
        why: String,
    },
    /// The rig on a serial port speaks another protocol version or message set.
    #[error(
        "rig on {port}: firmware {firmware:?} speaks rig protocol {protocol} (digest {digest:#018x}); this edge speaks {} ({:#018x})",
        fedshield_rig::messages::PROTOCOL_VERSION,
        fedshield_rig::messages::protocol_digest()
    )]
    RigVersion {
        /// The port's path.
        port: String,
        /// The rig's firmware.
        firmware: String,
        /// The rig's protocol version.
        protocol: u16,
        /// The rig's protocol digest.
        digest: u64,
    },
    /// No training plan could be chosen or applied.
    #[error("training plan: {0}")]
    Plan(String),
    /// Two shapes that must agree do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A PEFT adapter directory that cannot be written or read as this model's adapter.
    #[error("adapter {}: {why}", dir.display())]
    Adapter {
        /// The directory.
        dir: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The device's state file cannot be used (it is left as it is).
    #[error("state file {}: {why}; move it away to start this device afresh", path.display())]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// A thread could not be started.
    #[error("starting the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The peer did not answer in time.
    #[error("no answer from {0} within the timeout")]
    Timeout(String),
}
