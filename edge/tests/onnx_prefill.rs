//! The base model as an ONNX Runtime graph built in memory (`fedshield_edge::onnx_graph`)
//! computes the same logits as the libtorch model: the tiny F32 fixture and SmolLM2-135M
//! with its 4-bit (Q4_1) projections as MatMulNBits.

use fedshield_edge::inference::environment;
use fedshield_edge::llama::Llama;
use fedshield_edge::onnx_graph::prefill_session;
use fedshield_models::Assets;
use fedshield_models::gguf::Gguf;
use std::path::PathBuf;

fn compare(model: &Llama, ids: &[i64], tolerance: f64) -> f64 {
    let assets = Assets::locate();
    let env = environment(&assets).unwrap();
    let t = ids.len();
    let mut session = prefill_session(env, model, t).unwrap();
    let input = ort::value::Tensor::from_array(([1i64, t as i64], ids.to_vec())).unwrap();
    let out = session.run(ort::inputs!["ids" => input]).unwrap();
    let got = out["logits"]
        .try_extract_tensor::<f32>()
        .unwrap()
        .1
        .to_vec();
    let want: Vec<f32> = tch::no_grad(|| {
        let logits = model.forward(&tch::Tensor::from_slice(ids).unsqueeze(0));
        Vec::try_from(logits.flatten(0, -1)).unwrap()
    });
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() as f64)
        .fold(0.0, f64::max);
    assert!(worst <= tolerance, "largest logit difference {worst}");
    // The same next tokens.
    let vocab = model.config.vocab_size;
    let argmax = |v: &[f32], i: usize| {
        (0..vocab)
            .max_by(|&a, &b| v[i * vocab + a].total_cmp(&v[i * vocab + b]))
            .unwrap()
    };
    for i in 0..t {
        assert_eq!(argmax(&got, i), argmax(&want, i), "position {i}");
    }
    worst
}

#[test]
fn the_tiny_f32_model_gives_the_same_logits() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fixtures/tiny_llama/model.gguf");
    let model = Llama::from_gguf(&Gguf::open(&path).unwrap(), tch::Device::Cpu).unwrap();
    let worst = compare(&model, &[1, 5, 9, 2, 7, 3, 11], 1e-4);
    eprintln!("tiny: largest logit difference {worst:.2e}");
}

#[test]
fn smollm2_with_4_bit_projections_gives_the_same_logits() {
    let path = Assets::locate().smollm2_gguf().unwrap();
    let model = Llama::from_gguf(&Gguf::open(&path).unwrap(), tch::Device::Cpu).unwrap();
    // Ten token ids of SmolLM2's vocabulary.
    let ids = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
    let worst = compare(&model, &ids, 1e-3);
    eprintln!("SmolLM2: largest logit difference {worst:.2e}");
}

/// Greedy decoding through the KV-cached graph (the prompt in one run, then a token per
/// run) gives the same tokens as libtorch's cached greedy decoding.
#[test]
fn smollm2_decodes_the_same_greedy_tokens_with_a_kv_cache() {
    use fedshield_edge::llama::Sampling;
    use fedshield_edge::onnx_graph::OnnxDecoder;
    let path = Assets::locate().smollm2_gguf().unwrap();
    let model = Llama::from_gguf(&Gguf::open(&path).unwrap(), tch::Device::Cpu).unwrap();
    let env = environment(&Assets::locate()).unwrap();
    let g = Gguf::open(&path).unwrap();
    let tok = fedshield_models::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let prompt = tok
        .encode(&tok.chat_prompt(
            &[fedshield_models::tokenizer::Message {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        ))
        .unwrap();
    let new_tokens = 5;
    let started = std::time::Instant::now();
    let want = model.generate_greedy(&prompt, new_tokens, u32::MAX);
    let torch_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let options = fedshield_edge::onnx_graph::DecodeOptions {
        max_positions: 64,
        lora: Vec::new(),
        precision: fedshield_edge::onnx_graph::Precision::Exact,
        ops: fedshield_edge::onnx_graph::Ops::Ort,
        float: fedshield_edge::onnx_graph::Float::F32,
    };
    let mut decoder = OnnxDecoder::new(env, &model, &options, None, 2).unwrap();
    let got = decoder
        .generate(&prompt, new_tokens, u32::MAX, &Sampling::greedy())
        .unwrap();
    let ort_s = started.elapsed().as_secs_f64();
    assert_eq!(got.len(), new_tokens);
    assert_eq!(got, want, "greedy tokens");
    eprintln!(
        "{} prompt + {new_tokens} new tokens: libtorch {torch_s:.2} s, ONNX Runtime (graph build included) {ort_s:.2} s",
        prompt.len()
    );
}
