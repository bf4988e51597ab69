#!/usr/bin/env python3
"""Writes models/fixtures/quant_types.gguf and models/fixtures/quant_types.json: one small
tensor of every GGML type the Rust GGUF reader supports (F32, F16, BF16, Q8_0, Q4_0, Q4_1),
quantized and dequantized by the `gguf` package (llama.cpp's reference Python
implementation), plus metadata of every value kind. The Rust tests parse the file and must
reproduce the reference's dequantized values exactly.

    .deps/venv/bin/pip install gguf==0.19.0 && .deps/venv/bin/python models/scripts/make_gguf_fixture.py
"""
import json
import pathlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures"


def main() -> None:
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(OUT / "quant_types.gguf"), "llama")
    w.add_uint32("test.u32", 4242)
    w.add_int32("test.i32", -7)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "grüße")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.ints", [1, 2, 3])
    w.add_uint64("test.u64", 1 << 40)
    reference = {}
    shape = (3, 64)  # 3 rows of 64: two blocks of 32 per row
    for name, qtype in [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16),
                        ("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1)]:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        data[0, :4] = [0.0, 1.0, -1.0, 0.25]
        if qtype == T.F32:
            raw, deq = data, data
        elif qtype == T.F16:
            raw = data.astype(np.float16)
            deq = raw.astype(np.float32)
        else:
            raw = quants.quantize(data, qtype)
            deq = quants.dequantize(raw, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
        reference[name] = {"type": qtype.name, "shape": list(shape),
                           "values": [float(x) for x in np.asarray(deq, dtype=np.float32).ravel()]}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (OUT / "quant_types.json").write_text(json.dumps(reference))
    print("wrote", OUT / "quant_types.gguf", "and quant_types.json")


if __name__ == "__main__":
    main()
