"""Group magnitude importance (L1 or L2): an atom is as important as the weights it owns.

An atom's score sums the norms of every weight slice it covers, producers and consumers alike (a channel's filter
in one conv and its input slice in the next), as in Torch-Pruning's group importance. Biases, normalisation shifts
and running statistics are left out: they say little about a channel's contribution. Atoms pinned in place are
not scored (their score stays 0): nothing ranks them, and skipping them spares reading e.g. a vocabulary embedding.
"""

from __future__ import annotations

import numpy as np

from spc.analysis import Analysis
from spc.analysis.rules.base import ROLE_SCALE, ROLE_WEIGHT

from .base import ImportancePass, PassContext

MEASURED_ROLES = (ROLE_WEIGHT, ROLE_SCALE)


class MagnitudeImportance(ImportancePass):
    def __init__(self, power: int = 1):
        self.power = power
        self.name = f"l{power}"

    def score(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        totals = np.zeros(analysis.atom_count)
        axes_of: dict[str, list[int]] = {}
        for key in analysis.weight_dims:
            tensor, axis = key
            if analysis.roles.get(tensor, ROLE_WEIGHT) not in MEASURED_ROLES:
                continue
            if analysis.pinned[analysis.dim_labels(key)].all():
                continue  # only pinned atoms there: nothing ranks them, so they are not scored
            axes_of.setdefault(tensor, []).append(axis)
        for tensor, axes in axes_of.items():  # each weight is read once, whatever the number of its pruned axes
            norms = per_axis_norms(analysis.graph.weight(tensor), axes, self.power)
            for axis, values in zip(axes, norms):
                labels = analysis.dim_labels((tensor, axis))
                totals += np.bincount(labels, weights=values, minlength=analysis.atom_count)
        return totals ** (1.0 / self.power)


def per_axis_norms(array: np.ndarray, axes: list[int], power: int, block: int = 1 << 20) -> list[np.ndarray]:
    """Sum of |w|**power over every axis but ``axis``, for each of ``axes`` (float64 sums). |w| is formed in
    blocks of rows in one small buffer: a large weight never needs a second full-size copy."""
    array = np.asarray(array)
    if array.ndim == 0:
        return []
    rows = array.shape[0]
    per_row = max(1, array.size // max(rows, 1))
    step = max(1, block // per_row)
    buffer = np.empty(min(rows, step) * per_row, dtype=np.float32)
    norms = [np.zeros(array.shape[axis]) for axis in axes]
    for start in range(0, rows, step):
        chunk = array[start: start + step].astype(np.float32, copy=False)  # float16/bfloat16 measured in float32
        values = buffer[: chunk.size].reshape(chunk.shape)
        np.abs(chunk, out=values)
        if power != 1:
            np.power(values, power, out=values)
        for axis, norm in zip(axes, norms):
            others = tuple(a for a in range(array.ndim) if a != axis)
            sums = values.sum(axis=others, dtype=np.float64) if others else values.astype(np.float64)
            if axis == 0:
                norm[start: start + chunk.shape[0]] = sums
            else:
                norm += sums
    return norms
