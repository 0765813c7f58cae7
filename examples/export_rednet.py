"""Export RedNet-26 (involution) to ONNX and run it in plain ONNX Runtime and with repconv's native kernel.

Run: python examples/export_rednet.py [--size 112]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import repconv
from repconv import runtime
from repconv.blocks import rednet26


def main(size: int = 112) -> None:
    torch.manual_seed(0)
    model = rednet26(num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = repconv.export_onnx(model, Path(tmp) / "rednet26.onnx", x, dynamic_batch=True, target="onnxruntime")
        nodes = onnx.load(str(path)).graph.node
        print(f"{len(nodes)} nodes, {sum(n.op_type == 'Involution' for n in nodes)} ai.repconv::Involution")
        with torch.no_grad():
            ref = model(x).numpy()
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # embedded ONNX function
        out = plain.run(None, {"input": x.numpy()})[0]
        print(f"plain ONNX Runtime: max |err| {np.abs(out - ref).max():.2e}")
        if runtime.native_library() is not None:
            native = runtime.inference_session(str(path))  # repconv's C++ kernel registered
            out = native.run(None, {"input": x.numpy()})[0]
            print(f"native kernel:      max |err| {np.abs(out - ref).max():.2e}")
        else:
            print("native kernel not built (python -m repconv.runtime.build)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=112)
    main(p.parse_args().size)
