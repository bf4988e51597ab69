//! The serial link to an attached board or test rig: [`RigFrame`]s as COBS frames over
//! `tokio-serial`. The framing lives in `fedshield-wire`; this module only moves bytes.

use crate::EdgeError;
use fedshield_wire::rig::RigFrame;
use fedshield_wire::{FrameDecoder, WireError, encode_frame};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

/// An open serial link.
pub struct SerialLink {
    port_name: String,
    stream: SerialStream,
    decoder: FrameDecoder,
    ready: VecDeque<RigFrame>,
}

impl SerialLink {
    /// Opens `port` (for example `/dev/ttyTHS0` on a Jetson) at `baud`.
    pub fn open(port: &str, baud: u32) -> Result<Self, EdgeError> {
        let stream = tokio_serial::new(port, baud)
            .open_native_async()
            .map_err(|e| EdgeError::Serial {
                port: port.to_string(),
                source: e.into(),
            })?;
        Ok(Self {
            port_name: port.to_string(),
            stream,
            decoder: FrameDecoder::default(),
            ready: VecDeque::new(),
        })
    }

    fn io_err(&self, source: std::io::Error) -> EdgeError {
        EdgeError::Serial {
            port: self.port_name.clone(),
            source,
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &RigFrame) -> Result<(), EdgeError> {
        self.send_raw(&encode_frame(frame)).await
    }

    /// Writes bytes as they are (a rig simulating line noise uses this).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), EdgeError> {
        let res = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        }
        .await;
        res.map_err(|e| self.io_err(e))
    }

    /// Receives the next well-formed frame, waiting at most `timeout`. Malformed or
    /// oversized frames are logged and skipped.
    pub async fn recv(&mut self, timeout: Duration) -> Result<RigFrame, EdgeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 512];
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Ok(f);
            }
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return Err(EdgeError::Timeout(self.port_name.clone())),
                Ok(r) => r.map_err(|e| self.io_err(e))?,
            };
            if n == 0 {
                return Err(self.io_err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            for r in self.decoder.push::<RigFrame>(&buf[..n]) {
                match r {
                    Ok(f) => self.ready.push_back(f),
                    Err(
                        e @ (WireError::Malformed(_)
                        | WireError::Oversized { .. }
                        | WireError::Compression(_)),
                    ) => {
                        tracing::warn!(port = %self.port_name, "dropped serial frame: {e}");
                    }
                }
            }
        }
    }

    /// Sends a ping and waits for the matching pong; returns the round-trip time. Frames
    /// other than the awaited pong are skipped.
    pub async fn ping(&mut self, seq: u32, timeout: Duration) -> Result<Duration, EdgeError> {
        let start = tokio::time::Instant::now();
        self.send(&RigFrame::Ping { seq }).await?;
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if let RigFrame::Pong { seq: s } = self.recv(left).await?
                && s == seq
            {
                return Ok(start.elapsed());
            }
        }
    }
}
