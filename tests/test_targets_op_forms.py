"""Ops rewritten into forms spc's kernels run (targets/op_forms.py): 1-D convolutions as 2-D ones over a map of
height 1, instance and group norms as rows for the layer_norm kernel; the rewritten graph computes what the op
computes (ONNX Runtime runs both), and compiled models run them on spc's kernels (they were TVM's scalar loops)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.targets.op_forms import rewrite_op_forms
from spc.targets.testing import ort_run


def _model(node: onnx.NodeProto, x_shape: list, inits: dict, opset: int = 17) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


RNG = np.random.default_rng(5)
CONV1D = [
    dict(pads=[1, 1]), dict(pads=[2, 0], strides=[2], dilations=[2]), dict(group=2, pads=[1, 1]),
    dict(auto_pad="SAME_UPPER", strides=[2]),
]


@pytest.mark.parametrize("attrs", CONV1D, ids=[str(i) for i in range(len(CONV1D))])
def test_conv1d_as_conv2d(attrs):
    group = attrs.get("group", 1)
    inits = {"w": RNG.standard_normal((8, 6 // group, 3)), "b": RNG.standard_normal(8)}
    model = _model(helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3], **attrs), ["n", 6, 17], inits)
    _same(model, {"x": RNG.standard_normal((2, 6, 17)).astype(np.float32)}, "Conv")


def test_conv_transpose1d_as_conv_transpose2d():
    inits = {"w": RNG.standard_normal((6, 4, 4))}
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[4], strides=[2], pads=[1, 1],
                            output_padding=[1])
    _same(_model(node, ["n", 6, 9], inits), {"x": RNG.standard_normal((2, 6, 9)).astype(np.float32)},
          "ConvTranspose")


@pytest.mark.parametrize("shape", [[2, 6, 5, 7], [2, 6, 11]])
def test_instance_norm_as_rows(shape):
    inits = {"s": RNG.standard_normal(6), "b": RNG.standard_normal(6)}
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)
    _same(_model(node, shape, inits), {"x": (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)},
          "InstanceNormalization")


@pytest.mark.parametrize("opset,per", [(21, 6), (18, 3)])
def test_group_norm_as_rows(opset, per):
    inits = {"s": RNG.standard_normal(per), "b": RNG.standard_normal(per)}
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3, epsilon=1e-4)
    model = _model(node, [2, 6, 5, 4], inits, opset=opset)
    x = {"x": (RNG.standard_normal((2, 6, 5, 4)) * 2).astype(np.float32)}
    rewritten, count = rewrite_op_forms(model)
    assert count == 1 and "GroupNormalization" not in [n.op_type for n in rewritten.graph.node]
    # the reference: GroupNorm's definition (ONNX Runtime lacks some of its versions)
    g = x["x"].reshape(2, 3, -1)
    normed = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-4)).reshape(2, 6, 5, 4)
    scale = np.repeat(inits["s"], 6 // per).reshape(6, 1, 1)
    bias = np.repeat(inits["b"], 6 // per).reshape(6, 1, 1)
    np.testing.assert_allclose(ort_run(rewritten, x)["y"], normed * scale + bias, rtol=1e-4, atol=1e-4)


def _same(model, feeds, op):
    rewritten, count = rewrite_op_forms(model)
    assert count == 1
    np.testing.assert_allclose(ort_run(rewritten, feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-4, atol=1e-4)


def test_compiled_conv1d_and_instance_norm_run_spcs_kernels(tmp_path):
    pytest.importorskip("tvm")
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    w = numpy_helper.from_array(RNG.standard_normal((16, 8, 5)).astype(np.float32) * 0.3, "w")
    s = numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "s")
    b = numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 2]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "s", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, s, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    manifest = compile_model(model, "x86", tmp_path)
    assert [(layer["op"], layer["kernel"]) for layer in manifest["layers"]] == [("Conv", "dense")]
    library = (tmp_path / "model.so").read_bytes()
    assert b"spc_layernorm" in library
    x = {"x": RNG.standard_normal((3, 8, 40)).astype(np.float32)}
    np.testing.assert_allclose(load_bundle(tmp_path).run(x)["y"], ort_run(model, x)["y"], rtol=1e-4, atol=1e-4)


POOLS = [dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
         dict(kernel_shape=[2, 2], strides=[2, 2]), dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 0, 1])]


@pytest.mark.parametrize("attrs", POOLS, ids=[str(i) for i in range(len(POOLS))])
def test_average_pool_as_depthwise_conv(attrs):
    model = _model(helper.make_node("AveragePool", ["x"], ["y"], **attrs), ["n", 5, 9, 8], {})
    _same(model, {"x": RNG.standard_normal((2, 5, 9, 8)).astype(np.float32)}, "AveragePool")


RESIZES = [({"scales": [1, 1, 2, 2]}, {}), ({"scales": [1, 1, 2, 3]}, {"coordinate_transformation_mode": "asymmetric",
                                                                        "nearest_mode": "floor"}),
           ({"sizes": [2, 4, 10, 21]}, {})]


@pytest.mark.parametrize("given,attrs", RESIZES, ids=[str(i) for i in range(len(RESIZES))])
def test_nearest_upsampling_as_repeat(given, attrs):
    inits = {k: v for k, v in given.items() if k == "scales"}
    inputs = ["x", "", "scales" if "scales" in given else ""] + (["sizes"] if "sizes" in given else [])
    model = _model(helper.make_node("Resize", inputs, ["y"], mode="nearest", **attrs),
                   [2 if "sizes" in given else "n", 4, 5, 7], inits, opset=18)
    if "sizes" in given:
        model.graph.initializer.append(numpy_helper.from_array(np.array(given["sizes"], np.int64), "sizes"))
    _same(model, {"x": RNG.standard_normal((2, 4, 5, 7)).astype(np.float32)}, "Resize")


def test_linear_resize_and_fractional_scales_stay():
    for mode, scales in (("linear", [1, 1, 2, 2]), ("nearest", [1, 1, 1.5, 1.5])):
        model = _model(helper.make_node("Resize", ["x", "", "s"], ["y"], mode=mode), ["n", 4, 6, 6],
                       {"s": scales}, opset=18)
        assert rewrite_op_forms(model)[1] == 0


def test_compiled_average_pool_and_upsampling_match_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Resize", ["p", "", "s"], ["y"], mode="nearest")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    compile_model(model, "x86", tmp_path)
    assert b"spc_dwconv" in (tmp_path / "model.so").read_bytes()  # the pool on spc's depthwise kernel
    x = {"x": RNG.standard_normal((3, 8, 12, 12)).astype(np.float32)}
    np.testing.assert_allclose(load_bundle(tmp_path).run(x)["y"], ort_run(model, x)["y"], rtol=1e-5, atol=1e-5)


EINSUMS = [("bij,jk->bik", [4, 5, 6], [6, 7], True), ("bhqd,bhkd->bhqk", [2, 3, 5, 4], [2, 3, 6, 4], False),
           ("bhqk,bhkd->bhqd", [2, 3, 5, 6], [2, 3, 6, 4], False), ("ij,jk->ki", [5, 6], [6, 7], True),
           ("bi,bi->b", [4, 6], [4, 6], False), ("ij,kl->kijl", [2, 3], [4, 5], True), ("ij,j->i", [5, 6], [6], True)]


@pytest.mark.parametrize("equation,a,b,constant", EINSUMS, ids=[e[0] for e in EINSUMS])
def test_einsum_as_matmul(equation, a, b, constant):
    """Two-operand einsums that are one batched product become Transpose / Reshape / MatMul (a constant operand
    arranged ahead of time)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, a)]
    inits = []
    if constant:
        inits.append(numpy_helper.from_array(RNG.standard_normal(b).astype(np.float32), "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, b))
    graph = helper.make_graph([helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    feeds = {"x": RNG.standard_normal(a).astype(np.float32)}
    if not constant:
        feeds["w"] = RNG.standard_normal(b).astype(np.float32)
    rewritten, count = rewrite_op_forms(model)
    assert count == 1 and "Einsum" not in [n.op_type for n in rewritten.graph.node]
    np.testing.assert_allclose(ort_run(rewritten, feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,a,b", [("ij,jk->i", [5, 6], [6, 7]), ("bij,bjk", [2, 3, 4], [2, 4, 5]),
                                          ("...ij,jk->...ik", [2, 3, 4], [4, 5]), ("iij,jk->ik", [3, 3, 4], [4, 5])])
def test_einsums_that_are_not_one_product_stay(equation, a, b):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, a), helper.make_tensor_value_info(
        "w", TensorProto.FLOAT, b)]
    graph = helper.make_graph([helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert rewrite_op_forms(model)[1] == 0


def test_compiled_einsums_match_onnxruntime(tmp_path):
    """A constant-weight einsum compiles to spc's dense matmul, an attention-score einsum to its batch matmul."""
    pytest.importorskip("tvm")
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    w = numpy_helper.from_array(RNG.standard_normal((16, 32)).astype(np.float32), "w")
    nodes = [helper.make_node("Einsum", ["x", "w"], ["q"], equation="bsd,de->bse"),
             helper.make_node("Einsum", ["q", "q"], ["y"], equation="bse,bte->bst")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    manifest = compile_model(model, "x86", tmp_path)
    assert [(layer["op"], layer["kernel"]) for layer in manifest["layers"]] == [("MatMul", "dense")]
    x = {"x": RNG.standard_normal((2, 8, 16)).astype(np.float32)}
    np.testing.assert_allclose(load_bundle(tmp_path).run(x)["y"], ort_run(model, x)["y"], rtol=1e-4, atol=1e-4)
