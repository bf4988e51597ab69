//! The tokenizer of a GGUF model, built from its metadata with the `tokenizers` crate, and the
//! ChatML chat template.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers of
//! SmolLM / StarCoder-style vocabularies: every digit on its own, then GPT-2's byte-level
//! split. Tokens of type 3 (control) are special tokens, matched before BPE.

use crate::gguf::{Gguf, GgufError, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// GGUF token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: u64 = 3;

/// Errors building or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Metadata missing or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tokenizer kind or pre-tokenizer this code does not build.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// The tokenizers crate refused the vocabulary or an input.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    /// End-of-sequence token id (`tokenizer.ggml.eos_token_id`).
    pub eos_id: u32,
    /// Beginning-of-sequence token id.
    pub bos_id: u32,
    default_system: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.model = {model:?} (only byte-level BPE, \"gpt2\", is built)"
            )));
        }
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let split_digits = match pre {
            "smollm" | "starcoder" | "refact" => true,
            "gpt2" | "default" => false,
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.pre = {other:?}"
                )));
            }
        };
        let tokens = g.get_strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type")? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => *i as u64,
                    Value::UInt(u) => *u,
                    _ => u64::MAX,
                })
                .collect(),
            _ => {
                return Err(TokenizerError::Unsupported(
                    "token_type is not an array".into(),
                ));
            }
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Unsupported(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let merges = g
            .get_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::Unsupported(format!("merge {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = if split_digits {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(tok, _)| AddedToken::from((*tok).to_owned(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |key: &str| g.get_u64(key).map(|v| v as u32);
        let default_system = g
            .get_str("tokenizer.chat_template")
            .ok()
            .and_then(default_system_prompt);
        Ok(Self {
            vocab_size: tokens.len(),
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            inner,
            default_system,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text`; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens included as written).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(TokenizerError::Tokenizers(format!(
                "token id {bad} out of range"
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// The id of one token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// ChatML rendering of `messages`, as the model's chat template does it: a default
    /// system message first if the conversation has none, each message as
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, and with `add_generation_prompt` the
    /// opening of the assistant's turn.
    pub fn chat_prompt(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        if let Some(system) = &self.default_system
            && messages.first().is_none_or(|m| m.role != "system")
        {
            out.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        for m in messages {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }
}

/// The default system prompt a ChatML template inserts, if it has one.
fn default_system_prompt(template: &str) -> Option<String> {
    let start = template.find("'<|im_start|>system\n")? + "'<|im_start|>system\n".len();
    let end = template[start..].find("<|im_end|>")? + start;
    Some(template[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_system_prompt_is_read_from_the_template() {
        let t = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are X<|im_end|>\n' }}{% endif %}";
        assert_eq!(default_system_prompt(t).as_deref(), Some("You are X"));
        assert_eq!(default_system_prompt("{{ messages }}"), None);
    }
}
