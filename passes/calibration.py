"""Intermediate tensors on calibration data, gathered with ONNX Runtime, reduced to per-channel statistics.

The model is run on the calibration inputs with the requested tensors added as graph outputs, a batch at a time,
and each tensor is folded straight into running sums along one *feature axis* (every other axis is a sample or
position): the count, the sum, the sum of absolute values and the sum of outer products, all in float64. Memory
is therefore one batch of activations plus ``C x C`` per tensor (128 MiB for a 4096-wide tensor; ``C`` when only
first moments and squares are asked for), whatever the number of samples. ``max_positions`` bounds the rows a
large feature map contributes per sample.

    stats = collect_moments(model, feeds, [("/layer1/Relu_output_0", 1)])
    stats[("/layer1/Relu_output_0", 1)].second   # E[x x^T] over samples and positions, float64 [C, C]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from spc.errors import SpcError

DEFAULT_BATCH = 32


@dataclass
class ChannelStats:
    """Running statistics of a tensor along one axis: ``n`` rows of ``C`` values folded in so far."""

    n: int
    total: np.ndarray  # sum of x, [C]
    absolute: np.ndarray  # sum of |x|, [C]
    squares: np.ndarray  # sum of x^2, [C]
    outer: np.ndarray | None  # sum of x x^T, [C, C] (None when only first moments were asked for)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.n, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.absolute / max(self.n, 1)

    @property
    def second(self) -> np.ndarray:
        """E[x x^T] (uncentred second moment)."""
        if self.outer is None:
            raise ValueError("second moments were not collected")
        return self.outer / max(self.n, 1)

    @property
    def rms(self) -> np.ndarray:
        """sqrt(E[x^2]) per channel (Wanda's ||X_c||, per sample and position)."""
        return np.sqrt(self.squares / max(self.n, 1))

    def add(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64, copy=False)
        self.n += rows.shape[0]
        self.total += rows.sum(axis=0)
        self.absolute += np.abs(rows).sum(axis=0)
        self.squares += np.einsum("ij,ij->j", rows, rows)
        if self.outer is not None:
            self.outer += rows.T @ rows


def as_rows(array: np.ndarray, axis: int) -> np.ndarray:
    """[..., C, ...] -> [N, C]: the feature axis last, every other axis flattened into rows."""
    return np.moveaxis(array, axis, -1).reshape(-1, array.shape[axis])


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {value.name for value in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return probe


def iterate_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str],
                    batch: int = DEFAULT_BATCH, limit: int | None = None):
    """Yield ``{name: array}`` for each batch of the calibration inputs (inputs are batched on axis 0)."""
    from spc.validate import session

    missing = [value.name for value in model.graph.input if value.name not in feeds]
    if missing:
        raise SpcError(f"calibration data has no array for model input '{missing[0]}'")
    names = list(dict.fromkeys(names))
    sess = session(_with_outputs(model, names))
    count = len(next(iter(feeds.values())))
    if limit is not None:
        count = min(count, limit)
    wanted = {value.name for value in model.graph.input}
    for start in range(0, count, batch):
        chunk = {name: np.asarray(value[start:min(start + batch, count)]) for name, value in feeds.items()
                 if name in wanted}
        yield dict(zip(names, sess.run(names, chunk)))


def collect_moments(model: onnx.ModelProto, feeds: dict[str, np.ndarray], requests: list[tuple[str, int]],
                    second: bool = True, batch: int = DEFAULT_BATCH, limit: int | None = None,
                    max_positions: int | None = None, seed: int = 0) -> dict[tuple[str, int], ChannelStats]:
    """Per-channel statistics of each requested (tensor, axis), pooled over every other axis and all samples.

    ``max_positions`` keeps a random (seeded) subset of that many positions per sample (rows of axes other than
    the batch axis 0 and the feature axis), which bounds the cost of the outer products on large feature maps."""
    requests = list(dict.fromkeys(requests))
    rng = np.random.default_rng(seed)
    stats: dict[tuple[str, int], ChannelStats] = {}
    names = [tensor for tensor, _ in requests]
    for outputs in iterate_tensors(model, feeds, names, batch, limit):
        for tensor, axis in requests:
            array = outputs[tensor]
            axis = axis + array.ndim if axis < 0 else axis
            rows = as_rows(array, axis)
            per_sample = rows.shape[0] // max(array.shape[0], 1) if axis != 0 else 0
            if max_positions and axis != 0 and per_sample > max_positions:
                rows = rows.reshape(array.shape[0], per_sample, -1)
                pick = rng.choice(per_sample, size=max_positions, replace=False)
                rows = rows[:, np.sort(pick)].reshape(-1, rows.shape[-1])
            entry = stats.get((tensor, axis))
            if entry is None:
                width = rows.shape[1]
                entry = ChannelStats(0, np.zeros(width), np.zeros(width), np.zeros(width),
                                     np.zeros((width, width)) if second else None)
                stats[(tensor, axis)] = entry
            entry.add(rows)
    return stats


def fixed_positions(tensor: str, per_sample: int, count: int | None) -> np.ndarray | None:
    """A seeded subset of ``count`` positions of ``tensor`` (the same on every call: dense and pruned runs of a
    model must sample the same places)."""
    if not count or per_sample <= count:
        return None
    import zlib

    rng = np.random.default_rng(zlib.crc32(tensor.encode()))
    return np.sort(rng.choice(per_sample, size=count, replace=False))


def sampled_rows(array: np.ndarray, axis: int, tensor: str, max_positions: int | None) -> np.ndarray:
    """[N, ..., C, ...] -> rows [N * positions, C] at the fixed positions of ``tensor``."""
    rows = as_rows(array, axis)
    if axis == 0:
        return rows
    per_sample = rows.shape[0] // max(array.shape[0], 1)
    pick = fixed_positions(tensor, per_sample, max_positions)
    if pick is None:
        return rows
    return rows.reshape(array.shape[0], per_sample, -1)[:, pick].reshape(-1, rows.shape[-1])
