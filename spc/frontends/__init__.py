"""Front-ends: one call from a framework's model to the normalised ``onnx.ModelProto`` that ``spc.analyze``,
``spc.prune`` and compile take, through each framework's own exporter.

    model = spc.from_torch(module.eval(), torch.randn(1, 3, 224, 224))
    model = spc.from_keras(keras_model)
    model = spc.from_jax(apply_fn, params, np.zeros((1, 28, 28, 1), np.float32))
    model = spc.from_paddle(layer, [paddle.static.InputSpec([None, 3, 224, 224], "float32", "x")])
    model = spc.from_sklearn(pipeline, X[:1])

Each framework is an optional extra (``pip install 'spc[torch]'``, ``[keras]``, ``[jax]``, ``[paddle]``,
``[sklearn]``) imported only when its front-end is called; a missing one is an SpcError saying which extra to
install, and an exporter's failure is an SpcError naming the framework with the exporter's message.
"""

from .jax_ import from_jax
from .keras import from_keras
from .paddle import from_paddle
from .sklearn import from_sklearn
from .torch_ import from_torch

__all__ = ["from_jax", "from_keras", "from_paddle", "from_sklearn", "from_torch"]
