"""``depthwise_conv2d``: NCHW depthwise convolution (one input channel per output channel), one channel per task:
its plane copied once into a zero-padded buffer (columns split by stride phase), then each output vector is the
weighted sum of the kernel's contiguous shifted views of it, with the bias and activation fused. TVM's legalized
grouped convolution runs the window element by element: on torchvision's MobileNetV2 (17 depthwise layers) it was
70% of the model's time and the model ran 3.1x slower than ONNX Runtime.

``Planes`` (the padded, phase-split plane layout) and ``emit_depthwise_rows`` (the taps read from it) are shared
with ``expand_depthwise.py``, which fills the planes from a 1x1 convolution instead of a copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .source import (
    Clip, CpuKernelParams, Kernel, _ceil, _epilogue, _loop, _parallel_pays, _parse, _Src, window_count,
)

# for the parallel threshold (PARALLEL_MIN_MACS, counted in a dense product's multiply-adds): a depthwise MAC reads its
# input and weight from memory and costs about what 4 of them do (one core: 7-16 GMAC/s against a GEMM's 45); counted
# as 1, layers of 200 us at batch 8 ran on one thread of two (1.4-1.8x slower than parallel)
DEPTHWISE_MAC_COST = 4


@dataclass(frozen=True)
class Planes:
    """Zero-padded input planes of a depthwise convolution, columns split by stride phase: padded column q lives at
    ``(q % sw) * part + q // sw`` of its row, so every tap of a stride-2 window reads a contiguous view. With
    ``row_phases`` the rows are split by phase too (``sh * sw`` planes of ``phase_rows`` rows of ``part``): then a
    tap's view of all output positions, flattened over rows of ``part`` columns, is one contiguous run (the flat
    form, ``emit_depthwise_flat``)."""

    h: int
    w: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    row_phases: bool = False

    @property
    def oh(self) -> int:
        return window_count(self.h, self.pads[0], self.pads[2], self.kh, self.dilation[0], self.stride[0])

    @property
    def ow(self) -> int:
        return window_count(self.w, self.pads[1], self.pads[3], self.kw, self.dilation[1], self.stride[1])

    @property
    def part(self) -> int:  # columns of one phase
        sw, dw = self.stride[1], self.dilation[1]
        return _ceil(max(self.pads[1] + self.w + self.pads[3], (self.ow - 1) * sw + (self.kw - 1) * dw + 1), sw)

    @property
    def width(self) -> int:
        return self.stride[1] * self.part

    @property
    def rows(self) -> int:
        sh, dh = self.stride[0], self.dilation[0]
        return max(self.pads[0] + self.h + self.pads[2], (self.oh - 1) * sh + (self.kh - 1) * dh + 1)

    @property
    def phase_rows(self) -> int:
        return _ceil(self.rows, self.stride[0]) if self.row_phases else self.rows

    @property
    def size(self) -> int:
        return self.stride[0] * self.phase_rows * self.width if self.row_phases else self.rows * self.width

    def column(self, q: int) -> int:
        """Where padded column ``q`` of a row lives."""
        sw = self.stride[1]
        return (q % sw) * self.part + q // sw

    def row_base(self, q: str, phase: int) -> str:
        """Offset of column phase ``phase`` of padded row ``q`` (an expression)."""
        if not self.row_phases:
            return f"({q}) * {self.width} + {phase * self.part}"
        sh, sw = self.stride
        return f"((({q}) % {sh}) * {sw} + {phase}) * {self.phase_rows * self.part} + (({q}) // {sh}) * {self.part}"

    def flat_offset(self, i: int, j: int) -> int:
        """Flat form: where tap (i, j) of output position 0 lives (position r * part + c adds r * part + c)."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        a, b = i * dh, j * dw
        return ((a % sh) * sw + b % sw) * self.phase_rows * self.part + (a // sh) * self.part + b // sw


def pieces(count: int, lanes: int) -> list[tuple[int, int]]:
    """(start, width) of whole vectors, then the tail in power-of-two pieces (LLVM splits other widths badly)."""
    out = [(o, lanes) for o in range(0, count - count % lanes, lanes)]
    done = count - count % lanes
    while done < count:
        piece = 1 << ((count - done).bit_length() - 1)
        out.append((done, piece))
        done += piece
    return out


def _store_row(a: _Src, ind: int, count: int, lanes: int, store) -> None:
    """``store(ind, offset, width)`` over one output row: a loop of whole vectors, then the tail pieces."""
    if count >= lanes:
        a(ind, f"for o in range({count // lanes}):")
        store(ind + 1, f"o * {lanes}", lanes)
    _store_tail(a, ind, count, lanes, store)


def _store_tail(a: _Src, ind: int, count: int, lanes: int, store) -> None:
    """``store(ind, offset, width)`` over the pieces of a row after its whole vectors."""
    for offset, width in pieces(count, lanes)[count // lanes:]:
        store(ind, str(offset), width)


def _channel_vectors(a: _Src, ind: int, channel: str, taps: int, bias: bool,
                     lanes: int) -> tuple[list[str], str | None]:
    """The channel's tap weights (and bias) broadcast once into vectors of their own, before its rows: read from
    ``K`` inside a product, LLVM re-read and re-broadcast each tap for every output vector (inside a parallel loop's
    body it cannot prove the stores leave ``K`` unchanged); from small local vectors it keeps them in registers
    (MobileNetV2's first depthwise conv, batch 1: 187 -> 151 us). Returns the expressions to use inside a
    ``T.vectorized`` loop over ``v``."""
    names = [a.fresh("kv") for _ in range(taps + (1 if bias else 0))]
    for t, name in enumerate(names):
        a(ind, f'{name} = T.alloc_buffer(({lanes},), "float32")')
        a(ind, f"for v in T.vectorized({lanes}):")
        a(ind + 1, f"{name}[v] = " + (f"K[{channel}, {t}]" if t < taps else f"B[{channel}]"))
    return [f"{name}[v]" for name in names[:taps]], (f"{names[-1]}[v]" if bias else None)


# output rows computed together, by row stride: each input row a window reads is loaded once for all of them (a
# stride-1 3x3 window's rows serve three output rows each), where one row at a time loaded 9 vectors per output
# vector; one thread, MobileNetV2's layers alone: 32x112x112 1.44x, 144x56x56 1.33x, 192x28x28 1.20x
# (bench_kernel_ab.py --rule row_block). Stride 2 shares one input row in three between neighbours: two rows
# together measured 0.98-1.02x, so it stays one row at a time.
ROW_BLOCK = {1: 4}


def emit_depthwise_rows(a: _Src, ind: int, g: Planes, plane: str, channel: str, out: str, bias: bool,
                        act: str | Clip | None, params: CpuKernelParams) -> None:
    """Output rows of one channel: ``out[row, col]`` (``out`` indexes a buffer by its last two axes) from the
    planes at offset ``plane``, kernel ``K[channel, tap]``, bias ``B[channel]``. Whole vectors go ``ROW_BLOCK``
    rows at a time, each row's sum into a vector of its own before any is stored (so that LLVM may reuse the loads:
    a store to the output could, for all it knows, change the planes); the rest one row at a time."""
    sh, sw = g.stride
    dh, dw = g.dilation
    lanes = params.lanes
    taps, bias_value = _channel_vectors(a, ind, channel, g.kh * g.kw, bias, lanes)

    def product(row: str, offset: str) -> str:
        def tap(i: int, j: int) -> str:
            col = j * dw
            return (f"P[{plane} + ({row} * {sh} + {i * dh}) * {g.width} + {(col % sw) * g.part + col // sw} + "
                    f"{offset} + v]")

        return " + ".join(f"{taps[i * g.kw + j]} * {tap(i, j)}" for i in range(g.kh) for j in range(g.kw))

    def store(ind2: int, offset: str, count: int) -> None:
        a(ind2, f"for v in T.vectorized({count}):")
        a(ind2 + 1, f"{out}row, {offset} + v] = {_epilogue(product('row', offset), bias_value, act)}")

    block, whole = ROW_BLOCK.get(sh, 1), g.ow // lanes
    blocked = g.oh // block * block if whole and block > 1 else 0
    if blocked:
        a(ind, f"for rb in range({blocked // block}):")
        a(ind + 1, f"for o in range({whole}):")
        sums = [a.fresh("rowsum") for _ in range(block)]
        for r, name in enumerate(sums):
            a(ind + 2, f'{name} = T.alloc_buffer(({lanes},), "float32")')
            a(ind + 2, f"for v in T.vectorized({lanes}):")
            a(ind + 3, f"{name}[v] = {product(f'(rb * {block} + {r})', f'o * {lanes}')}")
        for r, name in enumerate(sums):
            a(ind + 2, f"for v in T.vectorized({lanes}):")
            a(ind + 3, f"{out}rb * {block} + {r}, o * {lanes} + v] = {_epilogue(f'{name}[v]', bias_value, act)}")
        if g.ow % lanes:
            a(ind, f"for row in range({blocked}):")
            _store_tail(a, ind + 1, g.ow, lanes, store)
    if blocked < g.oh:
        a(ind, f"for row in range({blocked}, {g.oh}):" if blocked else f"for row in range({g.oh}):")
        _store_row(a, ind + 1, g.ow, lanes, store)


def _flat_length(g: Planes, lanes: int) -> int:
    """Flat form: output positions computed per channel (rows of ``part`` columns, whole vectors)."""
    return _ceil(g.oh * g.part, lanes) * lanes


def _flat_pays(g: Planes, lanes: int) -> bool:
    """The flat form computes the extra columns of each row (``part - ow``) in whole vectors, then copies the rows
    out; the row form computes each row in vectors plus power-of-two tail pieces. Only for rows narrower than a
    vector, and where it takes fewer vector operations: at 28 columns (16 + 8 + 4 in rows) the flat form ran
    0.7-0.8x as fast on 28x28 maps though it counts fewer, at 14 or 7 columns 1.1-2x as fast."""
    if g.ow >= lanes:
        return False
    taps = g.kh * g.kw
    per_row = len(pieces(g.ow, lanes))
    flat = Planes(g.h, g.w, g.kh, g.kw, g.stride, g.pads, g.dilation, row_phases=True)
    return _flat_length(flat, lanes) // lanes * taps + g.oh * per_row < g.oh * per_row * taps


def depthwise_conv2d(name: str, c: int, h: int, w: int, weight: np.ndarray, stride: tuple[int, int],
                     pads: tuple[int, int, int, int], dilation: tuple[int, int], bias: np.ndarray | None,
                     act: str | Clip | None, params: CpuKernelParams, n_static: int | None = None) -> Kernel:
    """Y[n, c, oh, ow] = sum W[c, 0, i, j] X[n, c, oh * sh - pt + i * dh, ow * sw - pl + j * dw] (+ bias) (act);
    ``weight`` is [C, 1, KH, KW] (pads: top, left, bottom, right).

    Two forms of the product, by vector operations (``_flat_pays``): output rows of vectors and tail pieces (large
    maps), or *flat*: every output position of the channel in rows of ``part`` columns, a tap being one contiguous
    view of planes split by row and column phase, computed in whole vectors into a row buffer whose rows are then
    copied out (small maps: 5x5 on 7x7 took 525 narrow vector products per channel in rows, 125 flat: 1.9x).
    The planes, the row buffer and the output are per channel; one channel per task.""" 
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    lanes = params.lanes
    g = Planes(h, w, kh, kw, tuple(stride), tuple(pads), tuple(dilation))
    flat = _flat_pays(g, lanes)
    if flat:
        g = Planes(h, w, kh, kw, tuple(stride), tuple(pads), tuple(dilation), row_phases=True)
    sw = g.stride[1]
    pt, pl = g.pads[0], g.pads[1]
    part = g.part
    length = _flat_length(g, lanes)
    # flat reads run past the planes by up to a tap's offset (columns that are dropped): room for them
    slot = max(g.size, length + g.flat_offset(kh - 1, kw - 1)) if flat else g.size
    n = "n_batch" if n_static is None else str(n_static)
    a = _Src()
    args = ["x: T.handle", "k: T.handle"] + (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a.signature(name, args, ("n_batch",) if n_static is None else ())
    a(1, f'X = T.match_buffer(x, ({n}, {c}, {h}, {w}), "float32")')
    a(1, f'K = T.match_buffer(k, ({c}, {kh * kw}), "float32")')
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({c},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {c}, {g.oh}, {g.ow}), "float32")')
    # one plane per channel, filled and read by that channel's task only (a small buffer per task, on the stack,
    # ran stride-1 layers up to 3x slower)
    a(1, f'P = T.alloc_buffer(({c * slot},), "float32")')
    if flat:
        a(1, f'V = T.alloc_buffer(({c * length},), "float32")')
    per_image = c * g.oh * g.ow * kh * kw * DEPTHWISE_MAC_COST
    if n_static and not _parallel_pays(per_image) and _parallel_pays(per_image * n_static):
        # under the threshold per image, over it for the batch (small maps, pruned layers): channels outermost, each
        # task taking every image through its plane, so that a batch of 8 does not run on one thread (images
        # outermost stays the order for large maps: channels outermost ran them 10-15% slower on one thread)
        a(1, f"for channel in T.parallel({c}):")
        a(2, f"for image in range({n}):")
    else:
        a(1, f"for image in range({n}):")
        a(2, f"for channel in {_loop(per_image)}({c}):")
    base = f"channel * {slot}"

    def zeros(ind: int, start: str, count: int) -> None:
        if count > 0:
            a(ind, f"for v in T.vectorized({count}):")
            a(ind + 1, f"P[{base} + {start} + v] = T.float32(0)")

    for q in list(range(pt)) + list(range(pt + h, g.phase_rows * g.stride[0] if flat else g.rows)):
        for phase in range(sw):
            zeros(3, g.row_base(str(q), phase), part)
    a(3, f"for r in range({h}):")
    for phase in range(sw):
        # padded columns q = k * sw + phase inside the image: pl <= q < pl + w
        row = g.row_base(f"r + {pt}", phase)
        lo = _ceil(max(pl - phase, 0), sw)
        hi = max(lo, _ceil(pl + w - phase, sw))
        zeros(4, row, lo)
        if hi > lo:
            a(4, f"for v in T.vectorized({hi - lo}):")
            a(5, f"P[{base} + {row} + {lo} + v] = X[image, channel, r, (v + {lo}) * {sw} + {phase - pl}]")
        zeros(4, f"{row} + {hi}", part - hi)
    if not flat:
        emit_depthwise_rows(a, 3, g, base, "channel", "Y[image, channel, ", bias is not None, act, params)
    else:
        taps, bias_value = _channel_vectors(a, 3, "channel", kh * kw, bias is not None, lanes)
        terms = [f"{taps[i * kw + j]} * P[{base} + {g.flat_offset(i, j)} + o * {lanes} + v]"
                 for i in range(kh) for j in range(kw)]
        a(3, f"for o in range({length // lanes}):")
        a(4, f"for v in T.vectorized({lanes}):")
        a(5, f"V[channel * {length} + o * {lanes} + v] = {_epilogue(' + '.join(terms), bias_value, act)}")
        a(3, f"for row in range({g.oh}):")

        def copy_out(ind: int, offset: str, count: int) -> None:
            a(ind, f"for v in T.vectorized({count}):")
            a(ind + 1, f"Y[image, channel, row, {offset} + v] = V[channel * {length} + row * {part} + {offset} + v]")

        _store_row(a, 4, g.ow, lanes, copy_out)
    src = a.text()
    consts = [np.ascontiguousarray(weight.reshape(c, kh * kw), dtype=np.float32)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(c))
    return Kernel(name, _parse(src, name), consts, src)
