"""Planning under a latency budget: which atoms go so that the *predicted time on the target* meets a goal.

The prediction is a sum over the model's prunable layers (Conv with group 1 or depthwise, MatMul/Gemm with a constant
weight) of each layer's latency table (targets/latency.py) at the widths the plan leaves it (a layer the compiled
model runs one image at a time, targets/depth_first.py, is timed on one image and counted once per image), plus the
rest of the model's measured time scaled by the work left to the ops outside the layers (latency_rest.py: attention
shrinks with the heads, GELU with the FFN, a LayerNorm with neither). Atoms are ranked globally by normalised
importance per square root of the seconds saved (``TIME_WEIGHT``): a group whose channels buy more time goes first
at equal importance, but time does not outweigh importance as it did per second (measured: that cost accuracy on
pretrained CNNs). As in plan.py, widths are rounded to ``round_to``, the smallest prefix of the ranking that meets
the goal is found by bisection on exact predictions, and over-removal is handed back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis
from .cost import CostModel
from .plan import Plan, _unit, normalised_scores, remove_until


@dataclass
class Layer:
    """A prunable weight layer: where its widths are read and its measured latency table."""

    node: str
    op: str  # ONNX op type
    weight: str
    spec: object  # spc.targets.measure.LayerSpec
    full: tuple[int, int]  # (in, out) widths of the original
    lowest: tuple[int, int]  # (in, out) widths with every removable atom gone
    pixels: int  # output elements per output channel (activation-size proxy for the elementwise work)
    transposed: bool = False  # the weight is stored [out, in] (Gemm with transB)
    table: object = None  # spc.targets.latency.LatencyTable
    bsr: dict = field(default_factory=dict)  # density -> measured time(BSR) / time(dense), where BSR pays
    bsr_loss: dict = field(default_factory=dict)  # density -> share of the weight's magnitude zeroed
    density: float = 1.0  # the planner's choice: 1.0 dense, else the BSR density (latency_sparse.py)
    images: int = 1  # > 1: the compiled model runs this layer once per image (targets/depth_first.py); ``spec``
    # and ``table`` are one image's

    def seconds(self, ci: float, co: float) -> float:
        """Predicted seconds per model call at widths (ci, co), dense."""
        return self.table.predict(ci, co) * self.images

    def widths(self, shape) -> tuple[int, int]:
        """(in, out) widths from the weight's shape after pruning."""
        w = shape(self.weight)
        if self.op == "Conv":
            return (int(w[0]) if self.spec.depthwise else int(w[1])), int(w[0])
        if self.transposed:
            return int(w[1]), int(w[0])
        return int(w[0]), int(w[1])


class LatencyModel:
    """Predicted seconds of the model after removing atoms: layer tables + the rest of the model's time, scaled by
    ``rest`` (spc.latency_rest.RestWork: the work of the ops outside the layers at the plan's shapes) or, without
    one, by the layers' output activations kept.

    ``fixed_seconds`` of the rest do not scale: one call's overhead (VM entry, argument checks), which the layer
    tables do not hold (they are measured less it) and which a small model's time is largely made of."""

    def __init__(self, cost_model: CostModel, layers: list[Layer], other_seconds: float, fixed_seconds: float = 0.0,
                 rest=None):
        self.cost_model, self.layers, self.other = cost_model, layers, max(other_seconds, 0.0)
        self.fixed = max(fixed_seconds, 0.0)
        self.full_activation = sum(layer.full[1] * layer.pixels for layer in layers) or 1
        full_shape = cost_model.shape_function(np.zeros(cost_model.analysis.atom_count, dtype=bool))
        self.rest, self.full_rest = rest, (rest(full_shape) if rest is not None else 0.0)
        if self.full_rest <= 0:
            self.rest = None

    def set_densities(self, densities: dict[int, float]) -> None:
        """Layer index -> BSR density for the layers to predict block-sparse; the others dense."""
        for i, layer in enumerate(self.layers):
            layer.density = densities.get(i, 1.0)

    def layer_seconds(self, removed: np.ndarray, shape=None) -> list[tuple[tuple[int, int], float]]:
        shape = self.cost_model.shape_function(removed) if shape is None else shape
        out = []
        for layer in self.layers:
            ci, co = layer.widths(shape)
            scale = layer.bsr.get(layer.density, 1.0) if layer.density < 1.0 else 1.0
            out.append(((ci, co), layer.seconds(ci, co) * scale))
        return out

    def predict(self, removed: np.ndarray) -> float:
        shape = self.cost_model.shape_function(removed)
        per_layer = self.layer_seconds(removed, shape)
        if self.rest is not None:
            share = self.rest(shape) / self.full_rest
        else:
            kept = sum(co * layer.pixels for ((_ci, co), _t), layer in zip(per_layer, self.layers))
            share = kept / self.full_activation
        fixed = min(self.fixed, self.other)
        return sum(t for _w, t in per_layer) + fixed + (self.other - fixed) * share


@dataclass
class _Candidates:
    """Per group, what the ranking weighs: atoms in removal order, normalised scores, and the predicted seconds and
    MACs one rounding unit of it saves (per atom)."""

    groups: list
    order_in_group: dict
    normalised: np.ndarray
    saved_seconds: dict  # group id -> seconds per atom
    saved_macs: dict  # group id -> MACs per atom


def _candidates(analysis: Analysis, scores, model: LatencyModel, round_to: int, normalize: bool) -> _Candidates:
    groups = [g for g in analysis.prunable_groups if g.size > 1]
    nothing = np.zeros(analysis.atom_count, dtype=bool)
    base, base_macs = model.predict(nothing), model.cost_model.evaluate(nothing).macs
    normalised = normalised_scores(analysis, scores, normalize)
    order_in_group, seconds, macs = {}, {}, {}
    for group in groups:
        order = np.argsort(normalised[group.atoms], kind="stable")
        order_in_group[group.id] = group.atoms[order]
        unit = min(_unit(group, round_to), group.size - 1) or 1
        trial = nothing.copy()
        trial[group.atoms[order][:unit]] = True
        seconds[group.id] = (base - model.predict(trial)) / unit
        macs[group.id] = (base_macs - model.cost_model.evaluate(trial).macs) / unit
    return _Candidates(groups, order_in_group, normalised, seconds, macs)


TIME_WEIGHT = 0.5  # the ranking's power of the seconds saved. At 1 (importance per second) pretrained
# EfficientNet-Lite0 at --speedup 1.5, batch 8, kept 0.06 top-1 agreement against 0.25 at 0.5 and 0.29 at 0
# (importance alone): time ratios of up to 100x between layers amplified the errors in OBSPA's cross-layer
# calibration and took the early high-resolution layers' channels. 0.5 and 0 are not yet told apart (bench/README.md)


def _ranking(found: _Candidates, macs_weight: float = 0.0, time_weight: float = TIME_WEIGHT) -> np.ndarray:
    """Global order of atoms (their group ids): normalised score, plus ``macs_weight`` per MAC the atom removes,
    per predicted second its removal saves (to the power ``time_weight``)."""
    entries = []
    for group in found.groups:
        saved = found.saved_seconds[group.id] ** time_weight if found.saved_seconds[group.id] > 0 else 0.0
        price = macs_weight * max(found.saved_macs[group.id], 0.0)
        for i in found.order_in_group[group.id]:
            value = float(found.normalised[i])
            entries.append(((value + price) / saved if saved > 0 else np.inf, value, group.id))
    entries.sort(key=lambda e: (e[0], e[1]))
    return np.array([gid for *_k, gid in entries], dtype=np.int64)


MACS_WEIGHT_STEPS = 16  # bisection steps on the weight of MACs in the ranking (log scale, 1e-6 to 1e6 of a channel)


def plan_for_latency(analysis: Analysis, scores: np.ndarray, model: LatencyModel, target_seconds: float,
                     round_to: int = 1, min_keep: int = 1, normalize: bool = True,
                     min_macs: float | None = None, time_weight: float = TIME_WEIGHT) -> Plan:
    """Remove the least important atoms per second saved (to the power ``time_weight``) until the predicted time
    is at most ``target_seconds``.

    ``min_macs``: MACs the plan should keep (``--min-efficiency``: no more compute removed than the speed-up asked
    for). Where the least-importance plan removes more, each atom is also charged for the MACs it removes, at the
    smallest charge (bisection) whose plan keeps ``min_macs``; if none does, the largest charge's plan."""
    found = _candidates(analysis, scores, model, round_to, normalize)
    cost = model.cost_model
    ratio = 1.0 - target_seconds / model.predict(np.zeros(analysis.atom_count, dtype=bool))

    def plan_at(weight: float) -> Plan:
        ranking = _ranking(found, weight, time_weight)
        removed, kept = remove_until(analysis, found.groups, found.order_in_group, ranking, found.normalised,
                                     model.predict, target_seconds, round_to, min_keep)
        return Plan(removed, cost.base, cost.evaluate(removed), "latency", ratio, kept)

    plan = plan_at(0.0)
    if min_macs is None or plan.after.macs >= min_macs or not found.groups:
        return plan
    atoms = np.concatenate([g.atoms for g in found.groups])
    per_atom = np.mean([max(found.saved_macs[g.id], 0.0) for g in found.groups]) or 1.0
    scale = (float(np.mean(np.abs(found.normalised[atoms]))) or 1.0) / per_atom  # one average channel per MAC-atom
    lo, hi = -6.0, 6.0
    best = plan_at(scale * 10 ** hi)
    if best.after.macs < min_macs:
        return best if best.after.macs > plan.after.macs else plan
    for _ in range(MACS_WEIGHT_STEPS):
        mid = (lo + hi) / 2
        trial = plan_at(scale * 10 ** mid)
        if trial.after.macs >= min_macs:
            best, hi = trial, mid
        else:
            lo = mid
    return best


def lowest_removal(analysis: Analysis, round_to: int, min_keep: int = 1) -> np.ndarray:
    """Every atom that a plan may remove (floors and rounding respected): the narrowest model."""
    removed = np.zeros(analysis.atom_count, dtype=bool)
    for group in analysis.prunable_groups:
        if group.size > 1:
            keep = min(group.size, -(-min_keep // _unit(group, round_to)) * _unit(group, round_to))
            removed[group.atoms[: group.size - keep]] = True
    return removed
