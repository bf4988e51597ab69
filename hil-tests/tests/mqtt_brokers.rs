//! MQTT publish/subscribe through both brokers FedShield supports: the embedded rumqttd and
//! a real mosquitto started for the test.

use fedshield_hil_tests::{Mosquitto, free_local_addr};
use fedshield_host::broker::EmbeddedBroker;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::time::Duration;

/// Subscribes, publishes `payload` at QoS 1 and returns what came back.
async fn round_trip(addr: SocketAddr, topic: &str, payload: Vec<u8>) -> Vec<u8> {
    let mut opts = MqttOptions::new(
        format!("rt-{}", addr.port()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 16);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let mut published = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("MQTT round trip timed out")
            .expect("MQTT connection failed");
        match ev {
            Event::Incoming(Packet::SubAck(_)) if !published => {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .unwrap();
                published = true;
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.topic, topic);
                return p.payload.to_vec();
            }
            _ => {}
        }
    }
}

fn sample_payload() -> Vec<u8> {
    let frame = fedshield_wire::rig::RigFrame::Power {
        seq: 7,
        millivolts: 5_000,
        milliamps: 900,
    };
    let mut p = fedshield_wire::to_payload(&frame);
    p.extend((0..200_000u32).map(|i| (i % 251) as u8)); // a chunk-sized message
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_carries_a_chunk_sized_message() {
    let broker = EmbeddedBroker::start(free_local_addr(), 1 << 20).unwrap();
    let payload = sample_payload();
    let got = round_trip(broker.addr(), "fedshield/test/embedded", payload.clone()).await;
    assert_eq!(got, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_carries_a_chunk_sized_message() {
    let broker = Mosquitto::start(1 << 20).expect("mosquitto");
    let payload = sample_payload();
    let got = round_trip(broker.addr(), "fedshield/test/mosquitto", payload.clone()).await;
    assert_eq!(got, payload);
}
