"""Fused attention ops: ONNX ``Attention`` (opset 23) and com.microsoft ``MultiHeadAttention``.

The unit is a whole head: query head ``h`` goes with key/value head ``h // (q_heads / kv_heads)`` (grouped-query
attention keeps K/V heads consistent), the head dim of Q and K is contracted, V's head dim reaches the output. With
3-D inputs ``[B, S, heads*D]`` the head counts are attributes, and they follow the kept counts.
"""

from __future__ import annotations

import numpy as np

from .base import RuleRefused, couples, updates


def _head_counts(ctx, q: str, k: str) -> tuple[int, int]:
    if ctx.op == "MultiHeadAttention":
        heads = int(ctx.attr("num_heads"))
        return heads, heads
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    if q_heads is None or kv_heads is None:
        raise RuleRefused("3-D attention inputs without head counts")
    return int(q_heads), int(kv_heads)


@couples("MultiHeadAttention", domain="com.microsoft")
@couples("Attention")
def attention(ctx):
    q, k, v = ctx.inputs[0], ctx.inputs[1], ctx.inputs[2]
    y = ctx.outputs[0]
    if ctx.op == "MultiHeadAttention" or ctx.rank(q) == 3:
        _attention_3d(ctx, q, k, v, y)
    else:
        _attention_4d(ctx, q, k, v, y)
    # masks, past keys/values and biases (inputs 3 on) stay pinned: the rule does not mention them


def _attention_4d(ctx, q, k, v, y):
    for name in (k, v, y):
        ctx.tie(q, 0, name, 0)
    q_heads, kv_heads = ctx.shape(q)[1], ctx.shape(k)[1]
    if not isinstance(q_heads, int) or not isinstance(kv_heads, int) or q_heads % kv_heads:
        raise RuleRefused("head counts are dynamic or do not divide")
    ctx.tie(q, 1, y, 1)
    ctx.tie(q, 1, k, 1, np.arange(q_heads) // (q_heads // kv_heads))
    ctx.tie(k, 1, v, 1)
    ctx.tie(q, 2, y, 2)
    ctx.tie(k, 2, v, 2)
    ctx.tie(q, 3, k, 3)
    ctx.tie(v, 3, y, 3)


def _attention_3d(ctx, q, k, v, y):
    q_heads, kv_heads = _head_counts(ctx, q, k)
    if q_heads % kv_heads:
        raise RuleRefused("query heads are not a multiple of key/value heads")
    for name in (k, v, y):
        ctx.tie(q, 0, name, 0)
    ctx.tie(q, 1, y, 1)
    ctx.tie(k, 1, v, 1)
    heads = ctx.virtual("q_heads", q_heads)
    kv = ctx.virtual("kv_heads", kv_heads)
    ctx.tie_keys(heads, kv, np.arange(q_heads) // (q_heads // kv_heads))
    for name, virtual, count in ((q, heads, q_heads), (y, heads, q_heads), (k, kv, kv_heads), (v, kv, kv_heads)):
        width = ctx.shape(name)[2]
        if not isinstance(width, int) or width % count:
            raise RuleRefused(f"'{name}' is not split evenly into {count} heads")
        ctx.tie_keys(ctx.key(name, 2), virtual, np.arange(width) // (width // count))


@updates("MultiHeadAttention", domain="com.microsoft")
@updates("Attention")
def attention_heads(edit):
    if edit.op == "MultiHeadAttention":
        edit.set_attr("num_heads", edit.virtual_size("q_heads"))
    elif edit.attr("q_num_heads") is not None and len(edit.old_shape(edit.inputs[0])) == 3:
        edit.set_attr("q_num_heads", edit.virtual_size("q_heads"))
        edit.set_attr("kv_num_heads", edit.virtual_size("kv_heads"))
