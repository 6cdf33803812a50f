"""Unusual but valid models: handled, or pinned with a stated reason; never a crash."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spc
from spc.io import from_proto
from spc.report import channel_groups
from tests.helpers import GraphBuilder, check_oracle, conv_bn_relu


def test_fp16_weights_prune_and_stay_fp16():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8], TensorProto.FLOAT16)
    w1 = b.const((b.rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float16))
    w2 = b.const((b.rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float16))
    y = b.op("Conv", [b.op("Relu", [b.op("Conv", [x, w1], pads=[1] * 4)]), w2])
    model = b.model(y)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    result = spc.prune(model, ratio=0.5, round_to=1)
    weights = {i.name: i for i in result.model.graph.initializer}
    assert weights[w1].data_type == TensorProto.FLOAT16 and weights[w1].dims[0] < 8


def test_qdq_per_tensor_weight_prunes():
    b = GraphBuilder(opset=13)
    image = b.input("x", ["N", 3, 8, 8])
    q = b.const(np.random.default_rng(0).integers(-8, 8, (8, 3, 3, 3)).astype(np.int8))
    w = b.op("DequantizeLinear", [q, b.const(np.float32(0.05)), b.const(np.int8(0))])
    a = b.op("Relu", [b.op("Conv", [image, w], pads=[1] * 4)])
    y = b.op("Conv", [conv_bn_relu(b, a, 8, 8), b.w(2, 8, 1, 1)])
    analysis = check_oracle(b.model(y))  # masking sets the int8 weight's removed rows to its zero point
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [8, 8]  # the DQ conv's and the float one's


def test_microsoft_domain_fused_conv_prunes():
    b = GraphBuilder()
    b.extra_opsets["com.microsoft"] = 1
    x = b.input("x", ["N", 3, 8, 8])
    fused = b.op("FusedConv", [x, b.w(8, 3, 3, 3), b.w(8)], domain="com.microsoft", activation="Relu",
                 pads=[1] * 4)
    y = b.op("Conv", [conv_bn_relu(b, fused, 8, 8), b.w(2, 8, 1, 1)])
    model = b.model(y)
    analysis = check_oracle(model)
    assert sorted(g.size for g in analysis.prunable_groups if g.size > 1) == [8, 8]  # FusedConv's and the BN conv's


def test_custom_op_stated_output_shape_reaches_the_layers_after_it():
    """No inference computes a custom op's output shape; the shape the model states is used, so the layers after
    it have shapes and MACs (they counted 0 when every stated shape was dropped as possibly stale)."""
    from spc import cost
    from spc.graph import Graph

    b = GraphBuilder()
    x = b.input("x", ["N", 16, 32])
    odd = b.op("Mystery", [b.op("MatMul", [x, b.w(32, 64)])], domain="com.example")
    h = b.op("MatMul", [odd, b.w(64, 64)])
    y = b.op("MatMul", [b.op("Relu", [h]), b.w(64, 8)])
    model = b.model(y, shapes={y: ["N", 16, 8]})
    model.graph.value_info.append(helper.make_tensor_value_info(odd, TensorProto.FLOAT, ["N", 16, 64]))
    graph = Graph(model)
    assert graph.shape(odd) == graph.shape(h) == ("N", 16, 64)
    assert cost.count(graph, {"N": 1}).macs == 16 * (32 * 64 + 64 * 64 + 64 * 8)


def test_several_inputs_and_outputs():
    b = GraphBuilder()
    x1 = b.input("x", ["N", 3, 8, 8])
    x2 = b.input("z", ["N", 3, 8, 8])
    a = conv_bn_relu(b, x1, 3, 8)
    c = conv_bn_relu(b, x2, 3, 8)
    y1 = b.op("Conv", [b.op("Add", [a, c]), b.w(2, 8, 1, 1)])
    y2 = b.op("GlobalAveragePool", [b.op("Conv", [c, b.w(5, 8, 1, 1)])])
    check_oracle(b.model(y1, y2))


def test_zero_size_concat_input():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    a = conv_bn_relu(b, x, 3, 8)
    empty = b.op("Slice", [a, b.ints(0), b.ints(0), b.ints(1)])  # zero channels
    y = b.op("Conv", [b.op("Concat", [a, empty], axis=1), b.w(2, 8, 1, 1)])
    check_oracle(b.model(y))


def test_loop_with_captured_weight_pins_it():
    b = GraphBuilder()
    x = b.input("x", ["N", 8])
    w = b.w(8, 8)
    h = b.op("Relu", [b.op("MatMul", [x, b.w(8, 8)])])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["state_in", w], ["state_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["N", 8])])
    looped = b.op("Loop", [b.const(np.int64(2)), b.const(np.array(True)), h], body=body)
    y = b.op("MatMul", [looped, b.w(8, 3)])
    analysis = spc.analyze(from_proto(b.model(y, shapes={y: ["N", 3]})))
    assert not [g for g in analysis.prunable_groups if any(k[0] == w for k in g.dims)]
    loop_pins = [g for g in channel_groups(analysis) if g.pin_reason and "Loop" in g.pin_reason]
    assert loop_pins
    with pytest.raises(spc.SpcError, match="nothing to prune.*Loop"):  # every channel touches the Loop
        spc.prune(b.model(y, shapes={y: ["N", 3]}), ratio=0.2, round_to=1)
    result = spc.prune(b.model(y, shapes={y: ["N", 3]}), ratio=0.0, round_to=1)
    assert result.validation.startswith("checker")
    assert numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == w)).shape == (8, 8)
    onnx.checker.check_model(result.model)
