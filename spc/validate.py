"""Validation before anything is written: the ONNX checker, shape inference, and a run in ONNX Runtime whose outputs
must have the same names, types and shapes as the original model's on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import SpcError
from .graph import infer_shapes
from .io import checker_problem

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def example_inputs(model: onnx.ModelProto, dim_values: dict[str, int] | None = None, seed: int = 0):
    """Random inputs for every graph input; dynamic axes take ``dim_values`` or 1, integer inputs are zeros."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else int((dim_values or {}).get(d.dim_param, 1))
                 for d in tensor_type.shape.dim]
        dtype = _NP_TYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise SpcError(f"input '{value.name}' has an element type spc cannot feed ({tensor_type.elem_type})")
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.zeros(shape, dtype=dtype)
    return feeds


def session(model: onnx.ModelProto, optimize: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:  # a one-off run: graph optimisations would cost more than they save
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = True) -> dict[str, np.ndarray]:
    sess = session(model, optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def validate(model: onnx.ModelProto, reference, dim_values: dict[str, int] | None = None) -> str:
    """Raise ``SpcError`` if ``model`` is not a valid replacement for ``reference`` (a ``Graph`` of the original,
    or the original model); return what was checked. The outputs' expected shapes come from the reference's shape
    inference, so the original's weights need no second runtime session (memory stays near the model's size)."""
    from .graph import Graph

    reference = reference if isinstance(reference, Graph) else Graph(reference)
    problem = checker_problem(model)
    if problem:
        raise SpcError(f"refusing to write: the result fails onnx.checker ({problem})")
    values = dict(dim_values or {})
    feeds = example_inputs(reference.model, values)
    for value in reference.model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param:
                values.setdefault(dim.dim_param, feeds[value.name].shape[axis])
    try:
        got = run(model, feeds, optimize=False)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if _runs(reference.model, feeds):
            raise SpcError(f"refusing to write: the result fails in ONNX Runtime ({first})") from None
        return f"checker passed; ONNX Runtime cannot run the input model either ({first[:100]})"
    for name in reference.outputs:
        expected = reference.shape(name)
        if name not in got:
            raise SpcError(f"refusing to write: output '{name}' is missing")
        if expected is None:
            continue
        shape = got[name].shape
        wanted = [d if isinstance(d, int) else values.get(d) for d in expected]
        if len(shape) != len(wanted) or any(w is not None and w != s for w, s in zip(wanted, shape)):
            raise SpcError(f"refusing to write: output '{name}' has shape {shape}, the original {tuple(expected)}")
    return "checker, shape inference and ONNX Runtime passed; outputs keep their shapes"


def _runs(model: onnx.ModelProto, feeds) -> bool:
    try:
        run(model, feeds, optimize=False)
        return True
    except Exception:
        return False
