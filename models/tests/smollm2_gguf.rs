//! The fetched SmolLM2-135M-Instruct Q4_1 GGUF reads and dequantizes exactly as llama.cpp's
//! reference reader (`gguf` Python package) does: metadata, tensor types and shapes, values.
//! Reference: models/fixtures/smollm2_gguf_reference.json (models/scripts/smollm2_reference.py).

use fedshield_models::Assets;
use fedshield_models::gguf::{Gguf, Value};
use std::collections::BTreeMap;

#[test]
fn smollm2_matches_the_reference_reader() {
    let path = Assets::locate()
        .smollm2_gguf()
        .expect("run scripts/setup.sh");
    let g = Gguf::open(&path).unwrap();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/smollm2_gguf_reference.json"),
    )
    .unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();

    assert_eq!(
        g.tensors.len() as u64,
        reference["tensor_count"].as_u64().unwrap()
    );
    let mut types = BTreeMap::<String, u64>::new();
    for t in &g.tensors {
        *types.entry(t.ggml_type.name().to_owned()).or_default() += 1;
    }
    for (name, count) in reference["types"].as_object().unwrap() {
        assert_eq!(types[name], count.as_u64().unwrap(), "type {name}");
    }
    for (key, want) in reference["metadata"].as_object().unwrap() {
        let got = g.get(key).unwrap();
        match (got, want) {
            (Value::String(s), serde_json::Value::String(w)) => assert_eq!(s, w, "{key}"),
            (Value::UInt(v), w) => assert_eq!(*v, w.as_u64().unwrap(), "{key}"),
            (Value::Float(v), w) => assert_eq!(*v, w.as_f64().unwrap(), "{key}"),
            other => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(
        g.get_strings("tokenizer.ggml.tokens").unwrap().len() as u64,
        reference["vocab_size"].as_u64().unwrap()
    );
    for (name, want) in reference["tensors"].as_object().unwrap() {
        let info = g.tensor(name).unwrap();
        assert_eq!(
            info.ggml_type.name(),
            want["type"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<i64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(info.shape(), shape, "{name}");
        let values = g.dequantize(name).unwrap();
        let first: Vec<f32> = want["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&values[..first.len()], &first[..], "{name}");
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let want_sum = want["sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-9 * values.len() as f64,
            "{name}: sum {sum} vs {want_sum}"
        );
    }
}
