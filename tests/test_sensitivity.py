"""`spc sensitivity`: per-group curves start at the dense model exactly, grow as more of a group goes, agree with
an independent masked computation, carry a stable JSON schema, and bad arguments are one-line errors (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import spc
from spc.cli import main
from spc.io import from_proto
from spc.passes import PassContext, importance_pass
from spc.sensitivity import synthetic_inputs
from spc.validate import example_inputs, run
from tests.helpers import GraphBuilder, conv_bn_relu


def classifier() -> onnx.ModelProto:
    """Two prunable conv groups feeding a pooled 4-way classifier."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    a = conv_bn_relu(b, x, 3, 16)
    a = conv_bn_relu(b, a, 16, 16)
    a = b.op("Conv", [a, b.w(4, 16, 1, 1)])
    y = b.op("Flatten", [b.op("GlobalAveragePool", [a])])
    return b.model(y)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return from_proto(classifier())


@pytest.fixture
def model_path(tmp_path, model):
    path = tmp_path / "cls.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("criterion", ["l1", "obspa"])
def test_curves_start_at_the_dense_model_and_grow(model, criterion):
    result = spc.sensitivity(model, fractions=[0.25, 0.5, 0.75], criterion=criterion, samples=16)
    assert result.criterion == criterion and result.metric == "error" and result.data == "synthetic"
    assert result.fractions == [0.0, 0.25, 0.5, 0.75] and len(result.curves) == 2
    for curve in result.curves:
        errors = [p.error for p in curve.points]
        assert curve.points[0].removed == 0 and errors[0] == 0.0 and curve.points[0].agreement == 1.0
        assert [p.removed for p in curve.points] == [0, 4, 8, 12]
        assert 0 < errors[1] < errors[3]
        assert all(later >= 0.7 * earlier for earlier, later in zip(errors[1:], errors[2:]))  # monotone-ish
        assert curve.points[-1].macs < curve.points[0].macs == result.dense["macs"]


def test_point_matches_an_independent_masked_computation(model):
    result = spc.sensitivity(model, fractions=[0.5], criterion="l1", samples=16, seed=2)
    analysis = spc.analyze(model)
    scores = importance_pass("l1")(analysis, PassContext())
    feeds = example_inputs(model, {"N": 16}, seed=2)
    dense = run(model, feeds)[model.graph.output[0].name].astype(np.float64)
    for curve in result.curves:
        group = next(g for g in analysis.prunable_groups if g.id == curve.group)
        removed = np.zeros(analysis.atom_count, dtype=bool)
        removed[group.atoms[np.argsort(scores[group.atoms], kind="stable")[:group.size // 2]]] = True
        masked = run(spc.mask_removal(analysis, removed), feeds)[model.graph.output[0].name]
        expected = np.linalg.norm(masked - dense) / np.linalg.norm(dense)
        assert curve.points[1].removed == group.size // 2
        assert curve.points[1].error == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_eval_labels_give_accuracy_and_calibration_defaults_to_obs(model):
    feeds = synthetic_inputs(model, 32, seed=5)
    logits = run(model, feeds)[model.graph.output[0].name]
    labels = logits.argmax(axis=1)
    result = spc.sensitivity(model, fractions=[0.5, 0.9], eval={**feeds, "label": labels},
                             calibration=synthetic_inputs(model, 32, seed=6))
    assert result.criterion == "obs" and result.metric == "accuracy" and result.data == "eval"
    assert result.dense["accuracy"] == 1.0 and result.samples == 32
    for curve in result.curves:
        assert curve.points[0].accuracy == 1.0
        assert all(0.0 <= p.accuracy <= 1.0 for p in curve.points)
        assert curve.points[-1].removed == 14  # 0.9 x 16 rounds to 14 of 16


def test_json_schema_and_output_file(model_path, tmp_path, capsys):
    out = tmp_path / "sens.json"
    code = main(["sensitivity", str(model_path), "--fractions", "0.5", "--criterion", "l1", "--samples", "8",
                 "--json", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""  # no progress bar with --json
    data = json.loads(captured.out)
    assert data == json.loads(out.read_text())
    assert data["format"] == "spc-sensitivity/1" and data["model"] == str(model_path)
    assert set(data) == {"format", "model", "criterion", "data", "samples", "metric", "fractions", "dense", "curves",
                         "timings_s"}
    assert set(data["dense"]) == {"macs", "params", "accuracy"}
    curve = data["curves"][0]
    assert set(curve) == {"group", "name", "units", "width", "points"}
    assert set(curve["points"][0]) == {"fraction", "removed", "macs", "params", "error", "agreement", "accuracy"}
    assert [p["fraction"] for p in curve["points"]] == [0.0, 0.5]


def test_table_and_progress_bar(model_path, capsys):
    code = main(["sensitivity", str(model_path), "--fractions", "0.5", "--criterion", "l1", "--samples", "8",
                 "--group", "0"])
    captured = capsys.readouterr()
    assert code == 0 and "50%" in captured.out and "output error" in captured.out
    assert len([line for line in captured.out.splitlines() if line.startswith("0 ")]) == 1
    assert "sensitivity" in captured.err  # the bar, on stderr


@pytest.mark.parametrize("args,fragment", [
    (["--fractions", "0.5,1.2"], "--fractions"),
    (["--fractions", "half"], "--fractions"),
    (["--samples", "0"], "--samples"),
    (["--group", "99"], "--group"),
    (["--criterion", "nope"], "--criterion"),
    (["--eval", "missing.npz"], "missing.npz"),
    (["-o", "sens.txt"], "-o"),
])
def test_bad_arguments_exit_2_with_one_line(model_path, tmp_path, capsys, args, fragment):
    code = main(["sensitivity", str(model_path), "--samples", "4", *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("spc: error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert not (tmp_path / "sens.txt").exists()
