"""Writes OBS-compensated weights and bias changes into a pruned model: initializers keep their names, a
model whose weights are on disk gets them back on disk (``spc.weights``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spc.analysis import Analysis
from spc.rewrite import unique_name
from spc.weights import read, store
from spc.weights import is_external as weights_on_disk

from .obs_consumers import Consumer, matrix_to_weight


def current_dtype(tensor: onnx.TensorProto) -> np.dtype:
    """The numpy type a tensor reads back as (without reading it)."""
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


class WeightEditor:
    """Writes compensated weights and bias changes into the pruned model (initializers keep their names)."""

    def __init__(self, analysis: Analysis, model: onnx.ModelProto, removed: np.ndarray):
        self.analysis = analysis
        self.graph = analysis.graph
        self.model = model
        self.removed = removed
        self.inits = {init.name: init for init in model.graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self.nodes = {node.name: node for node in model.graph.node}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.names = set(self.inits) | {o for node in model.graph.node for o in node.output}

    def kept(self, tensor: str, axis: int) -> np.ndarray:
        key = (tensor, axis)
        size = self.graph.shape(tensor)[axis]
        if key not in self.analysis.space.dims or self.analysis.space.dims[key].dynamic:
            return np.arange(size)
        return np.flatnonzero(~self.removed[self.analysis.dim_labels(key)])

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            array = read(self.inits[name])
            self.arrays[name] = array if array.flags.writeable and array.flags.owndata else array.copy()
        return self.arrays[name]

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def set_weight(self, consumer: Consumer, kept_matrix: np.ndarray) -> None:
        layer = consumer.layer
        current = self.inits[layer.weight]
        dtype = current_dtype(current)  # cast before slicing: the copies are in the weight's own precision
        full = matrix_to_weight(kept_matrix.astype(dtype), self.graph.shape(layer.weight), layer.weight_in_axis)
        for axis in range(full.ndim):
            kept = self.kept(layer.weight, axis)
            if axis != layer.weight_in_axis and kept.size != full.shape[axis]:
                full = np.take(full, kept, axis=axis)
        if tuple(current.dims) != full.shape:
            return  # the rewrite sliced this weight differently than expected: leave it as it is
        self.arrays.pop(layer.weight, None)
        full = np.ascontiguousarray(full)
        if weights_on_disk(current):  # straight back to disk: the compensated weights are never all in memory
            current.CopyFrom(store(numpy_helper.from_array(full, current.name), current))
            return
        self.arrays[layer.weight] = full

    def _out_slice(self, consumer: Consumer, values: np.ndarray) -> np.ndarray:
        layer = consumer.layer
        return values[self.kept(layer.weight, layer.weight_out_axis)]

    def add_bias(self, consumer: Consumer, per_out: np.ndarray) -> None:
        layer = consumer.layer
        delta = self._out_slice(consumer, per_out)
        node = self.nodes.get(layer.node)
        if node is None:
            return
        graph = self.graph
        # 1. the layer's own bias
        if layer.bias and layer.bias in self.inits and self.uses.get(layer.bias, 0) == 1:
            bias = self.array(layer.bias)
            if bias.size == delta.size:
                self.arrays[layer.bias] = (bias + delta.reshape(bias.shape)).astype(bias.dtype)
                return
        users = graph.consumers.get(layer.output, [])
        if len(users) == 1:
            user = users[0]
            # 2. a BatchNorm that follows: its running mean absorbs the constant
            if user.op_type == "BatchNormalization" and user.input[0] == layer.output:
                mean_name = user.input[3]
                if mean_name in self.inits and self.uses.get(mean_name, 0) == 1:
                    mean = self.array(mean_name)
                    if mean.size == delta.size:
                        self.arrays[mean_name] = (mean - delta).astype(mean.dtype)
                        return
            # 3. the bias Add that follows a MatMul
            if user.op_type == "Add" and layer.kind == "matmul":
                other = user.input[1] if user.input[0] == layer.output else user.input[0]
                if other in self.inits and self.uses.get(other, 0) == 1:
                    value = self.array(other)
                    if value.size == delta.size and value.shape[-1] == delta.size:
                        self.arrays[other] = (value + delta.reshape(value.shape)).astype(value.dtype)
                        return
        # 4. a new bias: a Conv/Gemm input, or an Add after a MatMul, in the weight's own precision (fp16 stays fp16)
        dtype = self.graph.weight(layer.weight).dtype
        if layer.kind in ("conv", "convtranspose") and (len(node.input) < 3 or not node.input[2]):
            name = self.fresh(f"{layer.weight}_obs_bias")
            self.arrays[name] = delta.astype(dtype)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
            return
        if layer.kind == "gemm" and (len(node.input) < 3 or not node.input[2]):
            name = self.fresh(f"{layer.weight}_obs_bias")
            self.arrays[name] = delta.astype(dtype)
            node.input.append(name)
            return
        name = self.fresh(f"{layer.weight}_obs_bias")
        self.arrays[name] = delta.astype(dtype)
        raw = self.fresh(f"{layer.output}_pre_obs_bias")
        old_output = node.output[0]
        node.output[0] = raw
        add = helper.make_node("Add", [raw, name], [old_output], name=self.fresh(f"{layer.node}_obs_bias_add"))
        nodes = list(self.model.graph.node)
        position = next(i for i, n in enumerate(nodes) if n is node or n.name == node.name)
        self.model.graph.node.insert(position + 1, add)

    def current(self) -> onnx.ModelProto:
        """A copy of the model with the edits made so far (for sequential calibration)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        for position, init in enumerate(graph.initializer):
            if init.name in self.arrays:
                graph.initializer[position].CopyFrom(numpy_helper.from_array(self.arrays[init.name], init.name))
        existing = {init.name for init in graph.initializer}
        for name, array in self.arrays.items():
            if name not in existing:
                graph.initializer.append(numpy_helper.from_array(array, name))
        return model

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        for position, init in enumerate(graph.initializer):
            if init.name in self.arrays:
                tensor = numpy_helper.from_array(self.arrays.pop(init.name), init.name)
                graph.initializer[position].CopyFrom(store(tensor, init))
        for name, array in self.arrays.items():
            graph.initializer.append(numpy_helper.from_array(array, name))
        return self.model
