"""The layers whose latency a plan changes: Conv (group 1 or depthwise) and MatMul/Gemm with a constant weight whose
input or output width some plan can reduce. Each becomes a ``LayerSpec`` that targets/measure.py can rebuild alone at
any width; layers no plan can narrow are part of the model's remaining time.
"""

from __future__ import annotations

import numpy as np

from .analysis import Analysis
from .cost import CostModel
from .graph import node_attr
from .latency_plan import Layer, lowest_removal



def _concrete(shape, dim_values: dict[str, int]) -> tuple[int, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else int(dim_values.get(d, 1)) for d in shape)


def _conv(node, graph, x, w):
    from .targets.measure import LayerSpec

    if len(x) != 4 or len(w) != 4 or node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    group = int(node_attr(node, "group", 1))
    depthwise = group > 1 and group == x[1] and w[1] == 1
    if group != 1 and not depthwise:
        return None
    spec = LayerSpec("conv", rows=x[0], height=x[2], width=x[3], kernel=(w[2], w[3]),
                     stride=tuple(node_attr(node, "strides", [1, 1])),
                     pads=tuple(node_attr(node, "pads", [0, 0, 0, 0])),
                     dilation=tuple(node_attr(node, "dilations", [1, 1])), depthwise=depthwise,
                     bias=len(node.input) > 2 and bool(node.input[2]))
    out_hw = spec.out_hw()
    return spec, x[0] * out_hw[0] * out_hw[1], False


def _matmul(node, graph, x, w):
    from .targets.measure import LayerSpec

    if len(w) != 2 or len(x) < 2:
        return None
    if node.op_type == "Gemm":
        if node_attr(node, "transA", 0):
            return None
        spec = LayerSpec("matmul", rows=x[0], bias=len(node.input) > 2 and bool(node.input[2]))
        return spec, x[0], bool(node_attr(node, "transB", 0))
    rows = int(np.prod(x[:-1]))
    return LayerSpec("matmul", rows=rows), rows, False


def find_layers(analysis: Analysis, cost_model: CostModel, dim_values: dict[str, int] | None,
                round_to: int) -> list[Layer]:
    graph = analysis.graph
    values = dim_values or {}
    full_shape = cost_model.shape_function(np.zeros(analysis.atom_count, dtype=bool))
    low_shape = cost_model.shape_function(lowest_removal(analysis, round_to))
    layers = []
    for node in graph.nodes:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or not graph.is_weight(node.input[1]):
            continue
        x = _concrete(graph.shape(node.input[0]), values)
        w = graph.shape(node.input[1])
        if x is None or w is None:
            continue
        found = (_conv if node.op_type == "Conv" else _matmul)(node, graph, x, w)
        if found is None:
            continue
        spec, pixels, transposed = found
        layer = Layer(node.name, node.op_type, node.input[1], spec, (0, 0), (0, 0), int(pixels), transposed)
        layer.full, layer.lowest = layer.widths(full_shape), layer.widths(low_shape)
        if layer.full != layer.lowest:
            layers.append(layer)
    return layers
