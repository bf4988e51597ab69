//! The rig protocol (`fedshield-rig`) over a real pty pair (socat) with tokio-serial: the
//! edge's `SerialLink` against a rig end that answers as firmware would.

use fedshield_edge::serial_link::SerialLink;
use fedshield_hil_tests::PtyPair;
use fedshield_rig::frame::Message;
use fedshield_rig::messages::*;
use postcard_schema::Schema;
use postcard_schema::key::Key;
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(5);

fn identity(digest: u64) -> Identity {
    Identity {
        firmware: "rig-test 1.0".into(),
        protocol: PROTOCOL_VERSION,
        digest,
        capabilities: Capabilities {
            supply_meter: true,
            board_temperature: true,
            fan: false,
            relays: vec![Relay::Power, Relay::Network],
        },
    }
}

fn reading(uptime_ms: u64) -> Sensors {
    Sensors {
        uptime_ms,
        supply_mv: Some(19_000),
        supply_ma: Some(1_250),
        board_mc: Some(41_500),
        fan_rpm: None,
        relays: Relays {
            power: true,
            network: true,
        },
    }
}

/// The rig's answer to a request, with the request's sequence number.
async fn answer<T: serde::Serialize>(rig: &mut SerialLink, key: Key, request: &Message, body: &T) {
    rig.send(&message(key, request.seq, body)).await.unwrap();
}

#[tokio::test]
async fn identify_ping_and_streams_cross_a_pty_pair_through_line_noise() {
    let pair = PtyPair::start().expect("socat pty pair");
    let mut edge = SerialLink::open(pair.a().to_str().unwrap(), 115_200).unwrap();
    let mut rig = SerialLink::open(pair.b().to_str().unwrap(), 115_200).unwrap();

    let rig_task = tokio::spawn(async move {
        // Identify.
        let m = rig.recv(SECOND).await.unwrap();
        assert_eq!(FromEdge::decode(&m).unwrap(), FromEdge::Identify);
        answer(
            &mut rig,
            IdentifyEndpoint::RESPONSE_KEY,
            &m,
            &identity(protocol_digest()),
        )
        .await;
        // Ping: line noise and a telemetry reading before the answer.
        let m = rig.recv(SECOND).await.unwrap();
        let FromEdge::Ping(ping) = FromEdge::decode(&m).unwrap() else {
            panic!("rig expected a ping, got {m:?}")
        };
        rig.send_raw(&[0x05, 0xff, 0xfe, 0x00]).await.unwrap();
        let s = rig.next_seq();
        rig.send(&message(TelemetryTopic::KEY, s, &reading(1)))
            .await
            .unwrap();
        answer(&mut rig, PingEndpoint::RESPONSE_KEY, &m, &ping).await;
        // A power-cut warning and a network cut, unasked.
        let s = rig.next_seq();
        rig.send(&message(BrownOutTopic::KEY, s, &BrownOut { in_ms: 800 }))
            .await
            .unwrap();
        let s = rig.next_seq();
        let cut = RelayChanged {
            relay: Relay::Network,
            closed: false,
        };
        rig.send(&message(RelayTopic::KEY, s, &cut)).await.unwrap();
        // The edge's status stream.
        let m = rig.recv(SECOND).await.unwrap();
        assert!(matches!(
            FromEdge::decode(&m).unwrap(),
            FromEdge::Status(EdgeStatus {
                round: 2,
                step: 5,
                ..
            })
        ));
        rig
    });

    let who = edge.identify(SECOND).await.unwrap();
    assert_eq!(who.firmware, "rig-test 1.0");
    let rtt = edge.ping(42, SECOND).await.unwrap();
    assert!(rtt < SECOND);
    // The reading that came before the ping's answer waited in order, then the streams.
    let next = |m: Message| FromRig::decode(&m).unwrap();
    assert_eq!(
        next(edge.recv(SECOND).await.unwrap()),
        FromRig::Telemetry(reading(1))
    );
    assert_eq!(
        next(edge.recv(SECOND).await.unwrap()),
        FromRig::BrownOut(BrownOut { in_ms: 800 })
    );
    assert_eq!(
        next(edge.recv(SECOND).await.unwrap()),
        FromRig::RelayChanged(RelayChanged {
            relay: Relay::Network,
            closed: false
        })
    );
    let status = EdgeStatus {
        round: 2,
        phase: EdgePhase::Training,
        step: 5,
        persisted_round: 1,
    };
    let s = edge.next_seq();
    edge.send(&message(StatusTopic::KEY, s, &status))
        .await
        .unwrap();
    rig_task.await.unwrap();
    // The noise was one bad frame, dropped and counted.
    assert_eq!(edge.stats().bad_frames, 1);
    // Identity, reading, pong, brown-out warning, relay change.
    assert_eq!(edge.stats().messages, 5);
}

#[tokio::test]
async fn a_rig_of_another_protocol_version_is_detected_at_connect() {
    let pair = PtyPair::start().expect("socat pty pair");
    let mut edge = SerialLink::open(pair.a().to_str().unwrap(), 115_200).unwrap();
    let mut rig = SerialLink::open(pair.b().to_str().unwrap(), 115_200).unwrap();
    // A firmware whose messages differ somewhere: its identity's digest does not match.
    let rig_task = tokio::spawn(async move {
        let m = rig.recv(SECOND).await.unwrap();
        answer(
            &mut rig,
            IdentifyEndpoint::RESPONSE_KEY,
            &m,
            &identity(0x1234),
        )
        .await;
        // One whose identity itself changed shape: its key is unknown to this edge.
        #[derive(serde::Serialize, Schema)]
        struct IdentityV2 {
            firmware: String,
            protocol: u16,
            board_serial: u64,
        }
        let m = rig.recv(SECOND).await.unwrap();
        let v2 = IdentityV2 {
            firmware: "rig-next 2.0".into(),
            protocol: 2,
            board_serial: 7,
        };
        let key = Key::for_path::<IdentityV2>(IdentifyEndpoint::RESPONSE_PATH);
        answer(&mut rig, key, &m, &v2).await;
        rig
    });
    let e = edge.identify(SECOND).await.unwrap_err().to_string();
    assert!(
        e.contains("0x0000000000001234") && e.contains("rig-test 1.0"),
        "{e}"
    );
    let e = edge
        .identify(Duration::from_millis(700))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("another protocol version"), "{e}");
    rig_task.await.unwrap();
}

#[tokio::test]
async fn silence_is_a_timeout_not_a_hang() {
    let pair = PtyPair::start().expect("socat pty pair");
    let mut edge = SerialLink::open(pair.a().to_str().unwrap(), 115_200).unwrap();
    let _rig = SerialLink::open(pair.b().to_str().unwrap(), 115_200).unwrap();
    let err = edge.ping(1, Duration::from_millis(200)).await.unwrap_err();
    assert!(
        matches!(err, fedshield_edge::EdgeError::Timeout(_)),
        "{err}"
    );
}
