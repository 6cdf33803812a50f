"""ONNX ops rewritten into equivalent forms that spc's kernels run, ahead of code generation on CPU targets.

TVM legalizes these to loop nests that its CPU schedules leave scalar (one thread, against ONNX Runtime on the same
op, bench/README.md "Ops on TVM's loops"):

* a 1-D Conv or ConvTranspose (speech, audio, time series): as the 2-D op over a map of height 1 (Unsqueeze,
  Conv with a 1 x k kernel, Squeeze), which spc's convolution kernels run (and conv_transpose.py after this): a
  64 -> 64 channel, k = 3 conv over 512 steps took 4.7 ms, now 0.12 ms (1.09x ONNX Runtime);
* InstanceNormalization, and GroupNormalization: each (image, channel) or (image, group) is a row normalised by
  spc's vectorised layer_norm kernel (Reshape, LayerNormalization without affine, Reshape), then the per-channel
  scale and bias (Mul, Add): 64 x 56 x 56, 1.24 ms -> 0.075 ms;
* AveragePool (2-D): a depthwise conv with weights 1 / window (spc's depthwise kernel), times a constant map where
  padding does not count: 3x3/1 on 64 x 56 x 56, 1.07 ms -> 0.080 ms;
* Resize, nearest neighbour by integer factors (YOLO's upsampling): each pixel repeated by Unsqueeze, Tile and
  Reshape, a copy TVM vectorises: 2x on 64 x 28 x 28, 0.45 ms -> 0.13 ms;
* a two-operand Einsum that is one batched matrix product (attention scores, projections written as einsums):
  Transpose / Reshape / MatMul, a constant operand arranged ahead of time so that spc's dense kernel runs it:
  bij,jk->bik on 8 x 64 x 64, 1.0 ms -> 0.041 ms.

The rewritten graph only feeds the compiler; the bundle keeps the model it compiled. Needs opset 17 (the
LayerNormalization op) for the norms; spatial sizes that shape inference does not know keep the op as it is.
"""

from __future__ import annotations

import numpy as np
import onnx

from spc.graph import node_attr
from spc.io import default_opset

from .onnx_emitter import Emitter, constant_values, replaced, taken_names

_CONV_ATTRS_2D = {"strides": 1, "dilations": 1, "output_padding": 0}  # 1-D attribute -> its value on the new axis


def _as_2d(e: Emitter, node: onnx.NodeProto, weights: dict) -> bool:
    """A 1-D Conv/ConvTranspose as the 2-D one over a map of height 1."""
    w = weights.get(node.input[1])
    if w is None or w.ndim != 3:
        return False
    attrs = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.name in _CONV_ATTRS_2D:
            attrs[attr.name] = [_CONV_ATTRS_2D[attr.name]] + list(value)
        elif attr.name == "kernel_shape":
            attrs[attr.name] = [1] + list(value)
        elif attr.name == "pads":
            attrs[attr.name] = [0, value[0], 0, value[1]]
        elif attr.name == "output_shape":
            attrs[attr.name] = [1] + list(value)
        else:
            attrs[attr.name] = value.decode() if isinstance(value, bytes) else value
    axis = e.const(np.array([2], np.int64), "axis_h")
    x = e.op("Unsqueeze", [node.input[0], axis], "x_2d")
    inputs = [x, e.const(w[:, :, None, :], "w_2d")] + [name for name in node.input[2:]]
    y = e.op(node.op_type, inputs, "y_2d", **attrs)
    e.op("Squeeze", [y, axis], "y", out=node.output[0])
    return True


def _normalised_rows(e: Emitter, node: onnx.NodeProto, dims: list, rows: int, scale: np.ndarray | None,
                     bias: np.ndarray | None) -> None:
    """x [n, c, *spatial] normalised per row of [n, rows, -1] (epsilon of the node), then scale and bias per
    channel."""
    channels = dims[1]
    x = e.op("Reshape", [node.input[0], e.const(np.array([0, rows, -1], np.int64), "rows")], "x_rows")
    width = int(np.prod(dims[1:])) // rows
    ones = e.const(np.ones(width, np.float32), "ones")
    zeros = e.const(np.zeros(width, np.float32), "zeros")
    eps = float(node_attr(node, "epsilon", 1e-5))
    y = e.op("LayerNormalization", [x, ones, zeros], "normalised", axis=-1, epsilon=eps)
    y = e.op("Reshape", [y, e.const(np.array([0] + list(dims[1:]), np.int64), "shape")], "y_shaped")
    per_channel = (channels,) + (1,) * (len(dims) - 2)
    y = e.op("Mul", [y, e.const(scale.astype(np.float32).reshape(per_channel), "scale")], "scaled")
    e.op("Add", [y, e.const(bias.astype(np.float32).reshape(per_channel), "bias")], "y", out=node.output[0])


def _instance_norm(e: Emitter, node, dims, weights) -> bool:
    scale, bias = weights.get(node.input[1]), weights.get(node.input[2])
    if scale is None or bias is None:
        return False
    _normalised_rows(e, node, dims, dims[1], scale, bias)
    return True


def _group_norm(e: Emitter, node, dims, weights) -> bool:
    scale, bias = weights.get(node.input[1]), weights.get(node.input[2])
    groups = int(node_attr(node, "num_groups", 0))
    channels = dims[1]
    if scale is None or bias is None or groups < 1 or channels % groups:
        return False
    if scale.size == groups != channels:  # opset 18: one scale and bias per group
        scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
    _normalised_rows(e, node, dims, groups, scale, bias)
    return True


def _average_pool(e: Emitter, node, dims, weights) -> bool:
    """AveragePool (2-D, no dilation, floor mode) as a depthwise conv with weights 1 / window, times a constant map
    of window / (taps inside the input) where padding does not count (count_include_pad = 0, the default)."""
    if len(dims) != 4 or node_attr(node, "ceil_mode", 0) or node_attr(node, "auto_pad", "NOTSET") != "NOTSET" \
            or any(d != 1 for d in node_attr(node, "dilations", [1, 1])):
        return False
    kh, kw = node_attr(node, "kernel_shape")
    sh, sw = node_attr(node, "strides", [1, 1])
    top, left, bottom, right = node_attr(node, "pads", [0, 0, 0, 0])
    channels, h, w = dims[1:]
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    kernel = np.full((channels, 1, kh, kw), 1.0 / (kh * kw), np.float32)
    y = e.op("Conv", [node.input[0], e.const(kernel, "mean_taps")], "window_mean", group=channels,
             kernel_shape=[kh, kw], strides=[sh, sw], pads=[top, left, bottom, right])
    if (top or left or bottom or right) and not node_attr(node, "count_include_pad", 0):
        rows = np.array([min(i * sh - top + kh, h) - max(i * sh - top, 0) for i in range(oh)], np.float32)
        cols = np.array([min(j * sw - left + kw, w) - max(j * sw - left, 0) for j in range(ow)], np.float32)
        y = e.op("Mul", [y, e.const((kh * kw / np.outer(rows, cols)).astype(np.float32)[None, None], "inside")],
                 "window_mean_inside")
    e.op("Identity", [y], "y", out=node.output[0])
    return True


def _nearest_upsample(e: Emitter, node, dims, weights) -> bool:
    """Resize by integer factors, nearest neighbour, whose source pixel is floor(i / factor) (the default
    half_pixel / round_prefer_floor and asymmetric / floor or round_prefer_floor): each pixel repeated (Unsqueeze,
    Tile, Reshape), a copy TVM vectorises (YOLO's necks upsample so)."""
    inputs = list(node.input) + ["", "", ""]
    scales = weights.get(inputs[2]) if inputs[2] else None
    if scales is not None and scales.size == 0:  # scales given empty: the sizes input says
        scales = None
    if scales is None and inputs[3] and weights.get(inputs[3]) is not None and None not in dims:
        scales = np.asarray(weights[inputs[3]], np.float64) / np.asarray(dims, np.float64)
    if node_attr(node, "mode", "nearest") != "nearest" or scales is None or len(dims) != 4:
        return False
    mode = node_attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest = node_attr(node, "nearest_mode", "round_prefer_floor")
    if (mode, nearest) not in {("half_pixel", "round_prefer_floor"), ("asymmetric", "floor"),
                               ("asymmetric", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_floor")}:
        return False
    factors = [float(f) for f in scales]
    if factors[:2] != [1.0, 1.0] or any(f < 1 or f != int(f) for f in factors[2:]):
        return False
    fh, fw = int(factors[2]), int(factors[3])
    h, w = dims[2:]
    x = e.op("Unsqueeze", [node.input[0], e.const(np.array([3, 5], np.int64), "axes")], "x6")
    x = e.op("Tile", [x, e.const(np.array([1, 1, 1, fh, 1, fw], np.int64), "repeat")], "repeated")  # any batch
    e.op("Reshape", [x, e.const(np.array([0, 0, h * fh, w * fw], np.int64), "shape")], "y", out=node.output[0])
    return True


def _einsum_plan(equation: str, ranks: list[int]):
    """(labels of A, labels of B, output labels) of a two-operand einsum that is one batched matrix product:
    explicit output, no ellipsis, no label twice in an operand, every label of one operand alone in the output."""
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or [len(p) for p in parts] != ranks:
        return None
    a, b = parts
    if any(len(set(x)) != len(x) for x in (a, b, out)) or not set(out) <= set(a) | set(b):
        return None
    if any(label not in out for label in set(a) ^ set(b)):  # summed over one operand alone: not a product
        return None
    return a, b, out


def _einsum(e: Emitter, node, dims, weights) -> bool:
    """A two-operand Einsum that is a batched matrix product, as Transpose / Reshape / MatMul (a constant operand
    pre-arranged: a constant-weight MatMul runs spc's dense kernel)."""
    a_dims, b_dims = dims.get(node.input[0]), dims.get(node.input[1])
    if a_dims is None or b_dims is None or None in a_dims + b_dims:
        return False
    plan = _einsum_plan(node_attr(node, "equation", ""), [len(a_dims), len(b_dims)])
    if plan is None:
        return False
    a, b, out = plan
    size = {**dict(zip(a, a_dims)), **dict(zip(b, b_dims))}
    batch = [x for x in out if x in a and x in b]
    contracted = [x for x in a if x in b and x not in out]
    a_free, b_free = [x for x in a if x not in b], [x for x in b if x not in a]
    prod = lambda labels: int(np.prod([size[x] for x in labels], dtype=np.int64))  # noqa: E731
    nb, m, k, n = prod(batch), prod(a_free), prod(contracted), prod(b_free)

    def arranged(name, labels, order, shape, what):
        perm = [labels.index(x) for x in order]
        value = weights.get(name)
        if value is not None:  # a constant: arranged here
            return e.const(np.ascontiguousarray(value.transpose(perm).reshape(shape)), what)
        x = e.op("Transpose", [name], f"{what}_t", perm=perm) if perm != sorted(perm) else name
        return e.op("Reshape", [x, e.const(np.array(shape, np.int64), f"{what}_shape")], what)

    lhs = arranged(node.input[0], a, batch + a_free + contracted, ([nb] if batch else []) + [m, k], "lhs")
    rhs = arranged(node.input[1], b, batch + contracted + b_free, ([nb] if batch else []) + [k, n], "rhs")
    y = e.op("MatMul", [lhs, rhs], "product")
    product = batch + a_free + b_free
    y = e.op("Reshape", [y, e.const(np.array([size[x] for x in product] or [1], np.int64), "product_shape")],
             "product_full")
    perm = [product.index(x) for x in out]
    if perm != list(range(len(perm))):
        y = e.op("Transpose", [y], "out_t", perm=perm)
    e.op("Identity", [y], "y", out=node.output[0])
    return True


def rewrite_op_forms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with the ops of the module docstring rewritten; returns it and how many were."""
    kinds = {"Conv", "ConvTranspose", "InstanceNormalization", "GroupNormalization", "AveragePool", "Resize",
             "Einsum"}
    by_shape = {"InstanceNormalization": _instance_norm, "GroupNormalization": _group_norm,
                "AveragePool": _average_pool, "Resize": _nearest_upsample}
    nodes = [n for n in model.graph.node if n.op_type in kinds and n.domain in ("", "ai.onnx")]
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    # a convolution whose weight is a 4-D initializer is already in spc's form (weights computed at run time are
    # resolved below, and skipped unless 3-D)
    nodes = [n for n in nodes if n.op_type not in ("Conv", "ConvTranspose") or ranks.get(n.input[1], 3) == 3]
    if not nodes:
        return model, 0
    from .fold import known_dims

    weights = constant_values(model, [name for node in nodes for name in node.input[1:]])
    norms_ok = default_opset(model) >= 17
    dims = known_dims(model) if any(n.op_type not in ("Conv", "ConvTranspose") for n in nodes) else {}
    taken = taken_names(model)
    emitters: dict[int, Emitter] = {}
    for node in nodes:
        e = Emitter(node, taken)
        if node.op_type in ("Conv", "ConvTranspose"):
            done = _as_2d(e, node, weights)
        elif node.op_type == "Einsum":
            done = len(node.input) == 2 and _einsum(e, node, dims, weights)
        else:
            x_dims = dims.get(node.input[0])
            if x_dims is None or len(x_dims) < 3 or any(d is None for d in x_dims[1:]) \
                    or (node.op_type.endswith("Normalization") and not norms_ok):
                continue
            done = by_shape[node.op_type](e, node, x_dims, weights)
        if done:
            emitters[id(node)] = e
    if not emitters:
        return model, 0
    return replaced(model, emitters), len(emitters)
