"""Moment rules of the layers with constant weights: Conv (plain, grouped, depthwise; the spatial model of its
taps), Gemm, and MatMul (a constant weight, or the attention mix ``softmax(QK^T) @ V``)."""

from __future__ import annotations

import numpy as np

from spc.graph import node_attr

from .gaussian import Gauss, _sandwich, _sym, marginal


class LinearRules:
    """Propagator rules of Conv, Gemm and MatMul (a mixin of ``Propagator``)."""

    def _conv(self, node):
        x = self.gauss(node.input[0])
        w = self.const(node.input[1])
        if w is None or x is None or 1 not in x.axes:
            return None
        x = marginal(x, (1,))
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        groups = int(node_attr(node, "group", 1))
        out_ch, per_in = w.shape[0], w.shape[1]
        taps = int(np.prod(w.shape[2:], dtype=np.int64))
        rho = self.options.spatial
        w3 = w.reshape(out_ch, per_in, taps)
        if groups == 1:
            wsum = w3.sum(axis=2)
            mean = wsum @ x.mean
            if taps == 1:
                cov = wsum @ x.cov @ wsum.T
            else:  # float32 for the big products: an estimate, not an exact quantity
                wt = w3.transpose(2, 0, 1).astype(np.float32)  # [T, O, I]
                a = (wt @ x.cov.astype(np.float32)).transpose(1, 0, 2).reshape(out_ch, taps * per_in)
                indep = (a @ wt.transpose(1, 0, 2).reshape(out_ch, taps * per_in).T).astype(np.float64)
                full = wsum @ x.cov @ wsum.T
                cov = (1 - rho) * indep + rho * full
        else:
            per_out = out_ch // groups
            in_index = (np.arange(out_ch) // per_out)[:, None] * per_in + np.arange(per_in)[None, :]  # [O, per_in]
            wsum = w3.sum(axis=2)
            mean = (wsum * x.mean[in_index]).sum(axis=1)
            if per_in == 1:  # depthwise (possibly with a channel multiplier)
                src = in_index[:, 0]
                wmat = w3[:, 0, :]
                mix = (1 - rho) * (wmat @ wmat.T) + rho * np.outer(wsum[:, 0], wsum[:, 0])
                cov = x.cov[np.ix_(src, src)] * mix
            else:
                cov = np.zeros((out_ch, out_ch))
                pairs = groups * groups <= 1024
                for g in range(groups):
                    rows = slice(g * per_out, (g + 1) * per_out)
                    ins = slice(g * per_in, (g + 1) * per_in)
                    for h in range(groups) if pairs else (g,):
                        rows_h = slice(h * per_out, (h + 1) * per_out)
                        ins_h = slice(h * per_in, (h + 1) * per_in)
                        s = x.cov[ins, ins_h]
                        indep = sum(w3[rows, :, t] @ s @ w3[rows_h, :, t].T for t in range(taps))
                        full = wsum[rows] @ s @ wsum[rows_h].T
                        cov[rows, rows_h] = (1 - rho) * indep + rho * full
        if b is not None:
            mean = mean + b
        sq = (1 - rho) * (w3**2).sum(axis=2) + rho * w3.sum(axis=2) ** 2  # [O, per_in]
        if groups == 1:
            self._back(node, lambda s, xn=node.input[0], sq=sq, ax=x.axes, sz=x.sizes: [(xn, ax, sz, sq.T @ s)])
        else:
            self._back(node, lambda s, xn=node.input[0], sq=sq, idx=in_index, ax=x.axes, sz=x.sizes, w=x.width: [
                (xn, ax, sz, np.bincount(idx.reshape(-1), weights=(sq * s[:, None]).reshape(-1), minlength=w))])
        return Gauss((1,), (out_ch,), mean, _sym(cov))

    def _linear(self, x: Gauss, w: np.ndarray, b, axis: int, node=None) -> Gauss:
        """x's feature ``axis`` contracted with w [K, N] (the output's same axis has N features)."""
        if node is not None and self.keep_backward:  # w**2 is n x n: made only when it is kept
            w2 = np.asarray(w, dtype=np.float64) ** 2
            self._back(node, lambda s, xn=node.input[0], w2=w2, ax=x.axes, sz=x.sizes: [(xn, ax, sz, w2 @ s)])
        mean, cov = _sandwich(w, x.mean, x.cov)
        if b is not None:
            mean = mean + b
        return Gauss((axis,), (w.shape[1],), mean, cov)

    def _gemm(self, node):
        a, b = node.input[0], node.input[1]
        wb = self.graph.weight(b)  # in its own precision: _linear converts it a block at a time
        x = self.gauss(a)
        if wb is None or x is None or int(node_attr(node, "transA", 0)) or 1 not in x.axes:
            return None
        x = marginal(x, (1,))
        w = wb.T if int(node_attr(node, "transB", 0)) else wb
        alpha, beta = float(node_attr(node, "alpha", 1.0)), float(node_attr(node, "beta", 1.0))
        c = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = None
        if c is not None:
            if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return None
            bias = beta * np.broadcast_to(c.reshape(-1), (w.shape[1],))
        return self._linear(x, alpha * w.astype(np.float64) if alpha != 1.0 else w, bias, 1, node)

    def _matmul(self, node):
        a, b = node.input[0], node.input[1]
        wb = self.graph.weight(b)  # in its own precision: _linear converts it a block at a time
        out_shape = self.shape(node.output[0])
        if wb is not None and wb.ndim == 2:
            x = self.gauss(a)
            rank = len(self.shape(a) or ())
            if x is None or rank < 2 or (rank - 1) not in x.axes:
                return None
            return self._linear(marginal(x, (rank - 1,)), wb, None, len(out_shape) - 1, node)
        if self.const(a) is None and wb is None:  # a mix over positions: softmax(QK^T) @ V
            v = self.gauss(b)
            rb = len(self.shape(b) or ())
            if v is None or rb < 2 or (rb - 2) in v.axes or len(out_shape) != rb:
                return None
            mix = self.options.attention_mix
            self._back(node, lambda s, vn=b, ax=v.axes, sz=v.sizes, mix=mix: [(vn, ax, sz, s * mix)])
            return Gauss(v.axes, v.sizes, v.mean.copy(), v.cov * mix)
        return None
