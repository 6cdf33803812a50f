"""Group magnitude importance (L1 or L2): an atom is as important as the weights it owns.

An atom's score sums the norms of every weight slice it covers, producers and consumers alike (a channel's filter
in one conv and its input slice in the next), as in Torch-Pruning's group importance. Biases, normalisation shifts
and running statistics are left out: they say little about a channel's contribution.
"""

from __future__ import annotations

import numpy as np

from spc.analysis import Analysis
from spc.analysis.rules.base import ROLE_SCALE, ROLE_WEIGHT

from .base import ImportancePass, PassContext, per_index_norm

MEASURED_ROLES = (ROLE_WEIGHT, ROLE_SCALE)


class MagnitudeImportance(ImportancePass):
    def __init__(self, power: int = 1):
        self.power = power
        self.name = f"l{power}"

    def score(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        totals = np.zeros(analysis.atom_count)
        for key in analysis.weight_dims:
            tensor, axis = key
            if analysis.roles.get(tensor, ROLE_WEIGHT) not in MEASURED_ROLES:
                continue
            norms = per_index_norm(analysis.graph.weight(tensor), axis, self.power)
            totals += np.bincount(analysis.dim_labels(key), weights=norms, minlength=analysis.atom_count)
        return totals ** (1.0 / self.power)
