"""OBS-compensated block sparsity (passes/block_obs.py): fewer output error than magnitude zeroing, same layout."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spc.passes.block_obs import compensated_sparsity, obs_block_sparsify, tap_hessian
from spc.passes.sparsify import block_mask, sparsify
from spc.validate import run


def correlated_inputs(rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Activations as real layers see them: most of the variance in fewer directions than channels."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n // 3, n))
    return rng.standard_normal((rows, n // 3)) @ factors + 0.3 * rng.standard_normal((rows, n)) + \
        rng.standard_normal(n) * 0.5


def test_compensation_beats_magnitude_and_keeps_the_block_layout():
    rng = np.random.default_rng(1)
    x = correlated_inputs(4000, 48)
    w = rng.standard_normal((32, 48))
    hessian = x.T @ x / len(x)
    new = obs_block_sparsify(w, 0.5, (4, 1), hessian)
    magnitude = np.where(block_mask(w, 0.5, (4, 1)), w, 0.0)
    blocks = new.reshape(8, 4, 48)
    assert int((~blocks.any(axis=1)).sum()) == round(0.5 * 8 * 48)  # exactly the share compile_model zeroes
    np.testing.assert_array_equal(block_mask(new, 0.5, (4, 1)), new.reshape(8, 4, 48).any(axis=1).repeat(4, 0))
    error = np.linalg.norm(x @ (new - w).T)
    assert error < 0.5 * np.linalg.norm(x @ (magnitude - w).T)


def test_nothing_removed_changes_nothing_and_identity_hessian_is_magnitude():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 12))
    np.testing.assert_allclose(obs_block_sparsify(w, 0.0, (4, 1), np.eye(12)), w)
    # with H = I the blocks are chosen by magnitude and, inputs being uncorrelated, nothing is re-fitted
    np.testing.assert_allclose(obs_block_sparsify(w, 0.5, (4, 1), np.eye(12), damp=0.0),
                               np.where(block_mask(w, 0.5, (4, 1)), w, 0.0), atol=1e-12)


def test_conv_taps_follow_the_weight_layout():
    channels = np.array([[2.0, 0.5], [0.5, 1.0]])
    h = tap_hessian(channels, taps=3, spatial=0.5)
    assert h.shape == (6, 6)
    # column c * taps + t: the same channel's taps share its variance, correlated by `spatial`
    assert h[0, 0] == 2.0 and h[0, 1] == 1.0 and h[0, 3] == 0.5 and h[3, 3] == 1.0


def test_model_level_sparsity_matches_compile_models_zeroing_and_helps():
    rng = np.random.default_rng(3)
    x = correlated_inputs(2000, 64, seed=4).astype(np.float32)
    w = rng.standard_normal((64, 32)).astype(np.float32)  # MatMul weight [K, N]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    hessian = x.astype(np.float64).T @ x / len(x)
    compensated, done = compensated_sparsity(model, {"w": 0.5}, lambda node: hessian)
    assert done == ["w"]
    recompiled, _ = sparsify(compensated, {"w": 0.5}, min_size=1)  # what compile_model does to it
    new_w = numpy_helper.to_array(next(i for i in recompiled.graph.initializer if i.name == "w"))
    np.testing.assert_array_equal(new_w, numpy_helper.to_array(compensated.graph.initializer[0]))
    dense = run(model, {"x": x})["y"]
    plain = run(sparsify(model, {"w": 0.5}, min_size=1)[0], {"x": x})["y"]
    ours = run(compensated, {"x": x})["y"]
    assert np.linalg.norm(ours - dense) < 0.5 * np.linalg.norm(plain - dense)
    onnx.checker.check_model(compensated)


def test_the_column_sweep_for_wide_layers_also_beats_zeroing(monkeypatch):
    import spc.passes.block_obs as block_obs

    monkeypatch.setattr(block_obs, "EXACT_MAX", 0)
    rng = np.random.default_rng(1)
    x = correlated_inputs(4000, 48)
    w = rng.standard_normal((32, 48))
    new = obs_block_sparsify(w, 0.5, (4, 1), x.T @ x / len(x))
    magnitude = np.where(block_mask(w, 0.5, (4, 1)), w, 0.0)
    assert int((~new.reshape(8, 4, 48).any(axis=1)).sum()) == round(0.5 * 8 * 48)
    assert np.linalg.norm(x @ (new - w).T) < 0.9 * np.linalg.norm(x @ (magnitude - w).T)


def test_speedup_glue_compensates_a_pruned_layer_with_obspas_moments():
    """--speedup --sparse-layers: after channel pruning, the BSR layer's blocks are OBS-chosen and re-fitted with
    OBSPA's (data-free, here exact: Gaussian input through a Gemm) moments of its kept input channels."""
    import spc
    from spc.latency_sparse import compensate_blocks
    from spc.passes import PassContext
    from spc.passes.obspa import ObspaImportance
    from spc.plan import make_plan
    from spc.rewrite import apply_removal
    from tests.test_obspa import gaussian_feeds, mlp

    model = spc.io.from_proto(mlp(relu=False, hidden=64))
    analysis = spc.analyze(model)
    scorer = ObspaImportance()
    plan = make_plan(analysis, scorer(analysis, PassContext()), 0.25, "channels", 1, normalize=scorer.normalize)
    pruned = scorer.compensate(analysis, plan, apply_removal(analysis, plan.removed), PassContext())
    second = next(n for n in pruned.graph.node if n.op_type == "Gemm" and n.output[0] in
                  {o.name for o in pruned.graph.output}).input[1]
    compensated, done = compensate_blocks(analysis, scorer, plan, pruned, {second: 0.5})
    assert done == [second]
    feeds = gaussian_feeds(model, 4000, seed=7)
    reference = run(pruned, feeds)
    name = next(iter(reference))
    plain = run(sparsify(pruned, {second: 0.5}, min_size=1)[0], feeds)[name]
    ours = run(compensated, feeds)[name]
    assert np.linalg.norm(ours - reference[name]) < 0.8 * np.linalg.norm(plain - reference[name])


def test_block_cost_is_the_output_energy_the_refit_leaves():
    """The latency planner weighs zeroed blocks against OBSPA's channel costs: both must be the (row-weighted)
    energy of the change of the layer's output, measured here on the samples that define H."""
    from spc.passes.block_obs import block_cost

    rng = np.random.default_rng(3)
    x = correlated_inputs(3000, 24)
    w = rng.standard_normal((8, 24))
    rows = rng.uniform(0.5, 2.0, 8)
    hessian = x.T @ x / len(x)
    delta = obs_block_sparsify(w, 0.5, (4, 1), hessian) - w
    measured = float(np.mean(np.sum((x @ delta.T * rows) ** 2, axis=1)))
    assert abs(block_cost(w, 0.5, (4, 1), hessian, 1, rows) / measured - 1) < 1e-9
    assert block_cost(w, 0.0, (4, 1), hessian) == 0.0
    assert block_cost(w, 0.3, (4, 1), hessian) < block_cost(w, 0.6, (4, 1), hessian)
    # a conv weight [out, channels x taps]: taps independent, each tap's change weighed by the channel moments
    taps, channels = 4, hessian[:6, :6]
    conv = rng.standard_normal((8, 6 * taps))
    delta = (obs_block_sparsify(conv, 0.5, (4, 1), tap_hessian(channels, taps)) - conv).reshape(8, 6, taps)
    expected = sum(np.trace(delta[:, :, t] @ channels @ delta[:, :, t].T) for t in range(taps))
    assert abs(block_cost(conv, 0.5, (4, 1), channels, taps) / expected - 1) < 1e-9
