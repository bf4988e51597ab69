//! The end-to-end check of the aggregate: the sums the host decrypted (`serve
//! --audit-dir`) against the plaintexts its contributors encrypted (`fedshield-edge run
//! --audit-dir`, `fedshield-sim devices --audit-dir`). For tests: it panics on a mismatch.

/// Checks rounds 1 to `rounds`: the host's decrypted sums against what its contributors'
/// ciphertexts delivered (their plaintexts plus body rounding, as each computed it): equal up
/// to the encryption noise, at most n 2^17 units; and against the plaintexts themselves within
/// the noise and rounding budget of the round's body width (SECURITY.md). Returns, per
/// round, the largest error in fixed-point units against what the bodies deliver (the
/// encryption noise) and against the plaintexts (noise plus rounding), and the body width.
pub fn check_audited_sums(
    host_audit: &std::path::Path,
    edge_audit: &std::path::Path,
    rounds: u64,
) -> Vec<(i64, i64, u32)> {
    let mut errors = Vec::new();
    for round in 1..=rounds {
        let text = std::fs::read_to_string(host_audit.join(format!("round-{round}.json")))
            .expect("the host audited the round");
        let host: serde_json::Value = serde_json::from_str(&text).unwrap();
        let contributors: Vec<String> = host["contributors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        let body_bits = host["body_bits"].as_u64().unwrap() as u32;
        let sums: Vec<u64> = host["sums"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let mut plain = vec![0u64; sums.len()];
        let mut delivered = vec![0u64; sums.len()];
        let mut weight = 0.0;
        for d in &contributors {
            let text = std::fs::read_to_string(edge_audit.join(format!("round-{round}-{d}.json")))
                .expect("the contributor audited its update");
            let edge: serde_json::Value = serde_json::from_str(&text).unwrap();
            weight += edge["weight"].as_f64().unwrap();
            for (key, acc) in [("plaintexts", &mut plain), ("delivered", &mut delivered)] {
                let values = edge[key].as_array().unwrap();
                assert_eq!(values.len(), sums.len());
                for (p, v) in acc.iter_mut().zip(values) {
                    *p = p.wrapping_add(v.as_u64().unwrap());
                }
            }
        }
        let n = contributors.len() as i64;
        let worst = |want: &[u64]| {
            sums.iter()
                .zip(want)
                .map(|(s, p)| (s.wrapping_sub(*p) as i64).abs())
                .max()
                .unwrap()
        };
        let noise = n * (1 << 17);
        let off = worst(&delivered);
        let noise_off = off;
        assert!(
            off <= noise,
            "round {round}: decrypted sums off what was delivered by {off} units (noise {noise})"
        );
        let bound = n * ((1 << 17) + (1i64 << (63 - body_bits))) + n;
        let off = worst(&plain);
        assert!(
            off <= bound,
            "round {round}: decrypted sums off by {off} units (bound {bound}, {body_bits}-bit bodies)"
        );
        assert!(
            (host["total_weight"].as_f64().unwrap() - weight).abs() < 1e-12,
            "round {round}: total weight"
        );
        assert!(plain.iter().any(|&p| p != 0), "round {round}: empty update");
        errors.push((noise_off, off, body_bits));
    }
    errors
}
