"""`spc compile` prunes with the target's channel multiple, compiles a bundle, and `spc run` matches ONNX Runtime
on the bundle's own model; bad arguments are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tvm")

from spc.cli import main  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_compile_then_run_matches_onnxruntime(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    code = main(["compile", str(MODELS / "digits_cnn.onnx"), "--target", "x86", "--ratio", "0.3",
                 "--sparsity", "0.5", "-o", str(bundle), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["target"] == "x86"
    assert summary["pruning"]["reduction"]["macs"] >= 0.3
    assert all(g["kept"] % 16 == 0 or g["kept"] == g["units"] for g in summary["pruning"]["groups"])
    assert sorted(p.name for p in bundle.glob("*.onnx")) == ["model.onnx"]
    images = np.load(MODELS / "digits_eval.npz")["image"][:8]
    np.save(tmp_path / "x.npy", images)
    assert main(["run", str(bundle), "--input", f"image={tmp_path / 'x.npy'}", "--output",
                 str(tmp_path / "y.npz")]) == 0
    got = np.load(tmp_path / "y.npz")["logits"]
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"image": images})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_no_winograd_computes_every_product(tmp_path, capsys):
    """The digits CNN's 3x3 layers run by Winograd by default (F(4x4, 3x3) on its 8x8 maps, F(2x2, 3x3) on 4x4
    ones and on its stride-2 8x8 -> 4x4 layer), the manifest and the terminal's table say which; ``--no-winograd``
    computes every product, as close to ONNX Runtime as the direct sums."""
    images = np.load(MODELS / "digits_eval.npz")["image"][:8]
    expected = ort.InferenceSession(str(MODELS / "digits_cnn.onnx")).run(None, {"image": images})[0]
    errors = {}
    for flag in ([], ["--no-winograd"]):
        bundle = tmp_path / ("exact" if flag else "default")
        assert main(["compile", str(MODELS / "digits_cnn.onnx"), "--target", "x86", "-o", str(bundle), *flag]) == 0
        manifest = json.loads((bundle / "manifest.json").read_text())
        tiles = sorted({layer["winograd"] for layer in manifest["layers"] if layer["winograd"]})
        assert manifest["winograd"] is not bool(flag) and tiles == ([] if flag else [2, 4])
        shown = capsys.readouterr().out
        if flag:
            assert "Winograd" not in shown
        else:
            assert "dense, Winograd 4x4" in shown and "dense, Winograd 2x2" in shown
        np.save(tmp_path / "x.npy", images)
        assert main(["run", str(bundle), "--input", f"image={tmp_path / 'x.npy'}", "--output",
                     str(tmp_path / "y.npz")]) == 0
        errors[bool(flag)] = np.abs(np.load(tmp_path / "y.npz")["logits"] - expected).max()
    capsys.readouterr()
    assert errors[True] < 1e-5 and errors[False] < 1e-4, errors


@pytest.mark.parametrize("args,fragment", [
    (["--target", "riscv"], "--target"),
    (["--target", "x86", "--sparsity", "1.5"], "--sparsity"),
    (["--target", "x86", "--block", "four"], "--block"),
    (["--target", "x86", "--ratio", "2"], "--ratio"),
    (["--target", "x86", "--speedup", "2", "--no-winograd"], "--no-winograd"),
])
def test_compile_argument_errors(tmp_path, capsys, args, fragment):
    code = main(["compile", str(MODELS / "digits_cnn.onnx"), *args, "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("spc: error:") and fragment in err[-1]
    assert not (tmp_path / "b").exists()


def test_bind_dims_compiles_a_static_bundle(tmp_path, capsys):
    """--bind-dims: the bundle's batch is the --dim size (its kernels specialise to it); --eval still scores the
    whole evaluation set, and a batch of another size is refused with a one-line error."""
    bundle = tmp_path / "bundle"
    code = main(["compile", str(MODELS / "digits_cnn.onnx"), "--target", "x86", "--ratio", "0.3", "--dim",
                 "batch=8", "--bind-dims", "--eval", str(MODELS / "digits_eval.npz"), "-o", str(bundle), "--json",
                 "-q"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["manifest"]["inputs"][0]["shape"] == [8, 1, 8, 8]
    assert summary["manifest"]["bound_shapes"] == {"image": [8, 1, 8, 8]}
    assert summary["eval"]["after"] > 0.5  # all 540 images scored, not only batches of 8
    images = np.load(MODELS / "digits_eval.npz")["image"]
    np.save(tmp_path / "x8.npy", images[:8])
    assert main(["run", str(bundle), "--input", f"image={tmp_path / 'x8.npy'}", "--output",
                 str(tmp_path / "y.npz")]) == 0
    got = np.load(tmp_path / "y.npz")["logits"]
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"image": images[:8]})[0]
    assert np.abs(got - expected).max() < 1e-4
    np.save(tmp_path / "x4.npy", images[:4])
    capsys.readouterr()
    code = main(["run", str(bundle), "--input", f"image={tmp_path / 'x4.npy'}", "--output", str(tmp_path / "z.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "[8, 1, 8, 8]" in err


@pytest.mark.parametrize("args,fragment", [
    (["--bind-dims"], "--dim NAME=SIZE"),
    (["--bind-dims", "--dim", "seq=4"], "--dim seq names no dynamic axis"),
])
def test_bind_dims_errors(tmp_path, capsys, args, fragment):
    code = main(["compile", str(MODELS / "digits_cnn.onnx"), "--target", "x86", *args, "-o", str(tmp_path / "b"),
                 "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err
    assert not (tmp_path / "b").exists()


def test_bind_shapes_keeps_the_dims_it_is_not_given():
    import onnx
    from onnx import TensorProto, helper

    from spc.targets.compile import bind_shapes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    bound = bind_shapes(model, {"x": [2, "seq", 4]})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert bound == {"x": [2, "seq", 4]} and dims[0].dim_value == 2 and dims[1].dim_param == "seq"
    with pytest.raises(Exception, match="incompatible"):
        bind_shapes(fresh, {"x": [2, "len", 4]})
