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
has one 5632 x 5632 matrix per layer, 4 GB in all, needed again only when that layer is compensated). Only the nodes the requested tensors
depend on are propagated; covariances are freed after their last use (peak memory a few n x n float64).

**Why this derivation** (measured, bench/README.md): BatchNorm anchoring is what makes data-free OBS work on CNNs
(without it the digits CNN at 2x fewer MACs falls from 0.991 to 0.72 accuracy); the input prior does not matter
once a BatchNorm follows. Transformers have no such anchor: the LayerNorm/positional propagation gets the
covariance roughly right but the per-channel means after a LayerNorm only loosely (the residual stream's mean
depends on the input distribution), which is where data-free OBS falls short of calibrated OBS there.

``Propagator.sensitivity()`` runs the linearised network backwards (diagonal: ``W^2`` through layers, ``E[f'^2]``
through activations, ``gamma^2 / var`` through BatchNorm) to give each channel's weight at the outputs; OBSPA can
weight its costs by it (``weighting="sensitivity"``), which measured no better than BatchNorm weighting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf

from spc.graph import Graph, node_attr
from spc.weights import SPOOL, Spilled

from .moment_anchors import anchored

GRID = np.linspace(-8.0, 8.0, 1201)
_W = np.exp(-0.5 * GRID**2)
WEIGHTS = _W / _W.sum()
HERMITE_TERMS = 8
MAX_INPUT_FEATURES = 1024
SPILL_BYTES = 16 << 20  # OBSPA spills second moments this large (n >= 1449) until it uses them


def _hermite_basis(order: int) -> np.ndarray:
    """Normalised probabilists' Hermite polynomials He_k(z)/sqrt(k!) on GRID, k = 0..order: [order+1, Q]."""
    basis = np.zeros((order + 1, GRID.size))
    basis[0] = 1.0
    if order >= 1:
        basis[1] = GRID
    for k in range(2, order + 1):  # He_k = z He_{k-1} - (k-1) He_{k-2}, then normalise
        basis[k] = GRID * basis[k - 1] * np.sqrt(1.0 / k) - basis[k - 2] * np.sqrt((k - 1) / k)
    return basis


BASIS = _hermite_basis(HERMITE_TERMS)


@dataclass
class MomentOptions:
    input_mean: float = 0.0
    input_std: float = 1.0
    spatial: float = 0.5  # weight of the fully-correlated-taps model in Conv covariance
    attention_mix: float = 1.0  # covariance kept by an attention average over positions
    pool_cov: float = 0.25  # covariance kept by a global average pool (measured, see the module docstring)
    anchor_bn: bool = True
    look_ahead: bool = True  # correct a tensor's moments by the BatchNorm after the linear layer reading it
    look_ahead_variance: bool = False  # ... its variances too (measured no better, moment_anchors.py)
    pool_sensitivity: float = 0.5  # error energy a global average keeps (spatially correlated errors: 1)
    hermite_terms: int = HERMITE_TERMS


@dataclass
class Gauss:
    """Moments of a tensor along ``axes`` (sorted; features flattened row-major in that order)."""

    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    mean: np.ndarray
    cov: np.ndarray
    name: str | None = None  # the tensor it was first computed for (the base of elementwise functions)

    @property
    def width(self) -> int:
        return int(np.prod(self.sizes, dtype=np.int64)) if self.sizes else 1

    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.diag(self.cov), 1e-24))

    def second(self) -> np.ndarray:
        return self.cov + np.outer(self.mean, self.mean)


@dataclass
class Func:
    """A tensor computed elementwise from the Gaussian ``base``: its values on ``base.mean + base.std * GRID``."""

    base: Gauss
    values: np.ndarray  # [F, Q]
    cache: dict = field(default_factory=dict)

    @property
    def axes(self):
        return self.base.axes

    @property
    def sizes(self):
        return self.base.sizes


def materialise(state, terms: int = HERMITE_TERMS) -> Gauss | None:
    """Mean and covariance of a Func through Mehler's formula (exact variance on the diagonal)."""
    if state is None or isinstance(state, Gauss):
        return state
    if "gauss" in state.cache:
        return state.cache["gauss"]
    base, values = state.base, state.values
    mean = values @ WEIGHTS
    variance = np.maximum((values**2) @ WEIGHTS - mean**2, 0.0)
    coeffs = (values * WEIGHTS) @ BASIS[1:terms + 1].T  # [F, K]
    std = base.std()
    width = std.size
    cov = np.empty((width, width))
    block = 512  # rows at a time: the temporaries stay block x F
    for start in range(0, width, block):
        stop = min(start + block, width)
        rho = np.clip(base.cov[start:stop] / np.outer(std[start:stop], std), -1.0, 1.0)
        power = rho.copy()
        out = cov[start:stop]
        np.multiply(np.outer(coeffs[start:stop, 0], coeffs[:, 0]), power, out=out)
        for k in range(1, terms):
            power *= rho
            out += np.outer(coeffs[start:stop, k], coeffs[:, k]) * power
    np.fill_diagonal(cov, variance)
    result = Gauss(base.axes, base.sizes, mean, cov)
    state.cache["gauss"] = result
    return result


def as_func(state) -> Func | None:
    if state is None:
        return None
    if isinstance(state, Func):
        return state
    return Func(state, state.mean[:, None] + state.std()[:, None] * GRID[None, :])


def marginal(state: Gauss | None, keep: tuple[int, ...]) -> Gauss | None:
    """Pool the moments over every feature axis not in ``keep`` (those become positions)."""
    if state is None:
        return None
    keep = tuple(sorted(keep))
    if keep == state.axes:
        return state
    if not set(keep) <= set(state.axes):
        return None
    kept_pos = [state.axes.index(a) for a in keep]
    drop_pos = [i for i in range(len(state.axes)) if i not in kept_pos]
    order = drop_pos + kept_pos
    d = int(np.prod([state.sizes[i] for i in drop_pos], dtype=np.int64)) if drop_pos else 1
    k = int(np.prod([state.sizes[i] for i in kept_pos], dtype=np.int64)) if kept_pos else 1
    rank = len(state.sizes)
    mean = state.mean.reshape(state.sizes).transpose(order).reshape(d, k)
    cov = state.cov.reshape(state.sizes + state.sizes)
    cov = cov.transpose(order + [rank + i for i in order]).reshape(d, k, d, k)
    second = np.einsum("akal->kl", cov) / d + mean.T @ mean / d
    new_mean = mean.mean(axis=0)
    return Gauss(keep, tuple(state.sizes[i] for i in kept_pos), new_mean,
                 _sym(second - np.outer(new_mean, new_mean)))


def _sym(matrix: np.ndarray) -> np.ndarray:
    return _sym_inplace(np.array(matrix, dtype=np.float64))  # a private copy, symmetrised in place


def _sym_inplace(matrix: np.ndarray, block: int = 512) -> np.ndarray:
    """(M + M^T) / 2 over M itself, a pair of blocks at a time (``M += M.T`` would copy all of M first)."""
    n = matrix.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            mean = matrix[i:i + block, j:j + block] + matrix[j:j + block, i:i + block].T
            mean *= 0.5
            matrix[i:i + block, j:j + block] = mean
            matrix[j:j + block, i:i + block] = mean.T
    return matrix


def _sandwich(w: np.ndarray, mean: np.ndarray, cov: np.ndarray, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """w^T mean and symmetrised w^T cov w in float64, a block of outputs at a time: no n x n temporary besides the
    result, and a float32 ``w`` is converted a block at a time (never a float64 copy of all of it)."""
    width = w.shape[1]
    out, new_mean = np.empty((width, width)), np.empty(width)
    for start in range(0, width, block):
        columns = w[:, start:start + block].astype(np.float64)
        new_mean[start:start + block] = columns.T @ mean
        left = columns.T @ cov
        if w.dtype == np.float64:
            np.dot(left, w, out=out[start:start + block])
            continue
        for other in range(0, width, block):
            out[start:start + block, other:other + block] = left @ w[:, other:other + block].astype(np.float64)
    return new_mean, _sym_inplace(out)


def _second(gauss: Gauss, spill_bytes: int | None, block: int = 512):
    """E[x x^T] = cov + m m^T, written a block of rows at a time: in memory, or (``spill_bytes`` or more) straight
    to a .npy file in the spool folder, so the n x n matrix is never copied whole."""
    n = gauss.mean.size
    if spill_bytes is None or n * n * 8 < spill_bytes:
        second = np.array(gauss.cov, dtype=np.float64)
        for start in range(0, n, block):
            second[start:start + block] += np.outer(gauss.mean[start:start + block], gauss.mean)
        return second
    path = SPOOL.scratch(".npy")
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)),
                                                      "fortran_order": False, "shape": (n, n)})
        for start in range(0, n, block):
            rows = np.array(gauss.cov[start:start + block], dtype=np.float64)
            rows += np.outer(gauss.mean[start:start + block], gauss.mean)
            rows.tofile(handle)
    return Spilled(path, (n, n))


def _corr(cov: np.ndarray) -> np.ndarray:
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    ok = std > 1e-12
    rho = np.eye(cov.shape[0])
    if ok.any():
        sub = cov[np.ix_(ok, ok)] / np.outer(std[ok], std[ok])
        rho[np.ix_(ok, ok)] = np.clip(sub, -1.0, 1.0)
        np.fill_diagonal(rho, 1.0)
    return rho


# --------------------------------------------------------------------------------------------- elementwise

def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def _unary(node, v: np.ndarray, const) -> np.ndarray | None:
    op = node.op_type
    if op in ("Identity", "Dropout", "Cast"):
        return v
    if op == "Relu":
        return np.maximum(v, 0.0)
    if op == "LeakyRelu":
        alpha = node_attr(node, "alpha", 0.01)
        return np.where(v > 0, v, alpha * v)
    if op == "Clip":
        lo = const(node.input[1]) if len(node.input) > 1 and node.input[1] else node_attr(node, "min")
        hi = const(node.input[2]) if len(node.input) > 2 and node.input[2] else node_attr(node, "max")
        if (len(node.input) > 1 and node.input[1] and lo is None) or (len(node.input) > 2 and node.input[2]
                                                                       and hi is None):
            return None
        out = v
        if lo is not None:
            out = np.maximum(out, float(np.asarray(lo)))
        if hi is not None:
            out = np.minimum(out, float(np.asarray(hi)))
        return out
    if op == "Sigmoid":
        return _sigmoid(v)
    if op == "Tanh":
        return np.tanh(v)
    if op == "Erf":
        return erf(v)
    if op == "Exp":
        return np.exp(np.minimum(v, 50.0))
    if op == "Abs":
        return np.abs(v)
    if op == "Neg":
        return -v
    if op == "Sqrt":
        return np.sqrt(np.maximum(v, 0.0))
    if op == "Reciprocal":
        return 1.0 / np.where(np.abs(v) < 1e-6, 1e-6, v)
    if op == "Softplus":
        return np.logaddexp(0.0, v)
    if op == "Elu":
        alpha = node_attr(node, "alpha", 1.0)
        return np.where(v > 0, v, alpha * np.expm1(np.minimum(v, 0.0)))
    if op == "Selu":
        alpha = node_attr(node, "alpha", 1.67326319217681884765625)
        gamma = node_attr(node, "gamma", 1.05070102214813232421875)
        return gamma * np.where(v > 0, v, alpha * np.expm1(np.minimum(v, 0.0)))
    if op == "HardSigmoid":
        alpha, beta = node_attr(node, "alpha", 0.2), node_attr(node, "beta", 0.5)
        return np.clip(alpha * v + beta, 0.0, 1.0)
    if op == "HardSwish":
        return v * np.clip(v / 6.0 + 0.5, 0.0, 1.0)
    if op == "Gelu":
        if node_attr(node, "approximate", "none") == "tanh":
            return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
        return 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))
    if op == "Mish":
        return v * np.tanh(np.logaddexp(0.0, v))
    if op in ("Swish", "SiLU"):
        return v * _sigmoid(v)
    if op == "Softsign":
        return v / (1 + np.abs(v))
    if op == "Floor":
        return np.floor(v)
    if op == "Ceil":
        return np.ceil(v)
    if op == "Round":
        return np.round(v)
    if op == "Sign":
        return np.sign(v)
    if op == "Log":
        return np.log(np.maximum(v, 1e-12))
    return None


UNARY_OPS = {"Identity", "Dropout", "Cast", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Erf", "Exp", "Abs",
             "Neg", "Sqrt", "Reciprocal", "Softplus", "Elu", "Selu", "HardSigmoid", "HardSwish", "Gelu", "Mish",
             "Swish", "SiLU", "Softsign", "Floor", "Ceil", "Round", "Sign", "Log"}
BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": None, "Pow": None, "Max": np.maximum,
          "Min": np.minimum, "PRelu": None}


def _binary(op: str, a, b):
    if op == "Div":
        return a / np.where(np.abs(b) < 1e-12, 1e-12, b)
    if op == "Pow":
        return np.sign(a) * np.abs(a) ** b if np.all(np.asarray(b) == np.round(b)) else np.abs(a) ** b
    if op == "PRelu":
        return np.where(a > 0, a, b * a)
    return BINARY[op](a, b)


# --------------------------------------------------------------------------------------------- propagation
class Propagator:
    def __init__(self, graph: Graph, options: MomentOptions | None = None, spill_bytes: int | None = None,
                 keep_backward: bool = True):
        self.graph = graph
        self.spill_bytes = spill_bytes
        self.keep_backward = keep_backward
        self.options = options or MomentOptions()
        self.states: dict[str, object] = {}
        self._symbols: dict[str, int] = {}
        self.layout: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.func_base: dict[str, tuple[str, np.ndarray]] = {}
        self.backward: dict[str, object] = {}
        self._node_name = ""

    # shapes with symbolic sizes turned into distinct large numbers, so reshapes can be matched
    def shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.graph.shape(name)
        if shape is None:
            return None
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append(d)
            else:
                out.append(self._symbols.setdefault(d, 1_000_003 + 2 * len(self._symbols)))
        return tuple(out)

    def const(self, name: str):
        if not name:
            return None
        value = self.graph.weight(name)
        return None if value is None else np.asarray(value, dtype=np.float64)

    def run(self, wanted: list[tuple[str, int]], everything: bool = False
            ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        """Propagate in graph order; only the nodes the wanted tensors depend on, unless ``everything`` (which the
        sensitivity pass needs)."""
        graph = self.graph
        needed = {tensor for tensor, _ in wanted}
        if not everything:
            for node in reversed(graph.nodes):
                if any(out in needed for out in node.output):
                    needed.update(name for name in node.input if name)
        wanted_by_tensor: dict[str, list[int]] = {}
        for tensor, axis in wanted:
            wanted_by_tensor.setdefault(tensor, []).append(axis)
        uses: dict[str, int] = {}
        for node in graph.nodes:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        results: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

        def record(name: str):
            for axis in wanted_by_tensor.get(name, []):
                state = self.states.get(name)
                gauss = marginal(materialise(state, self.options.hermite_terms), (axis,))
                if gauss is not None:
                    results[(name, axis)] = (gauss.mean.copy(), _second(gauss, self.spill_bytes))

        for name in graph.inputs:
            self.states[name] = self._look_ahead(name, self._input(name))
            self._remember(name, self.states[name])
            record(name)
        for node in graph.nodes:
            self._node_name = node.name
            if not everything and not any(out in needed for out in node.output):
                continue
            try:
                outputs = self._node(node)
            except Exception:  # an estimate that cannot be made is no estimate, never a failure
                outputs = None
            for index, out in enumerate(node.output):
                if not out:
                    continue
                state = outputs[index] if outputs is not None and index < len(outputs) else None
                state = self._look_ahead(out, state)
                self.states[out] = state
                self._remember(out, state)
                record(out)
            for name in node.input:
                uses[name] -= 1
                if uses[name] == 0 and name in self.states and name not in graph.outputs:
                    del self.states[name]
        if not everything:
            self.states.clear()
        return results

    def _look_ahead(self, name: str, state):
        """``state`` corrected by the BatchNorm-anchored layers that read it (moment_anchors.py). A function of a
        Gaussian is only replaced by its moments when nothing elementwise reads it (that needs the function)."""
        if not self.options.look_ahead or state is None or tuple(state.axes) != (1,):
            return state
        readers = self.graph.consumers.get(name, [])
        if not any(node.op_type in ("Conv", "Gemm", "MatMul") for node in readers):
            return state
        if isinstance(state, Func) and any(node.op_type not in ("Conv", "Gemm", "MatMul") for node in readers):
            return state
        try:
            gauss = materialise(state, self.options.hermite_terms)
            found = anchored(self.graph, name, gauss.mean, gauss.cov, self.const, self.options.look_ahead_variance)
        except (ValueError, np.linalg.LinAlgError):  # a correction that cannot be made leaves the estimate as it is
            return state
        if found is None or not (np.all(np.isfinite(found[0])) and np.all(np.isfinite(found[1]))):
            return state
        return Gauss(gauss.axes, gauss.sizes, found[0], _sym(found[1]), gauss.name)

    def _remember(self, name: str, state) -> None:
        """Keep what the backward (sensitivity) pass needs: each tensor's feature layout, and for a tensor computed
        elementwise from a Gaussian base, E[(d out / d base)^2] per feature."""
        if state is None:
            return
        self.layout[name] = (tuple(state.axes), tuple(state.sizes))
        if isinstance(state, Gauss):
            if state.name is None:
                state.name = name
            elif state.name != name:  # the same moments under another name (Identity, Dropout)
                source = state.name
                self.backward[f"@alias/{name}"] = (name, lambda s, src=source, ax=state.axes, sz=state.sizes:
                                                   [(src, ax, sz, s)])
        elif isinstance(state, Func) and state.base.name is not None:
            slope = np.gradient(state.values, GRID, axis=1) / state.base.std()[:, None]
            self.func_base[name] = (state.base.name, (slope**2) @ WEIGHTS)

    def _back(self, node, fn) -> None:
        """Register the backward rule of ``node``: its first output's sensitivity -> [(input, axes, sizes, s)].
        Kept only for ``sensitivity()``: the rules of linear layers hold their squared weights (float64), which
        over a whole network is twice the model's size."""
        if self.keep_backward:
            self.backward[node.name] = (node.output[0], fn)

    def sensitivity(self) -> dict[str, np.ndarray]:
        """Per-feature sensitivity of every tensor: the output energy that unit-variance, independent errors on a
        feature would cause at the graph outputs, through the linearised network (diagonal approximation)."""
        sens: dict[str, np.ndarray] = {}
        for name in self.graph.outputs:
            if name in self.layout:
                axes, sizes = self.layout[name]
                sens[name] = np.ones(int(np.prod(sizes, dtype=np.int64)) if sizes else 1)
        by_output: dict[str, list] = {}
        for key, (out, fn) in self.backward.items():
            by_output.setdefault(out, []).append(fn)
        producer_order = {}
        for index, node in enumerate(self.graph.nodes):
            for out in node.output:
                producer_order[out] = index
        tensors = sorted(self.layout, key=lambda t: producer_order.get(t, -1), reverse=True)
        for name in tensors:
            s = sens.get(name)
            if s is None:
                continue
            if name in self.func_base:
                base, g = self.func_base[name]
                axes, sizes = self.layout[name]
                self._accumulate(sens, base, axes, sizes, s * g)
                continue
            for fn in by_output.get(name, []):
                try:
                    contributions = fn(s)
                except Exception:
                    contributions = []
                for target, axes, sizes, value in contributions:
                    self._accumulate(sens, target, tuple(axes), tuple(sizes), value)
        return sens

    def _accumulate(self, sens, name, axes, sizes, value) -> None:
        layout = self.layout.get(name)
        if layout is None or value is None:
            return
        to_axes, to_sizes = layout
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if (to_axes, to_sizes) != (axes, sizes):
            if not set(axes) <= set(to_axes) or any(to_sizes[to_axes.index(a)] != z for a, z in zip(axes, sizes)):
                return
            shape = [to_sizes[i] if a in axes else 1 for i, a in enumerate(to_axes)]
            value = np.broadcast_to(value.reshape(shape), to_sizes).reshape(-1)
        if name in sens:
            sens[name] = sens[name] + value
        else:
            sens[name] = value.copy()

    def _input(self, name: str):
        shape = self.shape(name)
        dtype = self.graph.dtypes.get(name)
        if shape is None or len(shape) < 2 or dtype not in (1, 10, 11, 16):
            return None
        rest = shape[1:]
        if any(d >= 1_000_003 for d in rest):
            return None
        total = int(np.prod(rest, dtype=np.int64))
        axes = tuple(range(1, len(shape))) if total <= MAX_INPUT_FEATURES else (self._channel_axis(name, len(shape)),)
        sizes = tuple(shape[a] for a in axes)
        width = int(np.prod(sizes, dtype=np.int64))
        opt = self.options
        return Gauss(axes, sizes, np.full(width, opt.input_mean), np.eye(width) * opt.input_std**2)

    def _channel_axis(self, name: str, rank: int) -> int:
        """The axis of a model input that its layers read as channels: the last one where a MatMul contracts it
        or a LayerNorm normalises it (embeddings [batch, tokens, width]), else 1 (NCHW images, [N, C, L])."""
        for node in self.graph.consumers.get(name, []):
            if node.op_type == "MatMul" and node.input[0] == name:
                return rank - 1
            if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
                return int(node_attr(node, "axis", -1)) % rank
        return 1

    def get(self, name: str):
        return self.states.get(name) if name else None

    def gauss(self, name: str) -> Gauss | None:
        state = self.get(name)
        if isinstance(state, Func):
            gauss = materialise(state, self.options.hermite_terms)
            self.states[name] = gauss
            return gauss
        return state

    # ------------------------------------------------------------------------------------------ per node
    def _node(self, node) -> list | None:
        op = node.op_type
        if op in ("Conv",):
            return [self._conv(node)]
        if op == "Gemm":
            return [self._gemm(node)]
        if op == "MatMul":
            return [self._matmul(node)]
        if op == "BatchNormalization":
            return [self._batch_norm(node)]
        if op in ("InstanceNormalization", "GroupNormalization"):
            return [self._instance_norm(node)]
        if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            return [self._layer_norm(node)]
        if op in UNARY_OPS:
            return [self._unary(node)]
        if op in BINARY:
            return [self._binary(node)]
        if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            return [self._reshape(node)]
        if op == "Transpose":
            return [self._transpose(node)]
        if op in ("MaxPool", "AveragePool", "Resize", "Upsample", "Pad", "LpPool"):
            state = self.gauss(node.input[0])
            out = marginal(state, (1,)) if state is not None and 1 in state.axes else None
            if out is not None:
                self._back(node, lambda s, xn=node.input[0], ax=out.axes, sz=out.sizes: [(xn, ax, sz, s)])
            return [out]
        if op in ("GlobalAveragePool", "GlobalMaxPool"):
            return [self._global_pool(node)]
        if op in ("ReduceMean",):
            return [self._reduce_mean(node)]
        if op == "Gather":
            return [self._gather(node)]
        if op == "Concat":
            return [self._concat(node)]
        if op == "Split":
            return self._split(node)
        return None

    def _conv(self, node):
        x = self.gauss(node.input[0])
        w = self.const(node.input[1])
        if w is None or x is None or 1 not in x.axes:
            return None
        x = marginal(x, (1,))
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        groups = int(node_attr(node, "group", 1))
        out_ch, per_in = w.shape[0], w.shape[1]
        taps = int(np.prod(w.shape[2:], dtype=np.int64))
        rho = self.options.spatial
        w3 = w.reshape(out_ch, per_in, taps)
        if groups == 1:
            wsum = w3.sum(axis=2)
            mean = wsum @ x.mean
            if taps == 1:
                cov = wsum @ x.cov @ wsum.T
            else:  # float32 for the big products: an estimate, not an exact quantity
                wt = w3.transpose(2, 0, 1).astype(np.float32)  # [T, O, I]
                a = (wt @ x.cov.astype(np.float32)).transpose(1, 0, 2).reshape(out_ch, taps * per_in)
                indep = (a @ wt.transpose(1, 0, 2).reshape(out_ch, taps * per_in).T).astype(np.float64)
                full = wsum @ x.cov @ wsum.T
                cov = (1 - rho) * indep + rho * full
        else:
            per_out = out_ch // groups
            in_index = (np.arange(out_ch) // per_out)[:, None] * per_in + np.arange(per_in)[None, :]  # [O, per_in]
            wsum = w3.sum(axis=2)
            mean = (wsum * x.mean[in_index]).sum(axis=1)
            if per_in == 1:  # depthwise (possibly with a channel multiplier)
                src = in_index[:, 0]
                wmat = w3[:, 0, :]
                mix = (1 - rho) * (wmat @ wmat.T) + rho * np.outer(wsum[:, 0], wsum[:, 0])
                cov = x.cov[np.ix_(src, src)] * mix
            else:
                cov = np.zeros((out_ch, out_ch))
                pairs = groups * groups <= 1024
                for g in range(groups):
                    rows = slice(g * per_out, (g + 1) * per_out)
                    ins = slice(g * per_in, (g + 1) * per_in)
                    for h in range(groups) if pairs else (g,):
                        rows_h = slice(h * per_out, (h + 1) * per_out)
                        ins_h = slice(h * per_in, (h + 1) * per_in)
                        s = x.cov[ins, ins_h]
                        indep = sum(w3[rows, :, t] @ s @ w3[rows_h, :, t].T for t in range(taps))
                        full = wsum[rows] @ s @ wsum[rows_h].T
                        cov[rows, rows_h] = (1 - rho) * indep + rho * full
        if b is not None:
            mean = mean + b
        sq = (1 - rho) * (w3**2).sum(axis=2) + rho * w3.sum(axis=2) ** 2  # [O, per_in]
        if groups == 1:
            self._back(node, lambda s, xn=node.input[0], sq=sq, ax=x.axes, sz=x.sizes: [(xn, ax, sz, sq.T @ s)])
        else:
            self._back(node, lambda s, xn=node.input[0], sq=sq, idx=in_index, ax=x.axes, sz=x.sizes, w=x.width: [
                (xn, ax, sz, np.bincount(idx.reshape(-1), weights=(sq * s[:, None]).reshape(-1), minlength=w))])
        return Gauss((1,), (out_ch,), mean, _sym(cov))

    def _linear(self, x: Gauss, w: np.ndarray, b, axis: int, node=None) -> Gauss:
        """x's feature ``axis`` contracted with w [K, N] (the output's same axis has N features)."""
        if node is not None and self.keep_backward:  # w**2 is n x n: made only when it is kept
            w2 = np.asarray(w, dtype=np.float64) ** 2
            self._back(node, lambda s, xn=node.input[0], w2=w2, ax=x.axes, sz=x.sizes: [(xn, ax, sz, w2 @ s)])
        mean, cov = _sandwich(w, x.mean, x.cov)
        if b is not None:
            mean = mean + b
        return Gauss((axis,), (w.shape[1],), mean, cov)

    def _gemm(self, node):
        a, b = node.input[0], node.input[1]
        wb = self.graph.weight(b)  # in its own precision: _linear converts it a block at a time
        x = self.gauss(a)
        if wb is None or x is None or int(node_attr(node, "transA", 0)) or 1 not in x.axes:
            return None
        x = marginal(x, (1,))
        w = wb.T if int(node_attr(node, "transB", 0)) else wb
        alpha, beta = float(node_attr(node, "alpha", 1.0)), float(node_attr(node, "beta", 1.0))
        c = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = None
        if c is not None:
            if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return None
            bias = beta * np.broadcast_to(c.reshape(-1), (w.shape[1],))
        return self._linear(x, alpha * w.astype(np.float64) if alpha != 1.0 else w, bias, 1, node)

    def _matmul(self, node):
        a, b = node.input[0], node.input[1]
        wb = self.graph.weight(b)  # in its own precision: _linear converts it a block at a time
        out_shape = self.shape(node.output[0])
        if wb is not None and wb.ndim == 2:
            x = self.gauss(a)
            rank = len(self.shape(a) or ())
            if x is None or rank < 2 or (rank - 1) not in x.axes:
                return None
            return self._linear(marginal(x, (rank - 1,)), wb, None, len(out_shape) - 1, node)
        if self.const(a) is None and wb is None:  # a mix over positions: softmax(QK^T) @ V
            v = self.gauss(b)
            rb = len(self.shape(b) or ())
            if v is None or rb < 2 or (rb - 2) in v.axes or len(out_shape) != rb:
                return None
            mix = self.options.attention_mix
            self._back(node, lambda s, vn=b, ax=v.axes, sz=v.sizes, mix=mix: [(vn, ax, sz, s * mix)])
            return Gauss(v.axes, v.sizes, v.mean.copy(), v.cov * mix)
        return None

    def _batch_norm(self, node):
        scale, bias, mean, var = (self.const(n) for n in node.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            return None
        eps = float(node_attr(node, "epsilon", 1e-5))
        x = self.gauss(node.input[0])
        x = marginal(x, (1,)) if x is not None and 1 in x.axes else None
        gain = scale**2 / (var + eps)
        self._back(node, lambda s, xn=node.input[0], g=gain: [(xn, (1,), (g.size,), s * g)])
        if self.options.anchor_bn or x is None:
            rho = _corr(x.cov) if x is not None else np.eye(scale.size)
            g = scale * np.sqrt(var / (var + eps))
            return Gauss((1,), (scale.size,), bias.copy(), _sym(rho * np.outer(g, g)))
        s = scale / np.sqrt(var + eps)
        return Gauss((1,), (scale.size,), s * (x.mean - mean) + bias, _sym(x.cov * np.outer(s, s)))

    def _instance_norm(self, node):
        scale, bias = self.const(node.input[1]), self.const(node.input[2])
        if scale is None or bias is None:
            return None
        shape = self.shape(node.input[0])
        channels = shape[1] if shape else None
        if channels is None or scale.size != channels:
            return None
        x = self.gauss(node.input[0])
        x = marginal(x, (1,)) if x is not None and 1 in x.axes else None
        rho = _corr(x.cov) if x is not None else np.eye(channels)
        return Gauss((1,), (channels,), bias.copy(), _sym(rho * np.outer(scale, scale)))

    def _layer_norm(self, node):
        shape = self.shape(node.input[0])
        if shape is None:
            return None
        rank = len(shape)
        axis = int(node_attr(node, "axis", -1))
        axis = axis + rank if axis < 0 else axis
        if axis != rank - 1:
            return None
        n = shape[-1]
        scale = self.const(node.input[1])
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale = np.ones(n) if scale is None else np.broadcast_to(scale.reshape(-1), (n,))
        bias = np.zeros(n) if bias is None else np.broadcast_to(bias.reshape(-1), (n,))
        eps = float(node_attr(node, "epsilon", 1e-5))
        x = self.gauss(node.input[0])
        x = marginal(x, (axis,)) if x is not None and axis in x.axes else None
        if x is None:
            mean, cov = np.zeros(n), np.eye(n)
        else:
            centred = node.op_type == "LayerNormalization"
            p = np.eye(n) - (1.0 / n if centred else 0.0)
            m, c = p @ x.mean, p @ x.cov @ p
            s2 = (np.trace(c) + m @ m) / n + eps
            mean, cov = m / np.sqrt(s2), c / s2
        s2 = 1.0 if x is None else s2
        self._back(node, lambda s, xn=node.input[0], g=scale**2 / s2, ax=axis: [(xn, (ax,), (g.size,), s * g)])
        return Gauss((axis,), (n,), scale * mean + bias, _sym(cov * np.outer(scale, scale)))

    def _unary(self, node):
        state = self.get(node.input[0])
        if state is None:
            return None
        if node.op_type in ("Identity", "Dropout", "Cast"):
            return state
        f = as_func(state)
        values = _unary(node, f.values, self.const)
        return None if values is None else Func(f.base, values)

    def _channel_const(self, name: str, state, out_name: str) -> np.ndarray | None:
        """A constant operand as one value per feature of ``state`` ([F, 1]), or None if it varies elsewhere."""
        value = self.const(name)
        out_shape = self.shape(out_name)
        if value is None or out_shape is None:
            return None
        rank = len(out_shape)
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
        for axis, size in enumerate(value.shape):
            if size != 1 and axis not in state.axes:
                return None
        sub = value.reshape([value.shape[a] for a in state.axes]) if value.size > 1 else value.reshape(())
        return np.broadcast_to(sub, state.sizes).reshape(-1, 1)

    def _binary(self, node):
        op = node.op_type
        if len(node.input) != 2:
            return None
        a, b = node.input
        ca, cb = self.const(a), self.const(b)
        sa, sb = self.get(a), self.get(b)
        if ca is not None and cb is not None:
            return None
        if ca is not None or cb is not None:  # tensor with a constant
            state, const_name, tensor_first = (sb, a, False) if ca is not None else (sa, b, True)
            if state is None:
                return None
            c = self._channel_const(const_name, state, node.output[0])
            if c is not None:
                f = as_func(state)
                values = _binary(op, f.values, c) if tensor_first else _binary(op, c, f.values)
                return Func(f.base, values)
            if op in ("Add", "Sub"):  # a constant with positions (a positional embedding): a mixture over them
                return self._add_positional(node, state, const_name, tensor_first)
            return None
        if op in ("Mul", "Div") and (sa is None) != (sb is None):
            x, stat = (a, b) if sb is None else (b, a)
            if op == "Mul" or x == a:
                return self._explicit_rms(node, x, stat, divide=op == "Div")
        if sa is None or sb is None:
            return None
        fa, fb = sa, sb
        base_a = fa.base if isinstance(fa, Func) else fa
        base_b = fb.base if isinstance(fb, Func) else fb
        if base_a is base_b:
            return Func(base_a, _binary(op, as_func(fa).values, as_func(fb).values))
        ga, gb = self.gauss(a), self.gauss(b)
        shape_a, shape_b, out = self.shape(a), self.shape(b), self.shape(node.output[0])
        if ga is None or gb is None or shape_a is None or shape_b is None or out is None:
            return None
        ga, gb = self._aligned(ga, shape_a, out), self._aligned(gb, shape_b, out)
        if ga is None or gb is None:
            return None
        common = tuple(sorted(set(ga.axes) & set(gb.axes)))
        if not common:
            return None
        ga, gb = marginal(ga, common), marginal(gb, common)
        if ga.sizes != gb.sizes:
            return None
        sizes = ga.sizes
        shift_a, shift_b = len(out) - len(shape_a), len(out) - len(shape_b)
        axes_a = tuple(x - shift_a for x in common)
        axes_b = tuple(x - shift_b for x in common)
        if op in ("Add", "Sub"):
            self._back(node, lambda s: [(a, axes_a, sizes, s), (b, axes_b, sizes, s)])
        if op == "Add":
            return Gauss(common, ga.sizes, ga.mean + gb.mean, ga.cov + gb.cov)
        if op == "Sub":
            return Gauss(common, ga.sizes, ga.mean - gb.mean, ga.cov + gb.cov)
        if op == "Mul":  # independent factors
            ea, eb = np.diag(ga.second()).copy(), np.diag(gb.second()).copy()
            self._back(node, lambda s: [(a, axes_a, sizes, s * eb), (b, axes_b, sizes, s * ea)])
            sa2, sb2 = ga.second(), gb.second()
            mean = ga.mean * gb.mean
            return Gauss(common, ga.sizes, mean, _sym(sa2 * sb2 - np.outer(mean, mean)))
        return None

    def _rms_epsilon(self, x: str, stat: str, divide: bool) -> float | None:
        """eps if ``stat`` is ``1 / sqrt(mean(x^2, last axis) + eps)`` (``sqrt(...)`` when ``divide``), written as
        ops the way torch exports an RMSNorm (Casts in between allowed); None otherwise."""
        chain = ["Sqrt", "Add", "ReduceMean", "Pow"] if divide else ["Reciprocal", "Sqrt", "Add", "ReduceMean", "Pow"]
        name, eps, rank = stat, None, len(self.shape(x) or ())
        for op in chain:
            node = self.graph.producer.get(name)
            while node is not None and node.op_type == "Cast":
                node = self.graph.producer.get(node.input[0])
            if node is None or node.op_type != op:
                return None
            consts = [self.const(i) for i in node.input]
            if op == "Add":
                if sum(c is not None for c in consts) != 1 or next(c for c in consts if c is not None).size != 1:
                    return None
                eps = float(next(c for c in consts if c is not None).reshape(-1)[0])
                name = next(i for i, c in zip(node.input, consts) if c is None)
                continue
            if op == "ReduceMean":
                axes = node_attr(node, "axes")
                axes = axes if axes is not None or len(node.input) < 2 else consts[1]
                if axes is None or [int(v) % rank for v in np.asarray(axes).reshape(-1)] != [rank - 1]:
                    return None
            if op == "Pow" and (consts[1] is None or float(np.asarray(consts[1]).reshape(-1)[0]) != 2.0
                                or node.input[0] != x):
                return None
            name = node.input[0]
        return eps

    def _explicit_rms(self, node, x: str, stat: str, divide: bool):
        """An RMSNorm written as ops: the features over the last axis scaled by the expected per-token RMS."""
        eps = self._rms_epsilon(x, stat, divide)
        shape = self.shape(x)
        if eps is None or not shape:
            return None
        axis = len(shape) - 1
        g = self.gauss(x)
        g = marginal(g, (axis,)) if g is not None and axis in g.axes else None
        if g is None:
            return None
        s2 = (np.trace(g.cov) + g.mean @ g.mean) / g.width + eps
        self._back(node, lambda s, xn=x, ax=axis, n=g.width, v=s2: [(xn, (ax,), (n,), s / v)])
        return Gauss((axis,), (g.width,), g.mean / np.sqrt(s2), _sym(g.cov / s2))

    @staticmethod
    def _aligned(state: Gauss, shape, out) -> Gauss | None:
        shift = len(out) - len(shape)
        axes = []
        for axis in state.axes:
            if shape[axis] != out[axis + shift]:
                return None
            axes.append(axis + shift)
        return Gauss(tuple(axes), state.sizes, state.mean, state.cov)

    def _add_positional(self, node, state, const_name, tensor_first):
        gauss = materialise(state, self.options.hermite_terms)
        value = self.const(const_name)
        out = self.shape(node.output[0])
        if gauss is None or value is None or out is None or len(out) < value.ndim:
            return None
        rank = len(out)
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
        feature_axes = gauss.axes
        if any(value.shape[a] not in (1, out[a]) for a in feature_axes):
            return None
        full = np.broadcast_to(value, tuple(value.shape[a] if a not in feature_axes else out[a]
                                            for a in range(rank)))
        others = [a for a in range(rank) if a not in feature_axes]
        rows = full.transpose(others + list(feature_axes)).reshape(-1, gauss.width)
        mean_c = rows.mean(axis=0)
        cov_c = np.cov(rows, rowvar=False, bias=True) if rows.shape[0] > 1 else np.zeros((gauss.width,) * 2)
        tensor = node.input[0] if tensor_first else node.input[1]
        self._back(node, lambda s, t=tensor, ax=gauss.axes, sz=gauss.sizes: [(t, ax, sz, s)])
        if node.op_type == "Add":
            mean = gauss.mean + mean_c
        else:
            mean = gauss.mean - mean_c if tensor_first else mean_c - gauss.mean
        return Gauss(gauss.axes, gauss.sizes, mean, _sym(gauss.cov + np.atleast_2d(cov_c)))

    # ------------------------------------------------------------------------------------------ shapes
    def _reshape(self, node):
        state = self.gauss(node.input[0])
        in_shape, out_shape = self.shape(node.input[0]), self.shape(node.output[0])
        if state is None or in_shape is None or out_shape is None:
            return None
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            return None
        features = set(state.axes)
        keep, out_axes = [], []
        for ins, outs in groups:
            big = [a for a in ins if in_shape[a] > 1]
            if not big:
                continue
            feats = [a for a in big if a in features]
            if feats and len(feats) == len(big):
                keep.extend(big)
                out_axes.extend(a for a in outs if out_shape[a] > 1)
        if not keep:
            return None
        state = marginal(state, tuple(keep))
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes: [(xn, ax, sz, s)])
        return Gauss(tuple(out_axes), tuple(out_shape[a] for a in out_axes), state.mean, state.cov)

    def _transpose(self, node):
        state = self.gauss(node.input[0])
        shape = self.shape(node.input[0])
        if state is None or shape is None:
            return None
        perm = node_attr(node, "perm") or list(reversed(range(len(shape))))
        new_axes = [perm.index(a) for a in state.axes]
        order = np.argsort(new_axes)
        sizes = tuple(state.sizes[i] for i in order)
        index = np.arange(state.width).reshape(state.sizes).transpose(order).reshape(-1)
        inverse = np.argsort(index)
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes, inv=inverse: [(xn, ax, sz, s[inv])])
        return Gauss(tuple(sorted(new_axes)), sizes, state.mean[index], state.cov[np.ix_(index, index)])

    def _global_pool(self, node):
        state = self.gauss(node.input[0])
        if state is None or 1 not in state.axes:
            return None
        state = marginal(state, (1,))
        factor = self.options.pool_sensitivity
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes: [(xn, ax, sz, s * factor)])
        return Gauss((1,), state.sizes, state.mean, state.cov * self.options.pool_cov)

    def _reduce_mean(self, node):
        state = self.gauss(node.input[0])
        shape = self.shape(node.input[0])
        if state is None or shape is None:
            return None
        axes = node_attr(node, "axes")
        if axes is None and len(node.input) > 1:
            axes = self.const(node.input[1])
        if axes is None:
            return None
        axes = {int(a) + len(shape) if a < 0 else int(a) for a in np.asarray(axes).reshape(-1)}
        keep = tuple(a for a in state.axes if a not in axes)
        if not keep:
            return None
        state = marginal(state, keep)
        factor = self.options.pool_sensitivity
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes: [(xn, ax, sz, s * factor)])
        if not int(node_attr(node, "keepdims", 1)):
            keep = tuple(a - sum(1 for r in axes if r < a) for a in keep)
        return Gauss(keep, state.sizes, state.mean, state.cov * self.options.pool_cov)

    def _gather(self, node):
        table = self.const(node.input[0])
        axis = int(node_attr(node, "axis", 0))
        if table is None or axis != 0 or table.ndim != 2:
            return None
        index = self.graph.weight(node.input[1]) if node.input[1] else None
        rows = table if index is None else table[np.asarray(index).reshape(-1)]
        out = self.shape(node.output[0])
        if out is None:
            return None
        mean = rows.mean(axis=0)
        cov = np.cov(rows, rowvar=False, bias=True) if rows.shape[0] > 1 else np.zeros((table.shape[1],) * 2)
        return Gauss((len(out) - 1,), (table.shape[1],), mean, _sym(np.atleast_2d(cov)))

    def _split(self, node):
        """Each output keeps its slice of the features (a fused QKV projection split into Q, K and V); a split
        along an axis the state does not cover gives nothing."""
        state, shape = self.gauss(node.input[0]), self.shape(node.input[0])
        count = len(node.output)
        if state is None or shape is None:
            return [None] * count
        axis = int(node_attr(node, "axis", 0)) % len(shape)
        if axis not in state.axes:
            return [None] * count
        given = self.graph.weight(node.input[1]) if len(node.input) > 1 and node.input[1] else node_attr(node, "split")
        if given is not None:
            sizes = [int(v) for v in np.asarray(given).reshape(-1)]
        else:  # equal parts, the last one smaller if it must be (opset 18)
            step = -(-shape[axis] // count)
            sizes = [min(step, shape[axis] - i * step) for i in range(count)]
        if sum(sizes) != shape[axis] or len(sizes) != count:
            return [None] * count
        k = state.axes.index(axis)
        grid = np.arange(state.width).reshape(state.sizes)
        outputs, start = [], 0
        for size in sizes:
            index = np.take(grid, np.arange(start, start + size), axis=k).reshape(-1)
            sizes_out = state.sizes[:k] + (size,) + state.sizes[k + 1:]
            outputs.append(Gauss(state.axes, sizes_out, state.mean[index], state.cov[np.ix_(index, index)]))
            start += size
        return outputs

    def _concat(self, node):
        axis = int(node_attr(node, "axis", 0))
        out = self.shape(node.output[0])
        if out is None:
            return None
        axis = axis + len(out) if axis < 0 else axis
        parts = [self.gauss(name) for name in node.input]
        if any(p is None or axis not in p.axes for p in parts):
            return None
        parts = [marginal(p, (axis,)) for p in parts]
        widths = [p.width for p in parts]
        total = sum(widths)
        cov = np.zeros((total, total))
        start = 0
        for p, w in zip(parts, widths):
            cov[start:start + w, start:start + w] = p.cov
            start += w
        return Gauss((axis,), (total,), np.concatenate([p.mean for p in parts]), cov)


def _reshape_groups(in_shape, out_shape):
    """Pair runs of input axes with runs of output axes that hold the same elements (split/merge only)."""
    i = j = 0
    groups = []
    while i < len(in_shape) or j < len(out_shape):
        ins, outs = [], []
        pi = pj = 1
        if i < len(in_shape):
            ins.append(i)
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            outs.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                ins.append(i)
                pi *= in_shape[i]
                i += 1
            elif pj < pi and j < len(out_shape):
                outs.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                return None
        groups.append((ins, outs))
    return groups


def estimate_moments(graph: Graph, wanted: list[tuple[str, int]], options: MomentOptions | None = None
                     ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Data-free ``(mean, E[x x^T])`` along each requested (tensor, axis); missing where no estimate exists."""
    return Propagator(graph, options).run(wanted)


def channel_sensitivity(propagator: Propagator, tensor: str, axis: int) -> np.ndarray | None:
    """The sensitivity of ``tensor`` per index of ``axis`` after ``propagator.run`` (None where unknown)."""
    if not hasattr(propagator, "_sensitivity"):
        propagator._sensitivity = propagator.sensitivity()
    value = propagator._sensitivity.get(tensor)
    layout = propagator.layout.get(tensor)
    if value is None or layout is None or axis not in layout[0]:
        return None
    axes, sizes = layout
    moved = np.moveaxis(value.reshape(sizes), axes.index(axis), -1)
    return moved.reshape(-1, sizes[axes.index(axis)]).mean(axis=0)
