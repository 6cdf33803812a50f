"""Per-group sensitivity: how much the model's output degrades as one prunable group alone loses a growing fraction
of its atoms, least important first.

This tells a user which layers can take pruning and which cannot, before any global budget is chosen. The model is
analysed and scored once; each point then removes the ``k`` lowest-scored atoms of one group (``k = round(fraction
x units)``, never the group's last atom), rewrites the graph (``apply_removal``), lets the criterion compensate the
remaining weights when it can (OBSPA/OBS), and runs the result in ONNX Runtime. Fraction 0 is always measured
(nothing removed, the rewrite must give back the dense outputs) and shared by every group.

Fidelity is measured on, in order of preference: the ``eval`` inputs (with ``label``: top-1 accuracy; always: the
error relative to the dense model); otherwise *synthetic* inputs, standard-normal Gaussians of each input's shape
(``samples`` of them along a dynamic batch axis, other dynamic axes sized by ``dim_values`` or 1; integer inputs
are zeros, so token models want ``eval`` data). The relative error is ``||y - y_dense|| / ||y_dense||`` over the
first output and all samples; ``agreement`` is top-1 agreement with the dense model on it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .analysis import Analysis
from .cost import CostModel
from .errors import SpcError
from .evaluate import load_npz, predict
from .graph import Graph
from .plan import Plan
from .rewrite import apply_removal

FORMAT = "spc-sensitivity/1"
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))


@dataclass
class Point:
    fraction: float  # asked for
    removed: int  # atoms actually removed (rounded, at most units - 1)
    macs: int  # whole model after the removal
    params: int
    error: float  # ||y - y_dense|| / ||y_dense|| on the first output
    agreement: float  # top-1 agreement with the dense model
    accuracy: float | None = None  # top-1 accuracy when the eval data has labels


@dataclass
class Curve:
    group: int
    name: str
    units: int
    width: int
    points: list[Point] = field(default_factory=list)


@dataclass
class Sensitivity:
    criterion: str
    data: str  # "eval" or "synthetic"
    samples: int
    metric: str  # what the curves show: "accuracy" (eval with labels) or "error"
    fractions: list[float]
    dense: dict
    curves: list[Curve]
    model: str | None = None
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def table(self) -> str:
        """One row per group, one column per fraction, the metric in each cell."""
        from .report import table

        headers = ["#", "group", "units"] + [percent(f) for f in self.fractions]
        rows = [[c.group, c.name[:48], c.units] + [_cell(p, self.metric) for p in c.points] for c in self.curves]
        return table(headers, rows, set(range(2, len(headers))))


def _cell(point: Point, metric: str) -> str:
    if metric == "accuracy":
        return f"{point.accuracy:.4f}"
    return f"{point.error:.2e}" if 0 < point.error < 1e-3 else f"{point.error:.4f}"


def percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def parse_fractions(values) -> list[float]:
    """Sorted distinct fractions in [0, 1), 0 included (the dense baseline)."""
    try:
        fractions = sorted({0.0, *(float(v) for v in values)})
    except (TypeError, ValueError):
        raise SpcError(f"--fractions: '{','.join(map(str, values))}' is not a list of numbers") from None
    bad = [f for f in fractions if not 0.0 <= f < 1.0]
    if bad:
        raise SpcError(f"--fractions: {bad[0]} is out of range; fractions must be in [0, 1)")
    return fractions


def synthetic_inputs(model: onnx.ModelProto, samples: int, dim_values: dict | None = None, seed: int = 0):
    """Standard-normal float inputs (integer inputs zero) with ``samples`` rows along a dynamic first axis."""
    from .validate import example_inputs

    values = dict(dim_values or {})
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and dims[0].dim_param not in values:
            values[dims[0].dim_param] = samples
    return example_inputs(model, values, seed=seed)


def _read_data(data, model: onnx.ModelProto, what: str):
    """Feeds and labels from an ``.npz`` path, a (feeds, labels) pair or a dict of arrays (``label`` optional)."""
    if data is None:
        return None, None
    if isinstance(data, (str, Path)):
        return load_npz(data, model)
    if isinstance(data, tuple) and len(data) == 2:
        return dict(data[0]), data[1]
    if isinstance(data, dict):
        feeds = dict(data)
        return feeds, feeds.pop("label", None)
    raise SpcError(f"{what}: expected an .npz path, a dict of arrays or (feeds, labels)")


class _Runner:
    """Runs candidate models on fixed inputs and measures them against the dense outputs."""

    def __init__(self, feeds: dict, labels: np.ndarray | None, dense_model: onnx.ModelProto):
        self.feeds, self.labels = feeds, labels
        first = next(iter(feeds.values()))
        dims = dense_model.graph.input[0].type.tensor_type.shape.dim
        static = dims and dims[0].HasField("dim_value")
        self.batch = int(first.shape[0]) if static and first.ndim else 256
        self.dense = predict(dense_model, feeds, self.batch).astype(np.float64)
        self.norm = float(np.linalg.norm(self.dense)) or 1.0
        self.samples = int(self.dense.shape[0]) if self.dense.ndim else 1
        self.accuracy = None if labels is None else float((self.top1(self.dense) == labels.reshape(-1)).mean())

    def top1(self, outputs: np.ndarray) -> np.ndarray:
        return outputs.reshape(len(outputs), -1).argmax(axis=1)

    def measure(self, model: onnx.ModelProto) -> tuple[float, float, float | None]:
        out = predict(model, self.feeds, self.batch).astype(np.float64)
        if out.shape != self.dense.shape:
            raise SpcError(f"the pruned model's output has shape {out.shape}, the dense one's {self.dense.shape}")
        error = float(np.linalg.norm(out - self.dense)) / self.norm
        agreement = float((self.top1(out) == self.top1(self.dense)).mean())
        accuracy = None if self.labels is None else float((self.top1(out) == self.labels.reshape(-1)).mean())
        return error, agreement, accuracy


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, desc="sensitivity", unit="point",
                dynamic_ncols=True, leave=False)


def sensitivity(model, fractions=DEFAULT_FRACTIONS, criterion: str | None = None, eval=None, calibration=None, *,
                samples: int = 64, seed: int = 0, dim_values: dict | None = None, allow_inexact: bool = False,
                groups: list[int] | None = None, progress=None, bar: bool = False) -> Sensitivity:
    """Fidelity of the model against the pruned fraction of each prunable group alone (see the module docstring).

    ``criterion`` defaults to 'obs' with ``calibration`` data and 'obspa' without; ``eval`` and ``calibration``
    are ``.npz`` paths or dicts of arrays. ``progress`` receives step messages, ``bar`` shows a bar on stderr."""
    from . import api
    from .analysis import analyze
    from .passes import PassContext, importance_pass

    fractions = parse_fractions(fractions)
    if samples < 1:
        raise SpcError(f"--samples: {samples} must be a positive integer")
    say = progress or (lambda message: None)
    timings, clock = {}, time.perf_counter()
    proto = api._as_model(model)
    feeds, labels = _read_data(eval, proto, "--eval")
    calib, _ = _read_data(calibration, proto, "--calib")
    scorer = importance_pass(criterion or ("obs" if calib else "obspa"))
    say("analysing channel coupling")
    analysis = analyze(Graph(proto), allow_inexact=allow_inexact)
    chosen = _choose_groups(analysis, groups)
    say(f"scoring {analysis.atom_count} atoms with '{scorer.name}'")
    context = PassContext(calibration=calib, seed=seed, dim_values=dim_values or {})
    scores = scorer(analysis, context)
    timings["analyse_and_score"] = time.perf_counter() - clock
    clock = time.perf_counter()
    data = "eval" if feeds is not None else "synthetic"
    runner = _Runner(feeds if feeds is not None else synthetic_inputs(proto, samples, dim_values, seed),
                     labels, proto)
    sweep = _Sweep(analysis, scores, scorer, context, runner, CostModel(analysis, dim_values))
    total = sum(len(sweep.counts(group, fractions)) for group in chosen)
    say(f"measuring {len(chosen)} groups at {len(fractions)} fractions on {runner.samples} {data} samples")
    with _progress_bar(total, bar) as tick:
        curves = [sweep.curve(group, fractions, tick) for group in chosen]
    timings["measure"] = time.perf_counter() - clock
    dense = {"macs": sweep.costs.base.macs, "params": sweep.costs.base.params,
             "accuracy": runner.accuracy}
    return Sensitivity(scorer.name, data, runner.samples, "accuracy" if labels is not None else "error", fractions,
                       dense, curves, str(model) if isinstance(model, (str, Path)) else None,
                       {k: round(v, 3) for k, v in timings.items()})


def _choose_groups(analysis: Analysis, wanted: list[int] | None):
    groups = [g for g in analysis.prunable_groups if g.size > 1]
    if wanted is None:
        return groups
    known = {g.id: g for g in groups}
    missing = [gid for gid in wanted if gid not in known]
    if missing:
        raise SpcError(f"--group: {missing[0]} is not a prunable group (see spc analyze; have "
                       f"{', '.join(map(str, known)) or 'none'})")
    return [known[gid] for gid in dict.fromkeys(wanted)]


class _Sweep:
    """Removes the least important atoms of one group at a time, from one analysis and one set of scores."""

    def __init__(self, analysis, scores, scorer, context, runner: _Runner, costs: CostModel):
        self.analysis, self.scores, self.scorer, self.context = analysis, scores, scorer, context
        self.runner, self.costs = runner, costs
        self.zero = self.point(None, 0.0, np.zeros(0, dtype=np.int64))

    @staticmethod
    def counts(group, fractions) -> dict[float, int]:
        return {f: min(int(round(f * group.size)), group.size - 1) for f in fractions}

    def curve(self, group, fractions, tick) -> Curve:
        order = group.atoms[np.argsort(self.scores[group.atoms], kind="stable")]
        measured: dict[int, Point] = {}
        points = []
        for fraction, k in self.counts(group, fractions).items():
            if k not in measured:
                measured[k] = self.zero if k == 0 else self.point(group, fraction, order[:k])
                tick.update(1)
            points.append(Point(**{**asdict(measured[k]), "fraction": fraction}))
        return Curve(group.id, group.name, group.size, group.width, points)

    def point(self, group, fraction: float, atoms: np.ndarray) -> Point:
        removed = np.zeros(self.analysis.atom_count, dtype=bool)
        removed[atoms] = True
        after = self.costs.evaluate(removed)
        model = apply_removal(self.analysis, removed)
        compensate = getattr(self.scorer, "compensate", None)
        if compensate is not None and atoms.size:
            kept = {group.id: group.size - int(atoms.size)}
            plan = Plan(removed, self.costs.base, after, "channels", fraction, kept)
            model = compensate(self.analysis, plan, model, self.context)
        error, agreement, accuracy = self.runner.measure(model)
        return Point(fraction, int(atoms.size), after.macs, after.params, error, agreement, accuracy)


def sensitivity_cli(args, progress) -> int:
    """``spc sensitivity``: the table (or JSON) on stdout, ``-o`` writes the JSON for ``spc report``."""
    from .cli import _dims

    fractions = args.fractions.split(",") if args.fractions else DEFAULT_FRACTIONS
    if args.output and Path(args.output).suffix != ".json":
        raise SpcError(f"-o: '{args.output}' should be a .json file")
    result = sensitivity(args.model, fractions, args.criterion, args.eval, args.calib, samples=args.samples,
                         seed=args.seed, dim_values=_dims(args.dim), allow_inexact=args.allow_inexact,
                         groups=args.group, progress=progress, bar=progress.enabled)
    if args.output:
        result.save(args.output)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    what = ("top-1 accuracy" if result.metric == "accuracy" else "output error relative to the dense model")
    print(f"{what} when one group alone loses a fraction of its units (criterion '{result.criterion}', "
          f"{result.samples} {result.data} samples)\n")
    print(result.table())
    if args.output:
        print(f"\nwrote {args.output}")
    return 0
