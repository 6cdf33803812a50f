"""The part of a model's time that its latency layers do not hold, and how it shrinks as channels go.

The planner times the prunable Conv/MatMul/Gemm layers (latency_layers.py) and measures the whole dense model; the
difference is "the rest": attention's activation products and softmax, head splits and transposes, GELU, norms,
residual adds, pooling. It shrinks with the tensors those ops work on, and those depend on *which* groups go: in a
transformer the attention's share shrinks with the heads and not with the FFN. ``RestWork`` weighs the rest by a
work proxy per op, read off the shapes a plan leaves (spc.cost):

* an op that is only metadata (``FREE_OPS``, or a computed constant) costs nothing, nor does one that the kernel
  before it absorbs: a bias add, ReLU, clip or BatchNormalization right after a weight layer (the layer's epilogue,
  in its table), a zero Pad before a convolution (folded into it), or an elementwise op reading another elementwise
  op's output (TVM fuses the chain into one pass: GELU's five ONNX ops are one kernel). spc's own kernels
  (softmax, norms, pooling, the weight layers) are opaque to that fusion: an elementwise op after one of them is a
  pass of its own;
* a product of two activations (attention's QK^T and AV MatMuls) costs its MACs / ``MACS_PER_ELEMENT``;
* a weight layer outside the latency tables (its widths cannot change) costs its MACs the same way, all of it
  constant;
* any other op costs the largest of its activation inputs and outputs, in elements (one pass over memory).

``MACS_PER_ELEMENT`` = 20, measured on the 2-core AVX-512 machine of bench/README.md (one thread, the d=384 encoder's
kernels in the VM's instrumentation): activation products ran at about 19 ps per MAC, softmax 0.49 ns per element,
GELU 0.41, LayerNorm 0.33, transposes 0.35-0.7, residual adds 0.23. The proxy apportions a measured total; it is
not a time itself, so only the ratio of MACs to elements matters, and a factor of two either way moves the
encoder's predicted speed-ups by about 1%.
"""

from __future__ import annotations

import numpy as np
import onnx

from .analysis.rules.elementwise import NARY_ROLES, UNARY
from .cost import COSTED_OPS, node_macs
from .graph import FLOAT_TYPES

MACS_PER_ELEMENT = 20.0

FREE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Constant",
            "ConstantOfShape", "Dropout"}

# the analysis' elementwise ops (its coupling rules), with the two it couples elsewhere
ELEMENTWISE_OPS = (set(UNARY) | set(NARY_ROLES) | {"Clip", "BatchNormalization"}) - FREE_OPS

# what spc's code generation fuses into the weight layer before it (targets/fusion.py and fold.py)
EPILOGUE_OPS = {"Add", "Relu", "Clip", "BatchNormalization"}


class RestWork:
    """Work proxy of the ops outside the latency layers, as a function of a shape function (``__call__``)."""

    def __init__(self, graph, cost_model, lowest: np.ndarray):
        """``lowest``: the plan with every removable atom gone (a weight layer whose MACs it leaves as they are is
        not in the latency tables)."""
        self.graph = graph
        full, low = cost_model.shape_function(np.zeros(lowest.shape, dtype=bool)), cost_model.shape_function(lowest)
        self._constant = 0.0  # weight layers outside the tables: their MACs do not change
        self._products: list = []  # products of two activations: MACs
        self._passes: list[tuple[str, ...]] = []  # other ops: the activation tensors they read and write
        kinds: dict[str, str] = {}  # tensor -> what produced it: "layer", "epilogue", "elementwise", "fused",
        # "free" or "other"
        for node in graph.nodes:
            kind = self._classify(node, kinds, full, low)
            for out in node.output:
                if out:
                    kinds[out] = kind

    def _activations(self, names) -> list[str]:
        return [n for n in names if n and n not in self.graph.initializers and self.graph.computed(n) is None]

    def _source(self, name: str, kinds: dict[str, str]) -> str:
        """What produced ``name``, looking through metadata ops (a reshape between two kernels is fused too)."""
        while True:
            producer = self.graph.producer.get(name)
            if producer is None or producer.op_type not in FREE_OPS or not producer.input:
                return kinds.get(name, "input")
            name = producer.input[0]

    def _classify(self, node, kinds: dict[str, str], full, low) -> str:
        graph, op = self.graph, node.op_type
        outputs = [o for o in node.output if o]
        if op in FREE_OPS or all(graph.computed(o) is not None for o in outputs):
            return "free"
        inputs = self._activations(node.input)
        if op in COSTED_OPS:
            if len(node.input) > 1 and graph.is_weight(node.input[1]):
                macs = node_macs(node, full)
                if macs == node_macs(node, low):
                    self._constant += macs / MACS_PER_ELEMENT
                return "layer"
            self._products.append(node)
            return "other"
        sources = [self._source(n, kinds) for n in inputs]
        if op in EPILOGUE_OPS and len(sources) == 1 and sources[0] in ("layer", "epilogue"):
            return "epilogue"
        if op in ELEMENTWISE_OPS and any(s in ("elementwise", "fused") for s in sources):
            return "fused"  # into the elementwise pass that produced an input of it
        if op == "Pad" and all(c.op_type == "Conv" for c in graph.consumers.get(outputs[0], [])):
            return "free"  # folded into the convolution (targets/fold.py)
        tensors = tuple(n for n in inputs + outputs if graph.dtypes.get(n, onnx.TensorProto.FLOAT) in FLOAT_TYPES)
        if tensors:  # integer tensors are shape arithmetic (Shape -> Gather -> Div), a few elements
            self._passes.append(tensors)
        return "elementwise" if op in ELEMENTWISE_OPS else "other"

    def __call__(self, shape) -> float:
        work = self._constant
        for node in self._products:
            work += node_macs(node, shape) / MACS_PER_ELEMENT
        for names in self._passes:
            sizes = [np.prod(s, dtype=np.int64) for s in map(shape, names) if s is not None]
            work += float(max(sizes, default=0))
        return work
