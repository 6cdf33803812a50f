"""float16 models on CPU targets computed in float32 (targets/widen.py): spc's float32 kernels run every layer
(they were TVM's scalar loop nests, a float16 ResNet-18 63x slower than float32), inputs and outputs keep their
float16 type, results within float16 rounding of ONNX Runtime's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.targets.testing import ort_run
from spc.targets.widen import widen_to_float32

pytest.importorskip("tvm")

from spc.targets import compile_model, get_target, load_bundle  # noqa: E402

pytestmark = pytest.mark.skipif(not get_target("x86").runs_here(), reason="the x86 target needs an AVX-512 host")


def _half(name, *shape, scale=0.3, seed=0):
    rng = np.random.default_rng(seed + len(name))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float16), name)


def _cnn_float16_io() -> onnx.ModelProto:
    """float16 in and out: conv (bias) -> ReLU -> grouped conv -> Sigmoid gate -> 1x1 conv."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["g"], pads=[1] * 4, group=2),
             helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["silu"]),
             helper.make_node("Conv", ["silu", "w3"], ["y"])]
    inits = [_half("w1", 8, 3, 3, 3), _half("b1", 8), _half("w2", 8, 4, 3, 3), _half("w3", 4, 8, 1, 1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4, 9, 9])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mlp_cast_inside() -> onnx.ModelProto:
    """float32 in and out, float16 inside: Cast -> MatMul + Add -> ReLU -> MatMul -> Cast (a mixed-precision export)."""
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["xh", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["yh"]),
             helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]
    inits = [_half("w1", 32, 64), _half("b1", 64), _half("w2", 64, 16)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("build,x", [
    (_cnn_float16_io, lambda rng: rng.standard_normal((2, 3, 9, 9)).astype(np.float16)),
    (_mlp_cast_inside, lambda rng: rng.standard_normal((5, 32)).astype(np.float32)),
])
def test_float16_models_run_spcs_float32_kernels(build, x, tmp_path):
    model = build()
    feeds = {"x": x(np.random.default_rng(1))}
    manifest = compile_model(model, "x86", tmp_path)
    assert {layer["kernel"] for layer in manifest["layers"]} == {"dense"}  # no layer left to TVM's loops
    assert any("computed in float32" in note for note in manifest["notes"])
    got, ref = load_bundle(tmp_path).run(feeds)["y"], ort_run(model, feeds)["y"]
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-2, atol=2e-2)
    exact = ort_run(widen_to_float32(model)[0], {"x": feeds["x"]})["y"]  # the float32 graph the code came from
    np.testing.assert_allclose(got.astype(np.float32), exact.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_a_float32_model_is_left_as_it_is():
    model = _mlp_cast_inside()
    for node in model.graph.node:
        for attr in node.attribute:
            attr.i = TensorProto.FLOAT
    for i, t in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32),
                                                                    t.name))
    widened, count = widen_to_float32(model)
    assert count == 0 and widened is model
