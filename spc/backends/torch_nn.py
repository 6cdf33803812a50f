"""ONNX layer ops as torch functions: convolution, pooling, normalisation, Gemm, reductions, dropout.

Same contract as ``torch_ops``: ``fn(attrs, *inputs)``. Ops that behave differently when training
(BatchNormalization, Dropout) take a ``training`` keyword; the interpreter passes ``module.training``, so
fine-tuning uses batch statistics and updates the running ones in place, as ``nn.BatchNorm`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .torch_ops import Unsupported, ints


def _same_pads(a, x, kernel, strides, dilations):
    """Explicit [begins..., ends...] pads for auto_pad SAME_UPPER/SAME_LOWER (NOTSET: the pads attribute)."""
    mode = a.get("auto_pad", "NOTSET")
    n = len(kernel)
    if mode in ("NOTSET", ""):
        return list(a.get("pads", [0] * 2 * n))
    if mode == "VALID":
        return [0] * 2 * n
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(total - small if mode == "SAME_LOWER" else small)
        ends.append(small if mode == "SAME_LOWER" else total - small)
    return begins + ends


def _symmetric(x, pads, fill=0.0):
    """Torch layers pad both sides alike: pad x explicitly when begins differ from ends."""
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return x, pads[:n]
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return F.pad(x, torch_pads, value=fill), [0] * n


def _geometry(a, x, kernel):
    n = len(kernel)
    strides, dilations = a.get("strides", [1] * n), a.get("dilations", [1] * n)
    return strides, dilations, _same_pads(a, x, kernel, strides, dilations)


def conv(a, x, w, b=None):
    n = w.dim() - 2
    strides, dilations, pads = _geometry(a, x, a.get("kernel_shape", list(w.shape[2:])))
    x, padding = _symmetric(x, pads)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(x, w, b, strides, padding, dilations, a.get("group", 1))


def conv_transpose(a, x, w, b=None):
    n = w.dim() - 2
    if a.get("output_shape") or a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise Unsupported("output_shape / auto_pad on ConvTranspose")
    strides, dilations = a.get("strides", [1] * n), a.get("dilations", [1] * n)
    pads = a.get("pads", [0] * 2 * n)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = fn(x, w, b, strides, 0, a.get("output_padding", [0] * n), a.get("group", 1), dilations)
    for axis in range(n):  # crop the pads (ONNX allows begins != ends)
        y = y.narrow(axis + 2, pads[axis], y.shape[axis + 2] - pads[axis] - pads[axis + n])
    return y


def max_pool(a, x):
    kernel = a["kernel_shape"]
    n = len(kernel)
    strides, dilations, pads = _geometry(a, x, kernel)
    x, padding = _symmetric(x, pads, fill=float("-inf"))
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return fn(x, kernel, strides, padding, dilations, ceil_mode=bool(a.get("ceil_mode", 0)))


def average_pool(a, x):
    kernel = a["kernel_shape"]
    n = len(kernel)
    strides, _, pads = _geometry(a, x, kernel)
    include = bool(a.get("count_include_pad", 0))
    if pads[:n] != pads[n:] and not include:
        raise Unsupported("asymmetric pads with count_include_pad=0")
    x, padding = _symmetric(x, pads)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    return fn(x, kernel, strides, padding, ceil_mode=bool(a.get("ceil_mode", 0)), count_include_pad=include)


def batch_norm(a, x, scale, bias, mean, var, training=False):
    momentum = 1.0 - a.get("momentum", 0.9)  # ONNX weighs the old running value; torch the new batch value
    return F.batch_norm(x, mean, var, scale, bias, training, momentum, a.get("epsilon", 1e-5))


def layer_norm(a, x, scale, bias=None):
    axis = a.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    shape = x.shape[axis:]
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        a.get("epsilon", 1e-5))


def group_norm(a, x, scale, bias):
    groups, channels = a["num_groups"], x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale per group
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, a.get("epsilon", 1e-5))


def gemm(a, x, w, c=None):
    x = x.t() if a.get("transA", 0) else x
    w = w if a.get("transB", 0) else w.t()  # F.linear wants [out, in]
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha == 1.0 and beta == 1.0:
        return F.linear(x, w, c)
    y = alpha * F.linear(x, w)
    return y if c is None else y + beta * c


def dropout(a, x, ratio=None, mode=None, training=False):
    p = float(ratio.item()) if ratio is not None else a.get("ratio", 0.5)
    return F.dropout(x, p, training)


def _reduce(fn):
    """Reductions take ``axes`` as an attribute (older opsets) or as an input (ReduceSum 13+, others 18+)."""
    def run(a, x, axes=None):
        dims = ints(axes) if axes is not None else a.get("axes")
        if not dims:
            if a.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, [d + x.dim() if d < 0 else d for d in dims], bool(a.get("keepdims", 1)))
    return run


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


REDUCTIONS = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k), "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k), "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": _prod, "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: x.square().sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: x.square().sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}

LAYERS = {
    "Conv": conv, "ConvTranspose": conv_transpose, "MaxPool": max_pool, "AveragePool": average_pool,
    "GlobalAveragePool": lambda a, x: x.mean(list(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda a, x: x.amax(list(range(2, x.dim())), keepdim=True),
    "BatchNormalization": batch_norm, "LayerNormalization": layer_norm, "GroupNormalization": group_norm,
    "InstanceNormalization": lambda a, x, s, b: F.instance_norm(x, weight=s, bias=b, eps=a.get("epsilon", 1e-5)),
    "Gemm": gemm, "Dropout": dropout,
    **{op: _reduce(fn) for op, fn in REDUCTIONS.items()},
}

#: ops whose function takes ``training=module.training``
TRAINING = {"BatchNormalization", "Dropout"}
