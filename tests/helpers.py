"""Test helpers: a terse ONNX graph builder and the mask-equivalence oracle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import spc
from spc.io import checker_problem, from_proto
from spc.validate import example_inputs, run


class GraphBuilder:
    """Build small ONNX graphs in a few lines: ``b.op("Conv", [x, b.w(8, 3, 3, 3)], pads=[1] * 4)``."""

    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs = [], [], []
        self.count = 0
        self.extra_opsets = {}

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def w(self, *shape, scale: float = 0.5, positive: bool = False) -> str:
        value = self.rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            value = np.abs(value) + 0.5
        return self.const(value, "w")

    def const(self, value, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values) -> str:
        return self.const(np.array(values, dtype=np.int64), "shape")

    def op(self, op_type: str, inputs, outputs: int = 1, domain: str = "", **attrs):
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(f"n_{op_type}_"),
                                           domain=domain, **attrs))
        if domain:
            self.extra_opsets.setdefault(domain, 1)
        return names[0] if outputs == 1 else names

    def model(self, *outputs: str, shapes: dict | None = None) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
        graph = helper.make_graph(self.nodes, "test", self.inputs, outs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in self.extra_opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = min(model.ir_version, 10)
        inferred_graph = onnx.shape_inference.infer_shapes(model).graph
        inferred = {v.name: v for v in list(inferred_graph.value_info) + list(inferred_graph.output)
                    if v.type.tensor_type.HasField("shape")}
        for name, shape in (shapes or {}).items():
            inferred[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        missing = [out.name for out in model.graph.output if out.name not in inferred]
        if missing:  # shape inference gave up (e.g. a function op): ask ONNX Runtime
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            del probe.graph.output[:]
            probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in missing)
            values = run(probe, example_inputs(probe))
            for name in missing:
                inferred[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(values[name].shape))
        for out in model.graph.output:
            out.CopyFrom(inferred[out.name])
        return model


def conv_bn_relu(b: GraphBuilder, x: str, cin: int, cout: int, k: int = 3, **attrs) -> str:
    y = b.op("Conv", [x, b.w(cout, cin, k, k), b.w(cout)], pads=[k // 2] * 4, **attrs)
    y = b.op("BatchNormalization", [y, b.w(cout, positive=True), b.w(cout), b.w(cout), b.w(cout, positive=True)])
    return b.op("Relu", [y])


def quantized_weight(b: GraphBuilder, shape: tuple, axis: int = 0, scale_floor: float = 0.005) -> str:
    """A per-channel int8 weight: DequantizeLinear(int8, scale[C], zero point[C]) along ``axis``."""
    q = b.const(b.rng.integers(-100, 100, shape).astype(np.int8), "q")
    scale = b.const((b.rng.random(shape[axis]) * 0.01 + scale_floor).astype(np.float32), "scale")
    zero = b.const(b.rng.integers(-3, 3, shape[axis]).astype(np.int8), "zp")
    return b.op("DequantizeLinear", [q, scale, zero], axis=axis)


def quantized_activation(b: GraphBuilder, x: str, scale: float = 0.05) -> str:
    """Per-tensor activation quantisation, as QDQ exporters put around every activation."""
    s, z = b.const(np.float32(scale)), b.const(np.uint8(128))
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, s, z]), s, z])


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    scale = max(float(np.abs(a).max(initial=0.0)), 1.0)
    return a.shape == b.shape and float(np.abs(a - b).max(initial=0.0)) <= atol + rtol * scale


def check_oracle(model: onnx.ModelProto, *, trials: int = 2, seed: int = 0, dim_values=None,
                 allow_inexact: bool = False, min_groups: int = 1, rtol: float = 1e-4, optimize: bool = True):
    """Masking and removing the same atoms give the same outputs, per group and all groups at once; removing
    nothing gives the original outputs. Returns the analysis for further assertions. ``optimize=False`` runs ONNX
    Runtime without graph optimisations (its fused quantised kernels, e.g. MatMulNBits, approximate differently
    for different widths)."""
    proto = from_proto(model)
    analysis = spc.analyze(proto, allow_inexact=allow_inexact)
    assert not analysis.records.get("rule_errors"), analysis.records.get("rule_errors")
    groups = [g for g in analysis.prunable_groups if g.size > 1]
    assert len(groups) >= min_groups, f"expected >= {min_groups} prunable groups, got {len(groups)}"
    feeds = example_inputs(proto, dim_values or {}, seed=seed)
    original = run(proto, feeds, optimize)
    untouched = run(spc.apply_removal(analysis, np.zeros(analysis.atom_count, dtype=bool)), feeds, optimize)
    for name, value in original.items():
        assert close(value, untouched[name], rtol=1e-6, atol=1e-6), f"pruning nothing changed output {name}"
    rng = np.random.default_rng(seed)
    plans = []
    for group in groups:
        for _ in range(trials):
            removed = np.zeros(analysis.atom_count, dtype=bool)
            count = int(rng.integers(1, group.size))
            removed[rng.choice(group.atoms, size=count, replace=False)] = True
            plans.append((group.name, removed))
    together = np.zeros(analysis.atom_count, dtype=bool)
    for group in groups:
        together[rng.choice(group.atoms, size=group.size // 2, replace=False)] = True
    plans.append(("all groups", together))
    for label, removed in plans:
        masked = run(spc.mask_removal(analysis, removed), feeds, optimize)
        pruned_model = spc.apply_removal(analysis, removed)
        assert checker_problem(pruned_model) is None, checker_problem(pruned_model)
        assert _param_count(pruned_model) < _param_count(proto), f"{label}: nothing was removed"
        pruned = run(pruned_model, feeds, optimize)
        for name, value in masked.items():
            if allow_inexact and any(g.inexact_reason for g in groups):
                assert pruned[name].shape == value.shape
                continue
            assert close(value, pruned[name], rtol=rtol), (
                f"{label}: output {name} differs by {np.abs(value - pruned[name]).max()}")
    return analysis


def _param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer
               if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE))
