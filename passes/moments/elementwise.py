"""Moment rules of elementwise ops: unary functions applied on the grid of a ``Func``, binary ops with a per-feature
constant (still a ``Func``), a positional constant (a mixture over positions), or another tensor (independent sum
or product; an RMSNorm written as ops)."""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from spc.graph import node_attr

from .gaussian import Func, Gauss, _sym, as_func, marginal, materialise

def _sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def _leaky_relu(node, v, const):
    alpha = node_attr(node, "alpha", 0.01)
    return np.where(v > 0, v, alpha * v)


def _clip(node, v, const):
    """Bounds from inputs (opset >= 11) or attributes; a bound computed at run time gives no estimate."""
    lo = const(node.input[1]) if len(node.input) > 1 and node.input[1] else node_attr(node, "min")
    hi = const(node.input[2]) if len(node.input) > 2 and node.input[2] else node_attr(node, "max")
    if (len(node.input) > 1 and node.input[1] and lo is None) or (len(node.input) > 2 and node.input[2]
                                                                   and hi is None):
        return None
    out = v
    if lo is not None:
        out = np.maximum(out, float(np.asarray(lo)))
    if hi is not None:
        out = np.minimum(out, float(np.asarray(hi)))
    return out


def _elu(node, v, const):
    alpha = node_attr(node, "alpha", 1.0)
    return np.where(v > 0, v, alpha * np.expm1(np.minimum(v, 0.0)))


def _selu(node, v, const):
    alpha = node_attr(node, "alpha", 1.67326319217681884765625)
    gamma = node_attr(node, "gamma", 1.05070102214813232421875)
    return gamma * np.where(v > 0, v, alpha * np.expm1(np.minimum(v, 0.0)))


def _hard_sigmoid(node, v, const):
    alpha, beta = node_attr(node, "alpha", 0.2), node_attr(node, "beta", 0.5)
    return np.clip(alpha * v + beta, 0.0, 1.0)


def _gelu(node, v, const):
    if node_attr(node, "approximate", "none") == "tanh":
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    return 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))


UNARY = {  # op -> its function of the values; the ones with attributes or bound inputs take (node, v, const)
    **dict.fromkeys(("Identity", "Dropout", "Cast"), lambda v: v),
    "Relu": lambda v: np.maximum(v, 0.0),
    "Sigmoid": _sigmoid,
    "Tanh": np.tanh,
    "Erf": erf,
    "Exp": lambda v: np.exp(np.minimum(v, 50.0)),
    "Abs": np.abs,
    "Neg": lambda v: -v,
    "Sqrt": lambda v: np.sqrt(np.maximum(v, 0.0)),
    "Reciprocal": lambda v: 1.0 / np.where(np.abs(v) < 1e-6, 1e-6, v),
    "Softplus": lambda v: np.logaddexp(0.0, v),
    "HardSwish": lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0),
    "Mish": lambda v: v * np.tanh(np.logaddexp(0.0, v)),
    **dict.fromkeys(("Swish", "SiLU"), lambda v: v * _sigmoid(v)),
    "Softsign": lambda v: v / (1 + np.abs(v)),
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Round": np.round,
    "Sign": np.sign,
    "Log": lambda v: np.log(np.maximum(v, 1e-12)),
}
UNARY_WITH_NODE = {"LeakyRelu": _leaky_relu, "Clip": _clip, "Elu": _elu, "Selu": _selu, "HardSigmoid": _hard_sigmoid,
                   "Gelu": _gelu}
UNARY_OPS = UNARY.keys() | UNARY_WITH_NODE.keys()


def _unary(node, v: np.ndarray, const) -> np.ndarray | None:
    """``node``'s elementwise function applied to the values ``v`` (None: an op or bound that cannot be followed)."""
    plain = UNARY.get(node.op_type)
    if plain is not None:
        return plain(v)
    with_node = UNARY_WITH_NODE.get(node.op_type)
    return None if with_node is None else with_node(node, v, const)


def _pow(a, b):
    return np.sign(a) * np.abs(a) ** b if np.all(np.asarray(b) == np.round(b)) else np.abs(a) ** b


BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum,
          "Div": lambda a, b: a / np.where(np.abs(b) < 1e-12, 1e-12, b), "Pow": _pow,
          "PRelu": lambda a, b: np.where(a > 0, a, b * a)}


def _binary(op: str, a, b):
    return BINARY[op](a, b)


class ElementwiseRules:
    """Propagator rules of elementwise ops (a mixin of ``Propagator``)."""

    def _unary(self, node):
        state = self.get(node.input[0])
        if state is None:
            return None
        if node.op_type in ("Identity", "Dropout", "Cast"):
            return state
        f = as_func(state)
        values = _unary(node, f.values, self.const)
        return None if values is None else Func(f.base, values)

    def _channel_const(self, name: str, state, out_name: str) -> np.ndarray | None:
        """A constant operand as one value per feature of ``state`` ([F, 1]), or None if it varies elsewhere."""
        value = self.const(name)
        out_shape = self.shape(out_name)
        if value is None or out_shape is None:
            return None
        rank = len(out_shape)
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
        for axis, size in enumerate(value.shape):
            if size != 1 and axis not in state.axes:
                return None
        sub = value.reshape([value.shape[a] for a in state.axes]) if value.size > 1 else value.reshape(())
        return np.broadcast_to(sub, state.sizes).reshape(-1, 1)

    def _binary(self, node):
        op = node.op_type
        if len(node.input) != 2:
            return None
        a, b = node.input
        ca, cb = self.const(a), self.const(b)
        sa, sb = self.get(a), self.get(b)
        if ca is not None and cb is not None:
            return None
        if ca is not None or cb is not None:  # tensor with a constant
            state, const_name, tensor_first = (sb, a, False) if ca is not None else (sa, b, True)
            if state is None:
                return None
            c = self._channel_const(const_name, state, node.output[0])
            if c is not None:
                f = as_func(state)
                values = _binary(op, f.values, c) if tensor_first else _binary(op, c, f.values)
                return Func(f.base, values)
            if op in ("Add", "Sub"):  # a constant with positions (a positional embedding): a mixture over them
                return self._add_positional(node, state, const_name, tensor_first)
            return None
        if op in ("Mul", "Div") and (sa is None) != (sb is None):
            x, stat = (a, b) if sb is None else (b, a)
            if op == "Mul" or x == a:
                return self._explicit_rms(node, x, stat, divide=op == "Div")
        if sa is None or sb is None:
            return None
        fa, fb = sa, sb
        base_a = fa.base if isinstance(fa, Func) else fa
        base_b = fb.base if isinstance(fb, Func) else fb
        if base_a is base_b:
            return Func(base_a, _binary(op, as_func(fa).values, as_func(fb).values))
        ga, gb = self.gauss(a), self.gauss(b)
        shape_a, shape_b, out = self.shape(a), self.shape(b), self.shape(node.output[0])
        if ga is None or gb is None or shape_a is None or shape_b is None or out is None:
            return None
        ga, gb = self._aligned(ga, shape_a, out), self._aligned(gb, shape_b, out)
        if ga is None or gb is None:
            return None
        common = tuple(sorted(set(ga.axes) & set(gb.axes)))
        if not common:
            return None
        ga, gb = marginal(ga, common), marginal(gb, common)
        if ga.sizes != gb.sizes:
            return None
        sizes = ga.sizes
        shift_a, shift_b = len(out) - len(shape_a), len(out) - len(shape_b)
        axes_a = tuple(x - shift_a for x in common)
        axes_b = tuple(x - shift_b for x in common)
        if op in ("Add", "Sub"):
            self._back(node, lambda s: [(a, axes_a, sizes, s), (b, axes_b, sizes, s)])
        if op == "Add":
            return Gauss(common, ga.sizes, ga.mean + gb.mean, ga.cov + gb.cov)
        if op == "Sub":
            return Gauss(common, ga.sizes, ga.mean - gb.mean, ga.cov + gb.cov)
        if op == "Mul":  # independent factors
            ea, eb = np.diag(ga.second()).copy(), np.diag(gb.second()).copy()
            self._back(node, lambda s: [(a, axes_a, sizes, s * eb), (b, axes_b, sizes, s * ea)])
            sa2, sb2 = ga.second(), gb.second()
            mean = ga.mean * gb.mean
            return Gauss(common, ga.sizes, mean, _sym(sa2 * sb2 - np.outer(mean, mean)))
        return None

    @staticmethod
    def _aligned(state: Gauss, shape, out) -> Gauss | None:
        shift = len(out) - len(shape)
        axes = []
        for axis in state.axes:
            if shape[axis] != out[axis + shift]:
                return None
            axes.append(axis + shift)
        return Gauss(tuple(axes), state.sizes, state.mean, state.cov)

    def _add_positional(self, node, state, const_name, tensor_first):
        gauss = materialise(state, self.options.hermite_terms)
        value = self.const(const_name)
        out = self.shape(node.output[0])
        if gauss is None or value is None or out is None or len(out) < value.ndim:
            return None
        rank = len(out)
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
        feature_axes = gauss.axes
        if any(value.shape[a] not in (1, out[a]) for a in feature_axes):
            return None
        full = np.broadcast_to(value, tuple(value.shape[a] if a not in feature_axes else out[a]
                                            for a in range(rank)))
        others = [a for a in range(rank) if a not in feature_axes]
        rows = full.transpose(others + list(feature_axes)).reshape(-1, gauss.width)
        mean_c = rows.mean(axis=0)
        cov_c = np.cov(rows, rowvar=False, bias=True) if rows.shape[0] > 1 else np.zeros((gauss.width,) * 2)
        tensor = node.input[0] if tensor_first else node.input[1]
        self._back(node, lambda s, t=tensor, ax=gauss.axes, sz=gauss.sizes: [(t, ax, sz, s)])
        if node.op_type == "Add":
            mean = gauss.mean + mean_c
        else:
            mean = gauss.mean - mean_c if tensor_first else mean_c - gauss.mean
        return Gauss(gauss.axes, gauss.sizes, mean, _sym(gauss.cov + np.atleast_2d(cov_c)))
