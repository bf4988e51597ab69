//! A serial round trip of postcard frames with tokio-serial over a real pty pair (socat).

use fedshield_edge::serial_link::SerialLink;
use fedshield_hil_tests::PtyPair;
use fedshield_wire::rig::{RigFault, RigFrame};
use std::time::Duration;

#[tokio::test]
async fn ping_pong_and_frames_cross_a_pty_pair() {
    let pair = PtyPair::start().expect("socat pty pair");
    let mut edge = SerialLink::open(pair.a().to_str().unwrap(), 115_200).unwrap();
    let mut rig = SerialLink::open(pair.b().to_str().unwrap(), 115_200).unwrap();

    // The rig answers pings and then sends a power reading and a fault.
    let rig_task = tokio::spawn(async move {
        let got = rig.recv(Duration::from_secs(5)).await.unwrap();
        let RigFrame::Ping { seq } = got else {
            panic!("rig expected a ping, got {got:?}")
        };
        // Line noise before the answer: the edge must skip it and still decode the pong.
        rig.send_raw(&[0x05, 0xff, 0xfe, 0x00]).await.unwrap();
        rig.send(&RigFrame::Pong { seq }).await.unwrap();
        rig.send(&RigFrame::Power {
            seq: 1,
            millivolts: 19_000,
            milliamps: 1_250,
        })
        .await
        .unwrap();
        rig.send(&RigFrame::Fault(RigFault::NetworkDown))
            .await
            .unwrap();
        rig
    });

    let rtt = edge.ping(42, Duration::from_secs(5)).await.unwrap();
    assert!(rtt < Duration::from_secs(5));
    assert_eq!(
        edge.recv(Duration::from_secs(5)).await.unwrap(),
        RigFrame::Power {
            seq: 1,
            millivolts: 19_000,
            milliamps: 1_250
        }
    );
    assert_eq!(
        edge.recv(Duration::from_secs(5)).await.unwrap(),
        RigFrame::Fault(RigFault::NetworkDown)
    );
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
