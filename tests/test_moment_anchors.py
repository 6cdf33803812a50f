"""BatchNorm look-ahead: the BatchNorm after a 1x1 Conv pins the moments of the Conv's input (moment_anchors.py)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from spc.graph import Graph
from spc.passes.moment_anchors import fit_cov, fit_mean
from spc.passes.moments import MomentOptions, estimate_moments
from tests.helpers import GraphBuilder

TRUE_MEAN = np.array([1.0, -2.0, 0.5, 3.0])
TRUE_COV = np.array([[1.0, 0.6, 0.0, 0.2], [0.6, 2.0, 0.3, 0.0], [0.0, 0.3, 0.5, -0.1], [0.2, 0.0, -0.1, 1.5]])


def expansion_with_batchnorm(kernel: int = 1):
    """x [N, 4, 24, 24] -> Conv (4 -> 16) -> BatchNorm whose running statistics are those of TRUE_MEAN/TRUE_COV."""
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 4, 24, 24], TensorProto.FLOAT)
    w = b.rng.standard_normal((16, 4, kernel, kernel)).astype(np.float32)
    bias = b.rng.standard_normal(16).astype(np.float32) * 0.1
    w_sum = w.reshape(16, 4, -1).sum(axis=2).astype(np.float64)
    running_mean = (w_sum @ TRUE_MEAN + bias).astype(np.float32)
    running_var = np.einsum("ki,ij,kj->k", w_sum, TRUE_COV, w_sum).astype(np.float32)
    y = b.op("Conv", [x, b.const(w, "w"), b.const(bias, "b")], pads=[kernel // 2] * 4)
    z = b.op("BatchNormalization", [y, b.const(np.ones(16, np.float32)), b.const(np.zeros(16, np.float32)),
                                    b.const(running_mean), b.const(running_var)])
    return Graph(b.model(b.op("Relu", [z])))


def test_the_mean_of_a_layer_input_is_fitted_to_the_batchnorm_after_it():
    graph = expansion_with_batchnorm()
    key = ("x", 1)
    prior_only = estimate_moments(graph, [key], MomentOptions(look_ahead=False))[key]
    anchored = estimate_moments(graph, [key], MomentOptions())[key]
    np.testing.assert_allclose(prior_only[0], 0.0)  # the input prior: standardised, mean 0
    np.testing.assert_allclose(anchored[0], TRUE_MEAN, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(anchored[1], prior_only[1] - np.outer(prior_only[0], prior_only[0])
                               + np.outer(anchored[0], anchored[0]), rtol=1e-9, atol=1e-9)  # covariance kept


def test_the_covariance_fit_meets_the_running_variances():
    graph = expansion_with_batchnorm()
    key = ("x", 1)
    mean, second = estimate_moments(graph, [key], MomentOptions(look_ahead_variance=True))[key]
    cov = second - np.outer(mean, mean)
    # 16 constraints on the 10 free entries of a 4 x 4 covariance: the true one is recovered
    np.testing.assert_allclose(cov, TRUE_COV, atol=0.05)
    assert np.linalg.eigvalsh(cov).min() > 0


def test_kxk_kernels_are_not_used_as_anchors():
    """Zero padding makes a k x k layer's pooled output mean differ from W_sum m: no look-ahead through it."""
    graph = expansion_with_batchnorm(kernel=3)
    key = ("x", 1)
    np.testing.assert_allclose(estimate_moments(graph, [key], MomentOptions())[key][0], 0.0)


def test_fits_are_least_change_and_keep_psd():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 6))  # fewer constraints than unknowns: the smallest change that meets them
    mean = rng.standard_normal(6)
    target = rng.standard_normal(3)
    fitted = fit_mean(mean, w, np.zeros(3), target)
    np.testing.assert_allclose(w @ fitted, target, rtol=1e-2, atol=1e-2)
    change = fitted - mean
    np.testing.assert_allclose(change, w.T @ np.linalg.lstsq(w.T, change, rcond=None)[0], atol=1e-9)  # in row space
    impossible = -np.ones(3)  # negative variances cannot be met: the result stays positive semi-definite
    assert np.linalg.eigvalsh(fit_cov(np.eye(6), w, impossible)).min() > 0
