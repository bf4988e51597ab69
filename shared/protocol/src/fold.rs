//! Uploads on their way into an encrypted running sum: manifests and chunks collected per
//! device, checked against what the device signed, and handed over as one encrypted update
//! once complete. Both folders run it: the host's round when it folds uploads itself
//! ([`crate::host::HostRound`]) and a fold worker that folds one shard of them
//! ([`crate::shard::FoldWorker`]).

use crate::messages::{Chunk, Manifest, RoundConfig, UploadRefusal};
use crate::{ProtocolError, Refusal};
use fedshield_crypto::identity::{DeviceId, Registry};
use fedshield_crypto::packed::{BodyBits, EncryptedUpdate};
use fedshield_crypto::secagg::update_digest;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
struct Upload {
    manifest: Option<Manifest>,
    chunks: BTreeMap<u32, Vec<u8>>,
}

impl Upload {
    fn is_complete(&self) -> bool {
        self.manifest
            .as_ref()
            .is_some_and(|m| self.chunks.len() == m.chunk_hashes.len())
    }
}

/// The uploads of one round still in flight. Memory: the chunks received of uploads not yet
/// complete or not yet folded.
#[derive(Debug)]
pub struct Uploads {
    round: u64,
    selected: usize,
    body_bits: BodyBits,
    chunk_bytes: usize,
    in_flight: BTreeMap<DeviceId, Upload>,
}

impl Uploads {
    /// No uploads yet, of the round `config`.
    pub fn new(config: &RoundConfig) -> Self {
        Self {
            round: config.round,
            selected: config.selected,
            body_bits: config.body_bits,
            chunk_bytes: config.chunk_bytes,
            in_flight: BTreeMap::new(),
        }
    }

    /// A manifest's round and signature, checked before anything else: a replayed or
    /// forged manifest is refused as what it is (a security event), not as late or early.
    pub fn check_manifest(
        &self,
        registry: &Registry,
        from: &DeviceId,
        m: &Manifest,
    ) -> Result<(), ProtocolError> {
        if m.round != self.round {
            return Err(Refusal::WrongRound {
                what: "manifest",
                got: m.round,
            }
            .into());
        }
        let key = registry.enrolment(from)?.public_key;
        if !fedshield_crypto::identity::verify(&key, &m.signed_bytes(from), &m.signature) {
            return Err(Refusal::ManifestSignature(from.clone()).into());
        }
        Ok(())
    }

    /// Records a manifest already checked ([`Uploads::check_manifest`]) of a device the
    /// caller expects an upload from: it must announce exactly the round's size (the
    /// postcard encoding of an update of `selected` values); a QoS 1 duplicate is
    /// accepted, a second, different manifest refused.
    pub fn on_manifest(&mut self, from: &DeviceId, m: Manifest) -> Result<(), ProtocolError> {
        let expected = expected_update_bytes(self.selected, self.body_bits);
        let chunks = expected.div_ceil(self.chunk_bytes as u64);
        if m.total_bytes != expected || m.chunk_hashes.len() as u64 != chunks {
            return Err(Refusal::ManifestSize {
                device: from.clone(),
                bytes: m.total_bytes,
                chunks: m.chunk_hashes.len(),
                expected,
                expected_chunks: chunks,
            }
            .into());
        }
        let upload = self.in_flight.entry(from.clone()).or_default();
        match &upload.manifest {
            Some(old) if *old == m => Ok(()), // a QoS 1 duplicate
            Some(_) => Err(Refusal::SecondManifest(from.clone()).into()),
            None => {
                upload.manifest = Some(m);
                Ok(())
            }
        }
    }

    /// Records a chunk: of the round, after its manifest, of the length and hash the
    /// manifest gives it.
    pub fn on_chunk(&mut self, from: &DeviceId, c: Chunk) -> Result<(), ProtocolError> {
        if c.round != self.round {
            return Err(Refusal::WrongRound {
                what: "chunk",
                got: c.round,
            }
            .into());
        }
        let chunk_bytes = self.chunk_bytes;
        let upload = self
            .in_flight
            .get_mut(from)
            .filter(|u| u.manifest.is_some())
            .ok_or_else(|| Refusal::ChunkBeforeManifest(from.clone()))?;
        let m = upload.manifest.as_ref().expect("filtered");
        let hash = m
            .chunk_hashes
            .get(c.index as usize)
            .ok_or(Refusal::ChunkIndex(c.index))?;
        let want_len = chunk_bytes.min(m.total_bytes as usize - c.index as usize * chunk_bytes);
        if c.bytes.len() != want_len || <[u8; 32]>::from(Sha256::digest(&c.bytes)) != *hash {
            return Err(Refusal::ChunkMismatch {
                device: from.clone(),
                index: c.index,
            }
            .into());
        }
        upload.chunks.insert(c.index, c.bytes);
        Ok(())
    }

    /// Whether `from`'s manifest and every chunk of it are here.
    pub fn is_complete(&self, from: &DeviceId) -> bool {
        self.in_flight.get(from).is_some_and(Upload::is_complete)
    }

    /// Whether anything of `from`'s upload is here.
    pub fn contains(&self, from: &DeviceId) -> bool {
        self.in_flight.contains_key(from)
    }

    /// Takes `from`'s complete upload (`None` while it is not): the encrypted update and
    /// its bytes on the wire, or why it cannot be folded. `signed_digest` is the digest its
    /// device signed with its masked input: the chunks, the manifest and the masked input
    /// must agree, and the bytes must decode as an update of the round's shape.
    pub fn take(
        &mut self,
        from: &DeviceId,
        signed_digest: [u8; 32],
    ) -> Option<Result<(EncryptedUpdate, u64), UploadRefusal>> {
        if !self.is_complete(from) {
            return None;
        }
        let upload = self.in_flight.remove(from).expect("complete");
        let digest = upload.manifest.as_ref().expect("complete").digest;
        let bytes: Vec<u8> = upload.chunks.into_values().flatten().collect();
        if update_digest(&bytes) != digest || digest != signed_digest {
            return Some(Err(UploadRefusal::DigestMismatch));
        }
        let update = postcard::from_bytes::<EncryptedUpdate>(&bytes)
            .map_err(|e| UploadRefusal::Malformed(format!("does not decode: {e}")))
            .and_then(|u| {
                if u.len != self.selected {
                    Err(UploadRefusal::Malformed(format!("{} values", u.len)))
                } else if u.body_bits != self.body_bits {
                    Err(UploadRefusal::Malformed(format!(
                        "{}-bit bodies",
                        u.body_bits
                    )))
                } else {
                    Ok(u)
                }
            });
        Some(update.map(|u| (u, bytes.len() as u64)))
    }

    /// Drops what is here of `from`'s upload.
    pub fn remove(&mut self, from: &DeviceId) {
        self.in_flight.remove(from);
    }

    /// Drops every upload in flight.
    pub fn clear(&mut self) {
        self.in_flight.clear();
    }
}

/// Bytes of the postcard encoding of an encrypted update of `selected` values with bodies of
/// width `body_bits`.
pub fn expected_update_bytes(selected: usize, body_bits: BodyBits) -> u64 {
    EncryptedUpdate::wire_len(selected, body_bits) as u64
}
