"""2-D ConvTranspose rewritten as a convolution for code generation (targets/conv_transpose.py): the rewritten
graph computes what the node computes (ONNX Runtime runs both) in both forms, and a compiled U-Net-style
upsampling model matches ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.targets.conv_transpose import lower_conv_transpose
from spc.targets.testing import ort_run


def _model(c_in=6, c_out=4, kernel=(2, 2), batch="n", size=(5, 7), bias=True, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    group = attrs.get("group", 1)
    inits = [numpy_helper.from_array(rng.standard_normal((c_in, c_out // group, *kernel)).astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="up", kernel_shape=list(kernel), **attrs)
    graph = helper.make_graph([node, helper.make_node("Relu", ["y"], ["z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in, *size])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


CASES = [
    {"strides": [2, 2]},  # kernel == stride: 1x1 conv + pixel shuffle
    {"strides": [2, 2], "bias": False},
    {"kernel": (3, 2), "strides": [3, 2]},
    {"kernel": (4, 4), "strides": [2, 2], "pads": [1, 1, 1, 1]},  # DCGAN
    {"kernel": (3, 3), "strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"kernel": (3, 3), "strides": [1, 1], "pads": [1, 0, 1, 2]},
    {"kernel": (3, 3), "strides": [2, 1], "dilations": [2, 1]},
    {"kernel": (2, 2), "strides": [2, 2], "group": 2, "c_out": 4},
]


@pytest.mark.parametrize("options", CASES, ids=[str(i) for i in range(len(CASES))])
def test_rewritten_conv_transpose_computes_the_same(options):
    model = _model(**options)
    rewritten, count = lower_conv_transpose(model)
    assert count == 1 and "ConvTranspose" not in [n.op_type for n in rewritten.graph.node]
    x = {"x": np.random.default_rng(2).standard_normal((2, 6, 5, 7)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(rewritten, x)["z"], ort_run(model, x)["z"], rtol=1e-5, atol=1e-5)


def test_forms_spc_does_not_rewrite_stay():
    model = _model(kernel=(3, 3), strides=[2, 2], pads=[3, 3, 3, 3])  # a crop past the kernel's reach
    assert lower_conv_transpose(model)[1] == 0
    assert lower_conv_transpose(_model(strides=[2, 2], output_shape=[10, 14]))[1] == 0
    assert lower_conv_transpose(_model(strides=[2, 2], auto_pad="SAME_UPPER"))[1] == 0


def test_compiled_upsampling_matches_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    x = {"x": np.random.default_rng(3).standard_normal((2, 6, 5, 7)).astype(np.float32)}
    for i, options in enumerate([{"strides": [2, 2]}, {"kernel": (4, 4), "strides": [2, 2], "pads": [1, 1, 1, 1]}]):
        model = _model(**options)
        manifest = compile_model(model, "x86", tmp_path / str(i))
        assert [layer["kernel"] for layer in manifest["layers"]] == ["dense"]  # spc's conv, not TVM's loop nest
        np.testing.assert_allclose(load_bundle(tmp_path / str(i)).run(x)["z"], ort_run(model, x)["z"], rtol=1e-4,
                                   atol=1e-4)
