"""``Propagator``: the data-free moments of a graph's tensors, in topological order, from an input prior and the
BatchNorm anchors; ``RULES`` says which method propagates each op (unknown ops give no estimate); the backward pass
gives each channel's sensitivity at the outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spc.graph import Graph, node_attr

from ..moment_anchors import anchored
from .elementwise import BINARY, UNARY_OPS, ElementwiseRules
from .gaussian import GRID, HERMITE_TERMS, WEIGHTS, Func, Gauss, _second, _sym, marginal, materialise
from .linear import LinearRules
from .norms import NormRules
from .shapes import ShapeRules

MAX_INPUT_FEATURES = 1024
SPILL_BYTES = 16 << 20  # OBSPA spills second moments this large (n >= 1449) until it uses them


@dataclass
class MomentOptions:
    input_mean: float = 0.0
    input_std: float = 1.0
    spatial: float = 0.5  # weight of the fully-correlated-taps model in Conv covariance
    attention_mix: float = 1.0  # covariance kept by an attention average over positions
    pool_cov: float = 0.25  # covariance kept by a global average pool (measured, see the module docstring)
    anchor_bn: bool = True
    look_ahead: bool = True  # correct a tensor's moments by the BatchNorm after the linear layer reading it
    look_ahead_variance: bool = False  # ... its variances too (measured no better, moment_anchors.py)
    pool_sensitivity: float = 0.5  # error energy a global average keeps (spatially correlated errors: 1)
    hermite_terms: int = HERMITE_TERMS


RULES: dict[str, str] = {  # op type -> the Propagator method that propagates it (linear.py, norms.py, ...)
    "Conv": "_conv", "Gemm": "_gemm", "MatMul": "_matmul", "BatchNormalization": "_batch_norm",
    **dict.fromkeys(("InstanceNormalization", "GroupNormalization"), "_instance_norm"),
    **dict.fromkeys(("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"), "_layer_norm"),
    **dict.fromkeys(UNARY_OPS, "_unary"), **dict.fromkeys(BINARY, "_binary"),
    **dict.fromkeys(("Reshape", "Flatten", "Squeeze", "Unsqueeze"), "_reshape"), "Transpose": "_transpose",
    **dict.fromkeys(("MaxPool", "AveragePool", "Resize", "Upsample", "Pad", "LpPool"), "_pooled"),
    **dict.fromkeys(("GlobalAveragePool", "GlobalMaxPool"), "_global_pool"), "ReduceMean": "_reduce_mean",
    "Gather": "_gather", "Concat": "_concat", "Split": "_split",
}


class Propagator(LinearRules, NormRules, ElementwiseRules, ShapeRules):
    """Propagates the moments through a graph (``run``) and the sensitivities back (``sensitivity``)."""

    def __init__(self, graph: Graph, options: MomentOptions | None = None, spill_bytes: int | None = None,
                 keep_backward: bool = True):
        self.graph = graph
        self.spill_bytes = spill_bytes
        self.keep_backward = keep_backward
        self.options = options or MomentOptions()
        self.states: dict[str, object] = {}
        self._symbols: dict[str, int] = {}
        self.layout: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.func_base: dict[str, tuple[str, np.ndarray]] = {}
        self.backward: dict[str, object] = {}
        self._node_name = ""

    # shapes with symbolic sizes turned into distinct large numbers, so reshapes can be matched
    def shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.graph.shape(name)
        if shape is None:
            return None
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append(d)
            else:
                out.append(self._symbols.setdefault(d, 1_000_003 + 2 * len(self._symbols)))
        return tuple(out)

    def const(self, name: str):
        if not name:
            return None
        value = self.graph.weight(name)
        return None if value is None else np.asarray(value, dtype=np.float64)

    def run(self, wanted: list[tuple[str, int]], everything: bool = False
            ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        """Propagate in graph order; only the nodes the wanted tensors depend on, unless ``everything`` (which the
        sensitivity pass needs)."""
        graph = self.graph
        needed = {tensor for tensor, _ in wanted}
        if not everything:
            for node in reversed(graph.nodes):
                if any(out in needed for out in node.output):
                    needed.update(name for name in node.input if name)
        wanted_by_tensor: dict[str, list[int]] = {}
        for tensor, axis in wanted:
            wanted_by_tensor.setdefault(tensor, []).append(axis)
        uses: dict[str, int] = {}
        for node in graph.nodes:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        results: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

        def record(name: str):
            for axis in wanted_by_tensor.get(name, []):
                state = self.states.get(name)
                gauss = marginal(materialise(state, self.options.hermite_terms), (axis,))
                if gauss is not None:
                    results[(name, axis)] = (gauss.mean.copy(), _second(gauss, self.spill_bytes))

        for name in graph.inputs:
            self.states[name] = self._look_ahead(name, self._input(name))
            self._remember(name, self.states[name])
            record(name)
        for node in graph.nodes:
            self._node_name = node.name
            if not everything and not any(out in needed for out in node.output):
                continue
            try:
                outputs = self._node(node)
            except Exception:  # an estimate that cannot be made is no estimate, never a failure
                outputs = None
            for index, out in enumerate(node.output):
                if not out:
                    continue
                state = outputs[index] if outputs is not None and index < len(outputs) else None
                state = self._look_ahead(out, state)
                self.states[out] = state
                self._remember(out, state)
                record(out)
            for name in node.input:
                uses[name] -= 1
                if uses[name] == 0 and name in self.states and name not in graph.outputs:
                    del self.states[name]
        if not everything:
            self.states.clear()
        return results

    def _look_ahead(self, name: str, state):
        """``state`` corrected by the BatchNorm-anchored layers that read it (moment_anchors.py). A function of a
        Gaussian is only replaced by its moments when nothing elementwise reads it (that needs the function)."""
        if not self.options.look_ahead or state is None or tuple(state.axes) != (1,):
            return state
        readers = self.graph.consumers.get(name, [])
        if not any(node.op_type in ("Conv", "Gemm", "MatMul") for node in readers):
            return state
        if isinstance(state, Func) and any(node.op_type not in ("Conv", "Gemm", "MatMul") for node in readers):
            return state
        try:
            gauss = materialise(state, self.options.hermite_terms)
            found = anchored(self.graph, name, gauss.mean, gauss.cov, self.const, self.options.look_ahead_variance)
        except (ValueError, np.linalg.LinAlgError):  # a correction that cannot be made leaves the estimate as it is
            return state
        if found is None or not (np.all(np.isfinite(found[0])) and np.all(np.isfinite(found[1]))):
            return state
        return Gauss(gauss.axes, gauss.sizes, found[0], _sym(found[1]), gauss.name)

    def _remember(self, name: str, state) -> None:
        """Keep what the backward (sensitivity) pass needs: each tensor's feature layout, and for a tensor computed
        elementwise from a Gaussian base, E[(d out / d base)^2] per feature."""
        if state is None:
            return
        self.layout[name] = (tuple(state.axes), tuple(state.sizes))
        if isinstance(state, Gauss):
            if state.name is None:
                state.name = name
            elif state.name != name:  # the same moments under another name (Identity, Dropout)
                source = state.name
                self.backward[f"@alias/{name}"] = (name, lambda s, src=source, ax=state.axes, sz=state.sizes:
                                                   [(src, ax, sz, s)])
        elif isinstance(state, Func) and state.base.name is not None:
            slope = np.gradient(state.values, GRID, axis=1) / state.base.std()[:, None]
            self.func_base[name] = (state.base.name, (slope**2) @ WEIGHTS)

    def _back(self, node, fn) -> None:
        """Register the backward rule of ``node``: its first output's sensitivity -> [(input, axes, sizes, s)].
        Kept only for ``sensitivity()``: the rules of linear layers hold their squared weights (float64), which
        over a whole network is twice the model's size."""
        if self.keep_backward:
            self.backward[node.name] = (node.output[0], fn)

    def sensitivity(self) -> dict[str, np.ndarray]:
        """Per-feature sensitivity of every tensor: the output energy that unit-variance, independent errors on a
        feature would cause at the graph outputs, through the linearised network (diagonal approximation)."""
        sens: dict[str, np.ndarray] = {}
        for name in self.graph.outputs:
            if name in self.layout:
                axes, sizes = self.layout[name]
                sens[name] = np.ones(int(np.prod(sizes, dtype=np.int64)) if sizes else 1)
        by_output: dict[str, list] = {}
        for key, (out, fn) in self.backward.items():
            by_output.setdefault(out, []).append(fn)
        producer_order = {}
        for index, node in enumerate(self.graph.nodes):
            for out in node.output:
                producer_order[out] = index
        tensors = sorted(self.layout, key=lambda t: producer_order.get(t, -1), reverse=True)
        for name in tensors:
            s = sens.get(name)
            if s is None:
                continue
            if name in self.func_base:
                base, g = self.func_base[name]
                axes, sizes = self.layout[name]
                self._accumulate(sens, base, axes, sizes, s * g)
                continue
            for fn in by_output.get(name, []):
                try:
                    contributions = fn(s)
                except Exception:
                    contributions = []
                for target, axes, sizes, value in contributions:
                    self._accumulate(sens, target, tuple(axes), tuple(sizes), value)
        return sens

    def _accumulate(self, sens, name, axes, sizes, value) -> None:
        layout = self.layout.get(name)
        if layout is None or value is None:
            return
        to_axes, to_sizes = layout
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if (to_axes, to_sizes) != (axes, sizes):
            if not set(axes) <= set(to_axes) or any(to_sizes[to_axes.index(a)] != z for a, z in zip(axes, sizes)):
                return
            shape = [to_sizes[i] if a in axes else 1 for i, a in enumerate(to_axes)]
            value = np.broadcast_to(value.reshape(shape), to_sizes).reshape(-1)
        if name in sens:
            sens[name] = sens[name] + value
        else:
            sens[name] = value.copy()

    def _input(self, name: str):
        shape = self.shape(name)
        dtype = self.graph.dtypes.get(name)
        if shape is None or len(shape) < 2 or dtype not in (1, 10, 11, 16):
            return None
        rest = shape[1:]
        if any(d >= 1_000_003 for d in rest):
            return None
        total = int(np.prod(rest, dtype=np.int64))
        axes = tuple(range(1, len(shape))) if total <= MAX_INPUT_FEATURES else (self._channel_axis(name, len(shape)),)
        sizes = tuple(shape[a] for a in axes)
        width = int(np.prod(sizes, dtype=np.int64))
        opt = self.options
        return Gauss(axes, sizes, np.full(width, opt.input_mean), np.eye(width) * opt.input_std**2)

    def _channel_axis(self, name: str, rank: int) -> int:
        """The axis of a model input that its layers read as channels: the last one where a MatMul contracts it
        or a LayerNorm normalises it (embeddings [batch, tokens, width]), else 1 (NCHW images, [N, C, L])."""
        for node in self.graph.consumers.get(name, []):
            if node.op_type == "MatMul" and node.input[0] == name:
                return rank - 1
            if node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
                return int(node_attr(node, "axis", -1)) % rank
        return 1

    def get(self, name: str):
        return self.states.get(name) if name else None

    def gauss(self, name: str) -> Gauss | None:
        state = self.get(name)
        if isinstance(state, Func):
            gauss = materialise(state, self.options.hermite_terms)
            self.states[name] = gauss
            return gauss
        return state

    def _node(self, node) -> list | None:
        """The states of ``node``'s outputs (None: no estimate), by the rule registered for its op."""
        rule = RULES.get(node.op_type)
        if rule is None:
            return None
        out = getattr(self, rule)(node)
        return out if isinstance(out, list) else [out]


def estimate_moments(graph: Graph, wanted: list[tuple[str, int]], options: MomentOptions | None = None
                     ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Data-free ``(mean, E[x x^T])`` along each requested (tensor, axis); missing where no estimate exists."""
    return Propagator(graph, options).run(wanted)


def channel_sensitivity(propagator: Propagator, tensor: str, axis: int) -> np.ndarray | None:
    """The sensitivity of ``tensor`` per index of ``axis`` after ``propagator.run`` (None where unknown)."""
    if not hasattr(propagator, "_sensitivity"):
        propagator._sensitivity = propagator.sensitivity()
    value = propagator._sensitivity.get(tensor)
    layout = propagator.layout.get(tensor)
    if value is None or layout is None or axis not in layout[0]:
        return None
    axes, sizes = layout
    moved = np.moveaxis(value.reshape(sizes), axes.index(axis), -1)
    return moved.reshape(-1, sizes[axes.index(axis)]).mean(axis=0)
