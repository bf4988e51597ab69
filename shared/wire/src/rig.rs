//! Frames exchanged between an edge box and an attached board or hardware-in-the-loop test
//! rig over a serial link. Each is sent as one COBS frame (see [`crate::frame`]).

use serde::{Deserialize, Serialize};

/// A frame on the edge <-> rig serial link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RigFrame {
    /// Liveness probe; the peer answers [`RigFrame::Pong`] with the same sequence number.
    Ping {
        /// Sequence number chosen by the sender.
        seq: u32,
    },
    /// Answer to [`RigFrame::Ping`].
    Pong {
        /// The sequence number of the ping answered.
        seq: u32,
    },
    /// A power reading reported by the rig's measurement board.
    Power {
        /// Sequence number of the reading.
        seq: u32,
        /// Supply voltage in millivolts.
        millivolts: u32,
        /// Supply current in milliamps.
        milliamps: u32,
    },
    /// Fault injection request from the rig: the edge must behave as if the named event
    /// happened (used by whole-system tests).
    Fault(RigFault),
}

/// Faults a test rig can inject into an edge box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RigFault {
    /// Drop the network connection to the broker.
    NetworkDown,
    /// Restore the network connection.
    NetworkUp,
    /// Abort the current round's upload.
    AbortUpload,
}
