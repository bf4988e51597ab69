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
    let mut p = postcard::to_stdvec(&(7u32, 5_000u32, 900u32)).unwrap();
    p.extend((0..200_000u32).map(|i| (i % 251) as u8)); // a chunk-sized message
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_carries_a_chunk_sized_message() {
    // A port another process took between the check and the broker's bind is refused by
    // the start (`holds_listener`): another port then.
    let broker = (0..5)
        .find_map(|_| EmbeddedBroker::start(free_local_addr(), 1 << 20).ok())
        .expect("the embedded broker starts on one of five free ports");
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

/// A link with `tls` subscribed to `topic` on `broker`; what it reports first.
fn tls_link(
    broker: &Mosquitto,
    id: &str,
    tls: fedshield_transport::Tls,
    topic: &str,
) -> fedshield_transport::Link {
    fedshield_transport::Link::start(fedshield_transport::LinkConfig {
        host: "127.0.0.1".into(),
        port: broker.addr().port(),
        client_id: id.into(),
        credentials: None,
        max_packet_bytes: 1 << 20,
        subscriptions: vec![topic.into()],
        last_will: None,
        birth: None,
        tls: Some(tls),
        incoming_budget: 64 << 20,
        overflow: fedshield_transport::Overflow::Drop,
    })
    .unwrap()
}

#[test]
fn links_speak_tls_to_mosquitto_and_refuse_a_broker_their_ca_did_not_sign() {
    use fedshield_transport::Incoming;
    let broker = Mosquitto::start_tls(1 << 20).expect("mosquitto with TLS");
    let topic = "fedshield/tls/check";
    let link = tls_link(
        &broker,
        "tls-good",
        fedshield_transport::Tls {
            ca_file: broker.ca_file(),
            client_auth: None,
        },
        topic,
    );
    let payload = sample_payload();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut published = false;
    loop {
        assert!(std::time::Instant::now() < deadline, "no TLS round trip");
        match link.recv(Duration::from_millis(200)).unwrap() {
            Some(Incoming::Connected) if !published => {
                // Give the subscription a moment to be acknowledged.
                std::thread::sleep(Duration::from_millis(300));
                link.publish(topic, payload.clone(), false).unwrap();
                published = true;
            }
            Some(Incoming::Message { payload: got, .. }) => {
                assert_eq!(got, payload);
                break;
            }
            Some(Incoming::Disconnected(e)) => panic!("TLS connection failed: {e}"),
            _ => {}
        }
    }
    link.disconnect();
    // Another broker's CA (a second TLS mosquitto's) does not vouch for this broker.
    let other = Mosquitto::start_tls(1 << 20).expect("second mosquitto with TLS");
    let wrong = tls_link(
        &broker,
        "tls-wrong-ca",
        fedshield_transport::Tls {
            ca_file: other.ca_file(),
            client_auth: None,
        },
        topic,
    );
    match wrong.recv(Duration::from_secs(10)).unwrap() {
        Some(Incoming::Disconnected(e)) => {
            assert!(
                e.to_lowercase().contains("certificate") || e.contains("Tls"),
                "{e}"
            )
        }
        other => panic!("expected a refused certificate, got {other:?}"),
    }
    // A missing CA file is a configuration error naming the file.
    let err = fedshield_transport::Link::start(fedshield_transport::LinkConfig {
        host: "127.0.0.1".into(),
        port: broker.addr().port(),
        client_id: "tls-missing".into(),
        credentials: None,
        max_packet_bytes: 1 << 20,
        subscriptions: vec![],
        last_will: None,
        birth: None,
        tls: Some(fedshield_transport::Tls {
            ca_file: "/nonexistent/ca.pem".into(),
            client_auth: None,
        }),
        incoming_budget: 64 << 20,
        overflow: fedshield_transport::Overflow::Drop,
    })
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

/// A plain link to a broker on loopback `port` with a budget of `budget` bytes for 256 KiB
/// packets.
fn plain_link(
    port: u16,
    id: &str,
    subscriptions: Vec<String>,
    budget: usize,
) -> fedshield_transport::Link {
    held_link(
        port,
        id,
        subscriptions,
        budget,
        fedshield_transport::Overflow::Drop,
    )
}

/// As [`plain_link`], with the overflow policy given.
fn held_link(
    port: u16,
    id: &str,
    subscriptions: Vec<String>,
    budget: usize,
    overflow: fedshield_transport::Overflow,
) -> fedshield_transport::Link {
    fedshield_transport::Link::start(fedshield_transport::LinkConfig {
        host: "127.0.0.1".into(),
        port,
        client_id: id.into(),
        credentials: None,
        max_packet_bytes: 256 << 10,
        subscriptions,
        last_will: None,
        birth: None,
        tls: None,
        incoming_budget: budget,
        overflow,
    })
    .unwrap()
}

/// The next message on `link` (hang guard: 20 s).
fn next_message(link: &fedshield_transport::Link) -> (String, Vec<u8>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(fedshield_transport::Incoming::Message { topic, payload }) =
            link.recv(Duration::from_millis(200)).unwrap()
        {
            return (topic, payload);
        }
    }
    panic!("no message within 20 s");
}

/// A flood on a link whose driver does not read holds at most the incoming budget, counts
/// the rest as dropped, and leaves the link working: later messages arrive, and the retained
/// ones come back on a new subscription.
#[test]
fn a_flood_on_an_unread_link_holds_at_most_its_budget_and_the_link_recovers() {
    let broker = Mosquitto::start(1 << 20).expect("mosquitto");
    let topic = "fedshield/flood/t";
    let budget = 1 << 20;
    let publisher = plain_link(broker.addr().port(), "flooder", vec![], 1 << 20);
    publisher
        .publish(topic, b"retained marker".to_vec(), true)
        .unwrap();
    let link = plain_link(broker.addr().port(), "flooded", vec![topic.into()], budget);
    // The retained marker proves the subscription is in place.
    assert_eq!(next_message(&link).1, b"retained marker");
    let flood = 40;
    let payload = vec![0x5a; 200 << 10];
    for _ in 0..flood {
        publisher.publish(topic, payload.clone(), false).unwrap();
    }
    // 200 KiB messages, 1 MiB budget: five fit, the other 35 are dropped.
    let fit = budget / (topic.len() + payload.len() + 64);
    assert_eq!(fit, 5);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while link.dropped() < (flood - fit) as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} dropped",
            link.dropped()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(link.held_bytes() <= budget, "{} held", link.held_bytes());
    for _ in 0..fit {
        assert_eq!(next_message(&link).1, payload);
    }
    assert_eq!(link.held_bytes(), 0);
    assert_eq!(link.dropped(), (flood - fit) as u64);
    publisher.publish(topic, b"after".to_vec(), false).unwrap();
    assert_eq!(next_message(&link).1, b"after");
    link.resubscribe().unwrap();
    assert_eq!(next_message(&link).1, b"retained marker");
    publisher.publish(topic, Vec::new(), true).unwrap();
}

/// A link that holds what its driver has not taken ([`Overflow::Hold`], the host's) loses
/// nothing to a flood: while its budget could not take another packet it reads nothing
/// more (TCP pushes back on the broker, which queues the rest; the broker's in-flight
/// window, 4 here, does not bound it); every message arrives, in order, as the driver gets
/// to it, and what the driver publishes meanwhile leaves without blocking it.
///
/// [`Overflow::Hold`]: fedshield_transport::Overflow::Hold
#[test]
fn a_held_link_loses_nothing_to_a_flood_its_driver_is_slow_to_take() {
    let broker = Mosquitto::start_with(1 << 20, "max_inflight_messages 4\n").expect("mosquitto");
    let topic = "fedshield/held/t";
    let budget = 1 << 20;
    let publisher = plain_link(broker.addr().port(), "flooder", vec![], 1 << 20);
    publisher.publish(topic, b"marker".to_vec(), true).unwrap();
    let link = held_link(
        broker.addr().port(),
        "held",
        vec![topic.into()],
        budget,
        fedshield_transport::Overflow::Hold,
    );
    assert_eq!(next_message(&link).1, b"marker");
    let observer = plain_link(
        broker.addr().port(),
        "observer",
        vec!["fedshield/held/out".into()],
        64 << 20,
    );
    assert!(matches!(
        observer.recv(Duration::from_secs(10)).unwrap(),
        Some(fedshield_transport::Incoming::Connected)
    ));
    std::thread::sleep(Duration::from_millis(300)); // its subscription in place
    let flood = 40u8;
    for i in 0..flood {
        publisher.publish(topic, vec![i; 200 << 10], false).unwrap();
    }
    // The driver is busy; it publishes more than the event loop's request queue holds.
    for i in 0..600u32 {
        link.publish("fedshield/held/out", i.to_be_bytes().to_vec(), false)
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(link.dropped(), 0);
    assert!(link.held_bytes() <= budget, "{} held", link.held_bytes());
    for i in 0..flood {
        let (_, payload) = next_message(&link);
        assert_eq!((payload[0], payload.len()), (i, 200 << 10), "message {i}");
    }
    assert_eq!(link.dropped(), 0);
    assert_eq!(link.held_bytes(), 0);
    // What waited in the link leaves as its driver goes on calling `recv`.
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 600 && std::time::Instant::now() < deadline {
        assert!(link.recv(Duration::from_millis(1)).unwrap().is_none());
        if let Some(fedshield_transport::Incoming::Message { payload, .. }) =
            observer.recv(Duration::from_millis(50)).unwrap()
        {
            got.push(payload);
        }
    }
    let want: Vec<Vec<u8>> = (0..600u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(got, want);
    assert_eq!(link.pending_publishes(), 0);
    publisher.publish(topic, Vec::new(), true).unwrap();
}

/// The next `Incoming` that `pick` accepts, within `secs`.
fn next_of<T>(
    link: &fedshield_transport::Link,
    what: &str,
    secs: u64,
    pick: impl Fn(&fedshield_transport::Incoming) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} in {secs} s"
        );
        if let Some(i) = link.recv(Duration::from_millis(100)).unwrap()
            && let Some(t) = pick(&i)
        {
            return t;
        }
    }
}

/// A device's link behind a network relay (a real TCP proxy that stops forwarding, as a
/// pulled cable does): told that the network is cut, the link drops its connection at once;
/// what the device publishes during the cut is held, and it all reaches the broker once the
/// link is told the network is back.
#[test]
fn a_link_told_the_network_is_cut_drops_its_connection_and_delivers_what_it_held_after() {
    use fedshield_hil_tests::net_relay::NetRelay;
    use fedshield_transport::Incoming;
    let broker = Mosquitto::start(1 << 20).expect("mosquitto");
    let relay = NetRelay::start(broker.addr()).unwrap();
    let message = |i: &Incoming| match i {
        Incoming::Message { payload, .. } => Some(payload.clone()),
        _ => None,
    };
    // The retained marker proves the watcher's subscription is in place.
    let marker = "fedshield/cut/marker";
    let publisher = plain_link(broker.addr().port(), "cut-marker", vec![], 1 << 20);
    publisher.publish(marker, b"marker".to_vec(), true).unwrap();
    let watcher = plain_link(
        broker.addr().port(),
        "cut-watcher",
        vec!["fedshield/cut/#".into()],
        64 << 20,
    );
    assert_eq!(next_message(&watcher).1, b"marker");
    let device = plain_link(relay.addr().port(), "cut-device", vec![], 64 << 20);
    next_of(&device, "device connected", 20, |i| {
        (*i == Incoming::Connected).then_some(())
    });
    device
        .publish("fedshield/cut/data", b"before".to_vec(), false)
        .unwrap();
    let got = next_of(&watcher, "the message before the cut", 20, message);
    assert_eq!(got, b"before");

    relay.switch().set(false);
    device.network_cut();
    next_of(&device, "the link's cut", 20, |i| {
        (*i == Incoming::Cut).then_some(())
    });
    let held: Vec<Vec<u8>> = (0..5).map(|i| format!("during-{i}").into_bytes()).collect();
    for payload in &held {
        device
            .publish("fedshield/cut/data", payload.clone(), false)
            .unwrap();
    }
    // Nothing gets through while the network is cut.
    let quiet = std::time::Instant::now() + Duration::from_millis(1_500);
    while std::time::Instant::now() < quiet {
        if let Some(i) = watcher.recv(Duration::from_millis(100)).unwrap() {
            assert!(message(&i).is_none(), "{i:?} crossed a cut network");
        }
    }
    relay.switch().set(true);
    let restored = std::time::Instant::now();
    device.network_restored();
    next_of(&device, "the device reconnected", 20, |i| {
        (*i == Incoming::Connected).then_some(())
    });
    let reconnect = restored.elapsed();
    let mut seen = Vec::new();
    while !held.iter().all(|h| seen.contains(h)) {
        seen.push(next_of(&watcher, "the held messages", 20, message));
    }
    let (forwarded, refused) = relay.counts();
    assert!(forwarded >= 2, "{forwarded} connections forwarded");
    eprintln!(
        "network cut: reconnected {} ms after the word that the network is back; {forwarded} connections forwarded, {refused} refused during the cut; {} messages received for 5 held",
        reconnect.as_millis(),
        seen.len()
    );
    publisher.publish(marker, Vec::new(), true).unwrap();
    device.disconnect();
    watcher.disconnect();
}
