"""ONNX Runtime's com.microsoft ops that optimised exports contain: FusedConv, Attention (packed QKV weights),
SkipLayerNormalization and the fused Gelu variants. (MultiHeadAttention lives with the other attention ops.)

FusedConv is a Conv with an activation and an optional residual input Z, so it couples like Conv and Z like the
output. Attention projects its input with one packed ``[in, q + k + v]`` weight; a whole head goes (its columns in
each of the three blocks, its bias entries and its slice of the output), and ``num_heads`` and
``qkv_hidden_sizes`` follow. Past/present key-value caches and attention biases carry heads too and are not mapped,
so an Attention with them is pinned. SkipLayerNormalization normalises over the hidden axis like LayerNorm (a soft
pin).
"""

from __future__ import annotations

import numpy as np

from .base import ROLE_BIAS, ROLE_SCALE, ROLE_SHIFT, ROLE_WEIGHT, RuleRefused, couples, updates
from .conv import conv, conv_group_count

MS = "com.microsoft"

updates("FusedConv", domain=MS)(conv_group_count)


@couples("FusedConv", domain=MS)
def fused_conv(ctx):
    conv(ctx)
    if ctx.input(3):  # Z, added to the conv's output before the activation
        ctx.tie_same(ctx.input(3), ctx.outputs[0])


def _qkv_sizes(ctx, total: int) -> tuple[int, int, int]:
    sizes = ctx.attr("qkv_hidden_sizes")
    if sizes:
        return tuple(int(s) for s in sizes)
    if total % 3:
        raise RuleRefused("the packed QKV weight is not three equal blocks")
    return (total // 3,) * 3


@couples("Attention", domain=MS)
def packed_attention(ctx):
    x, w, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    bias = ctx.input(2)
    if any(ctx.inputs[4:]) or any(ctx.outputs[1:]) or ctx.attr("do_rotary", 0):
        raise RuleRefused("past/present caches, attention biases and rotary embeddings are not mapped")
    heads = int(ctx.attr("num_heads"))
    total = ctx.shape(w)[1] if ctx.shape(w) is not None and len(ctx.shape(w)) == 2 else None
    if not isinstance(total, int):
        raise RuleRefused(f"the packed QKV weight '{w}' has no static [in, q + k + v] shape")
    blocks = _qkv_sizes(ctx, total)
    if sum(blocks) != total or any(size % heads for size in blocks):
        raise RuleRefused(f"QKV sizes {blocks} do not split into {heads} heads")
    head_of_column = np.concatenate([np.arange(size) // (size // heads) for size in blocks])
    virtual = ctx.virtual("heads", heads)
    ctx.tie(x, 0, y, 0)
    ctx.tie(x, 1, y, 1)
    ctx.tie(x, 2, w, 0)
    ctx.tie_keys(ctx.key(w, 1), virtual, head_of_column)
    if bias:
        ctx.tie(bias, 0, w, 1)
    ctx.tie_keys(ctx.key(y, 2), virtual, np.arange(blocks[2]) // (blocks[2] // heads))
    if ctx.input(3):
        ctx.leave(ctx.input(3))  # a key mask: per batch and position, not per channel
    ctx.role(w, ROLE_WEIGHT)
    ctx.role(bias, ROLE_BIAS)


@updates("Attention", domain=MS)
def packed_attention_heads(edit):
    old, kept = int(edit.attr("num_heads")), edit.virtual_size("heads")
    edit.set_attr("num_heads", kept)
    sizes = edit.attr("qkv_hidden_sizes")
    if sizes:
        edit.set_attr("qkv_hidden_sizes", [int(s) // old * kept for s in sizes])


@couples("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def skip_layer_norm(ctx):
    x, skip, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    rank = ctx.rank(x)
    ctx.tie_same(x, y)
    ctx.tie_broadcast(y, [skip])
    params = ctx.inputs[2:5] if ctx.op == "SkipLayerNormalization" else [ctx.input(2), "", ctx.input(3)]
    for name, role in zip(params, (ROLE_SCALE, ROLE_SHIFT, ROLE_BIAS)):
        if name:
            ctx.tie(name, 0, x, rank - 1)
            ctx.role(name, role)
    for index, out in enumerate(ctx.outputs[1:], start=1):
        if not out:
            continue
        if index == 3:
            ctx.tie_same(x, out)  # input + skip + bias
            continue
        for axis in range(ctx.rank(out) - 1):
            ctx.tie(x, axis, out, axis)
        ctx.leave_axis(out, ctx.rank(out) - 1)
    ctx.pin(x, rank - 1, f"{ctx.op} '{ctx.node.name}' normalises over this axis (its statistics would change)",
            soft=True)


@couples("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", domain=MS)
def fused_elementwise(ctx):
    ctx.tie_broadcast(ctx.outputs[0], ctx.inputs)
    for name in ctx.inputs[1:]:
        ctx.role(name, ROLE_BIAS)
