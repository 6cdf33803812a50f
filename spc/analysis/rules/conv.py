"""Conv and ConvTranspose, plain, grouped and depthwise.

A plain conv ties its input channels to the weight's input axis and its output channels to the weight's output axis
and bias. A grouped conv (depthwise included) can only lose whole groups: input and output channels are tied to a
virtual "groups" dim by ``channel // channels_per_group``, and the ``group`` attribute follows the kept count.
"""

from __future__ import annotations

import numpy as np

from .base import ROLE_BIAS, ROLE_WEIGHT, LinearLayer, RuleRefused, couples, updates


def _channels(ctx, tensor: str) -> int:
    size = ctx.shape(tensor)[1]
    if not isinstance(size, int):
        raise RuleRefused(f"the channel count of '{tensor}' is dynamic")
    return size


@couples("Conv", "ConvTranspose")
def conv(ctx):
    x, w = ctx.inputs[0], ctx.inputs[1]
    b = ctx.input(2)
    y = ctx.outputs[0]
    transposed = ctx.op == "ConvTranspose"
    groups = int(ctx.attr("group", 1))
    in_axis, out_axis = (0, 1) if transposed else (1, 0)  # weight axes facing the input and output channels
    ctx.tie(x, 0, y, 0)
    ctx.role(w, ROLE_WEIGHT)
    ctx.role(b, ROLE_BIAS)
    if groups == 1:
        ctx.tie(x, 1, w, in_axis)
        ctx.tie(w, out_axis, y, 1)
        if b:
            ctx.tie(b, 0, y, 1)
        if ctx.graph.is_weight(w):  # a computed weight (dequantised, weight-normed) has no matrix to compensate
            ctx.layer(LinearLayer(ctx.node.name, "convtranspose" if transposed else "conv", w, in_axis, out_axis,
                                  x, 1, y, 1, b or None))
        return
    in_channels, out_channels = _channels(ctx, x), _channels(ctx, y)
    if in_channels % groups or out_channels % groups:
        raise RuleRefused(f"{groups} groups do not divide {in_channels} -> {out_channels} channels")
    per_in, per_out = in_channels // groups, out_channels // groups
    virtual = ctx.virtual("groups", groups)
    ctx.tie_keys(ctx.key(x, 1), virtual, np.arange(in_channels) // per_in)
    ctx.tie_keys(ctx.key(y, 1), virtual, np.arange(out_channels) // per_out)
    if transposed:
        ctx.tie(w, 0, x, 1)
    else:
        ctx.tie(w, 0, y, 1)
    if b:
        ctx.tie(b, 0, y, 1)


@updates("Conv", "ConvTranspose")
def conv_group_count(edit):
    if int(edit.attr("group", 1)) > 1:
        edit.set_attr("group", edit.virtual_size("groups"))
