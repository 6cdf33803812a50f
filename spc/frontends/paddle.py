"""PaddlePaddle front-end over paddle2onnx: the layer is traced to a static program with ``paddle.jit.save`` (what
``paddle.onnx.export`` does) and that program converted with ``paddle2onnx.export``, in memory. Doing the two steps
here keeps the tracer's own error message (paddle2onnx logs failures and calls ``sys.exit``). paddle2onnx keeps
BatchNormalization as its own node (it does not fold it into the Conv).
"""

from __future__ import annotations

import os
import sys
import tempfile

import onnx

from ..errors import SpcError
from ._common import exporting, finish, require

DEFAULT_OPSET = 17  # paddle2onnx's own default (7 or 9) is older than spc's minimum (11)


def from_paddle(layer, input_spec, **opts) -> onnx.ModelProto:
    """Convert a ``paddle.nn.Layer`` (in ``eval()`` mode) for ``input_spec`` (a ``paddle.static.InputSpec``, a
    tensor, or a list of them); ``opts`` go to ``paddle2onnx.export`` (``opset_version``, ...)."""
    if "tensorflow" in sys.modules and "paddle" not in sys.modules:
        raise SpcError("from_paddle: PaddlePaddle crashes when it is imported after TensorFlow in one process; "
                       "import paddle before tensorflow, or convert in a separate process")
    paddle = require("paddle", "from_paddle", "PaddlePaddle", "paddle")
    paddle2onnx = require("paddle2onnx", "from_paddle", "paddle2onnx", "paddle")
    specs = list(input_spec) if isinstance(input_spec, (list, tuple)) else [input_spec]
    opts.setdefault("opset_version", DEFAULT_OPSET)
    with tempfile.TemporaryDirectory() as folder, exporting("PaddlePaddle (paddle2onnx)"):
        prefix = os.path.join(folder, "model")
        paddle.jit.save(layer, prefix, input_spec=specs)
        program = next(prefix + ext for ext in (".json", ".pdmodel") if os.path.isfile(prefix + ext))
        params = prefix + ".pdiparams" if os.path.isfile(prefix + ".pdiparams") else ""
        proto = onnx.load_from_string(paddle2onnx.export(program, params, save_file=None, **opts))
    return finish(proto, f"from_paddle({type(layer).__name__})")
