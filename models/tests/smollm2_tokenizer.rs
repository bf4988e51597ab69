//! The tokenizer built from the SmolLM2 GGUF metadata matches Hugging Face transformers' own
//! GGUF tokenizer converter token for token, and renders the chat template identically.
//! Reference: models/fixtures/smollm2_tokenizer_reference.json
//! (models/scripts/tokenizer_reference.py).

use fedshield_models::Assets;
use fedshield_models::gguf::Gguf;
use fedshield_models::tokenizer::{Message, Tokenizer};

fn reference() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/smollm2_tokenizer_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let g = Gguf::open(
        &Assets::locate()
            .smollm2_gguf()
            .expect("run scripts/setup.sh"),
    )
    .unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(
        tok.vocab_size(),
        g.get_strings("tokenizer.ggml.tokens").unwrap().len()
    );
    // Every vocabulary entry maps to its GGUF index.
    for (i, t) in g
        .get_strings("tokenizer.ggml.tokens")
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(tok.token_id(t), Some(i as u32), "token {t:?}");
    }
    let r = reference();
    for case in r["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        assert_eq!(tok.decode(&got).unwrap(), case["decoded"].as_str().unwrap());
    }
    let chat = tok.chat_prompt(&messages(&r["chat"]["messages"]), true);
    assert_eq!(chat, r["chat"]["prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&chat).unwrap(), ids(&r["chat"]["ids"]));
    let with_system = tok.chat_prompt(&messages(&r["chat_with_system"]["messages"]), false);
    assert_eq!(
        with_system,
        r["chat_with_system"]["prompt"].as_str().unwrap()
    );
    assert_eq!(tok.token_id("<|im_end|>"), Some(tok.eos_id));
    assert!(tok.decode(&[u32::MAX]).is_err());
}
