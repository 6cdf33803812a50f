"""Moment rules of normalisations: BatchNorm anchors the estimate to its running statistics; InstanceNorm and
GroupNorm to their affine parameters; LayerNorm and RMSNorm (an op, or written as ops the way torch exports it)
centre and scale by the expected per-token RMS."""

from __future__ import annotations

import numpy as np

from spc.graph import node_attr

from .gaussian import Gauss, _corr, _sym, marginal


class NormRules:
    """Propagator rules of normalisations (a mixin of ``Propagator``)."""

    def _batch_norm(self, node):
        scale, bias, mean, var = (self.const(n) for n in node.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            return None
        eps = float(node_attr(node, "epsilon", 1e-5))
        x = self.gauss(node.input[0])
        x = marginal(x, (1,)) if x is not None and 1 in x.axes else None
        gain = scale**2 / (var + eps)
        self._back(node, lambda s, xn=node.input[0], g=gain: [(xn, (1,), (g.size,), s * g)])
        if self.options.anchor_bn or x is None:
            rho = _corr(x.cov) if x is not None else np.eye(scale.size)
            g = scale * np.sqrt(var / (var + eps))
            return Gauss((1,), (scale.size,), bias.copy(), _sym(rho * np.outer(g, g)))
        s = scale / np.sqrt(var + eps)
        return Gauss((1,), (scale.size,), s * (x.mean - mean) + bias, _sym(x.cov * np.outer(s, s)))

    def _instance_norm(self, node):
        scale, bias = self.const(node.input[1]), self.const(node.input[2])
        if scale is None or bias is None:
            return None
        shape = self.shape(node.input[0])
        channels = shape[1] if shape else None
        if channels is None or scale.size != channels:
            return None
        x = self.gauss(node.input[0])
        x = marginal(x, (1,)) if x is not None and 1 in x.axes else None
        rho = _corr(x.cov) if x is not None else np.eye(channels)
        return Gauss((1,), (channels,), bias.copy(), _sym(rho * np.outer(scale, scale)))

    def _layer_norm(self, node):
        shape = self.shape(node.input[0])
        if shape is None:
            return None
        rank = len(shape)
        axis = int(node_attr(node, "axis", -1))
        axis = axis + rank if axis < 0 else axis
        if axis != rank - 1:
            return None
        n = shape[-1]
        scale = self.const(node.input[1])
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale = np.ones(n) if scale is None else np.broadcast_to(scale.reshape(-1), (n,))
        bias = np.zeros(n) if bias is None else np.broadcast_to(bias.reshape(-1), (n,))
        eps = float(node_attr(node, "epsilon", 1e-5))
        x = self.gauss(node.input[0])
        x = marginal(x, (axis,)) if x is not None and axis in x.axes else None
        if x is None:
            mean, cov = np.zeros(n), np.eye(n)
        else:
            centred = node.op_type == "LayerNormalization"
            p = np.eye(n) - (1.0 / n if centred else 0.0)
            m, c = p @ x.mean, p @ x.cov @ p
            s2 = (np.trace(c) + m @ m) / n + eps
            mean, cov = m / np.sqrt(s2), c / s2
        s2 = 1.0 if x is None else s2
        self._back(node, lambda s, xn=node.input[0], g=scale**2 / s2, ax=axis: [(xn, (ax,), (g.size,), s * g)])
        return Gauss((axis,), (n,), scale * mean + bias, _sym(cov * np.outer(scale, scale)))

    def _rms_epsilon(self, x: str, stat: str, divide: bool) -> float | None:
        """eps if ``stat`` is ``1 / sqrt(mean(x^2, last axis) + eps)`` (``sqrt(...)`` when ``divide``), written as
        ops the way torch exports an RMSNorm (Casts in between allowed); None otherwise."""
        chain = ["Sqrt", "Add", "ReduceMean", "Pow"] if divide else ["Reciprocal", "Sqrt", "Add", "ReduceMean", "Pow"]
        name, eps, rank = stat, None, len(self.shape(x) or ())
        for op in chain:
            node = self.graph.producer.get(name)
            while node is not None and node.op_type == "Cast":
                node = self.graph.producer.get(node.input[0])
            if node is None or node.op_type != op:
                return None
            consts = [self.const(i) for i in node.input]
            if op == "Add":
                if sum(c is not None for c in consts) != 1 or next(c for c in consts if c is not None).size != 1:
                    return None
                eps = float(next(c for c in consts if c is not None).reshape(-1)[0])
                name = next(i for i, c in zip(node.input, consts) if c is None)
                continue
            if op == "ReduceMean":
                axes = node_attr(node, "axes")
                axes = axes if axes is not None or len(node.input) < 2 else consts[1]
                if axes is None or [int(v) % rank for v in np.asarray(axes).reshape(-1)] != [rank - 1]:
                    return None
            if op == "Pow" and (consts[1] is None or float(np.asarray(consts[1]).reshape(-1)[0]) != 2.0
                                or node.input[0] != x):
                return None
            name = node.input[0]
        return eps

    def _explicit_rms(self, node, x: str, stat: str, divide: bool):
        """An RMSNorm written as ops: the features over the last axis scaled by the expected per-token RMS."""
        eps = self._rms_epsilon(x, stat, divide)
        shape = self.shape(x)
        if eps is None or not shape:
            return None
        axis = len(shape) - 1
        g = self.gauss(x)
        g = marginal(g, (axis,)) if g is not None and axis in g.axes else None
        if g is None:
            return None
        s2 = (np.trace(g.cov) + g.mean @ g.mean) / g.width + eps
        self._back(node, lambda s, xn=x, ax=axis, n=g.width, v=s2: [(xn, (ax,), (n,), s / v)])
        return Gauss((axis,), (g.width,), g.mean / np.sqrt(s2), _sym(g.cov / s2))
