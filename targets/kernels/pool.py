"""``max_pool2d``: NCHW max pooling as two passes per output row: the max of the window's input rows into one
contiguous row buffer (vectorised over the width, the padding columns -inf), then the max of each output's window
columns in that buffer. TVM's legalized pool computes every window element by element: ResNet-18's 3x3/2 pool on
64x112x112 took 0.947 ms there against 0.298 ms here (one thread, bench/bench_kernel_ab.py --rule maxpool)."""

from __future__ import annotations

import numpy as np

from .source import Kernel, _loop, _parse, _Src, window_count

NEG = "T.float32(-3.4028234663852886e38)"


def max_pool2d(name: str, c: int, h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
               pads: tuple[int, int, int, int], n_static: int | None = None) -> Kernel:
    """Y[n, c, oh, ow] = max of X[n, c, oh * sh - pt + i, ow * sw - pl + j] over the window's positions inside the
    image (pads: top, left, bottom, right; each smaller than the kernel, so every window holds one). No dilation,
    floor-mode output size."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = kernel, stride, pads
    oh, ow = window_count(h, pt, pb, kh, 1, sh), window_count(w, pl, pr, kw, 1, sw)
    width = max(pl + w + pr, (ow - 1) * sw + kw)  # the row buffer: padding, the image's columns, what windows reach
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    # S (a constant 1.0, read once) is a second input only because TVM's reshape detection asserts block-form TIR
    # on a function with one input and one output (see rows.softmax)
    a.signature(name, ["x: T.handle", "s: T.handle", "y: T.handle"], ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {c}, {h}, {w}), "float32")')
    a(1, 'S = T.match_buffer(s, (1,), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {c}, {oh}, {ow}), "float32")')
    work = None if n_static is None else n_static * c * oh * kh * w
    a(1, f"for q in {_loop(work)}({n} * {c * oh}):")
    image, row = f"q // {oh} // {c}", f"q // {oh} % {c}"
    a(2, f'R = T.alloc_buffer(({width},), "float32")')
    a(2, f"for v in T.vectorized({width}):")
    a(3, f"R[v] = {NEG} * S[0]")
    for i in range(kh):
        ih = f"q % {oh} * {sh} + {i - pt}"
        a(2, f"if {ih} >= 0 and {ih} < {h}:")
        a(3, f"for v in T.vectorized({w}):")
        a(4, f"R[{pl} + v] = T.max(R[{pl} + v], X[{image}, {row}, {ih}, v])")
    value = f"R[v * {sw}]"
    for j in range(1, kw):
        value = f"T.max({value}, R[v * {sw} + {j}])"
    a(2, f"for v in T.vectorized({ow}):")
    a(3, f"Y[{image}, {row}, q % {oh}, v] = {value}")
    src = a.text()
    return Kernel(name, _parse(src, name), [np.ones(1, np.float32)], src)
