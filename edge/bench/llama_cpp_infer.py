"""llama.cpp's side of the inference benchmark (edge/examples/infer_bench.rs).

Runs the GGUF with llama-cpp-python (llama.cpp built from source by
`scripts/setup.sh --bench`): the prompt's token ids in one batch, then greedy decoding of
--new tokens one at a time (argmax of the logits, end-of-sequence ignored), the same loop
as ours. Prints one JSON line: decode tokens/s, prefill and first-token milliseconds,
peak RSS.
"""

import argparse
import json
import resource
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--new", type=int, default=128)
    a = p.parse_args()
    ids = json.load(open(a.ids))
    llm = Llama(
        model_path=a.gguf,
        n_ctx=len(ids) + a.new + 8,
        n_batch=len(ids),
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )

    vocab = llm.n_vocab()

    def last_logits():
        # The last evaluated token's logits (llama.cpp computes only those here).
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def run(new: int):
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - started
        out = []
        first = None
        while len(out) < new:
            token = int(np.argmax(last_logits()))
            if first is None:
                first = time.perf_counter() - started
            out.append(token)
            if len(out) < new:
                llm.eval([token])
        total = time.perf_counter() - started
        return prefill, first, total, out

    run(8)  # warm-up
    prefill, first, total, out = run(a.new)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "threads": a.threads,
                "new_tokens": len(out),
                "prefill_ms": prefill * 1e3,
                "first_token_ms": first * 1e3,
                "decode_tokens_per_s": (len(out) - 1) / (total - first),
                "peak_rss_mib": peak,
                "tokens": out,
            }
        )
    )


if __name__ == "__main__":
    main()
