"""The pass interface.

An *importance pass* is an analysis: it reads the model and returns one score per atom (higher = more important)
and never touches weights. A *compensating pass* may also change the weights that stay, to make up for what was
removed (OBS-style); it says whether it did. Errors raised inside a pass carry the pass's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from spc.analysis import Analysis
from spc.errors import SpcError


@dataclass
class PassContext:
    """What a pass may use besides the analysis: calibration inputs, a seed, sizes for dynamic axes."""

    calibration: dict[str, np.ndarray] | None = None
    seed: int = 0
    dim_values: dict[str, int] = field(default_factory=dict)


class ImportancePass(ABC):
    """Scores atoms; subclasses implement ``score``."""

    name = "importance"
    needs_calibration = False
    # whether the plan divides scores by their group's mean to compare groups (right for magnitudes; OBS costs are
    # already comparable across groups and are used as they are)
    normalize = True

    def __call__(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        if self.needs_calibration and not context.calibration:
            raise SpcError(f"criterion '{self.name}' needs calibration data (--calib FILE.npz)")
        try:
            scores = np.asarray(self.score(analysis, context), dtype=np.float64)
        except SpcError:
            raise
        except Exception as error:
            raise RuntimeError(f"importance pass '{self.name}' failed: {error}") from error
        if scores.shape != (analysis.atom_count,):
            raise RuntimeError(f"importance pass '{self.name}' returned {scores.shape}, not one score per atom")
        return scores

    @abstractmethod
    def score(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        """One score per atom of ``analysis``."""


def per_index_norm(array: np.ndarray, axis: int, power: float) -> np.ndarray:
    """Sum of |w|**power over every axis but ``axis``: one value per index along ``axis``."""
    values = np.abs(array.astype(np.float32, copy=False))
    if power != 1:
        values = values ** power
    others = tuple(a for a in range(array.ndim) if a != axis)
    return values.sum(axis=others, dtype=np.float64) if others else values.astype(np.float64)
