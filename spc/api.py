"""The Python API that deployment toolchains call; the CLI is a thin layer over it.

    import spc
    model = spc.load("model.onnx")
    result = spc.prune(model, ratio=0.5, by="macs", criterion="obspa")
    spc.save(result.model, "model.pruned.onnx")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import io
from .analysis import Analysis, analyze
from .cost import CostModel
from .errors import SpcError
from .graph import Graph
from .hardware import default_round_to
from .plan import Plan, check_budget, make_plan
from .rewrite import apply_removal
from .validate import validate

Progress = Callable[[str], None]


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """A normalised copy of the ONNX file at ``path`` (see ``spc.io``)."""
    return io.load(path)


def _as_model(model) -> onnx.ModelProto:
    if isinstance(model, (str, os.PathLike)):
        return io.load(model)
    if isinstance(model, onnx.ModelProto):
        return io.from_proto(model)
    raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    analysis: Analysis
    criterion: str
    validation: str
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """Figures for people and tools (the CLI's --json, ``summary.json`` in a bundle)."""
        from .report import layer_costs

        plan = self.plan
        groups = []
        for group in self.analysis.prunable_groups:
            if group.id in plan.kept:
                groups.append({"group": group.id, "name": group.name, "units": group.size,
                               "kept": plan.kept[group.id], "width": group.width})
        return {
            "criterion": self.criterion,
            "by": plan.by,
            "ratio": plan.ratio,
            "macs": {"before": plan.before.macs, "after": plan.after.macs},
            "params": {"before": plan.before.params, "after": plan.after.params},
            "reduction": {m: round(plan.reduction(m), 4) for m in ("macs", "params", "channels")},
            "speedup_macs": round(plan.before.macs / plan.after.macs, 3) if plan.after.macs else None,
            "groups": groups,
            "layers": layer_costs(self.analysis, plan.before, plan.after, plan.removed),
            "validation": self.validation,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def prune(model, ratio: float = 0.5, by: str = "macs", criterion: str = "obspa", *,
          round_to: int | None = None,
          seed: int = 0, allow_inexact: bool = False, dim_values: dict[str, int] | None = None,
          calibration: dict[str, np.ndarray] | None = None, check: bool = True,
          progress: Progress | None = None) -> PruneResult:
    """Remove the fraction ``ratio`` of ``by`` (macs, params or channels), least important atoms first. ``model``
    is a path, a ModelProto, or the ``Analysis`` that ``spc.analyze`` returned for it (its analysis is reused)."""
    from .passes import PassContext, importance_pass

    check_budget(ratio, by)
    if round_to is not None and round_to < 1:
        raise SpcError(f"--round-to: {round_to} must be a positive integer")
    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    if isinstance(model, Analysis) and model.allow_inexact == allow_inexact:
        analysis = model
    else:
        say("analysing channel coupling")
        graph = model.graph if isinstance(model, Analysis) else Graph(_as_model(model))
        analysis = analyze(graph, allow_inexact=allow_inexact)
    timings["analyse"] = time.perf_counter() - clock
    if ratio > 0:
        _check_something_prunable(analysis, model)
    scorer = importance_pass(criterion)
    say(f"scoring {analysis.atom_count} atoms with '{scorer.name}'")
    clock = time.perf_counter()
    context = PassContext(calibration=calibration, seed=seed, dim_values=dim_values or {})
    scores = scorer(analysis, context)
    timings["score"] = time.perf_counter() - clock
    clock = time.perf_counter()
    say(f"planning: remove {ratio:.0%} of {by}")
    plan = make_plan(analysis, scores, ratio, by, round_to or default_round_to(),
                     CostModel(analysis, dim_values), normalize=scorer.normalize)
    timings["plan"] = time.perf_counter() - clock
    clock = time.perf_counter()
    say("rewriting the graph")
    pruned = apply_removal(analysis, plan.removed)
    compensate = getattr(scorer, "compensate", None)
    if compensate is not None:
        pruned = compensate(analysis, plan, pruned, context)
    timings["rewrite"] = time.perf_counter() - clock
    clock = time.perf_counter()
    verdict = "not validated"
    if check:
        say("validating with onnx.checker and ONNX Runtime")
        verdict = validate(pruned, analysis.graph, dim_values)
    timings["validate"] = time.perf_counter() - clock
    return PruneResult(pruned, plan, analysis, scorer.name, verdict, timings)


def _check_something_prunable(analysis: Analysis, model) -> None:
    """Writing an unpruned copy would look like success: refuse, with the most common reason channels are pinned."""
    if any(group.size > 1 for group in analysis.prunable_groups):
        return
    from collections import Counter

    from .report import channel_groups

    reasons = Counter(g.pin_reason for g in channel_groups(analysis) if g.pin_reason and g.size > 1)
    inner = Counter({r: n for r, n in reasons.items() if not r.startswith(("network input", "network output"))})
    why = f" (mostly: {(inner or reasons).most_common(1)[0][0]})" if reasons else ""
    source = f"{model}: " if isinstance(model, (str, os.PathLike)) else ""
    raise SpcError(f"{source}nothing to prune: every channel group is pinned{why}; `spc analyze` lists why")


def save(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write atomically; refuses to overwrite ``source`` (the input is never modified)."""
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise SpcError(f"-o: '{path}' is the input file; spc never modifies its input")
    return io.save(model, path)
