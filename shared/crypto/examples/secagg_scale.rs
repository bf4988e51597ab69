//! Secure-aggregation scaling benchmark: the complete graph (Bonawitz et al.) and the SecAgg+
//! Harary graph side by side, in one run, on the real state machines (signatures, X25519,
//! Shamir, ChaCha20 masks over N = 2048 key coefficients), all devices in this process.
//!
//!     scripts/bench-secagg.sh
//!     cargo run --release -p fedshield-crypto --example secagg_scale -- --help
//!
//! For each fleet size, graph and dropout rate it measures the host's CPU time by stage, the
//! devices' CPU time (mean per device), and the bytes each device sends and receives (postcard
//! encodings of the messages and of the broadcasts it reads). Dropouts leave after sending
//! their shares (the costliest place for the host, which must remove their masks). Writes
//! `target/bench/secagg.json` (a list under `runs`).

use fedshield_crypto::identity::{DeviceId, Identity, Registry};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use fedshield_crypto::secagg::{
    Client, GraphPolicy, SecAggConfig, Server, SignedMessage, ThreatModel,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Args {
    sizes: Vec<usize>,
    dropouts: Vec<f64>,
    graphs: Vec<String>,
    out_dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .and_then(|p| p.parent())
        .unwrap_or(&manifest)
        .to_path_buf();
    let mut args = Args {
        sizes: vec![100, 300, 1000],
        dropouts: vec![0.0, 0.1],
        graphs: vec!["complete".into(), "auto".into()],
        out_dir: root.join("target/bench"),
    };
    let list = |v: String| -> Vec<String> { v.split(',').map(str::to_string).collect() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => {
                args.sizes = list(value()?)
                    .iter()
                    .map(|s| s.parse().map_err(|e| format!("--sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--dropouts" => {
                args.dropouts = list(value()?)
                    .iter()
                    .map(|s| s.parse().map_err(|e| format!("--dropouts: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--graphs" => args.graphs = list(value()?),
            "--out-dir" => args.out_dir = value()?.into(),
            "--help" | "-h" => {
                return Err(
                    "usage: secagg_scale [--sizes 100,300,1000] [--dropouts 0,0.1] \
                            [--graphs complete,auto] [--out-dir DIR]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn bytes<T: Serialize>(value: &T) -> u64 {
    postcard::to_stdvec(value).expect("encodable").len() as u64
}

#[derive(Default)]
struct Measured {
    host: [Duration; 5],
    devices: Duration,
    sent: u64,
    received: u64,
    degree: Option<usize>,
    threshold: usize,
    contributors: usize,
}

/// One aggregation of `n` devices, `dropped` of them leaving after their shares.
fn run(n: usize, dropout: f64, policy: GraphPolicy, seed: u64) -> Measured {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let authority = Identity::generate(&mut rng);
    let mut registry = Registry::new(authority.public_key());
    let identities: Vec<(DeviceId, Identity)> = (0..n)
        .map(|i| {
            let id = DeviceId(format!("edge-{i:05}"));
            let identity = Identity::generate(&mut rng);
            registry
                .enrol(authority.enrol(id.clone(), identity.public_key()))
                .unwrap();
            (id, identity)
        })
        .collect();
    let config = SecAggConfig {
        round: 1,
        threshold: 2,
        vector_len: POLYNOMIAL_SIZE,
        graph: policy,
    };
    let dropped = (n as f64 * dropout).round() as usize;
    let mut m = Measured::default();
    let timed = |d: &mut Duration, f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        *d += start.elapsed();
    };
    let mut server = Server::new(config, registry).unwrap();
    // Stage 0.
    let mut clients = Vec::with_capacity(n);
    for (id, identity) in identities {
        let mut made = None;
        timed(&mut m.devices, &mut || {
            made = Some(Client::new(
                Identity::from_secret(identity.secret()),
                id.clone(),
                config,
                authority.public_key(),
                100,
                &mut rng,
            ))
        });
        let (client, advert) = made.unwrap();
        m.sent += bytes(&advert);
        timed(&mut m.host[0], &mut || {
            server.receive(advert.clone()).unwrap()
        });
        clients.push(client);
    }
    let mut roster = None;
    timed(&mut m.host[0], &mut || {
        roster = Some(server.close_advertise().unwrap())
    });
    let roster = roster.unwrap();
    let roster_bytes = bytes(&roster);
    let graph = server.graph().unwrap();
    m.degree = graph.degree();
    m.threshold = graph.threshold();
    // Stage 1.
    for c in clients.iter_mut() {
        m.received += roster_bytes;
        let mut msg: Option<SignedMessage> = None;
        timed(&mut m.devices, &mut || {
            msg = Some(c.on_roster(&roster, &mut rng).unwrap())
        });
        let msg = msg.unwrap();
        m.sent += bytes(&msg);
        timed(&mut m.host[1], &mut || server.receive(msg.clone()).unwrap());
    }
    let mut deliveries = None;
    timed(&mut m.host[1], &mut || {
        deliveries = Some(server.close_shares().unwrap())
    });
    let deliveries = deliveries.unwrap();
    // Stage 2: the first `dropped` (in a random order) leave after sharing.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let leaving: std::collections::BTreeSet<usize> = order[..dropped].iter().copied().collect();
    let input = vec![1u64; POLYNOMIAL_SIZE];
    let mut alive = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let delivery = &deliveries[c.id()];
        m.received += bytes(delivery);
        if leaving.contains(&i) {
            continue;
        }
        let mut msg = None;
        timed(&mut m.devices, &mut || {
            msg = Some(c.on_shares(delivery, &input, [0; 32]).unwrap())
        });
        let msg = msg.unwrap();
        m.sent += bytes(&msg);
        timed(&mut m.host[2], &mut || server.receive(msg.clone()).unwrap());
        alive.push(c);
    }
    let mut list = None;
    timed(&mut m.host[2], &mut || {
        list = Some(server.close_masked_inputs().unwrap())
    });
    let list = list.unwrap();
    // Stage 3.
    for c in alive.iter_mut() {
        m.received += bytes(&list);
        let mut msg = None;
        timed(&mut m.devices, &mut || {
            msg = Some(c.on_survivors(&list).unwrap())
        });
        let msg = msg.unwrap();
        m.sent += bytes(&msg);
        timed(&mut m.host[3], &mut || server.receive(msg.clone()).unwrap());
    }
    let mut request = None;
    timed(&mut m.host[3], &mut || {
        request = Some(server.close_consistency().unwrap())
    });
    let request = request.unwrap();
    // Stage 4.
    for c in alive.iter_mut() {
        m.received += bytes(&request);
        let mut msg = None;
        timed(&mut m.devices, &mut || {
            msg = Some(c.on_unmask(&request).unwrap())
        });
        let msg = msg.unwrap();
        m.sent += bytes(&msg);
        timed(&mut m.host[4], &mut || server.receive(msg.clone()).unwrap());
    }
    let mut out = None;
    timed(&mut m.host[4], &mut || {
        out = Some(server.close_unmask().unwrap())
    });
    let out = out.unwrap();
    assert_eq!(out.key_sum, vec![(n - dropped) as u64; POLYNOMIAL_SIZE]);
    m.contributors = out.contributors.len();
    m
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut runs = Vec::new();
    println!(
        "{:>6} {:>8} {:>9} {:>7} {:>10} {:>12} {:>14} {:>14}",
        "n", "dropout", "graph", "(k, t)", "host s", "host ms/dev", "device ms", "KiB/device"
    );
    for &n in &args.sizes {
        for &dropout in &args.dropouts {
            for graph in &args.graphs {
                let policy = match graph.as_str() {
                    "complete" => GraphPolicy::Complete,
                    "auto" => GraphPolicy::Derived {
                        model: ThreatModel::DEFAULT,
                        sparse_from: 0,
                    },
                    other => {
                        eprintln!("unknown graph {other}: complete or auto");
                        std::process::exit(2);
                    }
                };
                let m = run(n, dropout, policy, n as u64);
                let host: f64 = m.host.iter().map(Duration::as_secs_f64).sum();
                let per_device_kib = (m.sent + m.received) as f64 / n as f64 / 1024.0;
                let kt = m.degree.map_or(format!("(-, {})", m.threshold), |k| {
                    format!("({k}, {})", m.threshold)
                });
                println!(
                    "{n:>6} {:>7.0}% {graph:>9} {kt:>7} {host:>10.3} {:>12.3} {:>14.2} {per_device_kib:>14.1}",
                    dropout * 100.0,
                    host * 1000.0 / n as f64,
                    m.devices.as_secs_f64() * 1000.0 / n as f64,
                );
                runs.push(json!({
                    "devices": n,
                    "dropout": dropout,
                    "graph": graph,
                    "degree": m.degree,
                    "threshold": m.threshold,
                    "contributors": m.contributors,
                    "host_cpu_s": {
                        "advertise": m.host[0].as_secs_f64(),
                        "shares": m.host[1].as_secs_f64(),
                        "masked_inputs": m.host[2].as_secs_f64(),
                        "consistency": m.host[3].as_secs_f64(),
                        "unmask": m.host[4].as_secs_f64(),
                        "total": host,
                    },
                    "device_cpu_s_mean": m.devices.as_secs_f64() / n as f64,
                    "bytes_per_device": {
                        "sent": m.sent as f64 / n as f64,
                        "received": m.received as f64 / n as f64,
                    },
                }));
            }
        }
    }
    std::fs::create_dir_all(&args.out_dir).unwrap();
    let path = args.out_dir.join("secagg.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({ "runs": runs })).unwrap(),
    )
    .unwrap();
    println!("wrote {}", path.display());
}
