"""The layers whose latency a plan changes: Conv (group 1 or depthwise) and MatMul/Gemm with a constant weight whose
input or output width some plan can reduce. Each becomes a ``LayerSpec`` that targets/measure.py can rebuild alone at
any width; layers no plan can narrow are part of the model's remaining time.

A 1x1 conv whose output only a depthwise conv reads (through BatchNormalization, a ReLU/Clip and a zero Pad, which
the compiler folds or fuses) is one layer with that depthwise conv: the compiler runs such a pair as one kernel
(targets/kernels/expand_depthwise.py), so the pair is timed as it runs. Timed apart, MobileNetV2's pairs added up to
1.6x the whole model and the planner over-valued the expanded channels of the first blocks.
"""

from __future__ import annotations

from dataclasses import replace

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
    height, width, pads = x[2], x[3], tuple(node_attr(node, "pads", [0, 0, 0, 0]))
    folded = _folded_pad(graph, node)
    if folded is not None:
        (top, left, bottom, right), pads = folded
        height, width = height - top - bottom, width - left - right
    spec = LayerSpec("conv", rows=x[0], height=height, width=width, kernel=(w[2], w[3]),
                     stride=tuple(node_attr(node, "strides", [1, 1])), pads=pads,
                     dilation=tuple(node_attr(node, "dilations", [1, 1])), depthwise=depthwise,
                     bias=_has_bias(graph, node))
    out_hw = spec.out_hw()
    return spec, x[0] * out_hw[0] * out_hw[1], False


def _folded_pad(graph, conv) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(the zero Pad's spatial amounts as conv pads, the conv's pads with them merged in) where a Pad that only
    ``conv`` reads is folded into it by the compiler (targets/fold.fold_pad), else None."""
    from .targets.fold import merged_conv_pads, zero_pad_amounts

    pad = graph.producer.get(conv.input[0])
    if pad is None or pad.op_type != "Pad" or _single_reader(graph, pad.output[0]) is not conv:
        return None
    amounts = zero_pad_amounts(pad, graph.computed)
    merged = merged_conv_pads(conv, amounts) if amounts is not None else None
    if merged is None or len(merged) != 4:
        return None
    added = tuple(int(m) - int(p) for m, p in zip(merged, node_attr(conv, "pads", [0, 0, 0, 0])))
    return added, tuple(int(m) for m in merged)


def _has_bias(graph, conv) -> bool:
    """A bias input, or a BatchNormalization after it (the compiler folds it into a bias)."""
    reader = _single_reader(graph, conv.output[0])
    return (len(conv.input) > 2 and bool(conv.input[2])) or (reader is not None
                                                              and reader.op_type == "BatchNormalization")


def _single_reader(graph, name: str):
    readers = graph.consumers.get(name, [])
    return readers[0] if len(readers) == 1 and name not in graph.outputs else None


def _scalar(graph, name: str) -> float | None:
    value = graph.computed(name) if name else None
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _activation(graph, node) -> str | None:
    """The LayerSpec activation of a Relu or a Clip with constant bounds; None for any other op."""
    if node.op_type == "Relu":
        return "relu"
    if node.op_type == "Clip":
        if len(node.input) > 1:  # opset >= 11: bounds as inputs
            low, high = (_scalar(graph, node.input[i]) if len(node.input) > i and node.input[i] else None
                         for i in (1, 2))
        else:
            low, high = node_attr(node, "min"), node_attr(node, "max")
        if low is not None and high is not None:
            return f"clip:{low:g}:{high:g}"
    return None


def expand_depthwise_pairs(graph) -> dict[str, tuple]:
    """1x1 Conv's output -> (the depthwise Conv, the activation between, the depthwise pads with a zero Pad between
    merged in) for every pair the compiler may run as one kernel: the 1x1 conv unstrided, unpadded, group 1,
    its output read only along BatchNormalization? -> Relu|Clip? -> Pad? -> the depthwise conv."""
    pairs = {}
    for node in graph.nodes:
        if node.op_type != "Conv" or len(node.input) < 2 or not graph.is_weight(node.input[1]):
            continue
        w = graph.shape(node.input[1])
        if w is None or len(w) != 4 or w[2:] != (1, 1) or int(node_attr(node, "group", 1)) != 1:
            continue
        if any(int(v) != 1 for v in node_attr(node, "strides", [1, 1])) or any(node_attr(node, "pads", [0] * 4)) \
                or node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", ""):
            continue
        current, activation, padded = _single_reader(graph, node.output[0]), "", False
        if current is not None and current.op_type == "BatchNormalization":
            current = _single_reader(graph, current.output[0])
        if current is not None and current.op_type in ("Relu", "Clip"):
            activation = _activation(graph, current)
            current = _single_reader(graph, current.output[0]) if activation is not None else None
        if current is not None and current.op_type == "Pad":
            current, padded = _single_reader(graph, current.output[0]), True
        if current is None or current.op_type != "Conv" or len(current.input) < 2 \
                or not graph.is_weight(current.input[1]):
            continue
        wd = graph.shape(current.input[1])
        if wd is None or len(wd) != 4 or wd[0] != w[0] or wd[1] != 1 or int(node_attr(current, "group", 1)) != w[0] \
                or node_attr(current, "auto_pad", "NOTSET") not in ("NOTSET", ""):
            continue
        folded = _folded_pad(graph, current) if padded else None
        if padded and folded is None:
            continue  # a Pad the compiler keeps: two kernels
        pads = folded[1] if folded is not None else tuple(node_attr(current, "pads", [0, 0, 0, 0]))
        if len(pads) == 4:
            pairs[node.output[0]] = (current, activation, tuple(int(p) for p in pads))
    return pairs


def _expand_depthwise(expand, depthwise, activation, pads, graph, x):
    """The pair as one LayerSpec on the 1x1 conv's input ``x``; its widths are the 1x1 conv's (in, out)."""
    from .targets.measure import LayerSpec

    wd = graph.shape(depthwise.input[1])
    bias = _has_bias(graph, expand) or _has_bias(graph, depthwise)
    spec = LayerSpec("expand_depthwise", rows=x[0], height=x[2], width=x[3], kernel=(wd[2], wd[3]),
                     stride=tuple(node_attr(depthwise, "strides", [1, 1])), pads=pads,
                     dilation=tuple(node_attr(depthwise, "dilations", [1, 1])), bias=bias, activation=activation)
    out_hw = spec.out_hw()
    return spec, x[0] * (x[2] * x[3] + out_hw[0] * out_hw[1]), False


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
                round_to: int, per_image: tuple[set[str], int] = (set(), 1)) -> list[Layer]:
    """``per_image``: (outputs of the nodes the compiled model runs one image at a time, the number of images);
    their layers are specified and timed for one image (``Layer.images``)."""
    graph = analysis.graph
    per_image_outputs, images = per_image
    values = dim_values or {}
    full_shape = cost_model.shape_function(np.zeros(analysis.atom_count, dtype=bool))
    low_shape = cost_model.shape_function(lowest_removal(analysis, round_to))
    layers, paired = [], set()
    pairs = {out: pair for out, pair in expand_depthwise_pairs(graph).items()
             if _concrete(graph.shape(graph.producer[out].input[0]), values) is not None}
    for node in graph.nodes:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or not graph.is_weight(node.input[1]):
            continue
        if node.output[0] in paired:
            continue  # timed with its 1x1 conv
        x = _concrete(graph.shape(node.input[0]), values)
        w = graph.shape(node.input[1])
        if x is None or w is None:
            continue
        name, outputs = node.name or node.output[0], [node.output[0]]
        if node.output[0] in pairs and len(x) == 4:
            depthwise, activation, pads = pairs[node.output[0]]
            paired.add(depthwise.output[0])
            outputs.append(depthwise.output[0])
            found = _expand_depthwise(node, depthwise, activation, pads, graph, x)
            name = f"{name}+{depthwise.name or depthwise.output[0]}"
        else:
            found = (_conv if node.op_type == "Conv" else _matmul)(node, graph, x, w)
        if found is None:
            continue
        spec, pixels, transposed = found
        alone = images > 1 and spec.op != "matmul" and all(out in per_image_outputs for out in outputs)
        if alone:
            spec = replace(spec, rows=1)
        layer = Layer(name, node.op_type, node.input[1], spec, (0, 0), (0, 0), int(pixels), transposed,
                      images=images if alone else 1)
        layer.full, layer.lowest = layer.widths(full_shape), layer.widths(low_shape)
        if layer.full != layer.lowest:
            layers.append(layer)
    return layers
