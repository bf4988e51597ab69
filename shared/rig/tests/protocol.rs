//! The rig protocol end to end in memory: every message through frames and back, keys that
//! change with any schema change, chunking, and corrupted or noisy lines where nothing is
//! ever delivered that was not sent.

use fedshield_rig::RigError;
use fedshield_rig::frame::{FrameReader, MAX_CHUNK, MAX_FRAME, MAX_MESSAGE, Message, encode};
use fedshield_rig::messages::*;
use postcard_schema::Schema;
use postcard_schema::key::Key;
use proptest::prelude::*;

fn sensors(i: u32) -> Sensors {
    Sensors {
        uptime_ms: 1000 * u64::from(i),
        supply_mv: Some(19_000 + i),
        supply_ma: Some(1_250),
        board_mc: Some(-4_500),
        fan_rpm: None,
        relays: Relays {
            power: true,
            network: i.is_multiple_of(2),
        },
    }
}

fn identity(firmware: &str) -> Identity {
    Identity {
        firmware: firmware.into(),
        protocol: PROTOCOL_VERSION,
        digest: protocol_digest(),
        capabilities: Capabilities {
            supply_meter: true,
            board_temperature: true,
            fan: false,
            relays: vec![Relay::Power, Relay::Network],
        },
    }
}

/// The bytes of `messages` on the line, frame after frame.
fn line(messages: &[Message]) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|m| encode(m).unwrap())
        .flatten()
        .collect()
}

fn from_rig() -> Vec<(Message, FromRig)> {
    vec![
        (
            message(PingEndpoint::RESPONSE_KEY, 7, &Ping { nonce: 42 }),
            FromRig::Pong(Ping { nonce: 42 }),
        ),
        (
            message(IdentifyEndpoint::RESPONSE_KEY, 8, &identity("rig-sim 0.1")),
            FromRig::Identity(identity("rig-sim 0.1")),
        ),
        (
            message(
                SetRelayEndpoint::RESPONSE_KEY,
                9,
                &Relays {
                    power: true,
                    network: false,
                },
            ),
            FromRig::Relays(Relays {
                power: true,
                network: false,
            }),
        ),
        (
            message(ReadSensorsEndpoint::RESPONSE_KEY, 10, &sensors(1)),
            FromRig::Sensors(sensors(1)),
        ),
        (
            message(
                TelemetryEndpoint::RESPONSE_KEY,
                11,
                &TelemetryRate { interval_ms: 100 },
            ),
            FromRig::TelemetryRate(TelemetryRate { interval_ms: 100 }),
        ),
        (
            message(TelemetryTopic::KEY, 1, &sensors(2)),
            FromRig::Telemetry(sensors(2)),
        ),
        (
            message(BrownOutTopic::KEY, 2, &BrownOut { in_ms: 500 }),
            FromRig::BrownOut(BrownOut { in_ms: 500 }),
        ),
        (
            message(
                RelayTopic::KEY,
                3,
                &RelayChanged {
                    relay: Relay::Network,
                    closed: false,
                },
            ),
            FromRig::RelayChanged(RelayChanged {
                relay: Relay::Network,
                closed: false,
            }),
        ),
    ]
}

fn from_edge() -> Vec<(Message, FromEdge)> {
    let status = EdgeStatus {
        round: 3,
        phase: EdgePhase::Uploading,
        step: 12,
        persisted_round: 2,
        duty_pct: 0,
    };
    vec![
        (
            message(PingEndpoint::REQUEST_KEY, 1, &Ping { nonce: 5 }),
            FromEdge::Ping(Ping { nonce: 5 }),
        ),
        (
            message(IdentifyEndpoint::REQUEST_KEY, 2, &Identify),
            FromEdge::Identify,
        ),
        (
            message(
                SetRelayEndpoint::REQUEST_KEY,
                3,
                &SetRelay {
                    relay: Relay::Power,
                    closed: false,
                },
            ),
            FromEdge::SetRelay(SetRelay {
                relay: Relay::Power,
                closed: false,
            }),
        ),
        (
            message(ReadSensorsEndpoint::REQUEST_KEY, 4, &ReadSensors),
            FromEdge::ReadSensors,
        ),
        (
            message(
                TelemetryEndpoint::REQUEST_KEY,
                5,
                &StartTelemetry { interval_ms: 250 },
            ),
            FromEdge::StartTelemetry(StartTelemetry { interval_ms: 250 }),
        ),
        (
            message(StatusTopic::KEY, 6, &status),
            FromEdge::Status(status),
        ),
    ]
}

#[test]
fn every_message_crosses_the_line_and_decodes_as_sent() {
    let rig = from_rig();
    let mut reader = FrameReader::new();
    let got: Vec<Message> = reader
        .push(&line(
            &rig.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
        ))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got.len(), rig.len());
    for (m, (sent, typed)) in got.iter().zip(&rig) {
        assert_eq!(m, sent);
        assert_eq!(&FromRig::decode(m).unwrap(), typed);
        // What the rig sends is not something the rig's side takes from an edge.
        assert!(matches!(FromEdge::decode(m), Err(RigError::UnknownKey(_))));
    }
    let edge = from_edge();
    let got = reader.push(&line(
        &edge.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
    ));
    for (m, (_, typed)) in got.iter().zip(&edge) {
        assert_eq!(&FromEdge::decode(m.as_ref().unwrap()).unwrap(), typed);
    }
    let s = reader.stats();
    assert_eq!((s.messages, s.bad_frames, s.broken_messages), (14, 0, 0));
    // Every frame fits the limit, terminator included.
    for (m, _) in &rig {
        for f in encode(m).unwrap() {
            assert!(f.len() <= MAX_FRAME, "{}", f.len());
            assert_eq!(f.iter().filter(|&&b| b == 0).count(), 1);
        }
    }
}

#[test]
fn keys_differ_per_message_and_change_with_any_schema_change() {
    let mut keys = KEYS.to_vec();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), KEYS.len(), "two messages share a key");
    // A firmware whose ping grew a field: same path, another schema, another key.
    #[derive(serde::Serialize, Schema)]
    struct PingV2 {
        nonce: u32,
        sent_ms: u64,
    }
    let v2 = Key::for_path::<PingV2>(PingEndpoint::PATH);
    assert_ne!(v2, PingEndpoint::REQUEST_KEY);
    let m = message(
        v2,
        1,
        &PingV2 {
            nonce: 1,
            sent_ms: 2,
        },
    );
    let got = FrameReader::new().push(&line(&[m]));
    assert!(matches!(
        FromEdge::decode(got[0].as_ref().unwrap()),
        Err(RigError::UnknownKey(k)) if k == v2
    ));
    // The digest that `Identity` carries pins this version's schemas: changing any message
    // changes it, and then PROTOCOL_VERSION must change too (update both here).
    assert_eq!(PROTOCOL_VERSION, 2);
    assert_eq!(protocol_digest(), PINNED_DIGEST, "{:#x}", protocol_digest());
}

const PINNED_DIGEST: u64 = 0xa1e2_c16b_6a65_c4e4;

#[test]
fn long_messages_are_chunked_and_reassembled_and_too_long_ones_refused() {
    let long = identity(&"x".repeat(3 * MAX_CHUNK));
    let m = message(IdentifyEndpoint::RESPONSE_KEY, 77, &long);
    let frames = encode(&m).unwrap();
    assert_eq!(frames.len(), 4);
    assert!(frames.iter().all(|f| f.len() <= MAX_FRAME));
    let got = FrameReader::new().push(&frames.concat());
    assert_eq!(
        FromRig::decode(got[0].as_ref().unwrap()).unwrap(),
        FromRig::Identity(long)
    );
    // A missing middle chunk drops that message, not the next one.
    let next = message(PingEndpoint::RESPONSE_KEY, 78, &Ping { nonce: 1 });
    let mut bytes: Vec<u8> = [&frames[..1], &frames[2..]].concat().concat();
    bytes.extend(line(std::slice::from_ref(&next)));
    let mut reader = FrameReader::new();
    let got = reader.push(&bytes);
    assert!(
        matches!(got[0], Err(RigError::Chunk { index: 2, count: 4 })),
        "{got:?}"
    );
    assert_eq!(got.last().unwrap().as_ref().unwrap(), &next);
    assert_eq!(reader.stats().broken_messages, 1);
    assert_eq!(reader.stats().messages, 1);
    let too_long = Message {
        key: IdentifyEndpoint::RESPONSE_KEY,
        seq: 1,
        body: vec![1; MAX_MESSAGE + 1],
    };
    assert!(matches!(encode(&too_long), Err(RigError::TooLarge { .. })));
}

#[test]
fn garbage_and_overlong_runs_are_dropped_and_the_stream_resynchronises() {
    let ping = message(PingEndpoint::RESPONSE_KEY, 1, &Ping { nonce: 9 });
    let mut bytes = vec![0x05, 0xff, 0xfe, 0x00]; // not a frame
    bytes.extend(vec![0x42; 1000]); // no zero for 1000 bytes
    bytes.push(0);
    bytes.extend(line(std::slice::from_ref(&ping)));
    let mut reader = FrameReader::new();
    // Fed a byte at a time, as a slow UART delivers them.
    let got: Vec<_> = bytes.chunks(1).flat_map(|b| reader.push(b)).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].is_err());
    assert_eq!(got[1], Err(RigError::Oversized { max: MAX_FRAME }));
    assert_eq!(got[2].as_ref().unwrap(), &ping);
    assert_eq!(reader.stats().bad_frames, 2);
}

/// A line that corrupts bytes at `rate` (seeded): a corrupted byte becomes another value,
/// sometimes a zero (which splits a frame).
fn noisy(bytes: &[u8], rate: f64, seed: u64) -> (Vec<u8>, usize) {
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut hits = 0;
    let out = bytes
        .iter()
        .map(|&b| {
            if (next() % 1_000_000) as f64 / 1e6 < rate {
                hits += 1;
                b ^ (1 + (next() % 255) as u8)
            } else {
                b
            }
        })
        .collect();
    (out, hits)
}

#[test]
fn at_one_percent_byte_errors_nothing_is_misdelivered_and_telemetry_keeps_flowing() {
    let sent: Vec<Message> = (0..2000)
        .map(|i| message(TelemetryTopic::KEY, i, &sensors(i)))
        .collect();
    let (bytes, hits) = noisy(&line(&sent), 0.01, 7);
    let mut reader = FrameReader::new();
    let got: Vec<Message> = bytes
        .chunks(64)
        .flat_map(|c| reader.push(c))
        .filter_map(Result::ok)
        .collect();
    // Every delivered message is one that was sent, intact, in order.
    let mut cursor = sent.iter();
    for m in &got {
        assert!(cursor.any(|s| s == m), "misdelivered {m:?}");
    }
    let s = reader.stats();
    let frame_len = encode(&sent[0]).unwrap()[0].len();
    assert!(hits > 500, "{hits} corrupted bytes");
    // Most frames (about 1 - 0.99^len) still arrive, and each lost one was counted.
    let expected = 2000.0 * 0.99f64.powi(frame_len as i32);
    assert!(
        (got.len() as f64) > 0.8 * expected,
        "{} of 2000 delivered, about {expected:.0} expected",
        got.len()
    );
    assert_eq!(s.messages as usize, got.len());
    assert!(s.crc_errors > 0 && s.bad_frames >= s.crc_errors, "{s:?}");
    eprintln!(
        "1% noise: {hits} bytes corrupted, {} of 2000 delivered, {} frames dropped ({} CRC)",
        got.len(),
        s.bad_frames,
        s.crc_errors
    );
}

proptest! {
    /// Any single corrupted byte (another value, zero included) of a line of messages:
    /// the messages delivered are exactly the sent ones minus at most the two around it.
    #[test]
    fn one_corrupted_byte_never_delivers_a_wrong_message(
        at in 0usize..10_000,
        flip in 1u8..=255,
    ) {
        let sent: Vec<Message> = from_rig().into_iter().map(|(m, _)| m).collect();
        let mut bytes = line(&sent);
        let at = at % bytes.len();
        bytes[at] ^= flip;
        let got: Vec<Message> = FrameReader::new()
            .push(&bytes)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        let mut cursor = sent.iter();
        for m in &got {
            prop_assert!(cursor.any(|s| s == m), "misdelivered {:?}", m);
        }
        prop_assert!(got.len() + 2 >= sent.len(), "{} of {}", got.len(), sent.len());
    }
}
