//! Training data: instruction JSONL (alpaca fields, or the FAQ's q/a/category), plain text,
//! and the federated split of the FAQ by category with a held-out evaluation set.

use std::collections::BTreeMap;
use std::path::Path;

/// Errors reading data files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not a valid record.
    #[error("{path}:{line}: {reason}")]
    Record {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The split cannot be made (too few examples or categories).
    #[error("cannot split: {0}")]
    Split(String),
}

/// One instruction-following example.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// Stable id (the FAQ's `id`, or the line number).
    pub id: String,
    /// The instruction (question).
    pub instruction: String,
    /// Optional input appended to the instruction.
    pub input: String,
    /// The response the model learns.
    pub output: String,
    /// Category, when the data has one.
    pub category: Option<String>,
}

impl Example {
    /// The user turn: the instruction, and the input after a blank line if there is one.
    pub fn user_text(&self) -> String {
        if self.input.trim().is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n\n{}", self.instruction, self.input)
        }
    }
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads instruction JSONL: each line an object with either alpaca fields (`instruction`,
/// optional `input`, `output`) or FAQ fields (`q`, `a`, optional `category` and `id`).
/// Blank lines are skipped; any other bad line is an error naming it.
pub fn read_instruction_jsonl(path: &Path) -> Result<Vec<Example>, DataError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| DataError::Record {
            path: path.display().to_string(),
            line: i + 1,
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let (instruction, output) = match (
            field("instruction"),
            field("output"),
            field("q"),
            field("a"),
        ) {
            (Some(q), Some(a), _, _) | (_, _, Some(q), Some(a)) => (q, a),
            _ => return Err(err("needs instruction/output or q/a string fields".into())),
        };
        if instruction.trim().is_empty() || output.trim().is_empty() {
            return Err(err("empty instruction or output".into()));
        }
        out.push(Example {
            id: field("id").unwrap_or_else(|| format!("line-{}", i + 1)),
            instruction,
            input: field("input").unwrap_or_default(),
            output,
            category: field("category"),
        });
    }
    Ok(out)
}

/// Reads plain text as documents: separated by lines holding only `%` (the fortunes format)
/// or by blank lines.
pub fn read_plain_text(path: &Path) -> Result<Vec<String>, DataError> {
    let text = read(path)?;
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim() == "%" || line.trim().is_empty() {
            if !current.trim().is_empty() {
                docs.push(std::mem::take(&mut current).trim_end().to_owned());
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.trim().is_empty() {
        docs.push(current.trim_end().to_owned());
    }
    Ok(docs)
}

/// The federated split: each client's examples, and the held-out evaluation set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Examples of each client.
    pub clients: Vec<Vec<Example>>,
    /// Held-out examples (no client trains on them).
    pub eval: Vec<Example>,
}

/// FNV-1a of a string mixed with a seed: a stable, platform-independent hash.
fn stable_hash(s: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Splits `examples` across `clients` by category (non-IID, as real fleets are: each
/// category goes to one client, largest categories first to the client with the fewest
/// examples), after holding out about `eval_fraction` of every category for evaluation
/// (chosen by a seeded hash of the example id, so the split is stable). Examples without a
/// category form one category.
pub fn split_by_category(
    examples: &[Example],
    clients: usize,
    eval_fraction: f64,
    seed: u64,
) -> Result<Split, DataError> {
    if clients == 0 || !(0.0..1.0).contains(&eval_fraction) {
        return Err(DataError::Split(format!(
            "need at least one client and an eval fraction in [0, 1), got {clients} and {eval_fraction}"
        )));
    }
    let mut by_category: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for e in examples {
        by_category
            .entry(e.category.clone().unwrap_or_default())
            .or_default()
            .push(e.clone());
    }
    if by_category.len() < clients {
        return Err(DataError::Split(format!(
            "{} categories for {clients} clients",
            by_category.len()
        )));
    }
    let mut eval = Vec::new();
    let mut train: Vec<(String, Vec<Example>)> = Vec::new();
    for (category, mut items) in by_category {
        items.sort_by_key(|e| stable_hash(&e.id, seed));
        let held = ((items.len() as f64 * eval_fraction).round() as usize).min(items.len() - 1);
        eval.extend(items.drain(..held));
        train.push((category, items));
    }
    train.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let mut out: Vec<Vec<Example>> = vec![Vec::new(); clients];
    for (_, items) in train {
        let smallest = (0..clients)
            .min_by_key(|&c| (out[c].len(), c))
            .expect("clients > 0");
        out[smallest].extend(items);
    }
    eval.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Split { clients: out, eval })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, cat: &str) -> Example {
        Example {
            id: id.into(),
            instruction: format!("q {id}"),
            input: String::new(),
            output: format!("a {id}"),
            category: Some(cat.into()),
        }
    }

    #[test]
    fn split_is_by_category_disjoint_stable_and_balanced() {
        let mut all = Vec::new();
        for (cat, n) in [("a", 20), ("b", 12), ("c", 10), ("d", 6), ("e", 5)] {
            all.extend((0..n).map(|i| ex(&format!("{cat}-{i}"), cat)));
        }
        let s = split_by_category(&all, 3, 0.1, 7).unwrap();
        assert_eq!(s, split_by_category(&all, 3, 0.1, 7).unwrap());
        let total: usize = s.clients.iter().map(Vec::len).sum::<usize>() + s.eval.len();
        assert_eq!(total, all.len());
        // Every category's training examples sit with one client only.
        for cat in ["a", "b", "c", "d", "e"] {
            let owners = s
                .clients
                .iter()
                .filter(|c| c.iter().any(|e| e.category.as_deref() == Some(cat)))
                .count();
            assert_eq!(owners, 1, "category {cat}");
            assert!(s.eval.iter().any(|e| e.category.as_deref() == Some(cat)) || cat == "e");
        }
        // No evaluation example is trained on.
        for e in &s.eval {
            assert!(s.clients.iter().all(|c| !c.contains(e)));
        }
        let sizes: Vec<usize> = s.clients.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&n| n >= 10), "{sizes:?}");
        assert!(split_by_category(&all, 6, 0.1, 7).is_err());
        assert!(split_by_category(&all, 2, 1.5, 7).is_err());
    }

    #[test]
    fn bad_lines_name_their_line_number() {
        let dir = tempfile_dir();
        let path = dir.join("bad.jsonl");
        std::fs::write(
            &path,
            "{\"instruction\":\"x\",\"output\":\"y\"}\n\n{\"nope\":1}\n",
        )
        .unwrap();
        let err = read_instruction_jsonl(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(":3: needs instruction/output or q/a string fields"),
            "{err}"
        );
        std::fs::write(&path, "%\nfirst\nfortune\n%\nsecond\n%\n").unwrap();
        assert_eq!(
            read_plain_text(&path).unwrap(),
            ["first\nfortune", "second"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fedshield-data-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
