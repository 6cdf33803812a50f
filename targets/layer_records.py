"""The manifest's per-layer records: which ONNX node and weight each Relax weight layer came from, what spc compiled
it to (``describe`` for targets left to TVM's schedules), and which layers are worth sparsifying (``sparsity_plan``)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
import tvm.sym

from . import cost, kernels
from .registry import TargetSpec
from .relax_util import (OP_CONV2D, _const_array, _cost_dim, _dtype, _expr_str, _is_weight_call, _prod, _shape, _static,
                         conv_geometry)

@dataclass
class LayerRecord:
    """One weight layer: what spc compiled it to."""

    index: int
    op: str  # "MatMul" (MatMul/Gemm) or "Conv"
    node: str | None  # ONNX node name, when the weight could be traced back to it
    weight: str | None  # ONNX initializer name, likewise
    shape: list[int]  # the weight as [outputs, inputs] (Conv: [Co, Ci*kh*kw])
    rows: int | str  # m: tokens (MatMul) or output pixels per image (Conv); a string when symbolic
    kernel: str  # "dense", "bsr", or "tvm" (left to TVM: unsupported layout/dtype/groups)
    block: list[int] | None = None
    density: float = 1.0  # fraction of non-zero blocks at `block` (1.0: fully dense)
    expected_speedup: float = 1.0  # predicted time(dense) / time(chosen kernel)
    fused: list[str] = field(default_factory=list)
    reason: str = ""
    winograd: int | None = None  # m where a dense 3x3 conv runs by Winograd's F(m x m, 3x3) (at its stride)
    groups: int = 1  # a grouped conv: one kernel per group (shape is then per group's inputs)

    def to_json(self) -> dict:
        return asdict(self)


def weight_key(w_out_in: np.ndarray) -> str:
    arr = np.ascontiguousarray(w_out_in, dtype=np.float32)
    return f"{arr.shape}:{hashlib.sha1(arr.tobytes()).hexdigest()}"


def index_onnx_weights(model) -> dict[str, tuple[str, str, str]]:
    """weight_key of each MatMul/Gemm/Conv initializer (as [out, in]) -> (node name, op type, initializer name)."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    index: dict[str, tuple[str, str, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        try:
            w = numpy_helper.to_array(inits[node.input[1]])
        except Exception:  # pragma: no cover - exotic storage
            continue
        if w.dtype != np.float32:
            continue
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            view = w.T
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            view = w if trans_b else w.T
        else:
            view = w.reshape(w.shape[0], -1)
        index[weight_key(view)] = (node.name, node.op_type, node.input[1])
    return index


def _weight_layers(mod: tvm.IRModule, func_name: str = "main"):
    """(call, [out, in] weight view, is_conv, rows for the manifest, rows for the cost model, why no spc kernel)."""
    for block in mod[func_name].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not _is_weight_call(call):
                continue
            w = _const_array(call.args[1])
            if w is None:
                continue
            conv = call.op.same_as(OP_CONV2D)
            view = w.reshape(w.shape[0], -1) if conv else w.T
            out_shape = _shape(call) or []
            why = ""
            if w.dtype != np.float32 or _dtype(call) != "float32":
                why = "dtype is not float32"
            if conv:
                rows = int(np.prod([_static(d) or 1 for d in out_shape[2:]]))
                cost_rows = rows
                if int(call.attrs.groups) != 1:
                    why = f"groups={int(call.attrs.groups)}"
            else:
                lead = out_shape[:-1]
                if any(_static(d) is None for d in lead):
                    rows = _expr_str(tvm.sym.Analyzer().simplify(_prod(lead)))
                else:
                    rows = int(np.prod([_static(d) for d in lead]))
                cost_rows = _cost_dim(lead)
            yield call, view, conv, rows, cost_rows, why


def describe(mod: tvm.IRModule, weight_index: dict, reason: str, func_name: str = "main") -> list[LayerRecord]:
    """Per-layer records for targets compiled by TVM's own schedules (no rewriting)."""
    records: list[LayerRecord] = []
    for _call, view, conv, rows, _cost_rows, _why in _weight_layers(mod, func_name):
        hit = weight_index.get(weight_key(view))
        records.append(
            LayerRecord(
                index=len(records),
                op="Conv" if conv else "MatMul",
                node=hit[0] if hit else None,
                weight=hit[2] if hit else None,
                shape=[int(d) for d in view.shape],
                rows=rows,
                kernel="dense",
                reason=reason,
            )
        )
    return records


def sparsity_plan(
    mod: tvm.IRModule, weight_index: dict, spec: TargetSpec, block: tuple[int, int], density: float,
    winograd: bool = True,
) -> dict[str, tuple[float, str]]:
    """ONNX weight name -> (predicted BSR speed-up at ``density``, reason it does not pay or ""): which layers are
    worth sparsifying (a layer that would run dense anyway keeps its weights; its dense time by Winograd where
    ``winograd`` and that pays)."""
    plan: dict[str, tuple[float, str]] = {}
    for call, view, conv, _rows, cost_rows, why in _weight_layers(mod):
        hit = weight_index.get(weight_key(view))
        if hit is None:
            continue
        out, inp = (int(d) for d in view.shape)
        if why:
            plan[hit[2]] = (1.0, f"no spc kernel: {why}")
            continue
        geom = conv_geometry(call) if conv and spec.cpu_kernels is not None else None
        dense_speedup = kernels.winograd_speedup(geom, spec.cpu_kernels) if geom is not None and winograd else 1.0
        copy = kernels.bsr_extra_copy(geom, spec.cpu_kernels, block) if geom is not None else 0
        est = cost.estimate(cost_rows, inp, out, density, block, spec.cpu_kernels, spec.bsr_efficiency, conv,
                            dense_speedup, copy)
        speedup = round(est.speedup, 2)
        plan[hit[2]] = (speedup, "" if speedup >= cost.MIN_SPEEDUP else f"BSR predicted x{speedup} at {cost_rows} rows")
    return plan
