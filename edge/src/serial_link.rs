//! The serial link to an attached board or test rig: `fedshield-rig` messages (typed,
//! schema-keyed, in COBS frames with a CRC-32) over `tokio-serial`. The protocol lives in
//! `fedshield-rig` (no_std, shared with rig firmware); this module moves bytes, matches
//! responses to requests by sequence number, and counts what the line corrupted.

use crate::EdgeError;
use fedshield_rig::frame::{FrameReader, Message, Stats, encode};
use fedshield_rig::messages::{
    Endpoint, Identify, IdentifyEndpoint, Identity, PROTOCOL_VERSION, Ping, PingEndpoint, message,
    protocol_digest,
};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

/// An open serial link (either end: the edge, or a rig simulator).
pub struct SerialLink {
    port_name: String,
    stream: SerialStream,
    reader: FrameReader,
    ready: VecDeque<Message>,
    next_seq: u32,
    /// Bad frames already logged (the first one is; the rest are counted).
    logged_bad: bool,
}

impl SerialLink {
    /// Opens `port` (for example `/dev/ttyTHS0` or `/dev/ttyACM0` on a Jetson) at `baud`.
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
            reader: FrameReader::new(),
            ready: VecDeque::new(),
            next_seq: 0,
            logged_bad: false,
        })
    }

    fn io_err(&self, source: std::io::Error) -> EdgeError {
        EdgeError::Serial {
            port: self.port_name.clone(),
            source,
        }
    }

    fn rig_err(&self, why: impl std::fmt::Display) -> EdgeError {
        EdgeError::Rig {
            port: self.port_name.clone(),
            why: why.to_string(),
        }
    }

    /// What the line delivered and dropped so far.
    pub fn stats(&self) -> Stats {
        self.reader.stats()
    }

    /// A fresh sequence number for a message this end starts.
    pub fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Sends one message (one or more frames).
    pub async fn send(&mut self, message: &Message) -> Result<(), EdgeError> {
        let frames = encode(message).map_err(|e| self.rig_err(e))?;
        self.send_raw(&frames.concat()).await
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

    /// Receives the next whole message, waiting at most `timeout`. Corrupt frames are
    /// dropped and counted ([`SerialLink::stats`]); the first is logged.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Message, EdgeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 512];
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(m);
            }
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return Err(EdgeError::Timeout(self.port_name.clone())),
                Ok(r) => r.map_err(|e| self.io_err(e))?,
            };
            if n == 0 {
                return Err(self.io_err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            for r in self.reader.push(&buf[..n]) {
                match r {
                    Ok(m) => self.ready.push_back(m),
                    Err(e) if !self.logged_bad => {
                        self.logged_bad = true;
                        tracing::warn!(
                            port = %self.port_name,
                            "dropped a serial frame ({e}); further ones are counted, not logged"
                        );
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// Sends `request` on endpoint `E` and waits for its response (the message with `E`'s
    /// response key and the request's sequence number). Other messages that arrive
    /// meanwhile stay queued for [`SerialLink::recv`].
    pub async fn request<E: Endpoint>(
        &mut self,
        request: &E::Request,
        timeout: Duration,
    ) -> Result<E::Response, EdgeError> {
        let seq = self.next_seq();
        self.send(&message(E::REQUEST_KEY, seq, request)).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut others = VecDeque::new();
        let result = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = match self.recv(left).await {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            if m.key == E::RESPONSE_KEY && m.seq == seq {
                break postcard::from_bytes(&m.body).map_err(|e| self.rig_err(e));
            }
            others.push_back(m);
        };
        // What came meanwhile goes back in front, in order.
        for m in others.into_iter().rev() {
            self.ready.push_front(m);
        }
        result
    }

    /// Pings and waits for the echo; returns the round-trip time.
    pub async fn ping(&mut self, nonce: u32, timeout: Duration) -> Result<Duration, EdgeError> {
        let start = tokio::time::Instant::now();
        let pong = self
            .request::<PingEndpoint>(&Ping { nonce }, timeout)
            .await?;
        if pong.nonce != nonce {
            return Err(self.rig_err(format!("ping {nonce} answered with nonce {}", pong.nonce)));
        }
        Ok(start.elapsed())
    }

    /// Asks the rig who it is, and refuses a rig that speaks another protocol version: its
    /// answer has another key (no answer this build can read), or another digest.
    pub async fn identify(&mut self, timeout: Duration) -> Result<Identity, EdgeError> {
        let identity = self
            .request::<IdentifyEndpoint>(&Identify, timeout)
            .await
            .map_err(|e| match e {
                EdgeError::Timeout(port) => EdgeError::Rig {
                    port,
                    why: format!(
                        "no identity this edge can read within the timeout ({} frames dropped, messages of unknown kinds: a rig of another protocol version, or none)",
                        self.stats().bad_frames
                    ),
                },
                e => e,
            })?;
        if identity.protocol != PROTOCOL_VERSION || identity.digest != protocol_digest() {
            return Err(EdgeError::RigVersion {
                port: self.port_name.clone(),
                firmware: identity.firmware,
                protocol: identity.protocol,
                digest: identity.digest,
            });
        }
        Ok(identity)
    }
}
