"""Per layer, a dense or a block-sparse (BSR) kernel under a latency budget: ``--speedup`` on x86/arm.

Removing channels and zeroing weight blocks both buy time; the planner spends importance where it buys most.

* Time. Each candidate layer (a group-1 Conv or a MatMul/Gemm of at least 4096 weights) is compiled alone with the BSR kernel at DENSITIES
  (the share of 4x1 blocks kept, zeroed by passes/sparsify.py as compile_model does) and dense, at the widths the
  dense-only plan keeps it (cached on disk like the width tables). The ratio BSR/dense then scales the layer's
  dense width table at any width. Densities at which the sparse kernel is not faster are dropped.
* Importance, with OBS costs (obspa, obs: the criterion keeps its additive per-atom costs, ``scorer.costs``, and
  the second moments of each layer's input). A channel costs its OBS cost, the energy of the change of its
  consumers' outputs after their re-fit, each output weighted by the BatchNorm after it; zeroed blocks cost the same
  quantity for the blocks ``compensate_blocks`` will zero, after the re-fit of the rest of their rows, at the
  channels the plan keeps (``BlockPricer``, passes/block_obs.block_cost). One scale, so the planner trades one
  against the other directly. It still under-prices the first conv after the trained digits CNN's 1-channel stem
  (bench/README.md: 50% of its blocks and of layer1.conv2's with 2.4x fewer MACs kept 0.71 accuracy, where the
  dense-only plan of the same speed kept 0.98), which is why ``--sparse-layers`` stays opt-in.
* Importance, otherwise (magnitude criteria). Zeroing blocks costs what they hold: passes/sparsify.py zeroes the
  blocks of least norm, worth a share ``f`` of the layer's L1 weight magnitude. The planner compares channel
  removals in normalised importance (each group's scores over their mean, shifted so that the least important
  channel costs 0 when some are negative), where one average channel costs the mean score ``u``; removing ``f`` of
  a layer's ``c`` kept channels takes about ``f`` of its weight. So zeroing ``f`` of the magnitude is charged as
  removing ``f * c`` average channels: ``f * c * u`` (``c``: the output channels when the plan may narrow them,
  else the input channels).
* Compensation. The blocks of a layer that runs sparse are chosen by OBS saliency and the rest of their rows
  re-fitted with the layer's input moments (``compensate_blocks``, passes/block_obs.py) when the criterion has
  moments (obspa, obs); without moments compile_model zeroes them by magnitude.
* Choice. Options (layer, density) are ranked by importance per second saved at the dense plan's widths. For each
  prefix of that ranking the width planner (latency_plan.py) plans again with those layers sparse; the prefix that
  meets the goal with the least total loss (importance of the channels removed + the charges of the sparse layers at
  the widths kept) wins. The empty prefix is the dense-only plan, so a layer goes sparse only where that pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis import Analysis
from .latency_plan import TIME_WEIGHT, LatencyModel, Layer, plan_for_latency
from .plan import Plan, normalised_scores

DENSITIES = (0.5, 0.3, 0.2)  # shares of 4x1 blocks kept that are measured
BLOCK = (4, 1)  # compile_model's block


@dataclass
class Choice:
    plan: Plan
    densities: dict[int, float]  # layer index -> BSR density (absent: dense)
    loss: float  # normalised importance removed + charges of the sparse layers
    predicted: float  # predicted seconds


def _sparsify():
    from .passes.sparsify import DEFAULT_MIN_SIZE, zeroed_magnitude

    return zeroed_magnitude, DEFAULT_MIN_SIZE


def _out_in(layer: Layer, w: np.ndarray) -> np.ndarray:
    if layer.op == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if layer.transposed else w.T


def price_blocks(layers: list[Layer], graph, densities=DENSITIES) -> list[Layer]:
    """Fill ``bsr_loss`` of the layers a BSR kernel can run (not depthwise, not smaller than the weights
    passes/sparsify.py leaves dense by default: too small to profit); returns them."""
    zeroed_magnitude, min_size = _sparsify()
    out = []
    for layer in layers:
        w = graph.weight(layer.weight)
        if layer.spec.depthwise or w is None or w.ndim not in (2, 4) or w.size < min_size:
            continue
        view = _out_in(layer, np.asarray(w, dtype=np.float64))
        layer.bsr_loss = {d: zeroed_magnitude(view, 1.0 - d, BLOCK) for d in densities}
        out.append(layer)
    return out


def measure_sparse(layers: list[Layer], widths: list[tuple[int, int]], measurer, cache, say) -> None:
    """Time each layer dense and BSR at its planned widths; keep the densities whose kernel is faster."""
    from .targets.latency import measure_layer

    for n, (layer, (ci, co)) in enumerate(zip(layers, widths)):
        say(f"measuring layer {n + 1}/{len(layers)} {layer.node} block-sparse at {ci}x{co}")
        dense = measure_layer(measurer, layer.spec, ci, co, cache)
        for density in layer.bsr_loss:
            seconds = measure_layer(measurer, layer.spec, ci, co, cache, density=density)
            if seconds < dense:
                layer.bsr[density] = seconds / dense


def _priced_scores(analysis: Analysis, scores: np.ndarray, normalize: bool) -> tuple[np.ndarray, float]:
    """Scores as the planner compares them, shifted so that the least important atom costs 0 when some are negative
    (obspa's OBS levels only order removals: their zero is arbitrary), and their mean: one average channel."""
    values = normalised_scores(analysis, scores, normalize)
    atoms = np.array([a for g in analysis.prunable_groups if g.size > 1 for a in g.atoms], dtype=np.int64)
    if not atoms.size:
        return values, 1.0
    low = float(values[atoms].min())
    if low < 0:
        values = values.copy()
        values[atoms] -= low
    return values, float(values[atoms].mean()) or 1.0


class BlockPricer:
    """What zeroing a layer's blocks costs, in the criterion's own OBS cost units (obspa, obs), at the channels a plan
    keeps: the output-energy change after the re-fit that ``compensate_blocks`` makes (passes/block_obs.block_cost),
    weighted by the BatchNorm after the layer as OBSPA's channel costs are; cached per (layer, density, kept)."""

    def __init__(self, analysis: Analysis, scorer):
        self.analysis, self.scorer = analysis, scorer
        self.linear = {layer.weight: layer for layer in analysis.layers}
        self.cache: dict = {}

    def _row_weights(self, linear, out_channels: int) -> np.ndarray:
        """Per output channel, the weight OBSPA's costs give that layer's output (its consumer's ``row_scale``:
        the BatchNorm after it, times the output sensitivity when the criterion weighs by it)."""
        consumer = next((c for c in getattr(self.scorer, "consumers", []) if c.layer.weight == linear.weight), None)
        if consumer is None or consumer.row_scale.size != consumer.out_index.size:
            return self.scorer._row_scale(self.analysis, linear, out_channels)
        per_out = np.ones(out_channels)
        per_out[consumer.out_index] = consumer.row_scale
        return per_out

    @staticmethod
    def applies(scorer) -> bool:
        return getattr(scorer, "costs", None) is not None and bool(getattr(scorer, "moment_table", None))

    def __call__(self, layer: Layer, density: float, removed: np.ndarray) -> float | None:
        from .passes.block_obs import block_cost

        linear = self.linear.get(layer.weight)
        if linear is None:
            return None
        keep_in = ~removed[self.analysis.dim_labels((linear.weight, linear.weight_in_axis))]
        keep_out = ~removed[self.analysis.dim_labels((linear.weight, linear.weight_out_axis))]
        key = (layer.weight, density, keep_in.tobytes(), keep_out.tobytes())
        if key not in self.cache:
            second = _kept_second_moment(self.analysis, self.scorer.moment_table, linear, removed)
            if second is None:
                self.cache[key] = None
                return None
            w = np.asarray(self.analysis.graph.weight(layer.weight), dtype=np.float64)
            w = np.moveaxis(w, (linear.weight_out_axis, linear.weight_in_axis), (0, 1))[keep_out][:, keep_in]
            rows = self._row_weights(linear, keep_out.size)[keep_out]
            taps = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
            self.cache[key] = block_cost(w.reshape(w.shape[0], -1), 1.0 - density, BLOCK, second, taps, rows)
        return self.cache[key]


def _kept(layer: Layer, widths: tuple[int, int]) -> int:
    return widths[1] if layer.full[1] != layer.lowest[1] else widths[0]


def _better(trial: Choice, best: Choice, target: float) -> bool:
    fits, best_fits = trial.predicted <= target * (1 + 1e-9), best.predicted <= target * (1 + 1e-9)
    if fits != best_fits:
        return fits
    return trial.loss < best.loss * (1 - 1e-9) if fits else trial.predicted < best.predicted


def plan_with_sparsity(analysis: Analysis, scores: np.ndarray, latency: LatencyModel, target_seconds: float,
                       round_to: int = 1, normalize: bool = True, costs: np.ndarray | None = None,
                       pricer: BlockPricer | None = None, min_macs: float | None = None,
                       time_weight: float = TIME_WEIGHT) -> Choice:
    """The least-loss plan meeting ``target_seconds``: widths by plan_for_latency, per layer dense or BSR.

    With ``costs`` (the criterion's additive OBS costs per atom) and a ``pricer`` the loss is on that scale: the
    costs of the channels removed plus the OBS costs of the zeroed blocks after their re-fit. Otherwise channels
    are priced by normalised scores and blocks by their magnitude share (the module docstring). Leaves each layer's
    ``density`` at the choice. Without measured BSR options it is plan_for_latency alone (``min_macs`` and
    ``time_weight`` go to it)."""
    if costs is not None and pricer is not None:
        values, unit = np.maximum(np.nan_to_num(costs), 0.0), 1.0
    else:
        values, unit = _priced_scores(analysis, scores, normalize)
        pricer = None

    def charge_of(i: int, density: float, removed: np.ndarray, widths: tuple[int, int]) -> float:
        layer = latency.layers[i]
        priced = pricer(layer, density, removed) if pricer is not None else None
        return priced if priced is not None else layer.bsr_loss[density] * _kept(layer, widths) * unit

    def evaluate(densities: dict[int, float]) -> Choice:
        latency.set_densities(densities)
        plan = plan_for_latency(analysis, scores, latency, target_seconds, round_to, normalize=normalize,
                                min_macs=min_macs, time_weight=time_weight)
        per_layer = latency.layer_seconds(plan.removed)
        charge = sum(charge_of(i, d, plan.removed, per_layer[i][0]) for i, d in densities.items())
        return Choice(plan, dict(densities), float(values[plan.removed].sum()) + charge,
                      latency.predict(plan.removed))

    best = evaluate({})
    widths = latency.layer_seconds(best.plan.removed)
    options = []
    for i, layer in enumerate(latency.layers):
        (ci, co), seconds = widths[i]
        for density, ratio in layer.bsr.items():
            saved = seconds * (1.0 - ratio)
            if saved > 0:
                options.append((charge_of(i, density, best.plan.removed, (ci, co)) / saved, i, density))
    chosen: dict[int, float] = {}
    for _rate, i, density in sorted(options):
        if density >= chosen.get(i, 1.0):
            continue  # a sparser option of this layer is already in the prefix
        chosen[i] = density
        trial = evaluate(chosen)
        if _better(trial, best, target_seconds):
            best = trial
    latency.set_densities(best.densities)
    return best


def compensate_blocks(analysis: Analysis, scorer, plan: Plan, pruned, sparsity: dict[str, float]):
    """(model, weights compensated): the BSR layers' blocks zeroed by OBS saliency and their rows re-fitted
    (passes/block_obs.py) with the scorer's second moments of each layer's input, its kept channels; compile_model
    then finds those blocks zeroed. Without moments (magnitude criteria) a layer is left to compile_model's
    magnitude zeroing."""
    from .passes.block_obs import compensated_sparsity

    table = getattr(scorer, "moment_table", None) or {}
    layers = {layer.weight: layer for layer in analysis.layers}

    def hessian_of(node):
        layer = layers.get(node.input[1])
        return _kept_second_moment(analysis, table, layer, plan.removed) if layer is not None else None

    return compensated_sparsity(pruned, sparsity, hessian_of)


def _kept_second_moment(analysis: Analysis, table, linear, removed: np.ndarray) -> np.ndarray | None:
    """``E[x x^T]`` of ``linear``'s input over the input channels that ``removed`` leaves, or None without one."""
    from .weights import loaded

    found = table.get((linear.input, linear.input_axis))
    if found is None:
        return None
    kept = ~removed[analysis.dim_labels((linear.weight, linear.weight_in_axis))]
    second = loaded(found[1])
    return second[np.ix_(kept, kept)] if second.shape[0] == kept.size else None
