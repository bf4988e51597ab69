//! `fedshield-demo`: one-machine run of the pipeline pieces end to end, on real components.
//!
//! Three edge clients each fine-tune a LoRA adapter (libtorch) on their own data, encode the
//! update with their sample weight, encrypt it under a fresh key with the round's shared
//! mask, compress it and publish it over MQTT through the embedded broker. The host
//! subscribes, sums the ciphertext bodies as they arrive and decrypts only the sum. The
//! decrypted weighted mean is checked against the plaintext one, and ONNX Runtime runs an
//! inference. The clients' keys are summed by the secure-aggregation state machines
//! (signed, masked, Shamir-shared), run in this process: the host side only ever holds the
//! key sum. Issue 6 moves each party into its own process over MQTT.

use anyhow::{Context, bail};
use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::{DeviceId, Identity, Registry};
use fedshield_crypto::packed::{
    Aggregate, BodyBits, ClientKey, EncryptedUpdate, MaskSeed, encrypt,
};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use fedshield_crypto::secagg::{self, Client, KeyAggregate, SecAggConfig, Server};
use fedshield_edge::compute::ComputeTarget;
use fedshield_edge::inference::OnnxModel;
use fedshield_hil_tests::free_local_addr;
use fedshield_host::broker::EmbeddedBroker;
use fedshield_models::{Assets, fixtures};
use fedshield_wire::{Compressed, compress_if_smaller, from_payload, to_payload};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor, nn, nn::OptimizerConfig};
use tfhe::core_crypto::seeders::new_seeder;

const CLIENTS: usize = 3;
const IN: i64 = 64;
const OUT: i64 = 64;
const RANK: i64 = 8;

/// One client's local fine-tune: a frozen base linear layer plus a rank-8 LoRA adapter,
/// trained with AdamW to fit the client's own target. Returns (first loss, last loss, flat
/// LoRA parameters, samples).
fn train_client(client: usize, target: ComputeTarget) -> (f64, f64, Vec<f32>, usize) {
    tch::manual_seed(100 + client as i64);
    let dev = target.device;
    let vs = nn::VarStore::new(dev);
    let base = Tensor::randn([OUT, IN], (Kind::Float, dev)) * 0.1;
    let a = vs
        .root()
        .var("lora_A", &[RANK, IN], nn::init::DEFAULT_KAIMING_UNIFORM);
    let b = vs.root().var("lora_B", &[OUT, RANK], nn::Init::Const(0.0));
    // Each client's data: y = (base + its own low-rank shift) x.
    let shift = Tensor::randn([OUT, 2], (Kind::Float, dev))
        .matmul(&Tensor::randn([2, IN], (Kind::Float, dev)))
        * 0.05;
    let samples = 64 * (client + 1);
    let x = Tensor::randn([samples as i64, IN], (Kind::Float, dev));
    let y = x.matmul(&(&base + &shift).tr());
    let mut opt = nn::AdamW::default().build(&vs, 1e-2).expect("AdamW");
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..60 {
        let pred = x.matmul(&base.tr()) + x.matmul(&a.tr()).matmul(&b.tr()) * 2.0;
        let loss = (pred - &y).pow_tensor_scalar(2).mean(Kind::Float);
        opt.backward_step(&loss);
        let l = loss.double_value(&[]);
        if step == 0 {
            first = l;
        }
        last = l;
    }
    let flat = Tensor::cat(&[a.flatten(0, -1), b.flatten(0, -1)], 0).to_device(tch::Device::Cpu);
    let params = Vec::<f32>::try_from(&flat).expect("f32 parameters");
    (first, last, params, samples)
}

fn main() -> anyhow::Result<()> {
    let wall = Instant::now();
    let assets = Assets::locate();
    let target = ComputeTarget::detect();
    println!(
        "FedShield pipeline smoke run ({CLIENTS} clients, {})",
        target.describe()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let broker = EmbeddedBroker::start(free_local_addr(), 1 << 20)?;
    println!("  broker    : embedded rumqttd on {}", broker.addr());

    // Local training on each client.
    let mut updates = Vec::new();
    for c in 0..CLIENTS {
        let (first, last, params, samples) = train_client(c, target);
        println!("  client {c}  : {samples} samples, LoRA r={RANK}: loss {first:.4} -> {last:.4}");
        if last >= first {
            bail!("client {c} did not learn (loss {first} -> {last})");
        }
        updates.push((params, samples));
    }
    let total: usize = updates.iter().map(|u| u.1).sum();
    let len = updates[0].0.len();

    // Encrypt with fresh per-client keys under the round's shared mask seed.
    let round = MaskSeed(0x5eed_0001);
    let codec = FixedPoint::new(1.0)?;
    let mut entropy = new_seeder();
    let mut keys = Vec::new();
    let mut digests = Vec::new();
    let mut messages = Vec::new();
    let t_enc = Instant::now();
    for (params, samples) in &updates {
        let key = ClientKey::generate(entropy.as_mut());
        let mut plain = vec![0u64; len];
        codec.encode_weighted(params, *samples as f64 / total as f64, &mut plain)?;
        let ct = encrypt(&key, round, BodyBits::FULL, &plain, entropy.as_mut());
        let serialized = to_payload(&ct);
        digests.push(secagg::update_digest(&serialized));
        messages.push(to_payload(&compress_if_smaller(&serialized)));
        keys.push(key);
    }
    let enc_s = t_enc.elapsed().as_secs_f64();
    let wire: usize = messages.iter().map(Vec::len).sum::<usize>() / CLIENTS;
    println!(
        "  encrypt   : {len} values/client in {:.1} ms total, {wire} bytes on the wire per client ({:.2} B/value)",
        enc_s * 1e3,
        wire as f64 / len as f64
    );

    // Ship over MQTT; the host sums bodies as they arrive.
    let aggregate = rt.block_on(ship_and_aggregate(broker.addr(), messages, len))?;
    let t_keys = Instant::now();
    let keys_out = secure_key_sum(&keys, &digests)?;
    println!(
        "  key sum   : secure aggregation of {} keys (threshold 2, signed, Shamir-shared masks) in {:.1} ms",
        keys_out.contributors.len(),
        t_keys.elapsed().as_secs_f64() * 1e3
    );
    let t_dec = Instant::now();
    let sums = aggregate.decrypt(round, &keys_out.key_sum)?;
    let mean = codec.decode_sum(&sums, 1.0);
    println!(
        "  decrypt   : aggregate of {} updates in {:.1} ms",
        aggregate.contributions(),
        t_dec.elapsed().as_secs_f64() * 1e3
    );
    let max_err = (0..len)
        .map(|i| {
            let want: f64 = updates
                .iter()
                .map(|(p, s)| p[i] as f64 * *s as f64 / total as f64)
                .sum();
            (mean[i] as f64 - want).abs()
        })
        .fold(0.0, f64::max);
    println!("  check     : max |decrypted mean - plaintext weighted mean| = {max_err:.2e}");
    if max_err > 1e-5 {
        bail!("decrypted aggregate is off by {max_err}");
    }

    let mut mlp = OnnxModel::load(&assets, &fixtures::tiny_mlp_onnx())?;
    let (_, y) = mlp.run(&[1, 4], vec![1.0, 2.0, 3.0, 4.0])?;
    println!("  inference : ONNX Runtime tiny MLP -> {y:?}");
    println!(
        "ok: pipeline smoke run finished in {:.1} s",
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn ship_and_aggregate(
    addr: std::net::SocketAddr,
    messages: Vec<Vec<u8>>,
    len: usize,
) -> anyhow::Result<Aggregate> {
    let topic = "fedshield/demo/round/1/upload/+";
    let mut host_opts = MqttOptions::new("demo-host", addr.ip().to_string(), addr.port());
    host_opts.set_max_packet_size(1 << 20, 1 << 20);
    let (host, mut host_events) = AsyncClient::new(host_opts, 16);
    host.subscribe(topic, QoS::AtLeastOnce).await?;
    let mut aggregate = Aggregate::new(len, BodyBits::FULL);
    let expected = messages.len();
    let mut senders = Some(messages);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while aggregate.contributions() < expected {
        let ev = tokio::time::timeout_at(deadline, host_events.poll())
            .await
            .context("timed out waiting for uploads")??;
        match ev {
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(msgs) = senders.take() {
                    for (c, m) in msgs.into_iter().enumerate() {
                        tokio::spawn(publish_once(addr, c, m));
                    }
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                let env: Compressed = from_payload(&p.payload)?;
                let ct: EncryptedUpdate = from_payload(&env.into_bytes(1 << 24)?)?;
                aggregate.add(&ct)?;
            }
            _ => {}
        }
    }
    Ok(aggregate)
}

async fn publish_once(addr: std::net::SocketAddr, client: usize, payload: Vec<u8>) {
    let mut opts = MqttOptions::new(
        format!("demo-edge-{client}"),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut ev) = AsyncClient::new(opts, 16);
    let topic = format!("fedshield/demo/round/1/upload/{client}");
    if c.publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .is_err()
    {
        return;
    }
    // Drive the connection until the broker acknowledges the publish.
    while let Ok(e) = ev.poll().await {
        if let Event::Incoming(Packet::PubAck(_)) = e {
            break;
        }
    }
}

/// Runs the five secure-aggregation stages between the clients' and the host's state
/// machines, in this process, and returns the host's result: the key sum only.
fn secure_key_sum(keys: &[ClientKey], digests: &[[u8; 32]]) -> anyhow::Result<KeyAggregate> {
    let mut rng = rand::rng();
    let authority = Identity::generate(&mut rng);
    let mut registry = Registry::new(authority.public_key());
    let config = SecAggConfig {
        round: 1,
        threshold: 2,
        vector_len: POLYNOMIAL_SIZE,
    };
    let mut clients = Vec::new();
    let mut adverts = Vec::new();
    for c in 0..keys.len() {
        let id = DeviceId(format!("edge-{c}"));
        let identity = Identity::generate(&mut rng);
        registry.enrol(authority.enrol(id.clone(), identity.public_key()))?;
        let (client, advert) =
            Client::new(identity, id, config, authority.public_key(), 1, &mut rng);
        clients.push(client);
        adverts.push(advert);
    }
    let mut server = Server::new(config, registry)?;
    for a in adverts {
        server.receive(a)?;
    }
    let roster = server.close_advertise()?;
    for c in clients.iter_mut() {
        server.receive(c.on_roster(&roster, &mut rng)?)?;
    }
    let deliveries = server.close_shares()?;
    for ((c, key), digest) in clients.iter_mut().zip(keys).zip(digests) {
        server.receive(c.on_shares(&deliveries[c.id()], key.coefficients(), *digest)?)?;
    }
    let survivors = server.close_masked_inputs()?;
    for c in clients.iter_mut() {
        server.receive(c.on_survivors(&survivors)?)?;
    }
    let request = server.close_consistency()?;
    for c in clients.iter_mut() {
        server.receive(c.on_unmask(&request)?)?;
    }
    Ok(server.close_unmask()?)
}
