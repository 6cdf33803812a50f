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
true ones from calibration data. ``hessians`` overrides both: ``{(tensor, axis): (mean, E[xx^T])}``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.linalg import cho_factor, cho_solve

from spc.analysis import Analysis
from spc.analysis.rules.base import LinearLayer
from spc.rewrite import unique_name
from spc.weights import Spilled, loaded, read, release_freed_memory, store
from spc.weights import is_external as weights_on_disk

from .base import ImportancePass, PassContext, per_index_norm
from .moments import SPILL_BYTES, MomentOptions, Propagator, channel_sensitivity
from .obs_algebra import (  # noqa: F401
    augmented,
    compact,
    compensation,
    damped,
    damping,
    removal_cost,
    scaled_gram,
    spd_inverse,
    subtract_product,
)

GREEDY_STEPS = 64
Moments = dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]


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

class _Sweep:
    """Greedy OBS state of one consumer inside one group, kept compact (removed channels are deleted, so the work
    shrinks as the sweep goes): the inverse of the damped augmented H~ and the Gram matrix G = W'^T W' of the
    updated weights (so that a conv's many rows never enter the loop: the marginal cost of a channel is
    G_cc / (H~^-1)_cc, of a block A tr((H~^-1)_AA^-1 G_AA))."""

    def __init__(self, consumer: Consumer, local: np.ndarray, damp: float, weight: float = 1.0):
        n = consumer.width
        self.gram = scaled_gram(consumer.native, consumer.row_scale * np.sqrt(weight))
        if consumer.moments is not None:  # H~ read straight into the matrix that becomes its inverse
            mean, second = consumer.moments
            h = augmented(mean, second)
            h[np.arange(n), np.arange(n)] += damping(mean, h[:n, :n], damp)
        else:
            h = np.eye(n + 1)
        self.hinv = spd_inverse(h)
        self.atom = np.append(local, -1)  # group-local atom at each position (the constant is last, never removed)
        members = local[local >= 0]
        self.widths = np.bincount(members) if members.size else np.zeros(0, dtype=np.int64)
        self.single = bool(members.size) and bool(np.all(self.widths[np.unique(members)] == 1))

    def costs(self, total: np.ndarray) -> None:
        """Add each live atom's marginal cost to ``total``."""
        positions = np.flatnonzero(self.atom[:-1] >= 0)
        if positions.size == 0:
            return
        atoms = self.atom[positions]
        if self.single:
            diag = np.maximum(np.diag(self.hinv)[positions], 1e-300)
            total[atoms] += np.maximum(np.diag(self.gram)[positions], 0.0) / diag
            return
        for atom in np.unique(atoms):
            cols = positions[atoms == atom]
            hb = self.hinv[np.ix_(cols, cols)]
            try:
                x = np.linalg.solve(hb, self.gram[np.ix_(cols, cols)])
            except np.linalg.LinAlgError:
                x = np.linalg.lstsq(hb, self.gram[np.ix_(cols, cols)], rcond=None)[0]
            total[atom] += float(np.trace(x))

    def remove(self, atoms: np.ndarray) -> None:
        gone = np.isin(self.atom, atoms)
        if not gone.any():
            return
        cols = np.flatnonzero(gone)
        keep = np.flatnonzero(~gone)
        hb = self.hinv[np.ix_(cols, cols)]
        hb = 0.5 * (hb + hb.T)
        hb[np.diag_indices_from(hb)] += 1e-12 * max(float(np.abs(np.diag(hb)).max()), 1e-300)
        try:
            hb_inv = cho_solve(cho_factor(hb, lower=True, check_finite=False), np.eye(cols.size), check_finite=False)
        except np.linalg.LinAlgError:
            hb_inv = np.linalg.pinv(hb)
        g = hb_inv @ self.hinv[np.ix_(cols, keep)]  # [b, kept]: W'_K -= W'_C g, H~^-1_KK -= H~^-1_KC g
        gk = g[:, :-1]
        keep_real = keep[:-1]
        cross = self.gram[np.ix_(cols, keep_real)]  # G_CK
        corner = self.gram[np.ix_(cols, cols)]
        gram = compact(self.gram, keep_real)
        # G' = G_KK - G_KC g - g^T G_CK + g^T G_CC g = G_KK - G_KC g - g^T (G_CK - G_CC g)
        subtract_product(gram, cross.T, gk)
        subtract_product(gram, gk.T, cross - corner @ gk)
        self.gram = gram
        left = self.hinv[np.ix_(keep, cols)]  # [kept, b]
        hinv = compact(self.hinv, keep)  # in the old matrix's memory: no second n x n is made
        subtract_product(hinv, left, g)
        self.hinv = hinv
        self.atom = self.atom[keep]


def _limit_threads():
    """One BLAS thread: OpenBLAS's threaded Cholesky and thin rank-b updates are slower with two threads than with
    one on this 2-core machine (measured: potrf at n=2048 0.13 s with one thread, 0.41 s with two)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1, user_api="blas")
    except Exception:  # threadpoolctl is optional
        import contextlib

        return contextlib.nullcontext()


def output_energy(consumer: Consumer) -> float:
    """E||diag(s) W (x - m)||^2: the variance of the consumer's (normalised) output."""
    w = consumer.matrix * consumer.row_scale[:, None]
    if consumer.moments is None:
        return float((w * w).sum())
    mean, second = consumer.hessian()
    cov = second - np.outer(mean, mean)
    return float(np.einsum("ij,jk,ik->", w, cov, w))


def greedy_costs(consumers: list[Consumer], local_labels: list[np.ndarray], atom_count: int, damp: float,
                 steps: int = GREEDY_STEPS, weights: list[float] | None = None) -> np.ndarray:
    """Marginal OBS cost of each group-local atom at the moment the greedy sweep removes it (running max)."""
    weights = weights or [1.0] * len(consumers)
    with _limit_threads():
        sweeps = [_Sweep(c, loc, damp, wt) for c, loc, wt in zip(consumers, local_labels, weights)]
        alive = np.ones(atom_count, dtype=bool)
        cost = np.zeros(atom_count)
        if atom_count > 512:  # wide groups: half as many (larger) steps; the first blocks are what the plan uses
            steps = max(1, steps // 2)
        block = max(1, -(-atom_count // steps))
        level = 0.0
        while alive.any():
            total = np.zeros(atom_count)
            for sweep in sweeps:
                sweep.costs(total)
            candidates = np.flatnonzero(alive)
            chosen = candidates[np.argsort(total[candidates], kind="stable")[:block]]
            for atom in chosen:  # a running max keeps scores in removal order
                level = max(level, float(total[atom]))
                cost[atom] = level
            alive[chosen] = False
            if alive.any():
                for sweep in sweeps:
                    sweep.remove(chosen)
    return cost


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
        editor = _Editor(analysis, pruned, plan.removed)
        with _limit_threads():
            self._compensate_all(analysis, plan, editor)
        model = editor.finish()
        release_freed_memory()
        return model

    def _compensate_all(self, analysis: Analysis, plan, editor: _Editor) -> None:
        for consumer in self.consumers:
            removed = plan.removed[consumer.labels]
            if not removed.any() or removed.all() or consumer.moments is None:
                continue
            self._one_shot(analysis, consumer, removed, editor)

    def _one_shot(self, analysis: Analysis, consumer, removed, editor: "_Editor") -> None:
        """Least-squares update of one consumer from its (estimated or measured) input moments."""
        mean, second = consumer.moments  # second may stay on disk: compensation reads it a block at a time
        new, bias = compensation(consumer.native, mean, second, removed, self.damp)
        editor.set_weight(consumer, new)
        del new
        out_channels = analysis.graph.shape(consumer.layer.weight)[consumer.layer.weight_out_axis]
        per_out = np.bincount(consumer.out_index, weights=bias, minlength=out_channels)
        if np.any(per_out != 0):
            editor.add_bias(consumer, per_out)


def current_dtype(tensor: onnx.TensorProto) -> np.dtype:
    """The numpy type a tensor reads back as (without reading it)."""
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


class _Editor:
    """Writes compensated weights and bias changes into the pruned model (initializers keep their names)."""

    def __init__(self, analysis: Analysis, model: onnx.ModelProto, removed: np.ndarray):
        self.analysis = analysis
        self.graph = analysis.graph
        self.model = model
        self.removed = removed
        self.inits = {init.name: init for init in model.graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self.nodes = {node.name: node for node in model.graph.node}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.names = set(self.inits) | {o for node in model.graph.node for o in node.output}

    def kept(self, tensor: str, axis: int) -> np.ndarray:
        key = (tensor, axis)
        size = self.graph.shape(tensor)[axis]
        if key not in self.analysis.space.dims or self.analysis.space.dims[key].dynamic:
            return np.arange(size)
        return np.flatnonzero(~self.removed[self.analysis.dim_labels(key)])

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            array = read(self.inits[name])
            self.arrays[name] = array if array.flags.writeable and array.flags.owndata else array.copy()
        return self.arrays[name]

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def set_weight(self, consumer: Consumer, kept_matrix: np.ndarray) -> None:
        layer = consumer.layer
        current = self.inits[layer.weight]
        dtype = current_dtype(current)  # cast before slicing: the copies are in the weight's own precision
        full = matrix_to_weight(kept_matrix.astype(dtype), self.graph.shape(layer.weight), layer.weight_in_axis)
        for axis in range(full.ndim):
            kept = self.kept(layer.weight, axis)
            if axis != layer.weight_in_axis and kept.size != full.shape[axis]:
                full = np.take(full, kept, axis=axis)
        if tuple(current.dims) != full.shape:
            return  # the rewrite sliced this weight differently than expected: leave it as it is
        self.arrays.pop(layer.weight, None)
        full = np.ascontiguousarray(full)
        if weights_on_disk(current):  # straight back to disk: the compensated weights are never all in memory
            current.CopyFrom(store(numpy_helper.from_array(full, current.name), current))
            return
        self.arrays[layer.weight] = full

    def _out_slice(self, consumer: Consumer, values: np.ndarray) -> np.ndarray:
        layer = consumer.layer
        return values[self.kept(layer.weight, layer.weight_out_axis)]

    def add_bias(self, consumer: Consumer, per_out: np.ndarray) -> None:
        layer = consumer.layer
        delta = self._out_slice(consumer, per_out)
        node = self.nodes.get(layer.node)
        if node is None:
            return
        graph = self.graph
        # 1. the layer's own bias
        if layer.bias and layer.bias in self.inits and self.uses.get(layer.bias, 0) == 1:
            bias = self.array(layer.bias)
            if bias.size == delta.size:
                self.arrays[layer.bias] = (bias + delta.reshape(bias.shape)).astype(bias.dtype)
                return
        users = graph.consumers.get(layer.output, [])
        if len(users) == 1:
            user = users[0]
            # 2. a BatchNorm that follows: its running mean absorbs the constant
            if user.op_type == "BatchNormalization" and user.input[0] == layer.output:
                mean_name = user.input[3]
                if mean_name in self.inits and self.uses.get(mean_name, 0) == 1:
                    mean = self.array(mean_name)
                    if mean.size == delta.size:
                        self.arrays[mean_name] = (mean - delta).astype(mean.dtype)
                        return
            # 3. the bias Add that follows a MatMul
            if user.op_type == "Add" and layer.kind == "matmul":
                other = user.input[1] if user.input[0] == layer.output else user.input[0]
                if other in self.inits and self.uses.get(other, 0) == 1:
                    value = self.array(other)
                    if value.size == delta.size and value.shape[-1] == delta.size:
                        self.arrays[other] = (value + delta.reshape(value.shape)).astype(value.dtype)
                        return
        # 4. a new bias: a Conv/Gemm input, or an Add after a MatMul, in the weight's own precision (fp16 stays fp16)
        dtype = self.graph.weight(layer.weight).dtype
        if layer.kind in ("conv", "convtranspose") and (len(node.input) < 3 or not node.input[2]):
            name = self.fresh(f"{layer.weight}_obs_bias")
            self.arrays[name] = delta.astype(dtype)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
            return
        if layer.kind == "gemm" and (len(node.input) < 3 or not node.input[2]):
            name = self.fresh(f"{layer.weight}_obs_bias")
            self.arrays[name] = delta.astype(dtype)
            node.input.append(name)
            return
        name = self.fresh(f"{layer.weight}_obs_bias")
        self.arrays[name] = delta.astype(dtype)
        raw = self.fresh(f"{layer.output}_pre_obs_bias")
        old_output = node.output[0]
        node.output[0] = raw
        add = helper.make_node("Add", [raw, name], [old_output], name=self.fresh(f"{layer.node}_obs_bias_add"))
        nodes = list(self.model.graph.node)
        position = next(i for i, n in enumerate(nodes) if n is node or n.name == node.name)
        self.model.graph.node.insert(position + 1, add)

    def current(self) -> onnx.ModelProto:
        """A copy of the model with the edits made so far (for sequential calibration)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        for position, init in enumerate(graph.initializer):
            if init.name in self.arrays:
                graph.initializer[position].CopyFrom(numpy_helper.from_array(self.arrays[init.name], init.name))
        existing = {init.name for init in graph.initializer}
        for name, array in self.arrays.items():
            if name not in existing:
                graph.initializer.append(numpy_helper.from_array(array, name))
        return model

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        for position, init in enumerate(graph.initializer):
            if init.name in self.arrays:
                tensor = numpy_helper.from_array(self.arrays.pop(init.name), init.name)
                graph.initializer[position].CopyFrom(store(tensor, init))
        for name, array in self.arrays.items():
            graph.initializer.append(numpy_helper.from_array(array, name))
        return self.model
