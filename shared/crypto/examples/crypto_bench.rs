//! Crypto benchmark: ours and TenSEAL CKKS (the reference's parameters) side by side, in one
//! run, on the same vectors and weights, one core each.
//!
//!     scripts/bench-crypto.sh            (installs TenSEAL into .deps/venv, then runs this)
//!     cargo run --release -p fedshield-crypto --example crypto_bench -- --help
//!
//! Prints a table and writes `target/bench/crypto.json` with both sides' figures and their
//! ratios.

use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::packed::{
    Aggregate, BodyBits, ClientKey, EncryptedUpdate, Encryptor, MaskSeed,
};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

struct Args {
    values: usize,
    clients: usize,
    python: PathBuf,
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
        values: 1 << 20,
        clients: 4,
        python: root.join(".deps/venv/bin/python"),
        out_dir: root.join("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--values" => args.values = value()?.parse().map_err(|e| format!("--values: {e}"))?,
            "--clients" => {
                args.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?
            }
            "--python" => args.python = value()?.into(),
            "--out-dir" => args.out_dir = value()?.into(),
            "--help" | "-h" => {
                return Err("usage: crypto_bench [--values N (default 1048576)] \
                            [--clients C (default 4)] [--python PATH] [--out-dir DIR]"
                    .into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.clients < 2 || args.values == 0 {
        return Err("need --clients >= 2 and --values >= 1".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("crypto_bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let (n, c) = (args.values, args.clients);
    std::fs::create_dir_all(&args.out_dir).map_err(|e| format!("{:?}: {e}", args.out_dir))?;

    // The same vectors for both sides: LoRA-delta-like values, uniform in [-0.05, 0.05].
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let data: Vec<Vec<f32>> = (0..c)
        .map(|_| (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect())
        .collect();
    let samples: Vec<f64> = (1..=c).map(|i| (100 * i) as f64).collect();
    let total: f64 = samples.iter().sum();
    let weights: Vec<f64> = samples.iter().map(|s| s / total).collect();
    let input = args.out_dir.join("crypto-input.f32");
    let raw: Vec<u8> = data
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    std::fs::write(&input, raw).map_err(|e| format!("{input:?}: {e}"))?;
    let mut want = vec![0f64; n];
    for (d, w) in data.iter().zip(&weights) {
        for (acc, x) in want.iter_mut().zip(d) {
            *acc += w * *x as f64;
        }
    }

    eprintln!("[bench] TenSEAL CKKS: {c} clients x {n} values ...");
    let tenseal = run_tenseal(args, &input, &weights)?;
    eprintln!("[bench] FedShield packed GLWE: {c} clients x {n} values ...");
    let ours = run_ours(&data, &weights, &want);

    let ratio =
        |k: &str| ours[k].as_f64().unwrap_or(f64::NAN) / tenseal[k].as_f64().unwrap_or(f64::NAN);
    let ratios = json!({
        "encrypt_throughput": ratio("encrypt_values_per_s"),
        "aggregate_throughput": ratio("aggregate_values_per_s"),
        "decrypt_speedup": 1.0 / ratio("decrypt_seconds"),
        "bytes": 1.0 / ratio("bytes_per_value"),
    });
    let report = json!({ "ours": ours, "tenseal": tenseal, "ratios": ratios });
    let out = args.out_dir.join("crypto.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap())
        .map_err(|e| format!("{out:?}: {e}"))?;

    let row = |name: &str, key: &str, fmt: &dyn Fn(f64) -> String| {
        let (o, t) = (
            ours[key].as_f64().unwrap_or(f64::NAN),
            tenseal[key].as_f64().unwrap_or(f64::NAN),
        );
        println!("{name:<28} {:>16} {:>16}", fmt(o), fmt(t));
    };
    println!("{c} clients x {n} values, one core                ours          TenSEAL");
    row("encryption (values/s)", "encrypt_values_per_s", &|x| {
        format!("{:.3e}", x)
    });
    row(
        "host aggregation (values/s)",
        "aggregate_values_per_s",
        &|x| format!("{:.3e}", x),
    );
    row("decryption (s)", "decrypt_seconds", &|x| {
        format!("{:.3}", x)
    });
    row("bytes per value", "bytes_per_value", &|x| {
        format!("{:.3}", x)
    });
    row("max |error|", "max_abs_error", &|x| format!("{:.2e}", x));
    println!(
        "ratios: encryption {:.1}x faster, {:.1}x fewer bytes, aggregation {:.1}x faster, decryption {:.1}x faster",
        ratios["encrypt_throughput"].as_f64().unwrap_or(f64::NAN),
        ratios["bytes"].as_f64().unwrap_or(f64::NAN),
        ratios["aggregate_throughput"].as_f64().unwrap_or(f64::NAN),
        ratios["decrypt_speedup"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "our aggregation vs a plain wrapping-add loop over the same bytes: {:.2}x the loop's time",
        ours["aggregate_vs_plain_add"].as_f64().unwrap_or(f64::NAN)
    );
    println!("wrote {}", out.display());
    Ok(())
}

fn run_tenseal(args: &Args, input: &std::path::Path, weights: &[f64]) -> Result<Value, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/tenseal_ckks.py");
    let weights: Vec<String> = weights.iter().map(|w| format!("{w:.17}")).collect();
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--input")
        .arg(input)
        .args(["--clients", &args.clients.to_string()])
        .args(["--values", &args.values.to_string()])
        .args(["--weights", &weights.join(",")])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {:?} ({e}): run scripts/bench-crypto.sh, which installs TenSEAL",
                args.python
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "TenSEAL side failed ({}): {}\nrun scripts/bench-crypto.sh, which installs TenSEAL",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // TenSEAL writes warnings to stdout; the result is the last line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("TenSEAL output {last:?}: {e}"))
}

fn run_ours(data: &[Vec<f32>], weights: &[f64], want: &[f64]) -> Value {
    let (c, n) = (data.len(), data[0].len());
    let fp = FixedPoint::new(1.0).expect("valid clip");
    let seed = MaskSeed(0x5eed);
    let mut seeder = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(7));
    let keys: Vec<ClientKey> = (0..c).map(|_| ClientKey::generate(&mut seeder)).collect();

    // Client side: encode (clip, weight, fixed point) and encrypt; serialization is not timed
    // (nor is TenSEAL's).
    let mut encrypt_s = 0.0;
    let mut wire = Vec::with_capacity(c);
    let mut plain = vec![0u64; n];
    for ((d, w), key) in data.iter().zip(weights).zip(&keys) {
        let t0 = Instant::now();
        fp.encode_weighted(d, *w, &mut plain).expect("valid weight");
        let update = Encryptor::new(key, seed, BodyBits::FULL, &mut seeder).encrypt(&plain);
        encrypt_s += t0.elapsed().as_secs_f64();
        wire.push(postcard::to_stdvec(&update).expect("serializable"));
    }
    let wire_bytes: usize = wire.iter().map(Vec::len).sum();
    let updates: Vec<EncryptedUpdate> = wire
        .iter()
        .map(|b| postcard::from_bytes(b).expect("round trip"))
        .collect();

    // Host side: streaming sum of the bodies, against a bare wrapping-add loop.
    let t0 = Instant::now();
    let mut agg = Aggregate::new(n, BodyBits::FULL);
    for u in &updates {
        agg.add(u).expect("same length");
    }
    let aggregate_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut plain_sum = vec![0u32; updates[0].bodies.len()];
    for u in &updates {
        for (s, b) in plain_sum.iter_mut().zip(&u.bodies) {
            *s = s.wrapping_add(*b);
        }
    }
    std::hint::black_box(&plain_sum);
    let plain_s = t0.elapsed().as_secs_f64();

    // Decryption with the key sum (the secure key aggregation's output) and decoding.
    let mut key_sum = vec![0u64; POLYNOMIAL_SIZE];
    for k in &keys {
        for (s, b) in key_sum.iter_mut().zip(k.coefficients()) {
            *s += b;
        }
    }
    let t0 = Instant::now();
    let mean = fp.decode_sum(&agg.decrypt(seed, &key_sum).expect("key sum size"), 1.0);
    let decrypt_s = t0.elapsed().as_secs_f64();
    let max_err = mean
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);

    json!({
        "encrypt_values_per_s": (c * n) as f64 / encrypt_s,
        "aggregate_values_per_s": (c * n) as f64 / aggregate_s,
        "plain_add_values_per_s": (c * n) as f64 / plain_s,
        "aggregate_vs_plain_add": aggregate_s / plain_s,
        "decrypt_seconds": decrypt_s,
        "bytes_per_value": wire_bytes as f64 / (c * n) as f64,
        "max_abs_error": max_err,
        "values": n,
        "clients": c,
        "threads": 1,
    })
}
