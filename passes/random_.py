"""Random importance: the baseline every criterion has to beat (seeded, so runs repeat)."""

from __future__ import annotations

import numpy as np

from spc.analysis import Analysis

from .base import ImportancePass, PassContext


class RandomImportance(ImportancePass):
    name = "random"

    def score(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        return np.random.default_rng(context.seed).random(analysis.atom_count)
