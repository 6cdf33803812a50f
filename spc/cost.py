"""Parameter and MAC counts, before and after removing atoms.

MACs are counted for the ops that dominate inference (Conv, ConvTranspose, Gemm, MatMul, Einsum, recurrent cells,
fused attention), the convention of THOP, fvcore and onnx-tool; elementwise work is left out. Dynamic axes count
as 1 unless ``dim_values`` gives them a size (e.g. ``{"seq": 128}``). Sizes after pruning are read straight off the
coupling: a dim keeps as many indices as it has elements in atoms that stay, so any plan is costed exactly, and
quickly enough to bisect on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .analysis import Analysis
from .graph import Graph

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Cost:
    macs: int
    params: int
    node_macs: dict[str, int]

    def measure(self, by: str) -> int:
        return {"macs": self.macs, "params": self.params}[by]


def _concrete(shape, dim_values: dict[str, int]) -> tuple[int, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else int(dim_values.get(d, 1)) for d in shape)


def node_macs(node, shape) -> int:
    """Multiply-accumulates of one node given a function from tensor name to its concrete shape."""
    op = node.op_type
    try:
        if op == "Conv":
            return int(math.prod(shape(node.input[1])) * shape(node.output[0])[0]
                       * math.prod(shape(node.output[0])[2:]))
        if op == "ConvTranspose":
            return int(math.prod(shape(node.input[1])) * shape(node.input[0])[0]
                       * math.prod(shape(node.input[0])[2:]))
        if op == "Gemm":
            a = shape(node.input[0])
            k = a[0] if _attr(node, "transA") else a[1]
            return int(math.prod(shape(node.output[0])) * k)
        if op == "MatMul":
            return int(math.prod(shape(node.output[0])) * shape(node.input[0])[-1])
        if op == "Einsum":
            return _einsum_macs(node, shape)
        if op in ("LSTM", "GRU", "RNN"):
            gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
            w, r, x = shape(node.input[1]), shape(node.input[2]), shape(node.input[0])
            steps = x[1] if _attr(node, "layout") else x[0]
            batch = x[0] if _attr(node, "layout") else x[1]
            hidden = r[2]
            return int(steps * batch * w[0] * gates * hidden * (w[2] + hidden))
        if op in ("Attention", "MultiHeadAttention"):
            q, k, v = (shape(n) for n in node.input[:3])
            if len(q) == 4:
                return int(q[0] * q[1] * q[2] * k[2] * (q[3] + v[3]))
            return int(q[0] * q[1] * k[1] * (q[2] + v[2]))
    except (TypeError, IndexError):  # an unknown shape: count nothing rather than guess
        return 0
    return 0


def _attr(node, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return 0


def _einsum_macs(node, shape) -> int:
    equation = next(a.s for a in node.attribute if a.name == "equation").decode().replace(" ", "")
    sizes: dict[str, int] = {}
    for term, name in zip(equation.split("->")[0].split(","), node.input):
        for letter, size in zip(term, shape(name)):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return int(np.prod(list(sizes.values()), dtype=np.int64))


COSTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Attention",
              "MultiHeadAttention"}


def count(graph: Graph, dim_values: dict[str, int] | None = None) -> Cost:
    """Cost of a model as it is."""
    values = dim_values or {}
    shape = lambda name: _concrete(graph.shape(name), values)  # noqa: E731
    per_node = {node.name: node_macs(node, shape) for node in graph.nodes if node.op_type in COSTED_OPS}
    params = sum(int(np.prod(graph.shape(name), dtype=np.int64)) for name in graph.initializers
                 if graph.is_weight(name))
    return Cost(sum(per_node.values()), params, per_node)


class CostModel:
    """Costs an arbitrary set of removed atoms without touching the model. The planner's bisection calls
    ``evaluate`` dozens of times, so everything that does not depend on the removal is worked out once."""

    def __init__(self, analysis: Analysis, dim_values: dict[str, int] | None = None):
        self.analysis = analysis
        self.graph = analysis.graph
        self.dim_values = dim_values or {}
        space = analysis.space
        self.keys = list(space.dims)
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.offsets = np.array([space.dims[k].offset for k in self.keys], dtype=np.int64)
        self.sizes = np.array([space.dims[k].size for k in self.keys], dtype=np.int64)
        self.cost_nodes = [node for node in self.graph.nodes if node.op_type in COSTED_OPS]
        self.weights = [name for name in self.graph.initializers if self.graph.is_weight(name)]
        self.base = count(self.graph, self.dim_values)
        self._axes: dict[str, tuple[tuple[int, ...] | None, list[tuple[int, int]]]] = {}
        # the bisection only needs the dims of costed tensors: count kept indices over those elements alone
        names = {name for node in self.cost_nodes for name in list(node.input) + list(node.output)}
        self._tracked = [i for i, key in enumerate(self.keys) if key[0] in names or key[0] in self.graph.initializers]
        spans = [np.arange(self.offsets[i], self.offsets[i] + self.sizes[i]) for i in self._tracked]
        self._tracked_labels = analysis.labels[np.concatenate(spans)] if spans else np.zeros(0, dtype=np.int64)
        self._tracked_offsets = np.r_[0, np.cumsum(self.sizes[self._tracked])[:-1]].astype(np.int64)

    def kept_counts(self, removed: np.ndarray) -> np.ndarray:
        """How many indices each dim keeps when the atoms flagged in ``removed`` go."""
        if not self.keys or not self.analysis.labels.size:
            return self.sizes
        return np.add.reduceat(~removed[self.analysis.labels], self.offsets, dtype=np.int64)

    def _pruned_axes(self, name: str):
        """(concrete shape before pruning, [(axis, dim index)] of the axes whose size pruning may change)."""
        entry = self._axes.get(name)
        if entry is None:
            old = _concrete(self.graph.shape(name), self.dim_values)
            axes = []
            for axis in range(len(old) if old is not None else 0):
                index = self.index.get((name, axis))
                if index is not None and not self.analysis.space.dims[(name, axis)].dynamic:
                    axes.append((axis, index))
            entry = self._axes[name] = (old, axes)
        return entry

    def _counts(self, removed: np.ndarray) -> list[int]:
        """``kept_counts`` of the tracked dims (the others are left at their full size, unread), as a list."""
        counts = self.sizes.copy()
        if self._tracked and self._tracked_labels.size:
            counts[self._tracked] = np.add.reduceat(~removed[self._tracked_labels], self._tracked_offsets,
                                                    dtype=np.int64)
        return counts.tolist()

    def shape_function(self, removed: np.ndarray):
        """Tensor name -> its concrete shape once the atoms flagged in ``removed`` go."""
        return self._shape(self.kept_counts(removed).tolist())

    def _shape(self, counts: list[int]):
        def shape(name: str) -> tuple[int, ...] | None:
            old, axes = self._pruned_axes(name)
            if old is None or not axes:
                return old
            new = list(old)
            for axis, index in axes:
                new[axis] = counts[index]
            return tuple(new)

        return shape

    def evaluate(self, removed: np.ndarray) -> Cost:
        counts = self._counts(removed)
        shape = self._shape(counts)
        per_node = {node.name: node_macs(node, shape) for node in self.cost_nodes}
        params = sum(math.prod(shape(name)) for name in self.weights)
        return Cost(sum(per_node.values()), params, per_node)
