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
        duty_pct: 100,
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

mod client {
    use super::*;
    use fedshield_edge::rig_client::{RigClient, RigEvent};
    use fedshield_hil_tests::rig_sim::{SimRig, bench_rig};
    use fedshield_rig::sim::{Fault, Output, Rig, Step, Thermal, Trigger};
    use std::time::Instant;

    fn rig(scenario: Vec<Step>) -> Rig {
        bench_rig(
            Thermal {
                ambient_c: 30.0,
                rise_c: 50.0,
                tau_s: 60.0,
            },
            20,
            scenario,
        )
    }

    fn status(step: u32) -> EdgeStatus {
        EdgeStatus {
            round: 1,
            phase: EdgePhase::Training,
            step,
            persisted_round: 0,
            duty_pct: 100,
        }
    }

    fn until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !ok() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn next_event(client: &RigClient, secs: u64) -> RigEvent {
        client
            .event_within(Duration::from_secs(secs))
            .expect("a rig event in time")
    }

    /// The edge's rig client against a simulated rig over a pty: it identifies the rig,
    /// takes its supply power (19 V x 1.3 A while the device trains), reports the
    /// device's status, and passes on the warning of a power cut the scenario fires at
    /// training step 3, then the power's return.
    #[test]
    fn the_client_streams_power_reports_status_and_passes_on_a_power_cut() {
        let pair = PtyPair::start().expect("socat pty pair");
        let cut = Step {
            when: Trigger::Step(1, 3),
            fault: Fault::CutPower {
                warn_ms: 800,
                off_ms: 1_000,
            },
        };
        let sim = SimRig::spawn(pair.b(), rig(vec![cut]), 1).unwrap();
        let client = RigClient::start(pair.a().to_str().unwrap(), 115_200, 50).unwrap();
        assert!(matches!(next_event(&client, 10), RigEvent::Connected(_)));
        client.report(status(1));
        until("the rig's training-load power", 10, || {
            client
                .power()
                .fresh()
                .is_some_and(|w| (w - 24.7).abs() < 1e-9)
        });
        assert_eq!(sim.with(|r| r.device_status()), Some(status(1)));
        client.report(status(3));
        assert_eq!(next_event(&client, 10), RigEvent::BrownOut { in_ms: 800 });
        assert_eq!(
            next_event(&client, 10),
            RigEvent::Relay(RelayChanged {
                relay: Relay::Power,
                closed: true
            })
        );
        let log = sim.log();
        let at = |o: &Output| log.iter().find(|(_, x)| x == o).map(|(t, _)| *t);
        let fired = at(&Output::Fired(0)).unwrap();
        let (off, on) = (
            at(&Output::Power(false)).unwrap(),
            at(&Output::Power(true)).unwrap(),
        );
        // Cut after the 800 ms warning, back 1,000 ms after the cut was due.
        assert!(off >= fired + 800 && on >= fired + 1_800, "{log:?}");
        assert_eq!(client.stats().bad_frames, 0);
    }

    /// 1% byte errors on the rig's line for 3 s: corrupt frames are dropped and counted,
    /// readings keep arriving; then the rig goes silent: the client says so once and the
    /// power reading is dropped (on-board telemetry from then on); it comes back.
    #[test]
    fn a_noisy_then_silent_rig_never_stops_the_client_and_it_falls_back() {
        let pair = PtyPair::start().expect("socat pty pair");
        let noise = Step {
            when: Trigger::Round(1),
            fault: Fault::Noise {
                per_million: 10_000,
                for_ms: 3_000,
            },
        };
        let sim = SimRig::spawn(pair.b(), rig(vec![noise]), 7).unwrap();
        let client = RigClient::start(pair.a().to_str().unwrap(), 115_200, 20).unwrap();
        assert!(matches!(next_event(&client, 10), RigEvent::Connected(_)));
        client.report(status(1)); // starts the noise
        until("the noise's end", 15, || {
            sim.log().iter().any(|(_, o)| *o == Output::Noise(0))
        });
        let s = client.stats();
        assert!(s.bad_frames > 0, "{s:?}");
        assert!(s.messages > 20, "{s:?}");
        eprintln!(
            "1% noise for 3 s: {} messages delivered, {} frames dropped ({} CRC)",
            s.messages, s.bad_frames, s.crc_errors
        );
        assert!(client.power().fresh().is_some());
        sim.mute(true);
        assert_eq!(next_event(&client, 10), RigEvent::Silent);
        assert_eq!(client.power().fresh(), None);
        sim.mute(false);
        assert_eq!(next_event(&client, 10), RigEvent::Back);
        until("power again", 10, || client.power().fresh().is_some());
    }
}
