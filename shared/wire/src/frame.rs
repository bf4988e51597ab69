//! COBS framing for byte streams (serial links).
//!
//! A frame is the COBS encoding of a postcard payload followed by one zero byte. COBS
//! guarantees the encoded bytes contain no zero, so a receiver that joins mid-stream or
//! loses bytes resynchronises at the next zero.

use crate::WireError;
use serde::{Serialize, de::DeserializeOwned};

/// Largest encoded frame (terminator excluded) a [`FrameDecoder`] accepts by default.
pub const MAX_FRAME_LEN: usize = 4096;

/// Encodes `value` as one COBS frame, terminator included.
pub fn encode_frame<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec_cobs(value).expect("postcard can encode every FedShield wire type")
}

/// Incremental frame decoder: feed it whatever a read returned, take the decoded values.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
    /// True while skipping the rest of an oversized frame up to its terminator.
    discarding: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that drops frames longer than `limit` encoded bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            discarding: false,
        }
    }

    /// Feeds `bytes` and returns one result per frame completed by them, in order. A bad
    /// frame yields an error and is dropped; the frames after it still decode.
    pub fn push<T: DeserializeOwned>(&mut self, bytes: &[u8]) -> Vec<Result<T, WireError>> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == 0 {
                if self.discarding {
                    self.discarding = false;
                } else if !self.buf.is_empty() {
                    out.push(
                        postcard::from_bytes_cobs(&mut self.buf)
                            .map_err(|e| WireError::Malformed(e.to_string())),
                    );
                }
                self.buf.clear();
            } else if !self.discarding {
                if self.buf.len() == self.limit {
                    self.buf.clear();
                    self.discarding = true;
                    out.push(Err(WireError::Oversized { limit: self.limit }));
                } else {
                    self.buf.push(b);
                }
            }
        }
        out
    }

    /// Bytes of the frame in progress.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        seq: u32,
        data: Vec<u8>,
    }

    #[test]
    fn frames_split_anywhere_decode_in_order() {
        let a = Sample {
            seq: 1,
            data: vec![0, 0, 5],
        };
        let b = Sample {
            seq: 2,
            data: vec![],
        };
        let mut stream = encode_frame(&a);
        stream.extend(encode_frame(&b));
        for split in 0..stream.len() {
            let mut d = FrameDecoder::default();
            let mut got: Vec<Sample> = d
                .push(&stream[..split])
                .into_iter()
                .map(Result::unwrap)
                .collect();
            got.extend(d.push(&stream[split..]).into_iter().map(Result::unwrap));
            assert_eq!(
                got,
                vec![
                    Sample {
                        seq: 1,
                        data: vec![0, 0, 5]
                    },
                    Sample {
                        seq: 2,
                        data: vec![]
                    }
                ]
            );
        }
    }

    #[test]
    fn oversized_frame_is_dropped_and_stream_resyncs() {
        let mut d = FrameDecoder::new(8);
        let mut stream = vec![7u8; 20];
        stream.push(0);
        stream.extend(encode_frame(&Sample {
            seq: 9,
            data: vec![],
        }));
        let got: Vec<Result<Sample, _>> = d.push(&stream);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Err(WireError::Oversized { limit: 8 }));
        assert_eq!(got[1].as_ref().unwrap().seq, 9);
    }

    #[test]
    fn garbage_frame_is_an_error_not_a_panic() {
        let mut d = FrameDecoder::default();
        let got: Vec<Result<Sample, _>> = d.push(&[3, 0xff, 0]);
        assert!(matches!(got[..], [Err(WireError::Malformed(_))]));
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let s = Sample { seq, data };
            let mut d = FrameDecoder::default();
            let got: Vec<Result<Sample, _>> = d.push(&encode_frame(&s));
            prop_assert_eq!(got, vec![Ok(s)]);
            prop_assert_eq!(d.pending(), 0);
        }
    }
}
