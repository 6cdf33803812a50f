"""Loading and saving ONNX files.

Loading turns whatever an exporter wrote into the one form the analysis expects, on a copy (the input file is never
touched): external data checked but left on disk and read lazily (``spc.weights``; a missing file is a clear
error), opsets below 11 lifted with onnx's version converter, weights held in Constant nodes moved to initializers,
initializers removed from the graph inputs, every node named, nodes sorted topologically, and the graph checked.
Saving validates nothing by itself (see ``spc.validate``; external data is checked with onnx.checker on the written
file) but is atomic: a temporary file beside the target is renamed over it, so a reader never sees a
half-written model; with external data the ``.data`` file is streamed tensor by tensor and renamed first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import networkx as nx
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import lazyproto, weights
from .errors import SpcError

MIN_OPSET = 11
_TWO_GB = 2**31 - 1
LAZY_FILE_BYTES = 64 << 20  # single files this large keep their weights on disk until read (spc.lazyproto)


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read ``path`` and return a normalised copy of the model, or raise ``SpcError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SpcError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        model = lazyproto.load_light(path) if path.stat().st_size >= LAZY_FILE_BYTES else None
        if model is None:
            model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise SpcError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise SpcError(f"{path}: not an ONNX model (no graph found; the file may be truncated or of another format)")
    _load_external_data(model, path)
    return normalise(model, source=str(path))


def from_proto(model: onnx.ModelProto, source: str = "<model>") -> onnx.ModelProto:
    """Normalise an in-memory model (a copy; the caller's proto is left as it was)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return normalise(copy, source=source)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """External weights stay on disk (read one at a time when a pass needs them, see ``spc.weights``); only their
    files are checked here."""
    weights.anchor(model, path.parent, str(path))


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (ai.onnx) domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def normalise(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Bring an exporter's model into the canonical form described in the module docstring."""
    opset = default_opset(model)
    if opset == 0:
        raise SpcError(f"{source}: the model imports no ai.onnx opset")
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception as exc:  # the converter raises several unrelated types
            raise SpcError(
                f"{source}: opset {opset} is older than {MIN_OPSET} and onnx's version converter could not lift it "
                f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
            ) from None
    graph = model.graph
    _name_nodes(graph)
    _constants_to_initializers(graph)
    _materialise_identity_weights(graph)
    _drop_initializer_inputs(graph)
    _check_wiring(graph, source)
    toposort(graph)
    problem = checker_problem(model)
    if problem:
        raise SpcError(f"{source}: invalid ONNX graph: {problem}")
    return model


def light_copy(model: onnx.ModelProto, keep_elements: int = 4096) -> onnx.ModelProto:
    """The model with its large weights turned into typed graph inputs: what shape inference and the structural
    checks need, without copying (or serialising) hundreds of MB of weights."""
    light = onnx.ModelProto()
    graph = model.graph
    light.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                                   producer_name=model.producer_name, functions=model.functions))
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    for init in graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        if count <= keep_elements and not weights.is_external(init):
            light.graph.initializer.append(init)
        else:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def checker_problem(model: onnx.ModelProto) -> str | None:
    """onnx.checker's complaint in one line, or None. Deprecated op versions (GroupNormalization-18) still run in
    every runtime, so they are accepted. Large weights are checked for type and shape only."""
    try:
        onnx.checker.check_model(light_copy(model))
    except onnx.checker.ValidationError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "validation failed")
        return None if "deprecated" in first else first[:200]
    return None


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes carrying a tensor become initializers, so weights have one representation."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            array = _constant_value(attr)
            if array is not None:
                graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _constant_value(attr: onnx.AttributeProto):
    import numpy as np

    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    return None


def _materialise_identity_weights(graph: onnx.GraphProto) -> None:
    """The TorchScript exporter stores bit-identical parameters once and re-creates the others as
    ``Identity(first)`` (e.g. every zero-initialised bias of a BERT). They are separate parameters: give each its
    own copy, or pruning would couple unrelated layers."""
    weights = {init.name: init for init in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in weights and node.output[0] not in weights:
            copy = onnx.TensorProto()
            copy.CopyFrom(weights[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            weights[copy.name] = copy
            continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    """Older exporters list every initializer as a graph input too; a weight is not a network input."""
    names = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in names]
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)


def op_graph(graph: onnx.GraphProto) -> nx.DiGraph:
    """Nodes of the graph as a networkx DiGraph, edges labelled with the tensor that connects them."""
    producer = {out: node.name for node in graph.node for out in node.output if out}
    dag = nx.DiGraph()
    dag.add_nodes_from(node.name for node in graph.node)
    for node in graph.node:
        for name in node_inputs(node):
            if name in producer:
                dag.add_edge(producer[name], node.name, tensor=name)
    return dag


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node reads, including outer-scope names its subgraphs capture."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names.extend(captured_names(sub))
    return names


def captured_names(graph: onnx.GraphProto) -> list[str]:
    """Names used inside ``graph`` (recursively) that it does not define itself: they come from the outer scope."""
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    used: list[str] = []
    for node in graph.node:
        defined.update(out for out in node.output if out)
    for node in graph.node:
        for name in node_inputs(node):
            if name not in defined:
                used.append(name)
    return used


def _check_wiring(graph: onnx.GraphProto, source: str) -> None:
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    produced: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in produced or out in available:
                raise SpcError(f"{source}: tensor '{out}' is produced twice (node '{node.name}')")
            produced[out] = node.name
    available |= set(produced)
    for node in graph.node:
        for name in node_inputs(node):
            if name not in available:
                raise SpcError(f"{source}: node '{node.name}' ({node.op_type}) reads '{name}', which nothing produces")
    for value in graph.output:
        if value.name not in available:
            raise SpcError(f"{source}: graph output '{value.name}' is not produced by any node")
    dag = op_graph(graph)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        return
    names = " -> ".join(edge[0] for edge in cycle)
    raise SpcError(f"{source}: the graph has a cycle through nodes {names}")


def toposort(graph: onnx.GraphProto) -> None:
    dag = op_graph(graph)
    order = {name: index for index, name in enumerate(node.name for node in graph.node)}
    ranked = list(nx.lexicographical_topological_sort(dag, key=lambda name: order[name]))
    by_name = {node.name: node for node in graph.node}
    sorted_nodes = [by_name[name] for name in ranked]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically. Models whose weights live on disk, models over 2 GB, or when asked:
    the weights go to ``<name>.data`` beside it, streamed one tensor at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = weights.needs_data_file(model) or weights.total_bytes(model) >= _TWO_GB
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_data = None
    try:
        if external_data:
            tmp_data = _save_external(model, path, tmp)
        else:
            with open(tmp, "wb") as handle:
                if weights.has_external(model):  # weights still on disk: streamed in, one at a time
                    lazyproto.write_inline(model, handle)
                else:
                    handle.write(model.SerializeToString())
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover is not None and leftover.exists():
                leftover.unlink()
    return path


def _save_external(model: onnx.ModelProto, path: Path, tmp: Path) -> Path:
    """Weights into a temporary data file, the graph checked on disk (onnx.checker on the path: a proto over 2 GB
    cannot be checked in memory), then the data file renamed to ``<name>.data``; the caller renames the graph."""
    data_name = f"{path.name}.data"
    fd, data_tmp = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_data = Path(data_tmp)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # weights on disk are references: this copies the graph, not the weights
    weights.write_external(copy, tmp_data, tmp_data.name)
    onnx.save_model(copy, str(tmp))
    try:
        onnx.checker.check_model(str(tmp))
    except onnx.checker.ValidationError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "validation failed")
        if "deprecated" not in first:
            raise SpcError(f"refusing to write {path}: onnx.checker rejects the written model ({first[:200]})") from None
    for tensor in weights.all_tensors(copy):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save_model(copy, str(tmp))
    os.replace(tmp_data, path.parent / data_name)
    return tmp_data
