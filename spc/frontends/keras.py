"""Keras (TensorFlow) front-end over tf2onnx.

tf2onnx keeps Keras' NHWC layout: the graph takes NHWC inputs and its optimizer leaves a Transpose in front of the
first Conv (spc's Transpose rule carries the channel axis through it).
"""

from __future__ import annotations

import onnx

from ._common import exporting, finish, require


def from_keras(model, **opts) -> onnx.ModelProto:
    """Convert a built Keras model; ``opts`` go to ``tf2onnx.convert.from_keras`` (``input_signature``, ``opset``,
    ``inputs_as_nchw``, ...)."""
    require("tensorflow", "from_keras", "TensorFlow", "keras")
    tf2onnx = require("tf2onnx", "from_keras", "tf2onnx", "keras")
    with exporting("Keras (tf2onnx)"):
        proto, _ = tf2onnx.convert.from_keras(model, **opts)
    return finish(proto, f"from_keras({getattr(model, 'name', type(model).__name__)})")
