"""Helpers shared by the dynamic-operator tests and benchmarks (not part of the stable API)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx
from torch import Tensor, nn

from repconv.blocks.common import randomize_bn_ as randomize_bn

__all__ = ["assert_deploy_matches", "assert_onnx_matches", "export_dynamic_onnx", "max_rel_err", "ort_session",
           "randomize_bn"]


def max_rel_err(ref: Tensor | np.ndarray, got: Tensor | np.ndarray) -> float:
    """max |ref - got| / max |ref| (the repconv.verify convention)."""
    r = torch.as_tensor(ref, dtype=torch.float64)
    o = torch.as_tensor(got, dtype=torch.float64)
    if r.shape != o.shape:
        raise AssertionError(f"shape mismatch: reference {tuple(r.shape)} vs candidate {tuple(o.shape)}")
    return float((r - o).abs().max() / r.abs().max().clamp_min(1e-30))


def export_dynamic_onnx(module: nn.Module, example: Tensor, path: Path | None = None, *, dynamic_batch: bool = True,
                        use_repconv: bool = True, fuse: bool = True) -> bytes:
    """ONNX bytes of ``module`` (opset 17, batch axis dynamic by default).

    Through ``repconv.export_onnx`` (fuse, custom involution op, simplify, ORT check) when present
    and ``use_repconv`` (``fuse``: its fusion pass, with verification, first); otherwise plain
    ``torch.onnx.export(..., dynamo=False)``.
    """
    module = module.eval()
    if use_repconv:
        try:
            from repconv.export.onnx import export_onnx
        except ImportError:
            export_onnx = None
        if export_onnx is not None:
            if path is None:
                raise ValueError("export_dynamic_onnx: repconv.export_onnx needs a path")
            export_onnx(module, path, example, dynamic_batch=dynamic_batch, fuse=fuse, target="onnxruntime")
            return Path(path).read_bytes()
    buf = io.BytesIO()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes=axes)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def ort_session(model: bytes | str | Path, threads: int = 0):  # noqa: ANN201 - onnxruntime type
    """A plain CPU ``onnxruntime.InferenceSession`` (``threads=0``: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def assert_deploy_matches(train: nn.Module, deploy: nn.Module, shape: tuple[int, ...],
                          batches: tuple[int, ...] = (1, 4), tol: float = 1e-5, seed: int = 0) -> None:
    """``deploy`` equals ``train`` (eval) at each batch size, and so does its fx-traced copy."""
    train.eval()
    deploy.eval()
    traced = torch.fx.symbolic_trace(deploy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *shape, generator=g)
            ref = train(x)
            err = max_rel_err(ref, deploy(x))
            assert err < tol, f"{type(deploy).__name__} vs {type(train).__name__} at batch {b}: rel err {err:.2e}"
            err = max_rel_err(ref, traced(x))
            assert err < tol, f"fx-traced {type(deploy).__name__} at batch {b}: rel err {err:.2e}"


def assert_onnx_matches(module: nn.Module, shape: tuple[int, ...], path: Path, batches: tuple[int, ...] = (1, 3),
                        tol: float = 1e-4, seed: int = 0, fuse: bool = True) -> bytes:
    """Export with a dynamic batch axis (traced at batch 2), run in a plain ORT session at each batch
    size, compare with PyTorch. Returns the ONNX bytes."""
    g = torch.Generator().manual_seed(seed)
    data = export_dynamic_onnx(module, torch.randn(2, *shape, generator=g), path, fuse=fuse)
    sess = ort_session(data, threads=1)
    name = sess.get_inputs()[0].name
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *shape, generator=g)
            got = sess.run(None, {name: x.numpy()})[0]
            err = max_rel_err(module(x), got)
            assert err < tol, f"ONNX Runtime vs PyTorch for {type(module).__name__} at batch {b}: rel err {err:.2e}"
    return data
