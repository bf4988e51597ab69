"""Writes models/fixtures/tiny_mlp.onnx: y = W2 relu(W1 x + b1) + b2 with fixed weights.

Run with the project's venv: .deps/venv/bin/python models/scripts/make_tiny_onnx.py
It prints the output for the input used by the Rust smoke test, computed with onnxruntime,
so the expected values in edge/tests/ort_smoke.rs can be checked against a second runtime.
"""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

W1 = np.array([[0.5, -0.25, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-1.0, 0.5, 0.25, 2.0]], np.float32)
B1 = np.array([0.1, -0.2, 0.05], np.float32)
W2 = np.array([[1.0, -1.0, 0.5], [0.25, 0.75, -0.5]], np.float32)
B2 = np.array([0.0, 1.0], np.float32)

out = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "tiny_mlp.onnx"
graph = helper.make_graph(
    [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1),
    ],
    "tiny_mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    [numpy_helper.from_array(a, n) for a, n in [(W1, "w1"), (B1, "b1"), (W2, "w2"), (B2, "b2")]],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fedshield")
model.ir_version = 8
onnx.checker.check_model(model)
out.write_bytes(model.SerializeToString())

x = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 0.5]], np.float32)
ref = np.maximum(x @ W1.T + B1, 0) @ W2.T + B2
try:
    import onnxruntime as ort

    y = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert np.allclose(y, ref, atol=1e-6)
except ImportError:
    y = ref
print(f"wrote {out} ({out.stat().st_size} bytes); y = {y.tolist()}")
