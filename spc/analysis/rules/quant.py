"""Quantisation ops: QDQ pairs pass channels through; a per-channel quantised weight is sliced as a whole.

QuantizeLinear and DequantizeLinear are elementwise: every axis passes through. A per-tensor scale and zero point
are scalars and stay; a per-axis scale and zero point (1-D, along ``axis``) follow that axis. A constant integer
weight behind a DequantizeLinear is sliced along any axis together with its per-axis scale and zero point (the
float scale is sliced like any weight; the integer tensors here, since they are not weights to the analysis), and
masked by setting its removed slices to the zero point (``masked_quantized_weights``, used by ``spc.mask``).
Blocked quantisation and the integer-arithmetic ops (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger) are
pinned with a reason.
"""

from __future__ import annotations

import numpy as np

from .base import ROLE_DIVISOR, ROLE_SCALE, RuleRefused, couples, updates

INTEGER_ARITHMETIC = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul",
                      "QLinearConcat", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu")


def _per_axis(ctx, name: str) -> bool:
    """Whether a scale or zero point holds one value per index of ``axis`` (rather than one for all)."""
    shape = ctx.shape(name)
    if shape is None:
        raise RuleRefused(f"the shape of '{name}' is unknown")
    if len(shape) > 1:
        raise RuleRefused("blocked quantisation is not mapped")
    return len(shape) == 1 and shape[0] != 1  # a single value, even in a 1-D tensor, is per-tensor


@couples("QuantizeLinear", "DequantizeLinear")
def quantize(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    if int(ctx.attr("block_size", 0) or 0):
        raise RuleRefused("blocked quantisation is not mapped")
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    params = [name for name in ctx.inputs[1:3] if name]
    per_axis = [_per_axis(ctx, name) for name in params]
    ctx.tie_same(x, y)
    for name, along in zip(params, per_axis):
        if along:
            ctx.tie(name, 0, x, axis)
        else:
            ctx.leave(name)
    # masking zeroes a dequantising scale (the rows read as 0) but sets a quantising one, a divisor, to 1
    ctx.role(ctx.input(1), ROLE_SCALE if ctx.op == "DequantizeLinear" else ROLE_DIVISOR)


@updates("QuantizeLinear", "DequantizeLinear")
def quantized_constants(edit):
    """Slice the integer constants (a quantised weight, a per-axis zero point) the generic rewrite leaves alone."""
    for index, name in enumerate(edit.inputs[:3]):
        array = edit.const(name) if name and name in edit.graph.initializers else None
        if array is None or edit.graph.is_weight(name) or array.ndim == 0:
            continue
        sliced, changed = array, False
        for axis in range(array.ndim):
            kept = edit.kept(name, axis) if (name, axis) in edit.rewriter.kept else None
            if kept is not None and kept.size < array.shape[axis]:
                sliced, changed = np.take(sliced, kept, axis=axis), True
        if changed:
            edit.set_input(index, sliced)


def masked_quantized_weights(analysis, removed: np.ndarray) -> dict[str, np.ndarray]:
    """For ``spc.mask_removal``: each integer weight behind a DequantizeLinear with its removed slices set to the
    zero point, so that they dequantise to exactly 0 (its input-channel slices have no scale of their own)."""
    graph, masked = analysis.graph, {}
    for node in graph.nodes:
        q = node.input[0] if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") else ""
        if not q or q not in graph.initializers or graph.is_weight(q):
            continue
        array = masked.get(q)
        for axis in range(len(graph.shape(q))):
            info = analysis.space.dims.get((q, axis))
            gone = np.flatnonzero(removed[analysis.dim_labels((q, axis))]) if info and not info.dynamic else []
            if len(gone) == 0:
                continue
            array = graph.weight(q).copy() if array is None else array
            index = [slice(None)] * array.ndim
            index[axis] = gone
            array[tuple(index)] = _zero_point(node, graph, array)[tuple(index)]
        if array is not None:
            masked[q] = array
    return masked


def _zero_point(node, graph, array: np.ndarray) -> np.ndarray:
    zero = graph.weight(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is None:
        return np.zeros_like(array)
    if zero.size > 1:  # per axis
        axis = int(next((a.i for a in node.attribute if a.name == "axis"), 1)) % array.ndim
        zero = zero.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.broadcast_to(zero.astype(array.dtype), array.shape)


@couples(*INTEGER_ARITHMETIC)
@couples(*INTEGER_ARITHMETIC, domain="com.microsoft")
def integer_arithmetic(ctx):
    raise RuleRefused("spc does not rewrite integer (quantised) arithmetic; pruning needs QDQ form")
