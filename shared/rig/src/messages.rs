//! The rig's messages: requests the edge sends with the rig's responses ([`Endpoint`]s), and
//! streams either side sends unasked ([`Topic`]s). Every message kind has a key,
//! `Key::for_path::<T>(path)` (postcard-schema's FNV-1a over the path and the type's whole
//! schema): a firmware and an edge built from different versions of a message get different
//! keys, so the receiver reports an unknown key instead of misreading the bytes.

use alloc::string::String;
use alloc::vec::Vec;
use postcard_schema::Schema;
use postcard_schema::key::Key;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A request the edge sends and the response the rig returns (with the request's sequence
/// number). The two keys hash different paths (`PATH/request`, `PATH/response`): a response
/// of the request's shape (a ping's echo) still has a key of its own.
pub trait Endpoint {
    /// The endpoint's name.
    const PATH: &'static str;
    /// `PATH/request`.
    const REQUEST_PATH: &'static str;
    /// `PATH/response`.
    const RESPONSE_PATH: &'static str;
    /// What the edge sends.
    type Request: Serialize + DeserializeOwned + Schema;
    /// What the rig answers.
    type Response: Serialize + DeserializeOwned + Schema;
    /// The request's key.
    const REQUEST_KEY: Key = Key::for_path::<Self::Request>(Self::REQUEST_PATH);
    /// The response's key.
    const RESPONSE_KEY: Key = Key::for_path::<Self::Response>(Self::RESPONSE_PATH);
}

/// A message sent unasked (a stream).
pub trait Topic {
    /// The topic's name.
    const PATH: &'static str;
    /// The message.
    type Message: Serialize + DeserializeOwned + Schema;
    /// Its key.
    const KEY: Key = Key::for_path::<Self::Message>(Self::PATH);
}

macro_rules! endpoint {
    ($(#[$doc:meta])* $name:ident, $path:literal, $req:ty => $resp:ty) => {
        $(#[$doc])*
        pub enum $name {}
        impl Endpoint for $name {
            const PATH: &'static str = $path;
            const REQUEST_PATH: &'static str = concat!($path, "/request");
            const RESPONSE_PATH: &'static str = concat!($path, "/response");
            type Request = $req;
            type Response = $resp;
        }
    };
}

macro_rules! topic {
    ($(#[$doc:meta])* $name:ident, $path:literal, $msg:ty) => {
        $(#[$doc])*
        pub enum $name {}
        impl Topic for $name {
            const PATH: &'static str = $path;
            type Message = $msg;
        }
    };
}

/// A liveness probe; the rig echoes the nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Ping {
    /// Any value.
    pub nonce: u32,
}

/// A relay of the rig.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub enum Relay {
    /// The device's supply.
    Power,
    /// The device's network (Ethernet, or the broker connection through the rig's proxy).
    Network,
}

/// What a rig can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Capabilities {
    /// It measures the device's supply voltage and current.
    pub supply_meter: bool,
    /// It has a board temperature sensor.
    pub board_temperature: bool,
    /// It reads a fan's speed.
    pub fan: bool,
    /// Its relays.
    pub relays: Vec<Relay>,
}

/// Who the rig is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Identity {
    /// Its firmware's name and version.
    pub firmware: String,
    /// [`PROTOCOL_VERSION`] of the firmware.
    pub protocol: u16,
    /// [`protocol_digest`] of the firmware: equal when both sides know the same messages.
    pub digest: u64,
    /// What it can do.
    pub capabilities: Capabilities,
}

/// Whether each relay is closed (the device powered, the network connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Relays {
    /// The supply relay.
    pub power: bool,
    /// The network relay.
    pub network: bool,
}

/// Close or open a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct SetRelay {
    /// Which.
    pub relay: Relay,
    /// Closed (on) or open (off).
    pub closed: bool,
}

/// The rig's readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Sensors {
    /// Milliseconds since the rig started.
    pub uptime_ms: u64,
    /// The device's supply voltage (mV), where the rig measures it.
    pub supply_mv: Option<u32>,
    /// The device's supply current (mA).
    pub supply_ma: Option<u32>,
    /// Board temperature (millidegrees Celsius).
    pub board_mc: Option<i32>,
    /// Fan speed (rpm).
    pub fan_rpm: Option<u32>,
    /// The relays.
    pub relays: Relays,
}

/// Ask for a reading every `interval_ms` (0: stop the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct StartTelemetry {
    /// Milliseconds between readings.
    pub interval_ms: u32,
}

/// The interval the rig streams at (it may clamp the one asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct TelemetryRate {
    /// Milliseconds between readings (0: stopped).
    pub interval_ms: u32,
}

/// Ask who the rig is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct Identify;

/// Ask for one reading now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct ReadSensors;

/// The rig will cut the device's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct BrownOut {
    /// In this many milliseconds.
    pub in_ms: u32,
}

/// A relay changed without being asked (a scenario, an operator, a supply fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct RelayChanged {
    /// Which.
    pub relay: Relay,
    /// Closed (restored) or open (cut).
    pub closed: bool,
}

/// Where the device's federation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub enum EdgePhase {
    /// Waiting for a round.
    Idle,
    /// Joined a round, waiting for its roster.
    Joined,
    /// Training locally.
    Training,
    /// Uploading its encrypted update.
    Uploading,
    /// Waiting for the round's end or its global update.
    Waiting,
}

/// What the device is doing (the rig logs it beside its measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub struct EdgeStatus {
    /// The round (0: none yet).
    pub round: u64,
    /// Its phase.
    pub phase: EdgePhase,
    /// Local steps trained in the round.
    pub step: u32,
    /// The last round whose state the device persisted.
    pub persisted_round: u64,
    /// How hard the trainer works now, in percent: its duty cycle over the last step
    /// (100 unthrottled, lower while the governor slows it, 0 while paused); 0 outside
    /// training.
    pub duty_pct: u8,
}

endpoint!(
    /// Liveness.
    PingEndpoint, "fedshield/rig/ping", Ping => Ping
);
endpoint!(
    /// Firmware, protocol and capabilities.
    IdentifyEndpoint, "fedshield/rig/identify", Identify => Identity
);
endpoint!(
    /// Switch a relay; answers the relays' states after it.
    SetRelayEndpoint, "fedshield/rig/relay", SetRelay => Relays
);
endpoint!(
    /// One reading now.
    ReadSensorsEndpoint, "fedshield/rig/sensors", ReadSensors => Sensors
);
endpoint!(
    /// Start, change or stop the telemetry stream.
    TelemetryEndpoint, "fedshield/rig/telemetry/rate", StartTelemetry => TelemetryRate
);
topic!(
    /// Readings at the rate asked for (rig to edge).
    TelemetryTopic, "fedshield/rig/telemetry", Sensors
);
topic!(
    /// An impending power cut (rig to edge).
    BrownOutTopic, "fedshield/rig/brown-out", BrownOut
);
topic!(
    /// A relay changed unasked: power or network cut or restored (rig to edge).
    RelayTopic, "fedshield/rig/relay-changed", RelayChanged
);
topic!(
    /// The device's state (edge to rig).
    StatusTopic, "fedshield/rig/edge-status", EdgeStatus
);

/// The protocol's version (bumped with any change to the messages).
pub const PROTOCOL_VERSION: u16 = 2;

/// Every key of the protocol, requests and responses, then topics.
pub const KEYS: [Key; 14] = [
    PingEndpoint::REQUEST_KEY,
    PingEndpoint::RESPONSE_KEY,
    IdentifyEndpoint::REQUEST_KEY,
    IdentifyEndpoint::RESPONSE_KEY,
    SetRelayEndpoint::REQUEST_KEY,
    SetRelayEndpoint::RESPONSE_KEY,
    ReadSensorsEndpoint::REQUEST_KEY,
    ReadSensorsEndpoint::RESPONSE_KEY,
    TelemetryEndpoint::REQUEST_KEY,
    TelemetryEndpoint::RESPONSE_KEY,
    TelemetryTopic::KEY,
    BrownOutTopic::KEY,
    RelayTopic::KEY,
    StatusTopic::KEY,
];

/// FNV-1a (64-bit) over every key of [`KEYS`]: two builds agree on it exactly when they
/// agree on every message's path and schema.
pub fn protocol_digest() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for key in &KEYS {
        for b in crate::frame::key_bytes(key) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A message from the rig, decoded by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromRig {
    /// Answer to a ping.
    Pong(Ping),
    /// Answer to identify.
    Identity(Identity),
    /// Answer to set-relay.
    Relays(Relays),
    /// Answer to read-sensors.
    Sensors(Sensors),
    /// Answer to the telemetry rate.
    TelemetryRate(TelemetryRate),
    /// A streamed reading.
    Telemetry(Sensors),
    /// An impending power cut.
    BrownOut(BrownOut),
    /// A relay changed unasked.
    RelayChanged(RelayChanged),
}

/// A message from the edge, decoded by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromEdge {
    /// A ping.
    Ping(Ping),
    /// Who are you.
    Identify,
    /// Switch a relay.
    SetRelay(SetRelay),
    /// One reading now.
    ReadSensors,
    /// The telemetry rate.
    StartTelemetry(StartTelemetry),
    /// The device's state.
    Status(EdgeStatus),
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, crate::RigError> {
    postcard::from_bytes(bytes).map_err(crate::RigError::Body)
}

impl FromRig {
    /// Decodes a message the rig sent; an unknown key is a rig of another protocol version.
    pub fn decode(m: &crate::frame::Message) -> Result<Self, crate::RigError> {
        let k = m.key;
        let b = &m.body[..];
        Ok(if k == PingEndpoint::RESPONSE_KEY {
            Self::Pong(body(b)?)
        } else if k == IdentifyEndpoint::RESPONSE_KEY {
            Self::Identity(body(b)?)
        } else if k == SetRelayEndpoint::RESPONSE_KEY {
            Self::Relays(body(b)?)
        } else if k == ReadSensorsEndpoint::RESPONSE_KEY {
            Self::Sensors(body(b)?)
        } else if k == TelemetryEndpoint::RESPONSE_KEY {
            Self::TelemetryRate(body(b)?)
        } else if k == TelemetryTopic::KEY {
            Self::Telemetry(body(b)?)
        } else if k == BrownOutTopic::KEY {
            Self::BrownOut(body(b)?)
        } else if k == RelayTopic::KEY {
            Self::RelayChanged(body(b)?)
        } else {
            return Err(crate::RigError::UnknownKey(k));
        })
    }
}

impl FromEdge {
    /// Decodes a message the edge sent (the rig's side).
    pub fn decode(m: &crate::frame::Message) -> Result<Self, crate::RigError> {
        let k = m.key;
        let b = &m.body[..];
        Ok(if k == PingEndpoint::REQUEST_KEY {
            Self::Ping(body(b)?)
        } else if k == IdentifyEndpoint::REQUEST_KEY {
            body::<Identify>(b)?;
            Self::Identify
        } else if k == SetRelayEndpoint::REQUEST_KEY {
            Self::SetRelay(body(b)?)
        } else if k == ReadSensorsEndpoint::REQUEST_KEY {
            body::<ReadSensors>(b)?;
            Self::ReadSensors
        } else if k == TelemetryEndpoint::REQUEST_KEY {
            Self::StartTelemetry(body(b)?)
        } else if k == StatusTopic::KEY {
            Self::Status(body(b)?)
        } else {
            return Err(crate::RigError::UnknownKey(k));
        })
    }
}

/// The message of `key` with `value` as its body, numbered `seq`.
pub fn message<T: Serialize>(key: Key, seq: u32, value: &T) -> crate::frame::Message {
    crate::frame::Message {
        key,
        seq,
        body: postcard::to_allocvec(value).expect("rig messages encode"),
    }
}
