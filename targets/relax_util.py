"""Reading Relax expressions: the operators spc rewrites, static dimensions, shapes, dtypes and constant weights."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

_OP = tvm.ir.Op.get
OP_MATMUL = _OP("relax.matmul")
OP_CONV2D = _OP("relax.nn.conv2d")
OP_ADD = _OP("relax.add")
OP_RELU = _OP("relax.nn.relu")
OP_LAYER_NORM = _OP("relax.nn.layer_norm")
OP_SOFTMAX = _OP("relax.nn.softmax")
OP_MAX_POOL = _OP("relax.nn.max_pool2d")
OP_CALL_TIR = _OP("relax.call_tir")
OP_WHERE = _OP("relax.where")

OPAQUE = 8  # relay/relax OpPatternKind.kOpaque: FuseOps leaves spc's kernels alone


def _static(dim) -> int | None:
    return int(dim.value) if isinstance(dim, tirx.IntImm) else None


def _shape(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _dtype(expr) -> str | None:
    ty = expr.ty
    return ty.dtype if isinstance(ty, relax.TensorType) else None


def _const_array(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.GenericConst):
        value = expr.value
        return value.numpy() if hasattr(value, "numpy") else None
    return None


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


def _expr_str(expr) -> str:
    import re

    return re.sub(r"T\.int64\((-?\d+)\)", r"\1", str(expr))


def _cost_dim(dims) -> int:
    """Rows for the cost model when some dims are symbolic: symbolic dims count as 1 (latency, batch 1)."""
    out = 1
    for d in dims:
        s = _static(d)
        out *= s if s is not None else 1
    return out


def _is_weight_call(call) -> bool:
    if not isinstance(call, relax.Call):
        return False
    if call.op.same_as(OP_MATMUL):
        w = call.args[1]
        return isinstance(w, tvm.ir.GenericConst) and len(_shape(w) or []) == 2
    if call.op.same_as(OP_CONV2D):
        return isinstance(call.args[1], tvm.ir.GenericConst)
    return False


def conv_geometry(call):
    """A conv2d call's ``kernels.ConvGeom`` (NCHW, OIHW weight), or None where a size is symbolic."""
    from .kernels import ConvGeom

    x_shape, w_shape = _shape(call.args[0]), _shape(call.args[1])
    if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return None
    dims = [_static(d) for d in x_shape[1:]] + [_static(d) for d in w_shape]
    if any(d is None for d in dims):
        return None
    c_in, h, w, c_out, _, kh, kw = dims
    attrs = call.attrs
    return ConvGeom(c_in=c_in, h=h, w=w, c_out=c_out, kh=kh, kw=kw, stride=tuple(int(s) for s in attrs.strides),
                    pad=_padding(attrs), dilation=tuple(int(d) for d in attrs.dilation))


def _padding(attrs) -> tuple[int, int, int, int]:
    """A conv2d's padding as (top, left, bottom, right)."""
    pad = [int(p) for p in attrs.padding]
    return tuple(pad * 2 if len(pad) == 2 else pad)
