"""Turning scores into a plan: which atoms go, under a budget of MACs, parameters or channels.

Scores are made comparable across groups by dividing by each group's mean (Torch-Pruning's default), then all atoms
are ranked globally. Removing the first ``k`` atoms of the ranking, with per-group floors (a group never loses its
last channels) and widths rounded to a hardware multiple (``round_to``), gives a cost that only falls as ``k``
grows, so the smallest ``k`` that meets the budget is found by bisection on exact costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd

import numpy as np

from .analysis import Analysis, Group
from .cost import Cost, CostModel
from .errors import SpcError

MEASURES = ("macs", "params", "channels")


@dataclass
class Plan:
    removed: np.ndarray  # bool per atom
    before: Cost
    after: Cost
    by: str
    ratio: float
    kept: dict[int, int] = field(default_factory=dict)  # group id -> atoms kept

    def reduction(self, by: str | None = None) -> float:
        """Fraction of the measure removed (0.5 = half the MACs gone = 2x fewer)."""
        by = by or self.by
        if by == "channels":
            total = sum(self.kept.values()) + int(self.removed.sum())
            return float(self.removed.sum()) / max(total, 1)
        before, after = self.before.measure(by), self.after.measure(by)
        return 1.0 - after / before if before else 0.0


def check_budget(ratio: float, by: str) -> None:
    if not 0.0 <= ratio < 1.0:
        raise SpcError(f"--ratio: {ratio} is out of range; it must be in [0, 1) (0.5 removes half)")
    if by not in MEASURES:
        raise SpcError(f"--by: '{by}' is not one of {', '.join(MEASURES)}")


def _unit(group: Group, round_to: int) -> int:
    """Atoms to keep in multiples of, so that kept channels are a multiple of ``round_to``."""
    return max(1, round_to // gcd(round_to, group.width)) if round_to > 1 else 1


def make_plan(analysis: Analysis, scores: np.ndarray, ratio: float, by: str = "macs", round_to: int = 1,
              cost_model: CostModel | None = None, min_keep: int = 1, normalize: bool = True) -> Plan:
    check_budget(ratio, by)
    cost_model = cost_model or CostModel(analysis)
    groups = [g for g in analysis.prunable_groups if g.size > 1]
    normalised = normalised_scores(analysis, scores, normalize)
    order_in_group, values_in_order, ids_in_order = {}, [], []
    for group in groups:
        order = np.argsort(normalised[group.atoms], kind="stable")
        order_in_group[group.id] = group.atoms[order]
        values_in_order.append(normalised[group.atoms[order]])
        ids_in_order.append(np.full(group.size, group.id, dtype=np.int64))
    # every atom of every group, least important first (a stable sort: ties keep group order)
    ids = np.concatenate(ids_in_order) if groups else np.zeros(0, dtype=np.int64)
    ranking = ids[np.argsort(np.concatenate(values_in_order), kind="stable")] if groups else ids
    before = cost_model.base
    total_atoms = sum(g.size for g in groups)

    def measure(removed: np.ndarray) -> float:
        if by == "channels":
            return total_atoms - removed.sum()
        return cost_model.evaluate(removed).measure(by)

    target = (1.0 - ratio) * (total_atoms if by == "channels" else before.measure(by))
    removed, kept = remove_until(analysis, groups, order_in_group, ranking, normalised, measure,
                                 target if ratio > 0 else None, round_to, min_keep)
    return Plan(removed, before, cost_model.evaluate(removed), by, ratio, kept)


def normalised_scores(analysis: Analysis, scores: np.ndarray, normalize: bool) -> np.ndarray:
    """Scores as the planners compare them across groups: divided by their group's mean when ``normalize``."""
    out = np.zeros(analysis.atom_count)
    for group in analysis.prunable_groups:
        if group.size > 1:
            values = scores[group.atoms]
            mean = values.mean()
            out[group.atoms] = values / mean if normalize and mean > 0 else values
    return out


def remove_until(analysis: Analysis, groups, order_in_group, ranking, normalised, measure, target, round_to: int,
                 min_keep: int):
    """The shortest prefix of ``ranking`` (group ids, least important first) whose removal brings ``measure`` to
    ``target`` or below (bisection: ``measure`` falls as more goes), each group's kept count rounded up to its unit
    and at least ``min_keep``; then the most important removed units are given back while the budget holds.
    ``target`` None removes nothing. Returns (removed atoms mask, kept units per group id)."""
    by_id = {group.id: group for group in groups}

    def removal(k: int) -> tuple[np.ndarray, dict[int, int]]:
        removed = np.zeros(analysis.atom_count, dtype=bool)
        counts = np.bincount(ranking[:k], minlength=max(by_id, default=0) + 1) if k else None
        kept = {}
        for gid, group in by_id.items():
            taken = int(counts[gid]) if counts is not None else 0
            unit = _unit(group, round_to)
            keep = max(group.size - taken, min_keep)
            keep = min(group.size, -(-keep // unit) * unit)
            kept[gid] = keep
            removed[order_in_group[gid][: group.size - keep]] = True
        return removed, kept

    lo, hi = 0, len(ranking)
    if target is None:
        hi = 0
    elif measure(removal(hi)[0]) > target:
        lo = hi  # the budget cannot be met within the floors: remove all that may go
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(removal(mid)[0]) <= target:
            hi = mid
        else:
            lo = mid + 1
    removed, kept = removal(lo)
    if lo > 0:
        removed, kept = _give_back(removed, kept, by_id, order_in_group, normalised, round_to, measure, target)
    return removed, kept


def _give_back(removed, kept, groups, order_in_group, scores, round_to, measure, target):
    """Rounding and coupled costs make the bisection overshoot; hand back the most important removed units, group
    by group, while the budget still holds."""
    import heapq

    heap = []
    for gid, group in groups.items():
        if kept[gid] < group.size:
            unit = _unit(group, round_to)
            best = order_in_group[gid][group.size - kept[gid] - 1]
            heapq.heappush(heap, (-float(scores[best]), gid, unit))
    while heap:
        _, gid, unit = heapq.heappop(heap)
        group = groups[gid]
        count = min(unit, group.size - kept[gid])
        back = order_in_group[gid][group.size - kept[gid] - count: group.size - kept[gid]]
        removed[back] = False
        if measure(removed) > target:
            removed[back] = True
            continue
        kept[gid] += count
        if kept[gid] < group.size:
            nxt = order_in_group[gid][group.size - kept[gid] - 1]
            heapq.heappush(heap, (-float(scores[nxt]), gid, unit))
    return removed, kept
