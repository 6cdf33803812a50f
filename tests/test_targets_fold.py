"""BatchNormalization folded into the convolution before it (the graph the code generator sees): same outputs as
ONNX Runtime on the original, only the foldable pairs folded, weight names kept for per-layer decisions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.targets.fold import fold_batchnorm, fold_pad, fold_shape_constants
from spc.targets.testing import ort_run


def _bn(name: str, x: str, y: str, c: int, rng) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    params = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c), rng.uniform(0.2, 2.0, c)]
    names = [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names)]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=name, epsilon=1e-3), inits



def _checked_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    """An opset-17 model of ``nodes``, checked by onnx.checker."""
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model

def _model() -> onnx.ModelProto:
    """conv_a (bias) -> bn_a -> relu; conv_b and conv_c share one weight, each followed by its own BN; conv_d's
    output feeds its BN and an Add (not foldable)."""
    rng = np.random.default_rng(0)
    w = lambda *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32))  # noqa: E731
    inits = []
    wa = w(8, 3, 3, 3); wa.name = "wa"
    ba = w(8); ba.name = "ba"
    ws = w(8, 8, 1, 1); ws.name = "shared"
    wd = w(8, 8, 3, 3); wd.name = "wd"
    inits += [wa, ba, ws, wd]
    bns = {}
    for name, x, y in (("bn_a", "a", "a_bn"), ("bn_b", "b", "b_bn"), ("bn_c", "c", "c_bn"), ("bn_d", "d", "d_bn")):
        bns[name], params = _bn(name, x, y, 8, rng)
        inits += params
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        bns["bn_a"],
        helper.make_node("Relu", ["a_bn"], ["a_r"], name="relu_a"),
        helper.make_node("Conv", ["a_r", "shared"], ["b"], name="conv_b"),
        bns["bn_b"],
        helper.make_node("Conv", ["a_r", "shared"], ["c"], name="conv_c"),
        bns["bn_c"],
        helper.make_node("Conv", ["a_r", "wd"], ["d"], name="conv_d", pads=[1, 1, 1, 1]),
        bns["bn_d"],
        helper.make_node("Add", ["d", "d_bn"], ["d_sum"], name="add_d"),
        helper.make_node("Sum", ["b_bn", "c_bn", "d_sum"], ["y"], name="sum"),
    ]
    return _checked_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 6, 6])], inits)


def test_folded_model_computes_the_same():
    model = _model()
    before = model.SerializeToString()
    folded, count = fold_batchnorm(model)
    assert model.SerializeToString() == before  # the input is not modified
    assert count == 3  # bn_d's conv output is also read by the Add
    onnx.checker.check_model(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("BatchNormalization") == 1
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(folded, x)["y"], ort_run(model, x)["y"], rtol=1e-4, atol=1e-5)
    convs = {n.name: list(n.input) for n in folded.graph.node if n.op_type == "Conv"}
    assert convs["conv_a"][1] == "wa"  # an unshared weight keeps its name
    assert convs["conv_b"][1] != convs["conv_c"][1] and "shared" not in (convs["conv_b"][1], convs["conv_c"][1])
    assert convs["conv_d"] == ["a_r", "wd"]
    names = {t.name for t in folded.graph.initializer}
    assert "shared" not in names and "bn_a.scale" not in names and "bn_d.scale" in names  # nothing left unread


def test_nothing_to_fold_returns_an_equal_copy():
    model = _model()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("training_mode", 1))
    folded, count = fold_batchnorm(model)
    assert count == 0 and folded is not model
    assert folded.SerializeToString() == model.SerializeToString()


def test_compiled_cnn_with_batchnorm_matches_onnxruntime(tmp_path):
    """End to end: the bundle keeps the BatchNorms (model.onnx as given), the library runs them folded into the
    convolutions' epilogues, and the layer records still name the ONNX nodes."""
    tvm = pytest.importorskip("tvm")  # noqa: F841
    from spc.targets import bundle_inputs, compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    model = _model()
    manifest = compile_model(model, "x86", tmp_path, input_shapes={"x": [2, 3, 6, 6]})
    kept = onnx.load(tmp_path / "model.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in kept.graph.node) == 4
    names = {layer["node"]: layer for layer in manifest["layers"]}
    assert set(names) == {"conv_a", "conv_b", "conv_c", "conv_d"}
    assert names["conv_a"]["fused"] == ["bias", "relu"] and names["conv_a"]["weight"] == "wa"
    x = bundle_inputs(manifest, seed=1)
    got = load_bundle(tmp_path).run(x)["y"]
    np.testing.assert_allclose(got, ort_run(model, x)["y"], rtol=1e-4, atol=1e-4)


def _pad_model() -> onnx.ModelProto:
    """TensorFlow-style "same" padding before strided convolutions: pad_a (zero, bottom/right) -> conv_a 3x3/2 with
    its own pads, folded; pad_b fills with 1.0, pad_c also feeds a Relu, pad_d pads the channel axis: kept."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
             for name, shape in (("wa", (4, 3, 3, 3)), ("wb", (4, 4, 3, 3)), ("wc", (4, 4, 1, 1)), ("wd", (4, 6, 1, 1)))]
    const = lambda name, values, dtype=np.int64: numpy_helper.from_array(np.array(values, dtype), name)  # noqa: E731
    inits += [const("p_a", [0, 0, 0, 0, 0, 0, 1, 1]), const("p_hw", [0, 0, 1, 1, 0, 0, 1, 1]),
              const("p_ch", [0, 1, 0, 0, 0, 1, 0, 0]), const("one", 1.0, np.float32), const("zero", 0.0, np.float32)]
    nodes = [
        helper.make_node("Pad", ["x", "p_a", "zero"], ["xa"], name="pad_a"),
        helper.make_node("Conv", ["xa", "wa"], ["a"], name="conv_a", strides=[2, 2], pads=[1, 0, 0, 1]),
        helper.make_node("Pad", ["a", "p_hw", "one"], ["ab"], name="pad_b"),
        helper.make_node("Conv", ["ab", "wb"], ["b"], name="conv_b"),
        helper.make_node("Pad", ["b", "p_hw"], ["bc"], name="pad_c"),
        helper.make_node("Conv", ["bc", "wc"], ["c"], name="conv_c"),
        helper.make_node("Relu", ["bc"], ["c_side"], name="relu_c"),
        helper.make_node("Pad", ["c", "p_ch"], ["cd"], name="pad_d"),
        helper.make_node("Conv", ["cd", "wd"], ["y"], name="conv_d"),
    ]
    return _checked_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 7, 7]),
                           helper.make_tensor_value_info("c_side", TensorProto.FLOAT, ["n", 4, 7, 7])], inits)


def test_zero_pads_fold_into_the_convolution_after_them():
    model = _pad_model()
    before = model.SerializeToString()
    folded, count = fold_pad(model)
    assert model.SerializeToString() == before
    assert count == 1
    onnx.checker.check_model(folded)
    assert [n.name for n in folded.graph.node if n.op_type == "Pad"] == ["pad_b", "pad_c", "pad_d"]
    conv_a = next(n for n in folded.graph.node if n.name == "conv_a")
    assert conv_a.input[0] == "x" and list(helper.get_attribute_value(conv_a.attribute[-1])) == [1, 0, 1, 2]
    x = {"x": np.random.default_rng(3).standard_normal((2, 3, 9, 9)).astype(np.float32)}
    got, ref = ort_run(folded, x), ort_run(model, x)
    for name in ("y", "c_side"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_compiled_model_with_pads_matches_onnxruntime(tmp_path):
    tvm = pytest.importorskip("tvm")  # noqa: F841
    from spc.targets import bundle_inputs, compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    model = _pad_model()
    manifest = compile_model(model, "x86", tmp_path, input_shapes={"x": [2, 3, 9, 9]})
    assert sum(n.op_type == "Pad" for n in onnx.load(tmp_path / "model.onnx").graph.node) == 4  # kept as given
    x = bundle_inputs(manifest, seed=1)
    got, ref = load_bundle(tmp_path).run(x), ort_run(model, x)
    for name in ("y", "c_side"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)


def _computed_pad_model() -> onnx.ModelProto:
    """Pad amounts computed from constants (PyTorch's F.pad export: ConstantOfShape, Concat, Slice, Cast, ...), and
    a Mul of a 5000-value constant that is weights, not shape arithmetic."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    big = numpy_helper.from_array(rng.normal(0, 1, (5000,)).astype(np.float32), "big")
    nodes = [
        helper.make_node("Constant", [], ["hw"], value=numpy_helper.from_array(np.array([1, 2], np.int64))),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("ConstantOfShape", ["two"], ["nc"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Concat", ["nc", "hw", "nc", "hw"], ["amounts_f"], axis=0),  # [0, 0, 1, 2, 0, 0, 1, 2]
        helper.make_node("Slice", ["amounts_f", "zero1", "eight"], ["amounts_s"]),
        helper.make_node("Cast", ["amounts_s"], ["amounts"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "amounts"], ["xp"], name="pad"),
        helper.make_node("Conv", ["xp", "w"], ["y"], name="conv", strides=[2, 2]),
        helper.make_node("Mul", ["big", "big"], ["big2"], name="weights_mul"),
    ]
    inits = [w, big, numpy_helper.from_array(np.array([0], np.int64), "zero1"),
             numpy_helper.from_array(np.array([8], np.int64), "eight")]
    return _checked_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 4, 5]),
                           helper.make_tensor_value_info("big2", TensorProto.FLOAT, [5000])], inits)


def test_pad_amounts_computed_from_constants_fold_too(tmp_path):
    model = _computed_pad_model()
    shaped, count = fold_shape_constants(model)
    assert count == 6  # the two Constants, ConstantOfShape, Concat, Slice, Cast; not the 5000-value Mul
    folded, pads = fold_pad(shaped)
    assert pads == 1 and [n.op_type for n in folded.graph.node] == ["Conv", "Mul"]
    names = {t.name for t in folded.graph.initializer}
    assert "amounts" not in names and "amounts_f" not in names  # nothing left that nothing reads
    x = {"x": np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(folded, x)["y"], ort_run(model, x)["y"], rtol=1e-5, atol=1e-6)
    tvm = pytest.importorskip("tvm")  # noqa: F841
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    compile_model(model, "x86", tmp_path)  # TVM's importer rejected these pads ("Dynamic pads are not supported")
    np.testing.assert_allclose(load_bundle(tmp_path).run(x)["y"], ort_run(model, x)["y"], rtol=1e-4, atol=1e-4)
    compile_model(model, "x86", tmp_path / "sparse", sparsity=0.8, input_shapes={"x": [2, 3, 8, 8]})  # its cost plan


def _shape_built_mask_model() -> onnx.ModelProto:
    """Position ids and an attention mask built from the inputs' sizes, as Hugging Face models export them: the
    sequence length read by Shape -> Gather, Range over it, a mask [n, 1, s, s] expanded to a shape concatenated
    from Shape slices, And / GreaterOrEqual / Where on it, added to token scores."""
    rng = np.random.default_rng(3)
    table = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "positions")
    const = lambda value, name: numpy_helper.from_array(np.array(value, np.int64), name)  # noqa: E731
    inits = [table, const(1, "one"), const(0, "zero"), const([0], "axis0"), const([1], "axis1"), const([-1], "minus1"),
             numpy_helper.from_array(np.array(0.0, np.float32), "f0"),
             numpy_helper.from_array(np.array(-1e9, np.float32), "fneg")]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),  # the static length of a dynamic [n, 8]
        helper.make_node("Range", ["zero", "seq", "one"], ["ids"]),
        helper.make_node("Gather", ["positions", "ids"], ["pos"], axis=0),  # [s, 4]
        helper.make_node("Add", ["x3", "pos"], ["h"]),  # [n, s, 4]
        helper.make_node("MatMul", ["h", "hT"], ["scores"]),  # [n, s, s]
        helper.make_node("Shape", ["mask"], ["batch"], end=1),  # dynamic: stays
        helper.make_node("Shape", ["mask"], ["mask_len"], start=1),  # static: folds
        helper.make_node("Concat", ["batch", "minus1", "mask_len"], ["bshape"], axis=0),
        helper.make_node("Unsqueeze", ["ids", "axis0"], ["ids_row"]),  # [1, s]
        helper.make_node("GreaterOrEqual", ["ids_row", "zero"], ["valid"]),
        helper.make_node("Cast", ["mask"], ["mask_b"], to=TensorProto.BOOL),
        helper.make_node("And", ["mask_b", "valid"], ["keep"]),  # [n, s]
        helper.make_node("Unsqueeze", ["keep", "axis1"], ["keep3"]),  # [n, 1, s]
        helper.make_node("Where", ["keep3", "f0", "fneg"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["y"]),
        helper.make_node("Reshape", ["y", "bshape"], ["out"]),
    ]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                    helper.make_tensor_value_info("x3", TensorProto.FLOAT, ["n", 8, 4]),
                    helper.make_tensor_value_info("hT", TensorProto.FLOAT, ["n", 4, 8]),
                    helper.make_tensor_value_info("mask", TensorProto.INT64, ["n", 8])]
    return _checked_model(nodes, graph_inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 8, 8])],
                          inits)


def _mask_inputs(n: int) -> dict:
    rng = np.random.default_rng(4)
    mask = np.ones((n, 8), np.int64)
    mask[:, 5:] = 0
    return {"x": rng.standard_normal((n, 8)).astype(np.float32),
            "x3": rng.standard_normal((n, 8, 4)).astype(np.float32),
            "hT": rng.standard_normal((n, 4, 8)).astype(np.float32), "mask": mask}


def test_shapes_that_inference_knows_fold():
    """With the batch dynamic, the sequence length and everything computed from it fold (a Gather of the static
    part of a Shape); only the batch's Shape stays. With the batch bound, no Shape is left."""
    model = _shape_built_mask_model()
    folded, count = fold_shape_constants(model)
    ops = [n.op_type for n in folded.graph.node]
    assert "Range" not in ops and "GreaterOrEqual" not in ops and count >= 6
    assert ops.count("Shape") == 1 and folded.graph.node[ops.index("Shape")].output[0] == "batch"
    feeds = _mask_inputs(3)
    np.testing.assert_allclose(ort_run(folded, feeds)["out"], ort_run(model, feeds)["out"], rtol=1e-6)

    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    for value in bound.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 3
    folded, _ = fold_shape_constants(bound)
    assert "Shape" not in [n.op_type for n in folded.graph.node]
    np.testing.assert_allclose(ort_run(folded, feeds)["out"], ort_run(model, feeds)["out"], rtol=1e-6)


def test_model_with_shape_built_mask_compiles_with_a_dynamic_batch_too(tmp_path, monkeypatch):
    """TVM's importer could not type the Reshape after such a mask ("Reshape expects the input tensor to have known
    shape"), dynamic batch or not; with the sizes folded it compiles either way and matches ONNX Runtime. Where
    TVM still fails on dynamic dims, the error says how to compile for fixed sizes."""
    pytest.importorskip("tvm")
    import spc.targets.fold as fold
    from spc.errors import SpcError
    from spc.targets import compile_model, get_target, load_bundle

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    model, feeds = _shape_built_mask_model(), _mask_inputs(3)
    expected = ort_run(model, feeds)["out"]
    compile_model(model, "x86", tmp_path / "dynamic")
    np.testing.assert_allclose(load_bundle(tmp_path / "dynamic").run(feeds)["out"], expected, rtol=1e-5, atol=1e-5)
    compile_model(model, "x86", tmp_path / "bound", input_shapes={k: list(v.shape) for k, v in feeds.items()})
    np.testing.assert_allclose(load_bundle(tmp_path / "bound").run(feeds)["out"], expected, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(fold, "_fold_known_shapes", lambda _model: 0)  # as before: TVM's importer fails
    with pytest.raises(SpcError, match=r"TVM could not import .*dynamic dims n; to compile for fixed sizes: "
                                       r"--dim n=N --bind-dims"):
        compile_model(model, "x86", tmp_path / "old")
