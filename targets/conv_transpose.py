"""2-D ConvTranspose rewritten as a convolution, ahead of code generation.

TVM's conv2d_transpose is a scalar loop nest on CPUs (a U-Net's three 2x2/2 upsampling layers took 91% of its
time, 12x ONNX Runtime's whole model), while spc's convolution kernels are vectorised. Two exact forms:

* kernel == stride, no padding, dilation 1, one group (U-Net and FPN upsampling): every input pixel writes its
  own kh x kw block, so the layer is a 1x1 convolution to Co*kh*kw channels (bias repeated per block position)
  followed by a pixel shuffle (Reshape, Transpose, Reshape);
* otherwise: the input with stride-1 zeros between its pixels (Unsqueeze, Pad, Reshape, Slice), then a stride-1
  convolution with the spatially flipped, in/out-swapped weights and padding dilation * (k - 1) - pad (plus
  output_padding at the end). It multiplies the inserted zeros too (stride^2 more MACs), still far faster.

The rewritten graph only feeds the compiler; the bundle keeps the model it compiled. Layers outside these forms
(1-D or 3-D, auto_pad other than NOTSET/VALID, output_shape given, a crop larger than the kernel) stay with TVM.
"""

from __future__ import annotations

import numpy as np
import onnx

from spc.graph import node_attr

from .onnx_emitter import Emitter, constant_values, replaced, taken_names


def _attrs(node: onnx.NodeProto, x_dims: list | None, w: np.ndarray):
    """(strides, pads [t, l, b, r], output_padding, dilations, group) of a 2-D ConvTranspose spc rewrites, else
    None."""
    if w.ndim != 4 or x_dims is None or len(x_dims) != 4 or any(d is None for d in x_dims[1:]):
        return None
    if node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or node_attr(node, "output_shape"):
        return None
    strides = list(node_attr(node, "strides", [1, 1]))
    pads = list(node_attr(node, "pads", [0, 0, 0, 0]))
    output_padding = list(node_attr(node, "output_padding", [0, 0]))
    dilations = list(node_attr(node, "dilations", [1, 1]))
    group = int(node_attr(node, "group", 1))
    kernel = list(w.shape[2:])
    if any(dilations[i] * (kernel[i] - 1) - max(pads[i], pads[i + 2]) < 0 for i in range(2)):
        return None
    return strides, pads, output_padding, dilations, group


def _pixel_shuffle(e: Emitter, node, x: str, w: np.ndarray, bias: np.ndarray | None, h: int, wd: int) -> None:
    c_in, c_out, kh, kw = w.shape
    weight = w.transpose(1, 2, 3, 0).reshape(c_out * kh * kw, c_in, 1, 1).astype(w.dtype)
    inputs = [x, e.const(weight, "W_1x1")]
    if bias is not None:
        inputs.append(e.const(np.repeat(bias, kh * kw).astype(bias.dtype), "B_1x1"))
    y = e.op("Conv", inputs, "blocks", kernel_shape=[1, 1])  # [n, co * kh * kw, h, w]
    y = e.op("Reshape", [y, e.const(np.array([0, c_out, kh, kw, h, wd], np.int64), "shape6")], "blocks6")
    y = e.op("Transpose", [y], "shuffled", perm=[0, 1, 4, 2, 5, 3])  # [n, co, h, kh, w, kw]
    e.op("Reshape", [y, e.const(np.array([0, c_out, h * kh, wd * kw], np.int64), "shape4")], "out",
         out=node.output[0])


def _zero_inserted(e: Emitter, node, x: str, w: np.ndarray, bias: np.ndarray | None, h: int, wd: int,
                   strides, pads, output_padding, dilations, group) -> None:
    sh, sw = strides
    if sh > 1 or sw > 1:
        x = e.op("Unsqueeze", [x, e.const(np.array([3, 5], np.int64), "axes")], "x6")  # [n, c, h, 1, w, 1]
        x = e.op("Pad", [x, e.const(np.array([0] * 9 + [sh - 1, 0, sw - 1], np.int64), "zeros")], "x_spread")
        x = e.op("Reshape", [x, e.const(np.array([0, 0, h * sh, wd * sw], np.int64), "shape")], "x_spread4")
        x = e.op("Slice", [x, e.const(np.array([0, 0], np.int64), "starts"),
                           e.const(np.array([(h - 1) * sh + 1, (wd - 1) * sw + 1], np.int64), "ends"),
                           e.const(np.array([2, 3], np.int64), "slice_axes")], "x_dilated")
    c_in, c_out_g, kh, kw = w.shape
    c_in_g = c_in // group
    flipped = w[:, :, ::-1, ::-1].reshape(group, c_in_g, c_out_g, kh, kw).transpose(0, 2, 1, 3, 4)
    weight = np.ascontiguousarray(flipped.reshape(group * c_out_g, c_in_g, kh, kw))
    reach = [dilations[i] * ((kh, kw)[i] - 1) for i in range(2)]
    conv_pads = [reach[0] - pads[0], reach[1] - pads[1], reach[0] - pads[2] + output_padding[0],
                 reach[1] - pads[3] + output_padding[1]]
    inputs = [x, e.const(weight, "W_conv")] + ([e.const(bias, "B_conv")] if bias is not None else [])
    e.op("Conv", inputs, "out", out=node.output[0], kernel_shape=[kh, kw], pads=conv_pads, dilations=dilations,
         group=group)


def lower_conv_transpose(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each 2-D ConvTranspose of constant weights that spc can express as a convolution
    rewritten (module docstring); returns it and how many were."""
    nodes = [n for n in model.graph.node if n.op_type == "ConvTranspose" and n.domain in ("", "ai.onnx")]
    if not nodes:
        return model, 0
    from .fold import known_dims

    dims = known_dims(model)
    weights = constant_values(model, [name for node in nodes for name in node.input[1:]])
    taken = taken_names(model)
    rewritten: dict[int, Emitter] = {}
    for node in nodes:
        if node.input[1] not in weights or (len(node.input) > 2 and node.input[2] and node.input[2] not in weights):
            continue
        w = weights[node.input[1]]
        attrs = _attrs(node, dims.get(node.input[0]), w)
        if attrs is None:
            continue
        bias = weights[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        strides, pads, output_padding, dilations, group = attrs
        h, wd = dims[node.input[0]][2:]
        e = Emitter(node, taken)
        if (list(w.shape[2:]) == strides and not any(pads) and not any(output_padding) and dilations == [1, 1]
                and group == 1):
            _pixel_shuffle(e, node, node.input[0], w, bias, h, wd)
        else:
            _zero_inserted(e, node, node.input[0], w, bias, h, wd, strides, pads, output_padding, dilations, group)
        rewritten[id(node)] = e
    if not rewritten:
        return model, 0
    return replaced(model, rewritten), len(rewritten)
