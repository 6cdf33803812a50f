"""Fold inference BatchNormalization into the convolution before it, ahead of code generation.

A BatchNormalization after a Conv is a per-output-channel affine map, so it can live in the convolution's weights
and bias: W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps). The kernels then apply it in
their epilogue (with the bias and ReLU) instead of a separate pass over the feature map; on a small CNN the
standalone BatchNorm glue was a fifth of the compiled run time. The folded graph only feeds the compiler: the
bundle keeps the model as the user gave it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from spc.graph import evaluate_node, node_attr
from spc.io import default_opset
from spc.rewrite import unique_name


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs (and graph outputs) read each tensor name."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for out in model.graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    return uses


def _drop_nodes(graph: onnx.GraphProto, indices: set[int]) -> None:
    if indices:
        kept = [node for index, node in enumerate(graph.node) if index not in indices]
        del graph.node[:]
        graph.node.extend(kept)


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers among ``names`` that no node, graph input or output reads any more."""
    read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output} | \
        {v.name for v in graph.input}
    for tensor in [t for t in graph.initializer if t.name in names and t.name not in read]:
        graph.initializer.remove(tensor)


def _foldable(conv: onnx.NodeProto, bn: onnx.NodeProto, inits: dict, uses: dict) -> bool:
    if conv.domain not in ("", "ai.onnx") or bn.domain not in ("", "ai.onnx"):
        return False
    if len(bn.output) != 1 or node_attr(bn, "training_mode", 0):
        return False
    if uses.get(conv.output[0], 0) != 1 or len(conv.input) < 2 or conv.input[1] not in inits:
        return False
    if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
        return False
    if any(name not in inits for name in bn.input[1:5]) or len(bn.input) < 5:
        return False
    weight = inits[conv.input[1]]
    return weight.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every Conv -> BatchNormalization pair (the Conv's output read only by the
    BatchNormalization, all parameters constant) merged into one Conv; returns it and the number folded.

    The Conv keeps its weight's initializer name when no other node reads it, so per-layer decisions keyed by
    weight name (``--speedup``'s sparse layers) still find it."""
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    graph = model_out.graph
    inits = _initializers(model_out)
    uses = _uses(model_out)
    producer = {out: node for node in graph.node for out in node.output}
    taken = set(inits) | {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    remove: set[int] = set()
    gone: set[str] = set()
    released: set[str] = set()
    for index, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or not _foldable(conv, bn, inits, uses):
            continue
        w_proto = inits[conv.input[1]]
        w_stored = numpy_helper.to_array(w_proto)
        w = w_stored.astype(np.float64)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64).reshape(-1) for n in bn.input[1:5])
        if not (gamma.size == beta.size == mean.size == var.size == w.shape[0]):
            continue
        scale = gamma / np.sqrt(var + float(node_attr(bn, "epsilon", 1e-5)))
        has_bias = len(conv.input) > 2 and conv.input[2]
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64).reshape(-1) if has_bias else 0.0
        dtype = w_stored.dtype
        new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype)
        new_b = ((b - mean) * scale + beta).astype(dtype)
        w_name = conv.input[1] if uses.get(conv.input[1], 0) == 1 else unique_name(f"{conv.input[1]}_bnfold", taken)
        b_name = unique_name(f"{conv.name or conv.output[0]}_bias", taken)
        w_proto_new = numpy_helper.from_array(new_w, w_name)
        if w_name == conv.input[1]:
            w_proto.CopyFrom(w_proto_new)
        else:
            graph.initializer.append(w_proto_new)
        graph.initializer.append(numpy_helper.from_array(new_b, b_name))
        inits[b_name] = graph.initializer[-1]
        gone.add(conv.output[0])
        released.update(list(bn.input[1:5]) + list(conv.input[1:3]))
        x_name = conv.input[0]
        del conv.input[:]
        conv.input.extend([x_name, w_name, b_name])
        conv.output[0] = bn.output[0]
        remove.add(index)
    if remove:
        _drop_nodes(graph, remove)
        stale = [vi for vi in graph.value_info if vi.name in gone]
        for vi in stale:
            graph.value_info.remove(vi)
        still_read = set(_uses(model_out)) | {i.name for i in graph.input}  # (IR < 4 lists weights as inputs)
        unused = [t for t in graph.initializer if t.name in released and t.name not in still_read]
        for tensor in unused:  # BatchNorm parameters and shared weights that nothing reads any more
            graph.initializer.remove(tensor)
    return model_out, len(remove)


SHAPE_OPS = frozenset({"Constant", "ConstantOfShape", "Cast", "Reshape", "Transpose", "Slice", "Concat", "Squeeze",
                       "Unsqueeze", "Gather", "Identity", "Flatten", "Expand", "Range", "Add", "Sub", "Mul", "Div",
                       "Neg", "Equal", "Where", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or",
                       "Not", "Xor", "Min", "Max", "Mod", "Abs", "Tile", "Size"})
SHAPE_FOLD_MAX_ELEMENTS = 4096  # folded only when every input and output is small: shape arithmetic, not weights
SHAPE_FOLD_ROUNDS = 8  # each round's constants can make more shapes static (a mask built from the input's size)


def fold_shape_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with its shape arithmetic evaluated into initializers; returns it and the number of
    nodes folded. Two steps, repeated until neither finds more: ``Shape`` (and a ``Gather`` or ``Slice`` of one)
    where shape inference knows the sizes it reads (``_fold_known_shapes``), and small computations on constants
    only (``_fold_constant_nodes``). PyTorch exports ``F.pad`` amounts as Constant -> Concat -> Reshape -> Slice ->
    Transpose -> Cast, which TVM's importer rejects ("Dynamic pads are not supported") and ``fold_pad`` cannot
    read; Hugging Face models build their position ids and attention masks from ``Shape`` of the input (Range,
    Expand, GatherElements, And over sizes that are static once the batch is bound, or the sequence length
    always), which TVM's importer could not type ("Reshape expects the input tensor to have known shape")."""
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    total = 0
    for _ in range(SHAPE_FOLD_ROUNDS):
        found = _fold_known_shapes(model_out) + _fold_constant_nodes(model_out)
        total += found
        if not found:
            break
    return model_out, total


def _fold_constant_nodes(model: onnx.ModelProto) -> int:
    """``SHAPE_OPS`` nodes whose inputs are all small constants (at most ``SHAPE_FOLD_MAX_ELEMENTS`` values),
    evaluated with onnx.reference into initializers, in place; returns how many."""
    graph = model.graph
    values = {name: numpy_helper.to_array(t) for name, t in _initializers(model).items()
              if np.prod(t.dims, dtype=np.int64) <= SHAPE_FOLD_MAX_ELEMENTS}
    graph_outputs = {o.name for o in graph.output}
    opset = default_opset(model)
    remove: set[int] = set()
    released: set[str] = set()
    for index, node in enumerate(graph.node):
        if (node.op_type not in SHAPE_OPS or node.domain not in ("", "ai.onnx") or not opset
                or any(o in graph_outputs for o in node.output)
                or any(name and name not in values for name in node.input)):
            continue
        outputs = evaluate_node(node, {name: values[name] for name in node.input if name}, opset)
        if not outputs or any(out.size > SHAPE_FOLD_MAX_ELEMENTS for out in outputs.values()):
            continue  # an op the reference cannot evaluate stays in the graph
        for name, out in outputs.items():
            values[name] = out
            graph.initializer.append(numpy_helper.from_array(out, name))
        released.update(node.input)
        remove.add(index)
    _drop_nodes(graph, remove)
    _drop_unread(graph, released)
    return len(remove)


def known_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Each tensor's dims as shape inference (spc.graph.infer_shapes) gives them: an int where the size is known,
    None where it is symbolic or unknown; tensors of unknown rank are absent."""
    from spc.graph import infer_shapes

    inferred = infer_shapes(model).graph
    dims: dict[str, list] = {}
    for value in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            dims[value.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim]
    for init in model.graph.initializer:
        dims[init.name] = [int(d) for d in init.dims]
    return dims


def _fold_known_shapes(model: onnx.ModelProto) -> int:
    """``Shape`` nodes whose input's sizes are all known, and ``Gather``/``Slice`` nodes that pick known sizes out
    of a ``Shape`` whose input also has symbolic ones (the sequence length of a [batch, 128] input), replaced by
    initializers, in place; returns how many nodes were folded. The positions a Gather or Slice picks are found by
    evaluating it on the positions 0..rank-1 themselves."""
    graph = model.graph
    shape_nodes = [node for node in graph.node if node.op_type == "Shape" and node.domain in ("", "ai.onnx")]
    if not shape_nodes:
        return 0
    dims = known_dims(model)
    opset = default_opset(model)
    inits = _initializers(model)
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded: dict[str, np.ndarray] = {}  # output name -> value
    done: set[int] = set()
    for node in shape_nodes:
        rank_dims = dims.get(node.input[0])
        if rank_dims is None or node.output[0] in graph_outputs:
            continue
        start, end = node_attr(node, "start", 0), node_attr(node, "end", None)
        picked = rank_dims[start:end] if end is not None else rank_dims[start:]
        if all(d is not None for d in picked):
            folded[node.output[0]] = np.array(picked, np.int64)
            done.add(id(node))
            continue
        positions = np.arange(len(rank_dims), dtype=np.int64)[start:end] if end is not None else \
            np.arange(len(rank_dims), dtype=np.int64)[start:]
        for reader in readers.get(node.output[0], []):
            if (reader.op_type not in ("Gather", "Slice") or reader.input[0] != node.output[0]
                    or reader.output[0] in graph_outputs or not opset):
                continue
            constants = {}
            for name in reader.input[1:]:
                if name and name not in inits:
                    break
                if name:
                    constants[name] = numpy_helper.to_array(inits[name])
            else:
                which = evaluate_node(reader, {reader.input[0]: positions, **constants}, opset).get(reader.output[0])
                if which is not None and all(rank_dims[int(i)] is not None for i in which.reshape(-1)):
                    folded[reader.output[0]] = np.array([rank_dims[int(i)] for i in which.reshape(-1)],
                                                        np.int64).reshape(which.shape)
                    done.add(id(reader))
    if not done:
        return 0
    for name, value in folded.items():
        graph.initializer.append(numpy_helper.from_array(value, name))
    read = {name for node in graph.node if id(node) not in done for name in node.input}
    done.update(id(node) for node in shape_nodes if node.output[0] not in read | graph_outputs)  # all read folded
    kept = [node for node in graph.node if id(node) not in done]
    del graph.node[:]
    graph.node.extend(kept)
    return len(done)


def zero_pad_amounts(pad: onnx.NodeProto, value_of) -> list[int] | None:
    """The begin+end amounts of a constant-mode Pad with constant, non-negative amounts and a zero fill value (the
    amounts as an input, opset >= 11, or an attribute before); None otherwise. ``value_of(name)``: a constant
    input's array, or None when it is computed at run time."""
    if pad.domain not in ("", "ai.onnx") or node_attr(pad, "mode", "constant") not in ("constant", b"constant"):
        return None
    if len(pad.input) > 3 and pad.input[3]:  # axes (opset 18): only the full form
        return None
    if len(pad.input) > 1 and pad.input[1]:
        amounts = value_of(pad.input[1])
        if amounts is None:
            return None
        amounts = np.asarray(amounts).reshape(-1).tolist()
    else:
        amounts = list(node_attr(pad, "pads", []) or [])
    if len(pad.input) > 2 and pad.input[2]:
        fill = value_of(pad.input[2])
        if fill is None or np.any(np.asarray(fill) != 0):
            return None
    elif float(node_attr(pad, "value", 0.0)) != 0.0:
        return None
    if not amounts or len(amounts) % 2 or min(amounts) < 0:
        return None
    return [int(a) for a in amounts]


def merged_conv_pads(conv: onnx.NodeProto, amounts: list[int]) -> list[int] | None:
    """``conv``'s ``pads`` once a zero Pad of ``amounts`` (ONNX order, all axes) before it is merged into it; None if
    the Pad touches batch or channels or the ranks differ."""
    rank = len(amounts) // 2
    if rank < 3 or any(amounts[axis] or amounts[rank + axis] for axis in (0, 1)):
        return None
    spatial = rank - 2
    conv_pads = list(node_attr(conv, "pads", None) or [0] * (2 * spatial))
    if len(conv_pads) != 2 * spatial:
        return None
    return ([conv_pads[i] + amounts[2 + i] for i in range(spatial)]
            + [conv_pads[spatial + i] + amounts[rank + 2 + i] for i in range(spatial)])


def fold_pad(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every zero Pad of the spatial axes whose only reader is a Conv (as input 0, no
    auto_pad) merged into that Conv's ``pads``; returns it and the number folded.

    TensorFlow-style "same" padding of strided convolutions is exported this way (EfficientNet-Lite0: 17 Pads);
    as separate ops they were half of that model's compiled time, each one a full copy of a feature map."""
    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    graph = model_out.graph
    inits = _initializers(model_out)
    uses = _uses(model_out)
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    remove: set[int] = set()
    released: set[str] = set()
    for index, pad in enumerate(graph.node):
        if pad.op_type != "Pad" or len(pad.output) != 1:
            continue
        conv = readers.get(pad.output[0], [None])[0]
        if (conv is None or conv.op_type != "Conv" or uses.get(pad.output[0], 0) != 1 or conv.input[0] != pad.output[0]
                or node_attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")):
            continue
        amounts = zero_pad_amounts(pad, lambda name: numpy_helper.to_array(inits[name]) if name in inits else None)
        merged = merged_conv_pads(conv, amounts) if amounts is not None else None
        if merged is None:
            continue
        for attribute in list(conv.attribute):
            if attribute.name == "pads":
                conv.attribute.remove(attribute)
        conv.attribute.append(onnx.helper.make_attribute("pads", merged))
        conv.input[0] = pad.input[0]
        released.update(pad.input[1:])
        remove.add(index)
    _drop_nodes(graph, remove)
    _drop_unread(graph, released)
    return model_out, len(remove)
