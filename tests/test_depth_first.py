"""Depth-first prefixes (targets/depth_first.py): where the graph is cut, that the split graph computes what the
original does (ONNX Runtime on both), that nodes mixing images stay out of the prefix, and that a compiled bundle
with a split prefix matches ONNX Runtime, with one kernel and one layer record per layer."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.targets.testing import ort_run

depth_first = importlib.import_module("spc.targets.depth_first")


def _model(batch=4, size=96, stem=16, batch_constant=True, dynamic=False) -> onnx.ModelProto:
    """conv 3x3 -> BN -> ReLU -> conv 3x3/2 -> + bias -> max-pool -> (x a [N, C, 1, 1] constant: one scale per
    image) -> conv 1x1 -> Reshape to [N, -1] by Shape(x) (as exporters write it)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, low=None):
        value = rng.uniform(0.5, 1.5, shape) if low else rng.normal(0, 0.3, shape)
        return numpy_helper.from_array(value.astype(np.float32), name)

    inits = [init("wa", stem, 3, 3, 3), init("bn.scale", stem, low=True), init("bn.bias", stem),
             init("bn.mean", stem), init("bn.var", stem, low=True), init("wb", stem, stem, 3, 3),
             init("bias_b", 1, stem, 1, 1), init("scale", batch if batch_constant else 1, stem, 1, 1),
             init("wc", 8, stem, 1, 1), numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Slice", ["x_shape", "zero", "one"], ["n"], name="first_dim"),
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["a_bn"],
                         name="bn"),
        helper.make_node("Relu", ["a_bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Add", ["b", "bias_b"], ["b2"], name="add_bias"),
        helper.make_node("MaxPool", ["b2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Mul", ["p", "scale"], ["m"], name="per_image_scale"),
        helper.make_node("Conv", ["m", "wc"], ["c"], name="conv_c"),
        helper.make_node("Concat", ["n", "minus_one"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Reshape", ["c", "flat_shape"], ["y"], name="flatten"),
    ]
    n = "n" if dynamic else batch
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_the_cut_stops_at_a_node_that_mixes_images():
    model = _model()
    cut = depth_first.choose_cut(model)
    names = [model.graph.node[i].name for i in cut.nodes]
    # the Mul by a [N, C, 1, 1] constant gives each image its own scale: it and what follows stay with the batch;
    # Shape(x) is not per image either (it reads the batch size) and stays, reading the original input
    assert names == ["conv_a", "bn", "relu", "conv_b", "add_bias", "pool"]
    assert cut.crossing == ["p"] and cut.batch == 4


def test_the_split_graph_computes_the_original():
    model = _model()
    split, info = depth_first.split_prefix(model)
    onnx.checker.check_model(split)
    assert info == {"images": 4, "prefix_nodes": 6, "cut": ["p"]}
    assert sum(node.op_type == "Conv" for node in split.graph.node) == 2 * 4 + 1
    assert {t.name for t in split.graph.initializer} == {t.name for t in model.graph.initializer}  # shared
    x = np.random.default_rng(1).standard_normal((4, 3, 96, 96)).astype(np.float32)
    expected = ort_run(model, {"x": x})["y"]
    got = ort_run(split, {"x": x})["y"]
    assert got.shape == expected.shape and np.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ops_that_would_see_the_batch_stay_out():
    """MaxPool's indices count over the whole batch; a Pad with axes including 0 pads the batch."""
    with_indices = _model()
    pool = next(node for node in with_indices.graph.node if node.name == "pool")
    pool.output.append("pool_indices")
    graph = depth_first._Graph(with_indices)
    assert not depth_first.PER_IMAGE["MaxPool"](pool, graph)
    assert depth_first.PER_IMAGE["MaxPool"](next(n for n in _model().graph.node if n.name == "pool"), graph)
    pad = helper.make_node("Pad", ["p", "amounts", "", "axes"], ["padded"])
    model = _model()
    model.opset_import[0].version = 18  # Pad's axes input
    model.graph.node.append(pad)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "amounts"),
                                    numpy_helper.from_array(np.array([2, 0], np.int64), "axes")])
    assert not depth_first.PER_IMAGE["Pad"](pad, depth_first._Graph(model))
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([2, -1], np.int64), "axes"))
    assert depth_first.PER_IMAGE["Pad"](pad, depth_first._Graph(model))


def test_an_opset_11_model_gets_a_split_it_can_run():
    model = _model()
    model.opset_import[0].version = 11  # Split's sizes are an attribute there (Slice, Reshape, BN read the same)
    split, info = depth_first.split_prefix(model)
    onnx.checker.check_model(split)
    assert info is not None
    x = np.random.default_rng(3).standard_normal((4, 3, 96, 96)).astype(np.float32)
    assert np.allclose(ort_run(split, {"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_a_batch_free_constant_lets_the_prefix_go_on():
    model = _model(batch_constant=False)
    cut = depth_first.choose_cut(model)
    # the [1, C, 1, 1] scale is the same for every image: the prefix takes it and the 1x1 conv after it; the
    # Reshape (its target read from Shape(x)) is not per image and stays with the batch
    assert [model.graph.node[i].name for i in cut.nodes][-2:] == ["per_image_scale", "conv_c"]
    assert cut.crossing == ["c"]
    split, _ = depth_first.split_prefix(model)
    x = np.random.default_rng(2).standard_normal((4, 3, 96, 96)).astype(np.float32)
    assert np.allclose(ort_run(split, {"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_a_tensor_read_inside_an_if_branch_counts_as_crossing():
    """An If's branch reads the ReLU's output by name, not as a node input: no cut may hide it inside the prefix
    (every cut past the ReLU would then cross its full map, more than the rule allows)."""
    model = _model()
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["r"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    model.graph.node.append(helper.make_node("If", ["flag"], ["z"], name="branch", then_branch=branch("then"),
                                             else_branch=branch("else")))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    assert "branch" in [node.name for node in depth_first._Graph(model).consumers["r"]]  # read by both branches
    assert depth_first.choose_cut(model) is None


@pytest.mark.parametrize("variant,why", [
    (dict(dynamic=True), "a dynamic batch: nothing to split"),
    (dict(batch=1), "one image"),
    (dict(size=16), "eight images' maps fit in cache"),
    (dict(stem=64, size=32), "the crossing map is as large as any in the prefix"),
])
def test_no_cut_where_it_cannot_pay(variant, why):
    model = _model(**variant)
    assert depth_first.choose_cut(model) is None, why
    assert depth_first.split_prefix(model) == (model, None)


def test_the_latency_planner_times_prefix_layers_one_image_at_a_time():
    """``--speedup`` measures each layer as the compiled model will run it: a prefix layer on one image, its time
    counted once per image; the others on the whole batch; nothing per image for a GPU target (no split there)."""
    from spc.analysis import analyze
    from spc.cost import CostModel
    from spc.graph import Graph
    from spc.latency_layers import find_layers
    from spc.latency_plan import LatencyModel
    from spc.speedup import _per_image, input_shapes
    from spc.targets import get_target
    from spc.targets.latency import LatencyTable

    model = _model(batch=4, dynamic=True)
    analysis = analyze(Graph(model))
    dims = {"n": 4}
    shapes = input_shapes(analysis.graph, dims)
    assert _per_image(model, shapes, get_target("cuda")) == (set(), 1)
    assert _per_image(model, {"x": [1, 3, 96, 96]}, get_target("x86")) == (set(), 1)  # one image: no split
    per_image = _per_image(model, shapes, get_target("x86"))
    assert per_image[1] == 4 and {"a", "b", "p"} <= per_image[0] and "c" not in per_image[0]
    cost = CostModel(analysis, dims)
    layers = {layer.node: layer for layer in find_layers(analysis, cost, dims, 1, per_image=per_image)}
    assert [(layers[n].spec.rows, layers[n].images) for n in ("conv_a", "conv_b", "conv_c")] == [(1, 4), (1, 4), (4, 1)]
    for layer in layers.values():
        layer.table = LatencyTable([layer.full[0]], [layer.full[1]], [[1e-3]])
    latency = LatencyModel(cost, list(layers.values()), 0.0)
    seconds = [s for _widths, s in latency.layer_seconds(np.zeros(analysis.atom_count, dtype=bool))]
    assert seconds == pytest.approx([4e-3, 4e-3, 1e-3])
    whole = find_layers(analysis, cost, dims, 1)
    assert [(layer.spec.rows, layer.images) for layer in whole] == [(4, 1)] * 3


def test_compiled_bundle_with_a_split_prefix_matches_onnxruntime(tmp_path):
    from spc.targets import compile_model, get_target, load_bundle, testing

    if not get_target("x86").runs_here():
        pytest.skip("the x86 target needs an AVX-512 host to run bundles")
    model = testing.mobilenet_v2(size=64, batch=1)
    shapes = {"input": [4, 3, 64, 64]}
    split = compile_model(model, "x86", tmp_path / "split", input_shapes=shapes)
    whole = compile_model(model, "x86", tmp_path / "whole", input_shapes=shapes, depth_first=False)
    assert split["depth_first"]["images"] == 4 and split["depth_first"]["prefix_nodes"] > 10
    assert whole["depth_first"] is None
    assert len(split["layers"]) == len(whole["layers"])  # one record per layer, not one per image
    assert [r["node"] for r in split["layers"]] == [r["node"] for r in whole["layers"]]
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    expected = ort_run(model, {"input": x})
    got = load_bundle(tmp_path / "split").run({"input": x})
    for name, value in expected.items():
        assert np.abs(got[name] - value).max() <= 1e-4 * max(1.0, np.abs(value).max())


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3", "shufflenetv2", "googlenet", "convnext"])
def test_zoo_cnns_split_to_the_same_outputs(name, tmp_path, monkeypatch):
    """Real architectures (PyTorch exports: max-pool stems, squeeze-excitation, channel shuffle, inception
    concats, LayerNorm2d through permutes) at batch 8, cut wherever the rules allow (the cache-size floor lifted:
    the zoo's images are 64x64), give ONNX Runtime's outputs (bit for bit here; float tolerance allowed, as ONNX
    Runtime may block a batch of one differently on another CPU)."""
    pytest.importorskip("torch", reason="the zoo is exported from PyTorch modules; install the [test] extra")
    from spc.targets.compile import bind_shapes
    from spc.targets.fold import fold_batchnorm, fold_pad, fold_shape_constants
    from tests.zoo import export

    monkeypatch.setattr(depth_first, "MIN_BATCH_MAP_BYTES", 0)
    export(name, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    x_info = model.graph.input[0]
    shape = [8] + [d.dim_value for d in x_info.type.tensor_type.shape.dim][1:]
    bind_shapes(model, {x_info.name: shape})
    model = fold_pad(fold_shape_constants(fold_batchnorm(model)[0])[0])[0]  # what compile_model splits
    split, info = depth_first.split_prefix(model)
    assert info is not None and info["prefix_nodes"] >= 2
    onnx.checker.check_model(split)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected, got = ort_run(model, {x_info.name: x}, threads=1), ort_run(split, {x_info.name: x}, threads=1)
    for key, value in expected.items():
        assert np.allclose(got[key], value, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(value).max())))
