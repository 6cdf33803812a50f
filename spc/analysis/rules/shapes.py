"""Ops that move axes around: Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Expand, Tile, DepthToSpace, and the
shape computations that feed them.

Reshape is matched block by block (axes whose sizes multiply to the same number). An axis that splits into several
(``[B,S,C] -> [B,S,H,D]``) follows the channels on one of them: by default the leading one, so attention heads are
whole units; a merge (``[C,H,W] -> [CHW]``, heads back to channels) ties the merged axis to one input axis. Where
that choice leaves everything pinned (a channel shuffle), the analysis retries with the next axis.

Target shapes are traced back through Concat/Unsqueeze/Gather(Shape(..)) to find the constants to rewrite; a
position computed at run time in a way spc cannot follow pins the axis it sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import RuleRefused, couples, updates


@dataclass(frozen=True)
class Slot:
    kind: str  # "const" (an initializer element), "shape_of" (an axis of a tensor), "shape_expr" (arithmetic on
    # axes of tensors, recomputed at run time from the pruned sizes), "follows" (-1 turned into "keep the input's
    # size") or "unknown"
    name: str = ""
    index: int = 0


def shape_slots(graph, name: str, depth: int = 0) -> list[Slot] | None:
    """Where each element of the 1-D int tensor ``name`` comes from, or None if even its length is unknown."""
    shape = graph.shape(name)
    length = shape[0] if shape and len(shape) == 1 and isinstance(shape[0], int) else (1 if shape == () else None)
    if name in graph.initializers:
        return [Slot("const", name, i) for i in range(graph.weight(name).size)]
    node = graph.producer.get(name)
    if node is None or depth > 16:
        return None if length is None else [Slot("unknown")] * length
    op = node.op_type
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        inner = shape_slots(graph, node.input[0], depth + 1)
        if inner is not None and (length is None or len(inner) == length):
            return inner
    elif op == "Concat":
        parts = [shape_slots(graph, i, depth + 1) for i in node.input]
        if all(p is not None for p in parts):
            return [slot for part in parts for slot in part]
    elif op == "Shape":
        rank = len(graph.shape(node.input[0]) or ())
        start = _attr(node, "start", 0)
        end = _attr(node, "end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        return [Slot("shape_of", node.input[0], a) for a in range(max(0, start), min(rank, end))]
    elif op == "Gather" and _attr(node, "axis", 0) == 0:
        source = shape_slots(graph, node.input[0], depth + 1)
        index = graph.weight(node.input[1])
        if source is not None and index is not None:
            return [_frozen(source[int(i)]) for i in index.reshape(-1)]
    elif op == "Slice":
        source = shape_slots(graph, node.input[0], depth + 1)
        starts, ends = graph.weight(node.input[1]), graph.weight(node.input[2])
        steps = graph.weight(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if source is not None and starts is not None and ends is not None and (steps is None or steps[0] == 1):
            return [_frozen(slot) for slot in source[slice(int(starts[0]), int(ends[0]))]]
    elif op == "Where" and _is_minus_one_guard(graph, node):
        # the TorchScript exporter's expand(-1): Where(Equal(s, -1), 1, s) keeps s, and -1 means "input's size"
        inner = shape_slots(graph, node.input[2], depth + 1)
        if inner is not None:
            return [Slot("follows") if s.kind == "const" and _value(graph, s) == -1 else s for s in inner]
    elif op in ("Mul", "Add", "Sub", "Div", "Mod", "Max", "Min") and length is not None:
        parts = [shape_slots(graph, i, depth + 1) for i in node.input]
        if all(p is not None and len(p) in (1, length) for p in parts):
            result = []
            for position in range(length):
                kinds = {p[position if len(p) > 1 else 0].kind for p in parts}
                derived = kinds & {"shape_of", "shape_expr"} and not kinds & {"unknown"}
                result.append(Slot("shape_expr") if derived else Slot("unknown"))
            return result
    return None if length is None else [Slot("unknown")] * length


def _value(graph, slot: Slot) -> int:
    return int(graph.weight(slot.name).reshape(-1)[slot.index])


def _is_minus_one_guard(graph, node) -> bool:
    condition = graph.producer.get(node.input[0])
    return condition is not None and condition.op_type == "Equal" and node.input[2] in condition.input


def _frozen(slot: Slot) -> Slot:
    """A constant reached through Gather or Slice cannot be rewritten in place (spc rebuilds only Concat chains)."""
    return Slot("unknown") if slot.kind == "const" else slot


def _attr(node, name, default):
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def guard_shape_input(ctx, shape_name: str, out: str) -> None:
    """Pin output axes whose size comes from a run-time value spc cannot follow. Constants are rewritten after
    pruning; sizes read off tensors (``Shape(x)[2]``, possibly of another tensor than the one reshaped) are replaced
    by the new constant size when their axis shrinks, since a channel axis is always static."""
    out_shape = ctx.shape(out)
    slots = shape_slots(ctx.graph, shape_name)
    ctx.leave(shape_name)
    reason = f"{ctx.op} '{ctx.node.name}' computes this size at run time"
    if slots is None:
        for axis in range(len(out_shape)):
            ctx.pin(out, axis, reason)
        return
    shift = len(out_shape) - len(slots)
    for position, slot in enumerate(slots):
        if position + shift >= 0 and slot.kind == "unknown":
            ctx.pin(out, position + shift, reason)


def rewrite_shape_input(edit, index: int, out: str) -> None:
    """Set the constants of a target-shape input to the output's new sizes, on a private copy of whatever computes
    that input (exporters share one shape constant among many Reshapes)."""
    name = edit.input(index)
    old, new = edit.old_shape(out), edit.new_shape(out)
    slots = shape_slots(edit.graph, name)
    if slots is None:
        return
    shift = len(old) - len(slots)
    changes = {}
    for position, slot in enumerate(slots):
        axis = position + shift
        if axis < 0 or old[axis] == new[axis]:
            continue
        if slot.kind in ("shape_of", "shape_expr") or (
                slot.kind == "const" and int(edit.const(slot.name).reshape(-1)[slot.index]) == old[axis]):
            changes[position] = int(new[axis])
        # otherwise -1 (inferred), 0 (copied) or 1 (broadcast): they follow by themselves
    if changes:
        edit.rewrite_input(index, changes)


def _match(in_shape, out_shape):
    """Blocks matched from the left until a dynamic size stops the matching; also where it stopped."""
    blocks, i, j = [], 0, 0
    while i < len(in_shape) and j < len(out_shape):
        a, b = in_shape[i], out_shape[j]
        if a == b:
            blocks.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        if a == 1:
            i += 1
            continue
        if b == 1:
            j += 1
            continue
        if not isinstance(a, int) or not isinstance(b, int):
            break
        ins, outs, pa, pb, ii, jj = [i], [j], a, b, i + 1, j + 1
        while pa != pb:
            if pa < pb and ii < len(in_shape) and isinstance(in_shape[ii], int):
                pa *= in_shape[ii]
                ins.append(ii)
                ii += 1
            elif pb < pa and jj < len(out_shape) and isinstance(out_shape[jj], int):
                pb *= out_shape[jj]
                outs.append(jj)
                jj += 1
            else:
                return blocks, i, j
        blocks.append((ins, outs))
        i, j = ii, jj
    return blocks, i, j


def _blocks(in_shape, out_shape):
    """Pairs (input axes, output axes) whose sizes multiply to the same value, matched from the left and then from
    the right, so ``[B, S, C] -> [B*S, C]`` still pairs the channels even though ``B*S`` is dynamic."""
    front, i, j = _match(list(in_shape), list(out_shape))
    if i >= len(in_shape) and j >= len(out_shape):
        return front
    back, _, _ = _match(list(in_shape[i:])[::-1], list(out_shape[j:])[::-1])
    last_in, last_out = len(in_shape) - 1, len(out_shape) - 1
    for ins, outs in back:
        front.append((sorted(last_in - a for a in ins), sorted(last_out - b for b in outs)))
    return front


def _strided_map(sizes: list[int], chosen: int) -> np.ndarray:
    """For a flat index over ``sizes`` (row-major), its coordinate along axis ``chosen``."""
    inner = int(np.prod(sizes[chosen + 1:], dtype=np.int64))
    total = int(np.prod(sizes, dtype=np.int64))
    return (np.arange(total) // inner) % sizes[chosen]


def tie_blocks(ctx, x: str, y: str) -> None:
    """Tie ``x`` to its reshaped ``y`` block by block (see the module docstring)."""
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None:
        raise RuleRefused("shapes unknown")
    for number, (ins, outs) in enumerate(_blocks(in_shape, out_shape)):
        if len(ins) == 1 and len(outs) == 1:
            ctx.tie(x, ins[0], y, outs[0])
            continue
        if len(ins) > 1 and len(outs) > 1:
            continue  # a general regrouping: left unmentioned, hence pinned
        if len(ins) == 1:
            single, single_axis, many, many_axes, many_shape = x, ins[0], y, outs, out_shape
        else:
            single, single_axis, many, many_axes, many_shape = y, outs[0], x, ins, in_shape
        sizes = [many_shape[a] for a in many_axes]
        candidates = [a for a, size in zip(many_axes, sizes) if size > 1]
        picked = candidates[ctx.choice(f"block{number}", [ctx.key(many, a) for a in candidates])]
        ctx.tie(single, single_axis, many, picked, _strided_map(sizes, many_axes.index(picked)))
        for axis in candidates:
            if axis != picked:
                ctx.pin(many, axis, f"{ctx.op} '{ctx.node.name}' couples the channels through axis {picked}",
                        by_choice=True)


@couples("Reshape")
def reshape(ctx):
    x, target, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    tie_blocks(ctx, x, y)
    guard_shape_input(ctx, target, y)


@updates("Reshape")
def reshape_target(edit):
    rewrite_shape_input(edit, 1, edit.outputs[0])


@couples("Flatten")
def flatten(ctx):
    tie_blocks(ctx, ctx.inputs[0], ctx.outputs[0])


@couples("Transpose")
def transpose(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    rank = ctx.rank(x)
    perm = ctx.attr("perm") or list(reversed(range(rank)))
    for out_axis, in_axis in enumerate(perm):
        ctx.tie(x, in_axis, y, out_axis)


def _axes(ctx, rank: int) -> list[int] | None:
    axes = ctx.attr("axes")
    if axes is None and ctx.input(1):
        value = ctx.const(ctx.input(1))
        if value is None:
            raise RuleRefused("axes computed at run time")
        axes = value.reshape(-1).tolist()
        ctx.leave(ctx.input(1))
    if axes is None:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


@couples("Squeeze")
def squeeze(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    shape = ctx.shape(x)
    axes = _axes(ctx, len(shape))
    if axes is None:
        axes = [a for a, s in enumerate(shape) if s == 1]
    kept = [a for a in range(len(shape)) if a not in axes]
    for out_axis, in_axis in enumerate(kept):
        ctx.tie(x, in_axis, y, out_axis)


@couples("Unsqueeze")
def unsqueeze(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    out_rank = ctx.rank(y)
    axes = _axes(ctx, out_rank) or []
    kept = [a for a in range(out_rank) if a not in axes]
    for in_axis, out_axis in enumerate(kept):
        ctx.tie(x, in_axis, y, out_axis)


@couples("Expand")
def expand(ctx):
    ctx.leave(ctx.outputs[0])  # axes stretched from size 1 follow the target shape, rewritten below
    ctx.tie_broadcast(ctx.outputs[0], [ctx.inputs[0]])
    guard_shape_input(ctx, ctx.inputs[1], ctx.outputs[0])


@updates("Expand")
def expand_shape(edit):
    rewrite_shape_input(edit, 1, edit.outputs[0])


@couples("ConstantOfShape")
def constant_of_shape(ctx):
    ctx.leave(ctx.outputs[0])
    guard_shape_input(ctx, ctx.inputs[0], ctx.outputs[0])


@updates("ConstantOfShape")
def constant_of_shape_target(edit):
    rewrite_shape_input(edit, 0, edit.outputs[0])


@couples("Tile")
def tile(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    repeats = ctx.const(ctx.inputs[1])
    if repeats is None:
        raise RuleRefused("repeats computed at run time")
    ctx.leave(ctx.inputs[1])
    for axis, (size, count) in enumerate(zip(ctx.shape(x), repeats.reshape(-1))):
        if count == 1:
            ctx.tie(x, axis, y, axis)
        elif isinstance(size, int):
            ctx.tie(y, axis, x, axis, np.arange(size * int(count)) % size)


@couples("DepthToSpace", "SpaceToDepth")
def depth_space(ctx):
    x, y = ctx.inputs[0], ctx.outputs[0]
    block = int(ctx.attr("blocksize"))
    ctx.tie(x, 0, y, 0)
    if ctx.op == "DepthToSpace":
        channels = ctx.shape(y)[1]
        mode = ctx.attr("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        depth = ctx.shape(x)[1]
        index = np.arange(depth) % channels if mode == "DCR" else np.arange(depth) // (block * block)
        ctx.tie(x, 1, y, 1, index)
    else:
        channels = ctx.shape(x)[1]
        ctx.tie(y, 1, x, 1, np.arange(ctx.shape(y)[1]) % channels)


@couples("Shape", "Size")
def reads_shape(ctx):
    ctx.leave(ctx.inputs[0])
    ctx.leave(ctx.outputs[0])
