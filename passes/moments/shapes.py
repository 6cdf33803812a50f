"""Moment rules of ops that move features without mixing them: reshapes and transposes (the feature axes are
followed), pooling (moments unchanged, or the global pool's share of the covariance), Gather from an embedding table,
Split and Concat along a feature axis."""

from __future__ import annotations

import numpy as np

from spc.graph import node_attr

from .gaussian import Gauss, _sym, marginal


class ShapeRules:
    """Propagator rules of shape and pooling ops (a mixin of ``Propagator``)."""

    def _pooled(self, node):
        """Local pooling, resizing, padding: the per-channel moments are kept (pooled over positions)."""
        state = self.gauss(node.input[0])
        out = marginal(state, (1,)) if state is not None and 1 in state.axes else None
        if out is not None:
            self._back(node, lambda s, xn=node.input[0], ax=out.axes, sz=out.sizes: [(xn, ax, sz, s)])
        return out

    def _reshape(self, node):
        state = self.gauss(node.input[0])
        in_shape, out_shape = self.shape(node.input[0]), self.shape(node.output[0])
        if state is None or in_shape is None or out_shape is None:
            return None
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            return None
        features = set(state.axes)
        keep, out_axes = [], []
        for ins, outs in groups:
            big = [a for a in ins if in_shape[a] > 1]
            if not big:
                continue
            feats = [a for a in big if a in features]
            if feats and len(feats) == len(big):
                keep.extend(big)
                out_axes.extend(a for a in outs if out_shape[a] > 1)
        if not keep:
            return None
        state = marginal(state, tuple(keep))
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes: [(xn, ax, sz, s)])
        return Gauss(tuple(out_axes), tuple(out_shape[a] for a in out_axes), state.mean, state.cov)

    def _transpose(self, node):
        state = self.gauss(node.input[0])
        shape = self.shape(node.input[0])
        if state is None or shape is None:
            return None
        perm = node_attr(node, "perm") or list(reversed(range(len(shape))))
        new_axes = [perm.index(a) for a in state.axes]
        order = np.argsort(new_axes)
        sizes = tuple(state.sizes[i] for i in order)
        index = np.arange(state.width).reshape(state.sizes).transpose(order).reshape(-1)
        inverse = np.argsort(index)
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes, inv=inverse: [(xn, ax, sz, s[inv])])
        return Gauss(tuple(sorted(new_axes)), sizes, state.mean[index], state.cov[np.ix_(index, index)])

    def _global_pool(self, node):
        state = self.gauss(node.input[0])
        if state is None or 1 not in state.axes:
            return None
        state = marginal(state, (1,))
        factor = self.options.pool_sensitivity
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes: [(xn, ax, sz, s * factor)])
        return Gauss((1,), state.sizes, state.mean, state.cov * self.options.pool_cov)

    def _reduce_mean(self, node):
        state = self.gauss(node.input[0])
        shape = self.shape(node.input[0])
        if state is None or shape is None:
            return None
        axes = node_attr(node, "axes")
        if axes is None and len(node.input) > 1:
            axes = self.const(node.input[1])
        if axes is None:
            return None
        axes = {int(a) + len(shape) if a < 0 else int(a) for a in np.asarray(axes).reshape(-1)}
        keep = tuple(a for a in state.axes if a not in axes)
        if not keep:
            return None
        state = marginal(state, keep)
        factor = self.options.pool_sensitivity
        self._back(node, lambda s, xn=node.input[0], ax=state.axes, sz=state.sizes: [(xn, ax, sz, s * factor)])
        if not int(node_attr(node, "keepdims", 1)):
            keep = tuple(a - sum(1 for r in axes if r < a) for a in keep)
        return Gauss(keep, state.sizes, state.mean, state.cov * self.options.pool_cov)

    def _gather(self, node):
        table = self.const(node.input[0])
        axis = int(node_attr(node, "axis", 0))
        if table is None or axis != 0 or table.ndim != 2:
            return None
        index = self.graph.weight(node.input[1]) if node.input[1] else None
        rows = table if index is None else table[np.asarray(index).reshape(-1)]
        out = self.shape(node.output[0])
        if out is None:
            return None
        mean = rows.mean(axis=0)
        cov = np.cov(rows, rowvar=False, bias=True) if rows.shape[0] > 1 else np.zeros((table.shape[1],) * 2)
        return Gauss((len(out) - 1,), (table.shape[1],), mean, _sym(np.atleast_2d(cov)))

    def _split(self, node):
        """Each output keeps its slice of the features (a fused QKV projection split into Q, K and V); a split
        along an axis the state does not cover gives nothing."""
        state, shape = self.gauss(node.input[0]), self.shape(node.input[0])
        count = len(node.output)
        if state is None or shape is None:
            return [None] * count
        axis = int(node_attr(node, "axis", 0)) % len(shape)
        if axis not in state.axes:
            return [None] * count
        given = self.graph.weight(node.input[1]) if len(node.input) > 1 and node.input[1] else node_attr(node, "split")
        if given is not None:
            sizes = [int(v) for v in np.asarray(given).reshape(-1)]
        else:  # equal parts, the last one smaller if it must be (opset 18)
            step = -(-shape[axis] // count)
            sizes = [min(step, shape[axis] - i * step) for i in range(count)]
        if sum(sizes) != shape[axis] or len(sizes) != count:
            return [None] * count
        k = state.axes.index(axis)
        grid = np.arange(state.width).reshape(state.sizes)
        outputs, start = [], 0
        for size in sizes:
            index = np.take(grid, np.arange(start, start + size), axis=k).reshape(-1)
            sizes_out = state.sizes[:k] + (size,) + state.sizes[k + 1:]
            outputs.append(Gauss(state.axes, sizes_out, state.mean[index], state.cov[np.ix_(index, index)]))
            start += size
        return outputs

    def _concat(self, node):
        axis = int(node_attr(node, "axis", 0))
        out = self.shape(node.output[0])
        if out is None:
            return None
        axis = axis + len(out) if axis < 0 else axis
        parts = [self.gauss(name) for name in node.input]
        if any(p is None or axis not in p.axes for p in parts):
            return None
        parts = [marginal(p, (axis,)) for p in parts]
        widths = [p.width for p in parts]
        total = sum(widths)
        cov = np.zeros((total, total))
        start = 0
        for p, w in zip(parts, widths):
            cov[start:start + w, start:start + w] = p.cov
            start += w
        return Gauss((axis,), (total,), np.concatenate([p.mean for p in parts]), cov)


def _reshape_groups(in_shape, out_shape):
    """Pair runs of input axes with runs of output axes that hold the same elements (split/merge only)."""
    i = j = 0
    groups = []
    while i < len(in_shape) or j < len(out_shape):
        ins, outs = [], []
        pi = pj = 1
        if i < len(in_shape):
            ins.append(i)
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            outs.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                ins.append(i)
                pi *= in_shape[i]
                i += 1
            elif pj < pi and j < len(out_shape):
                outs.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                return None
        groups.append((ins, outs))
    return groups
