"""Data-free second moments: the mean and covariance of every layer's input channels, estimated from the model alone.

OBS needs, for each layer that consumes pruned channels, ``H = E[x x^T]`` over its input channels (pooled over
samples and positions) and the mean ``E[x]`` (the part a bias can absorb). Without data these are propagated
through the graph in topological order as a Gaussian description of each tensor along its *feature axes*
(a mean vector and a covariance matrix; every other axis is a sample or position that is pooled over):

* **Inputs**: an assumed prior, i.i.d. per element (mean 0, variance 1 by default: standardised inputs); a small
  input (at most 1024 values per sample) keeps all its non-batch axes as features, a larger one only its channels
  (axis 1, or the last axis of embeddings ``[batch, tokens, width]`` read by a MatMul or a LayerNorm).
  Integer inputs (token ids) carry nothing; their embedding ``Gather`` does (below).
* **Conv** (plain, grouped, depthwise): ``m_y = (sum_t W_t) m + b``; the covariance over output channels mixes two
  models of the spatial correlation of the input: taps independent, ``sum_t W_t S W_t^T``, and taps fully
  correlated, ``W_sum S W_sum^T``, with weight ``spatial`` = 0.5 (measured on the digits CNN at 3x fewer MACs:
  accuracy 0.81 / 0.95 / 0.93 / 0.95 / 0.29 for 0, 0.25, 0.5, 0.75, 1; the middle of the flat part). Stride and
  padding are ignored (pooled moments).
* **Gemm / MatMul with a constant weight**: exact, ``m_y = W^T m + b``, ``S_y = W^T S W``.
* **BatchNormalization** *anchors* the estimate: running_mean and running_var are the true (training-set) mean and
  variance of its input channels, so the propagated covariance only contributes its correlation matrix ``R``; the
  output is ``N(beta, diag(g) R diag(g))`` with ``g = gamma * sqrt(var / (var + eps))``. Errors made upstream (an
  input prior that is wrong, the spatial model) therefore never accumulate past a BatchNorm.
* **Elementwise activations** (ReLU, ReLU6/Clip, GELU and SiLU as their decomposed subgraphs, HardSwish, ...): a
  tensor computed elementwise from one Gaussian tensor ``u`` is kept as the function's values on a fine grid of
  ``u = mu + sigma z`` (z on [-8, 8], 1201 points with Gaussian weights, accurate at ReLU's kink); when a
  non-elementwise op needs it, its moments follow from Mehler's formula for jointly Gaussian ``(u_i, u_j)`` with
  correlation ``rho_ij``: ``Cov(f(u_i), f(u_j)) = sum_k a_ik a_jk rho_ij^k`` with the normalised Hermite
  coefficients ``a_ik = E[f(mu_i + sigma_i z) He_k(z)] / sqrt(k!)`` (k = 1..8), and the exact variance on the
  diagonal. For ReLU the first term is the linearisation ``P(u_i>0) P(u_j>0) Cov(u_i, u_j)``; the mean is the
  rectified-Gaussian mean ``mu Phi(mu/sigma) + sigma phi(mu/sigma)``. Measured: that first-order term alone
  (``hermite_terms=1``) loses to 8 terms at 3x fewer MACs (digits CNN 0.90 vs 0.93, digits transformer 0.20 vs
  0.63 accuracy).
* **Residual Add** of two tensors: independent sum. **Mul** of two tensors (gates): the product of independent
  vectors. Adding a constant with position axes (a positional embedding) adds its mean and its covariance over
  positions: the *positional structure* of a transformer's stream.
* **LayerNormalization**: centring ``P = I - 11^T/n`` and scaling by the expected per-token RMS,
  ``m = P m / s``, ``S = P S P / s^2`` with ``s^2 = (tr(P S P) + |P m|^2) / n``, then the affine ``gamma, beta``.
* **RMSNorm written as ops** (``x * 1/sqrt(mean(x^2) + eps)``, as torch exports it): the LayerNorm rule without
  centring (``s^2 = (tr S + |m|^2) / n + eps``); the scale that follows is an ordinary constant Mul.
* **Attention** (``softmax(QK^T) @ V``): a convex mix of V's rows over positions: V's mean, V's covariance.
* **Embedding Gather** from a constant table: the mean and covariance of the table's rows (uniform tokens).
* **Split** along a feature axis (a fused QKV projection): each part is its slice of the mean and covariance.
* **BatchNorm look-ahead** (``moment_anchors.py``): a tensor read by a 1x1 Conv / Gemm / 2-D MatMul whose output
  goes straight into a BatchNorm gets its mean re-fitted to that BatchNorm's running mean (least squares through the
  layer's weight; an expansion layer over-determines it). EfficientNet-Lite0, no data, top-1 agreement on real
  ImageNet images at 1.1x / 1.25x / 1.5x fewer MACs: 0.79 / 0.45 / 0.27 without, 0.81 / 0.61 / 0.36 with. Fitting
  the covariance to the running variances as well measured no better (0.78 / 0.60 / 0.39; digits CNN at 3x 0.89 vs
  0.92), so it is off by default (``look_ahead_variance``).
* **Global average pool**: the mean is kept; the covariance is scaled by ``pool_cov`` = 0.25, the share of the
  per-position variance that survives averaging over positions (measured on EfficientNet-Lite0's 7x7 head features
  with real images: 0.24; it was 1, i.e. fully correlated positions: 1.5x agreement 0.36 -> 0.44).
* **Pooling, Resize, Pad, Dropout**: moments unchanged; **Reshape, Flatten, Transpose, (Un)Squeeze**: the feature
  axes are followed through the reshape (axes split or merged wholly inside the features stay features).

Whatever cannot be followed yields no estimate; the consumer layer then falls back to ``H = I`` (OBS reduces to
the consumers' column norms and compensation to zero). ``estimate_moments`` returns, for each requested
(tensor, axis), ``(mean, second)`` with ``second = E[x x^T]`` in float64 (a ``Propagator`` made with ``spill_bytes``
returns those of that size or more as ``spc.weights.Spilled`` files, read back with ``spc.weights.loaded``: an LLM
has one 5632 x 5632 matrix per layer, 4 GB in all, needed again only when that layer is compensated). Only the
nodes the requested tensors depend on are propagated; covariances are freed after their last use (peak memory a few
n x n float64).

**Why this derivation** (measured, bench/README.md): BatchNorm anchoring is what makes data-free OBS work on CNNs
(without it the digits CNN at 2x fewer MACs falls from 0.991 to 0.72 accuracy); the input prior does not matter
once a BatchNorm follows. Transformers have no such anchor: the LayerNorm/positional propagation gets the
covariance roughly right but the per-channel means after a LayerNorm only loosely (the residual stream's mean
depends on the input distribution), which is where data-free OBS falls short of calibrated OBS there.

``Propagator.sensitivity()`` runs the linearised network backwards (diagonal: ``W^2`` through layers, ``E[f'^2]``
through activations, ``gamma^2 / var`` through BatchNorm) to give each channel's weight at the outputs; OBSPA can
weight its costs by it (``weighting="sensitivity"``), which measured no better than BatchNorm weighting.

The package: ``gaussian.py`` (the Gaussian and elementwise-function descriptions of a tensor, Mehler's formula),
``propagator.py`` (the graph walk, the BatchNorm look-ahead, the backward sensitivity pass, and the table of op
rules), and the rules themselves, one file per op family: ``linear.py`` (Conv, Gemm, MatMul), ``norms.py``
(BatchNorm, Instance/GroupNorm, LayerNorm, RMSNorm as ops), ``elementwise.py`` (unary functions, binary ops with a
constant or another tensor, positional embeddings), ``shapes.py`` (reshapes, transposes, pooling, Gather, Split,
Concat). Adding an op: a method in its family's file and one entry in ``propagator.RULES``.
"""

from .gaussian import (BASIS, GRID, HERMITE_TERMS, WEIGHTS, Func, Gauss, _sandwich, _second, as_func, marginal,
                       materialise)
from .propagator import (MAX_INPUT_FEATURES, SPILL_BYTES, MomentOptions, Propagator, channel_sensitivity,
                         estimate_moments)

__all__ = ["BASIS", "GRID", "HERMITE_TERMS", "MAX_INPUT_FEATURES", "SPILL_BYTES", "WEIGHTS", "Func", "Gauss",
           "MomentOptions", "Propagator", "_sandwich", "_second", "as_func", "channel_sensitivity", "estimate_moments",
           "marginal", "materialise"]
