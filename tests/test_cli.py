"""The command line: tables and JSON, and one-line errors with exit code 2 that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spc.cli import main
from tests.helpers import GraphBuilder, conv_bn_relu

MODELS = Path(__file__).resolve().parent.parent / "models"


def small_cnn(opset: int = 17) -> onnx.ModelProto:
    b = GraphBuilder(opset=opset)
    x = b.input("x", ["N", 3, 8, 8])
    a = conv_bn_relu(b, x, 3, 32)
    a = conv_bn_relu(b, a, 32, 32)
    y = b.op("Conv", [a, b.w(4, 32, 1, 1)])
    return b.model(y)


@pytest.fixture
def cnn_path(tmp_path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_prints_table_and_json(cnn_path, capsys):
    code, out, _ = run_cli(["analyze", cnn_path], capsys)
    assert code == 0 and "prunable group" in out and "network input 'x'" in out
    code, out, _ = run_cli(["analyze", cnn_path, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["prunable_groups"] == 2
    assert all(0 < g["macs_share"] <= 1 for g in data["groups"] if g["pinned"] is None)


def test_prune_writes_a_smaller_valid_model_and_keeps_the_input(cnn_path, tmp_path, capsys):
    before = cnn_path.read_bytes()
    out_path = tmp_path / "out.onnx"
    code, out, _ = run_cli(["prune", cnn_path, "--ratio", "0.5", "--round-to", "1", "-o", out_path, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["macs"]["after"] <= 0.5 * data["macs"]["before"]
    assert cnn_path.read_bytes() == before
    onnx.checker.check_model(onnx.load(out_path))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves nothing behind


@pytest.mark.parametrize("ratio,by", [("0.333", "macs"), ("0.5", "params"), ("0.25", "channels")])
def test_ratio_removes_that_fraction_of_the_measure(cnn_path, tmp_path, capsys, ratio, by):
    code, out, _ = run_cli(["prune", cnn_path, "--ratio", ratio, "--by", by, "--round-to", "1",
                            "-o", tmp_path / "o.onnx", "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert float(ratio) <= data["reduction"][by] <= float(ratio) + 0.1


def test_round_to_keeps_multiples(cnn_path, tmp_path, capsys):
    code, out, _ = run_cli(["prune", cnn_path, "--ratio", "0.5", "--round-to", "8", "-o", tmp_path / "o.onnx",
                            "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and all(g["kept"] % 8 == 0 for g in data["groups"])


def test_demo_model_reports_accuracy(tmp_path, capsys):
    code, out, _ = run_cli(["prune", MODELS / "digits_cnn.onnx", "--ratio", "0.3", "--eval",
                            MODELS / "digits_eval.npz", "-o", tmp_path / "d.onnx", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["eval"]["metric"] == "accuracy"
    assert data["eval"]["before"] > 0.95


def expect_error(args, capsys, *fragments):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("spc: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    line = errors[0]
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_errors_name_the_problem_and_write_nothing(cnn_path, tmp_path, capsys):
    out = tmp_path / "never.onnx"
    expect_error(["prune", cnn_path, "--ratio", "1.5", "-o", out], capsys, "--ratio", "1.5")
    expect_error(["prune", cnn_path, "--ratio", "-0.1", "-o", out], capsys, "--ratio")
    expect_error(["prune", cnn_path, "--ratio", "half", "-o", out], capsys, "--ratio")
    expect_error(["prune", cnn_path, "--criterion", "nope", "-o", out], capsys, "criterion", "nope")
    expect_error(["prune", cnn_path, "-o", cnn_path], capsys, "input")
    expect_error(["prune", tmp_path / "missing.onnx", "-o", out], capsys, "missing.onnx", "no such file")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    expect_error(["analyze", text], capsys, "notes.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(cnn_path.read_bytes()[:200])
    expect_error(["prune", truncated, "-o", out], capsys, "truncated.onnx")
    assert not out.exists()


def test_missing_external_data_is_named(tmp_path, capsys):
    model = small_cnn()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    code, _, _ = run_cli(["analyze", path], capsys)
    assert code == 0  # loads with its data
    (tmp_path / "ext.data").unlink()
    expect_error(["analyze", path], capsys, "ext.data", "not found")


def test_external_data_model_prunes(tmp_path, capsys):
    path = tmp_path / "ext.onnx"
    onnx.save(small_cnn(), path, save_as_external_data=True, location="ext.data", size_threshold=0)
    code, out, _ = run_cli(["prune", path, "--ratio", "0.5", "--round-to", "1", "-o", tmp_path / "p.onnx",
                            "--json"], capsys)
    assert code == 0 and json.loads(out)["reduction"]["macs"] >= 0.5


def test_invalid_graphs_are_refused(tmp_path, capsys):
    dangling = small_cnn()
    dangling.graph.node[1].input[0] = "ghost"
    onnx.save(dangling, tmp_path / "dangling.onnx")
    expect_error(["analyze", tmp_path / "dangling.onnx"], capsys, "ghost", dangling.graph.node[1].name or "")
    cyclic = small_cnn()
    first, second = cyclic.graph.node[0], cyclic.graph.node[1]
    first.input[0] = second.output[0]
    onnx.save(cyclic, tmp_path / "cycle.onnx")
    expect_error(["analyze", tmp_path / "cycle.onnx"], capsys, "cycle")


def test_old_opsets_are_lifted_or_refused(tmp_path, capsys):
    b = GraphBuilder(opset=9)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.op("Conv", [b.op("Relu", [b.op("Conv", [x, b.w(8, 3, 3, 3)], pads=[1] * 4)]), b.w(2, 8, 1, 1)])
    onnx.save(b.model(y), tmp_path / "v9.onnx")
    code, out, _ = run_cli(["prune", tmp_path / "v9.onnx", "--ratio", "0.5", "--round-to", "1",
                            "-o", tmp_path / "p.onnx", "--json"], capsys)
    assert code == 0
    old = helper.make_model(
        helper.make_graph([helper.make_node("Upsample", ["x"], ["y"], scales=[1.0, 1.0, 2.0, 2.0])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])]),
        opset_imports=[helper.make_opsetid("", 1)])
    onnx.save(old, tmp_path / "v1.onnx")
    expect_error(["analyze", tmp_path / "v1.onnx"], capsys, "v1.onnx", "opset 1")


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_supported_opsets_prune(tmp_path, capsys, opset):
    path = tmp_path / f"m{opset}.onnx"
    onnx.save(small_cnn(opset), path)
    code, out, _ = run_cli(["prune", path, "--ratio", "0.4", "--round-to", "1", "-o", tmp_path / "p.onnx",
                            "--json"], capsys)
    assert code == 0 and json.loads(out)["reduction"]["macs"] >= 0.4
