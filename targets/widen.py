"""float16 / bfloat16 models computed in float32 on CPU targets, ahead of code generation.

spc's CPU kernels are float32; a float16 layer was left to TVM's scalar loop nests (a float16 ResNet-18 of the
test zoo ran 63x slower than the same model in float32, every layer "tvm"). So on CPU targets the graph the
compiler sees is widened: float16/bfloat16 weights and constants become float32, Casts to them cast to float32,
and the graph's own float16 inputs and outputs keep their type through a Cast at the border (the bundle takes and
returns what the model declares). The results are float32 sums of the float16 weights: closer to the exact ones
than ONNX Runtime's float16 arithmetic. The bundle's model.onnx keeps the model as given.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NARROW = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _narrow_tensors(model: onnx.ModelProto) -> bool:
    graph = model.graph
    if any(t.data_type in NARROW for t in graph.initializer):
        return True
    values = list(graph.input) + list(graph.output)
    return any(v.type.tensor_type.elem_type in NARROW for v in values) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i in NARROW for a in n.attribute) for n in graph.node)


def _widened_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def widen_to_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` computing in float32 where it computed in float16 or bfloat16 (module docstring); returns
    it and how many tensors, nodes and border casts changed (0: the model as given)."""
    if not _narrow_tensors(model):
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    changed = 0
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in NARROW:
            graph.initializer[i].CopyFrom(_widened_tensor(tensor))
            changed += 1
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in NARROW:
                attr.i = TensorProto.FLOAT
                changed += 1
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in NARROW:  # Constant, ConstantOfShape
                attr.t.CopyFrom(_widened_tensor(attr.t))
                changed += 1
    border = []
    renamed = {}
    for value in graph.input:
        if value.type.tensor_type.elem_type in NARROW and value.name not in {t.name for t in graph.initializer}:
            wide = f"{value.name}/float32"
            renamed[value.name] = wide
            border.append(helper.make_node("Cast", [value.name], [wide], to=TensorProto.FLOAT))
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    tail = []
    for value in graph.output:
        elem = value.type.tensor_type.elem_type
        if elem in NARROW:
            wide = f"{value.name}/float32"
            for node in graph.node:
                node.output[:] = [wide if name == value.name else name for name in node.output]
                node.input[:] = [wide if name == value.name else name for name in node.input]
            tail.append(helper.make_node("Cast", [wide], [value.name], to=elem))
    nodes = border + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # the narrow types recorded there no longer hold; inference recomputes them
    return out, changed + len(border) + len(tail)
