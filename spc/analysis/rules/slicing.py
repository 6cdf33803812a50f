"""Concat, Split, Slice, Gather and Pad: ops that select or join ranges of an axis.

Concat ties each input to its offset in the output; Split ties each output to its range of the input and rewrites
the split sizes; Slice ties the kept range and rewrites starts/ends so the same channels are selected afterwards.
Gather from a weight along axis 0 is an embedding lookup: the embedding's columns follow the output's last axes.
"""

from __future__ import annotations

import numpy as np

from .base import ROLE_WEIGHT, RuleRefused, couples, updates


def _axis(ctx, tensor: str, default: int = 0) -> int:
    rank = ctx.rank(tensor)
    axis = int(ctx.attr("axis", default))
    return axis + rank if axis < 0 else axis


@couples("Concat")
def concat(ctx):
    y = ctx.outputs[0]
    axis = _axis(ctx, y)
    offset = 0
    for name in ctx.inputs:
        shape = ctx.shape(name)
        size = shape[axis]
        if not isinstance(size, int):
            raise RuleRefused(f"'{name}' has a dynamic size along the concat axis")
        for other in range(len(shape)):
            if other != axis:
                ctx.tie(name, other, y, other)
        if size:
            ctx.tie(name, axis, y, axis, offset + np.arange(size))
        offset += size


@couples("Split")
def split(ctx):
    x = ctx.inputs[0]
    axis = _axis(ctx, x)
    offset = 0
    for out in ctx.outputs:
        shape = ctx.shape(out)
        size = shape[axis]
        if not isinstance(size, int):
            raise RuleRefused("split sizes are dynamic")
        for other in range(len(shape)):
            if other != axis:
                ctx.tie(out, other, x, other)
        ctx.tie(out, axis, x, axis, offset + np.arange(size))
        offset += size
    if ctx.input(1):
        ctx.leave(ctx.input(1))


@updates("Split")
def split_sizes(edit):
    axis = int(edit.attr("axis", 0))
    sizes = np.array([edit.new_shape(out)[axis] for out in edit.outputs], dtype=np.int64)
    if sizes.tolist() == [edit.old_shape(out)[axis] for out in edit.outputs]:
        return
    if edit.opset < 13:
        edit.set_attr("split", sizes.tolist())
        return
    edit.remove_attr("num_outputs")
    edit.set_input(1, sizes)


def _slice_params(ctx):
    """Per sliced axis: (start, stop) normalised for step 1, or None where it cannot be followed."""
    data = ctx.inputs[0]
    shape = ctx.shape(data)
    starts, ends = ctx.const(ctx.input(1)), ctx.const(ctx.input(2))
    axes = ctx.const(ctx.input(3)) if ctx.input(3) else None
    if axes is None and not ctx.input(3) and starts is not None:
        axes = np.arange(starts.size)
    steps = ctx.const(ctx.input(4)) if ctx.input(4) else None
    if axes is None:
        return None
    if starts is None or ends is None:  # run-time bounds: those axes cannot be followed, the others can
        return {int(a) + len(shape) if a < 0 else int(a): None for a in axes.reshape(-1)}
    result = {}
    for k, axis in enumerate(axes.reshape(-1)):
        axis = int(axis) + len(shape) if axis < 0 else int(axis)
        size = shape[axis]
        step = 1 if steps is None else int(steps.reshape(-1)[k])
        if step != 1 or not isinstance(size, int):
            result[axis] = None
            continue
        start, stop = int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k])
        start = min(max(start + size if start < 0 else start, 0), size)
        stop = min(max(stop + size if stop < 0 else stop, 0), size)
        result[axis] = (start, max(start, stop))
    return result


@couples("Slice")
def slice_(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    params = _slice_params(ctx)
    for name in ctx.inputs[1:]:
        if name:
            ctx.leave(name)
    if params is None:
        raise RuleRefused("slice bounds are computed at run time")
    for axis in range(ctx.rank(x)):
        if axis not in params:
            ctx.tie(x, axis, y, axis)
        elif params[axis] is not None:
            start, stop = params[axis]
            x_key, y_key = ctx.key(x, axis), ctx.key(y, axis)
            ctx.space.tie_elements(x_key, np.arange(start, stop), y_key, np.arange(stop - start))


@updates("Slice")
def slice_bounds(edit):
    x = edit.inputs[0]
    params = _slice_params(edit)
    if params is None or all(value is None for value in params.values()):
        return  # run-time bounds: the analysis pinned every sliced axis
    starts, ends = edit.const(edit.input(1)).copy(), edit.const(edit.input(2)).copy()
    axes = edit.const(edit.input(3)) if edit.input(3) else np.arange(starts.size)
    changed = False
    for k, axis in enumerate(axes.reshape(-1)):
        axis = int(axis) + len(edit.old_shape(x)) if axis < 0 else int(axis)
        if params.get(axis) is None or edit.old_shape(x)[axis] == edit.new_shape(x)[axis]:
            continue
        start, stop = params[axis]
        kept = edit.kept(x, axis)
        new_start = int(np.searchsorted(kept, start))
        new_stop = int(np.searchsorted(kept, stop))
        starts.reshape(-1)[k], ends.reshape(-1)[k] = new_start, new_stop
        changed = True
    if changed:
        edit.set_input(1, starts)
        edit.set_input(2, ends)


@couples("Gather")
def gather(ctx):
    data, indices, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    axis = _axis(ctx, data)
    index_rank = ctx.rank(indices)
    for a in range(ctx.rank(data)):
        if a < axis:
            ctx.tie(data, a, y, a)
        elif a > axis:
            ctx.tie(data, a, y, a - 1 + index_rank)
    for a in range(index_rank):
        ctx.tie(indices, a, y, axis + a)
    if axis == 0:
        ctx.role(data, ROLE_WEIGHT)


@couples("Pad")
def pad(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    rank = ctx.rank(x)
    pads = ctx.attr("pads")
    if pads is None:  # read only: the channel axes this rule ties are never padded, so pads never change
        value = ctx.value(ctx.input(1))
        if value is None:
            raise RuleRefused("pads are computed at run time")
        pads = value.reshape(-1).tolist()
    axes = list(range(rank))
    if ctx.input(3):
        value = ctx.value(ctx.input(3))
        if value is None:
            raise RuleRefused("pad axes are computed at run time")
        axes = [int(a) + rank if a < 0 else int(a) for a in value.reshape(-1)]
    padded = {axis for k, axis in enumerate(axes) if pads[k] or pads[k + len(axes)]}
    for axis in range(rank):
        if axis not in padded:
            ctx.tie(x, axis, y, axis)
    for name in ctx.inputs[1:]:
        if name:
            ctx.leave(name)
