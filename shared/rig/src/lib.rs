//! FedShield's hardware-in-the-loop rig protocol, shared by the edge (`fedshield-edge run
//! --rig`), the rig simulator and rig firmware: `#![no_std]` with `alloc`, no I/O.
//!
//! - [`messages`]: the typed requests, responses and streams, each with a key derived from
//!   its path and its whole schema (postcard-schema), so that builds of different versions
//!   detect each other ([`RigError::UnknownKey`], [`messages::protocol_digest`]).
//! - [`frame`]: messages in COBS frames of at most [`frame::MAX_FRAME`] bytes with a
//!   sequence number, chunking and a CRC-32 ([`crc`]); [`frame::FrameReader`] reassembles
//!   them from a byte stream, dropping and counting what is corrupt.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod cobs;
pub mod crc;
pub mod frame;
pub mod messages;
pub mod sim;

pub use postcard_schema::key::Key;

/// Why a frame or message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RigError {
    /// A frame longer than the protocol allows (line noise that ate a zero, or a peer with
    /// another frame size).
    #[error("frame over {max} bytes")]
    Oversized {
        /// The limit.
        max: usize,
    },
    /// Bytes between two zeros that are not COBS.
    #[error("not a COBS frame")]
    Cobs,
    /// A frame shorter than its header and CRC.
    #[error("frame of {0} bytes, shorter than its header and CRC")]
    Short(usize),
    /// A corrupted frame.
    #[error("CRC mismatch: the frame carries {expected:#010x}, its bytes give {actual:#010x}")]
    Crc {
        /// The CRC the frame carries.
        expected: u32,
        /// The CRC of its bytes.
        actual: u32,
    },
    /// A chunk out of order, of another message, or with an impossible index.
    #[error("chunk {index} of {count} does not continue a message")]
    Chunk {
        /// Its index.
        index: u8,
        /// Its message's chunk count.
        count: u8,
    },
    /// A message too long to send.
    #[error("message of {len} bytes, at most {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A message kind this build does not know: the peer runs another protocol version.
    #[error("unknown message key {0:?}: the peer speaks another version of the rig protocol")]
    UnknownKey(Key),
    /// A known key whose body does not decode.
    #[error("message body does not decode: {0}")]
    Body(postcard::Error),
}
