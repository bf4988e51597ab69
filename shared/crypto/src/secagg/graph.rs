//! Who shares with whom: the complete graph of Bonawitz et al. or the sparse random Harary
//! graph of SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, CCS 2020).
//!
//! In a Harary graph `H(n, k)` the members sit on a ring in a random order and each is joined
//! to its `k/2` nearest members on either side. A member Shamir-shares its secrets only with
//! its `k` neighbours (t of them, with its own share, reconstruct), and adds pairwise masks
//! only with them, so messages and host work per member are O(k) instead of O(n), with
//! `k = O(log n)`.
//!
//! [`harary_parameters`] derives `k` and `t` from the number of members, the fraction of
//! corrupt members and of dropouts, so that (union bounds, hypergeometric tails):
//! - the honest survivors stay connected, and no member has `t` corrupt neighbours, except
//!   with probability below `2^-security_bits` (split evenly between the two events);
//! - every member keeps at least `t` surviving holders of its shares, except with
//!   probability below `2^-correctness_bits`.
//!
//! Against a host that may lie about who dropped out (semi-malicious), `t` is also a strict
//! majority of a neighbourhood beyond the corrupt neighbours: two disjoint sets of `t`
//! honest holders, one revealing a member's self-mask seed and one its mask key, cannot
//! exist. The ring order is derived from every member's fresh nonce ([`Graph::build`]); see
//! SECURITY.md for why the host cannot choose it, and for the grinding allowance that the
//! semi-malicious setting adds to the security parameter.

use super::{SecAggConfig, SecAggError, kdf};
use crate::identity::DeviceId;
use serde::{Deserialize, Serialize};

/// Statistical security of the derived graphs: the probability that the adversary learns
/// a single honest member's key, or that the honest survivors are disconnected, is below
/// 2^-40 (the reference implementation's parameter).
pub const SECURITY_BITS: u32 = 40;
/// Correctness of the derived graphs: the probability that some member's secrets cannot be
/// reconstructed although at most the assumed fraction dropped out is below 2^-20.
pub const CORRECTNESS_BITS: u32 = 20;
/// Extra security bits of the semi-malicious setting: a host that deviates can try
/// different rosters (or corrupt members can try different nonces) before the roster goes
/// out, and each try gives a fresh random ring; 2^40 tries within one advertise window
/// still leave the failure probability below 2^-40.
pub const GRINDING_BITS: u32 = 40;
/// Fleets smaller than this use the complete graph under the default policy: there the
/// assumed rates round to zero or one member and the sparse graph saves little.
pub const DEFAULT_SPARSE_FROM: u32 = 64;

/// What the host may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Adversary {
    /// Follows the protocol, tries to learn from what it sees (with the corrupt members).
    SemiHonest,
    /// May also lie about dropouts and route messages as it likes.
    SemiMalicious,
}

/// The fleet's assumptions, in thousandths so that configurations compare exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ThreatModel {
    /// Members that may collude with the host, per mille.
    pub corrupt_permille: u16,
    /// Members that may drop out during a round, per mille.
    pub dropout_permille: u16,
    /// What the host may do.
    pub adversary: Adversary,
}

impl ThreatModel {
    /// 5% corrupt, 5% dropouts, semi-honest host: the default.
    pub const DEFAULT: Self = Self {
        corrupt_permille: 50,
        dropout_permille: 50,
        adversary: Adversary::SemiHonest,
    };

    /// Refuses rates outside [0, 1) and combinations no degree can satisfy (the
    /// reference's limits: corrupt + dropouts at most 90%, corrupt + 2 x dropouts for a
    /// semi-malicious host).
    pub fn check(&self) -> Result<(), SecAggError> {
        let (g, d) = (
            u32::from(self.corrupt_permille),
            u32::from(self.dropout_permille),
        );
        let load = match self.adversary {
            Adversary::SemiHonest => g + d,
            Adversary::SemiMalicious => g + 2 * d,
        };
        if g >= 1000 || d >= 1000 || load > 900 {
            return Err(SecAggError::Malformed(format!(
                "threat model {g}/1000 corrupt, {d}/1000 dropouts ({:?}) is infeasible: \
                 corrupt + dropouts (x2 against a semi-malicious host) must be at most 900/1000",
                self.adversary
            )));
        }
        Ok(())
    }

    fn security_bits(&self) -> u32 {
        match self.adversary {
            Adversary::SemiHonest => SECURITY_BITS,
            Adversary::SemiMalicious => SECURITY_BITS + GRINDING_BITS,
        }
    }
}

/// Which graph a round uses; announced with the round, so every member derives the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GraphPolicy {
    /// Everyone shares with everyone (Bonawitz et al.).
    Complete,
    /// A Harary graph with degree and threshold from [`harary_parameters`] for the roster's
    /// size; the complete graph below `sparse_from` members, or where the degree would be
    /// at least n - 1.
    Derived {
        /// The assumptions.
        model: ThreatModel,
        /// Smallest roster that gets a sparse graph.
        sparse_from: u32,
    },
    /// A Harary graph of this degree and threshold (tests, and operators who derived their
    /// own); the complete graph where the degree is at least n - 1.
    Fixed {
        /// Neighbours per member (even).
        degree: u32,
        /// Shares, among a member's own and its neighbours', that reconstruct its secrets.
        threshold: u32,
    },
}

impl GraphPolicy {
    /// The default: derived for 5% corrupt members and 5% dropouts, semi-honest host,
    /// sparse from [`DEFAULT_SPARSE_FROM`] members.
    pub const DEFAULT: Self = Self::Derived {
        model: ThreatModel::DEFAULT,
        sparse_from: DEFAULT_SPARSE_FROM,
    };

    /// Refuses a policy no roster could use.
    pub fn check(&self) -> Result<(), SecAggError> {
        match self {
            Self::Complete => Ok(()),
            Self::Derived { model, .. } => model.check(),
            Self::Fixed { degree, threshold } => {
                if *degree < 2 || degree % 2 != 0 || *threshold < 2 || threshold > &(degree + 1) {
                    Err(SecAggError::Malformed(format!(
                        "graph of degree {degree} and threshold {threshold}: the degree must be \
                         even and at least 2, the threshold between 2 and degree + 1"
                    )))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Degree and threshold of a Harary graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HararyParameters {
    /// Neighbours per member.
    pub degree: usize,
    /// Shares that reconstruct a member's secrets.
    pub threshold: usize,
}

/// ln(n!): exact sum for small n, Stirling's series (error below 1e-15 relative) beyond.
fn ln_factorial(n: usize) -> f64 {
    if n < 64 {
        return (2..=n).map(|i| (i as f64).ln()).sum();
    }
    let x = n as f64;
    let x2 = x * x;
    x * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI * x).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x * x2)
        + 1.0 / (1260.0 * x * x2 * x2)
}

/// ln C(n, k).
fn ln_choose(n: usize, k: usize) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// The probabilities of x = 0..=draws marked members among `draws` drawn without
/// replacement from `population` members of which `marked` are marked.
fn hypergeometric(population: usize, marked: usize, draws: usize) -> Vec<f64> {
    let total = ln_choose(population, draws);
    (0..=draws)
        .map(|x| {
            if x > marked || draws - x > population - marked {
                0.0
            } else {
                (ln_choose(marked, x) + ln_choose(population - marked, draws - x) - total).exp()
            }
        })
        .collect()
}

/// The degree and threshold of the sparsest Harary graph that meets `model` for `n`
/// members at `security_bits` of statistical security and `correctness_bits` of
/// correctness; `None` when no degree below n - 1 does (use the complete graph).
pub fn harary_parameters(
    n: usize,
    model: &ThreatModel,
    security_bits: u32,
    correctness_bits: u32,
) -> Result<Option<HararyParameters>, SecAggError> {
    model.check()?;
    if n == 0 {
        return Err(SecAggError::Malformed("a graph of no members".into()));
    }
    // A tiny slack keeps the binary rounding of e.g. 0.05 x 100 from losing a member.
    let corrupt =
        ((f64::from(model.corrupt_permille) / 1000.0 + 1e-14) * n as f64).floor() as usize;
    let dropouts =
        ((f64::from(model.dropout_permille) / 1000.0 + 1e-14) * n as f64).floor() as usize;
    let survivors =
        ((1.0 - f64::from(model.dropout_permille) / 1000.0 - 1e-14) * n as f64).ceil() as usize;
    let bad = corrupt + dropouts;
    // Each of the two security events gets half of the failure probability.
    let ln_security = -f64::from(security_bits + 1) * std::f64::consts::LN_2;
    let per_member_security = (ln_security - (n as f64).ln()).exp();
    let per_member_correctness =
        (-f64::from(correctness_bits) * std::f64::consts::LN_2 - (n as f64).ln()).exp();
    let mut degree = 2;
    while degree + 1 < n {
        // Disconnecting a ring-of-k/2 graph takes two runs of k/2 consecutive bad members:
        // at most n (n - k - 1) / 2 pairs of places, each all bad with probability
        // (bad)_k / (n)_k (falling factorials).
        let disconnected = degree > bad || {
            let ln_pairs =
                (n as f64).ln() + ((n - degree - 1) as f64).ln() - std::f64::consts::LN_2;
            let ln_all_bad = ln_factorial(bad) - ln_factorial(bad - degree)
                + ln_factorial(n - degree)
                - ln_factorial(n);
            ln_pairs + ln_all_bad < ln_security
        };
        if disconnected {
            // t1: the fewest corrupt neighbours that is exceeded with negligible probability.
            let corrupt_nb = hypergeometric(n, corrupt, degree);
            let mut above = 0.0;
            let mut t1 = degree;
            for x in (0..=degree).rev() {
                // above = P[X > x]
                if above >= per_member_security {
                    break;
                }
                t1 = x;
                above += corrupt_nb[x];
            }
            // t2: the most surviving neighbours that is missed with negligible probability.
            let surviving_nb = hypergeometric(n, survivors, degree);
            let mut below = 0.0;
            let mut t2 = 0;
            for (y, p) in surviving_nb.iter().enumerate() {
                below += p;
                t2 = y;
                if below >= per_member_correctness {
                    break;
                }
            }
            // t must exceed t1 (and, semi-malicious, (t1 + k) / 2) and be at most t2.
            let least = match model.adversary {
                Adversary::SemiHonest => t1 + 1,
                Adversary::SemiMalicious => (t1 + degree) / 2 + 1,
            };
            if least <= t2 {
                return Ok(Some(HararyParameters {
                    degree,
                    threshold: least.max(2),
                }));
            }
        }
        degree += 2;
    }
    Ok(None)
}

/// The graph of one round: each roster member's neighbours and the share threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    members: usize,
    /// Ring position of each roster index, and roster index at each position (sparse only).
    ring: Option<(usize, Vec<usize>, Vec<usize>)>,
    threshold: usize,
}

impl Graph {
    /// The graph for a roster of `members` (sorted by id, as in the roster, each with its
    /// advertised ring nonce) under `config`. The ring order is the order of
    /// SHA-256(seed, id), where the seed hashes the round and every member's id and nonce:
    /// one honest member's fresh nonce makes it uniformly random.
    pub fn build(
        config: &SecAggConfig,
        members: &[(&DeviceId, &[u8; 32])],
    ) -> Result<Self, SecAggError> {
        config.graph.check()?;
        let n = members.len();
        let majority = super::effective_threshold(config.threshold, n);
        let sparse = match config.graph {
            GraphPolicy::Complete => None,
            GraphPolicy::Derived { model, sparse_from } => {
                if n < sparse_from as usize {
                    None
                } else {
                    harary_parameters(n, &model, model.security_bits(), CORRECTNESS_BITS)?
                }
            }
            GraphPolicy::Fixed { degree, threshold } => Some(HararyParameters {
                degree: degree as usize,
                threshold: threshold as usize,
            }),
        }
        .filter(|p| p.degree + 1 < n);
        let Some(params) = sparse else {
            return Ok(Self {
                members: n,
                ring: None,
                threshold: majority,
            });
        };
        let round = config.round.to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![&round];
        for (id, nonce) in members {
            parts.push(id.0.as_bytes());
            parts.push(nonce.as_slice());
        }
        let seed = kdf(b"fedshield/secagg/v2/ring-seed", &parts);
        let mut order: Vec<(usize, [u8; 32])> = members
            .iter()
            .enumerate()
            .map(|(i, (id, _))| {
                let key = kdf(
                    b"fedshield/secagg/v2/ring-position",
                    &[&seed, id.0.as_bytes()],
                );
                (i, key)
            })
            .collect();
        order.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        let at: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        let mut position = vec![0; n];
        for (p, &i) in at.iter().enumerate() {
            position[i] = p;
        }
        Ok(Self {
            members: n,
            ring: Some((params.degree, position, at)),
            threshold: params.threshold,
        })
    }

    /// Members of the roster.
    pub fn members(&self) -> usize {
        self.members
    }

    /// The Harary degree, or `None` for the complete graph.
    pub fn degree(&self) -> Option<usize> {
        self.ring.as_ref().map(|(k, _, _)| *k)
    }

    /// Shares (a member's own and its neighbours') that reconstruct a member's secrets.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The roster indices of member `i`'s neighbours, ascending (itself excluded).
    pub fn neighbours(&self, i: usize) -> Vec<usize> {
        let mut out: Vec<usize> = match &self.ring {
            None => (0..self.members).filter(|&j| j != i).collect(),
            Some((k, position, at)) => {
                let n = self.members;
                let p = position[i];
                (1..=k / 2)
                    .flat_map(|d| [at[(p + d) % n], at[(p + n - d) % n]])
                    .collect()
            }
        };
        out.sort_unstable();
        out
    }

    /// Whether `i` and `j` (distinct) are neighbours.
    pub fn adjacent(&self, i: usize, j: usize) -> bool {
        match &self.ring {
            None => i != j,
            Some((k, position, _)) => {
                let n = self.members;
                let d = (position[i] + n - position[j]) % n;
                i != j && (d <= k / 2 || n - d <= k / 2)
            }
        }
    }

    /// Member `i`'s share holders: itself and its neighbours, ascending.
    pub fn holders(&self, i: usize) -> Vec<usize> {
        let mut out = self.neighbours(i);
        let at = out.partition_point(|&j| j < i);
        out.insert(at, i);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(corrupt: f64, dropout: f64, adversary: Adversary) -> ThreatModel {
        ThreatModel {
            corrupt_permille: (corrupt * 1000.0).round() as u16,
            dropout_permille: (dropout * 1000.0).round() as u16,
            adversary,
        }
    }

    /// The reference implementation's table (google-parfait/federated-compute,
    /// graph_parameter_finder_test.cc): (n, corrupt, dropouts, adversary, degree, threshold)
    /// at 40 bits of security and 20 of correctness: both the degree and the threshold
    /// match.
    #[test]
    fn derived_parameters_reproduce_the_reference_table() {
        use Adversary::{SemiHonest as H, SemiMalicious as M};
        let table: &[(usize, f64, f64, Adversary, usize, usize)] = &[
            (100, 0.05, 0.05, H, 12, 6),
            (1000, 0.05, 0.05, H, 30, 17),
            (10000, 0.05, 0.05, H, 34, 20),
            (100000, 0.05, 0.05, H, 36, 21),
            (100, 0.05, 0.05, M, 16, 11),
            (1000, 0.05, 0.05, M, 52, 37),
            (10000, 0.05, 0.05, M, 62, 44),
            (10, 0.05, 0.33, H, 4, 2),
            (100, 0.05, 0.33, H, 28, 6),
            (1000, 0.05, 0.33, H, 72, 24),
            (10000, 0.05, 0.33, H, 86, 29),
            (100, 0.05, 0.33, M, 72, 39),
            (1000, 0.05, 0.33, M, 398, 223),
            (100, 0.33, 0.05, H, 34, 29),
            (1000, 0.33, 0.05, H, 78, 60),
            (1000, 0.33, 0.05, M, 132, 109),
            (100, 0.33, 0.33, H, 68, 34),
            (1000, 0.33, 0.33, H, 286, 150),
            (100, 0.3, 0.3, M, 92, 62),
            (1000, 0.3, 0.3, M, 872, 584),
            (100, 0.45, 0.45, H, 92, 46),
            (1000, 0.45, 0.45, H, 822, 417),
            (1000, 0.33, 0.0, H, 38, 36),
            (1000, 0.0, 0.33, H, 38, 2),
            (1000, 0.0, 0.33, M, 228, 115),
            (1000, 0.0, 0.0, H, 2, 2),
            (10, 0.05, 0.05, H, 2, 2),
        ];
        for &(n, g, d, adversary, degree, threshold) in table {
            let got = harary_parameters(n, &model(g, d, adversary), 40, 20)
                .unwrap()
                .unwrap_or_else(|| panic!("no graph for n = {n}, {g}/{d} {adversary:?}"));
            assert_eq!(
                got.degree, degree,
                "degree for n = {n}, {g}/{d} {adversary:?}: {got:?}"
            );
            assert_eq!(
                got.threshold, threshold,
                "threshold for n = {n}, {g}/{d} {adversary:?}: {got:?}"
            );
        }
    }

    #[test]
    fn infeasible_models_are_refused_and_tiny_fleets_get_the_complete_graph() {
        for (g, d, a) in [
            (0.5, 0.5, Adversary::SemiHonest),
            (0.33, 0.33, Adversary::SemiMalicious),
            (0.1, 1.0, Adversary::SemiHonest),
        ] {
            assert!(harary_parameters(1000, &model(g, d, a), 40, 20).is_err());
        }
        assert_eq!(
            harary_parameters(3, &ThreatModel::DEFAULT, 40, 20).unwrap(),
            None
        );
        assert!(harary_parameters(0, &ThreatModel::DEFAULT, 40, 20).is_err());
    }

    #[test]
    fn the_production_settings_are_sparse_at_a_thousand_devices() {
        // What a 1,000-device round announces by default, and with a semi-malicious host
        // (with the grinding allowance): both far below the complete graph's 999.
        let honest = ThreatModel::DEFAULT;
        let p = harary_parameters(1000, &honest, honest.security_bits(), CORRECTNESS_BITS)
            .unwrap()
            .unwrap();
        assert_eq!((p.degree, p.threshold), (30, 17));
        let malicious = ThreatModel {
            adversary: Adversary::SemiMalicious,
            ..honest
        };
        let p = harary_parameters(
            1000,
            &malicious,
            malicious.security_bits(),
            CORRECTNESS_BITS,
        )
        .unwrap()
        .unwrap();
        assert!(p.degree < 200 && 2 * p.threshold > p.degree, "{p:?}");
    }

    fn ids(n: usize) -> Vec<(DeviceId, [u8; 32])> {
        (0..n)
            .map(|i| (DeviceId(format!("edge-{i:04}")), [i as u8; 32]))
            .collect()
    }

    fn build(policy: GraphPolicy, members: &[(DeviceId, [u8; 32])]) -> Graph {
        let config = SecAggConfig {
            round: 9,
            threshold: 2,
            vector_len: 4,
            graph: policy,
        };
        let refs: Vec<(&DeviceId, &[u8; 32])> = members.iter().map(|(d, n)| (d, n)).collect();
        Graph::build(&config, &refs).unwrap()
    }

    #[test]
    fn a_harary_graph_is_a_regular_symmetric_ring_that_every_nonce_reshuffles() {
        let members = ids(40);
        let g = build(
            GraphPolicy::Fixed {
                degree: 6,
                threshold: 4,
            },
            &members,
        );
        assert_eq!((g.degree(), g.threshold()), (Some(6), 4));
        for i in 0..40 {
            let nb = g.neighbours(i);
            assert_eq!(nb.len(), 6);
            assert!(!nb.contains(&i));
            for &j in &nb {
                assert!(g.adjacent(i, j) && g.adjacent(j, i));
                assert!(g.neighbours(j).contains(&i));
            }
            let non: usize = (0..40).filter(|&j| g.adjacent(i, j)).count();
            assert_eq!(non, 6);
            assert_eq!(g.holders(i).len(), 7);
        }
        // Connected: a walk from member 0 reaches everyone.
        let mut seen = [false; 40];
        let mut stack = vec![0];
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(g.neighbours(i));
            }
        }
        assert!(seen.iter().all(|&s| s));
        // One member's other nonce gives another ring.
        let mut other = members.clone();
        other[17].1 = [0xee; 32];
        let h = build(
            GraphPolicy::Fixed {
                degree: 6,
                threshold: 4,
            },
            &other,
        );
        assert_ne!(g, h);
        assert_eq!(
            g,
            build(
                GraphPolicy::Fixed {
                    degree: 6,
                    threshold: 4
                },
                &members
            )
        );
    }

    #[test]
    fn small_rosters_and_wide_degrees_use_the_complete_graph() {
        let members = ids(7);
        for policy in [
            GraphPolicy::Complete,
            GraphPolicy::DEFAULT,
            GraphPolicy::Fixed {
                degree: 6,
                threshold: 3,
            },
        ] {
            let g = build(policy, &members);
            assert_eq!(g.degree(), None);
            // The complete graph's threshold is a strict majority.
            assert_eq!(g.threshold(), 4);
            assert_eq!(g.neighbours(3), vec![0, 1, 2, 4, 5, 6]);
        }
        assert!(
            GraphPolicy::Fixed {
                degree: 5,
                threshold: 3
            }
            .check()
            .is_err()
        );
        assert!(
            GraphPolicy::Fixed {
                degree: 4,
                threshold: 6
            }
            .check()
            .is_err()
        );
    }
}
