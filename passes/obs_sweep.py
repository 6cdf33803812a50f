"""The greedy OBS sweep that scores a group: remove the atoms of smallest summed marginal cost over all its
consumers, update every consumer's inverse Hessian and Gram matrix with the block OBS formulas, repeat
(``greedy_costs``; passes/obspa.py says why and how it is used)."""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from .obs_algebra import augmented, compact, damping, scaled_gram, spd_inverse, subtract_product
from .obs_consumers import Consumer

GREEDY_STEPS = 64


class _Sweep:
    """Greedy OBS state of one consumer inside one group, kept compact (removed channels are deleted, so the work
    shrinks as the sweep goes): the inverse of the damped augmented H~ and the Gram matrix G = W'^T W' of the
    updated weights (so that a conv's many rows never enter the loop: the marginal cost of a channel is
    G_cc / (H~^-1)_cc, of a block A tr((H~^-1)_AA^-1 G_AA))."""

    def __init__(self, consumer: Consumer, local: np.ndarray, damp: float, weight: float = 1.0):
        n = consumer.width
        self.gram = scaled_gram(consumer.native, consumer.row_scale * np.sqrt(weight))
        if consumer.moments is not None:  # H~ read straight into the matrix that becomes its inverse
            mean, second = consumer.moments
            h = augmented(mean, second)
            h[np.arange(n), np.arange(n)] += damping(mean, h[:n, :n], damp)
        else:
            h = np.eye(n + 1)
        self.hinv = spd_inverse(h)
        self.atom = np.append(local, -1)  # group-local atom at each position (the constant is last, never removed)
        members = local[local >= 0]
        self.widths = np.bincount(members) if members.size else np.zeros(0, dtype=np.int64)
        self.single = bool(members.size) and bool(np.all(self.widths[np.unique(members)] == 1))

    def costs(self, total: np.ndarray) -> None:
        """Add each live atom's marginal cost to ``total``."""
        positions = np.flatnonzero(self.atom[:-1] >= 0)
        if positions.size == 0:
            return
        atoms = self.atom[positions]
        if self.single:
            diag = np.maximum(np.diag(self.hinv)[positions], 1e-300)
            total[atoms] += np.maximum(np.diag(self.gram)[positions], 0.0) / diag
            return
        for atom in np.unique(atoms):
            cols = positions[atoms == atom]
            hb = self.hinv[np.ix_(cols, cols)]
            try:
                x = np.linalg.solve(hb, self.gram[np.ix_(cols, cols)])
            except np.linalg.LinAlgError:
                x = np.linalg.lstsq(hb, self.gram[np.ix_(cols, cols)], rcond=None)[0]
            total[atom] += float(np.trace(x))

    def remove(self, atoms: np.ndarray) -> None:
        gone = np.isin(self.atom, atoms)
        if not gone.any():
            return
        cols = np.flatnonzero(gone)
        keep = np.flatnonzero(~gone)
        hb = self.hinv[np.ix_(cols, cols)]
        hb = 0.5 * (hb + hb.T)
        hb[np.diag_indices_from(hb)] += 1e-12 * max(float(np.abs(np.diag(hb)).max()), 1e-300)
        try:
            hb_inv = cho_solve(cho_factor(hb, lower=True, check_finite=False), np.eye(cols.size), check_finite=False)
        except np.linalg.LinAlgError:
            hb_inv = np.linalg.pinv(hb)
        g = hb_inv @ self.hinv[np.ix_(cols, keep)]  # [b, kept]: W'_K -= W'_C g, H~^-1_KK -= H~^-1_KC g
        gk = g[:, :-1]
        keep_real = keep[:-1]
        cross = self.gram[np.ix_(cols, keep_real)]  # G_CK
        corner = self.gram[np.ix_(cols, cols)]
        gram = compact(self.gram, keep_real)
        # G' = G_KK - G_KC g - g^T G_CK + g^T G_CC g = G_KK - G_KC g - g^T (G_CK - G_CC g)
        subtract_product(gram, cross.T, gk)
        subtract_product(gram, gk.T, cross - corner @ gk)
        self.gram = gram
        left = self.hinv[np.ix_(keep, cols)]  # [kept, b]
        hinv = compact(self.hinv, keep)  # in the old matrix's memory: no second n x n is made
        subtract_product(hinv, left, g)
        self.hinv = hinv
        self.atom = self.atom[keep]


def limit_blas_threads():
    """One BLAS thread: OpenBLAS's threaded Cholesky and thin rank-b updates are slower with two threads than with
    one on this 2-core machine (measured: potrf at n=2048 0.13 s with one thread, 0.41 s with two)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1, user_api="blas")
    except Exception:  # threadpoolctl is optional
        import contextlib

        return contextlib.nullcontext()


def output_energy(consumer: Consumer) -> float:
    """E||diag(s) W (x - m)||^2: the variance of the consumer's (normalised) output."""
    w = consumer.matrix * consumer.row_scale[:, None]
    if consumer.moments is None:
        return float((w * w).sum())
    mean, second = consumer.hessian()
    cov = second - np.outer(mean, mean)
    return float(np.einsum("ij,jk,ik->", w, cov, w))


def greedy_costs(consumers: list[Consumer], local_labels: list[np.ndarray], atom_count: int, damp: float,
                 steps: int = GREEDY_STEPS, weights: list[float] | None = None) -> np.ndarray:
    """Marginal OBS cost of each group-local atom at the moment the greedy sweep removes it (running max)."""
    weights = weights or [1.0] * len(consumers)
    with limit_blas_threads():
        sweeps = [_Sweep(c, loc, damp, wt) for c, loc, wt in zip(consumers, local_labels, weights)]
        alive = np.ones(atom_count, dtype=bool)
        cost = np.zeros(atom_count)
        if atom_count > 512:  # wide groups: half as many (larger) steps; the first blocks are what the plan uses
            steps = max(1, steps // 2)
        block = max(1, -(-atom_count // steps))
        level = 0.0
        while alive.any():
            total = np.zeros(atom_count)
            for sweep in sweeps:
                sweep.costs(total)
            candidates = np.flatnonzero(alive)
            chosen = candidates[np.argsort(total[candidates], kind="stable")[:block]]
            for atom in chosen:  # a running max keeps scores in removal order
                level = max(level, float(total[atom]))
                cost[atom] = level
            alive[chosen] = False
            if alive.any():
                for sweep in sweeps:
                    sweep.remove(chosen)
    return cost
