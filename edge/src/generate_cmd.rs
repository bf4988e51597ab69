//! `fedshield-edge generate`: chat with the base model, optionally with an adapter.

use crate::ModelArgs;
use fedshield_edge::llama::Sampling;
use fedshield_edge::lora::Lora;
use fedshield_models::tokenizer::Message;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_new: usize,
    /// Temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the model runs: `torch` (libtorch) or `onnx` (ONNX Runtime, the graph built in
    /// memory from the same GGUF; no adapter yet).
    #[arg(long, default_value = "torch")]
    runtime: String,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (_, _g, tok, model) = args.model.load()?;
    let prompt = tok.chat_prompt(
        &[Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }],
        true,
    );
    let ids = tok.encode(&prompt)?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let out = match (args.runtime.as_str(), &args.adapter) {
        ("onnx", Some(_)) => {
            anyhow::bail!("--runtime onnx does not take an adapter yet: use --runtime torch")
        }
        ("onnx", None) => {
            let env = fedshield_edge::inference::environment(&fedshield_models::Assets::locate())?;
            let mut decoder = fedshield_edge::onnx_graph::OnnxDecoder::new(
                env,
                &model,
                ids.len() + args.max_new,
            )?;
            decoder.generate(&ids, args.max_new, tok.eos_id, &sampling)?
        }
        ("torch", Some(dir)) => {
            let lora = Lora::load_peft(dir, &model)?;
            model.generate(&lora, &ids, args.max_new, tok.eos_id, &sampling)
        }
        ("torch", None) => model.generate(
            &fedshield_edge::llama::NoAdapter,
            &ids,
            args.max_new,
            tok.eos_id,
            &sampling,
        ),
        (other, _) => anyhow::bail!("--runtime {other:?}: expected torch or onnx"),
    };
    println!("{}", tok.decode(&out)?);
    Ok(())
}
