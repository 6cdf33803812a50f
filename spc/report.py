"""Terminal tables and JSON-ready summaries of an analysis."""

from __future__ import annotations

import numpy as np

from .analysis import Analysis
from .cost import CostModel


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A plain aligned text table."""
    right = right if right is not None else set()
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]).rstrip()


def human(number: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.2f}{unit}"
    return f"{number:.0f}"


def channel_groups(analysis: Analysis):
    """Groups that carry activations (pinned kernel axes and the like are noise for a reader)."""
    return [g for g in analysis.groups if any(not analysis.graph.is_weight(key[0]) for key in g.dims)]


def analysis_summary(analysis: Analysis, dim_values: dict[str, int] | None = None) -> dict:
    """Every channel group with its share of parameters and MACs (what removing all of it would save)."""
    costs = CostModel(analysis, dim_values)
    base = costs.base
    groups = []
    for group in channel_groups(analysis):
        removed = np.zeros(analysis.atom_count, dtype=bool)
        removed[group.atoms] = True
        after = costs.evaluate(removed)
        groups.append({
            "group": group.id,
            "name": group.name,
            "units": group.size,
            "width": group.width,
            "params_share": round(1 - after.params / base.params, 4) if base.params else 0.0,
            "macs_share": round(1 - after.macs / base.macs, 4) if base.macs else 0.0,
            "nodes": group.nodes,
            "pinned": group.pin_reason,
            "inexact": group.inexact_reason,
        })
    return {
        "nodes": len(analysis.graph.nodes),
        "params": base.params,
        "macs": base.macs,
        "prunable_groups": sum(1 for g in groups if g["pinned"] is None),
        "pinned_groups": sum(1 for g in groups if g["pinned"] is not None),
        "groups": groups,
    }


def analysis_text(summary: dict, source: str) -> str:
    prunable = [g for g in summary["groups"] if g["pinned"] is None]
    pinned = [g for g in summary["groups"] if g["pinned"] is not None]
    out = [f"{source}: {summary['nodes']} nodes, {human(summary['params'])} params, {human(summary['macs'])} MACs; "
           f"{len(prunable)} prunable groups, {len(pinned)} pinned"]
    if prunable:
        rows = [[g["group"], g["name"], g["units"], g["width"], f"{g['params_share']:.1%}", f"{g['macs_share']:.1%}",
                 "inexact" if g["inexact"] else ""] for g in prunable]
        out += ["", table(["#", "prunable group", "units", "ch/unit", "params", "MACs", ""], rows, {0, 2, 3, 4, 5})]
    if pinned:
        rows = [[g["group"], g["name"], g["units"], g["pinned"]] for g in pinned]
        out += ["", table(["#", "pinned group", "units", "why"], rows, {0, 2})]
    return "\n".join(out)


def layer_costs(analysis: Analysis, before, after, removed: np.ndarray) -> list[dict]:
    """MACs, weight parameters and output channels of each costed layer before and after removing ``removed``
    (``before``/``after`` are the plan's ``Cost``s, whose per-node MACs honour ``--dim``)."""
    graph = analysis.graph
    costs = CostModel(analysis)
    new_shape = costs.shape_function(removed)
    axes = {layer.node: layer.output_axis for layer in analysis.layers}
    rows = []
    for node in costs.cost_nodes:
        weights = [name for name in node.input if name and graph.is_weight(name)]
        old_shape = lambda name: graph.shape(name) or ()  # noqa: E731
        axis = axes.get(node.name, 1 if node.op_type.startswith("Conv") else -1)
        rows.append({
            "node": node.name, "op": node.op_type,
            "macs": {"before": before.node_macs.get(node.name, 0), "after": after.node_macs.get(node.name, 0)},
            "params": {"before": sum(_size(old_shape(w)) for w in weights),
                       "after": sum(_size(new_shape(w) or ()) for w in weights)},
            "channels": {"before": _dim(old_shape(node.output[0]), axis),
                         "after": _dim(new_shape(node.output[0]), axis)},
        })
    return rows


def _size(shape) -> int:
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))


def _dim(shape, axis: int):
    try:
        value = shape[axis]
    except (TypeError, IndexError):
        return None
    return value if isinstance(value, int) else None
