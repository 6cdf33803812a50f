"""PyTorch front-end over torch.onnx (the torch.export based exporter by default)."""

from __future__ import annotations

import os
import tempfile

import onnx

from ._common import exporting, finish, require


def from_torch(module, example_inputs, **opts) -> onnx.ModelProto:
    """Export ``module`` (put it in ``eval()`` mode first) called on ``example_inputs`` (a tensor or a tuple of
    them); ``opts`` go to ``torch.onnx.export`` (``dynamic_shapes``, ``opset_version``, ``dynamo=False`` for the
    TorchScript exporter, ...)."""
    torch = require("torch", "from_torch", "PyTorch", "torch")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    opts.setdefault("verbose", False)  # the exporter's progress lines would go to the caller's stdout
    with exporting("PyTorch (torch.onnx)"):
        if opts.get("dynamo", True):
            require("onnxscript", "from_torch", "onnxscript (torch.onnx's exporter)", "torch")
            proto = torch.onnx.export(module, args, **opts).model_proto
        else:
            proto = _legacy_export(torch, module, args, opts)
    return finish(proto, f"from_torch({type(module).__name__})")


def _legacy_export(torch, module, args, opts) -> onnx.ModelProto:
    """The TorchScript exporter writes to a file only."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(module, args, path, **opts)
        return onnx.load(path)
