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


@pytest.mark.parametrize("args,fragment", [
    (["--target", "riscv"], "--target"),
    (["--target", "x86", "--sparsity", "1.5"], "--sparsity"),
    (["--target", "x86", "--block", "four"], "--block"),
    (["--target", "x86", "--ratio", "2"], "--ratio"),
])
def test_compile_argument_errors(tmp_path, capsys, args, fragment):
    code = main(["compile", str(MODELS / "digits_cnn.onnx"), *args, "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("spc: error:") and fragment in err[-1]
    assert not (tmp_path / "b").exists()
