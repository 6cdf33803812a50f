"""Activation criteria from calibration data (``--criterion activation`` or ``wanda`` with ``--calib``).

Both read each consumer layer's input channels (the tensors OBS reasons about; see ``passes/obspa.py``) on the
calibration inputs, through ONNX Runtime, one batch at a time (``passes/calibration.py``):

* ``activation``: mean ``|x_c|`` of the channel where layers consume it (summed over consumers when a channel
  feeds several, e.g. a residual stream); an atom of several channels (a head) sums its channels.
* ``wanda``: Wanda's ``|W| * ||X||`` made structured: ``sum_rows |W_rc| * rms(x_c)`` over the consumers' columns
  of the atom (rms over samples and positions, so layers with different spatial sizes compare).

Atoms no consumer layer reads (none in practice) fall back to L1 magnitude. Scores go through the plan's per-group
mean normalisation like L1's. Neither changes weights.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from spc.analysis import Analysis

from .base import ImportancePass, PassContext
from .calibration import collect_moments
from .magnitude import MagnitudeImportance
from .obspa import ObspaImportance

MAX_SAMPLES = 512


class _ActivationBase(ImportancePass):
    needs_calibration = True

    def score(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        consumers = ObspaImportance.find_consumers(ObspaImportance(), analysis)
        wanted = list(dict.fromkeys(c.key for c in consumers))
        stats = collect_moments(analysis.model, context.calibration, wanted, second=False, limit=MAX_SAMPLES)
        totals = np.zeros(analysis.atom_count)
        seen = np.zeros(analysis.atom_count, dtype=bool)
        for consumer in consumers:
            entry = stats.get(consumer.key)
            if entry is None or entry.mean.size != consumer.matrix.shape[1]:
                continue
            values = self.channel_values(consumer, entry)
            totals += np.bincount(consumer.labels, weights=values, minlength=analysis.atom_count)
            seen[consumer.labels] = True
        if not seen.all():
            fallback = MagnitudeImportance(1).score(analysis, context)
            for group in analysis.prunable_groups:
                if not seen[group.atoms].all():
                    level = totals[group.atoms][seen[group.atoms]].mean() if seen[group.atoms].any() else 1.0
                    values = fallback[group.atoms]
                    scale = level / max(values.mean(), 1e-300) if level > 0 else 1.0
                    totals[group.atoms] = np.where(seen[group.atoms], totals[group.atoms], values * scale)
        return totals

    @abstractmethod
    def channel_values(self, consumer, entry) -> np.ndarray:
        """One importance value per input channel of ``consumer`` from its input statistics ``entry``."""


class ActivationImportance(_ActivationBase):
    name = "activation"

    def channel_values(self, consumer, entry) -> np.ndarray:
        return entry.mean_abs


class WandaImportance(_ActivationBase):
    name = "wanda"

    def channel_values(self, consumer, entry) -> np.ndarray:
        return np.abs(consumer.matrix).sum(axis=0) * entry.rms
