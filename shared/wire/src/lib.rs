//! The FedShield wire format.
//!
//! Every payload that leaves a process is a [`postcard`] encoding of a serde type; MQTT
//! carries one payload per message, optionally wrapped in a [`Compressed`] zstd envelope
//! when that pays (see [`compress_if_smaller`]). Serial links to rigs use their own framing
//! (`fedshield-rig`: COBS frames with a CRC-32, no_std for rig firmware).
//!
//! This crate does no I/O: drivers feed it bytes and take bytes from it.

/// Errors of the wire format. None of them is fatal to a long-running process: the driver
/// drops the offending bytes, logs the reason and goes on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A payload did not decode as the expected type.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A compressed envelope did not decompress, or decompressed past its limit.
    #[error("bad compressed envelope: {0}")]
    Compression(String),
}

/// A payload that may have been zstd-compressed by its sender.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compressed {
    /// Sent as is: compression would not have made it smaller.
    Raw(Vec<u8>),
    /// zstd frame with the length of the original bytes.
    Zstd {
        /// Length of the decompressed bytes, checked on decompression.
        original_len: u32,
        /// The zstd frame.
        data: Vec<u8>,
    },
}

/// zstd level used on the wire: level 3 is zstd's default, a good speed/ratio point for
/// edge CPUs.
pub const ZSTD_LEVEL: i32 = 3;

/// Compresses `bytes` with zstd and keeps the result only when it is smaller.
pub fn compress_if_smaller(bytes: &[u8]) -> Compressed {
    match zstd::bulk::compress(bytes, ZSTD_LEVEL) {
        Ok(data) if data.len() < bytes.len() && u32::try_from(bytes.len()).is_ok() => {
            Compressed::Zstd {
                original_len: bytes.len() as u32,
                data,
            }
        }
        _ => Compressed::Raw(bytes.to_vec()),
    }
}

impl Compressed {
    /// Returns the original bytes, refusing anything that would decompress past `limit`
    /// (a decompression bomb never allocates more than `limit` bytes).
    pub fn into_bytes(self, limit: usize) -> Result<Vec<u8>, WireError> {
        match self {
            Compressed::Raw(b) if b.len() <= limit => Ok(b),
            Compressed::Raw(b) => Err(WireError::Compression(format!(
                "raw payload of {} bytes exceeds limit {limit}",
                b.len()
            ))),
            Compressed::Zstd { original_len, data } => {
                let n = original_len as usize;
                if n > limit {
                    return Err(WireError::Compression(format!(
                        "declared size {n} exceeds limit {limit}"
                    )));
                }
                let out = zstd::bulk::decompress(&data, n)
                    .map_err(|e| WireError::Compression(e.to_string()))?;
                if out.len() != n {
                    return Err(WireError::Compression(format!(
                        "declared {n} bytes, got {}",
                        out.len()
                    )));
                }
                Ok(out)
            }
        }
    }

    /// Bytes this envelope occupies inside its payload (without the postcard tag).
    pub fn wire_len(&self) -> usize {
        match self {
            Compressed::Raw(b) => b.len(),
            Compressed::Zstd { data, .. } => data.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_is_kept_only_when_it_pays() {
        let zeros = vec![0u8; 10_000];
        let c = compress_if_smaller(&zeros);
        assert!(matches!(c, Compressed::Zstd { .. }));
        assert!(c.wire_len() < 100);
        assert_eq!(c.into_bytes(10_000).unwrap(), zeros);

        // splitmix64 output looks random to zstd: it must be sent raw.
        let noise: Vec<u8> = (0u64..512)
            .flat_map(|i| {
                let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)).to_le_bytes()
            })
            .collect();
        assert!(matches!(compress_if_smaller(&noise), Compressed::Raw(_)));
    }

    #[test]
    fn decompression_respects_limit() {
        let c = compress_if_smaller(&vec![1u8; 1 << 20]);
        assert!(matches!(
            c.clone().into_bytes(1 << 10),
            Err(WireError::Compression(_))
        ));
        // A lying declared size is caught too.
        if let Compressed::Zstd { data, .. } = c {
            let liar = Compressed::Zstd {
                original_len: 10,
                data,
            };
            assert!(liar.into_bytes(1 << 20).is_err());
        }
    }
}
