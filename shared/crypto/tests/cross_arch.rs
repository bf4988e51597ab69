//! Known answers every architecture must reproduce bit for bit. A device (aarch64) and the
//! host (x86-64) compute their halves of a round independently: the round's masks, the
//! keys and noise drawn from seeded generators, the negacyclic products (an f64 FFT whose
//! results are rounded back to integers), the fixed-point encoding and the wire form of a
//! ciphertext must all agree, or the host's decryption is garbage. The digests below were
//! computed on x86-64; `scripts/test.sh` runs this file under qemu-aarch64 as well.

use fedshield_crypto::encoding::FixedPoint;
use fedshield_crypto::identity::Identity;
use fedshield_crypto::negacyclic::{NegacyclicFft, exact_add_mul};
use fedshield_crypto::packed::{Aggregate, BodyBits, ClientKey, Encryptor, MaskSeed, MaskStream};
use fedshield_crypto::params::POLYNOMIAL_SIZE;
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

/// FNV-1a over the little-endian bytes of `words`.
fn digest(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn bytes_digest(bytes: &[u8]) -> u64 {
    digest(bytes.iter().map(|b| u64::from(*b)))
}

fn seeder(seed: u128) -> DeterministicSeeder<DefaultRandomGenerator> {
    DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(seed))
}

/// Pseudo-random words from a fixed splitmix64 sequence.
fn words(n: usize, mut z: u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        })
        .collect()
}

/// Every digest of the known answers, in a fixed order.
fn known_answers() -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    // The round's masks (ChaCha20 keyed by the mask seed).
    let mut masks = MaskStream::new(MaskSeed(0x0123_4567_89ab_cdef_0011_2233_4455_6677));
    let mut mask = vec![0u64; POLYNOMIAL_SIZE];
    let mut all = Vec::new();
    for index in [0usize, 7, 1000] {
        masks.mask(index, &mut mask);
        all.extend_from_slice(&mask);
    }
    out.push(("masks", digest(all)));
    // Keys from tfhe's seeded generator.
    let mut s = seeder(42);
    let keys: Vec<ClientKey> = (0..2).map(|_| ClientKey::generate(&mut s)).collect();
    out.push((
        "keys",
        digest(keys.iter().flat_map(|k| k.coefficients().to_vec())),
    ));
    // The negacyclic product through the FFT against the exact one, on a binary key.
    let fft = NegacyclicFft::new(POLYNOMIAL_SIZE);
    let a = words(POLYNOMIAL_SIZE, 5);
    let key: Vec<u64> = words(POLYNOMIAL_SIZE, 6).iter().map(|w| w & 1).collect();
    let mut exact = words(POLYNOMIAL_SIZE, 7);
    let mut fast = exact.clone();
    exact_add_mul(&mut exact, &a, &key);
    let spectrum = fft.binary_spectrum(&key);
    fft.add_mul_binary(&mut fast, &a, &spectrum, &mut fft.scratch());
    assert_eq!(fast, exact, "the FFT product is exact");
    out.push(("product", digest(fast)));
    // Fixed-point encoding of weighted values.
    let fixed = FixedPoint::new(0.05).unwrap();
    let values: Vec<f32> = words(4096, 8)
        .iter()
        .map(|w| ((*w >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.12)
        .collect();
    let mut encoded = vec![0u64; values.len()];
    fixed.encode_weighted(&values, 0.375, &mut encoded).unwrap();
    out.push(("encoding", digest(encoded.clone())));
    // Two clients' encryptions (noise from seeded generators), their wire form, and the
    // decrypted sum.
    let round = MaskSeed(0xfeed_beef);
    let len = 2 * POLYNOMIAL_SIZE + 17;
    let mut aggregate = Aggregate::new(len, BodyBits::new(16).unwrap());
    let mut wire = Vec::new();
    for (c, k) in keys.iter().enumerate() {
        let plaintexts: Vec<u64> = encoded.iter().cycle().skip(c).take(len).copied().collect();
        let mut noise = seeder(100 + c as u128);
        let update =
            Encryptor::new(k, round, BodyBits::new(16).unwrap(), &mut noise).encrypt(&plaintexts);
        wire.extend(postcard::to_stdvec(&update).unwrap());
        aggregate.add(&update).unwrap();
    }
    out.push(("ciphertexts", bytes_digest(&wire)));
    let key_sum: Vec<u64> = (0..POLYNOMIAL_SIZE)
        .map(|j| keys.iter().map(|k| k.coefficients()[j]).sum())
        .collect();
    out.push((
        "decrypted",
        digest(aggregate.decrypt(round, &key_sum).unwrap()),
    ));
    // A device's signature (ed25519 is deterministic).
    let device = Identity::from_secret([7; 32]);
    let mut signed = device.public_key().to_vec();
    signed.extend(device.sign(b"fedshield/cross-arch"));
    out.push(("signature", bytes_digest(&signed)));
    out
}

#[test]
fn every_architecture_computes_the_same_round() {
    let got = known_answers();
    let want = [
        ("masks", 0x92cf_a93e_342e_cea1),
        ("keys", 0xe6a9_5d40_7132_ee65),
        ("product", 0xe7c0_43f1_d8d6_0a12),
        ("encoding", 0x0bad_d8e7_3e53_c47b),
        ("ciphertexts", 0x3830_bf9e_6d54_468f),
        ("decrypted", 0x387b_6a1e_9a45_e787),
        ("signature", 0x8a47_dca6_e590_0d26),
    ];
    let shown: Vec<String> = got
        .iter()
        .map(|(n, d)| format!("(\"{n}\", {d:#018x})"))
        .collect();
    assert_eq!(
        got,
        want,
        "on {}: [{}]",
        std::env::consts::ARCH,
        shown.join(", ")
    );
}
