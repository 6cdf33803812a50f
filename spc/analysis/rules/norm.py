"""Normalisations.

BatchNormalization and InstanceNormalization are per channel, so their parameters simply follow the channel.
GroupNormalization computes statistics per group of channels: only whole groups can go (a virtual "groups" dim) and
``num_groups`` follows. LayerNormalization (and RMSNormalization) compute statistics *over* the channels: removing
one changes every other channel's output, so the normalised axes get a soft pin. The model stays valid without it
(``allow_inexact`` lifts it, as Torch-Pruning does silently) but is no longer equivalent to masking.
"""

from __future__ import annotations

import numpy as np

from .base import ROLE_MEAN, ROLE_SCALE, ROLE_SHIFT, ROLE_VAR, RuleRefused, couples, updates


@couples("BatchNormalization")
def batch_norm(ctx):
    x = ctx.inputs[0]
    ctx.tie_same(x, ctx.outputs[0])
    for name, role in zip(ctx.inputs[1:5], (ROLE_SCALE, ROLE_SHIFT, ROLE_MEAN, ROLE_VAR)):
        ctx.tie(name, 0, x, 1)
        ctx.role(name, role)
    for out in ctx.outputs[1:]:
        if out:
            ctx.tie(out, 0, x, 1)


@couples("InstanceNormalization")
def instance_norm(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    ctx.tie(x, 0, y, 0)
    ctx.tie(x, 1, y, 1)
    for name, role in zip(ctx.inputs[1:3], (ROLE_SCALE, ROLE_SHIFT)):
        ctx.tie(name, 0, x, 1)
        ctx.role(name, role)


@couples("GroupNormalization")
def group_norm(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    groups = int(ctx.attr("num_groups"))
    channels = ctx.shape(x)[1]
    if not isinstance(channels, int) or channels % groups:
        raise RuleRefused(f"{groups} groups do not divide the channels of '{x}'")
    virtual = ctx.virtual("groups", groups)
    ctx.tie(x, 0, y, 0)
    ctx.tie(x, 1, y, 1)
    ctx.tie_keys(ctx.key(x, 1), virtual, np.arange(channels) // (channels // groups))
    for name, role in zip(ctx.inputs[1:3], (ROLE_SCALE, ROLE_SHIFT)):
        size = ctx.shape(name)[0]
        ctx.tie_keys(ctx.key(name, 0), virtual if size == groups and size != channels else ctx.key(x, 1))
        ctx.role(name, role)


@updates("GroupNormalization")
def group_norm_count(edit):
    edit.set_attr("num_groups", edit.virtual_size("groups"))


@couples("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layer_norm(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    rank = ctx.rank(x)
    axis = int(ctx.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    ctx.tie_same(x, y)
    for stat in ctx.outputs[1:]:  # Mean / InvStdDev keep size 1 on the normalised axes
        if stat:
            for a in range(axis):
                ctx.tie(x, a, stat, a)
            for a in range(axis, rank):
                ctx.leave_axis(stat, a)
    for name, role in zip(ctx.inputs[1:3], (ROLE_SCALE, ROLE_SHIFT)):
        if name:
            ctx.tie_broadcast(y, [name])
            ctx.role(name, role)
    for a in range(axis, rank):
        ctx.pin(x, a, f"{ctx.op} '{ctx.node.name}' normalises over this axis (its statistics would change)",
                soft=True)
