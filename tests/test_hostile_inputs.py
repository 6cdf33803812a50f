"""Hostile and unusual input: broken files fail in one line with exit code 2 and write nothing; unusual but valid
models prune what is safe and pin the rest with a reason (complements test_cli.py and test_unusual_inputs.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spc
from spc.report import channel_groups
from tests.helpers import (
    GraphBuilder,
    check_oracle,
    conv_bn_relu,
    quantized_activation,
    quantized_weight,
)
from tests.test_cli import expect_error, run_cli, small_cnn


def reasons(analysis) -> list[str]:
    return [g.pin_reason or "" for g in channel_groups(analysis)]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


# --- broken files ---------------------------------------------------------------------------------------------

def _hostile_file(kind: str, tmp_path):
    path = tmp_path / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "tensor_not_model":
        path.write_bytes(numpy_helper.from_array(np.ones((4, 4), np.float32), "t").SerializeToString())
    elif kind == "directory":
        path.mkdir()
    elif kind == "no_default_opset":
        model = small_cnn()
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("com.example", 1))
        path.write_bytes(model.SerializeToString())
    elif kind == "truncated_external_data":
        onnx.save(small_cnn(), path, save_as_external_data=True, location="w.data", size_threshold=0)
        data = tmp_path / "w.data"
        data.write_bytes(data.read_bytes()[:100])
    elif kind == "external_data_outside":
        onnx.save(small_cnn(), path, save_as_external_data=True, location="w.data", size_threshold=0)
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../../../nowhere/w.data"
        path.write_bytes(model.SerializeToString())
    return path


FRAGMENTS = {  # what the one line must say besides the file's name
    "empty": ["not an ONNX model"], "random_bytes": ["not a readable ONNX model"],
    "tensor_not_model": ["not a readable ONNX model"], "directory": ["not a file"],
    "no_default_opset": ["no ai.onnx opset"], "truncated_external_data": ["w.data", "truncated"],
    "external_data_outside": ["w.data", "outside the model's folder"],
}


@pytest.mark.parametrize("kind", ["empty", "random_bytes", "tensor_not_model", "directory", "no_default_opset",
                                  "truncated_external_data", "external_data_outside"])
def test_broken_files_fail_in_one_line(kind, tmp_path, capsys):
    path = _hostile_file(kind, tmp_path)
    out = tmp_path / "never.onnx"
    line = expect_error(["prune", path, "--ratio", "0.3", "-o", out], capsys, kind, *FRAGMENTS[kind])
    assert "Traceback" not in line
    expect_error(["analyze", path], capsys, kind)
    assert not out.exists()


def _all_pinned_model() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    a = b.op("Conv", [x, b.w(8, 3, 3, 3)], pads=[1] * 4)
    odd = b.op("Mystery", [a], domain="com.example")
    y = b.op("Conv", [odd, b.w(2, 8, 1, 1)])
    return b.model(y, shapes={y: ["N", 2, 8, 8]})


def test_prune_refuses_when_an_unknown_op_pins_every_group(tmp_path, capsys):
    path = tmp_path / "custom.onnx"
    onnx.save(_all_pinned_model(), path)
    out = tmp_path / "never.onnx"
    expect_error(["prune", path, "--ratio", "0.5", "-o", out], capsys, "nothing to prune", "com.example::Mystery")
    assert not out.exists()
    code, text, _ = run_cli(["analyze", path], capsys)
    assert code == 0 and "com.example::Mystery" in text and "not understood" in text
    with pytest.raises(spc.SpcError, match="nothing to prune"):
        spc.prune(_all_pinned_model(), ratio=0.5)
    assert spc.prune(_all_pinned_model(), ratio=0.0, check=False).plan.removed.sum() == 0  # ratio 0 is no request


# --- control flow -------------------------------------------------------------------------------------------------

def test_scan_and_if_pin_outer_scope_tensors_and_the_rest_prunes():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    captured = conv_bn_relu(b, x, 3, 6)  # read by the If's branches from the outer scope
    free = conv_bn_relu(b, x, 3, 6)

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, [captured], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    iffed = b.op("If", [b.const(np.array(True))], then_branch=branch("then", "Relu"),
                 else_branch=branch("else", "Sigmoid"))
    scale = b.w(6)  # a weight that the Scan body reads from the outer scope
    body = helper.make_graph(
        [helper.make_node("Mul", ["s_in", "row"], ["s_mul"]), helper.make_node("Mul", ["s_mul", scale], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [6]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [6]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [6])])
    rows = b.op("Relu", [b.op("MatMul", [b.input("seq", [5, 4]), b.w(4, 6)])])
    final, scanned = b.op("Scan", [b.const(np.ones(6, np.float32)), rows], outputs=2, body=body,
                          num_scan_inputs=1)
    y = b.op("Conv", [free, b.w(2, 6, 1, 1)])
    model = b.model(y, iffed, final, scanned, shapes={iffed: ["N", 6, 8, 8], final: [6], scanned: [5, 6]})
    analysis = check_oracle(model)
    text = reasons(analysis)
    assert any("If" in r and repr(captured) in r and "subgraphs" in r for r in text), text
    assert any("Scan" in r and repr(scale) in r for r in text), text
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [6]  # `free`'s channels only


# --- quantised graphs ------------------------------------------------------------------------------------------

def test_qdq_per_channel_weights_prune_int_weight_scale_and_zero_point_together():
    b = GraphBuilder(opset=13)
    x = quantized_activation(b, b.input("x", ["N", 3, 8, 8]))
    w1 = quantized_weight(b, (8, 3, 3, 3))
    bias = b.op("DequantizeLinear", [b.const(b.rng.integers(-50, 50, 8).astype(np.int32)),
                                     b.const(np.full(8, 0.01, np.float32))], axis=0)
    h = quantized_activation(b, b.op("Sigmoid", [b.op("Conv", [x, w1, bias], pads=[1] * 4)]))  # a removed channel reads 0.5
    w2 = quantized_weight(b, (4, 8, 1, 1))  # per channel of its output: its input slices are masked at the zero point
    y = b.op("Conv", [h, w2])
    model = b.model(y)
    analysis = check_oracle(model)
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [8]
    result = spc.prune(model, ratio=0.5, round_to=1, criterion="l1")
    kept = initializer(result.model, next(n.input[0] for n in result.model.graph.node
                                          if n.op_type == "DequantizeLinear" and n.output[0] == w1))
    assert kept.dtype == np.int8 and kept.shape[0] < 8
    dq1 = next(n for n in result.model.graph.node if n.output[0] == w1)
    assert [initializer(result.model, name).shape[0] for name in dq1.input] == [kept.shape[0]] * 3
    dq2 = next(n for n in result.model.graph.node if n.output[0] == w2)
    assert initializer(result.model, dq2.input[0]).shape == (4, kept.shape[0], 1, 1)


def test_per_channel_activation_qdq_slices_scale_and_zero_point():
    b = GraphBuilder(opset=13)
    a = conv_bn_relu(b, b.input("x", ["N", 3, 8, 8]), 3, 8)
    scale, zero = b.const(np.linspace(0.01, 0.05, 8).astype(np.float32)), b.const(np.arange(8).astype(np.int8))
    qdq = b.op("DequantizeLinear", [b.op("QuantizeLinear", [a, scale, zero], axis=1), scale, zero], axis=1)
    analysis = check_oracle(b.model(b.op("Conv", [qdq, b.w(2, 8, 1, 1)])))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [8]


def test_integer_arithmetic_is_pinned_with_a_reason():
    b = GraphBuilder(opset=13)
    x = b.input("x", ["N", 3, 8, 8])
    a = conv_bn_relu(b, x, 3, 8)
    qa = b.op("QuantizeLinear", [a, b.const(np.float32(0.05)), b.const(np.uint8(128))])
    qw = b.const(b.rng.integers(0, 255, (8, 8, 1, 1)).astype(np.uint8))
    scales = [b.const(np.float32(0.05)), b.const(np.uint8(128)), b.const(np.float32(0.01)), b.const(np.uint8(128)),
              b.const(np.float32(0.05)), b.const(np.uint8(128))]
    qc = b.op("QLinearConv", [qa, scales[0], scales[1], qw, scales[2], scales[3], scales[4], scales[5]])
    side = b.op("Relu", [b.op("Conv", [conv_bn_relu(b, x, 3, 6), b.w(6, 6, 1, 1)])])
    y = b.op("Conv", [side, b.w(2, 6, 1, 1)])
    model = b.model(y, b.op("DequantizeLinear", [qc, scales[4], scales[5]]))
    analysis = check_oracle(model)
    assert any("QLinearConv" in r and "integer" in r for r in reasons(analysis)), reasons(analysis)
    assert sorted(g.size for g in analysis.prunable_groups if g.size > 1) == [6, 6]


# --- dtypes, sharing, weights as inputs -------------------------------------------------------------------

def test_bf16_weights_prune_and_stay_bf16():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    bf16 = helper.make_tensor("wbf", TensorProto.BFLOAT16, (8, 3, 3, 3),
                              b.rng.standard_normal(8 * 27).astype(np.float32).tolist())
    b.inits.append(bf16)
    w = b.op("Cast", ["wbf"], to=TensorProto.FLOAT)
    y = b.op("Conv", [b.op("Relu", [b.op("Conv", [x, w], pads=[1] * 4)]), b.w(2, 8, 1, 1)])
    model = b.model(y)
    check_oracle(model)
    result = spc.prune(model, ratio=0.5, round_to=1, criterion="l2")
    pruned = next(i for i in result.model.graph.initializer if i.name == "wbf")
    assert pruned.data_type == TensorProto.BFLOAT16 and pruned.dims[0] < 8


def test_conv_weight_shared_by_two_layers_prunes_once_for_both():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    stem = conv_bn_relu(b, x, 3, 8)
    shared, bias = b.w(8, 8, 3, 3), b.w(8)
    first = b.op("Relu", [b.op("Conv", [stem, shared, bias], pads=[1] * 4)])
    second = b.op("Relu", [b.op("Conv", [first, shared, bias], pads=[1] * 4)])  # the same layer applied twice
    y = b.op("Conv", [second, b.w(2, 8, 1, 1)])
    model = b.model(y)
    analysis = check_oracle(model)
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [8]  # in and out of `shared` are tied
    result = spc.prune(model, ratio=0.4, round_to=1)  # obspa must not compensate a weight used twice
    assert initializer(result.model, shared).shape[0] == initializer(result.model, shared).shape[1] < 8


def test_weights_fed_as_graph_inputs_are_pinned_and_the_rest_prunes():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    w = b.input("w", [8, 3, 3, 3])
    a = b.op("Relu", [b.op("Conv", [x, w], pads=[1] * 4)])
    y = b.op("Conv", [conv_bn_relu(b, a, 8, 6), b.w(2, 6, 1, 1)])
    model = b.model(y)
    analysis = check_oracle(model)
    assert any("network input 'w'" in r for r in reasons(analysis))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [6]
    result = spc.prune(model, ratio=0.3, round_to=1)
    assert [value.name for value in result.model.graph.input] == ["x", "w"]


# --- com.microsoft ----------------------------------------------------------------------------------------

def test_msft_attention_prunes_heads_and_skip_layernorm_pins_hidden():
    b = GraphBuilder()
    x = b.input("x", [2, 5, 16])
    h = b.op("MatMul", [x, b.w(16, 16)])
    att = b.op("Attention", [h, b.w(16, 48), b.w(48)], domain="com.microsoft", num_heads=4)
    normed = b.op("SkipLayerNormalization", [b.op("MatMul", [att, b.w(16, 16)]), h, b.w(16, positive=True), b.w(16)],
                  domain="com.microsoft")
    y = b.op("MatMul", [b.op("FastGelu", [normed], domain="com.microsoft"), b.w(16, 3)])
    model = b.model(y)
    analysis = check_oracle(model)
    heads = [g for g in analysis.prunable_groups if g.size == 4]
    assert heads and heads[0].width == 12  # q, k and v columns of one head in the packed weight
    assert any("SkipLayerNormalization" in (g.inexact_reason or g.pin_reason or "") for g in analysis.groups)
    result = spc.prune(model, ratio=0.3, round_to=1, criterion="l2")
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert helper.get_attribute_value(node.attribute[0]) < 4


def test_msft_fused_conv_with_residual_input_prunes():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    a = conv_bn_relu(b, x, 3, 8)
    fused = b.op("FusedConv", [a, b.w(8, 8, 3, 3), b.w(8), a], domain="com.microsoft", activation="Relu",
                 pads=[1] * 4)
    y = b.op("Conv", [fused, b.w(2, 8, 1, 1)])
    analysis = check_oracle(b.model(y))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [8]


# --- shapes ---------------------------------------------------------------------------------------------------

def test_outputs_read_inside_the_graph_and_a_zero_size_split():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    z = b.input("z", ["N", 6])
    a = conv_bn_relu(b, x, 3, 6)
    mid = b.op("Relu", [b.op("Conv", [a, b.w(6, 6, 1, 1)])])  # a network output that a later layer also reads
    whole, empty = b.op("Split", [a, b.ints(6, 0)], outputs=2, axis=1)
    y = b.op("Conv", [b.op("Concat", [whole, empty], axis=1), b.w(4, 6, 1, 1)])
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [mid])])
    y2 = b.op("Add", [b.op("MatMul", [pooled, b.w(6, 6)]), z])
    analysis = check_oracle(b.model(y, mid, y2))
    assert [g.size for g in analysis.prunable_groups if g.size > 1] == [6]


def test_conv_weight_computed_at_run_time_prunes_with_obspa():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    a = conv_bn_relu(b, x, 3, 8)
    normed = b.op("Mul", [b.w(6, 8, 3, 3), b.w(6, 1, 1, 1, positive=True)])  # weight norm: v * g
    y = b.op("Conv", [b.op("Relu", [b.op("Conv", [a, normed], pads=[1] * 4)]), b.w(2, 6, 1, 1)])
    model = b.model(y)
    check_oracle(model, min_groups=2)
    result = spc.prune(model, ratio=0.4, round_to=1)  # OBSPA compensates only constant weights
    assert result.summary()["reduction"]["macs"] >= 0.4


def test_non_tensor_outputs_do_not_break_shape_probing():
    """skl2onnx's default classifier output is a ZipMap (a sequence of maps): shapes come from the tensors only."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=30, random_state=0).fit(x[:300], y[:300])
    model = to_onnx(clf, x[:1])  # zipmap on: outputs 'output_label' and a sequence of maps
    assert any(node.op_type == "ZipMap" for node in model.graph.node)
    result = spc.prune(spc.io.from_proto(model), ratio=0.3, criterion="l1", round_to=1)
    assert result.plan.kept and "passed" in result.validation
