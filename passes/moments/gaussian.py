"""How the propagation describes a tensor: ``Gauss`` (mean and covariance along its feature axes) or ``Func`` (a
function of a Gaussian, kept as values on a grid until a non-elementwise op needs its moments through Mehler's
formula); pooling over axes, and the float64 products that keep n x n temporaries to one result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spc.weights import SPOOL, Spilled

GRID = np.linspace(-8.0, 8.0, 1201)
_W = np.exp(-0.5 * GRID**2)
WEIGHTS = _W / _W.sum()
HERMITE_TERMS = 8


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
