"""Gemm, MatMul and Einsum: the contracted axis of the two operands is tied, free axes pass to the output.

Weights may sit on either side (``x @ W`` or ``W @ x``); batched MatMul broadcasts its leading axes like any
elementwise op. Einsum ties every occurrence of a letter; a letter repeated within one operand (a diagonal) or an
ellipsis the rule cannot align is refused and so pinned.
"""

from __future__ import annotations

import re

from .base import ROLE_BIAS, ROLE_WEIGHT, LinearLayer, RuleRefused, couples


@couples("Gemm")
def gemm(ctx):
    a, b, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    c = ctx.input(2)
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    a_m, a_k = (1, 0) if trans_a else (0, 1)
    b_k, b_n = (1, 0) if trans_b else (0, 1)
    ctx.tie(a, a_m, y, 0)
    ctx.tie(a, a_k, b, b_k)
    ctx.tie(b, b_n, y, 1)
    if c:
        ctx.tie_broadcast(y, [c])
        ctx.role(c, ROLE_BIAS)
    ctx.role(a, ROLE_WEIGHT)
    ctx.role(b, ROLE_WEIGHT)
    if ctx.graph.is_weight(b) and not ctx.graph.is_weight(a):
        ctx.layer(LinearLayer(ctx.node.name, "gemm", b, b_k, b_n, a, a_k, y, 1, c or None))


@couples("MatMul")
def matmul(ctx):
    a, b, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    ctx.role(a, ROLE_WEIGHT)
    ctx.role(b, ROLE_WEIGHT)
    if ra == 1 and rb == 1:
        ctx.tie(a, 0, b, 0)
        return
    if ra == 1:
        ctx.tie(a, 0, b, rb - 2)
        ctx.tie(b, rb - 1, y, ry - 1)
        _tie_batch(ctx, b, rb - 2, y, ry - 1)
        return
    if rb == 1:
        ctx.tie(a, ra - 1, b, 0)
        ctx.tie(a, ra - 2, y, ry - 1)
        _tie_batch(ctx, a, ra - 2, y, ry - 1)
        return
    ctx.tie(a, ra - 1, b, rb - 2)
    ctx.tie(a, ra - 2, y, ry - 2)
    ctx.tie(b, rb - 1, y, ry - 1)
    _tie_batch(ctx, a, ra - 2, y, ry - 2)
    _tie_batch(ctx, b, rb - 2, y, ry - 2)
    if rb == 2 and ctx.graph.is_weight(b) and not ctx.graph.is_weight(a):
        ctx.layer(LinearLayer(ctx.node.name, "matmul", b, 0, 1, a, ra - 1, y, ry - 1))


def _tie_batch(ctx, operand: str, operand_batch: int, out: str, out_batch: int) -> None:
    """Broadcast the leading (batch) axes of ``operand`` against those of ``out``, aligned on the right."""
    shape, out_shape = ctx.shape(operand), ctx.shape(out)
    shift = out_batch - operand_batch
    for axis in range(operand_batch):
        if shape[axis] == 1 and out_shape[axis + shift] != 1:
            continue
        ctx.tie(operand, axis, out, axis + shift)


_TERM = re.compile(r"^[A-Za-z]*$")


@couples("Einsum")
def einsum(ctx):
    equation = ctx.attr("equation").decode() if isinstance(ctx.attr("equation"), bytes) else ctx.attr("equation")
    equation = equation.replace(" ", "")
    if "..." in equation:
        raise RuleRefused("Einsum with an ellipsis is not mapped")
    if "->" not in equation:
        raise RuleRefused("Einsum without an explicit output is not mapped")
    lhs, rhs = equation.split("->")
    terms = lhs.split(",")
    operands = [name for name in ctx.inputs]
    if len(terms) != len(operands) or not all(_TERM.match(t) for t in terms + [rhs]):
        raise RuleRefused(f"Einsum equation '{equation}' is not understood")
    places: dict[str, list[tuple[str, int]]] = {}
    for term, name in zip(terms + [rhs], operands + [ctx.outputs[0]]):
        if len(set(term)) != len(term):
            raise RuleRefused(f"Einsum term '{term}' repeats a letter (a diagonal)")
        for axis, letter in enumerate(term):
            places.setdefault(letter, []).append((name, axis))
        ctx.role(name, ROLE_WEIGHT)
    for letter, where in places.items():
        first = where[0]
        for other in where[1:]:
            ctx.tie(first[0], first[1], other[0], other[1])
