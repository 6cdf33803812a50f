"""Each coupling pattern on a small hand-built graph, checked with the mask-equivalence oracle."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

import spc
from spc.io import from_proto
from tests.helpers import GraphBuilder, check_oracle, conv_bn_relu


def image(b, channels=3, size=8):
    return b.input("x", ["N", channels, size, size])


def test_residual_add_couples_both_branches():
    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 8)
    c = b.op("Conv", [a, b.w(8, 8, 3, 3)], pads=[1] * 4)
    y = b.op("Relu", [b.op("Add", [c, a])])
    y = b.op("Conv", [y, b.w(4, 8, 1, 1)])
    analysis = check_oracle(b.model(y))
    assert len(analysis.prunable_groups) == 1
    assert analysis.prunable_groups[0].size == 8


def test_grouped_and_depthwise_convs_prune_whole_groups():
    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 8)
    d = b.op("Conv", [a, b.w(16, 1, 3, 3), b.w(16)], pads=[1] * 4, group=8)  # depthwise, multiplier 2
    p = b.op("Relu", [b.op("Conv", [d, b.w(8, 16, 1, 1)])])
    g = b.op("Conv", [p, b.w(8, 2, 3, 3)], pads=[1] * 4, group=4)  # 4 groups of 2 in, 2 out
    y = b.op("Conv", [b.op("Relu", [g]), b.w(4, 8, 1, 1)])
    analysis = check_oracle(b.model(y))
    units = sorted((group.size, group.width) for group in analysis.prunable_groups)
    assert (8, 1) in units  # a channel of `a` takes its 2 depthwise outputs with it
    assert (4, 2) in units  # the grouped conv loses whole groups (2 channels each, in and out)


def test_conv_transpose():
    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 8)
    t = b.op("ConvTranspose", [a, b.w(8, 6, 2, 2), b.w(6)], strides=[2, 2])
    y = b.op("Conv", [b.op("Relu", [t]), b.w(2, 6, 1, 1)])
    check_oracle(b.model(y), min_groups=2)


def test_flatten_into_gemm_expands_channel_blocks():
    b = GraphBuilder()
    x = image(b, size=4)
    a = conv_bn_relu(b, x, 3, 6)
    p = b.op("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2])
    f = b.op("Flatten", [p], axis=1)
    h = b.op("Relu", [b.op("Gemm", [f, b.w(10, 24), b.w(10)], transB=1)])
    y = b.op("Gemm", [h, b.w(24 // 2 - 2, 10)], transB=1)
    analysis = check_oracle(b.model(y), min_groups=2)
    conv_group = next(g for g in analysis.prunable_groups if g.size == 6)
    assert conv_group.size == 6


def test_concat_and_split_keep_offsets():
    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    c = conv_bn_relu(b, x, 3, 4)
    cat = b.op("Concat", [a, c], axis=1)
    s1, s2 = b.op("Split", [cat, b.ints(5, 5)], outputs=2, axis=1)
    y = b.op("Add", [b.op("Conv", [s1, b.w(3, 5, 1, 1)]), b.op("Conv", [s2, b.w(3, 5, 1, 1)])])
    analysis = check_oracle(b.model(y), min_groups=2)
    # `a` splits into a 5-channel range (first output) and its last channel, which goes with `c`'s range
    assert sorted(g.size for g in analysis.prunable_groups) == [1, 4, 5]


def test_split_opset11_attribute_and_slice_bounds():
    b = GraphBuilder(opset=11)
    x = image(b)
    a = conv_bn_relu(b, x, 3, 8)
    s1, s2 = b.op("Split", [a], outputs=2, axis=1, split=[3, 5])
    sl = b.op("Slice", [s2, b.ints(1), b.ints(4), b.ints(1)])
    y = b.op("Concat", [b.op("Conv", [s1, b.w(2, 3, 1, 1)]), b.op("Conv", [sl, b.w(2, 3, 1, 1)])], axis=1)
    check_oracle(b.model(y), min_groups=2)


def test_norms_batch_instance_group():
    b = GraphBuilder(opset=18)
    x = image(b)
    a = b.op("Conv", [x, b.w(8, 3, 3, 3)], pads=[1] * 4)
    a = b.op("InstanceNormalization", [a, b.w(8), b.w(8)])
    a = b.op("Conv", [b.op("Relu", [a]), b.w(8, 8, 1, 1)])
    a = b.op("GroupNormalization", [a, b.w(4), b.w(4)], num_groups=4)
    y = b.op("Conv", [b.op("Relu", [a]), b.w(2, 8, 1, 1)])
    analysis = check_oracle(b.model(y), min_groups=2)
    assert any(g.size == 4 and g.width == 2 for g in analysis.prunable_groups)  # GroupNorm: whole groups


def test_group_norm_opset21_per_channel_scale():
    b = GraphBuilder(opset=21)
    x = image(b)
    a = b.op("Conv", [x, b.w(8, 3, 3, 3)], pads=[1] * 4)
    a = b.op("GroupNormalization", [a, b.w(8), b.w(8)], num_groups=2)
    y = b.op("Conv", [b.op("Sigmoid", [a]), b.w(2, 8, 1, 1)])
    check_oracle(b.model(y))


def test_elementwise_constants_broadcast_per_channel():
    b = GraphBuilder()
    x = image(b)
    a = b.op("Conv", [x, b.w(6, 3, 3, 3)], pads=[1] * 4)
    a = b.op("Add", [a, b.w(6, 1, 1)])
    a = b.op("Mul", [a, b.w(1, 6, 1, 1)])
    a = b.op("Div", [a, b.w(6, 1, 1, positive=True)])
    a = b.op("Sub", [a, b.w(1)])
    a = b.op("PRelu", [a, b.w(6, 1, 1)])
    a = b.op("Max", [a, b.w(6, 1, 1)])
    a = b.op("Min", [a, b.w(6, 1, 1, positive=True)])
    a = b.op("Pow", [b.op("Abs", [a]), b.w(6, 1, 1, positive=True)])
    cond = b.op("Greater", [a, b.w(6, 1, 1)])
    a = b.op("Where", [cond, a, b.w(6, 1, 1)])
    for act in ("Sigmoid", "Tanh", "HardSwish", "Elu", "Softplus", "Identity"):
        a = b.op(act, [a])
    a = b.op("Clip", [a, b.const(np.float32(-3)), b.const(np.float32(3))])
    a = b.op("Cast", [b.op("Dropout", [a])], to=TensorProto.FLOAT)
    y = b.op("Conv", [a, b.w(2, 6, 1, 1)])
    check_oracle(b.model(y))


def test_pooling_resize_pad_keep_channels():
    b = GraphBuilder(opset=13)
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    a = b.op("AveragePool", [a], kernel_shape=[2, 2], strides=[2, 2])
    a = b.op("Resize", [a, "", b.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    a = b.op("Pad", [a, b.ints(0, 0, 1, 1, 0, 0, 1, 1)])
    a = b.op("GlobalAveragePool", [a])
    y = b.op("Conv", [a, b.w(3, 6, 1, 1)])
    check_oracle(b.model(y))


def test_pad_amounts_computed_from_constants_keep_channels():
    """PyTorch's F.pad export: the amounts come out of Constant -> ConstantOfShape -> Concat -> Reshape -> Slice ->
    Transpose -> Reshape -> Cast on constants only (EfficientNet-Lite0's "same" padding). spc evaluates them, so
    the padded channels stay prunable (they were pinned: "pads are computed at run time")."""
    b = GraphBuilder(opset=13)
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    zeros = b.op("ConstantOfShape", [b.ints(4)], value=numpy_helper.from_array(np.array([0], dtype=np.int64)))
    amounts = b.op("Concat", [b.ints(0, 1, 1, 2), zeros], axis=0)  # F.pad's (left, right, top, bottom) + zeros
    pairs = b.op("Reshape", [amounts, b.ints(-1, 2)])
    pairs = b.op("Slice", [pairs, b.ints(-1), b.ints(-9223372036854775807), b.ints(0), b.ints(-1)])
    pads = b.op("Cast", [b.op("Reshape", [b.op("Transpose", [pairs], perm=[1, 0]), b.ints(-1)])], to=TensorProto.INT64)
    a = b.op("Pad", [a, pads])
    d = b.op("Conv", [a, b.w(6, 1, 3, 3)], group=6)
    y = b.op("Conv", [d, b.w(3, 6, 1, 1)])
    analysis = check_oracle(b.model(y))
    assert analysis.prunable_groups and analysis.prunable_groups[0].size == 6
    assert not any("computed at run time" in str(reason) for reason in analysis.pin_reasons.tolist())


def test_resize_with_sizes_is_rewritten():
    b = GraphBuilder(opset=13)
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    a = b.op("Resize", [a, "", "", b.ints(1, 6, 16, 16)], mode="nearest")
    y = b.op("Conv", [a, b.w(3, 6, 1, 1)])
    check_oracle(b.model(y))


def test_reductions_over_other_axes_keep_channels():
    b = GraphBuilder(opset=18)
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    m = b.op("ReduceMean", [a, b.ints(2, 3)], keepdims=0)  # [N, 6]
    s = b.op("Softmax", [b.op("Reshape", [a, b.ints(0, 6, -1)])], axis=-1)  # over pixels
    s = b.op("ReduceMax", [s, b.ints(2)], keepdims=0)
    am = b.op("Cast", [b.op("ArgMax", [a], axis=2, keepdims=0)], to=TensorProto.FLOAT)
    am = b.op("ReduceSum", [am, b.ints(2)], keepdims=0)
    y = b.op("Gemm", [b.op("Add", [b.op("Add", [m, s]), am]), b.w(3, 6)], transB=1)
    check_oracle(b.model(y))


def test_softmax_over_channels_is_pinned_softly():
    b = GraphBuilder()
    x = image(b)
    a = b.op("Conv", [x, b.w(6, 3, 3, 3)], pads=[1] * 4)
    y = b.op("Conv", [b.op("Softmax", [a], axis=1), b.w(2, 6, 1, 1)])
    analysis = spc.analyze(from_proto(b.model(y)))
    assert not [g for g in analysis.prunable_groups if g.size > 1]
    assert any("Softmax" in (g.pin_reason or "") for g in analysis.groups)
    inexact = spc.analyze(from_proto(b.model(y)), allow_inexact=True)
    assert any(g.inexact_reason for g in inexact.prunable_groups)


def test_matmul_weights_on_either_side_and_batched():
    b = GraphBuilder()
    x = b.input("x", ["N", 5, 8])
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.w(8, 12)]), b.w(12)])])  # x @ W
    t = b.op("MatMul", [b.w(7, 5), h])  # W @ x (left weight) -> [N, 7, 12]
    t = b.op("Relu", [t])
    bw = b.op("MatMul", [t, b.w(12, 6)])
    y = b.op("MatMul", [b.op("Transpose", [bw], perm=[0, 2, 1]), b.w(7, 4)])  # [N, 6, 4]
    analysis = check_oracle(b.model(y), min_groups=2)
    assert sorted(g.size for g in analysis.prunable_groups) == [7, 12]  # the 6-wide axis reaches the output


def test_einsum_as_matmul():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 8])
    h = b.op("Relu", [b.op("Einsum", [x, b.w(8, 10)], equation="bsi,io->bso")])
    y = b.op("Einsum", [h, b.w(10, 3)], equation="bsi,io->bso")
    check_oracle(b.model(y))


def test_layernorm_axis_is_soft_pinned_and_inner_mlp_prunable():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 8])
    h = b.op("LayerNormalization", [b.op("MatMul", [x, b.w(8, 8)]), b.w(8), b.w(8)], axis=-1)
    inner = b.op("Gelu", [b.op("MatMul", [h, b.w(8, 16)])], domain="") if False else b.op(
        "Relu", [b.op("MatMul", [h, b.w(8, 16)])])
    y = b.op("Add", [b.op("MatMul", [inner, b.w(16, 8)]), h])
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [16]
    assert any("LayerNormalization" in (g.pin_reason or "") for g in analysis.groups)


def test_rms_norm_pattern_pins_the_hidden_axis():
    b = GraphBuilder(opset=18)
    x = b.input("x", ["N", 4, 8])
    h = b.op("MatMul", [x, b.w(8, 8)])
    var = b.op("ReduceMean", [b.op("Pow", [h, b.const(np.float32(2))]), b.ints(-1)], keepdims=1)
    norm = b.op("Div", [h, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-6))])])])
    norm = b.op("Mul", [norm, b.w(8)])
    up = b.op("Relu", [b.op("MatMul", [norm, b.w(8, 12)])])
    y = b.op("MatMul", [up, b.w(12, 8)])
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [12]


def test_gather_embedding_and_tied_lm_head():
    b = GraphBuilder()
    ids = b.input("ids", ["N", 5], TensorProto.INT64)
    table = b.w(20, 8)
    e = b.op("Gather", [table, ids], axis=0)
    h = b.op("Relu", [b.op("MatMul", [e, b.w(8, 8)])])
    logits = b.op("MatMul", [h, b.op("Transpose", [table], perm=[1, 0])])  # weight tying
    analysis = check_oracle(b.model(logits))
    tied = [g for g in analysis.prunable_groups if any(k[0] == table for k in g.dims)]
    assert tied and all((table, 1) in g.dims for g in tied)


def attention_block(b, x, hidden=16, heads=4, kv_heads=4, dynamic_shapes=False):
    head_dim = hidden // heads
    q = b.op("MatMul", [x, b.w(hidden, heads * head_dim)])
    k = b.op("MatMul", [x, b.w(hidden, kv_heads * head_dim)])
    v = b.op("MatMul", [x, b.w(hidden, kv_heads * head_dim)])

    def split_heads(t, count):
        if dynamic_shapes:
            shape = b.op("Shape", [x])
            batch = b.op("Unsqueeze", [b.op("Gather", [shape, b.const(np.int64(0))], axis=0), b.ints(0)])
            seq = b.op("Unsqueeze", [b.op("Gather", [shape, b.const(np.int64(1))], axis=0), b.ints(0)])
            target = b.op("Concat", [batch, seq, b.ints(count), b.ints(head_dim)], axis=0)
        else:
            target = b.ints(0, 0, count, head_dim)
        return b.op("Transpose", [b.op("Reshape", [t, target])], perm=[0, 2, 1, 3])

    q, k, v = split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)
    if kv_heads != heads:
        rep = heads // kv_heads

        def repeat(t):
            t = b.op("Unsqueeze", [t, b.ints(2)])
            t = b.op("Expand", [t, b.ints(1, kv_heads, rep, 1, head_dim)])
            return b.op("Reshape", [t, b.ints(0, heads, -1, head_dim)])

        k, v = repeat(k), repeat(v)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = b.op("Softmax", [b.op("Mul", [scores, b.const(np.float32(head_dim ** -0.5))])], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.ints(0, 0, heads * head_dim)])
    return b.op("MatMul", [ctx, b.w(heads * head_dim, hidden)])


@pytest.mark.parametrize("dynamic", [False, True])
def test_attention_heads_are_whole_units(dynamic):
    b = GraphBuilder()
    x = b.input("x", ["N", "S", 16])
    y = attention_block(b, x, dynamic_shapes=dynamic)
    analysis = check_oracle(b.model(y), dim_values={"N": 2, "S": 3})
    heads = [g for g in analysis.prunable_groups if g.width == 4]
    assert heads and heads[0].size == 4  # 4 heads of 4 channels, Q/K/V/O together


def test_grouped_query_attention_keeps_kv_heads_consistent():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 16])
    y = attention_block(b, x, heads=4, kv_heads=2)
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [2]  # a kv head takes its 2 query heads


def test_onnx_attention_op_3d_updates_head_counts():
    b = GraphBuilder(opset=23)
    x = b.input("x", [1, 3, 16])
    q = b.op("MatMul", [x, b.w(16, 16)])
    k = b.op("MatMul", [x, b.w(16, 8)])
    v = b.op("MatMul", [x, b.w(16, 8)])
    o = b.op("Attention", [q, k, v], q_num_heads=4, kv_num_heads=2)
    y = b.op("MatMul", [o, b.w(16, 16)])
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [2]


def test_transpose_nhwc_around_convs():
    b = GraphBuilder()
    x = b.input("x", ["N", 8, 8, 3])
    a = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    a = b.op("Relu", [b.op("Conv", [a, b.w(6, 3, 3, 3), b.w(6)], pads=[1] * 4)])
    a = b.op("Transpose", [a], perm=[0, 2, 3, 1])
    a = b.op("Add", [a, b.w(6)])  # NHWC bias
    a = b.op("Transpose", [a], perm=[0, 3, 1, 2])
    y = b.op("Conv", [a, b.w(2, 6, 1, 1)])
    check_oracle(b.model(y))


def test_squeeze_unsqueeze_expand_tile():
    b = GraphBuilder(opset=13)
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    p = b.op("Squeeze", [b.op("GlobalAveragePool", [a]), b.ints(2, 3)])  # [N, 6]
    u = b.op("Unsqueeze", [p, b.ints(2, 3)])  # [N, 6, 1, 1]
    e = b.op("Expand", [u, b.ints(1, 6, 8, 8)])
    t = b.op("Tile", [b.op("Mul", [a, e]), b.ints(1, 1, 1, 2)])
    y = b.op("Conv", [t, b.w(2, 6, 1, 1)])
    check_oracle(b.model(y))


def test_channel_shuffle_couples_matching_branch_channels():
    b = GraphBuilder()
    x = image(b, channels=4)
    left = conv_bn_relu(b, x, 4, 8)
    right = conv_bn_relu(b, x, 4, 8)
    cat = b.op("Concat", [left, right], axis=1)  # 16
    s = b.op("Reshape", [cat, b.ints(1, 2, 8, 8, 8)])
    s = b.op("Transpose", [s], perm=[0, 2, 1, 3, 4])
    s = b.op("Reshape", [s, b.ints(1, 16, 8, 8)])
    y = b.op("Conv", [s, b.w(3, 16, 1, 1)])
    model = b.model(y)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    analysis = check_oracle(model)
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [8]  # channel j of both branches


def test_partial_residual_csp_block():
    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 8)
    first, second = b.op("Split", [a, b.ints(4, 4)], outputs=2, axis=1)
    inner = b.op("Add", [conv_bn_relu(b, second, 4, 4), second])
    cat = b.op("Concat", [first, second, inner], axis=1)
    y = b.op("Conv", [cat, b.w(3, 12, 1, 1)])
    check_oracle(b.model(y), min_groups=2)


def test_depth_to_space_both_modes():
    for mode in ("DCR", "CRD"):
        b = GraphBuilder()
        x = image(b)
        a = conv_bn_relu(b, x, 3, 8)
        d = b.op("DepthToSpace", [a], blocksize=2, mode=mode)  # 2 channels
        y = b.op("Conv", [b.op("Relu", [b.op("Conv", [d, b.w(4, 2, 3, 3)], pads=[1] * 4)]), b.w(2, 4, 1, 1)])
        analysis = check_oracle(b.model(y))
        assert any(g.size == 2 and g.width == 4 for g in analysis.prunable_groups)


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_hidden_size(op, gates):
    b = GraphBuilder()
    x = b.input("x", [5, "N", 6])
    hidden = 8
    outputs = b.op(op, [x, b.w(1, gates * hidden, 6), b.w(1, gates * hidden, hidden), b.w(1, 2 * gates * hidden)],
                   outputs=2, hidden_size=hidden)
    last = b.op("Squeeze", [outputs[1], b.ints(0)])
    y = b.op("Gemm", [last, b.w(3, hidden)], transB=1)
    analysis = check_oracle(b.model(y), dim_values={"N": 2})
    assert any(g.size == hidden for g in analysis.prunable_groups)


def test_shared_weight_two_layers_siamese():
    b = GraphBuilder()
    x1 = b.input("x", ["N", 8])
    x2 = b.input("x2", ["N", 8])
    shared = b.w(8, 12)
    h1 = b.op("Relu", [b.op("MatMul", [x1, shared])])
    h2 = b.op("Relu", [b.op("MatMul", [x2, shared])])
    y = b.op("MatMul", [b.op("Add", [h1, h2]), b.w(12, 2)])
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [12]


def test_unknown_op_pins_with_reason():
    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    odd = b.op("MysteryOp", [a], domain="com.example")
    y = b.op("Conv", [conv_bn_relu(b, x, 3, 6), b.w(2, 6, 1, 1)])
    model = b.model(y, odd, shapes={odd: ["N", 6, 8, 8]})
    analysis = spc.analyze(from_proto(model))
    pinned = [g for g in analysis.groups if g.pin_reason and "MysteryOp" in g.pin_reason]
    assert pinned and "not understood" in pinned[0].pin_reason
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [6]


def test_constant_nodes_and_initializers_listed_as_inputs():
    from onnx import helper, numpy_helper

    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    y = b.op("Conv", [a, b.w(2, 6, 1, 1)])
    model = b.model(y)
    # move the first conv's weight into a Constant node and list another initializer as a graph input
    first = model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], [first.name], value=first))
    del model.graph.initializer[0]
    second = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(second.name, second.data_type, list(second.dims)))
    assert numpy_helper.to_array(second) is not None
    check_oracle(model)


def test_shape_gather_concat_reshape_chain_with_dynamic_batch():
    b = GraphBuilder()
    x = image(b, size=4)
    a = conv_bn_relu(b, x, 3, 6)
    shape = b.op("Shape", [a])
    batch = b.op("Unsqueeze", [b.op("Gather", [shape, b.const(np.int64(0))], axis=0), b.ints(0)])
    flat = b.op("Reshape", [a, b.op("Concat", [batch, b.ints(-1)], axis=0)])
    y = b.op("Gemm", [flat, b.w(3, 96)], transB=1)
    check_oracle(b.model(y), dim_values={"N": 2})


def test_if_subgraph_pins_what_it_captures():
    from onnx import helper

    b = GraphBuilder()
    x = image(b)
    a = conv_bn_relu(b, x, 3, 6)
    keep = conv_bn_relu(b, x, 3, 6)
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Relu", [a], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
    cond = b.const(np.array(True))
    iffed = b.op("If", [cond], then_branch=branch("then"), else_branch=branch("else"))
    y = b.op("Conv", [keep, b.w(2, 6, 1, 1)])
    analysis = spc.analyze(from_proto(b.model(y, iffed)))
    assert any(g.pin_reason and "If" in g.pin_reason for g in analysis.groups)
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [6]


def test_onnx_attention_op_4d_with_grouped_kv_heads():
    b = GraphBuilder(opset=23)
    x = b.input("x", [1, 3, 16])

    def heads(t, count):
        return b.op("Transpose", [b.op("Reshape", [t, b.ints(1, 3, count, 4)])], perm=[0, 2, 1, 3])

    q = heads(b.op("MatMul", [x, b.w(16, 16)]), 4)
    k = heads(b.op("MatMul", [x, b.w(16, 8)]), 2)
    v = heads(b.op("MatMul", [x, b.w(16, 8)]), 2)
    o = b.op("Transpose", [b.op("Attention", [q, k, v])], perm=[0, 2, 1, 3])
    y = b.op("MatMul", [b.op("Reshape", [o, b.ints(1, 3, 16)]), b.w(16, 16)])
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [2]
