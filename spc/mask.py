"""Soft pruning: the same model with the removed atoms' weights set to their neutral value instead of cut out.

This is the correctness oracle of every rewrite (masking a group's channels and physically removing them must give
the same outputs) and is also useful on its own, to try a plan without changing any shape. Weights are zeroed,
except divisors and variances, which are set to 1 so that no NaN appears where a channel is dead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .analysis import Analysis
from .analysis.rules.base import NEUTRAL_FILL, ROLE_WEIGHT
from .analysis.rules.quant import masked_quantized_weights


def mask_removal(analysis: Analysis, removed: np.ndarray) -> onnx.ModelProto:
    graph = analysis.graph
    arrays: dict[str, np.ndarray] = {}
    for key in analysis.weight_dims:
        tensor, axis = key
        gone = np.flatnonzero(removed[analysis.dim_labels(key)])
        if gone.size == 0 or analysis.space.dims[key].dynamic:
            continue
        array = arrays.setdefault(tensor, graph.weight(tensor).copy())
        index = [slice(None)] * array.ndim
        index[axis] = gone
        array[tuple(index)] = NEUTRAL_FILL.get(analysis.roles.get(tensor, ROLE_WEIGHT), 0.0)
    arrays.update(masked_quantized_weights(analysis, removed))  # integer weights: removed slices at zero point
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    for position, init in enumerate(model.graph.initializer):
        if init.name in arrays:
            model.graph.initializer[position].CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    return model
