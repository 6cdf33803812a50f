"""JAX front-end over jax2onnx: ``fn(params, *inputs)`` with ``params`` baked in as initializers.

Flax NNX modules fit through ``nnx.split``: ``graphdef, state = nnx.split(model)`` and
``fn = lambda state, x: nnx.merge(graphdef, state)(x)``. jax2onnx keeps JAX's NHWC layout and wraps each Conv in
Transposes; its value_info shapes are not trusted (spc re-infers shapes).
"""

from __future__ import annotations

import onnx

from ._common import exporting, finish, require


def from_jax(fn, params, example, **opts) -> onnx.ModelProto:
    """Convert ``fn(params, *inputs)`` (``fn(*inputs)`` when ``params`` is None). ``example`` is one input or a
    list of them: arrays, ``jax.ShapeDtypeStruct`` or shape tuples whose strings name dynamic axes
    (``("B", 28, 28, 1)``). ``opts`` go to ``jax2onnx.to_onnx`` (``opset``, ``input_names``, ...)."""
    require("jax", "from_jax", "JAX", "jax")
    jax2onnx = require("jax2onnx", "from_jax", "jax2onnx", "jax")
    bound = fn if params is None else (lambda *inputs: fn(params, *inputs))
    with exporting("JAX (jax2onnx)"):
        proto = jax2onnx.to_onnx(bound, _input_list(example), return_mode="proto", **opts)
    return finish(proto, f"from_jax({getattr(fn, '__name__', type(fn).__name__)})")


def _input_list(example) -> list:
    """One input (an array or a shape tuple) or a list/tuple of inputs, as the list jax2onnx takes."""
    if hasattr(example, "shape"):
        return [example]
    if isinstance(example, tuple) and all(isinstance(dim, (int, str)) for dim in example):
        return [example]
    return list(example)
