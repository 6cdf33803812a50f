"""Latency-budget pruning (`--speedup`): latency tables interpolate and cache, the planner meets a predicted
speed-up, a tiny model pruned for a measured speed-up on x86 is valid, and layers measure through TVM's RPC on
loopback (server and tracker) with the same results as locally."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

pytest.importorskip("tvm")

import spc  # noqa: E402
from spc.analysis import analyze  # noqa: E402
from spc.cli import main  # noqa: E402
from spc.cost import CostModel  # noqa: E402
from spc.graph import Graph  # noqa: E402
from spc.io import from_proto  # noqa: E402
from spc.latency_layers import find_layers  # noqa: E402
from spc.latency_plan import LatencyModel, plan_for_latency  # noqa: E402
from spc.targets import get_target, testing  # noqa: E402
from spc.targets.latency import LatencyCache, LatencyTable, candidate_widths, measure_table  # noqa: E402
from spc.targets.measure import LayerSpec, Measurer  # noqa: E402
from spc.targets.rpc import connect, parse_address  # noqa: E402

X86 = get_target("x86").runs_here()


def _bilinear(ci, co):
    return 1e-6 * (3 * ci * co + 5 * ci + 7 * co + 11)


def test_table_is_exact_for_bilinear_times_and_extends_past_its_ends():
    ins, outs = [16, 32, 64], [8, 48]
    table = LatencyTable(ins, outs, [[_bilinear(i, o) for o in outs] for i in ins])
    for ci, co in [(16, 8), (20, 30), (40, 47), (64, 48), (72, 56), (12, 4)]:
        assert table.predict(ci, co) == pytest.approx(_bilinear(ci, co), rel=1e-9)
    single = LatencyTable([3], [32], [[2.0]])
    assert single.predict(3, 32) == single.predict(7, 32) == 2.0
    assert LatencyTable([8, 16], [8], [[1.0], [3.0]]).predict(0, 8) == 0.0  # clamped at zero


def test_candidate_widths_are_rounded_and_end_at_full_width():
    assert candidate_widths(64, 16, 16, 3) == [16, 48, 64]
    assert candidate_widths(100, 4, 8, 2) == [8, 100]
    assert candidate_widths(32, 32, 16, 3) == [32]
    assert all(w % 8 == 0 for w in candidate_widths(96, 1, 8, 4))


class _Fake:
    """A measurer that times nothing: counts calls, returns the bilinear formula."""

    spec = get_target("x86")
    device_name = "fake"

    def __init__(self):
        self.calls = 0

    def time_layer(self, layer, ci, co):
        self.calls += 1
        return _bilinear(ci, co)

    def time_call(self):
        return 0.0


def test_measurements_are_cached_on_disk(tmp_path):
    layer, fake = LayerSpec("matmul", rows=4), _Fake()
    first = measure_table(fake, layer, [16, 32], [16, 32], LatencyCache(tmp_path))
    assert fake.calls == 4 and len(list(tmp_path.glob("*.json"))) == 4
    again = measure_table(fake, layer, [16, 32], [16, 32], LatencyCache(tmp_path))
    assert fake.calls == 4 and again.seconds == first.seconds
    measure_table(fake, LayerSpec("matmul", rows=8), [16], [16], LatencyCache(tmp_path))
    assert fake.calls == 5  # another shape is another key


def test_cached_times_of_other_kernel_code_are_not_used(tmp_path, monkeypatch):
    """A time measured with another version of spc's code generation is not this code's time."""
    from spc.targets import latency

    layer, fake = LayerSpec("matmul", rows=4), _Fake()
    measure_table(fake, layer, [16], [16], LatencyCache(tmp_path))
    assert fake.calls == 1 and latency.measurement_key(fake, layer, 16, 16)["codegen"] == latency.codegen_fingerprint()
    monkeypatch.setattr(latency, "_codegen", "another-kernel-version")
    measure_table(fake, layer, [16], [16], LatencyCache(tmp_path))
    assert fake.calls == 2


class _Noisy(_Fake):
    """The first timing of the narrowest point is slowed down (another process took the core)."""

    def time_layer(self, layer, ci, co):
        seconds = super().time_layer(layer, ci, co)
        return seconds * (50 if (ci, co) == (16, 16) and self.calls == 1 else 1)


def test_noisy_points_are_measured_again_and_the_table_is_monotone(tmp_path):
    noisy = _Noisy()
    table = measure_table(noisy, LayerSpec("matmul", rows=2), [16, 32], [16, 32], LatencyCache(tmp_path))
    assert noisy.calls == 5  # the contradicted point was timed once more
    assert table.seconds[0][0] == pytest.approx(_bilinear(16, 16))
    stuck = LatencyTable([16, 32], [16, 32], [[9.0, 2.0], [3.0, 4.0]])
    fake = _Fake()
    fake.time_layer = lambda layer, ci, co: stuck.seconds[[16, 32].index(ci)][[16, 32].index(co)]
    envelope = measure_table(fake, LayerSpec("matmul", rows=3), [16, 32], [16, 32])
    assert envelope.seconds == [[2.0, 2.0], [3.0, 4.0]]  # never slower than a wider point


def _mlp_latency_model(round_to=8):
    model = testing.mlp(d_in=64, hidden=128, d_out=16, batch=4, static_batch=True)
    analysis = analyze(Graph(from_proto(model)))
    cost = CostModel(analysis)
    layers = find_layers(analysis, cost, {}, round_to)
    for layer in layers:  # synthetic tables: time grows with the layer's MACs
        ins = candidate_widths(layer.full[0], layer.lowest[0], round_to, 3)
        outs = candidate_widths(layer.full[1], layer.lowest[1], round_to, 3)
        layer.table = LatencyTable(ins, outs, [[_bilinear(i, o) for o in outs] for i in ins])
    return analysis, LatencyModel(cost, layers, other_seconds=2e-5), layers


def test_tables_are_kept_without_the_call_overhead_which_stays_fixed(tmp_path):
    """A layer timed alone pays one call's overhead that it does not pay inside the model: the tables hold the
    layer's own time, and the overhead is a fixed part of the model's time that no plan removes."""
    from spc import speedup

    class _CallBound(_Fake):
        def time_layer(self, layer, ci, co):
            return _bilinear(ci, co) + 5e-5

        def time_call(self):
            return 5e-5

    analysis, latency, layers = _mlp_latency_model()
    overhead = speedup._tables(layers, _CallBound(), 8, 3, LatencyCache(tmp_path), lambda _msg: None)
    assert overhead == pytest.approx(5e-5)
    for layer in layers:
        assert layer.table.predict(*layer.full) == pytest.approx(_bilinear(*layer.full))
    fixed = LatencyModel(latency.cost_model, layers, other_seconds=8e-5, fixed_seconds=5e-5)
    scaled = LatencyModel(latency.cost_model, layers, other_seconds=8e-5)
    nothing = np.zeros(analysis.atom_count, dtype=bool)
    assert fixed.predict(nothing) == pytest.approx(scaled.predict(nothing))
    narrowest = speedup.lowest_removal(analysis, 8)
    layer_time = sum(t for _w, t in fixed.layer_seconds(narrowest))
    share = (scaled.predict(narrowest) - layer_time) / 8e-5
    assert 0 < share < 1
    assert fixed.predict(narrowest) == pytest.approx(layer_time + 5e-5 + 3e-5 * share)


@pytest.mark.parametrize("goal", [1.5, 2.0, 3.0])
def test_planner_meets_a_predicted_speedup_with_rounded_widths(goal):
    analysis, latency, layers = _mlp_latency_model()
    assert [layer.op for layer in layers] == ["Gemm", "Gemm", "Gemm"]
    scores = np.random.default_rng(0).random(analysis.atom_count) + 0.1
    base = latency.predict(np.zeros(analysis.atom_count, dtype=bool))
    plan = plan_for_latency(analysis, scores, latency, base / goal, round_to=8)
    predicted = latency.predict(plan.removed)
    assert predicted <= base / goal
    assert predicted >= base / goal * 0.85  # not over-pruned: rounding units were handed back
    assert all(kept % 8 == 0 for kept in plan.kept.values())
    assert plan.after.macs < plan.before.macs


def _mlp_with_times(*forms):
    """The MLP latency model with each layer's table from ``form(ci, co)`` microseconds (+1); its two groups."""
    analysis, latency, layers = _mlp_latency_model()  # 64 -> 128 -> 128 -> 16; groups: the two hidden widths
    for layer, form in zip(layers, forms):
        ins = candidate_widths(layer.full[0], layer.lowest[0], 8, 3)
        outs = candidate_widths(layer.full[1], layer.lowest[1], 8, 3)
        layer.table = LatencyTable(ins, outs, [[1e-6 * (form(i, o) + 1) for o in outs] for i in ins])
    return analysis, latency, [g for g in analysis.prunable_groups if g.size > 1]


def test_time_weight_sets_how_much_time_saved_outweighs_importance():
    """The first hidden group saves 100x the time per channel of the second and is 5x as important: ranked by
    importance per second (time weight 1) it goes first, by importance alone (0) the second group does."""
    analysis, latency, groups = _mlp_with_times(lambda ci, co: 100 * co, lambda ci, co: 0.0, lambda ci, co: ci)
    scores = np.ones(analysis.atom_count)
    scores[groups[0].atoms] = 5.0
    base = latency.predict(np.zeros(analysis.atom_count, dtype=bool))
    target = base - 60e-6  # the second group alone can save it (1 us per channel)
    by_time = plan_for_latency(analysis, scores, latency, target, round_to=8, normalize=False, time_weight=1.0)
    by_importance = plan_for_latency(analysis, scores, latency, target, round_to=8, normalize=False, time_weight=0.0)
    assert by_time.kept[groups[0].id] < groups[0].size and by_time.kept[groups[1].id] == groups[1].size
    assert by_importance.kept[groups[1].id] < groups[1].size and by_importance.kept[groups[0].id] == groups[0].size


def test_macs_floor_keeps_the_compute_a_speedup_needs_and_still_meets_the_time():
    """Where the least-importance plan takes its time from a layer that saves little time per MAC (here the second
    hidden group, whose channels feed a cheap layer), ``min_macs`` makes the planner charge MACs too: the plan keeps
    the MACs asked for and still meets the predicted time, taking it from the first group (much time per MAC)."""
    analysis, latency, groups = _mlp_with_times(lambda ci, co: 50 * co, lambda ci, co: 0.01 * ci * co,
                                                lambda ci, co: 5 * ci)
    scores = np.ones(analysis.atom_count)
    scores[groups[1].atoms] = 0.01  # the second hidden width is nearly free in importance
    base = latency.predict(np.zeros(analysis.atom_count, dtype=bool))
    target = base / 1.3
    free = plan_for_latency(analysis, scores, latency, target, round_to=8, normalize=False)
    floor = 0.65 * free.before.macs
    assert free.after.macs < floor  # the binding case
    kept = plan_for_latency(analysis, scores, latency, target, round_to=8, normalize=False, min_macs=floor)
    assert kept.after.macs >= floor and latency.predict(kept.removed) <= target
    assert kept.kept[groups[0].id] < free.kept[groups[0].id]
    same = plan_for_latency(analysis, scores, latency, target, round_to=8, normalize=False,
                            min_macs=free.after.macs)
    assert np.array_equal(same.removed, free.removed)  # a floor the plan already keeps changes nothing


def test_planner_takes_time_where_it_is_cheap_in_importance():
    analysis, latency, _ = _mlp_latency_model()
    groups = [g for g in analysis.prunable_groups if g.size > 1]
    assert len(groups) == 2
    scores = np.ones(analysis.atom_count)
    scores[groups[0].atoms] = 10.0  # the first hidden layer's channels matter ten times more
    base = latency.predict(np.zeros(analysis.atom_count, dtype=bool))
    plan = plan_for_latency(analysis, scores, latency, base / 1.5, round_to=8, normalize=False)
    assert plan.kept[groups[0].id] > plan.kept[groups[1].id]


def _expand_pad_depthwise(size=64, c_in=16, c=64) -> "onnx.ModelProto":
    """An EfficientNet-Lite block as PyTorch exports it: 1x1 conv (c_in -> c) -> BatchNorm -> Clip(0, 6) -> zero Pad
    (TF "same": bottom/right only) -> depthwise 3x3/2 -> BatchNorm -> Relu -> 1x1 conv (c -> 8)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)

    def init(name, *shape, positive=False):
        value = rng.uniform(0.5, 1.5, shape) if positive else rng.standard_normal(shape) * 0.3
        return numpy_helper.from_array(value.astype(np.float32), name)

    def bn(name, x, y):
        inits.extend([init(f"{name}_s", c, positive=True), init(f"{name}_b", c), init(f"{name}_m", c),
                      init(f"{name}_v", c, positive=True)])
        return helper.make_node("BatchNormalization", [x, f"{name}_s", f"{name}_b", f"{name}_m", f"{name}_v"], [y])

    inits = [init("we", c, c_in, 1, 1), init("wd", c, 1, 3, 3), init("wp", 8, c, 1, 1),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "we"], ["e"], kernel_shape=[1, 1]), bn("bn1", "e", "eb"),
             helper.make_node("Clip", ["eb", "lo", "hi"], ["ea"]), helper.make_node("Pad", ["ea", "pads"], ["ep"]),
             helper.make_node("Conv", ["ep", "wd"], ["d"], kernel_shape=[3, 3], strides=[2, 2], group=c),
             bn("bn2", "d", "db"), helper.make_node("Relu", ["db"], ["da"]),
             helper.make_node("Conv", ["da", "wp"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "expand_pad_depthwise",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, size // 2, size // 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_expand_and_depthwise_convs_are_timed_as_one_layer(tmp_path):
    """A 1x1 conv read only by a depthwise conv (through BatchNorm, Clip and a zero Pad the compiler folds) is one
    latency layer, built as the compiler runs it: one kernel where the model's pair is one kernel, block-sparse
    1x1 apart; the layer model computes what ONNX Runtime does."""
    model = _expand_pad_depthwise()
    analysis = analyze(Graph(from_proto(model)))
    layers = find_layers(analysis, CostModel(analysis), {}, 8)
    assert [layer.spec.op for layer in layers] == ["expand_depthwise", "conv"]  # no depthwise layer of its own
    pair = layers[0]
    assert (pair.full, pair.lowest, pair.pixels) == ((16, 64), (16, 8), 64 * 64 + 32 * 32)
    spec = pair.spec
    assert (spec.height, spec.kernel, spec.stride, spec.pads) == (64, (3, 3), (2, 2), (0, 0, 1, 1))
    assert (spec.activation, spec.bias) == ("clip:0:6", True)
    if not X86:
        return
    one_kernel = [["bias", "clip(0,6)", "depthwise conv (one kernel)"], ["1x1 conv (one kernel)", "bias"]]
    whole = spc.targets.compile_model(model, "x86", tmp_path / "model")
    assert "depthwise conv (one kernel)" in whole["layers"][0]["fused"]
    assert "1x1 conv (one kernel)" in whole["layers"][1]["fused"]
    measurer = Measurer("x86")
    alone = measurer.runner(spec.model(16, 64))
    assert [layer["fused"] for layer in alone.manifest["layers"]] == one_kernel
    reference = ort.InferenceSession(spec.model(16, 64).SerializeToString()).run(None, alone.inputs)[0]
    assert np.abs(alone.run()[0] - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())
    sparse = measurer.runner(spec.model(16, 64), sparsity={"W": 0.5})
    assert [layer["kernel"] for layer in sparse.manifest["layers"]] == ["bsr", "dense"]
    assert not any("one kernel" in " ".join(layer["fused"]) for layer in sparse.manifest["layers"])


@pytest.mark.skipif(not X86, reason="needs an AVX-512 x86 host to measure x86 latencies")
def test_speedup_on_a_small_mlp_gives_a_valid_pruned_model(tmp_path, monkeypatch, capsys):
    # big enough that its layers, not the VM's fixed per-call work, are most of its time (a 4x32x64 MLP is not)
    monkeypatch.setenv("SPC_LATENCY_CACHE", str(tmp_path / "cache"))
    model = testing.mlp(d_in=128, hidden=512, d_out=10, batch=32)
    path = tmp_path / "mlp.onnx"
    spc.save(model, path)
    bundle = tmp_path / "bundle"
    code = main(["compile", str(path), "--target", "x86", "--speedup", "1.5", "--criterion", "l1",
                 "--latency-widths", "2", "--dim", "batch=32", "-o", str(bundle), "--json", "-q"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["latency"]["file"] == "latency.json"
    report = json.loads((bundle / "latency.json").read_text())
    assert report["format"] == "spc-latency/1" and report["target"] == "x86" and report["speedup_goal"] == 1.5
    assert 1 <= len(report["iterations"]) <= 4 and 0 <= report["chosen"] < len(report["iterations"])
    assert report["dense"]["measured_s"] > 0 and all(it["measured_s"] > 0 for it in report["iterations"])
    assert report["result"]["max_predicted_speedup"] >= report["iterations"][0]["predicted_speedup"] * 0.999
    for layer in report["layers"]:
        for full, kept in (layer["in"], layer["out"]):
            assert kept <= full and (kept % 16 == 0 or kept == full)
        assert layer["measured_s"] > 0 and layer["predicted_s"] > 0
    assert summary["pruning"]["macs"]["after"] < summary["pruning"]["macs"]["before"]
    assert report["input_shapes"] == {"input": [32, 128]}
    # measured at batch 32 with static shapes, compiled with a dynamic batch: said, with the way to compile that
    assert "input[0] (batch, measured at 32)" in summary["latency"]["note"]
    assert "--bind-dims" in summary["latency"]["note"]
    x = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    out = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0]
    assert out.shape == (32, 10) and np.isfinite(out).all()
    assert list((tmp_path / "cache").glob("*.json"))  # layer measurements were cached


@pytest.mark.parametrize("args,fragment", [
    (["--target", "x86", "--speedup", "0.5"], "--speedup"),
    (["--target", "x86", "--speedup", "2", "--ratio", "0.3"], "exclusive"),
    (["--target", "x86", "--speedup", "2", "--sparsity", "0.5"], "--sparsity"),
    (["--target", "arm", "--speedup", "2"], "--rpc"),
    (["--target", "x86", "--speedup", "2", "--rpc", "nohostport"], "--rpc"),
    (["--target", "x86", "--speedup", "2", "--rpc-key", "k"], "--rpc-key"),
    (["--target", "x86", "--speedup", "2", "--min-efficiency", "5"], "--min-efficiency"),
])
def test_speedup_errors_are_one_line(tmp_path, capsys, args, fragment):
    code = main(["compile", _digits(), *args, "-o", str(tmp_path / "b"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1


def test_prune_speedup_needs_a_target(tmp_path, capsys):
    code = main(["prune", _digits(), "--speedup", "2", "-o", str(tmp_path / "p.onnx"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--target" in err and not (tmp_path / "p.onnx").exists()


def _digits() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx")


# ---- RPC on loopback ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the server's workers end with it


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    for _ in range(300):
        assert proc.poll() is None, "the RPC process exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def rpc_loopback():
    pytest.importorskip("tornado")  # TVM's tracker needs it
    tracker_port, tracked_port, server_port = _free_port(), _free_port(), _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
                     "--port-end", str(tracker_port + 1)])]
    procs.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                         "--port-end", str(server_port + 1), "--no-fork"]))  # a server without a tracker
    try:
        _wait_listening(tracker_port, procs[0])
        procs.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(tracked_port),
                             "--port-end", str(tracked_port + 1), "--tracker", f"127.0.0.1:{tracker_port}",
                             "--key", "spc-test", "--no-fork"]))
        _wait_listening(server_port, procs[1])
        _wait_listening(tracked_port, procs[2])
        yield tracker_port, server_port
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def _connect_tracker(port: int):
    """The server registers with the tracker shortly after it listens; ask until the key is known."""
    for _ in range(100):
        try:
            return connect(parse_address(f"127.0.0.1:{port}", "spc-test"), timeout=120)
        except spc.SpcError:
            time.sleep(0.2)
    return connect(parse_address(f"127.0.0.1:{port}", "spc-test"), timeout=120)


@pytest.mark.skipif(not X86, reason="the loopback server runs x86 libraries")
def test_layer_measured_through_rpc_matches_local_kernels(rpc_loopback, tmp_path):
    tracker_port, server_port = rpc_loopback
    layer = LayerSpec("conv", rows=1, height=6, width=6, kernel=(3, 3), pads=(1, 1, 1, 1), bias=True)
    model = layer.model(16, 32)
    local = Measurer("x86")
    with_tracker = Measurer("x86", session=_connect_tracker(tracker_port), device_name="tracker")
    direct = Measurer("x86", session=connect(parse_address(f"127.0.0.1:{server_port}")), device_name="server")
    expected = local.runner(model).run()[0]
    reference = ort.InferenceSession(model.SerializeToString()).run(None, local.runner(model).inputs)[0]
    assert np.abs(expected - reference).max() < 1e-4
    for measurer in (with_tracker, direct):
        runner = measurer.runner(model)
        assert np.abs(runner.run()[0] - expected).max() < 1e-5
        assert measurer.time(runner) > 0
        assert measurer.time_layer(layer, 16, 16) > 0


def test_rpc_refused_is_a_one_line_error():
    with pytest.raises(spc.SpcError, match="cannot open a session"):
        connect(parse_address(f"127.0.0.1:{_free_port()}"), timeout=5)


# ---- per-layer dense or block-sparse kernels (spc/latency_sparse.py) --------------------------------------------


def _sparse_plan(ratio, loss, goal=2.0, offset=0.0, normalize=True):
    """The synthetic MLP planned for ``goal`` with one BSR option (density 0.2) on its middle layer."""
    from spc.latency_sparse import plan_with_sparsity

    analysis, latency, layers = _mlp_latency_model()
    layers[1].bsr, layers[1].bsr_loss = {0.2: ratio}, {0.2: loss}
    scores = np.random.default_rng(0).random(analysis.atom_count) + 0.1 + offset
    target = latency.predict(np.zeros(analysis.atom_count, dtype=bool)) / goal
    dense = plan_for_latency(analysis, scores, latency, target, round_to=8, normalize=normalize)
    choice = plan_with_sparsity(analysis, scores, latency, target, round_to=8, normalize=normalize)
    return choice, dense, latency, target


def test_planner_picks_bsr_where_it_costs_less_importance_per_second():
    choice, dense, latency, target = _sparse_plan(ratio=0.1, loss=0.05)
    assert choice.densities == {1: 0.2} and latency.layers[1].density == 0.2
    assert choice.predicted <= target
    assert choice.plan.removed.sum() < dense.removed.sum()  # the sparse layer bought time: fewer channels go
    assert sum(choice.plan.kept.values()) > sum(dense.kept.values())


def test_planner_keeps_layers_dense_where_bsr_costs_more_importance():
    choice, dense, latency, target = _sparse_plan(ratio=0.95, loss=0.9)
    assert choice.densities == {} and all(layer.density == 1.0 for layer in latency.layers)
    assert (choice.plan.removed == dense.removed).all() and choice.predicted <= target


def test_negative_scores_do_not_make_zeroed_blocks_free():
    """obspa's scores are OBS levels with an arbitrary zero (often all negative): only their order counts."""
    choice, dense, _latency, _target = _sparse_plan(ratio=0.95, loss=0.9, offset=-5.0, normalize=False)
    assert choice.densities == {} and (choice.plan.removed == dense.removed).all()
    choice, _dense, _latency, _target = _sparse_plan(ratio=0.1, loss=0.05, offset=-5.0, normalize=False)
    assert choice.densities == {1: 0.2} and choice.loss >= 0


def test_planner_prices_blocks_in_obs_costs_when_the_criterion_has_them():
    """obspa's costs are additive output energies; blocks priced on that scale (BlockPricer) compete with channels
    directly: cheap blocks are taken and dear ones are not, whatever share of the magnitude they hold."""
    from spc.latency_sparse import plan_with_sparsity

    analysis, latency, layers = _mlp_latency_model()
    layers[1].bsr, layers[1].bsr_loss = {0.2: 0.1}, {0.2: 0.9}  # by magnitude share: too dear to take
    costs = np.random.default_rng(0).random(analysis.atom_count) + 0.1
    target = latency.predict(np.zeros(analysis.atom_count, dtype=bool)) / 2.0
    seen = []

    def pricer(price):
        def priced(layer, density, removed):
            seen.append((layer.weight, density, removed.shape))
            return price
        return priced

    cheap = plan_with_sparsity(analysis, -1.0 / costs, latency, target, round_to=8, normalize=False, costs=costs,
                               pricer=pricer(1e-3))
    assert cheap.densities == {1: 0.2} and cheap.predicted <= target
    assert set(seen) == {(layers[1].weight, 0.2, (analysis.atom_count,))}
    assert cheap.loss == pytest.approx(costs[cheap.plan.removed].sum() + 1e-3)
    dear = plan_with_sparsity(analysis, -1.0 / costs, latency, target, round_to=8, normalize=False, costs=costs,
                              pricer=pricer(1e3))
    assert dear.densities == {} and dear.predicted <= target


def test_block_price_is_what_the_compensated_blocks_change_in_the_layer_output():
    """BlockPricer at a plan's kept channels equals the mean squared change of the layer's output that
    compensate_blocks makes in the pruned model, on the samples whose moments OBS was given."""
    import copy

    import onnx

    from spc.latency_sparse import BlockPricer, compensate_blocks
    from spc.passes import PassContext
    from spc.passes.obspa import ObspaImportance
    from spc.rewrite import apply_removal
    from spc.validate import run

    analysis, _latency, layers = _mlp_latency_model()
    model = analysis.graph.model
    linear = next(layer for layer in analysis.layers if layer.weight == layers[1].weight)
    probe = copy.deepcopy(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(linear.input, onnx.TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    inputs = np.concatenate([run(probe, {"input": x + 0.1 * k})[linear.input] for k in range(64)]).astype(np.float64)
    scorer = ObspaImportance(hessians={(linear.input, linear.input_axis):
                                       (inputs.mean(0), inputs.T @ inputs / len(inputs))})
    scorer(analysis, PassContext())
    removed = np.zeros(analysis.atom_count, dtype=bool)
    removed[analysis.dim_labels((linear.weight, linear.weight_in_axis))[:16]] = True  # 16 input channels gone
    price = BlockPricer(analysis, scorer)(layers[1], 0.5, removed)
    pruned = apply_removal(analysis, removed)
    plan = type("Plan", (), {"removed": removed})()
    sparse, done = compensate_blocks(analysis, scorer, plan, pruned, {linear.weight: 0.5})
    assert done == [linear.weight]
    before, after = (next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == linear.weight)
                     for m in (pruned, sparse))
    delta = (after - before).astype(np.float64)
    delta = delta if linear.weight_in_axis == 0 else delta.T  # [in, out]
    kept = inputs[:, 16:]
    measured = float(np.mean(np.sum((kept @ delta) ** 2, axis=1)))
    assert price > 0 and price == pytest.approx(measured, rel=1e-4)


def test_block_prices_are_the_magnitude_sparsify_zeroes():
    from spc.latency_sparse import price_blocks
    from spc.passes.sparsify import sparsify

    analysis, _latency, layers = _mlp_latency_model()
    priced = price_blocks(layers, analysis.graph)
    assert priced == layers[:2]  # the 128x16 classifier is below sparsify's min_size: too small to pay
    first = layers[0]
    assert 0 < first.bsr_loss[0.5] < first.bsr_loss[0.3] < first.bsr_loss[0.2] < 1
    model = analysis.graph.model
    sparse, report = sparsify(model, {first.weight: 0.5})
    rows = {row.weight: row for row in report.layers}
    assert rows[first.weight].sparsity == 0.5 and rows[layers[1].weight].skipped
    before = np.abs(analysis.graph.weight(first.weight)).sum()
    after = next(np.abs(numpy_helper.to_array(i)).sum() for i in sparse.graph.initializer if i.name == first.weight)
    assert (before - after) / before == pytest.approx(first.bsr_loss[0.5], rel=1e-5)


def test_per_layer_sparsity_map_names_real_weights(tmp_path):
    model = testing.mlp(d_in=16, hidden=32, d_out=4, batch=2, static_batch=True)
    with pytest.raises(spc.SpcError, match="nosuchweight"):
        spc.targets.compile_model(model, "x86", tmp_path / "b", sparsity={"nosuchweight": 0.5})


class _SparseFake(_Fake):
    """BSR at density d takes ``d + 0.25`` of the dense time (pays below 0.75)."""

    def time_layer(self, layer, ci, co, density=1.0):
        return super().time_layer(layer, ci, co) * (density + 0.25 if density < 1 else 1.0)


def test_sparse_measurements_keep_densities_that_pay_and_are_cached_apart(tmp_path):
    from spc.latency_sparse import measure_sparse

    _analysis, _latency, layers = _mlp_latency_model()
    layers[0].bsr_loss = {0.8: 0.1, 0.5: 0.3, 0.2: 0.6}
    fake = _SparseFake()
    measure_sparse(layers[:1], [(64, 64)], fake, LatencyCache(tmp_path), lambda _m: None)
    assert layers[0].bsr == {0.5: pytest.approx(0.75), 0.2: pytest.approx(0.45)}
    assert fake.calls == 4 and len(list(tmp_path.glob("*.json"))) == 4
    measure_sparse(layers[:1], [(64, 64)], fake, LatencyCache(tmp_path), lambda _m: None)
    assert fake.calls == 4


@pytest.mark.skipif(not X86, reason="needs an AVX-512 x86 host to measure x86 latencies")
def test_speedup_with_block_sparse_layers_records_them_and_matches_ort(tmp_path, monkeypatch, capsys):
    from spc import latency_sparse, speedup
    from spc.targets.bundle import load_bundle

    monkeypatch.setenv("SPC_LATENCY_CACHE", str(tmp_path / "cache"))

    def cheap_blocks(layers, graph, densities=latency_sparse.DENSITIES):  # zeroed blocks nearly free: BSR wherever
        priced = latency_sparse.price_blocks(layers, graph, densities)  # its measured kernel is faster
        for layer in priced:
            layer.bsr_loss = {d: f * 1e-3 for d, f in layer.bsr_loss.items()}
        return priced

    monkeypatch.setattr(speedup, "price_blocks", cheap_blocks)
    # The BSR kernel's speed is the benchmarks' claim (bench/bench_targets.py); timed here on a loaded 2-core
    # machine it can lose to dense by noise, so a BSR layer costs its dense time scaled by the density it keeps.
    from spc.targets.measure import Measurer

    dense_time = Measurer.time_layer
    monkeypatch.setattr(Measurer, "time_layer", lambda self, layer, ci, co, density=1.0:
                        dense_time(self, layer, ci, co) * min(1.0, density + 0.2))
    model = testing.mlp(d_in=128, hidden=512, d_out=16, batch=128)
    path = tmp_path / "mlp.onnx"
    spc.save(model, path)
    bundle = tmp_path / "bundle"
    code = main(["compile", str(path), "--target", "x86", "--speedup", "1.8", "--criterion", "l1", "--sparse-layers",
                 "--latency-widths", "2", "--dim", "batch=128", "-o", str(bundle), "--json", "-q"])
    assert code == 0 and json.loads(capsys.readouterr().out)["latency"]["file"] == "latency.json"
    report = json.loads((bundle / "latency.json").read_text())
    sparse = [row for row in report["layers"] if row["kernel"] == "bsr"]
    assert sparse, "BSR is timed faster than dense on every layer; the planner should take it"
    assert report["sparsity"] == {row["weight"]: round(1 - row["density"], 4) for row in sparse}
    for row in report["layers"]:
        assert (row["density"] < 1) == (row["kernel"] == "bsr") and row["predicted_s"] > 0
        if row["kernel"] == "bsr":
            assert row["bsr"][f"{row['density']:g}"]["time_ratio"] < 1
    kernels = {layer["weight"]: layer["kernel"] for layer in json.loads((bundle / "manifest.json").read_text())["layers"]}
    assert all(kernels[row["weight"]] == "bsr" for row in sparse)
    x = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0]
    got = next(iter(load_bundle(bundle).run({"input": x}).values()))
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


class _OverheadBound(_Fake):
    """Every layer costs microseconds, the rest of the model a second (which shrinks only with the activations kept,
    here mostly the wide output no plan can narrow): pruning cannot make it much faster."""

    def runner(self, model, shapes):
        return None

    def time(self, runner):
        return 1.0


def test_a_speedup_out_of_reach_is_refused_naming_what_is_reachable(tmp_path, monkeypatch):
    from spc import speedup
    from spc.errors import SpcError

    monkeypatch.setattr(speedup, "_measurer", lambda *args: _OverheadBound())
    model = from_proto(testing.mlp(d_in=32, hidden=64, d_out=2048, batch=4))
    with pytest.raises(SpcError, match=r"2x is predicted out of reach on x86: at most 1\.\d\dx.*ask for at most 1\."):
        speedup.prune_for_speedup(model, 2.0, "x86", criterion="l1", sparse=False, cache_dir=tmp_path,
                                  dim_values={"batch": 4})


class _StuckInModel(_Fake):
    """Layers timed alone are the whole model (bilinear tables: a 2x goal is predicted well within reach), but any
    pruned model measures only 1.2x faster: in the model the narrow layers do not shrink as they did alone."""

    def __init__(self):
        super().__init__()
        self.dense = None

    def runner(self, model, shapes, **options):
        if self.dense is None:  # the first model compiled is the dense one
            self.dense = model
        return model

    def time(self, runner):
        whole = 1.01 * (_bilinear(32, 64) + _bilinear(64, 64) + _bilinear(64, 16))
        return whole if runner is self.dense else whole / 1.2


def test_a_speedup_measured_out_of_reach_with_everything_removed_is_refused(tmp_path, monkeypatch):
    from spc import speedup
    from spc.errors import SpcError

    monkeypatch.setattr(speedup, "_measurer", lambda *args: _StuckInModel())
    model = from_proto(testing.mlp(d_in=32, hidden=64, d_out=16, batch=4))
    said = []
    with pytest.raises(SpcError, match=r"2x is out of reach on x86: measured 1\.20x with every removable channel gone "
                                       r"\(predicted [3-9]\.\d\dx.*ask for at most 1\.2"):
        speedup.prune_for_speedup(model, 2.0, "x86", criterion="l1", cache_dir=tmp_path, dim_values={"batch": 4},
                                  progress=said.append)
    assert sum("compiling and timing the pruned model" in line for line in said) >= 2  # it tried before refusing
    result = speedup.prune_for_speedup(model, 2.0, "x86", criterion="l1", cache_dir=tmp_path,
                                       dim_values={"batch": 4}, beyond_reach=True)
    assert result.report["result"]["measured_speedup"] == pytest.approx(1.2)  # asked for: pruned as far as it goes


class _LoadedFirst(_OverheadBound):
    """Layers timed while another job held the core: the first round of timings says each layer takes the whole
    model's second; timed again they take microseconds."""

    def __init__(self):
        super().__init__()
        self.rounds: dict = {}

    def time_layer(self, layer, ci, co):
        key = (str(layer.key()), ci, co)
        self.rounds[key] = self.rounds.get(key, 0) + 1
        return 1.0 if self.rounds[key] == 1 else super().time_layer(layer, ci, co)


def test_layer_tables_that_add_up_to_more_than_the_model_are_timed_again(tmp_path, monkeypatch):
    from spc import speedup
    from spc.errors import SpcError

    fake = _LoadedFirst()
    monkeypatch.setattr(speedup, "_measurer", lambda *args: fake)
    model = from_proto(testing.mlp(d_in=32, hidden=64, d_out=2048, batch=4))
    said = []
    with pytest.raises(SpcError, match="out of reach"):  # as timed again: the layers are not where the time goes
        speedup.prune_for_speedup(model, 2.0, "x86", criterion="l1", cache_dir=tmp_path, dim_values={"batch": 4},
                                  progress=said.append)
    assert any("timing them again" in line for line in said)
    assert set(fake.rounds.values()) == {2}  # every point of every table, once more


def test_search_times_the_closest_attempts_again_before_choosing(monkeypatch):
    """One lucky measurement (2.06x for a plan that runs 1.7x) must not pick the plan: the two attempts closest to
    the goal are timed again and the closer one on that measurement wins."""
    from spc import speedup

    first = [2.06, 1.85, 2.5, 1.6]  # what each attempt measured when it was made
    true = [1.7, 1.95, 2.5, 1.6]  # what timing it again says
    state = speedup._Search.__new__(speedup._Search)
    state.measurer, state.dense, state.say, state.iterations = None, None, lambda _m: None, []
    state._recalibrate = lambda: None

    def attempt(goal):
        index = len(state.iterations)
        record = {"goal": goal, "measured_speedup": first[index]}
        state.iterations.append(record)
        return {"record": record, "index": index, "runner": index}

    state.attempt = attempt
    monkeypatch.setattr(speedup, "_interleaved", lambda _m, _d, runner, rounds: (1.0, 1.0 / true[runner], true[runner]))
    best = state.search(2.0, refine=3, tolerance=0.02)
    assert len(state.iterations) == 4 and best["index"] == 1
    assert best["record"]["confirmed_speedup"] == 1.95 and "confirmed_speedup" in state.iterations[0]
    assert "confirmed_speedup" not in state.iterations[2]  # not a finalist: not timed again


def test_next_goal_uses_the_recalibrated_prediction_of_earlier_plans(monkeypatch):
    """A dense model first timed in a slow period makes the first plan overshoot; once the dense time is corrected,
    that plan's predicted speed-up, not the goal it was asked for, is what its measurement is set against."""
    from types import SimpleNamespace

    from spc import speedup

    state = speedup._Search.__new__(speedup._Search)
    state.measurer, state.dense, state.say, state.iterations, state.base = None, None, lambda _m: None, [], 1.0
    seconds = {"first": 0.25, "second": 0.45}  # predicted seconds of each plan
    state.latency = SimpleNamespace(set_densities=lambda _d: None, predict=lambda removed: seconds[removed])
    measured = {"first": 3.6, "second": 2.0}

    def recalibrate():
        state.base = 0.85  # the dense model is faster than first timed: every plan's predicted speed-up falls

    def attempt(goal):
        name = "first" if not state.iterations else "second"
        record = {"goal": goal, "measured_speedup": measured[name]}
        state.iterations.append(record)
        return {"record": record, "index": len(state.iterations) - 1, "runner": name,
                "plan": SimpleNamespace(removed=name), "densities": {}}

    state._recalibrate, state.attempt = recalibrate, attempt
    monkeypatch.setattr(speedup, "_interleaved", lambda _m, _d, runner, rounds: (1.0, 1.0, measured[runner]))
    best = state.search(2.0, refine=3, tolerance=0.05)
    assert [round(it["goal"], 3) for it in state.iterations] == [2.0, round(0.85 / 0.25 * 2.0 / 3.6, 3)]
    assert best["index"] == 1


def test_search_stops_when_a_goal_gives_an_earlier_plan_again(monkeypatch):
    """Rounded widths make plans jump: when the next goal plans what was already timed, refining is over."""
    from spc import speedup

    state = speedup._Search.__new__(speedup._Search)
    state.measurer, state.dense, state.say, state.iterations = None, None, lambda _m: None, []
    state._recalibrate = lambda: None
    calls = []

    def attempt(goal):
        calls.append(goal)
        if len(calls) > 1:
            return None  # the same plan as the first attempt
        record = {"goal": goal, "measured_speedup": 2.3}
        state.iterations.append(record)
        return {"record": record, "index": 0, "runner": 0}

    state.attempt = attempt
    monkeypatch.setattr(speedup, "_interleaved", lambda _m, _d, runner, rounds: (1.0, 1.0, 2.25))
    best = state.search(2.0, refine=3, tolerance=0.05)
    assert len(calls) == 2 and best["index"] == 0 and best["record"]["confirmed_speedup"] == 2.25
