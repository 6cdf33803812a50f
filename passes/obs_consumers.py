"""The unit OBS reasons about: a consumer, a layer whose input channels include prunable atoms, with its weight
viewed as a [rows, n] matrix over those n input channels (rows = output channels x kernel taps)."""

from __future__ import annotations

import numpy as np

from spc.analysis.rules.base import LinearLayer
from spc.weights import loaded


class Consumer:
    """One layer that consumes prunable channels, with its weight as a [rows, n] matrix. ``matrix`` may be given as
    a function that reads it: then it is read (and converted to float64) on each use and never held, so scoring a
    model of many GB keeps one consumer's weight in memory at a time."""

    def __init__(self, layer: LinearLayer, matrix, labels: np.ndarray, out_index: np.ndarray,
                 row_scale: np.ndarray, moments=None):
        self.layer = layer
        self._matrix = matrix
        self.labels = labels  # atom of each input channel [n]
        self.out_index = out_index  # output channel of each row [rows]
        self.row_scale = row_scale  # per-row weight of the cost (a following BatchNorm's gamma / sigma)
        self.moments = moments  # (mean, E[xx^T]); the second may be spilled to disk (spc.weights.Spilled)

    @property
    def matrix(self) -> np.ndarray:  # float64 [rows, n], a private copy
        return self.native.astype(np.float64)

    @property
    def native(self) -> np.ndarray:  # [rows, n] in the weight's own precision (float32: half of float64), read-only
        return self._matrix() if callable(self._matrix) else self._matrix

    @property
    def width(self) -> int:
        return int(self.labels.size)

    def hessian(self) -> tuple[np.ndarray, np.ndarray]:
        mean, second = self.moments
        return mean, loaded(second)

    @property
    def key(self) -> tuple[str, int]:
        return (self.layer.input, self.layer.input_axis)


def weight_matrix(weight: np.ndarray, in_axis: int) -> np.ndarray:
    return np.moveaxis(weight.astype(np.float64), in_axis, -1).reshape(-1, weight.shape[in_axis])


def native_matrix(weight: np.ndarray, in_axis: int) -> np.ndarray:
    """``weight_matrix`` without the float64 copy (a view where the layout allows)."""
    return np.moveaxis(weight, in_axis, -1).reshape(-1, weight.shape[in_axis])


def matrix_to_weight(matrix: np.ndarray, shape: tuple[int, ...], in_axis: int) -> np.ndarray:
    moved = [s for a, s in enumerate(shape) if a != in_axis] + [matrix.shape[1]]
    return np.moveaxis(matrix.reshape(moved), -1, in_axis)


def _row_out_index(shape: tuple[int, ...], in_axis: int, out_axis: int) -> np.ndarray:
    rest = [s for a, s in enumerate(shape) if a != in_axis]
    position = out_axis - (1 if out_axis > in_axis else 0)
    return np.indices(rest).reshape(len(rest), -1)[position] if rest else np.zeros(1, dtype=np.int64)
