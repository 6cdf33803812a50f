"""Run the high-resolution start of a CNN one image at a time when the batch is static ("depth-first").

With a batch of 8, each of MobileNetV2's first layers writes eight images' feature maps (the stem's 32 x 112 x 112
output: 12.8 MB) before the next layer reads them back, so those layers run out of L3 or memory; one image's maps
stay in the 1 MB L2 from layer to layer. Late layers are the other way round: small maps and large weights, which a
batch reads once for all its images. So the graph is cut where the maps stop outweighing the weights: the prefix is
split into one copy per image (``Split`` on axis 0, the prefix's nodes copied, a ``Concat`` of each tensor that
crosses the cut) and the rest runs on the whole batch. The copies are identical kernels; the lowering compiles
each once.

Only ops that treat each image apart may join the prefix: ``PER_IMAGE`` maps an op type to a check of one node
(adding an op is one entry). A binary op's constant operand must not carry a batch axis of its own. Like the
folding passes, the result only feeds the compiler: the bundle keeps the model as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spc.graph import Graph, node_attr
from spc.rewrite import unique_name

# a convolution joins the prefix while its largest feature map (per image, input or output) is at least this many
# times its weights: at batch 8 on one thread, values from 4 to 32 ran MobileNetV2 and EfficientNet-Lite0 1.07-1.15x
# faster than no split (bench/README.md); 8 cuts MobileNetV2 in its 28 -> 14 block, where the ratio falls under 8
MAP_TO_WEIGHT = 8.0
# below this the batch's maps fit in L2 anyway: nothing to gain, and the copies cost compile time
MIN_BATCH_MAP_BYTES = 1 << 20
MAX_CROSSING = 4  # tensors a cut may cross (each one a Concat)
# the tensors crossing the cut are copied once more (the Concat): a cut pays where they are small next to the
# prefix's largest map (MobileNetV2's cut: 150 KB per image against 4.8 MB; a 56x56 CNN cut after its stem, where
# the crossing map is the largest, ran 1.2x slower)
CROSSING_SHARE = 0.25


class _Graph(Graph):
    """spc's graph index (static shapes after inference, consumers including what If/Loop bodies read, constant
    values) with the two questions the checks ask of a tensor."""

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or self.computed(name) is not None

    def value(self, name: str) -> np.ndarray | None:
        return self.computed(name)


def _any(_node, _graph) -> bool:
    return True


def _constant_parameters(node, graph: _Graph) -> bool:
    """Conv weights and bias, BatchNorm statistics, Clip bounds: constants shared by every image."""
    return all(graph.is_constant(name) for name in node.input[1:] if name)


def _batch_norm(node, graph: _Graph) -> bool:
    return not node_attr(node, "training_mode", 0) and _constant_parameters(node, graph)


def _broadcast(node, graph: _Graph) -> bool:
    """A constant operand of rank 4 with a first axis above 1 would give each image its own slice."""
    for name in node.input:
        shape = graph.shape(name) if graph.is_constant(name) else None
        if shape is not None and len(shape) >= 4 and shape[0] != 1:
            return False
    return True


def _pad(node, graph: _Graph) -> bool:
    """Constant amounts, none on the batch axis (with an ``axes`` input: axis 0 not among them)."""
    if len(node.input) > 3 and node.input[3]:
        axes, rank = graph.value(node.input[3]), len(graph.shape(node.output[0]) or ())
        return axes is not None and rank > 0 and all(int(a) % rank != 0 for a in axes.reshape(-1))
    amounts = graph.value(node.input[1]) if len(node.input) > 1 else node_attr(node, "pads")
    if amounts is None:
        return False
    amounts = [int(a) for a in np.asarray(amounts).reshape(-1)]
    return len(amounts) >= 2 and amounts[0] == 0 and amounts[len(amounts) // 2] == 0


def _one_output(node, _graph) -> bool:
    """MaxPool's optional indices count over the whole batch: a copy per image would restart them."""
    return len([name for name in node.output if name]) == 1


def _keeps_batch_axis(node, graph: _Graph) -> bool:
    perm = node_attr(node, "perm")
    return perm is not None and perm[0] == 0


def _not_on_batch_axis(node, graph: _Graph) -> bool:
    rank = len(graph.shape(node.output[0]) or ())
    return rank > 0 and node_attr(node, "axis", 0) % rank != 0


# op type -> whether this node treats each image apart (a node that does not stays with the rest)
PER_IMAGE: dict[str, Callable[[onnx.NodeProto, _Graph], bool]] = {
    "Conv": _constant_parameters,
    "BatchNormalization": _batch_norm,
    "Clip": _constant_parameters,
    **dict.fromkeys(["Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus",
                     "Identity", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"], _any),
    "MaxPool": _one_output,
    **dict.fromkeys(["Add", "Sub", "Mul", "Div"], _broadcast),
    "Pad": _pad,
    "Transpose": _keeps_batch_axis,
    "Concat": _not_on_batch_axis,
}


def _bytes(shape) -> int:
    return 4 * int(np.prod(shape)) if shape and all(isinstance(d, int) and d > 0 for d in shape) else 0


@dataclass
class Cut:
    """The nodes at ``nodes`` (indices into the graph) run per image; ``crossing`` are the prefix's tensors that the
    other nodes read."""

    nodes: list[int]
    crossing: list[str]
    input: str
    batch: int


def _spatial(shape) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


def choose_cut(model: onnx.ModelProto) -> Cut | None:
    """Where to cut ``model`` (static shapes, one image input [N, C, H, W] with N > 1), or None when no prefix
    would pay. Nodes join in graph order while they treat images apart and read only the input and the prefix; a
    node that cannot join stays with the rest (a ``Shape`` of the input, say) and the scan goes on; it ends at the
    first convolution on a feature map whose maps no longer outweigh its weights (``MAP_TO_WEIGHT``)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in inits]
    if len(inputs) != 1:
        return None
    x = inputs[0].name
    x_shape = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
    if len(x_shape) != 4 or not _bytes(x_shape) or x_shape[0] < 2:  # declared static: Graph would probe sizes
        return None
    try:
        info = _Graph(model)
    except Exception:  # noqa: BLE001 - shape inference refuses some valid models; then there is no cut
        return None
    batch = x_shape[0]
    index_of = {id(node): index for index, node in enumerate(info.nodes)}
    outputs = set(info.outputs)
    members: list[int] = []
    produced: set[str] = set()
    best, largest = None, 0
    for index, node in enumerate(info.nodes):
        if node.op_type == "Constant":
            continue
        data = [name for name in node.input if name and not info.is_constant(name)]
        check = PER_IMAGE.get(node.op_type)
        shapes = [info.shape(name) for name in node.output]
        if (node.domain not in ("", "ai.onnx") or check is None or not check(node, info) or not data
                or any(name != x and name not in produced for name in data)
                or any(not _bytes(shape) or shape[0] != batch for shape in shapes)):
            continue  # stays with the rest
        maps = max(_bytes(info.shape(name)) for name in data + list(node.output)) // batch
        if node.op_type == "Conv" and _spatial(shapes[0]) and \
                maps < MAP_TO_WEIGHT * _bytes(info.shape(node.input[1])):
            break
        largest = max(largest, maps)
        members.append(index)
        produced.update(node.output)
        if produced & outputs:
            break
        inside = set(members)
        crossing = sorted(name for name in produced
                          if any(index_of[id(reader)] not in inside for reader in info.consumers.get(name, ())))
        crossing_bytes = sum(_bytes(info.shape(name)) for name in crossing) // batch
        if 0 < len(crossing) <= MAX_CROSSING and crossing_bytes <= CROSSING_SHARE * largest:
            best = Cut(list(members), crossing, x, batch)
    if best is None or largest * batch < MIN_BATCH_MAP_BYTES:
        return None
    return best


def per_image_outputs(model: onnx.ModelProto) -> tuple[set[str], int]:
    """The outputs of the nodes ``split_prefix`` would run one image at a time, and the number of images (an empty
    set and 1 when there is no cut): the latency planner times those layers per image, as they run."""
    cut = choose_cut(model)
    if cut is None:
        return set(), 1
    return {name for index in cut.nodes for name in model.graph.node[index].output if name}, cut.batch


def split_prefix(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict | None]:
    """``model`` with its prefix (``choose_cut``) run once per image, and what was done (for the manifest); the
    model itself and None when no prefix pays."""
    cut = choose_cut(model)
    if cut is None:
        return model, None
    graph = model.graph
    inside = set(cut.nodes)
    prefix = [node for index, node in enumerate(graph.node) if index in inside or node.op_type == "Constant"]
    rest = [node for index, node in enumerate(graph.node) if index not in inside and node.op_type != "Constant"]
    taken = {name for node in graph.node for name in list(node.input) + list(node.output)}
    taken |= {t.name for t in graph.initializer} | {vi.name for vi in graph.input} | {n.name for n in graph.node}
    nodes = [node for node in prefix if node.op_type == "Constant"]  # shared by every copy
    images = [unique_name(f"{cut.input}__image{i}", taken) for i in range(cut.batch)]
    split_name = unique_name("depth_first_split", taken)
    opset = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 13)
    if opset < 13:  # the sizes were an attribute before opset 13
        nodes.append(helper.make_node("Split", [cut.input], images, axis=0, split=[1] * cut.batch, name=split_name))
    else:
        sizes = unique_name("depth_first_sizes", taken)
        nodes.append(helper.make_node("Constant", [], [sizes],
                                      value=numpy_helper.from_array(np.ones(cut.batch, dtype=np.int64))))
        nodes.append(helper.make_node("Split", [cut.input, sizes], images, axis=0, name=split_name))
    copies: dict[str, list[str]] = {name: [] for name in cut.crossing}
    for i, image in enumerate(images):
        renamed = {cut.input: image}
        for node in prefix:
            if node.op_type == "Constant":
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = unique_name(f"{node.name or node.op_type}__image{i}", taken)
            for j, name in enumerate(node.input):
                copy.input[j] = renamed.get(name, name)
            for j, name in enumerate(node.output):
                renamed[name] = copy.output[j] = unique_name(f"{name}__image{i}", taken)
            nodes.append(copy)
        for name in cut.crossing:
            copies[name].append(renamed[name])
    for name in cut.crossing:
        nodes.append(helper.make_node("Concat", copies[name], [name], axis=0,
                                      name=unique_name(f"{name}__concat", taken)))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes + rest)
    return out, {"images": cut.batch, "prefix_nodes": sum(node.op_type != "Constant" for node in prefix),
                 "cut": cut.crossing}
