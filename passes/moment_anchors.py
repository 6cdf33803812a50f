"""BatchNorm look-ahead anchors: the BatchNorm after a layer pins that layer's *input* moments too.

A BatchNorm's running mean and variance are the training-set mean and variance of its input channels (pooled over
samples and positions, as OBS's moments are). When that input is ``y = W x + b`` (a 1x1 Conv of group 1, a Gemm, a
2-D MatMul), they are exact linear constraints on the moments of ``x``:

    E[y_k] = w_k . m + b_k,    Var[y_k] = w_k^T S w_k.

(k x k kernels are left out: with zero padding the border positions see fewer taps, and on small feature maps the
pooled mean is far from ``W_sum m``; measured on the digits CNN, 8x8 maps: 0.93 -> 0.76 accuracy at 3x.)

An expansion layer has several times more outputs than inputs, so its BatchNorm over-determines the input mean and
tells much about the input covariance, which the forward propagation (``moments.Propagator``) only estimates from
an input prior through every layer before. The propagated estimate is therefore corrected by the smallest change
that meets the constraints (least squares, ridge-damped): ``m += W^T (W W^T + e)^-1 r_mean``, and
``S += W^T diag(l) W`` with ``((W W^T) o (W W^T) + e) l = r_var`` (the minimum-Frobenius update of ``S`` whose
quadratic forms ``w_k^T S w_k`` hit the running variances), projected back onto positive semi-definite matrices.

Measured on EfficientNet-Lite0 (OBSPA without data; top-1 agreement with the dense model on 300 crops of real
ImageNet validation images; bench/README.md): at 1.1x / 1.25x / 1.5x fewer MACs 0.79 / 0.45 / 0.27 without the
look-ahead, 0.81 / 0.61 / 0.36 with the mean fit. The covariance fit brings the estimated correlations of the block
outputs much closer to the measured ones (their correlation with the measured ones: 0.14-0.43 -> 0.34-0.83) but the
agreement no further (0.78 / 0.60 / 0.39), and it costs the digits CNN accuracy at 3x (0.92 -> 0.89): it is an
option (``MomentOptions.look_ahead_variance``), off by default. What still limits data-free compensation there is
the correlation of the depthwise outputs that feed each block's projection (with measured correlations in those
layers alone, the same plan reaches 0.86 at 1.25x).
"""

from __future__ import annotations

import numpy as np

from spc.graph import node_attr

RIDGE = 1e-3  # relative damping of both least-squares fits
MAX_WIDTH = 2048  # the variance fit solves an outputs x outputs system and projects an inputs x inputs matrix


def anchor_of(graph, node, tensor: str, const):
    """``(W_mean [O, I], W_var [O, I] or None, bias [O], running mean, running var)`` when ``node`` is a linear
    layer reading ``tensor`` on its channel axis whose only consumer is a BatchNormalization; else None."""
    if not node.input or node.input[0] != tensor or not node.output:
        return None
    users = graph.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "BatchNormalization" or users[0].input[0] != node.output[0]:
        return None
    bn = users[0]
    running_mean, running_var = const(bn.input[3]), const(bn.input[4])
    weights = _linear_weights(graph, node, const)
    if weights is None or running_mean is None or running_var is None:
        return None
    w_mean, w_var, bias = weights
    if running_mean.size != w_mean.shape[0] or running_var.size != w_mean.shape[0]:
        return None
    return w_mean, w_var, bias, running_mean, running_var



def _linear_weights(graph, node, const):
    """(W [O, I] for the mean, W for the variance or None, bias [O]) of a 1x1 Conv/Gemm/2-D MatMul."""
    op = node.op_type
    w = const(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    bias_name = node.input[2] if len(node.input) > 2 else ""
    if op == "Conv":
        if int(node_attr(node, "group", 1)) != 1 or w.ndim < 3 or w[0, 0].size != 1:
            return None  # k x k kernels: zero padding makes the border's mean differ from W_sum m (small maps)
        matrix = w.reshape(w.shape[0], w.shape[1])
        bias = const(bias_name) if bias_name else None
        return matrix, matrix, _bias(bias, matrix.shape[0])
    if op == "Gemm":
        if int(node_attr(node, "transA", 0)) or w.ndim != 2:
            return None
        matrix = (w if int(node_attr(node, "transB", 0)) else w.T) * float(node_attr(node, "alpha", 1.0))
        c = const(bias_name) if bias_name else None
        if c is not None and c.size not in (1, matrix.shape[0]):
            return None
        bias = None if c is None else float(node_attr(node, "beta", 1.0)) * c.reshape(-1)
        return matrix, matrix, _bias(bias, matrix.shape[0])
    if op == "MatMul" and w.ndim == 2 and len(graph.shape(node.input[0]) or ()) == 2:
        return w.T, w.T, np.zeros(w.shape[1])
    return None


def _bias(bias, size: int) -> np.ndarray:
    return np.zeros(size) if bias is None else np.broadcast_to(bias.reshape(-1), (size,)).astype(np.float64)


def fit_mean(mean: np.ndarray, w: np.ndarray, bias: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The mean closest to ``mean`` (ridge) whose image ``w m + bias`` is ``target``."""
    residual = target - bias - w @ mean
    if w.shape[0] <= w.shape[1]:
        gram = w @ w.T
        gram[np.diag_indices_from(gram)] += RIDGE * max(np.trace(gram) / len(gram), 1e-30)
        return mean + w.T @ np.linalg.solve(gram, residual)
    gram = w.T @ w
    gram[np.diag_indices_from(gram)] += RIDGE * max(np.trace(gram) / len(gram), 1e-30)
    return mean + np.linalg.solve(gram, w.T @ residual)


def fit_cov(cov: np.ndarray, w: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The covariance closest to ``cov`` (Frobenius, ridge) whose quadratic forms ``w_k^T S w_k`` are ``target``,
    kept positive semi-definite (eigenvalues floored at 1e-3 of the largest)."""
    residual = target - np.einsum("ki,ij,kj->k", w, cov, w)
    gram = w @ w.T
    system = gram * gram
    system[np.diag_indices_from(system)] += RIDGE * max(np.trace(system) / len(system), 1e-30)
    weights = np.linalg.solve(system, residual)
    updated = cov + (w.T * weights) @ w
    values, vectors = np.linalg.eigh(0.5 * (updated + updated.T))
    floor = 1e-3 * max(float(values.max()), 1e-30)
    return (vectors * np.maximum(values, floor)) @ vectors.T


def anchored(graph, tensor: str, mean: np.ndarray, cov: np.ndarray, const, fit_variance: bool = False
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """``tensor``'s channel moments corrected by every BatchNorm-anchored linear layer that reads it; None when no
    such layer does."""
    changed = False
    for node in graph.consumers.get(tensor, []):
        anchor = anchor_of(graph, node, tensor, const)
        if anchor is None or anchor[0].shape[1] != mean.size:
            continue
        w_mean, w_var, bias, running_mean, running_var = anchor
        mean = fit_mean(mean, w_mean, bias, running_mean)
        if fit_variance and w_var is not None and max(w_var.shape) <= MAX_WIDTH:
            cov = fit_cov(cov, w_var, running_var)
        changed = True
    return (mean, cov) if changed else None
