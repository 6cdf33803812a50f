"""arm bundles: cross-compiled with aarch64-linux-gnu-gcc, run with TVM's aarch64 runtime under qemu-aarch64 (see
targets/arm_runtime.py; CI runs `targets/arm_runtime.sh` first) and compared with ONNX Runtime; the library's
kernels use NEON fused multiply-adds."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("torch")

from spc.targets import arm_runtime, bundle_inputs, compile_model, testing  # noqa: E402

if shutil.which("aarch64-linux-gnu-gcc") is None:
    pytest.skip("aarch64-linux-gnu-gcc is not installed (Debian: gcc-aarch64-linux-gnu)", allow_module_level=True)


@pytest.fixture(scope="module")
def runtime():
    try:
        arm_runtime.ensure(allow_download=True)  # a pip download of the aarch64 wheels, if not cached yet
    except arm_runtime.ArmRuntimeUnavailable as exc:
        pytest.skip(f"aarch64 TVM runtime unavailable: {exc}")


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm-mlp")
    model = testing.mlp(d_in=64, hidden=256, d_out=16)
    manifest = compile_model(model, "arm", out, sparsity=0.8, input_shapes={"input": [16, 64]})
    return out, manifest


def test_arm_bundle_is_aarch64(mlp_bundle):
    out, manifest = mlp_bundle
    assert manifest["target"] == "arm" and manifest["cross_compiler"] == "aarch64-linux-gnu-gcc"
    assert manifest["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.so"]
    head = (out / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert any(layer["kernel"] == "bsr" for layer in manifest["layers"])


def test_arm_kernels_use_neon_fma(mlp_bundle):
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump is not installed (binutils-aarch64-linux-gnu)")
    out, _ = mlp_bundle
    text = subprocess.run([objdump, "-d", str(out / "model.so")], capture_output=True, text=True, check=True).stdout
    fmla = [line for line in text.splitlines() if "\tfmla\t" in line and ".4s" in line]
    assert len(fmla) >= 16, "expected NEON fmla v*.4s in the compiled kernels"


def test_arm_mlp_matches_onnxruntime(runtime, mlp_bundle):
    out, manifest = mlp_bundle
    x = bundle_inputs(manifest, seed=2)
    got, _ = arm_runtime.run_bundle(out, x, threads=2)
    ref = testing.ort_run(str(out / "model.onnx"), x)
    np.testing.assert_allclose(got["output"], ref["output"], rtol=1e-4, atol=1e-4)


def test_arm_cnn_dynamic_batch_matches_onnxruntime(runtime, tmp_path):
    model = testing.cnn(channels=16, size=16)
    manifest = compile_model(model, "arm", tmp_path, sparsity=0.8)
    assert manifest["inputs"][0]["shape"][0] == "batch"
    assert any(layer["kernel"] == "bsr" for layer in manifest["layers"])
    x = bundle_inputs(manifest, seed=3, dims={"batch": 3})
    got, _ = arm_runtime.run_bundle(tmp_path, x)
    ref = testing.ort_run(str(tmp_path / "model.onnx"), x)
    np.testing.assert_allclose(got["output"], ref["output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [2, 4])
def test_arm_winograd_matches_onnxruntime(runtime, tmp_path, monkeypatch, m):
    """Winograd's 3x3 convolutions with NEON's 4 lanes (blocks of 4 channels x 4 columns in the transposing copy),
    forced on the CNN's stride-2 16 -> 32 layer (16x16 map) and its stride-1 32 -> 32 layer (8x8): F(m x m, 3x3)
    at both strides against ONNX Runtime, the batch dynamic."""
    from spc.targets.kernels import conv_winograd

    def forced(g, params):
        if not conv_winograd.takes_winograd(g) or g.c_in < params.lanes:
            return None, 1.0
        algorithms = {(1, 2): conv_winograd.F2, (1, 4): conv_winograd.F4, (2, 2): conv_winograd.S2F2,
                      (2, 4): conv_winograd.S2F4}
        return algorithms[g.stride[0], m], 2.0

    monkeypatch.setattr(conv_winograd, "choose_algorithm", forced)
    model = testing.cnn(channels=16, size=16)
    manifest = compile_model(model, "arm", tmp_path)
    assert [layer["winograd"] for layer in manifest["layers"]] == [None, m, None, m, None]
    x = bundle_inputs(manifest, seed=4, dims={"batch": 2})
    got, _ = arm_runtime.run_bundle(tmp_path, x)
    ref = testing.ort_run(str(tmp_path / "model.onnx"), x)
    np.testing.assert_allclose(got["output"], ref["output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pair", [False, True])
def test_arm_mobilenet_style_matches_onnxruntime(runtime, tmp_path, monkeypatch, pair):
    """Depthwise convolutions (stride 1 and 2) and ReLU6 on spc's kernels with NEON's 4 lanes (tails of 2 + 1),
    alone and as one kernel with the 1x1 expand before them (11 x 11 maps: a chunk of 8 columns, then 2 + 1)."""
    from spc.targets import lower

    monkeypatch.setattr(lower, "EXPAND_DEPTHWISE_MIN_ELEMENTS", 1 if pair else 0)
    manifest = compile_model(testing.mobile(channels=8, size=22), "arm", tmp_path)
    assert all(layer["kernel"] == "dense" for layer in manifest["layers"])
    library = (tmp_path / "model.so").read_bytes()
    assert (b"spc_expand_dwconv" in library) == pair and (b"spc_dwconv" in library) != pair
    x = bundle_inputs(manifest, seed=4, dims={"batch": 2})
    got, _ = arm_runtime.run_bundle(tmp_path, x)
    ref = testing.ort_run(str(tmp_path / "model.onnx"), x)
    np.testing.assert_allclose(got["output"], ref["output"], rtol=1e-4, atol=1e-4)


def test_arm_grouped_conv_silu_and_upsampling_match_onnxruntime(runtime, tmp_path):
    """The forms spc took over from TVM's scalar loop nests, on NEON: a grouped 3x3 conv (one spc kernel per
    group), SiLU (sigmoid through exp, a vectorised polynomial), a 2x2/2 ConvTranspose (a 1x1 conv and a pixel
    shuffle), a padded AveragePool (a depthwise conv), a nearest 2x Resize (a Tile), and a GRU unrolled over its 4
    steps."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = {"wg": rng.standard_normal((8, 4, 3, 3)) * 0.3, "bg": rng.standard_normal(8),
               "wt": rng.standard_normal((8, 6, 2, 2)) * 0.3, "bt": rng.standard_normal(6),
               "W": rng.standard_normal((1, 9, 20)) * 0.3, "R": rng.standard_normal((1, 9, 3)) * 0.3}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([4, 1, 20], np.int64), "seq_shape"))
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [helper.make_node("Conv", ["x", "wg", "bg"], ["a"], pads=[1] * 4, group=2),
             helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["silu"]),
             helper.make_node("ConvTranspose", ["silu", "wt", "bt"], ["t"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("AveragePool", ["t"], ["p"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Resize", ["p", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Reshape", ["x", "seq_shape"], ["seq"]),
             helper.make_node("GRU", ["seq", "W", "R"], ["", "h"], hidden_size=3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 2])],
                              [helper.make_tensor_value_info("up", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    manifest = compile_model(model, "arm", tmp_path)
    assert manifest["layers"][0]["groups"] == 2
    x = {"x": rng.standard_normal((1, 8, 5, 2)).astype(np.float32) * 3}
    got, _ = arm_runtime.run_bundle(tmp_path, x)
    ref = testing.ort_run(model, x)
    for name in ("up", "h"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)
