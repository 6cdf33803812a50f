"""Models with external data: weights stay on disk until a pass reads them, the pruned model is written tensor by
tensor with its own external data, and the result equals what the in-memory path gives. A small (a few MB)
LLaMA-shaped decoder from ``bench/bench_large.py`` stands in for the multi-GB ones the benchmark measures."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spc
from spc import weights
from spc.cli import main as cli_main
from spc.errors import SpcError
from spc.graph import Graph

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_large", ROOT / "bench" / "bench_large.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    _bench().write_decoder(path, hidden=128, layers=2, ffn=352, vocab=1000, heads=4, seed=1)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def test_weights_stay_on_disk_at_load(decoder, monkeypatch):
    reads: list[str] = []
    original = weights.read
    monkeypatch.setattr(weights, "read", lambda tensor: reads.append(tensor.name) or original(tensor))
    model = spc.load(decoder)
    big = [init for init in model.graph.initializer if np.prod(init.dims) > weights.INLINE_ELEMENTS]
    assert big and all(weights.is_external(init) and not init.raw_data for init in big)
    assert not [name for name in reads if name in {init.name for init in big}]
    assert model.ByteSize() < 100_000  # the proto holds references, not 2.8 MB of weights
    graph = Graph(model)
    weight = graph.weight("lm_head.weight")  # read when asked, and not kept (it is over the cache's size limit)
    assert weight.shape == (128, 1000) and "lm_head.weight" not in graph._weights


def test_external_result_equals_in_memory_result(decoder, tmp_path):
    before = _digest(decoder.parent)
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(decoder)), str(inline))  # the same model with its weights inside the file
    from_disk = spc.prune(spc.load(decoder), ratio=0.3)
    from_memory = spc.prune(spc.load(inline), ratio=0.3)
    assert from_disk.plan.kept == from_memory.plan.kept and from_disk.plan.kept
    out_disk, out_memory = tmp_path / "disk.onnx", tmp_path / "memory.onnx"
    spc.save(from_disk.model, out_disk)
    spc.save(from_memory.model, out_memory)
    assert (tmp_path / "disk.onnx.data").is_file() and not (tmp_path / "memory.onnx.data").exists()
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out_disk)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out_memory)).graph.initializer}
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name], err_msg=name)
    ids = np.arange(7, dtype=np.int64).reshape(1, 7) * 31 % 1000
    np.testing.assert_array_equal(_run(out_disk, ids), _run(out_memory, ids))
    assert _digest(decoder.parent) == before  # the input and its data file are untouched


def test_cli_prune_writes_external_data(decoder, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert cli_main(["prune", str(decoder), "--ratio", "0.3", "-o", str(out), "--quiet"]) == 0
    data = tmp_path / "out.onnx.data"
    assert data.is_file() and data.stat().st_size < (decoder.parent / "decoder.onnx.data").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]  # no temporary left
    onnx.checker.check_model(str(out))
    logits = _run(out, np.zeros((1, 5), dtype=np.int64))
    assert logits.shape == (1, 5, 1000) and np.all(np.isfinite(logits))


def test_pruned_weights_are_spooled_not_held(decoder):
    result = spc.prune(spc.load(decoder), ratio=0.3)
    sliced = [t for t in result.model.graph.initializer if t.name.endswith("down_proj.weight")]
    assert sliced and all(weights.is_external(t) and not t.raw_data for t in sliced)
    assert all(weights.read(t).shape[0] < 352 for t in sliced)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_broken_external_data_is_one_line(decoder, tmp_path, capsys, damage):
    copy = tmp_path / "model.onnx"
    copy.write_bytes(decoder.read_bytes())
    data = decoder.parent / "decoder.onnx.data"
    if damage == "truncated":
        (tmp_path / "decoder.onnx.data").write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert cli_main(["prune", str(copy), "--ratio", "0.3", "-o", str(tmp_path / "out.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decoder.onnx.data" in err
    assert ("not found" if damage == "missing" else "truncated") in err
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(SpcError):
        spc.load(copy)


def test_external_data_outside_the_model_folder_is_refused(decoder, tmp_path, capsys):
    """A model may only read external data beside itself (as onnx's loader): '../x' is a one-line error."""
    model = onnx.load(str(decoder), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../" + decoder.parent.name + "/" + entry.value
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(model, str(inner / "model.onnx"))
    assert cli_main(["analyze", str(inner / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outside the model's folder" in err


def test_single_file_model_is_read_lazily_and_written_whole(decoder, tmp_path, monkeypatch):
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(decoder)), str(inline))
    eager = spc.prune(spc.load(inline), ratio=0.3)  # under spc.io.LAZY_FILE_BYTES: parsed whole, as before
    spc.save(eager.model, tmp_path / "eager.onnx")
    monkeypatch.setattr(spc.io, "LAZY_FILE_BYTES", 0)
    model = spc.load(inline)
    big = [t for t in model.graph.initializer if t.name.endswith("proj.weight")]
    assert big and all(weights.is_external(t) and weights.is_inline(t) and not t.raw_data for t in big)
    lazy = spc.prune(model, ratio=0.3)
    spc.save(lazy.model, tmp_path / "lazy.onnx")
    assert not (tmp_path / "lazy.onnx.data").exists()  # a single-file input gives a single-file output
    assert onnx.load(str(tmp_path / "lazy.onnx")) == onnx.load(str(tmp_path / "eager.onnx"))
