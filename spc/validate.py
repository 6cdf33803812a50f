"""Validation before anything is written: the ONNX checker, shape inference, and a run in ONNX Runtime whose outputs
must have the same names, types and shapes as the original model's on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx

from . import weights
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
        # idle worker threads that spin take the cores from the thread building the session on a small machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if weights.has_external(model):
        return _session_from_file(model, options)
    proto, keep = _weights_apart(model, options)
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess._spc_weights = keep  # the arrays handed over must outlive the session
    return sess


def _session_from_file(model: onnx.ModelProto, options):
    """A model whose weights are on disk runs from a file written for it (streamed, one tensor at a time): ONNX
    Runtime maps an external data file and uses the weights in place, where weights handed over as arrays are
    copied into its own memory (measured: twice the weights' size in the process). The files go with the session."""
    import shutil
    import weakref

    import onnxruntime as ort

    folder = weights.SPOOL.scratch_dir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weights.write_external(copy, folder / "model.onnx.data", "model.onnx.data")
    onnx.save_model(copy, str(folder / "model.onnx"))
    del copy
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    try:
        sess = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(sess, shutil.rmtree, str(folder), True)
    return sess


_APART_BYTES = 1 << 16  # smaller in-memory initializers stay in the serialised model


def _weights_apart(model: onnx.ModelProto, options) -> tuple[onnx.ModelProto, list]:
    """The model to serialise for ONNX Runtime, with its weights handed over apart as external initializers:
    those on disk as read-only mapped arrays (no copy in this process, no file ORT would have to resolve), large
    in-memory ones as arrays over their bytes. Serialising hundreds of MB into a string that ORT parses into a
    copy of its own costs more than the run. Prepacked and arena copies are disabled: the weights are needed once."""
    import onnxruntime as ort

    names, values, keep = [], [], []
    for init in model.graph.initializer:
        array = weights.mapped(init) if weights.is_external(init) else _raw_array(init)
        if array is not None:
            keep.append(array)
            names.append(init.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(np.asarray(array)))
    if not names:
        return model, []
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    options.add_external_initializers(names, values)
    return _stubbed(model, set(names)), keep + values


def _raw_array(init: onnx.TensorProto) -> np.ndarray | None:
    """A large in-memory initializer of a plain numpy type as an array over its bytes; None for anything else
    (small, other encodings, or bytes that do not match the dims: ORT then reads, and judges, the tensor itself)."""
    dtype = _NP_TYPES.get(init.data_type)
    if dtype is None or not init.HasField("raw_data"):
        return None
    count = int(np.prod(init.dims, dtype=np.int64))
    if count * np.dtype(dtype).itemsize < _APART_BYTES:
        return None
    raw = init.raw_data
    if len(raw) != count * np.dtype(dtype).itemsize:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(init.dims))


def _stubbed(model: onnx.ModelProto, apart: set[str]) -> onnx.ModelProto:
    """The model without the bytes of the initializers in ``apart``: each becomes an external reference that the
    session's external initializers replace (ORT never opens its location)."""
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, target = model.graph, light.graph
    target.name = graph.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(target, field).extend(getattr(graph, field))
    for init in graph.initializer:
        if init.name not in apart:
            target.initializer.append(init)
            continue
        stub = target.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="spc-weights-in-memory")
    return light


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
