#!/usr/bin/env python3
"""Writes the tiny random Llama reference fixtures (models/fixtures/tiny_llama/):

- model.gguf: a 2-layer Llama with grouped-query attention (4 heads, 2 KV heads), F32,
  written the way llama.cpp's converter writes Hugging Face checkpoints (Q and K rows
  permuted for interleaved RoPE);
- adapter/: a PEFT LoRA adapter (r=4, alpha=8, all seven projections) with non-zero A and B,
  saved by PEFT itself;
- reference.json: what Hugging Face transformers + PEFT compute on a fixed batch: logits
  without and with the adapter, the training loss (response tokens only) and the gradient of
  every LoRA tensor.

The HF checkpoint itself is only built in memory. Rust must match within 1e-4 (f32).

    .deps/venv/bin/pip install transformers==4.57.1 peft==0.17.1 gguf==0.19.0
    .deps/venv/bin/python models/scripts/make_tiny_llama.py
"""
import json
import pathlib

import numpy as np
import torch
import gguf
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "tiny_llama"
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV = 64, 32, 64, 2, 4, 2
THETA, EPS = 10000.0, 1e-5


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV, rms_norm_eps=EPS, rope_theta=THETA,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      attn_implementation="eager", torch_dtype=torch.float32)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights
            else:
                p.copy_(0.2 * torch.randn_like(p))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(OUT / "model.gguf"), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], KV))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ids = torch.tensor([[5, 17, 3, 42, 8, 60, 1, 33, 12, 7],
                        [9, 2, 55, 14, 30, 4, 27, 61, 18, 11]])
    labels = ids.clone()
    labels[:, :5] = -100  # loss on the second half only
    with torch.no_grad():
        base_logits = model(ids).logits

    lora_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora_cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))  # PEFT starts B at 0; make it matter
    peft_model.save_pretrained(str(OUT / "adapter"))
    (OUT / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    peft_model.train()  # dropout is 0: train mode changes nothing but enables grads
    out = peft_model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            grads[key] = {"shape": list(p.grad.shape), "values": p.grad.flatten().tolist()}
    reference = {
        "ids": ids.tolist(),
        "labels": labels.tolist(),
        "base_logits": base_logits.flatten().tolist(),
        "lora_logits": out.logits.detach().flatten().tolist(),
        "loss": out.loss.item(),
        "grads": grads,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }
    (OUT / "reference.json").write_text(json.dumps(reference))
    print("wrote", OUT, "loss", out.loss.item())


if __name__ == "__main__":
    main()
