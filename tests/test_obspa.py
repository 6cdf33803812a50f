"""OBSPA / calibrated OBS / activation criteria: the OBS algebra, the data-free moments, and the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from spc.passes.calibration import collect_moments
from spc.passes.moments import MomentOptions, estimate_moments
from spc.passes.obs import ObsImportance
from spc.passes.obs_algebra import compensation, removal_cost
from spc.passes.obs_sweep import greedy_costs
from spc.passes.obspa import ObspaImportance

import spc
from spc import passes
from spc.analysis import analyze
from spc.cli import main as cli_main
from spc.graph import Graph
from spc.validate import run
from tests.helpers import GraphBuilder

MODELS = Path(__file__).resolve().parents[1] / "models"


def _with_criterion(factory):
    """Register ``factory`` under a private name for one spc.prune call."""
    passes.CRITERIA["_test"] = factory
    return "_test"


# ------------------------------------------------------------------------------------------------ the algebra
def _samples(rng, count, width):
    mix = rng.standard_normal((width, width))
    return rng.standard_normal((count, width)) @ mix + rng.standard_normal(width) * 2.0


def test_compensation_matches_brute_force_least_squares():
    rng = np.random.default_rng(0)
    x = _samples(rng, 500, 12)
    w = rng.standard_normal((5, 12))
    removed = np.zeros(12, dtype=bool)
    removed[[1, 4, 7, 8]] = True
    mean, second = x.mean(axis=0), x.T @ x / len(x)
    new, bias = compensation(w, mean, second, removed, damp=0.0)
    design = np.c_[x[:, ~removed], np.ones(len(x))]
    solution = np.linalg.lstsq(design, x @ w.T, rcond=None)[0]
    np.testing.assert_allclose(new, solution[:-1].T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(bias, solution[-1], rtol=1e-7, atol=1e-9)
    residual = x @ w.T - design @ solution
    assert removal_cost(w, mean, second, removed) == pytest.approx((residual**2).sum() / len(x), rel=1e-7)


def test_greedy_single_step_cost_is_the_obs_saliency():
    """Removing one channel costs |w_c|^2 / (H~^-1)_cc, and the greedy picks the cheapest first."""
    rng = np.random.default_rng(1)
    x = _samples(rng, 400, 6)
    w = rng.standard_normal((3, 6))
    mean, second = x.mean(axis=0), x.T @ x / len(x)
    from spc.passes.obs_consumers import Consumer

    consumer = Consumer(None, w, np.arange(6), np.zeros(3, dtype=int), np.ones(3), (mean, second))
    costs = greedy_costs([consumer], [np.arange(6)], 6, damp=0.0)
    single = [removal_cost(w, mean, second, np.arange(6) == c) for c in range(6)]
    first = int(np.argmin(costs))
    assert first == int(np.argmin(single))
    assert costs[first] == pytest.approx(min(single), rel=1e-6)
    assert np.all(np.diff(np.sort(costs)) >= 0)


def test_in_place_algebra_equals_the_plain_formulas(tmp_path):
    """The memory-saving forms (block reads of a spilled H, in-place Cholesky inverse and Gram, compaction within
    the matrix's memory, block-wise sandwich) give the plain numpy results to round-off."""
    from spc.passes.moments import Gauss, _sandwich, _second
    from spc.passes.obs_algebra import compact, scaled_gram, second_rows, spd_inverse
    from spc.weights import Spilled

    rng = np.random.default_rng(1)
    n = 1100  # over two blocks of 512 rows
    x = _samples(rng, 3 * n, n)
    mean, second = x.mean(axis=0), x.T @ x / len(x)
    spilled = _second(Gauss((1,), (n,), mean, second - np.outer(mean, mean)), spill_bytes=1)
    assert isinstance(spilled, Spilled)
    np.testing.assert_allclose(second_rows(spilled, 0, n), second, rtol=1e-12, atol=1e-12)
    w = rng.standard_normal((700, n)).astype(np.float32)
    removed = rng.random(n) < 0.3
    new, bias = compensation(w, mean, spilled, removed, damp=1e-2)
    ref_new, ref_bias = compensation(w.astype(np.float64), mean, second, removed, damp=1e-2)
    np.testing.assert_allclose(new, ref_new, rtol=1e-9, atol=1e-9 * np.abs(ref_new).max())
    np.testing.assert_allclose(bias, ref_bias, rtol=1e-9, atol=1e-9 * np.abs(ref_bias).max())
    h = second + np.eye(n)
    np.testing.assert_allclose(spd_inverse(h.copy()), np.linalg.inv(h), rtol=1e-8, atol=1e-12)
    scale = rng.random(700) + 0.5
    scaled = w.astype(np.float64) * scale[:, None]
    np.testing.assert_allclose(scaled_gram(w, scale), scaled.T @ scaled, rtol=1e-10, atol=1e-8)
    keep = np.flatnonzero(~removed)
    matrix = rng.standard_normal((n, n))
    expected = matrix[np.ix_(keep, keep)]
    assert np.array_equal(compact(matrix, keep), expected)
    cov = np.cov(x.T)
    out_mean, out_cov = _sandwich(w.T, mean, cov)
    np.testing.assert_allclose(out_cov, w.astype(np.float64) @ cov @ w.T.astype(np.float64), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out_mean, w.astype(np.float64) @ mean, rtol=1e-12)


def test_sweep_of_a_wide_consumer_holds_two_matrices():
    """The greedy sweep's state (H~^-1 and G) is all it allocates besides blocks of rows: no copy of a spilled H,
    of the weight in float64 or of the state while a step updates it (tracemalloc sees numpy's buffers)."""
    import tracemalloc

    from spc.passes.moments import Gauss, _second
    from spc.passes.obs_consumers import Consumer
    from spc.passes.obs_sweep import _Sweep

    rng = np.random.default_rng(2)
    n = 2048  # blocks of 512 rows are a quarter of an n x n matrix
    factor = rng.standard_normal((n, n // 4))
    second = _second(Gauss((1,), (n,), np.zeros(n), factor @ factor.T / n + np.eye(n)), spill_bytes=1)
    del factor
    weight = rng.standard_normal((n, n)).astype(np.float32)
    consumer = Consumer(None, weight, np.arange(n), np.arange(n), np.ones(n), (np.zeros(n), second))
    tracemalloc.start()
    sweep = _Sweep(consumer, np.arange(n), damp=1e-2)
    sweep.remove(np.arange(0, n, 16))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sweep.hinv.shape == (n + 1 - n // 16,) * 2 and sweep.gram.shape == (n - n // 16,) * 2
    assert peak < 2.75 * (n + 1) ** 2 * 8  # three n x n matrices would be 3


# ------------------------------------------------------------------------------------------------ models
def mlp(dead=(), constant=(), hidden=32, relu=True, bias2=False, seed=0):
    """x[N,16] -> Gemm(32) -> (Relu) -> Gemm(8, no bias unless asked) -> y; chosen hidden units dead (always 0)
    or constant (always 0.5)."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 16])
    w1 = b.rng.standard_normal((16, hidden)).astype(np.float32) * 0.5
    b1 = b.rng.standard_normal(hidden).astype(np.float32) * 0.3
    for unit in list(dead) + list(constant):
        w1[:, unit] = 0.0
        b1[unit] = -1.0 if unit in dead else 0.5
    h = b.op("Gemm", [x, b.const(w1, "w"), b.const(b1, "b")])
    if relu:
        h = b.op("Relu", [h])
    inputs = [h, b.w(hidden, 8)] + ([b.w(8)] if bias2 else [])
    return b.model(b.op("Gemm", inputs))


def matmul_net(dead=(), constant=(), seed=0):
    """x[N,4,16] -> MatMul + Add bias -> Relu -> MatMul (no bias: OBS inserts an Add) -> y."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 4, 16])
    w1 = b.rng.standard_normal((16, 32)).astype(np.float32) * 0.5
    b1 = b.rng.standard_normal(32).astype(np.float32) * 0.3
    for unit in list(dead) + list(constant):
        w1[:, unit] = 0.0
        b1[unit] = -1.0 if unit in dead else 0.5
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.const(w1, "w")]), b.const(b1, "b")])])
    return b.model(b.op("MatMul", [h, b.w(32, 8)]))


def conv_net(dead=(), constant=(), seed=0):
    """Conv -> BN -> Relu -> Conv 3x3 without padding or bias: BN gamma 0 makes channels dead or constant."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.op("Conv", [x, b.w(8, 3, 3, 3)], pads=[1] * 4)
    gamma = np.abs(b.rng.standard_normal(8)).astype(np.float32) + 0.5
    beta = b.rng.standard_normal(8).astype(np.float32) * 0.2
    for unit in list(dead) + list(constant):
        gamma[unit] = 0.0
        beta[unit] = -1.0 if unit in dead else 0.5
    y = b.op("BatchNormalization", [y, b.const(gamma, "g"), b.const(beta, "bt"), b.w(8, scale=0.1),
                                    b.w(8, positive=True)])
    y = b.op("Relu", [y])
    return b.model(b.op("Conv", [y, b.w(4, 8, 3, 3)]))


def gaussian_feeds(model, count, seed=0):
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [count] + [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
    return {value.name: rng.standard_normal(shape).astype(np.float32)}


def test_compensated_model_is_the_least_squares_fit():
    """End to end on a Gemm consumer without bias: OBS adds the bias and the pruned outputs are the brute-force
    least-squares fit of the dense outputs on the kept hidden units (calibration = evaluation data, no damping)."""
    model = spc.io.from_proto(mlp(relu=True))
    feeds = gaussian_feeds(model, 300)
    name = _with_criterion(lambda: ObsImportance(damp=0.0, shrink=False, sequential=False))
    result = spc.prune(model, ratio=0.25, by="channels", criterion=name, round_to=1, calibration=feeds)
    hidden_name = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    probe = spc.io.from_proto(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(hidden_name))
    dense = run(probe, feeds)
    hidden, target = dense[hidden_name].astype(np.float64), dense[model.graph.output[0].name].astype(np.float64)
    analysis = result.analysis
    consumer = next(layer for layer in analysis.layers if layer.input == hidden_name)
    removed = result.plan.removed[analysis.dim_labels((consumer.weight, consumer.weight_in_axis))]
    assert 0 < removed.sum() < removed.size
    design = np.c_[hidden[:, ~removed], np.ones(len(hidden))]
    fit = design @ np.linalg.lstsq(design, target, rcond=None)[0]
    pruned = run(result.model, feeds)[model.graph.output[0].name]
    np.testing.assert_allclose(pruned, fit, rtol=1e-3, atol=1e-3 * np.abs(target).max())


def test_sequential_obs_corrects_upstream_error():
    """Two pruned layers in a row: re-fitting the second on the pruned first layer's outputs beats the one-shot
    update on the calibration data."""
    b = GraphBuilder(seed=2)
    x = b.input("x", ["N", 16])
    h = b.op("Relu", [b.op("Gemm", [x, b.w(16, 32), b.w(32)])])
    h = b.op("Relu", [b.op("Gemm", [h, b.w(32, 32), b.w(32)])])
    model = spc.io.from_proto(b.model(b.op("Gemm", [h, b.w(32, 4)])))
    feeds = gaussian_feeds(model, 256)
    target = run(model, feeds)[model.graph.output[0].name]
    errors = []
    for sequential in (False, True):
        name = _with_criterion(lambda sequential=sequential: ObsImportance(sequential=sequential,
                                                                           sequential_samples=256))
        result = spc.prune(model, ratio=0.5, by="channels", criterion=name, round_to=1, calibration=feeds)
        errors.append(float(np.mean((run(result.model, feeds)[model.graph.output[0].name] - target) ** 2)))
    assert errors[1] < errors[0]


def _obs_moments(model, feeds, exact=False):
    """Calibrated moments of every consumer input: as ObsImportance computes them, or from all samples."""
    analysis = analyze(model)
    scorer = ObsImportance()
    keys = [c.key for c in scorer.find_consumers(analysis)]
    if exact:
        return {key: (s.mean, s.second) for key, s in collect_moments(model, feeds, keys, batch=4096).items()}
    return scorer.moments(analysis, passes.PassContext(calibration=feeds), keys)


def test_obspa_with_the_exact_hessian_reproduces_calibrated_obs():
    """Same scores, same plan, same compensated weights (calibrated OBS in its one-shot form; by default it also
    re-fits each consumer sequentially on the pruned model's own inputs, tested below)."""
    model = spc.load(MODELS / "digits_cnn.onnx")
    feeds = {"image": np.load(MODELS / "digits_calib.npz")["image"][:64]}
    exact = _obs_moments(model, feeds)
    obs = spc.prune(model, ratio=0.5, criterion=_with_criterion(lambda: ObsImportance(sequential=False)),
                    round_to=1, calibration=feeds)
    name = _with_criterion(lambda: ObspaImportance(hessians=exact))
    obspa = spc.prune(model, ratio=0.5, criterion=name, round_to=1)
    np.testing.assert_array_equal(obs.plan.removed, obspa.plan.removed)
    a = {i.name: numpy_helper.to_array(i) for i in obs.model.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in obspa.model.graph.initializer}
    assert a.keys() == b.keys()
    for key, value in a.items():
        np.testing.assert_allclose(value, b[key], rtol=1e-5, atol=1e-6)


def test_data_free_moments_are_exact_for_a_gaussian_linear_layer():
    """Standard-normal input through a Gemm is exactly Gaussian: the data-free moments of the consumer's input
    match the calibrated ones up to sampling error, and so do the OBS scores."""
    model = spc.io.from_proto(mlp(relu=False))
    feeds = gaussian_feeds(model, 20000, seed=3)
    measured = _obs_moments(model, feeds, exact=True)
    estimated = estimate_moments(Graph(model), list(measured))
    for key, (mean, second) in measured.items():
        assert np.linalg.norm(estimated[key][1] - second) <= 0.03 * np.linalg.norm(second)
        sampling = np.sqrt(np.trace(second - np.outer(mean, mean)) / 20000)  # the calibrated mean's error
        assert np.linalg.norm(estimated[key][0] - mean) <= 3 * sampling
    free = ObspaImportance(ranking="group")(analyze(model), passes.PassContext())
    calibrated = ObspaImportance(ranking="group", hessians=measured)(analyze(model), passes.PassContext())
    assert np.corrcoef(free, calibrated)[0, 1] > 0.99


def test_rectified_gaussian_moments_match_monte_carlo():
    """ReLU of correlated Gaussians: rectified-Gaussian means and the Hermite (Mehler) covariance."""
    model = spc.io.from_proto(mlp(relu=True, hidden=16))
    feeds = gaussian_feeds(model, 100000, seed=4)
    measured = _obs_moments(model, feeds, exact=True)
    estimated = estimate_moments(Graph(model), list(measured))
    for key, (mean, second) in measured.items():
        cov, cov_e = second - np.outer(mean, mean), estimated[key][1] - np.outer(estimated[key][0], estimated[key][0])
        np.testing.assert_allclose(estimated[key][0], mean, atol=0.02 * np.abs(mean).max())
        assert np.linalg.norm(cov_e - cov) <= 0.03 * np.linalg.norm(cov)


def test_batchnorm_anchors_the_data_free_moments():
    """After a BatchNorm the estimate is N(beta, gamma^2 R) whatever came before."""
    model = spc.io.from_proto(conv_net())
    graph = Graph(model)
    bn = next(n for n in graph.nodes if n.op_type == "BatchNormalization")
    for prior in (MomentOptions(input_mean=0.0, input_std=1.0), MomentOptions(input_mean=3.0, input_std=0.1)):
        mean, second = estimate_moments(graph, [(bn.output[0], 1)], prior)[(bn.output[0], 1)]
        gamma, beta, var = (graph.weight(bn.input[i]).astype(np.float64) for i in (1, 2, 4))
        np.testing.assert_allclose(mean, beta, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.diag(second) - mean**2, gamma**2 * var / (var + 1e-5), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ zero importance
@pytest.mark.parametrize("criterion", ["obspa", "obs"])
@pytest.mark.parametrize("make", [mlp, matmul_net, conv_net], ids=["gemm", "matmul", "conv"])
def test_pruning_zero_importance_channels_changes_nothing(criterion, make):
    """Dead channels (always 0) and constant ones (folded into a new bias) go first, and the outputs do not move."""
    model = spc.io.from_proto(make(dead=(1, 5), constant=(3,)))
    feeds = gaussian_feeds(model, 64, seed=5)
    width = 8 if make is conv_net else 32
    result = spc.prune(model, ratio=3 / width, by="channels", criterion=criterion, round_to=1, calibration=feeds)
    analysis = result.analysis
    consumer = analysis.layers[-1]
    removed = np.flatnonzero(result.plan.removed[analysis.dim_labels((consumer.weight, consumer.weight_in_axis))])
    assert sorted(removed.tolist()) == [1, 3, 5]
    before, after = run(model, feeds), run(result.model, feeds)
    for key, value in before.items():
        np.testing.assert_allclose(after[key], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())


def test_wanda_and_activation_rank_dead_channels_last():
    model = spc.io.from_proto(mlp(dead=(2, 6)))
    feeds = gaussian_feeds(model, 64)
    for criterion in ("wanda", "activation"):
        result = spc.prune(model, ratio=2 / 32, by="channels", criterion=criterion, round_to=1, calibration=feeds)
        layer = result.analysis.layers[-1]
        removed = result.plan.removed[result.analysis.dim_labels((layer.weight, layer.weight_in_axis))]
        assert np.flatnonzero(removed).tolist() == [2, 6]


def test_calibration_subsamples_positions_and_keeps_exact_moments_otherwise():
    rng = np.random.default_rng(0)
    model = spc.io.from_proto(conv_net())
    feeds = {"x": rng.standard_normal((10, 3, 8, 8)).astype(np.float32)}
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    full = collect_moments(model, feeds, [(relu, 1)], batch=4)[(relu, 1)]
    probe = spc.io.from_proto(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(relu))
    values = run(probe, feeds)[relu].astype(np.float64)
    rows = values.transpose(0, 2, 3, 1).reshape(-1, 8)
    np.testing.assert_allclose(full.second, rows.T @ rows / len(rows), rtol=1e-6)
    np.testing.assert_allclose(full.mean_abs, np.abs(rows).mean(axis=0), rtol=1e-6)
    sub = collect_moments(model, feeds, [(relu, 1)], batch=4, max_positions=16)[(relu, 1)]
    assert sub.n == 10 * 16


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("criterion", sorted(c for c in passes.CRITERIA if not c.startswith("_")))
def test_every_criterion_works_through_the_cli(criterion, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.load(MODELS / "digits_calib.npz")["image"][:64])
    out = tmp_path / "out.onnx"
    code = cli_main(["prune", str(MODELS / "digits_cnn.onnx"), "--ratio", "0.5", "--criterion", criterion,
                     "--calib", str(calib), "--round-to", "1", "-o", str(out), "--json",
                     "--eval", str(MODELS / "digits_eval.npz")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["criterion"] == criterion
    assert out.is_file()
    assert summary["reduction"]["macs"] >= 0.45
    if criterion in ("obspa", "obs"):
        assert summary["eval"]["after"] >= 0.95


def test_obs_without_calibration_is_a_clear_error(tmp_path, capsys):
    code = cli_main(["prune", str(MODELS / "digits_cnn.onnx"), "--criterion", "obs", "-o", str(tmp_path / "o.onnx")])
    assert code == 2
    assert "calibration" in capsys.readouterr().err


def test_an_embedding_input_is_read_along_the_axis_its_matmul_contracts():
    """A model fed [batch, tokens, width] embeddings too large for a full joint prior: the prior goes on the width
    axis the first MatMul contracts (not the token axis), so the layers after it get data-free moments."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 64, 48])
    hidden = b.op("Relu", [b.op("MatMul", [x, b.w(48, 32)])])
    found = estimate_moments(Graph(b.model(b.op("MatMul", [hidden, b.w(32, 8)]))), [(hidden, 2)])
    mean, second = found[(hidden, 2)]
    assert mean.shape == (32,) and second.shape == (32, 32) and np.all(mean > 0)  # rectified: positive means


def test_a_fused_projection_split_into_parts_keeps_each_part_s_moments():
    """GPT-2-style fused QKV: one MatMul, then Split; each part's data-free moments are its slice of the whole."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 16, 32])
    qkv = b.op("MatMul", [x, b.w(32, 96)])
    q, k, v = b.op("Split", [qkv, b.ints(24, 32, 40)], outputs=3, axis=2)
    outputs = [b.op("MatMul", [b.op("Relu", [part]), b.w(width, 4)]) for part, width in ((q, 24), (k, 32), (v, 40))]
    found = estimate_moments(Graph(b.model(*outputs)), [(qkv, 2), (q, 2), (v, 2)])
    mean, second = found[(qkv, 2)]
    np.testing.assert_allclose(found[(q, 2)][0], mean[:24])
    np.testing.assert_allclose(found[(v, 2)][0], mean[56:])
    np.testing.assert_allclose(found[(v, 2)][1], second[56:, 56:])
