"""The dense linear algebra of OBS on one consumer, written so that an n x n float64 matrix (128 MiB at n = 4096)
is never copied: second moments read a block of rows at a time (also from their spill file), Cholesky inverses and
Gram matrices made in place by LAPACK/BLAS, removed channels compacted within the matrix's own memory. Used by the
greedy sweep and the compensation of ``obspa`` (and, through it, ``obs``)."""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from spc.weights import Spilled

BLOCK = 512  # rows at a time where an n x n matrix is read or built (temporaries of BLOCK x n)


def second_rows(second, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of E[x x^T], an array or spilled to disk (then only those rows are read)."""
    if not isinstance(second, Spilled):
        return second[start:stop]
    with open(second.path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
        if fortran or dtype != np.float64 or len(shape) != 2:
            return np.load(second.path)[start:stop]
        handle.seek(start * shape[1] * 8, 1)
        return np.fromfile(handle, dtype=np.float64, count=(stop - start) * shape[1]).reshape(-1, shape[1])


def augmented(mean: np.ndarray, second) -> np.ndarray:
    """``H~ = [[H, m], [m^T, 1]]``, read a block of rows at a time when H is spilled to disk."""
    n = mean.size
    h = np.empty((n + 1, n + 1))
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        h[start:stop, :n] = second_rows(second, start, stop)
    h[:n, n] = mean
    h[n, :n] = mean
    h[n, n] = 1.0
    return h


def damping(mean: np.ndarray, second, damp: float, diag: np.ndarray | None = None) -> float:
    diag = np.diag(second) if diag is None else diag
    variance = diag - mean**2
    level = float(np.mean(np.maximum(variance, 0.0))) if variance.size else 0.0
    if level <= 0:
        level = float(np.mean(diag)) if diag.size else 1.0
    return damp * max(level, 1e-12)


def damped(h: np.ndarray, lam: float) -> np.ndarray:
    """``h`` plus ``lam`` on the diagonal of the real inputs (not on the constant's entry)."""
    out = h.copy()
    n = h.shape[0] - 1
    out[np.arange(n), np.arange(n)] += lam
    return out


def _kept_system(mean: np.ndarray, second, kept: np.ndarray, gone: np.ndarray, damp: float):
    """The damped augmented H~_KK (Fortran order, so that LAPACK factors it in place) and H~_KR, gathered a
    block of rows of H at a time."""
    k = kept.size
    a = np.empty((k + 1, k + 1), order="F")
    cross = np.empty((k + 1, gone.size))  # H~_KR
    diag = np.empty(mean.size)
    position = np.searchsorted(kept, np.arange(mean.size))
    for start in range(0, mean.size, BLOCK):
        rows = second_rows(second, start, min(start + BLOCK, mean.size))
        diag[start:start + rows.shape[0]] = rows[np.arange(rows.shape[0]), np.arange(start, start + rows.shape[0])]
        mine = kept[(kept >= start) & (kept < start + rows.shape[0])]
        a[position[mine], :k] = rows[mine - start][:, kept]
        cross[position[mine]] = rows[mine - start][:, gone]
        del rows
    a[np.arange(k), np.arange(k)] += damping(mean, None, damp, diag)
    a[:k, k] = a[k, :k] = mean[kept]
    a[k, k] = 1.0
    cross[k] = mean[gone]
    return a, cross


def compensation(matrix: np.ndarray, mean: np.ndarray, second, removed: np.ndarray, damp: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """OBS update of the kept columns: (new W_K [rows, |K|] float64, bias change [rows]). ``matrix`` may be in
    its own precision and ``second`` spilled to disk: besides the result, H~_KK and H~_KR W_R^T are the largest
    things made."""
    kept = np.flatnonzero(~removed)
    gone = np.flatnonzero(removed)
    a, cross = _kept_system(mean, second, kept, gone, damp)
    b = (matrix[:, gone].astype(np.float64) @ cross.T).T  # H~_KR W_R^T [|K|+1, rows], Fortran order
    del cross
    delta = cho_solve(cho_factor(a, lower=True, check_finite=False, overwrite_a=True), b, check_finite=False,
                      overwrite_b=True)
    del a, b
    new = matrix[:, kept].astype(np.float64)
    new += delta[:-1].T
    return new, delta[-1].copy()


def _fill_lower(matrix: np.ndarray) -> np.ndarray:
    """Copy the upper triangle of a symmetric matrix onto its lower one, a block of rows at a time."""
    n = matrix.shape[0]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T
        sub = matrix[start:stop, start:stop]
        sub[np.tril_indices(stop - start, -1)] = sub.T[np.tril_indices(stop - start, -1)]
    return matrix


def spd_inverse(h: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive-definite matrix from its Cholesky factor (LAPACK potrf + potri), computed
    in ``h``'s own memory (LAPACK works on its transpose, a Fortran-order view of the same symmetric matrix)."""
    from scipy.linalg import lapack

    h = np.ascontiguousarray(h, dtype=np.float64)
    factor, info = lapack.dpotrf(h.T, lower=True, clean=False, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix not positive definite (potrf info {info})")
    inverse, info = lapack.dpotri(factor, lower=True, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"potri failed (info {info})")
    if not np.shares_memory(inverse, h):  # not in place after all (it is with scipy's f2py wrappers)
        h[...] = inverse.T
    del factor, inverse
    return _fill_lower(h)  # the lower triangle of h^T is the upper one of h


def scaled_gram(matrix: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """G = (diag(scale) W)^T (diag(scale) W) in float64 from W in its own precision: a rank update (BLAS syrk)
    per block of rows, so no float64 copy of W is made."""
    from scipy.linalg import blas

    n = matrix.shape[1]
    gram = np.zeros((n, n))
    for start in range(0, matrix.shape[0], BLOCK):
        rows = matrix[start:start + BLOCK].astype(np.float64)
        rows *= scale[start:start + BLOCK, None]
        out = blas.dsyrk(1.0, rows.T, beta=1.0, c=gram.T, trans=0, lower=1, overwrite_c=1)
        if not np.shares_memory(out, gram):
            gram[...] = out.T
        del rows, out
    return _fill_lower(gram)


def compact(matrix: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``matrix[np.ix_(keep, keep)]`` written over the start of ``matrix``'s own (C-contiguous) memory and
    returned as a view of it: row i lands before row keep[j] for any j > i is overwritten (keep[j] >= j), so no
    second matrix is ever made."""
    if not matrix.flags.c_contiguous:
        return matrix[np.ix_(keep, keep)]
    k = keep.size
    flat = matrix.reshape(-1)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        rows = matrix[keep[start:stop, None], keep]  # a copy, read before its own rows are overwritten
        flat[start * k:stop * k] = rows.reshape(-1)
    return flat[:k * k].reshape(k, k)


def removal_cost(matrix: np.ndarray, mean: np.ndarray, second: np.ndarray, removed: np.ndarray,
                 damp: float = 0.0) -> float:
    """E||W x - W'_K x_K - db||^2 after the optimal update (the OBS cost of removing ``removed``)."""
    new, bias = compensation(matrix, mean, second, removed, damp)
    diff = np.concatenate([matrix.copy(), np.zeros((matrix.shape[0], 1))], axis=1)
    kept = np.flatnonzero(~removed)
    diff[:, kept] -= new
    diff[:, -1] -= bias
    return float(np.einsum("ij,jk,ik->", diff, augmented(mean, second), diff))


def subtract_product(target: np.ndarray, left: np.ndarray, right: np.ndarray, block: int = 512) -> None:
    """target -= left @ right, a block of rows at a time (no temporary as large as ``target``)."""
    for start in range(0, target.shape[0], block):
        target[start:start + block] -= left[start:start + block] @ right
