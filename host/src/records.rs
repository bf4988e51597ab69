//! The host's records on disk besides `state.bin`: the round journal, appended as the round
//! goes, and the audit files of decrypted sums.

use anyhow::Context;
use fedshield_crypto::params::BodyBits;
use fedshield_protocol::host::RoundResult;
use fedshield_protocol::journal::Entry;

/// The round journal on disk (see `fedshield_protocol::journal`). Each record is one
/// `write` to the kernel, so a killed host loses at most the record being written (a torn
/// tail, ignored on reading); phase changes are also fsynced.
pub struct JournalFile(std::fs::File, u64);

impl JournalFile {
    pub fn create(path: &std::path::Path, start: &Entry) -> anyhow::Result<Self> {
        // Owner-only, like the device key files: it holds the round's uploads.
        let mut file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
        let record = start.to_record();
        std::io::Write::write_all(&mut file, &record)?;
        Ok(Self(file, record.len() as u64))
    }

    /// Opens a journal for appending after its first `valid` bytes (a torn tail is cut).
    pub fn reopen(path: &std::path::Path, valid: u64) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(valid)?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        Ok(Self(file, valid))
    }

    /// Replaces the journal at `path` with `entries` atomically (a temporary file, synced,
    /// renamed over it) and opens it for appending: a host killed during the rewrite finds
    /// either the old journal or the new one, both of which replay to the same round.
    pub fn rewrite(path: &std::path::Path, entries: &[Entry]) -> anyhow::Result<Self> {
        let bytes: Vec<u8> = entries.iter().flat_map(Entry::to_record).collect();
        fedshield_store::write_atomic(path, &bytes, fedshield_store::Access::Private)?;
        Self::reopen(path, bytes.len() as u64)
    }

    pub fn append(&mut self, entry: &Entry) -> anyhow::Result<()> {
        let record = entry.to_record();
        std::io::Write::write_all(&mut self.0, &record).context("writing the journal")?;
        self.1 += record.len() as u64;
        Ok(())
    }

    /// The journal's size, bytes.
    pub fn len(&self) -> u64 {
        self.1
    }

    pub fn sync(&self) -> anyhow::Result<()> {
        self.0.sync_data().context("syncing the journal")
    }
}

/// Writes a round's decrypted sums and contributors to `dir/round-{r}.json`.
pub fn write_audit(
    dir: &std::path::Path,
    result: &RoundResult,
    body_bits: BodyBits,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("round-{}.json", result.round));
    std::fs::write(
        &path,
        serde_json::to_string(&serde_json::json!({
            "round": result.round,
            "contributors": result.contributors,
            "total_weight": result.total_weight,
            "body_bits": body_bits,
            "sums": result.sums,
        }))?,
    )
    .with_context(|| format!("writing {}", path.display()))
}
