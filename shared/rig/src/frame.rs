//! Frames on the serial line. A message (a key, a sequence number, a postcard body) travels
//! in one or more frames, each at most [`MAX_FRAME`] bytes on the wire:
//!
//! ```text
//! COBS( key (8) | seq (u32 LE) | chunk index (u8) | chunk count (u8) | data | CRC-32 (u32 LE) ) 0x00
//! ```
//!
//! The CRC covers everything before it. A body longer than [`MAX_CHUNK`] is split into up
//! to [`MAX_CHUNKS`] chunks of one message (same key and sequence number, in order); a
//! receiver reassembles them, and drops a message whose chunks do not arrive in order.

use crate::RigError;
use crate::cobs;
use crate::crc::crc32;
use alloc::vec::Vec;
use postcard_schema::key::Key;

/// Most bytes of one frame on the wire, its terminating zero included.
pub const MAX_FRAME: usize = 256;
/// Bytes of a frame's header: key, sequence number, chunk index and count.
pub const HEADER: usize = 8 + 4 + 1 + 1;
/// Bytes of the CRC at a frame's end.
pub const CRC: usize = 4;
/// Most data bytes of one frame (COBS adds one byte to at most 254, the terminator one).
pub const MAX_CHUNK: usize = MAX_FRAME - 2 - HEADER - CRC;
/// Most chunks of one message.
pub const MAX_CHUNKS: usize = 64;
/// Most bytes of one message's body.
pub const MAX_MESSAGE: usize = MAX_CHUNK * MAX_CHUNKS;

/// A message as it travels: what its body is (the key), which one it is (the sequence
/// number), and the postcard body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The message kind: `Key::for_path::<T>(path)` of its endpoint or topic.
    pub key: Key,
    /// The sender's sequence number (a response carries its request's).
    pub seq: u32,
    /// The postcard encoding of the message.
    pub body: Vec<u8>,
}

pub(crate) fn key_bytes(key: &Key) -> [u8; 8] {
    // `Key` serializes as its eight bytes.
    let mut out = [0u8; 8];
    postcard::to_slice(key, &mut out).expect("a key is eight bytes");
    out
}

fn key_of(bytes: &[u8]) -> Key {
    postcard::from_bytes(bytes).expect("eight bytes are a key")
}

/// The wire frames of one message, each ending with its zero; refused when the body is
/// longer than [`MAX_MESSAGE`].
pub fn encode(message: &Message) -> Result<Vec<Vec<u8>>, RigError> {
    if message.body.len() > MAX_MESSAGE {
        return Err(RigError::TooLarge {
            len: message.body.len(),
            max: MAX_MESSAGE,
        });
    }
    let chunks: Vec<&[u8]> = if message.body.is_empty() {
        alloc::vec![&[][..]]
    } else {
        message.body.chunks(MAX_CHUNK).collect()
    };
    let count = chunks.len() as u8;
    let key = key_bytes(&message.key);
    Ok(chunks
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let mut raw = Vec::with_capacity(HEADER + data.len() + CRC);
            raw.extend_from_slice(&key);
            raw.extend_from_slice(&message.seq.to_le_bytes());
            raw.push(i as u8);
            raw.push(count);
            raw.extend_from_slice(data);
            let crc = crc32(&raw);
            raw.extend_from_slice(&crc.to_le_bytes());
            let mut frame = Vec::with_capacity(raw.len() + 2);
            cobs::encode_into(&raw, &mut frame);
            frame.push(0);
            frame
        })
        .collect())
}

/// What a [`FrameReader`] has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames whose CRC matched.
    pub frames: u64,
    /// Messages delivered whole.
    pub messages: u64,
    /// Frames dropped: not COBS, too short, too long, or a CRC mismatch.
    pub bad_frames: u64,
    /// Of them, CRC mismatches.
    pub crc_errors: u64,
    /// Messages dropped because a chunk was missing or out of order.
    pub broken_messages: u64,
}

struct Partial {
    key: Key,
    seq: u32,
    count: u8,
    next: u8,
    body: Vec<u8>,
    /// A chunk went missing: the rest is dropped.
    broken: bool,
}

/// Reassembles messages from whatever bytes a serial read returned: a frame that is not
/// COBS, too long or fails its CRC is dropped and counted, and the stream resynchronises at
/// the next zero; nothing is ever delivered that did not arrive intact.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Skipping the rest of an over-long frame, up to its zero.
    discarding: bool,
    partial: Option<Partial>,
    stats: Stats,
}

impl FrameReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// What it has seen so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Feeds `bytes`; returns, in order, each message they complete and each frame they
    /// complete that was dropped (with why).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<Message, RigError>> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != 0 {
                if self.discarding {
                    continue;
                }
                if self.buf.len() + 1 >= MAX_FRAME {
                    self.buf.clear();
                    self.discarding = true;
                    self.stats.bad_frames += 1;
                    out.push(Err(RigError::Oversized { max: MAX_FRAME }));
                    continue;
                }
                self.buf.push(b);
                continue;
            }
            if self.discarding {
                self.discarding = false;
                continue;
            }
            if self.buf.is_empty() {
                continue; // a lone zero: line idle or a resync
            }
            let frame = core::mem::take(&mut self.buf);
            match self.frame(&frame) {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => {}
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    fn frame(&mut self, encoded: &[u8]) -> Result<Option<Message>, RigError> {
        let bad = |s: &mut Stats, e: RigError| {
            s.bad_frames += 1;
            Err(e)
        };
        let Some(raw) = cobs::decode(encoded) else {
            return bad(&mut self.stats, RigError::Cobs);
        };
        if raw.len() < HEADER + CRC {
            return bad(&mut self.stats, RigError::Short(raw.len()));
        }
        let (content, tail) = raw.split_at(raw.len() - CRC);
        let expected = u32::from_le_bytes(tail.try_into().expect("four bytes"));
        let actual = crc32(content);
        if expected != actual {
            self.stats.crc_errors += 1;
            return bad(&mut self.stats, RigError::Crc { expected, actual });
        }
        self.stats.frames += 1;
        let key = key_of(&content[..8]);
        let seq = u32::from_le_bytes(content[8..12].try_into().expect("four bytes"));
        let (index, count) = (content[12], content[13]);
        let data = &content[HEADER..];
        if count == 0 || index >= count || usize::from(count) > MAX_CHUNKS {
            self.stats.broken_messages += 1;
            return Err(RigError::Chunk { index, count });
        }
        if index == 0 {
            if self.partial.take().is_some_and(|p| !p.broken) {
                self.stats.broken_messages += 1; // a message whose last chunks never came
            }
            self.partial = Some(Partial {
                key,
                seq,
                count,
                next: 0,
                body: Vec::new(),
                broken: false,
            });
        }
        let Some(p) = self
            .partial
            .as_mut()
            .filter(|p| p.key == key && p.seq == seq)
        else {
            // A chunk of a message whose start was lost.
            if self.partial.take().is_some_and(|p| !p.broken) {
                self.stats.broken_messages += 1;
            }
            self.stats.broken_messages += 1;
            return Err(RigError::Chunk { index, count });
        };
        if p.broken {
            // The rest of a message already reported broken: dropped quietly.
            if index + 1 == p.count {
                self.partial = None;
            }
            return Ok(None);
        }
        if p.count != count || p.next != index {
            p.broken = true;
            if index + 1 == p.count {
                self.partial = None;
            }
            self.stats.broken_messages += 1;
            return Err(RigError::Chunk { index, count });
        }
        p.body.extend_from_slice(data);
        p.next += 1;
        if p.next < p.count {
            return Ok(None);
        }
        let p = self.partial.take().expect("held above");
        self.stats.messages += 1;
        Ok(Some(Message {
            key: p.key,
            seq: p.seq,
            body: p.body,
        }))
    }
}
