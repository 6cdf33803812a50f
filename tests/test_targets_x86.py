"""x86 bundles: compile MLP / CNN / transformer encoder with spc's TVM back end, run them in-process and compare
with ONNX Runtime on the bundle's own model.onnx (dense and 80% 4x1 block sparse); bundle layout, manifest,
dynamic batch, the target registry and one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")
pytest.importorskip("torch")

from spc.errors import SpcError  # noqa: E402
from spc.targets import bundle_inputs, compile_model, get_target, list_targets, load_bundle, testing  # noqa: E402

RTOL = ATOL = 1e-4
X86 = get_target("x86")
pytestmark = pytest.mark.skipif(not X86.runs_here(), reason="the x86 target needs an AVX-512 host to run bundles")

MODELS = {
    # (builder, input_shapes for the sparse build: bind the batch so the cost model sees the real row count)
    "mlp": (lambda: testing.mlp(d_in=128, hidden=256, d_out=16), {"input": [32, 128]}),
    "cnn": (lambda: testing.cnn(channels=16, size=16), None),
    "encoder": (lambda: testing.encoder(d_model=64, heads=4, ffn=256, layers=1, seq=32), None),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{(model, sparsity): (bundle dir, manifest)}, compiled once for the module."""
    cache = {}

    def get(name: str, sparsity: float):
        key = (name, sparsity)
        if key not in cache:
            build, shapes = MODELS[name]
            out = tmp_path_factory.mktemp(f"{name}-{int(sparsity * 100)}")
            manifest = compile_model(build(), "x86", out, sparsity=sparsity, input_shapes=shapes if sparsity else None)
            cache[key] = (out, manifest)
        return cache[key]

    return get


def _check_against_ort(out, manifest, batch: int = 2):
    bundle = load_bundle(out)
    x = bundle_inputs(manifest, seed=1, dims={"batch": batch})
    got = bundle.run(x)
    ref = testing.ort_run(str(out / "model.onnx"), x)
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=ATOL)
    return got


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
def test_bundle_matches_onnxruntime(built, name, sparsity):
    out, manifest = built(name, sparsity)
    _check_against_ort(out, manifest)
    if name == "cnn":  # its max-pool runs spc's kernel (kernels/pool.py), symbolic batch here
        assert b"spc_maxpool" in (out / "model.so").read_bytes()
    layers = manifest["layers"]
    assert layers and all(layer["kernel"] in ("dense", "bsr") for layer in layers)
    if sparsity == 0:
        assert all(layer["kernel"] == "dense" for layer in layers)
    else:
        # the large layers are 80% block sparse and use the BSR kernel
        bsr = [layer for layer in layers if layer["kernel"] == "bsr"]
        assert bsr, layers
        for layer in bsr:
            assert layer["block"] == [4, 1]
            assert layer["density"] == pytest.approx(0.2, abs=0.01)
            assert layer["expected_speedup"] > 1.1
        assert manifest["sparsify"]["target_sparsity"] == 0.8


def test_depthwise_convolutions_run_spcs_kernel(tmp_path):
    """A MobileNetV2-style model (depthwise 3x3 at stride 1 and 2, BatchNorm folded, ReLU6, a residual): outputs as
    ONNX Runtime's, every convolution on spc's kernels with its bias and ReLU6 (ONNX Clip(0, 6)) fused."""
    manifest = compile_model(testing.mobile(channels=8, size=20), "x86", tmp_path)
    _check_against_ort(tmp_path, manifest, batch=3)
    library = (tmp_path / "model.so").read_bytes()
    assert b"spc_dwconv" in library
    assert b"maximum" not in library and b"minimum" not in library  # no clip left outside a kernel
    layers = manifest["layers"]
    assert [layer["shape"][1] for layer in layers] == [27, 8, 9, 32, 8, 9, 32, 8]  # stem, 2 x (expand, dw, project), fc
    assert all(layer["kernel"] == "dense" for layer in layers)
    relu6 = ["bias", "clip(0,6)"]
    assert [layer["fused"] for layer in layers] == [relu6] + [relu6, relu6, ["bias"]] * 2 + [["bias"]]


@pytest.mark.parametrize("groups,stride", [(2, 1), (4, 2), (3, 1)])
def test_grouped_convolutions_run_spcs_kernel_per_group(groups, stride, tmp_path):
    """RegNet-style grouped 3x3 convolutions (bias and ReLU fused, stride 1 or 2, group widths that are not whole
    vectors) run one spc kernel per group, outputs as ONNX Runtime's; they were TVM's scalar loop nest."""
    rng = np.random.default_rng(groups)
    c = 12 * groups
    weights = {"w1": rng.standard_normal((c, 12 // groups, 3, 3)) * 0.2, "b1": rng.standard_normal(c),
               "w2": rng.standard_normal((c, c // groups, 3, 3)) * 0.2}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1] * 4, strides=[stride] * 2, group=groups),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4, group=groups)]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                            ["batch", 12, 13, 11])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    manifest = compile_model(model, "x86", tmp_path)
    _check_against_ort(tmp_path, manifest, batch=3)
    assert [(layer["kernel"], layer["groups"]) for layer in manifest["layers"]] == [("dense", groups)] * 2
    assert manifest["layers"][0]["fused"] == ["bias", "relu"]


@pytest.mark.parametrize("kernel", [None, "bsr"])
def test_expand_and_depthwise_convolutions_run_as_one_kernel(tmp_path, monkeypatch, kernel):
    """Each block's 1x1 expand and the depthwise conv after it (32 x 32 maps, stride 1 then 2) become one kernel
    (kernels/expand_depthwise.py) when the map between them is large enough; a block-sparse expand stays apart."""
    from spc.targets import lower

    monkeypatch.setattr(lower, "EXPAND_DEPTHWISE_MIN_ELEMENTS", 32 * 32 * 32)  # MobileNetV2 pairs from 1 << 18
    manifest = compile_model(testing.mobile(channels=8, size=64), "x86", tmp_path, kernel=kernel)
    _check_against_ort(tmp_path, manifest, batch=3)
    library = (tmp_path / "model.so").read_bytes()
    fused = [layer["fused"] for layer in manifest["layers"]]
    relu6 = ["bias", "clip(0,6)"]
    if kernel is None:
        assert b"spc_expand_dwconv" in library and b"spc_dwconv" not in library
        pair = [relu6 + ["depthwise conv (one kernel)"], ["1x1 conv (one kernel)"] + relu6, ["bias"]]
        assert fused == [relu6] + pair * 2 + [["bias"]]
    else:
        assert b"spc_expand_dwconv" not in library and b"spc_dwconv" in library
        assert fused == [relu6] + [relu6, relu6, ["bias"]] * 2 + [["bias"]]
        assert [layer["kernel"] for layer in manifest["layers"]][1:3] == ["bsr", "dense"]


def _small_map_convs() -> onnx.ModelProto:
    """1x1 convs on maps that fill pixel vectors badly: 32 -> 8 on 14x14 (contracting), then a 3x3/2 conv to 7x7
    and 16 -> 40 on 7x7 (expanding), symbolic batch."""
    rng = np.random.default_rng(9)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["y"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "small_maps", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 40, 7, 7])],
        [init("w1", 8, 32, 1, 1), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16), init("w3", 40, 16, 1, 1),
         init("b3", 40)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_small_map_1x1_convolutions_run_vectorised_over_channels(tmp_path, monkeypatch):
    """Both 1x1 convs take the channels-vectorised kernel (dense_matmul(channels_first=)); outputs as ORT's."""
    from spc.targets import lower

    chosen = []
    original = lower._small_map_1x1
    monkeypatch.setattr(lower, "_small_map_1x1", lambda g: chosen.append(original(g)) or chosen[-1])
    manifest = compile_model(_small_map_convs(), "x86", tmp_path)
    assert chosen == [True, False, True]  # the 3x3 conv between them keeps conv2d
    assert [layer["fused"] for layer in manifest["layers"]] == [["bias", "relu"], ["bias"], ["bias"]]
    _check_against_ort(tmp_path, manifest, batch=3)


def test_a_depthwise_input_too_large_for_the_kernel_stays_with_tvm(tmp_path, monkeypatch):
    from spc.targets import lower

    monkeypatch.setattr(lower, "DEPTHWISE_MAX_ELEMENTS", 100)  # the blocks' 32 x 10 x 10 and 32 x 5 x 5 inputs
    manifest = compile_model(testing.mobile(channels=8, size=20), "x86", tmp_path)
    _check_against_ort(tmp_path, manifest)
    depthwise = [layer for layer in manifest["layers"] if layer["shape"] == [32, 9]]
    assert [layer["kernel"] for layer in depthwise] == ["tvm", "tvm"]
    assert all("depthwise" in layer["reason"] for layer in depthwise)
    assert b"spc_dwconv" not in (tmp_path / "model.so").read_bytes()


def test_bundle_layout_and_manifest(built):
    out, manifest = built("mlp", 0.8)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "model.onnx", "model.so"]
    assert len(list(out.glob("*.onnx"))) == 1
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["target"] == "x86" and manifest["tvm_target"]["kind"] == "llvm"
    assert manifest["inputs"] == [{"name": "input", "shape": [32, 128], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "output", "shape": [32, 16], "dtype": "float32"}]
    assert manifest["bound_shapes"] == {"input": [32, 128]}
    assert [layer["node"] for layer in manifest["layers"]] == [n.name for n in onnx.load(out / "model.onnx").graph.node if n.op_type == "Gemm"]
    assert manifest["layers"][0]["fused"] == ["bias", "relu"]
    # the bundle's model is the sparsified one: ORT on it is what the library computes
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out / "model.onnx").graph.initializer}
    layers = manifest["sparsify"]["layers"]
    assert [bool(layer["skipped"]) for layer in layers] == [False, False, True]  # 16 outputs: BSR does not pay
    for layer in layers:
        zeros = (inits[layer["weight"]] == 0).mean()
        assert zeros > 0.75 if not layer["skipped"] else zeros < 0.01


def test_dynamic_batch(built):
    out, manifest = built("mlp", 0.0)
    assert manifest["inputs"][0]["shape"] == ["batch", 128]
    assert manifest["dynamic_dims"] == ["batch"]
    for batch in (1, 5, 33):
        got = _check_against_ort(out, manifest, batch=batch)
        assert got["output"].shape == (batch, 16)


def test_encoder_dynamic_batch_sparse(built):
    out, manifest = built("encoder", 0.8)
    assert manifest["inputs"][0]["shape"] == ["batch", 32, 64]
    for batch in (1, 3):
        _check_against_ort(out, manifest, batch=batch)


def test_both_vm_modes_give_the_same_outputs(tmp_path):
    """The CPU targets compile the VM's instructions to host code; the interpreted form (cuda's) computes the same,
    dynamic batch included."""
    import dataclasses

    model = testing.encoder(d_model=64, heads=4, ffn=128, layers=1, seq=8, batch=1)
    assert X86.vm_exec_mode == "compiled" and get_target("cuda").vm_exec_mode == "bytecode"
    outputs = []
    for mode in ("compiled", "bytecode"):
        compile_model(model, dataclasses.replace(X86, vm_exec_mode=mode), tmp_path / mode)
        compiled = b"__vmtir__main" in (tmp_path / mode / "model.so").read_bytes()  # the VM's host function
        assert compiled == (mode == "compiled")
        x = np.random.default_rng(0).standard_normal((3, 8, 64)).astype(np.float32)
        outputs.append(load_bundle(tmp_path / mode).run({"input": x})["output"])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_layers_where_bsr_does_not_pay_stay_dense(tmp_path):
    """Dynamic batch, no input_shapes: the cost model assumes one row, where the token-vectorised BSR kernel loses,
    so the weights are not sparsified (no accuracy lost for nothing) and the layers compile dense."""
    model, _ = MODELS["mlp"]
    manifest = compile_model(model(), "x86", tmp_path, sparsity=0.8)
    assert all(layer["kernel"] == "dense" and layer["density"] == 1.0 for layer in manifest["layers"])
    assert all("predicted" in layer["skipped"] for layer in manifest["sparsify"]["layers"])
    assert any("kept dense" in note for note in manifest["notes"])
    _check_against_ort(tmp_path, manifest, batch=3)


def test_forced_bsr_on_symbolic_rows(tmp_path):
    """The BSR kernel handles symbolic row counts (every tail) even where the cost model would pick dense."""
    model, _ = MODELS["mlp"]
    manifest = compile_model(model(), "x86", tmp_path, sparsity=0.5, kernel="bsr")
    assert all(layer["kernel"] == "bsr" for layer in manifest["layers"])
    for batch in (1, 17, 70):
        _check_against_ort(tmp_path, manifest, batch=batch)


def test_registry():
    assert {"x86", "arm", "cuda"} <= set(list_targets())
    assert get_target("x86").round_to == 16
    assert get_target("arm").round_to in (4, 8)
    assert get_target("cuda").round_to == 8
    assert get_target("arm").cross_compiler == "aarch64-linux-gnu-gcc"
    with pytest.raises(SpcError, match="unknown target 'riscv'"):
        get_target("riscv")


def _celu_model():
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Celu", ["h"], ["y"], name="act0")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_op_is_a_one_line_error(tmp_path):
    with pytest.raises(SpcError) as info:
        compile_model(_celu_model(), "x86", tmp_path / "b")
    msg = str(info.value)
    assert "\n" not in msg and "Celu" in msg and "act0" in msg and "x86" in msg
    assert not (tmp_path / "b" / "model.so").exists()


def test_argument_errors(tmp_path):
    model = _celu_model()
    with pytest.raises(SpcError, match="sparsity"):
        compile_model(model, "x86", tmp_path, sparsity=1.5)
    with pytest.raises(SpcError, match="input_shapes"):
        compile_model(model, "x86", tmp_path, input_shapes={"nope": [1, 8]})
    (tmp_path / "other.onnx").write_bytes(b"")
    with pytest.raises(SpcError, match="exactly one .onnx"):
        compile_model(model, "x86", tmp_path)


@pytest.mark.parametrize("batch, channels", [(2, 24), ("N", 16)])
def test_elementwise_glue_is_vectorised_over_small_maps(batch, channels, tmp_path):
    """A residual add + ReLU on 7x7 maps (rows of 7 floats, not whole vectors) runs as whole 16-lane vectors over
    its fused innermost loops (2 x 24 x 49 with a static batch, 16 x 49 with a symbolic one) and computes the same
    sums."""
    import tvm

    from spc.targets.compile import _import
    from spc.targets.glue_schedule import cpu_pipeline

    shape = [batch, channels, 7, 7]
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                                                  for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = cpu_pipeline(X86)(_import(model, X86))
    glue = [text for text in (f.script() for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
            if "is_host_func" not in text]  # not the symbolic batch's shape function
    assert glue and all(re.search(r"T\.vectorized\((T\.int64\()?16\)", text) for text in glue), glue
    compile_model(model, "x86", tmp_path / "b")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, channels, 7, 7)).astype(np.float32) for _ in range(2))
    got = load_bundle(tmp_path / "b").run({"a": a, "b": b})["y"]
    np.testing.assert_array_equal(got, np.maximum(a + b, 0))


# Hugging Face transformers build position ids and attention masks from Shape of the inputs (Range, Expand,
# GatherND / GatherElements, And, Where); TVM's importer could not type what followed ("Reshape expects the input
# tensor to have known shape", "Cannot use and / or / not operator to Expr") until spc folded the sizes that are
# static once the dims are bound. TVM has no LSTM: spc unrolls it (its weights Unsqueezed from initializers by the
# dynamo exporter). Both exporters.
EXPORTED_MODELS = [("bert", None), ("gpt2", None), ("llama", None), ("t5_encoder", None), ("lstm", None),
                   ("bert", "legacy"), ("gpt2", "legacy"), ("lstm", "legacy")]


@pytest.mark.parametrize("name,exporter", EXPORTED_MODELS)
def test_exported_models_compile_for_fixed_sizes(name, exporter, tmp_path):
    pytest.importorskip("transformers")
    from tests.zoo import export

    path = tmp_path / f"{name}.onnx"
    feeds = export(name, path, exporter=exporter)
    model = onnx.load(path)
    compile_model(model, "x86", tmp_path / "bundle", input_shapes={k: list(v.shape) for k, v in feeds.items()})
    got = load_bundle(tmp_path / "bundle").run(feeds)
    ref = testing.ort_run(model, feeds)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=RTOL, atol=ATOL)
