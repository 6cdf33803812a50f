"""`spc report BUILD` writes one self-contained HTML page (inline CSS, base64 PNG figures, no external links) from
whatever the build directory holds, says what is missing, and survives unreadable files."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import onnx
import pytest

from spc.cli import main
from spc.validate import run
from tests.test_sensitivity import classifier

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "cls.onnx"
    onnx.save(classifier(), path)
    return path


@pytest.fixture
def eval_path(tmp_path, model_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 3, 6, 6)).astype(np.float32)
    logits = run(onnx.load(model_path), {"x": images})
    labels = next(iter(logits.values())).argmax(axis=1)
    path = tmp_path / "eval.npz"
    np.savez(path, x=images, label=labels)
    return path


def images_of(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def assert_self_contained(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert not re.search(r"https?://|<script|<link|<iframe|src=\"(?!data:)", html)


def test_report_of_prune_summary_with_sensitivity_and_latency(tmp_path, model_path, eval_path, capsys):
    build = tmp_path / "build"
    assert main(["prune", str(model_path), "--ratio", "0.5", "--round-to", "1", "-o", str(build / "m.onnx"),
                 "--summary-json", str(build / "summary.json"), "--eval", str(eval_path), "-q"]) == 0
    assert main(["sensitivity", str(model_path), "--criterion", "l1", "--fractions", "0.5", "--samples", "8",
                 "-o", str(build / "sensitivity.json"), "-q"]) == 0
    summary = json.loads((build / "summary.json").read_text())
    node = summary["layers"][0]["node"]
    (build / "latency.json").write_text(json.dumps({
        "measured_speedup": 1.7,
        "layers": [{"node": node, "kernel": "bsr", "latency_ms": {"dense": 0.5, "sparse": 0.2}}]}))
    capsys.readouterr()
    assert main(["report", str(build)]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (build / "report.html").read_text()
    assert_self_contained(html)
    for anchor in ("overview", "layers", "kernels", "latency", "sensitivity", "accuracy"):
        assert f'<section id="{anchor}">' in html
    assert "latency_ms.sparse" in html and "measured_speedup" in html and "not measured" not in html
    assert "to add the curves" not in html and "No evaluation figures" not in html
    kept = [layer["channels"]["after"] for layer in summary["layers"]]
    assert kept != [layer["channels"]["before"] for layer in summary["layers"]]
    assert f"<td>{node}</td>" in html
    figures = images_of(html)
    assert len(figures) == 5  # channels, MACs, latency, sensitivity, accuracy against speed-up
    assert all(figure.startswith(PNG) and len(figure) > 2000 for figure in figures)


def test_report_of_a_plain_compiled_bundle(tmp_path, model_path, capsys):
    pytest.importorskip("tvm")
    build = tmp_path / "bundle"
    assert main(["compile", str(model_path), "--target", "x86", "-o", str(build), "-q"]) == 0
    summary = json.loads((build / "summary.json").read_text())
    assert summary["target"] == "x86" and summary["manifest"]["layers"]
    assert main(["report", str(build), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert_self_contained(html)
    assert "Latency was not measured" in html and "to add the curves" in html and "not pruned" in html
    assert "From model.onnx" in html and html.count("<td>dense</td>") == len(summary["manifest"]["layers"])
    assert len(images_of(html)) == 2  # channels and MACs per layer
    assert not (build / "report.html").exists()


def test_unreadable_files_are_reported_not_fatal(tmp_path, capsys):
    build = tmp_path / "b"
    build.mkdir()
    (build / "latency.json").write_text("{broken")
    (build / "sensitivity.json").write_text(json.dumps({"groups": [{"group": 0, "points": [{"fraction": "x"}]}]}))
    assert main(["report", str(build)]) == 0
    html = (build / "report.html").read_text()
    assert_self_contained(html)
    assert "Unreadable files" in html and "latency.json: not readable JSON" in html
    assert "sensitivity.json holds no curves" in html


@pytest.mark.parametrize("setup,args,fragment", [
    ("missing", [], "no such directory"),
    ("empty", [], "nothing to report"),
    ("summary", ["-o", "report.txt"], "-o"),
])
def test_report_errors_exit_2(tmp_path, capsys, setup, args, fragment):
    build = tmp_path / "b"
    if setup != "missing":
        build.mkdir()
    if setup == "summary":
        (build / "summary.json").write_text("{}")
    code = main(["report", str(build), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("spc: error:") and fragment in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob("*.html"))
