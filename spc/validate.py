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


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def validate(model: onnx.ModelProto, reference: onnx.ModelProto, dim_values: dict[str, int] | None = None) -> str:
    """Raise ``SpcError`` if ``model`` is not a valid replacement for ``reference``; return what was checked."""
    problem = checker_problem(model)
    if problem:
        raise SpcError(f"refusing to write: the result fails onnx.checker ({problem})")
    infer_shapes(model)
    feeds = example_inputs(reference, dim_values)
    try:
        expected = run(reference, feeds)
    except Exception as exc:  # the input itself does not run here (custom ops): nothing to compare against
        return f"checker passed; ONNX Runtime cannot run the input model ({str(exc).splitlines()[0][:100]})"
    try:
        got = run(model, feeds)
    except Exception as exc:
        raise SpcError(f"refusing to write: the result fails in ONNX Runtime ({str(exc).splitlines()[0][:200]})")
    for name, value in expected.items():
        if name not in got or got[name].shape != value.shape or got[name].dtype != value.dtype:
            shape = got[name].shape if name in got else "missing"
            raise SpcError(f"refusing to write: output '{name}' changed from {value.shape} to {shape}")
    return "checker, shape inference and ONNX Runtime passed; outputs keep their shapes"
