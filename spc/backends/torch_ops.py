"""ONNX ops as torch functions: elementwise, shape and data-movement ops (one line each where trivial).

Every entry is ``fn(attrs, *inputs)``; ``attrs`` holds the node's attributes plus ``_opset`` and ``_outputs`` (its
output count). Absent optional inputs arrive as ``None``. Ops whose configuration torch cannot express raise
``Unsupported`` with the reason; the interpreter names the node. Layer ops (conv, pool, norm, gemm) live in
``torch_nn``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


class Unsupported(Exception):
    """An op (or one configuration of it) that spc's torch back end does not translate."""


# ONNX TensorProto data types -> torch dtypes
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def ints(t) -> list[int]:
    """A shape-like input (tensor or list) as Python ints."""
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _div(a, b):
    both_int = not (a.is_floating_point() or b.is_floating_point())
    return torch.div(a, b, rounding_mode="trunc") if both_int else a / b


def _variadic(fn):
    return lambda a, *xs: functools.reduce(fn, xs)


ELEMENTWISE = {
    "Identity": lambda a, x: x, "Neg": lambda a, x: -x, "Abs": lambda a, x: x.abs(), "Exp": lambda a, x: x.exp(),
    "Log": lambda a, x: x.log(), "Sqrt": lambda a, x: x.sqrt(), "Reciprocal": lambda a, x: x.reciprocal(),
    "Sin": lambda a, x: x.sin(), "Cos": lambda a, x: x.cos(), "Tanh": lambda a, x: x.tanh(),
    "Sigmoid": lambda a, x: x.sigmoid(), "Relu": lambda a, x: F.relu(x), "Erf": lambda a, x: torch.erf(x),
    "Floor": lambda a, x: x.floor(), "Ceil": lambda a, x: x.ceil(), "Round": lambda a, x: x.round(),
    "Sign": lambda a, x: x.sign(), "IsNaN": lambda a, x: x.isnan(), "Not": lambda a, x: ~x,
    "Softplus": lambda a, x: F.softplus(x), "Softsign": lambda a, x: F.softsign(x), "Mish": lambda a, x: F.mish(x),
    "Selu": lambda a, x: F.selu(x), "HardSwish": lambda a, x: F.hardswish(x),
    "Elu": lambda a, x: F.elu(x, a.get("alpha", 1.0)), "Celu": lambda a, x: F.celu(x, a.get("alpha", 1.0)),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "ThresholdedRelu": lambda a, x: torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x)),
    "HardSigmoid": lambda a, x: (a.get("alpha", 0.2) * x + a.get("beta", 0.5)).clamp(0, 1),
    "Gelu": lambda a, x: F.gelu(x, approximate=a.get("approximate", "none")),
    "PRelu": lambda a, x, slope: torch.where(x < 0, x * slope, x),
    "Add": lambda a, x, y: x + y, "Sub": lambda a, x, y: x - y, "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: _div(x, y), "Pow": lambda a, x, y: torch.pow(x, y).to(x.dtype),
    "Mod": lambda a, x, y: torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y),
    "Equal": lambda a, x, y: x == y, "Less": lambda a, x, y: x < y, "Greater": lambda a, x, y: x > y,
    "LessOrEqual": lambda a, x, y: x <= y, "GreaterOrEqual": lambda a, x, y: x >= y,
    "And": lambda a, x, y: x & y, "Or": lambda a, x, y: x | y, "Xor": lambda a, x, y: x ^ y,
    "Where": lambda a, c, x, y: torch.where(c, x, y), "MatMul": lambda a, x, y: torch.matmul(x, y),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": lambda a, *xs: functools.reduce(torch.add, xs) / len(xs),
    "Cast": lambda a, x: x.to(DTYPES[a["to"]]), "CastLike": lambda a, x, like: x.to(like.dtype),
    "Clip": lambda a, x, lo=None, hi=None: torch.clamp(x, a.get("min", lo), a.get("max", hi)),
    "Einsum": lambda a, *xs: torch.einsum(a["equation"], *xs),
}


def _shape(a, x):
    dims = list(x.shape)[a.get("start", 0):a.get("end", len(x.shape))]
    return torch.tensor(dims, dtype=torch.int64)


def _reshape(a, x, shape):
    target = ints(shape)
    if not a.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _flatten(a, x):
    axis = _axis(a.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _transpose(a, x):
    return x.permute(a.get("perm", list(range(x.dim()))[::-1]))


def _axes_of(a, axes, rank):
    values = ints(axes) if axes is not None else a.get("axes")
    return None if values is None else sorted(_axis(v, rank) for v in values)


def _squeeze(a, x, axes=None):
    dims = _axes_of(a, axes, x.dim())
    return x.squeeze() if dims is None else x.squeeze(tuple(dims))


def _unsqueeze(a, x, axes=None):
    for d in _axes_of(a, axes, x.dim() + len(ints(axes) if axes is not None else a["axes"])):
        x = x.unsqueeze(d)
    return x


def _split(a, x, split=None):
    axis, n = _axis(a.get("axis", 0), x.dim()), a["_outputs"]
    sizes = ints(split) if split is not None else a.get("split")
    if sizes is None:
        step = -(-x.shape[axis] // a.get("num_outputs", n))
        sizes = [min(step, x.shape[axis] - i * step) for i in range(n)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(a, x, starts, ends, axes=None, steps=None):
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        index = range(*slice(start, end, step).indices(x.shape[axis]))
        if step > 0:
            x = x.narrow(axis, index.start, len(index)) if step == 1 else x[(slice(None),) * axis + (
                slice(index.start, index.stop, step),)]
        else:
            x = x.index_select(axis, torch.tensor(list(index), dtype=torch.int64))
    return x


def _gather(a, x, index):
    axis = _axis(a.get("axis", 0), x.dim())
    index = torch.where(index < 0, index + x.shape[axis], index)
    picked = x.index_select(axis, index.reshape(-1))
    return picked.reshape(x.shape[:axis] + index.shape + x.shape[axis + 1:])


def _gather_elements(a, x, index):
    axis = _axis(a.get("axis", 0), x.dim())
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index))


def _gather_nd(a, x, index):
    if a.get("batch_dims", 0):
        raise Unsupported("batch_dims > 0")
    return x[tuple(index[..., i] for i in range(index.shape[-1]))]


def _expand(a, x, shape):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape))))


def _constant_of_shape(a, shape):
    value = a.get("value", torch.zeros(1))
    return torch.full(ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _range(a, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _softmax(fn):
    def run(a, x):
        if a["_opset"] >= 13:
            return fn(x, dim=a.get("axis", -1))
        axis = _axis(a.get("axis", 1), x.dim())  # before opset 13: coerced to 2-D at axis
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)
    return run


def _pad(a, x, pads=None, value=None, axes=None):
    pads = ints(pads) if pads is not None else a["pads"]
    axes = [_axis(v, x.dim()) for v in ints(axes)] if axes is not None else list(range(x.dim()))
    n = len(axes)
    torch_pads = [0] * (2 * x.dim())
    for i, axis in enumerate(axes):  # torch orders pads from the last axis backwards
        torch_pads[2 * (x.dim() - 1 - axis)], torch_pads[2 * (x.dim() - 1 - axis) + 1] = pads[i], pads[i + n]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(a.get("mode", "constant"))
    if mode is None:
        raise Unsupported(f"pad mode {a['mode']}")
    if mode == "constant":
        return F.pad(x, torch_pads, value=float(value.item()) if value is not None else 0.0)
    while torch_pads[-2:] == [0, 0]:  # torch pads reflect/edge only on trailing axes: drop unpadded leading ones
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode)


def _trilu(a, x, k=None):
    k = int(k.item()) if k is not None else 0
    return torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)


def _cumsum(a, x, axis):
    axis = int(axis.item())
    y = x.flip(axis) if a.get("reverse", 0) else x
    y = y.cumsum(axis) - (y if a.get("exclusive", 0) else 0)
    return y.flip(axis) if a.get("reverse", 0) else y


def _topk(a, x, k):
    out = torch.topk(x, int(k.item()), dim=a.get("axis", -1), largest=bool(a.get("largest", 1)),
                     sorted=bool(a.get("sorted", 1)))
    return out.values, out.indices


def _arg(fn):
    def run(a, x):
        if a.get("select_last_index", 0):
            raise Unsupported("select_last_index=1")
        return fn(x, dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))
    return run


SHAPES = {
    "Shape": _shape, "Size": lambda a, x: torch.tensor(x.numel(), dtype=torch.int64), "Reshape": _reshape,
    "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]), "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherElements": _gather_elements, "GatherND": _gather_nd, "Expand": _expand,
    "Tile": lambda a, x, reps: x.repeat(ints(reps)), "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Constant": lambda a: a["_value"],
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax), "Pad": _pad, "Trilu": _trilu,
    "CumSum": _cumsum, "TopK": _topk, "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
}
