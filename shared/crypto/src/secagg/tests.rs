//! Deterministic tests of the secure-aggregation state machines: every stage, every
//! rejection, and (property tests) the whole pipeline with the packed encryption.

use super::*;
use crate::encoding::FixedPoint;
use crate::identity::Registry;
use crate::packed::{Aggregate, BodyBits, ClientKey, EncryptedUpdate, Encryptor, MaskSeed};
use crate::params::POLYNOMIAL_SIZE;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::{BTreeMap, BTreeSet};
use tfhe::core_crypto::commons::generators::DeterministicSeeder;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};

struct Fleet {
    authority: Identity,
    registry: Registry,
    secrets: Vec<(DeviceId, [u8; 32])>,
}

fn fleet(n: usize, rng: &mut ChaCha20Rng) -> Fleet {
    let authority = Identity::generate(rng);
    let mut registry = Registry::new(authority.public_key());
    let secrets = (0..n)
        .map(|i| {
            let id = DeviceId(format!("edge-{i:03}"));
            let identity = Identity::generate(rng);
            registry
                .enrol(authority.enrol(id.clone(), identity.public_key()))
                .unwrap();
            (id, identity.secret())
        })
        .collect();
    Fleet {
        authority,
        registry,
        secrets,
    }
}

impl Fleet {
    fn client(
        &self,
        i: usize,
        config: SecAggConfig,
        rng: &mut ChaCha20Rng,
    ) -> (Client, SignedMessage) {
        let (id, secret) = &self.secrets[i];
        Client::new(
            Identity::from_secret(*secret),
            id.clone(),
            config,
            self.authority.public_key(),
            10 + i as u64,
            rng,
        )
    }
}

/// Which clients go silent before sending each stage's message.
#[derive(Debug, Clone, Default)]
struct Drops {
    advertise: BTreeSet<usize>,
    shares: BTreeSet<usize>,
    input: BTreeSet<usize>,
    consistency: BTreeSet<usize>,
    unmask: BTreeSet<usize>,
}

/// Runs one aggregation of `inputs` to the end or to the first refusal.
fn run(
    fleet: &Fleet,
    config: SecAggConfig,
    inputs: &[Vec<u64>],
    digests: &[[u8; 32]],
    drops: &Drops,
    rng: &mut ChaCha20Rng,
) -> Result<KeyAggregate, SecAggError> {
    run_with_graph(fleet, config, inputs, digests, drops, rng, &mut None)
}

/// [`run`], also handing out the round's graph once the roster is fixed. A client that
/// refuses the shares stage because too few of its neighbours sent shares leaves the round
/// (as a device does), and the others go on without it.
fn run_with_graph(
    fleet: &Fleet,
    config: SecAggConfig,
    inputs: &[Vec<u64>],
    digests: &[[u8; 32]],
    drops: &Drops,
    rng: &mut ChaCha20Rng,
    graph: &mut Option<Graph>,
) -> Result<KeyAggregate, SecAggError> {
    let mut server = Server::new(config, fleet.registry.clone())?;
    let mut clients = Vec::new();
    for i in 0..inputs.len() {
        let (client, advert) = fleet.client(i, config, rng);
        if !drops.advertise.contains(&i) {
            server.receive(advert)?;
            clients.push((i, client));
        }
    }
    let roster = server.close_advertise()?;
    *graph = server.graph().cloned();
    let mut alive = Vec::new();
    for (i, mut c) in clients {
        let msg = c.on_roster(&roster, rng)?;
        if !drops.shares.contains(&i) {
            server.receive(msg)?;
            alive.push((i, c));
        }
    }
    let deliveries = server.close_shares()?;
    let mut next = Vec::new();
    for (i, mut c) in alive {
        let msg = match c.on_shares(&deliveries[c.id()], &inputs[i], digests[i]) {
            Err(SecAggError::BelowThreshold { .. }) => continue,
            other => other?,
        };
        if !drops.input.contains(&i) {
            server.receive(msg)?;
            next.push((i, c));
        }
    }
    let survivors = server.close_masked_inputs()?;
    let mut alive = Vec::new();
    for (i, mut c) in next {
        let msg = c.on_survivors(&survivors)?;
        if !drops.consistency.contains(&i) {
            server.receive(msg)?;
            alive.push((i, c));
        }
    }
    let request = server.close_consistency()?;
    for (i, mut c) in alive {
        let msg = c.on_unmask(&request)?;
        if !drops.unmask.contains(&i) {
            server.receive(msg)?;
        }
    }
    server.close_unmask()
}

fn config(round: u64, threshold: usize, vector_len: usize) -> SecAggConfig {
    SecAggConfig {
        round,
        threshold,
        vector_len,
        graph: GraphPolicy::Complete,
    }
}

fn harary(degree: u32, threshold: u32) -> GraphPolicy {
    GraphPolicy::Fixed { degree, threshold }
}

/// Whether a round with `drops` must complete, from the graph and the thresholds alone:
/// each stage keeps the minimum of contributors, every client keeps enough neighbours to
/// go on, and every secret the host must reconstruct has the graph's threshold of
/// responding holders.
fn must_complete(graph: &Graph, u1: &[usize], drops: &Drops, minimum: usize) -> bool {
    let t = graph.threshold();
    // Roster index -> client number, and back.
    let at: BTreeMap<usize, usize> = u1.iter().copied().enumerate().collect();
    let members = |set: &BTreeSet<usize>| -> BTreeSet<usize> {
        at.iter()
            .filter(|(_, c)| set.contains(c))
            .map(|(i, _)| *i)
            .collect()
    };
    let all: BTreeSet<usize> = (0..u1.len()).collect();
    let u2: BTreeSet<usize> = all.difference(&members(&drops.shares)).copied().collect();
    if u1.len() < minimum || u2.len() < minimum {
        return false;
    }
    let refusing: BTreeSet<usize> = u2
        .iter()
        .copied()
        .filter(|&u| {
            1 + graph
                .neighbours(u)
                .iter()
                .filter(|v| u2.contains(v))
                .count()
                < t
        })
        .collect();
    let u3: BTreeSet<usize> = u2
        .difference(&members(&drops.input))
        .copied()
        .filter(|u| !refusing.contains(u))
        .collect();
    let signers: BTreeSet<usize> = u3
        .difference(&members(&drops.consistency))
        .copied()
        .collect();
    let responders: BTreeSet<usize> = signers
        .difference(&members(&drops.unmask))
        .copied()
        .collect();
    u3.len() >= minimum
        && signers.len() >= t
        && responders.len() >= t
        && u3.iter().all(|&v| {
            graph
                .holders(v)
                .iter()
                .filter(|h| responders.contains(h))
                .count()
                >= t
        })
        && u2.difference(&u3).all(|&v| {
            graph
                .neighbours(v)
                .iter()
                .filter(|h| responders.contains(h))
                .count()
                >= t
        })
}

fn random_inputs(n: usize, len: usize, rng: &mut ChaCha20Rng) -> Vec<Vec<u64>> {
    (0..n)
        .map(|_| (0..len).map(|_| rng.random()).collect())
        .collect()
}

fn sum_of(inputs: &[Vec<u64>], members: impl Iterator<Item = usize>) -> Vec<u64> {
    let mut sum = vec![0u64; inputs[0].len()];
    for i in members {
        for (s, x) in sum.iter_mut().zip(&inputs[i]) {
            *s = s.wrapping_add(*x);
        }
    }
    sum
}

#[test]
fn key_sum_of_the_survivors_with_dropouts_at_every_stage() {
    // The complete graph, and a Harary graph of degree 6 and threshold 3, in which every
    // secret still has 3 responding holders whatever the ring order.
    for policy in [GraphPolicy::Complete, harary(6, 3)] {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let fleet = fleet(11, &mut rng);
        let inputs = random_inputs(11, 64, &mut rng);
        let digests: Vec<[u8; 32]> = (0..11u8).map(|i| [i; 32]).collect();
        let drops = Drops {
            advertise: [0].into(),
            shares: [1].into(),
            input: [2, 3].into(), // dropped after sharing: their pair masks are removed
            consistency: [4].into(),
            unmask: BTreeSet::new(),
        };
        // 10 in U1 -> minimum max(3, 6) = 6; U2 has 9, U3 = {4..=10} (7), 6 sign and unmask.
        let mut graph = None;
        let out = run_with_graph(
            &fleet,
            SecAggConfig {
                graph: policy,
                ..config(7, 3, 64)
            },
            &inputs,
            &digests,
            &drops,
            &mut rng,
            &mut graph,
        )
        .unwrap();
        let graph = graph.unwrap();
        assert_eq!(
            graph.degree(),
            match policy {
                GraphPolicy::Complete => None,
                _ => Some(6),
            }
        );
        let u3: Vec<usize> = (4..11).collect();
        assert_eq!(out.key_sum, sum_of(&inputs, u3.iter().copied()));
        assert_eq!(
            out.contributors,
            u3.iter()
                .map(|&i| fleet.secrets[i].0.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(out.update_digests[&fleet.secrets[5].0], [5; 32]);
    }
}

#[test]
fn over_a_harary_graph_messages_stay_within_the_neighbourhood() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let n = 60;
    let fleet = fleet(n, &mut rng);
    let cfg = SecAggConfig {
        graph: harary(6, 4),
        ..config(3, 2, 8)
    };
    let mut server = Server::new(cfg, fleet.registry.clone()).unwrap();
    let mut clients: Vec<Client> = (0..n)
        .map(|i| {
            let (c, advert) = fleet.client(i, cfg, &mut rng);
            server.receive(advert).unwrap();
            c
        })
        .collect();
    let roster = server.close_advertise().unwrap();
    let graph = server.graph().unwrap().clone();
    assert_eq!((graph.degree(), graph.threshold()), (Some(6), 4));
    let shares: Vec<SignedMessage> = clients
        .iter_mut()
        .map(|c| c.on_roster(&roster, &mut rng).unwrap())
        .collect();
    // Every client derived the host's graph, and shares with its 6 neighbours only.
    for (i, (c, msg)) in clients.iter().zip(&shares).enumerate() {
        assert_eq!(c.graph(), Some(&graph));
        let ClientBody::Shares(s) = &msg.body else {
            panic!("not shares")
        };
        let to: Vec<&DeviceId> = s.iter().map(|s| &s.to).collect();
        let want: Vec<&DeviceId> = graph
            .neighbours(i)
            .into_iter()
            .map(|j| &fleet.secrets[j].0)
            .collect();
        assert_eq!(to, want);
    }
    // A share addressed outside the graph (re-signed by its sender) is refused by the host.
    let stranger = (0..n).find(|&j| j != 0 && !graph.adjacent(0, j)).unwrap();
    let mut routed = shares[0].clone();
    if let ClientBody::Shares(s) = &mut routed.body {
        s[0].to = fleet.secrets[stranger].0.clone();
    }
    let routed = SignedMessage::sign(
        &Identity::from_secret(fleet.secrets[0].1),
        routed.sender.clone(),
        routed.round,
        routed.body.clone(),
    );
    assert!(matches!(
        server.receive(routed),
        Err(SecAggError::Malformed(_))
    ));
    for s in shares.clone() {
        server.receive(s).unwrap();
    }
    let deliveries = server.close_shares().unwrap();
    assert!(deliveries.values().all(|d| d.shares.len() == 6));
    // A client refuses a share from a non-neighbour that a host slipped in.
    let ClientBody::Shares(from_0) = &shares[0].body else {
        panic!("not shares")
    };
    let mut slipped = deliveries[&fleet.secrets[stranger].0].clone();
    let mut foreign = from_0[0].clone();
    foreign.to = fleet.secrets[stranger].0.clone();
    slipped.shares[0] = foreign;
    assert!(matches!(
        clients[stranger].on_shares(&slipped, &[0; 8], [0; 32]),
        Err(SecAggError::Malformed(_))
    ));
    for c in clients.iter_mut() {
        let msg = c.on_shares(&deliveries[c.id()], &[1; 8], [0; 32]).unwrap();
        server.receive(msg).unwrap();
    }
    let list = server.close_masked_inputs().unwrap();
    for c in clients.iter_mut() {
        server.receive(c.on_survivors(&list).unwrap()).unwrap();
    }
    // The unmask request carries the threshold's signatures, not one per survivor, and
    // each response the shares of the client's own and its neighbours' secrets.
    let request = server.close_consistency().unwrap();
    assert_eq!(request.signatures.len(), 4);
    for c in clients.iter_mut() {
        let msg = c.on_unmask(&request).unwrap();
        let ClientBody::Unmask {
            self_mask,
            mask_key,
        } = &msg.body
        else {
            panic!("not unmask")
        };
        assert_eq!((self_mask.len(), mask_key.len()), (7, 0));
        server.receive(msg).unwrap();
    }
    let out = server.close_unmask().unwrap();
    assert_eq!(out.key_sum, vec![n as u64; 8]);
}

#[test]
fn the_host_refuses_below_the_threshold_so_a_lone_update_is_never_decryptable() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let fleet = fleet(3, &mut rng);
    let inputs = random_inputs(3, 8, &mut rng);
    let digests = vec![[0; 32]; 3];
    // Two of three drop after sharing: one masked input left.
    let drops = Drops {
        input: [0, 1].into(),
        ..Drops::default()
    };
    let err = run(&fleet, config(1, 2, 8), &inputs, &digests, &drops, &mut rng).unwrap_err();
    assert_eq!(
        err,
        SecAggError::BelowThreshold {
            stage: "masked inputs",
            have: 1,
            need: 2
        }
    );
    // A threshold of 1 is raised to 2 (and to a majority): one client alone never aggregates.
    assert_eq!(effective_threshold(1, 1), 2);
    assert_eq!(effective_threshold(1, 10), 6);
    let drops = Drops {
        advertise: [0, 1].into(),
        ..Drops::default()
    };
    let err = run(&fleet, config(1, 1, 8), &inputs, &digests, &drops, &mut rng).unwrap_err();
    assert!(matches!(
        err,
        SecAggError::BelowThreshold {
            stage: "advertise",
            ..
        }
    ));
}

/// A server past stage 0 with `n` clients, and the clients.
fn started(n: usize, rng: &mut ChaCha20Rng) -> (Fleet, Server, Vec<Client>, Vec<SignedMessage>) {
    let fleet = fleet(n, rng);
    let cfg = config(5, 2, 4);
    let mut server = Server::new(cfg, fleet.registry.clone()).unwrap();
    let mut clients = Vec::new();
    let mut adverts = Vec::new();
    for i in 0..n {
        let (c, a) = fleet.client(i, cfg, rng);
        server.receive(a.clone()).unwrap();
        clients.push(c);
        adverts.push(a);
    }
    (fleet, server, clients, adverts)
}

#[test]
fn tampered_replayed_wrong_round_unsigned_and_unknown_messages_are_rejected() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let fleet = fleet(3, &mut rng);
    let cfg = config(5, 2, 4);
    let mut server = Server::new(cfg, fleet.registry.clone()).unwrap();
    let (_, advert) = fleet.client(0, cfg, &mut rng);
    server.receive(advert.clone()).unwrap();

    // Replay within the round.
    assert_eq!(
        server.receive(advert.clone()),
        Err(SecAggError::Duplicate {
            sender: advert.sender.clone(),
            kind: "advertise"
        })
    );
    // Tampered body.
    let (_, mut tampered) = fleet.client(1, cfg, &mut rng);
    if let ClientBody::Advertise(a) = &mut tampered.body {
        a.c_pk[0] ^= 1;
    }
    assert_eq!(
        server.receive(tampered.clone()),
        Err(SecAggError::BadSignature(tampered.sender.clone()))
    );
    // Signed by someone else: client 2's message claiming to be client 1.
    let (_, mut forged) = fleet.client(2, cfg, &mut rng);
    forged.sender = tampered.sender.clone();
    assert!(matches!(
        server.receive(forged),
        Err(SecAggError::BadSignature(_))
    ));
    // Unsigned.
    let (_, mut unsigned) = fleet.client(1, cfg, &mut rng);
    unsigned.signature.clear();
    assert!(matches!(
        server.receive(unsigned),
        Err(SecAggError::Unsigned(_))
    ));
    // Wrong round (a replay of last round's advert, validly signed).
    let (_, old) = fleet.client(1, config(4, 2, 4), &mut rng);
    assert_eq!(
        server.receive(old),
        Err(SecAggError::WrongRound {
            expected: 5,
            got: 4
        })
    );
    // Unknown device, signed by a key the registry never saw.
    let stranger = Identity::generate(&mut rng);
    let (_, unknown) = Client::new(stranger, "edge-999".into(), cfg, [0; 32], 1, &mut rng);
    assert!(matches!(
        server.receive(unknown),
        Err(SecAggError::UnknownDevice(_))
    ));
    // Nothing of the above was recorded.
    assert_eq!(server.collected(), 1);

    // Revoked: the registry drops it; the server built from it rejects the device.
    let mut registry = fleet.registry.clone();
    registry.revoke(&fleet.secrets[1].0);
    let mut server = Server::new(cfg, registry.clone()).unwrap();
    let (_, revoked) = fleet.client(1, cfg, &mut rng);
    assert!(matches!(
        server.receive(revoked),
        Err(SecAggError::Revoked(_))
    ));
    // A revoked device cannot be re-enrolled, and a certificate from another authority is
    // refused.
    let again = fleet.authority.enrol(fleet.secrets[1].0.clone(), [1; 32]);
    assert!(matches!(
        registry.enrol(again),
        Err(SecAggError::Revoked(_))
    ));
    let rogue = Identity::generate(&mut rng).enrol("edge-500".into(), [2; 32]);
    assert!(matches!(
        registry.enrol(rogue),
        Err(SecAggError::BadEnrolment(_))
    ));
}

#[test]
fn late_and_early_messages_are_wrong_stage() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let (_fleet, mut server, mut clients, adverts) = started(3, &mut rng);
    let roster = server.close_advertise().unwrap();
    // A late advert (replayed) while collecting shares.
    assert_eq!(
        server.receive(adverts[0].clone()),
        Err(SecAggError::WrongStage {
            expected: "shares",
            got: "advertise"
        })
    );
    let shares: Vec<SignedMessage> = clients
        .iter_mut()
        .map(|c| c.on_roster(&roster, &mut rng).unwrap())
        .collect();
    // Shares with a recipient missing are malformed, and change nothing.
    let mut short = shares[0].clone();
    if let ClientBody::Shares(s) = &mut short.body {
        s.pop();
    }
    short = SignedMessage::sign(
        &Identity::from_secret(_fleet.secrets[0].1),
        short.sender.clone(),
        short.round,
        short.body.clone(),
    );
    assert!(matches!(
        server.receive(short),
        Err(SecAggError::Malformed(_))
    ));
    assert_eq!(server.collected(), 0);
    for s in shares {
        server.receive(s).unwrap();
    }
    // Closing a stage out of order is refused.
    assert!(matches!(
        server.close_consistency(),
        Err(SecAggError::OutOfOrder(_))
    ));
}

#[test]
fn clients_refuse_a_lying_host() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let (fleet, mut server, mut clients, _) = started(4, &mut rng);
    let roster = server.close_advertise().unwrap();

    // A roster entry whose advert was altered by the host.
    let mut forged = roster.clone();
    if let ClientBody::Advertise(a) = &mut forged.entries[1].advert.body {
        a.s_pk = [9; 32];
    }
    let (mut fresh, _) = fleet.client(0, config(5, 2, 4), &mut rng);
    assert!(matches!(
        fresh.on_roster(&forged, &mut rng),
        Err(SecAggError::BadSignature(_)) | Err(SecAggError::Malformed(_))
    ));
    // A roster with an enrolment not signed by the authority (a host-invented device).
    let mut invented = roster.clone();
    invented.entries[1].enrolment.public_key = [3; 32];
    assert!(matches!(
        clients[0].on_roster(&invented, &mut rng),
        Err(SecAggError::BadEnrolment(_))
    ));

    for c in clients.iter_mut() {
        let msg = c.on_roster(&roster, &mut rng).unwrap();
        server.receive(msg).unwrap();
    }
    let deliveries = server.close_shares().unwrap();
    // A tampered share does not decrypt.
    let id0 = clients[0].id().clone();
    let mut bad = deliveries[&id0].clone();
    bad.shares[0].ciphertext[0] ^= 1;
    assert!(matches!(
        clients[0].on_shares(&bad, &[0; 4], [0; 32]),
        Err(SecAggError::ShareDecryption(_))
    ));
    for c in clients.iter_mut() {
        let msg = c.on_shares(&deliveries[c.id()], &[1; 4], [0; 32]).unwrap();
        server.receive(msg).unwrap();
    }
    let list = server.close_masked_inputs().unwrap();
    let signed: Vec<SignedMessage> = clients
        .iter_mut()
        .map(|c| c.on_survivors(&list).unwrap())
        .collect();
    for s in signed {
        server.receive(s).unwrap();
    }
    let request = server.close_consistency().unwrap();

    // The host claims client 3 dropped (to learn its mask key) while it contributed.
    let mut lie = request.clone();
    lie.survivors.pop();
    assert!(matches!(
        clients[0].on_unmask(&lie),
        Err(SecAggError::InconsistentRequest(_))
    ));
    // Too few signatures.
    let mut thin = request.clone();
    thin.signatures.truncate(1);
    assert!(matches!(
        clients[0].on_unmask(&thin),
        Err(SecAggError::BelowThreshold { .. })
    ));
    // A forged signature.
    let mut forged_sig = request.clone();
    forged_sig.signatures[1].signature[0] ^= 1;
    assert!(matches!(
        clients[0].on_unmask(&forged_sig),
        Err(SecAggError::InconsistentRequest(_))
    ));
    // The genuine request is answered, once.
    clients[0].on_unmask(&request).unwrap();
    assert!(matches!(
        clients[0].on_unmask(&request),
        Err(SecAggError::OutOfOrder(_))
    ));
}

/// The pipeline of one round: encrypted updates, secure key aggregation with dropouts, and
/// decryption of the survivors' weighted mean.
fn pipeline(
    n: usize,
    t: usize,
    policy: GraphPolicy,
    dim: usize,
    drops: Drops,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut seeder = DeterministicSeeder::<DefaultRandomGenerator>::new(Seed(seed as u128));
    let fleet = fleet(n, &mut rng);
    let fp = FixedPoint::new(0.25).unwrap();
    let mask_seed = MaskSeed(rng.random());
    let samples: Vec<u64> = (0..n).map(|_| rng.random_range(1..1000)).collect();
    let announced: u64 = samples.iter().sum();
    // Values at and beyond the encoding limits, and in between.
    let values: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            (0..dim)
                .map(|_| match rng.random_range(0..4) {
                    0 => 0.25,
                    1 => -0.25,
                    2 => rng.random_range(-1.0..1.0),
                    _ => rng.random_range(-0.25..0.25),
                })
                .collect()
        })
        .collect();
    let keys: Vec<ClientKey> = (0..n).map(|_| ClientKey::generate(&mut seeder)).collect();
    let updates: Vec<EncryptedUpdate> = (0..n)
        .map(|i| {
            let mut plain = vec![0u64; dim];
            let w = samples[i] as f64 / announced as f64;
            fp.encode_weighted(&values[i], w, &mut plain).unwrap();
            Encryptor::new(&keys[i], mask_seed, BodyBits::FULL, &mut seeder).encrypt(&plain)
        })
        .collect();
    let digests: Vec<[u8; 32]> = updates
        .iter()
        .map(|u| update_digest(&postcard::to_stdvec(u).unwrap()))
        .collect();
    let inputs: Vec<Vec<u64>> = keys.iter().map(|k| k.coefficients().to_vec()).collect();

    let mut graph = None;
    let result = run_with_graph(
        &fleet,
        SecAggConfig {
            graph: policy,
            ..config(3, t, POLYNOMIAL_SIZE)
        },
        &inputs,
        &digests,
        &drops,
        &mut rng,
        &mut graph,
    );

    // Expected outcome: refusal exactly when some stage or some secret falls below its
    // threshold.
    let u1: Vec<usize> = (0..n).filter(|i| !drops.advertise.contains(i)).collect();
    let minimum = effective_threshold(t, u1.len());
    let ok = graph
        .as_ref()
        .is_some_and(|g| must_complete(g, &u1, &drops, minimum));
    let out = match result {
        Ok(out) => {
            prop_assert!(
                ok,
                "aggregated although some stage or secret lacked its threshold"
            );
            out
        }
        Err(SecAggError::BelowThreshold { .. }) => {
            prop_assert!(
                !ok,
                "refused although every stage and secret had its threshold"
            );
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
    };
    // The host adds exactly the contributors' updates, checking the digests they signed.
    let index: BTreeMap<&DeviceId, usize> = fleet
        .secrets
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id, i))
        .collect();
    let mut agg = Aggregate::new(dim, BodyBits::FULL);
    let mut weight = 0.0;
    let mut want = vec![0f64; dim];
    for id in &out.contributors {
        let i = index[id];
        prop_assert_eq!(out.update_digests[id], digests[i]);
        agg.add(&updates[i]).unwrap();
        let w = samples[i] as f64 / announced as f64;
        weight += w;
        for (acc, v) in want.iter_mut().zip(&values[i]) {
            *acc += w * (*v as f64).clamp(-0.25, 0.25);
        }
    }
    let got = fp.decode_sum(&agg.decrypt(mask_seed, &out.key_sum).unwrap(), weight);
    // SECURITY.md bound for the contributors, divided by their total weight, plus f32.
    let c = out.contributors.len() as f64;
    let ulps = c * ((1u64 << crate::params::NOISE_TUNIFORM_LOG2) as f64 + 2f64.powi(31)) + c / 2.0;
    let bound = ulps * fp.ulp() / weight + f32::EPSILON as f64 * 0.25;
    for (g, w) in got.iter().zip(&want) {
        let mean = w / weight;
        prop_assert!(
            (*g as f64 - mean).abs() <= bound,
            "decrypted {g}, weighted mean {mean}, bound {bound}"
        );
    }
    Ok(())
}

/// Random drops: each client drops with probability 1/4, at a uniformly chosen stage.
fn drops_strategy(n: usize) -> impl Strategy<Value = Drops> {
    proptest::collection::vec(0usize..20, n).prop_map(|stage_of| {
        let mut d = Drops::default();
        for (i, s) in stage_of.into_iter().enumerate() {
            match s {
                0 => d.advertise.insert(i),
                1 => d.shares.insert(i),
                2 => d.input.insert(i),
                3 => d.consistency.insert(i),
                4 => d.unmask.insert(i),
                _ => true, // stays to the end
            };
        }
        d
    })
}

/// A Harary policy for `n` clients: an even degree below n - 1 and a threshold up to the
/// degree plus one, from two uniform draws.
fn sparse_policy(n: usize, a: u32, b: u32) -> GraphPolicy {
    let max_half = ((n.saturating_sub(2)) / 2).max(1) as u32;
    let degree = 2 * (1 + a % max_half);
    harary(degree, 2 + b % degree)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn decrypted_aggregate_is_the_weighted_mean_of_the_contributors(
        (n, t, drops) in (2usize..=64).prop_flat_map(|n| (Just(n), 2..=n, drops_strategy(n))),
        dim in 1usize..(3 * POLYNOMIAL_SIZE),
        seed in any::<u64>(),
    ) {
        pipeline(n, t, GraphPolicy::Complete, dim, drops, seed)?;
    }

    #[test]
    fn over_a_harary_graph_the_aggregate_is_exact_or_refused_below_its_tolerance(
        (n, drops) in (6usize..=48).prop_flat_map(|n| (Just(n), drops_strategy(n))),
        (a, b) in (any::<u32>(), any::<u32>()),
        dim in 1usize..(2 * POLYNOMIAL_SIZE),
        seed in any::<u64>(),
    ) {
        pipeline(n, 2, sparse_policy(n, a, b), dim, drops, seed)?;
    }

    #[test]
    fn dropouts_up_to_n_minus_t_always_complete(
        (n, t, drops) in (2usize..=24).prop_flat_map(|n| (Just(n), 2..=n, drops_strategy(n))),
        seed in any::<u64>(),
    ) {
        // Keep at most n - t' drops, where t' is the threshold in force: the round must
        // complete (the property above also covers the refusals).
        let mut drops = drops;
        let all: Vec<usize> = drops.advertise.iter().chain(&drops.shares).chain(&drops.input)
            .chain(&drops.consistency).chain(&drops.unmask).copied().collect();
        let u1 = n - drops.advertise.len();
        let allowed = u1.saturating_sub(effective_threshold(t, u1));
        for i in all.into_iter().skip(allowed + drops.advertise.len()) {
            drops.shares.remove(&i);
            drops.input.remove(&i);
            drops.consistency.remove(&i);
            drops.unmask.remove(&i);
        }
        prop_assume!(u1 >= effective_threshold(t, u1));
        pipeline(n, t, GraphPolicy::Complete, 100, drops, seed)?;
    }

    #[test]
    fn a_harary_round_survives_dropouts_within_every_neighbourhood_tolerance(
        n in 12usize..=40,
        seed in any::<u64>(),
        late in 0usize..4,
    ) {
        // Degree 8, threshold 4: every member keeps 5 of its 9 holders through up to 4
        // dropouts anywhere after the roster; drop 4 members at one stage after sharing.
        let mut drops = Drops::default();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut chosen = BTreeSet::new();
        while chosen.len() < 4 {
            chosen.insert(rng.random_range(0..n));
        }
        let stage = match late {
            0 => &mut drops.input,
            1 => &mut drops.consistency,
            2 => &mut drops.unmask,
            _ => &mut drops.shares,
        };
        stage.extend(chosen);
        pipeline(n, 2, harary(8, 4), 64, drops.clone(), seed)?;
        // And the same round completes: the oracle agrees, and so must the run.
        let fleet = fleet(n, &mut rng);
        let inputs = random_inputs(n, 16, &mut rng);
        let digests = vec![[7; 32]; n];
        let cfg = SecAggConfig { graph: harary(8, 4), ..config(2, 2, 16) };
        let out = run(&fleet, cfg, &inputs, &digests, &drops, &mut rng);
        prop_assert!(out.is_ok(), "{:?}", out.err());
    }
}

#[test]
fn masked_inputs_summed_elsewhere_give_the_same_key_sum_and_bad_sums_are_refused() {
    // Six clients; their masked inputs are summed in two groups outside the server (as
    // fold workers' shards do) and recorded as two sums; one client's input never comes.
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let fleet = fleet(6, &mut rng);
    let inputs = random_inputs(6, 32, &mut rng);
    let cfg = config(3, 3, 32);
    let mut server = Server::new(cfg, fleet.registry.clone()).unwrap();
    let mut clients = Vec::new();
    for i in 0..6 {
        let (client, advert) = fleet.client(i, cfg, &mut rng);
        server.receive(advert).unwrap();
        clients.push(client);
    }
    let roster = server.close_advertise().unwrap();
    for c in &mut clients {
        let msg = c.on_roster(&roster, &mut rng).unwrap();
        server.receive(msg).unwrap();
    }
    let deliveries = server.close_shares().unwrap();
    let mut groups = [
        (vec![0u64; 32], BTreeMap::new()),
        (vec![0u64; 32], BTreeMap::new()),
    ];
    for (i, c) in clients.iter_mut().enumerate().take(5) {
        let msg = c
            .on_shares(&deliveries[c.id()], &inputs[i], [i as u8; 32])
            .unwrap();
        server.check(&msg).unwrap();
        let ClientBody::MaskedInput { masked, .. } = &msg.body else {
            panic!("a masked input")
        };
        let (sum, digests) = &mut groups[i % 2];
        for (s, m) in sum.iter_mut().zip(masked) {
            *s = s.wrapping_add(*m);
        }
        digests.insert(fleet.secrets[i].0.clone(), [i as u8; 32]);
    }
    // Refused, changing nothing: a sum of the wrong length, a stranger.
    assert!(matches!(
        server.add_masked_inputs(&groups[0].0[..31], groups[0].1.clone()),
        Err(SecAggError::Malformed(_))
    ));
    let mut stranger = groups[0].1.clone();
    stranger.insert(DeviceId("nobody".into()), [0; 32]);
    assert!(matches!(
        server.add_masked_inputs(&groups[0].0, stranger),
        Err(SecAggError::NotAParticipant(_))
    ));
    server
        .add_masked_inputs(&groups[0].0, groups[0].1.clone())
        .unwrap();
    // The same devices twice: refused.
    assert!(matches!(
        server.add_masked_inputs(&groups[0].0, groups[0].1.clone()),
        Err(SecAggError::Duplicate { .. })
    ));
    server
        .add_masked_inputs(&groups[1].0, groups[1].1.clone())
        .unwrap();
    let survivors = server.close_masked_inputs().unwrap();
    // After the stage, nothing more is added.
    assert!(matches!(
        server.add_masked_inputs(&groups[1].0, BTreeMap::new()),
        Err(SecAggError::OutOfOrder(_))
    ));
    let mut alive = Vec::new();
    for c in clients.iter_mut().take(5) {
        let msg = c.on_survivors(&survivors).unwrap();
        server.receive(msg).unwrap();
        alive.push(c);
    }
    let request = server.close_consistency().unwrap();
    for c in alive {
        let msg = c.on_unmask(&request).unwrap();
        server.receive(msg).unwrap();
    }
    let out = server.close_unmask().unwrap();
    assert_eq!(out.key_sum, sum_of(&inputs, 0..5));
    assert_eq!(out.update_digests[&fleet.secrets[4].0], [4; 32]);
}
