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
    let out = match &args.adapter {
        Some(dir) => {
            let lora = Lora::load_peft(dir, &model)?;
            model.generate(&lora, &ids, args.max_new, tok.eos_id, &sampling)
        }
        None => model.generate(
            &fedshield_edge::llama::NoAdapter,
            &ids,
            args.max_new,
            tok.eos_id,
            &sampling,
        ),
    };
    println!("{}", tok.decode(&out)?);
    Ok(())
}
