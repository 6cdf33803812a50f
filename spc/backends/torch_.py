"""The way back to PyTorch: ``spc.to_torch(model)`` turns a (pruned) ONNX model into a trainable ``nn.Module``.

The module keeps every float initializer as an ``nn.Parameter`` (BatchNormalization running statistics, integer
tensors and lone scalars as buffers) and runs the ONNX nodes in their topological order (``spc.load`` sorts them),
each through a table of op -> torch function (``torch_ops``, ``torch_nn``, ``torch_rnn``). So gradients reach every weight,
``model.train()`` switches BatchNormalization to batch statistics and turns Dropout on, and ``to_onnx()`` writes
the trained weights back into a copy of the ONNX model, ready for ``spc.prune`` or ``spc compile`` again.

onnx2torch was tried first and not wrapped: it imports torchvision unconditionally (no CPU wheel of it matches
torch 2.13 here, and a PyPI one pulls in another torch); it keeps MatMul weights as constant buffers, so a
transformer exported as MatMul + Add could not be fine-tuned; and it refuses the dynamo exporter's
``Reshape(allowzero=1)``, ``LessOrEqual`` and ``LSTM`` (every zoo model tried: ResNet-18, ViT, Llama, LSTM).
"""

from __future__ import annotations

import os
import re

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from .. import io, weights
from ..errors import SpcError
from .torch_nn import LAYERS, TRAINING
from .torch_ops import ELEMENTWISE, SHAPES, Unsupported
from .torch_rnn import RECURRENT

OPS = {**ELEMENTWISE, **SHAPES, **LAYERS, **RECURRENT}
#: (op, input slot) pairs that hold learned weights even when they are scalars
WEIGHT_SLOTS = {("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2), ("Gemm", 1), ("Gemm", 2),
                ("MatMul", 0), ("MatMul", 1), ("PRelu", 1), ("Gather", 0)}
#: (op, input slot) pairs that are state, not weights: BatchNormalization running mean and variance
STATE_SLOTS = {("BatchNormalization", 3), ("BatchNormalization", 4)}


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(array.copy()) if array.ndim else torch.tensor(array.item(), dtype=_dtype(array))


def _dtype(array) -> torch.dtype:
    return torch.from_numpy(array.reshape(1).copy()).dtype


def _attributes(node: onnx.NodeProto) -> dict:
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.type == onnx.AttributeProto.TENSOR:
            value = _tensor(numpy_helper.to_array(value))
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    if node.op_type == "Constant":
        attrs["_value"] = _constant(attrs, node)
    return attrs


def _constant(attrs: dict, node: onnx.NodeProto) -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise SpcError(f"node '{node.name}' (Constant): no tensor value spc.to_torch can use")


def _roles(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """Initializer names used in a weight slot, and those used as running state."""
    weight, state = set(), set()
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if (node.op_type, slot) in WEIGHT_SLOTS:
                weight.add(name)
            if (node.op_type, slot) in STATE_SLOTS:
                state.add(name)
    return weight, state


class _Step:
    __slots__ = ("attrs", "fn", "inputs", "name", "op", "outputs", "training")

    def __init__(self, node: onnx.NodeProto, opset: int):
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            raise SpcError(f"node '{node.name}': spc.to_torch has no translation for op '{op}'")
        self.name, self.op = node.name, node.op_type
        self.inputs, self.outputs = list(node.input), list(node.output)
        self.attrs = {**_attributes(node), "_opset": opset, "_outputs": len(node.output)}
        self.fn, self.training = OPS[node.op_type], node.op_type in TRAINING


class OnnxModule(nn.Module):
    """An ONNX graph as a trainable module: ``forward`` takes the graph inputs (positionally or by name)."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph, opset = model.graph, io.default_opset(model)
        self._model = model
        self.input_names = [v.name for v in graph.input]
        self.output_names = [v.name for v in graph.output]
        self._steps = [_Step(node, opset) for node in graph.node]
        self.weights = nn.ParameterDict()
        self.state = nn.Module()
        self._keys: dict[str, str] = {}
        weight_slot, state_slot = _roles(graph)
        for init in graph.initializer:
            value = _tensor(weights.read(init))
            key = self._key(init.name)
            trainable = value.is_floating_point() and init.name not in state_slot and (
                value.numel() > 1 or init.name in weight_slot)
            if trainable:
                self.weights[key] = nn.Parameter(value)
            else:
                self.state.register_buffer(key, value)

    def _key(self, name: str) -> str:
        key = re.sub(r"\W", "_", name).strip("_") or "t"
        key = key if key[0].isalpha() else f"t_{key}"
        while key in self.weights or hasattr(self.state, key) or key in self._keys.values():
            key += "_"
        self._keys[name] = key
        return key

    def _tensors(self) -> dict[str, torch.Tensor]:
        found = {}
        for name, key in self._keys.items():
            found[name] = self.weights[key] if key in self.weights else getattr(self.state, key)
        return found

    def _feeds(self, args, kwargs) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise SpcError(f"forward: {len(args)} inputs given, the model takes {len(self.input_names)}")
        feeds = dict(zip(self.input_names, args), **kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise SpcError(f"forward: missing model input(s) {', '.join(missing)}")
        return {name: torch.as_tensor(value) for name, value in feeds.items()}

    def forward(self, *args, **kwargs):
        env = {**self._tensors(), **self._feeds(args, kwargs)}
        for step in self._steps:
            try:
                xs = [env[name] if name else None for name in step.inputs]
            except KeyError as missing:
                raise SpcError(f"node '{step.name}' ({step.op}): input {missing} was never computed") from None
            try:
                out = step.fn(step.attrs, *xs, training=self.training) if step.training else step.fn(step.attrs, *xs)
            except Unsupported as reason:
                raise SpcError(f"node '{step.name}' ({step.op}): spc.to_torch does not support {reason}") from None
            env.update((name, y) for name, y in zip(step.outputs, out if isinstance(out, tuple) else (out,)) if name)
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the ONNX model holding the module's current weights and running statistics."""
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        tensors = self._tensors()
        for init in model.graph.initializer:
            if init.name in tensors:
                init.CopyFrom(numpy_helper.from_array(tensors[init.name].detach().cpu().numpy(), init.name))
        return model


def to_torch(model) -> OnnxModule:
    """``model``: a path, an ``onnx.ModelProto`` or a ``spc.PruneResult``; returns an ``OnnxModule`` in eval mode."""
    model = getattr(model, "model", model)
    if isinstance(model, (str, os.PathLike)):
        model = io.load(model)
    elif isinstance(model, onnx.ModelProto):
        model = io.from_proto(model)
    else:
        raise SpcError(f"spc.to_torch: expected a path, an onnx.ModelProto or a PruneResult, got "
                       f"{type(model).__name__}")
    return OnnxModule(model).eval()
