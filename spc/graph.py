"""A read-only view of a normalised ONNX model: who produces and consumes each tensor, weights as numpy arrays, and
every tensor's shape from onnx's shape inference (with data propagation, so Reshape targets computed from Shape ops
are resolved). Dynamic axes stay symbolic: a dimension is an ``int`` when static and a ``str`` when not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from .io import captured_names, default_opset, light_copy
from .weights import read as read_weight

Dim = int | str
Shape = tuple[Dim, ...]

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
}


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value (ints, floats, lists; strings decoded), or ``default`` when the node has none."""
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")  # ops whose output shapes inference computes


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes from ONNX Runtime's symbolic shape inference, which keeps dynamic axes named through masks,
    Expand and Reshape chains (onnx's own inference invents a new 'unk__' symbol at each of them), falling back to
    onnx's inference with data propagation. Stale value_info is dropped first (some exporters write wrong shapes).
    onnx's inference runs first: when it leaves no hole and invents no symbol (most CNNs), it is the answer, and
    the symbolic one (and importing sympy) is spared. The stated shapes of custom-domain ops' outputs are kept: no
    inference can compute them, and without them every layer after such an op had no shape (and no MACs)."""
    copy = light_copy(model)
    custom = {out for node in model.graph.node if node.domain not in ONNX_DOMAINS for out in node.output}
    stated = [value for value in copy.graph.value_info if value.name in custom]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(stated)
    try:
        inferred = shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
    except Exception:  # inference gives up on some custom ops; keep what the model states
        inferred = copy
    if _fully_named(inferred):
        return inferred
    symbolic, complete = _symbolic_shapes(copy)
    if complete:
        return symbolic
    if symbolic is not None:  # symbolic names where it got that far, onnx's shapes beyond
        known = {value.name for value in symbolic.graph.value_info}
        symbolic.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        return symbolic
    return inferred


def _fully_named(inferred: onnx.ModelProto) -> bool:
    """Whether every node output has a tensor shape whose dims are sizes or the graph inputs' own symbols."""
    graph = inferred.graph
    symbols = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    values = {v.name: v for v in list(graph.value_info) + list(graph.output)}
    for node in graph.node:
        for name in node.output:
            value = values.get(name)
            if name and (value is None or not value.type.HasField("tensor_type")
                         or not value.type.tensor_type.HasField("shape")):
                return False
            if name and not all(d.HasField("dim_value") or d.dim_param in symbols
                                for d in value.type.tensor_type.shape.dim):
                return False
    return True


def _symbolic_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, bool]:
    """ONNX Runtime's symbolic shape inference, driven step by step rather than through ``infer_shapes``: on an
    incomplete result that one writes a file into the current directory and raises, and partial shapes are
    still worth having. Returns (model with value_info, whether every shape was inferred)."""
    try:
        inference = _symbolic_shape_inference()(2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
        complete = False
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inference._preprocess(model)
            while inference.run_:
                complete = inference._infer_impl()
            inference._update_output_from_vi()
        return inference.out_mp_, bool(complete)
    except Exception:  # it refuses some models outright (unknown ops, odd attributes)
        return None, False


@functools.cache
def _symbolic_shape_inference():
    """ORT's SymbolicShapeInference class, loaded from its file: importing it through ``onnxruntime.tools`` runs
    that package's ``__init__``, which imports torch whenever torch is installed (seconds, for nothing)."""
    import sys

    import onnxruntime

    name = "onnxruntime.tools.symbolic_shape_infer"
    if name not in sys.modules:
        path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location("spc._ort_symbolic_shape_infer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SymbolicShapeInference
    return sys.modules[name].SymbolicShapeInference


COMPUTED_MAX_ELEMENTS = 4096
_NOT_COMPUTABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                   "Bernoulli"}


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute)


def evaluate_node(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opset: int) -> dict[str, np.ndarray]:
    """One node on constant inputs with onnx.reference under ``opset`` (Squeeze, Slice, ... changed their inputs
    between versions); {} where the reference cannot evaluate it."""
    from onnx.reference import ReferenceEvaluator

    try:
        outputs = ReferenceEvaluator(node, opsets={"": opset}).run(None, inputs)
    except Exception:  # noqa: BLE001 - an op the reference does not know stays "computed at run time"
        return {}
    return {out: np.asarray(value) for out, value in zip(node.output, outputs) if out}


class Graph:
    """Indexes over ``model`` for the analysis; build once, never mutate the model underneath it."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model)
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in dict.fromkeys(list(node.input) + _subgraph_captures(node)):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.inputs = [value.name for value in model.graph.input]
        self.outputs = [value.name for value in model.graph.output]
        self.initializers = {init.name: init for init in model.graph.initializer}
        self._weights: dict[str, np.ndarray] = {}
        self._computed: dict[str, np.ndarray | None] = {}
        self.shapes: dict[str, Shape | None] = {}
        self.dtypes: dict[str, int] = {}
        self._read_shapes(infer_shapes(model))
        fill_shapes_from_runtime(self)

    def _read_shapes(self, inferred: onnx.ModelProto) -> None:
        graph = inferred.graph
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor_type = value.type.tensor_type
            if not value.type.HasField("tensor_type"):
                continue
            self.dtypes[value.name] = tensor_type.elem_type
            if not tensor_type.HasField("shape"):
                self.shapes.setdefault(value.name, None)
                continue
            dims: list[Dim] = []
            for index, dim in enumerate(tensor_type.shape.dim):
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                else:
                    dims.append(dim.dim_param or f"?{value.name}:{index}")
            if value.name not in self.shapes or self.shapes[value.name] is None:
                self.shapes[value.name] = tuple(dims)
        for name, init in self.initializers.items():
            self.shapes[name] = tuple(int(d) for d in init.dims)
            self.dtypes[name] = init.data_type

    def weight(self, name: str) -> np.ndarray | None:
        """The initializer ``name`` as an array, or None if it is computed at run time. Small ones (shape
        constants, norms) are cached; large weights are read afresh so that a pass over all of them does not
        keep a second copy of the model alive."""
        if name not in self.initializers:
            return None
        cached = self._weights.get(name)
        if cached is not None:
            return cached
        array = read_weight(self.initializers[name])  # external data: read now, from disk, into plain memory
        if array.size <= 65536:
            self._weights[name] = array
        return array

    def computed(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a small computation on constants only (at most
        ``COMPUTED_MAX_ELEMENTS`` values at every step, default-domain ops, evaluated with onnx.reference under the
        model's opset), else None. For rules that only *read* a constant: PyTorch exports ``F.pad`` amounts as
        Constant -> ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Cast (EfficientNet-Lite0's
        "same" padding), which pinned every padded channel group while only initializers counted."""
        if name in self._computed:
            return self._computed[name]
        init = self.initializers.get(name)
        if init is not None and int(np.prod(init.dims, dtype=np.int64)) > COMPUTED_MAX_ELEMENTS:
            return None  # a weight, not a shape constant: not read for this
        value = self.weight(name)
        node = self.producer.get(name)
        if value is None and node is not None and node.domain in ("", "ai.onnx") \
                and node.op_type not in _NOT_COMPUTABLE and not _has_subgraph(node):
            self._computed[name] = None  # cycles and repeated misses stop here
            inputs = {}
            for source in node.input:
                known = self.computed(source) if source else None
                if source and (known is None or known.size > COMPUTED_MAX_ELEMENTS):
                    break
                if source:
                    inputs[source] = known
            else:
                value = evaluate_node(node, inputs, self.opset).get(name)
                if value is not None and value.size > COMPUTED_MAX_ELEMENTS:
                    value = None
        self._computed[name] = value
        return value

    def is_weight(self, name: str) -> bool:
        """A float initializer: something pruning slices and importance measures (int constants are shapes)."""
        return name in self.initializers and self.initializers[name].data_type in FLOAT_TYPES

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    @cached_property
    def node_by_name(self) -> dict[str, onnx.NodeProto]:
        return {node.name: node for node in self.nodes}


def _subgraph_captures(node: onnx.NodeProto) -> list[str]:
    names: list[str] = []
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            names.extend(captured_names(sub))
    return names


def is_static(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _needs_runtime_shapes(graph: "Graph") -> list[str]:
    """Tensors whose shape inference left a hole: no shape, or a size it invented ('unk__') instead of a name."""
    named = set()
    for name in graph.inputs:
        named.update(d for d in (graph.shapes.get(name) or ()) if isinstance(d, str))
    holes = []
    for node in graph.nodes:
        for out in node.output:
            if not out or graph.dtypes.get(out, onnx.TensorProto.FLOAT) not in FLOAT_TYPES:
                continue  # integer and boolean tensors (masks, shapes) carry no channels
            shape = graph.shapes.get(out)
            if shape is None or any(isinstance(d, str) and d not in named for d in shape):
                holes.append(out)
    return holes


def _runtime_probe(graph: Graph, names: list[str], sizes: list[dict[str, int]]) -> list[dict[str, tuple]] | None:
    """Shapes of ``names`` in one ONNX Runtime session of the model, run once per entry of ``sizes``. The tensors
    are made outputs of the model itself for the session and removed again: a copy would copy every weight."""
    from .validate import example_inputs, session

    outputs = graph.model.graph.output
    count = len(outputs)
    existing = {value.name for value in outputs}
    holes = set(names)
    wanted = [name for name in names if name not in existing]
    try:
        outputs.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted)
        sess = session(graph.model, optimize=False)
        feeds = [example_inputs(graph.model, values) for values in sizes]
    except Exception:
        return None
    finally:
        del outputs[count:]
    produced = [out.name for out in sess.get_outputs()]
    shapes = []
    for feed in feeds:
        try:
            values = sess.run(produced, feed)
        except Exception:
            return None
        # non-tensor outputs (sequences, maps such as skl2onnx's ZipMap) have no shape: nothing to learn from them
        shapes.append({name: tuple(value.shape) for name, value in zip(produced, values)
                       if name in holes and hasattr(value, "shape")})
    return shapes


def fill_shapes_from_runtime(self: Graph) -> None:
    """Fill holes left by shape inference by running the model in ONNX Runtime twice (one session), with different
    sizes for the dynamic axes: a size that changes between the runs is dynamic (named after the input axis it
    follows)."""
    holes = _needs_runtime_shapes(self)
    if not holes:
        return
    symbols = sorted({d for name in self.inputs for d in (self.shapes.get(name) or ()) if isinstance(d, str)})
    first = {symbol: 2 + 2 * i for i, symbol in enumerate(symbols)}
    second = {symbol: 3 + 2 * i for i, symbol in enumerate(symbols)}
    probed = _runtime_probe(self, holes, [first, second])
    if probed is None:
        return
    a, b = probed
    by_pair = {(first[s], second[s]): s for s in symbols}
    for name in holes:
        if name not in a or name not in b or len(a[name]) != len(b[name]):
            continue
        self.shapes[name] = tuple(
            int(x) if x == y else by_pair.get((x, y), f"?{name}:{axis}")
            for axis, (x, y) in enumerate(zip(a[name], b[name]))
        )

