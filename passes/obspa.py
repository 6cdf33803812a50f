"""OBSPA: Optimal-Brain-Surgeon pruning with compensation, data-free (``--criterion obspa``).

**The unit OBS reasons about** is a *consumer*: a layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight,
``analysis.layers``) whose input channels include pruned atoms. Its weight is viewed as a matrix ``W [rows, n]``
over its ``n`` input channels (rows = output channels x kernel taps). With the input's second moments
``H = E[x x^T]`` and mean ``m`` (pooled over samples and positions), removing the channel set ``R`` and re-fitting
the kept ones ``K`` by least squares,

    min_{W'_K, db}  E || W x - W'_K x_K - db ||^2,

is solved in closed form on the *augmented* input ``[x; 1]`` with ``H~ = [[H, m], [m^T, 1]]`` (the constant is a
column that is never removed, so the constant part of the removed channels folds into a bias):

    [W'_K, db]^T = [W_K, 0]^T + (H~_KK + lambda I)^{-1} H~_KR W_R^T,   cost(R) = tr(W_R S_R W_R^T)

with ``S_R`` the Schur complement of ``H~_KK`` (equivalently ``((H~^{-1})_RR)^{-1}``: the OBS saliency). The solve
is a Cholesky factorisation (scipy ``cho_factor``/``cho_solve``) in float64 with damping ``lambda = damp *
mean(diag Cov(x))`` (1e-2 by default); nothing is inverted explicitly there. For convolutions ``H`` is over input
channels only: with a Kronecker model ``H_full = T (x) H`` of taps and channels, the least-squares update is the
same for any tap correlation ``T`` (each tap row is re-fitted with the channel ``H``), so only the cost's weighting
of taps is approximated. ``db`` is summed over taps and lands in the layer's bias, in the running mean of a
BatchNorm that follows (``mean -= db``), in the bias Add that follows a MatMul, or in a new bias input.

**Scores**: for each group, a greedy OBS sweep over all its consumers at once orders its atoms: repeatedly remove
the atoms with the smallest summed marginal cost ``G_aa / (H~^-1)_aa`` (``G = W'^T W'``; a head uses the block form
``tr((H~^-1)_AA^-1 G_AA)``), then update every consumer's ``H~^-1`` and ``G`` with the block OBS formulas and
delete the removed channels (at most 64 steps per group, 32 above 512 atoms; one atom per step below 64 atoms, i.e.
exact greedy). Costs are measured after the BatchNorm that follows a consumer (its ``gamma / sigma`` weights each
output row), which makes them comparable across layers. An atom's score is its (running-max) marginal cost: higher
= keep. ``ranking="global"`` (default) ranks the atoms of all groups on these costs directly: the plan's per-group
mean normalisation is bypassed by returning ``-1 / cost``, negative, which ``make_plan`` uses as is;
``ranking="group"`` hands the positive costs to that normalisation. Measured alternatives (bench/README.md): group
ranking (digits transformer 3x: 0.31 vs 0.63 accuracy), costs relative to each consumer's output energy, and rows
weighted by a data-free output sensitivity (a diagonal, linearised backward pass through the network,
``weighting="sensitivity"``) did not beat BatchNorm-weighted global costs.

**Memory per consumer** (float64 n x n is 128 MiB at n = 4096): the sweep holds ``H~^-1`` and ``G``, both made
and updated in place (``G`` by a BLAS rank update per block of the weight's rows, in its own precision;
``H~`` read a block of rows at a time from its spill file into the matrix LAPACK inverts in place; removed
channels compacted within the same memory), the compensation ``H~_KK`` (factored in place) and
``H~_KR W_R^T``, so at most 2 such matrices plus the weight (``obs_algebra``; bench/bench_obspa_memory.py). Across a
model, nothing accumulates: a consumer's weight is read (from disk for a model with external data) each time it is
used and dropped after, second moments of 16 MiB or more wait in a temporary file until used, and compensated
weights of a model on disk go straight back to disk (``spc.weights``), so an LLM is scored one layer at a time in
memory. The sweep runs with one BLAS thread (OpenBLAS's threaded Cholesky and thin updates are slower with two on two cores).

The second moments come from ``moments`` (data-free, see ``passes/moments/``); ``passes/obs.py`` swaps in the
true ones from calibration data. ``hessians`` overrides both: ``{(tensor, axis): (mean, E[xx^T])}``. The pieces:
``obs_consumers`` (a consumer and its weight matrix), ``obs_sweep`` (the greedy sweep), ``obs_algebra`` (the
in-place linear algebra), ``obs_editor`` (writing compensated weights and biases into the pruned model).
"""

from __future__ import annotations

import numpy as np
import onnx

from spc.analysis import Analysis
from spc.analysis.rules.base import LinearLayer
from spc.weights import Spilled, release_freed_memory

from .base import ImportancePass, PassContext, per_index_norm
from .moments import SPILL_BYTES, MomentOptions, Propagator, channel_sensitivity
from .obs_algebra import compensation
from .obs_consumers import Consumer, _row_out_index, native_matrix
from .obs_editor import WeightEditor
from .obs_sweep import GREEDY_STEPS, greedy_costs, limit_blas_threads, output_energy

Moments = dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]


class ObspaImportance(ImportancePass):
    """OBS costs as scores and OBS compensation of the consumers, with data-free second moments."""

    normalize = False  # OBS costs compare across groups as they are

    name = "obspa"

    def __init__(self, damp: float = 1e-2, ranking: str = "global", options: MomentOptions | None = None,
                 hessians: Moments | None = None, compensate_weights: bool = True, steps: int = GREEDY_STEPS,
                 fold_mean: bool = True, normalise: str = "none", weighting: str = "batchnorm"):
        self.damp = damp
        self.normalise = normalise
        self.weighting = weighting
        self._propagator: Propagator | None = None
        self.fold_mean = fold_mean
        self.ranking = ranking
        self.options = options
        self.hessians = hessians
        self.compensate_weights = compensate_weights
        self.steps = steps
        self.consumers: list[Consumer] = []
        self.moment_table: Moments = {}

    # ------------------------------------------------------------------------------------- moments
    def moments(self, analysis: Analysis, context: PassContext, wanted: list[tuple[str, int]]) -> Moments:
        return self.propagator(analysis, wanted).run(wanted) if self._propagator is None else \
            self._propagator.run(wanted)

    def propagator(self, analysis: Analysis, wanted: list[tuple[str, int]]) -> Propagator:
        """The data-free propagation (moments and, backwards, output sensitivities), run once."""
        if self._propagator is None:
            self._propagator = Propagator(analysis.graph, self.options, spill_bytes=SPILL_BYTES,
                                          keep_backward=self.weighting == "sensitivity")
            self._moments_free = self._propagator.run(wanted, everything=self.weighting == "sensitivity")
            self._propagator.run = lambda _wanted: self._moments_free  # already done
        return self._propagator

    def _weight_rows(self, analysis: Analysis, wanted: list[tuple[str, int]]) -> None:
        """Measure each consumer's error at the network output: rows weighted by sqrt(sensitivity) of the
        consumer's output channels (data-free, see ``moments.Propagator.sensitivity``); the BatchNorm scale
        where the sensitivity is unknown."""
        if self.weighting != "sensitivity":
            return
        propagator = self.propagator(analysis, wanted)
        known = []
        for consumer in self.consumers:
            layer = consumer.layer
            s = channel_sensitivity(propagator, layer.output, layer.output_axis)
            if s is not None and s.size == consumer.out_index.max() + 1 and np.all(np.isfinite(s)):
                consumer.row_scale = np.sqrt(np.maximum(s, 0.0))[consumer.out_index]
                known.append(consumer)
        if known and len(known) < len(self.consumers):  # put the rest on a comparable scale
            ratio = np.median([float(np.mean(c.row_scale**2)) for c in known])
            for consumer in self.consumers:
                if consumer not in known:
                    consumer.row_scale = consumer.row_scale * np.sqrt(ratio)

    def _moments(self, analysis: Analysis, context: PassContext, wanted: list[tuple[str, int]]) -> Moments:
        if self.hessians is not None:
            return {key: self.hessians[key] for key in wanted if key in self.hessians}
        return self.moments(analysis, context, wanted)

    # ------------------------------------------------------------------------------------- consumers
    def find_consumers(self, analysis: Analysis) -> list[Consumer]:
        graph = analysis.graph
        prunable = np.zeros(analysis.atom_count, dtype=bool)
        for group in analysis.prunable_groups:
            prunable[group.atoms] = True
        weight_uses: dict[str, int] = {}
        for layer in analysis.layers:
            weight_uses[layer.weight] = weight_uses.get(layer.weight, 0) + 1
        consumers = []
        for layer in analysis.layers:
            key = (layer.weight, layer.weight_in_axis)
            if key not in analysis.space.dims or weight_uses[layer.weight] > 1:
                continue
            if len(graph.consumers.get(layer.weight, [])) > 1:
                continue
            labels = analysis.dim_labels(key)
            if not prunable[labels].any():
                continue
            shape = graph.shape(layer.weight)
            matrix = (lambda name=layer.weight, axis=layer.weight_in_axis: native_matrix(graph.weight(name), axis))
            out_index = _row_out_index(shape, layer.weight_in_axis, layer.weight_out_axis)
            consumers.append(Consumer(layer, matrix, labels, out_index,
                                      self._row_scale(analysis, layer, shape[layer.weight_out_axis])[out_index]))
        return consumers

    @staticmethod
    def _row_scale(analysis: Analysis, layer: LinearLayer, out_channels: int) -> np.ndarray:
        """gamma / sigma of a BatchNorm that alone consumes the layer's output (1 elsewhere)."""
        graph = analysis.graph
        users = graph.consumers.get(layer.output, [])
        if len(users) == 1 and users[0].op_type == "BatchNormalization" and users[0].input[0] == layer.output:
            node = users[0]
            scale, var = graph.weight(node.input[1]), graph.weight(node.input[4])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            if scale is not None and var is not None and scale.size == out_channels:
                return np.abs(scale.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
        return np.ones(out_channels)

    # ------------------------------------------------------------------------------------- scoring
    def score(self, analysis: Analysis, context: PassContext) -> np.ndarray:
        self.consumers = self.find_consumers(analysis)
        wanted = list(dict.fromkeys(c.key for c in self.consumers))
        self.moment_table = self._moments(analysis, context, wanted)
        self._weight_rows(analysis, wanted)
        for consumer in self.consumers:
            found = self.moment_table.get(consumer.key)
            if found is not None and found[0].size == consumer.width:
                mean = np.asarray(found[0], np.float64)
                second = found[1] if isinstance(found[1], Spilled) else np.asarray(found[1], np.float64)
                consumer.moments = (mean if self.fold_mean else np.zeros_like(mean), second)
        scores = np.zeros(analysis.atom_count)
        fallback = self._magnitude(analysis)
        group_of = np.full(analysis.atom_count, -1)
        for group in analysis.prunable_groups:
            group_of[group.atoms] = group.id
        by_group: dict[int, list[Consumer]] = {}
        for consumer in self.consumers:
            for gid in np.unique(group_of[consumer.labels]):
                if gid >= 0:
                    by_group.setdefault(int(gid), []).append(consumer)
        costs_all = []
        for group in analysis.prunable_groups:
            consumers = by_group.get(group.id, [])
            if not consumers or group.size < 1:
                scores[group.atoms] = np.nan
                continue
            local_of = np.full(analysis.atom_count, -1)
            local_of[group.atoms] = np.arange(group.size)
            locals_ = [local_of[c.labels] for c in consumers]
            weights = None
            if self.normalise == "output":
                weights = [1.0 / max(output_energy(c), 1e-300) for c in consumers]
            costs = greedy_costs(consumers, locals_, group.size, self.damp, self.steps, weights)
            scores[group.atoms] = costs
            costs_all.append(costs)
        missing = np.isnan(scores)
        if missing.any():  # groups no layer consumes (e.g. only attention scores): magnitude, on the OBS scale
            level = float(np.median(np.concatenate(costs_all))) if costs_all else 1.0
            for group in analysis.prunable_groups:
                if missing[group.atoms].any():
                    values = fallback[group.atoms]
                    scores[group.atoms] = level * values / max(values.mean(), 1e-300)
        release_freed_memory()
        self.costs = scores.copy()  # OBS costs as they are (additive): the latency planner weighs blocks against them
        return self._rank(scores)

    def _rank(self, scores: np.ndarray) -> np.ndarray:
        if self.ranking == "global":
            positive = scores[scores > 0]
            floor = float(positive.min()) * 1e-6 if positive.size else 1e-300
            return -1.0 / (np.maximum(scores, 0.0) + floor)
        return scores

    @staticmethod
    def _magnitude(analysis: Analysis) -> np.ndarray:
        totals = np.zeros(analysis.atom_count)
        for key in analysis.weight_dims:
            tensor, axis = key
            if analysis.roles.get(tensor, "weight") != "weight":
                continue
            norms = per_index_norm(analysis.graph.weight(tensor), axis, 2)
            totals += np.bincount(analysis.dim_labels(key), weights=norms, minlength=analysis.atom_count)
        return np.sqrt(totals)

    # ------------------------------------------------------------------------------------- compensation
    def compensate(self, analysis: Analysis, plan, pruned: onnx.ModelProto, context: PassContext
                   ) -> onnx.ModelProto:
        if not self.compensate_weights:
            return pruned
        if not self.consumers:
            self.consumers = self.find_consumers(analysis)
        editor = WeightEditor(analysis, pruned, plan.removed)
        with limit_blas_threads():
            self._compensate_all(analysis, plan, editor)
        model = editor.finish()
        release_freed_memory()
        return model

    def _compensate_all(self, analysis: Analysis, plan, editor: WeightEditor) -> None:
        for consumer in self.consumers:
            removed = plan.removed[consumer.labels]
            if not removed.any() or removed.all() or consumer.moments is None:
                continue
            self._one_shot(analysis, consumer, removed, editor)

    def _one_shot(self, analysis: Analysis, consumer, removed, editor: "WeightEditor") -> None:
        """Least-squares update of one consumer from its (estimated or measured) input moments."""
        mean, second = consumer.moments  # second may stay on disk: compensation reads it a block at a time
        new, bias = compensation(consumer.native, mean, second, removed, self.damp)
        editor.set_weight(consumer, new)
        del new
        out_channels = analysis.graph.shape(consumer.layer.weight)[consumer.layer.weight_out_axis]
        per_out = np.bincount(consumer.out_index, weights=bias, minlength=out_channels)
        if np.any(per_out != 0):
            editor.add_bias(consumer, per_out)
