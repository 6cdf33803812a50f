"""Physical removal: from a set of removed atoms to a smaller dense model.

Every weight is sliced along each of its coupled axes; then each node whose rule has an ``update`` fixes the sizes
it carries (Reshape targets, Split sizes, Slice bounds, group and head counts, hidden sizes). Shape constants shared
by several nodes are copied before they change, so one node's edit never leaks into another's. Graph inputs and
outputs are pinned by the analysis and so never change.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .analysis import Analysis
from .analysis.rules import rule_for
from .errors import SpcError
from .io import toposort
from .weights import store



def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_N`` for the first N not in ``taken``; the name is added to ``taken``."""
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


class RewriteContext:
    """What an update rule sees of one node: old and new sizes, and the edits it may make."""

    def __init__(self, rewriter: "Rewriter", old_node: onnx.NodeProto, new_node: onnx.NodeProto):
        self.rewriter = rewriter
        self.graph = rewriter.analysis.graph
        self.node = old_node
        self.new_node = new_node
        self.op = old_node.op_type
        self.opset = self.graph.opset
        self.inputs = list(old_node.input)
        self.outputs = list(old_node.output)

    # reading (the same vocabulary as OpContext, over the original model)
    def attr(self, name: str, default=None):
        for attr in self.node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def input(self, index: int) -> str:
        return self.inputs[index] if index < len(self.inputs) else ""

    def const(self, name: str) -> np.ndarray | None:
        return self.graph.weight(name) if name else None

    def shape(self, name: str):
        return self.graph.shape(name)

    def rank(self, name: str) -> int:
        return len(self.graph.shape(name))

    def old_shape(self, name: str):
        return self.graph.shape(name)

    def new_shape(self, name: str):
        return self.rewriter.new_shape(name)

    def kept(self, tensor: str, axis: int) -> np.ndarray:
        return self.rewriter.kept[(tensor, axis)]

    def virtual_size(self, label: str) -> int:
        return int(self.rewriter.kept[(f"@{self.node.name}/{label}", 0)].size)

    # editing the copy
    def set_attr(self, name: str, value) -> None:
        self.remove_attr(name)
        self.new_node.attribute.append(helper.make_attribute(name, value))

    def remove_attr(self, name: str) -> None:
        keep = [a for a in self.new_node.attribute if a.name != name]
        del self.new_node.attribute[:]
        self.new_node.attribute.extend(keep)

    def set_input(self, index: int, value: np.ndarray) -> None:
        """Feed input ``index`` from a new constant private to this node."""
        name = self.rewriter.fresh_name(f"{self.node.name}_in{index}")
        self.rewriter.new_initializers[name] = np.asarray(value)
        while len(self.new_node.input) <= index:
            self.new_node.input.append("")
        self.new_node.input[index] = name

    def rewrite_input(self, index: int, edits: dict[int, int]) -> None:
        """Feed input ``index`` from a copy of its shape computation with the elements at ``edits`` (position ->
        value) changed; the original stays for whoever else reads it (exporters share shape constants)."""
        self.new_node.input[index] = self.rewriter.rebuild(self.node.input[index], edits)


class Rewriter:
    def __init__(self, analysis: Analysis, removed: np.ndarray):
        self.analysis = analysis
        self.removed = removed
        space = analysis.space
        self.kept = {key: np.flatnonzero(~removed[analysis.dim_labels(key)]) for key in space.dims}
        self._dynamic = {key for key, info in space.dims.items() if info.dynamic}
        self.new_initializers: dict[str, np.ndarray] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self._names = {init.name for init in analysis.graph.graph.initializer}
        self._names.update(out for node in analysis.graph.nodes for out in node.output)

    def fresh_name(self, base: str) -> str:
        return unique_name(base, self._names)

    def new_shape(self, name: str):
        old = self.analysis.graph.shape(name)
        return tuple(
            int(self.kept[(name, axis)].size) if (name, axis) in self.kept and (name, axis) not in self._dynamic
            else size
            for axis, size in enumerate(old)
        )

    def rebuild(self, name: str, edits: dict[int, int]) -> str:
        """A fresh copy of the 1-D shape tensor ``name`` with ``edits`` (position -> value) applied. Only the path
        to the edited positions is cloned (each occurrence separately, even of one shared constant); a piece whose
        every position is edited becomes a constant."""
        from .analysis.rules.shapes import shape_slots

        graph = self.analysis.graph
        slots = shape_slots(graph, name)
        if slots is not None and set(edits) >= set(range(len(slots))):
            fresh = self.fresh_name(f"{name}_spc")
            self.new_initializers[fresh] = np.array([edits[p] for p in range(len(slots))], dtype=np.int64)
            return fresh
        if name in graph.initializers:
            array = graph.weight(name).copy()
            for position, value in edits.items():
                array.reshape(-1)[position] = value
            fresh = self.fresh_name(f"{name}_spc")
            self.new_initializers[fresh] = array
            return fresh
        node = graph.producer[name]
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = self.fresh_name(f"{node.name}_spc")
        if node.op_type == "Concat":
            offset = 0
            for position, source in enumerate(node.input):
                length = len(shape_slots(graph, source))
                mine = {p - offset: v for p, v in edits.items() if offset <= p < offset + length}
                if mine:
                    clone.input[position] = self.rebuild(source, mine)
                offset += length
        elif node.op_type == "Where":  # Where(Equal(s, -1), 1, s): the edited positions are never -1
            clone.input[2] = self.rebuild(node.input[2], edits)
        elif node.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            clone.input[0] = self.rebuild(node.input[0], edits)
        else:
            raise SpcError(f"cannot rewrite the shape computed by {node.op_type} '{node.name}' for the pruned sizes")
        clone.output[0] = self.fresh_name(f"{name}_spc")
        self.new_nodes.append(clone)
        return clone.output[0]

    def sliced_weight(self, name: str) -> np.ndarray | None:
        graph = self.analysis.graph
        array = graph.weight(name)
        changed = False
        for axis in range(array.ndim):
            kept = self.kept.get((name, axis))
            if kept is not None and (name, axis) not in self._dynamic and kept.size < array.shape[axis]:
                array = np.take(array, kept, axis=axis)
                changed = True
        return array if changed else None

    def run(self) -> onnx.ModelProto:
        graph = self.analysis.graph
        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
        new_graph = model.graph
        for old_node, new_node in zip(graph.nodes, new_graph.node):
            rule = rule_for(old_node)
            if rule is not None and rule.update is not None:
                rule.update(RewriteContext(self, old_node, new_node))
        for position, init in enumerate(new_graph.initializer):
            array = self.sliced_weight(init.name) if graph.is_weight(init.name) else None
            if array is not None:  # a weight read from disk goes back to disk (the spool), not into the proto
                new_graph.initializer[position].CopyFrom(store(_to_tensor(array, init), init))
        for name, array in self.new_initializers.items():
            new_graph.initializer.append(numpy_helper.from_array(array, name))
        if self.new_nodes:
            new_graph.node.extend(self.new_nodes)
            toposort(new_graph)
        del new_graph.value_info[:]
        _drop_unused_initializers(new_graph)
        return model


def _to_tensor(array: np.ndarray, like: onnx.TensorProto) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(array, like.name)
    if tensor.data_type != like.data_type:  # e.g. bfloat16 read back through a wider numpy type
        tensor = helper.make_tensor(like.name, like.data_type, array.shape, array.astype(np.float32).reshape(-1))
    return tensor


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.output}
    keep = [init for init in graph.initializer if init.name in used or _used_in_subgraph(graph, init.name)]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _used_in_subgraph(graph: onnx.GraphProto, name: str) -> bool:
    from .io import captured_names

    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            if any(name in captured_names(sub) for sub in subgraphs):
                return True
    return False


def apply_removal(analysis: Analysis, removed: np.ndarray) -> onnx.ModelProto:
    """The model with the atoms flagged in ``removed`` physically gone."""
    return Rewriter(analysis, removed).run()
