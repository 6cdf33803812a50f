"""OBS-compensated block sparsity: zero a layer's cheapest weight blocks and re-fit the rest of each row.

``--speedup --sparse-layers`` lets the planner run some layers with block-sparse (BSR) kernels; ``sparsify.py``
zeroes the blocks of least magnitude and changes nothing else, which cost the trained digits CNN its accuracy
(0.996 -> 0.63 at batch 8). With the layer's input second moments ``H = E[x x^T]`` (OBSPA's data-free ones, or
calibrated OBS's) the same budget costs far less, as in SparseGPT (Frantar & Alistarh, 2023):

* **Which blocks**: a block's OBS saliency, ``sum_r w_rc^2 / (H^-1)_cc`` over its weights (the error each causes
  alone when the rest of its row is re-fitted), ranked with ``sparsify.block_mask`` on ``W / sqrt(diag H^-1)``, so
  the count and the layout are exactly those ``compile_model`` zeroes (it then finds the zeroed blocks first).
* **Compensation**: the rows of a block share their support, so each block row is re-fitted by least squares over
  all its kept weights at once (the OBS update for a set ``R``: ``delta = -H^-1[:, R] (H^-1_RR)^-1 w_R``). Layers
  wider than 2048 inputs use SparseGPT's column sweep instead (each removal's error goes only to later columns:
  one factorisation for all rows; on a 48-input test layer it leaves 4x the exact fit's error, still less than
  zeroing alone).

Convolutions use ``H`` over (input channel, kernel tap) as the Kronecker product of the channel moments and a tap
correlation of ``spatial`` (0.5, OBSPA's conv model). Damping ``1e-2 x mean(diag H)``, float64.
"""

from __future__ import annotations

import copy

import numpy as np
from onnx import numpy_helper
from scipy.linalg import cho_factor, cho_solve, cholesky

from spc.graph import node_attr

from .obs_algebra import spd_inverse
from .sparsify import _out_in_view, block_mask

LAZY_COLUMNS = 128
EXACT_MAX = 2048  # inputs up to which each block row is re-fitted exactly (a solve of its removed weights)


def tap_hessian(channels: np.ndarray, taps: int, spatial: float = 0.5) -> np.ndarray:
    """``H`` over a conv weight's (channel, tap) columns, in the order ``W.reshape(out, -1)`` lays them out."""
    if taps == 1:
        return channels
    taps_corr = (1.0 - spatial) * np.eye(taps) + spatial * np.ones((taps, taps))
    return np.kron(channels, taps_corr)


def obs_block_sparsify(w_out_in: np.ndarray, fraction: float, block: tuple[int, int], hessian: np.ndarray,
                       damp: float = 1e-2) -> np.ndarray:
    """``w_out_in`` [out, in] with ``round(fraction * blocks)`` blocks zeroed and the rest compensated."""
    w = np.array(w_out_in, dtype=np.float64)
    n = w.shape[1]
    h = np.array(hessian, dtype=np.float64)
    h[np.diag_indices(n)] += damp * max(float(np.mean(np.diag(h))), 1e-12)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    hinv = spd_inverse(h)
    keep = block_mask(w / np.sqrt(np.diag(hinv))[None, :], fraction, block)
    if n <= EXACT_MAX:
        return _exact(w, keep, hinv, block[0])
    return _sequential(w, keep, hinv)


def block_cost(w_out_in: np.ndarray, fraction: float, block: tuple[int, int], channels: np.ndarray, taps: int = 1,
               row_weight: np.ndarray | None = None, spatial: float = 0.5) -> float:
    """What zeroing ``fraction`` of the blocks costs after the re-fit, in OBSPA's cost units: the energy of the
    change of the layer's output, ``sum_r s_r^2 dW_r (I_taps (x) H) dW_r^T`` (``s``: the BatchNorm weighting of each
    output row that OBSPA's channel costs carry; taps independent, as OBSPA's conv costs take them), so that the
    latency planner can weigh zeroed blocks against removed channels on one scale."""
    if fraction <= 0:
        return 0.0
    old = np.asarray(w_out_in, dtype=np.float64)
    delta = obs_block_sparsify(old, fraction, block, tap_hessian(channels, taps, spatial)) - old
    if row_weight is not None:
        delta = delta * np.asarray(row_weight, dtype=np.float64)[:, None]
    per_tap = delta.reshape(delta.shape[0], -1, taps)  # [rows, channels, taps], taps fastest as in W.reshape
    return float(np.einsum("rct,cd,rdt->", per_tap, np.asarray(channels, dtype=np.float64), per_tap))


def _exact(w: np.ndarray, keep: np.ndarray, hinv: np.ndarray, rows_per_block: int) -> np.ndarray:
    """Least squares over all kept weights of each block row (they share one support): with removed set R,
    ``delta = -H^-1[:, R] (H^-1_RR)^-1 w_R``, which zeroes ``w_R`` and re-fits every kept weight."""
    for start in range(0, w.shape[0], rows_per_block):
        rows = slice(start, min(start + rows_per_block, w.shape[0]))
        removed = np.flatnonzero(~keep[start])
        if removed.size == 0:
            continue
        block = hinv[np.ix_(removed, removed)]
        coeff = cho_solve(cho_factor(block, lower=True, check_finite=False), w[rows][:, removed].T,
                          check_finite=False)  # [R, rows]
        w[rows] -= (hinv[:, removed] @ coeff).T
        w[rows, removed] = 0.0
    return w


def _sequential(w: np.ndarray, keep: np.ndarray, hinv: np.ndarray) -> np.ndarray:
    """SparseGPT's column sweep: each removed weight's error goes to the row's later columns through the upper
    Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), in lazy batches of columns; one factorisation for all
    rows, O(rows x n^2), for layers too wide for the exact fit."""
    n = w.shape[1]
    upper = cholesky(0.5 * (hinv + hinv.T), lower=False, check_finite=False)
    for start in range(0, n, LAZY_COLUMNS):
        stop = min(start + LAZY_COLUMNS, n)
        part, errors = w[:, start:stop].copy(), np.zeros((w.shape[0], stop - start))
        u = upper[start:stop, start:stop]
        for j in range(stop - start):
            gone = ~keep[:, start + j]
            if not gone.any():
                continue
            err = np.where(gone, part[:, j], 0.0) / u[j, j]
            part[:, j:] -= np.outer(err, u[j, j:])
            part[gone, j] = 0.0
            errors[:, j] = err
        w[:, start:stop] = part
        if stop < n:
            w[:, stop:] -= errors @ upper[start:stop, stop:]
    w[~keep] = 0.0
    return w


def compensated_sparsity(model, fractions: dict[str, float], hessian_of, block: tuple[int, int] = (4, 1),
                         spatial: float = 0.5):
    """A copy of ``model`` whose weights named in ``fractions`` are block-sparse and OBS-compensated;
    ``hessian_of(node)`` gives ``E[x x^T]`` over the node's input channels, or None (then blocks are zeroed by
    magnitude alone, as compile_model would). Returns (model, names of the weights compensated)."""
    model = copy.deepcopy(model)
    inits = {init.name: init for init in model.graph.initializer}
    done = []
    for node in model.graph.node:
        name = node.input[1] if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 else None
        if name not in fractions or name not in inits or name in done or fractions[name] <= 0:
            continue
        if node.op_type == "Conv" and node_attr(node, "group", 1) != 1:
            continue
        weight = numpy_helper.to_array(inits[name])
        view = _out_in_view(node, weight)
        channels = hessian_of(node)
        if view is None or channels is None:
            continue
        taps = int(np.prod(weight.shape[2:])) if node.op_type == "Conv" else 1
        hessian = tap_hessian(np.asarray(channels, dtype=np.float64), taps, spatial)
        if hessian.shape != (view[0].shape[1],) * 2:
            continue
        new = obs_block_sparsify(view[0], fractions[name], block, hessian).astype(weight.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(view[1](new), name))
        done.append(name)
    return model, done
