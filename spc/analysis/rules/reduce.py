"""Pooling, resizing, reductions, softmax-like ops.

Spatial pooling and resizing keep batch and channels. A reduction keeps the axes it does not reduce; the axes it
reduces (and the axis a softmax, argmax, top-k or cumulative sum runs along) get a soft pin: the op's result would
change if channels there disappeared.
"""

from __future__ import annotations

import numpy as np

from .base import couples, updates
from .shapes import guard_shape_input, rewrite_shape_input


@couples("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx):
    x = ctx.inputs[0]
    for out in ctx.outputs:
        if out:
            ctx.tie(x, 0, out, 0)
            ctx.tie(x, 1, out, 1)


@couples("Resize", "Upsample")
def resize(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    for axis, (a, b) in enumerate(zip(ctx.shape(x), ctx.shape(y))):
        if a == b:
            ctx.tie(x, axis, y, axis)
    if ctx.op == "Resize" and ctx.input(3):
        guard_shape_input(ctx, ctx.input(3), y)
    for name in ctx.inputs[1:]:
        if name:
            ctx.leave(name)


@updates("Resize")
def resize_sizes(edit):
    if edit.input(3):
        rewrite_shape_input(edit, 3, edit.outputs[0])


def _reduce_axes(ctx) -> list[int] | None:
    axes = ctx.attr("axes")
    if axes is None and ctx.input(1):
        value = ctx.const(ctx.input(1))
        if value is None:
            return None
        axes = value.tolist()
    rank = ctx.rank(ctx.inputs[0])
    if not axes:
        return [] if int(ctx.attr("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(a + rank if a < 0 else a for a in np.atleast_1d(axes))


REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@couples(*REDUCE)
def reduce(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    axes = _reduce_axes(ctx)
    if axes is None:
        return  # axes computed at run time: every axis stays pinned
    _keep_other_axes(ctx, x, y, axes, bool(ctx.attr("keepdims", 1)))
    if ctx.input(1):
        ctx.leave(ctx.input(1))


@couples("ArgMax", "ArgMin")
def arg_reduce(ctx):
    rank = ctx.rank(ctx.inputs[0])
    axis = int(ctx.attr("axis", 0))
    _keep_other_axes(ctx, ctx.inputs[0], ctx.outputs[0], [axis + rank if axis < 0 else axis],
                     bool(ctx.attr("keepdims", 1)))


def _keep_other_axes(ctx, x: str, y: str, axes: list[int], keepdims: bool) -> None:
    out_axis = 0
    for axis in range(ctx.rank(x)):
        if axis in axes:
            ctx.pin(x, axis, f"{ctx.op} '{ctx.node.name}' reduces over this axis", soft=True)
            if keepdims:
                ctx.leave_axis(y, out_axis)
                out_axis += 1
            continue
        ctx.tie(x, axis, y, out_axis)
        out_axis += 1


@couples("Softmax", "LogSoftmax", "Hardmax", "CumSum", "TopK", "LpNormalization", "LRN")
def along_axis(ctx):
    x = ctx.inputs[0]
    rank = ctx.rank(x)
    if ctx.op == "LRN":
        axes = [1]
    elif ctx.op == "CumSum":
        value = ctx.const(ctx.input(1))
        if value is None:
            return
        axes = [int(value.reshape(-1)[0])]
    else:
        default = -1 if (ctx.op not in ("Softmax", "LogSoftmax", "Hardmax") or ctx.opset >= 13) else 1
        axes = [int(ctx.attr("axis", default))]
    axes = [a + rank if a < 0 else a for a in axes]
    if ctx.op in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13:
        axes = list(range(axes[0], rank))  # old softmax flattens everything from `axis` on
    for out in ctx.outputs:
        if not out:
            continue
        for axis in range(rank):
            if axis in axes:
                continue
            ctx.tie(x, axis, out, axis)
    for axis in axes:
        ctx.pin(x, axis, f"{ctx.op} '{ctx.node.name}' works along this axis", soft=True)
    for name in ctx.inputs[1:]:
        if name:
            ctx.leave(name)
