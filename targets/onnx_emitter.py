"""Appending ONNX nodes and constants with fresh names: what the graph rewrites ahead of code generation
(recurrent.py, conv_transpose.py) build their replacement subgraphs with."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spc.rewrite import unique_name


class Emitter:
    """Nodes and initializers for the replacement of ``node``, named ``{node}/{what}`` (made unique in ``taken``)."""

    def __init__(self, node: onnx.NodeProto, taken: set[str]):
        self.prefix = node.name or node.output[0] or node.op_type
        self.taken = taken
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def fresh(self, what: str) -> str:
        return unique_name(f"{self.prefix}/{what}", self.taken)

    def const(self, value, what: str) -> str:
        name = self.fresh(what)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))  # a 0-d value stays 0-d
        return name

    def op(self, op_type: str, inputs: list[str], what: str, outputs: int = 1, out: str | None = None, **attrs):
        """A node; its output name (``out`` if given), or the list of them for ``outputs`` > 1."""
        names = [out] if out else [self.fresh(f"{what}{i}" if outputs > 1 else what) for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(f"{what}_node"), **attrs))
        return names[0] if outputs == 1 else names


def taken_names(model: onnx.ModelProto) -> set[str]:
    """Every node, tensor, initializer and graph input name of ``model``."""
    taken = {name for n in model.graph.node for name in list(n.input) + list(n.output) + [n.name]}
    return taken | {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}


def replaced(model: onnx.ModelProto, emitters: dict[int, Emitter]) -> onnx.ModelProto:
    """A copy of ``model`` with each node whose id() is a key of ``emitters`` replaced by that emitter's nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        emitter = emitters.get(id(node))
        if emitter is None:
            out.graph.node.append(node)
        else:
            out.graph.node.extend(emitter.nodes)
            out.graph.initializer.extend(emitter.inits)
    return out


LAYOUT_OPS = frozenset({"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Concat", "Slice",
                        "Gather", "Split"})  # how exporters arrange weights out of initializers


def constant_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The values of ``names`` that are initializers or computed from initializers by layout ops only (torch's
    dynamo exporter stores an LSTM's weights 2-D and Unsqueezes them): the weights a rewrite can read (with the
    tensors read on the way)."""
    from spc.graph import evaluate_node
    from spc.io import default_opset

    initializers = {t.name: t for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}  # only what ``names`` reach is read (a large model's other weights are not)
    producer = {out: node for node in model.graph.node for out in node.output}
    opset = default_opset(model)

    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        if name in initializers:
            values[name] = numpy_helper.to_array(initializers[name])
            return values[name]
        node = producer.get(name)
        if node is None or node.op_type not in LAYOUT_OPS or node.domain not in ("", "ai.onnx"):
            return None
        inputs = {}
        for source in node.input:
            if source and value(source) is None:
                return None
            if source:
                inputs[source] = values[source]
        values.update(evaluate_node(node, inputs, opset))
        return values.get(name)

    for name in names:
        if name:
            value(name)
    return values
