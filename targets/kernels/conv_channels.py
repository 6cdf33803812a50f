"""Convolutions on padded planes vectorised over output channels (``_conv2d_channel_vectors``): no product work
on the planes' padding, which the pixel-vector form (conv_planes.py) computes and drops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_layout import ConvGeom, _conv_head, _conv_tile, _images_per_launch, pack_conv_weight
from .conv_planes import _copy_planes, _Planes, _planes
from .source import CpuKernelParams, Kernel, _ceil, _epilogue, _loop, _parse, _spill, _Src, _zero_accumulators

CHANNEL_VECTORS = True  # False: the pixel-vector form for every dense convolution (A/B timing of the two)
SKIP_PADDING = True  # False: tiles compute the taps that read the planes' padding too (A/B timing)
VECTORS = 2  # output-channel vectors per tile (a power of two: LLVM scalarises odd vector widths)
ACCUMULATORS = 20  # vector registers of a tile's sums, at most (AVX-512: 28 of the 32 spilled, 0.4-0.7x)
STORE_VECTOR_FMAS = 0.5  # the time of storing one output element, in vector FMAs (fitted: channel_vectors_pay)
COPY_VECTOR_FMAS = 1  # the time of copying one im2col element, in vector FMAs (likewise)


@dataclass(frozen=True)
class _Tiles:
    """Tiles of ``vectors`` output-channel vectors times ``positions`` consecutive pixels of one output row, for
    ``count`` channel tiles from ``first``; a row's last tile may be narrower (``last`` pixels)."""

    first: int
    count: int
    vectors: int
    positions: int
    per_row: int
    last: int


def channel_tiles(g: ConvGeom, params: CpuKernelParams) -> list[_Tiles]:
    """Two vectors of output channels (one broadcast per two FMAs) times up to 10 pixels of a row, the widest
    tile that divides the row, else the one that leaves the widest last tile; an odd last vector gets a tile of
    its own with up to 20 pixels (lone 3x3 layers, one thread: 7-10 pixels 48-55 GMAC/s, 12 pixels 42-55, two
    vectors of 14 or four of 7 spilled registers: 16-22)."""
    return [_Tiles(first, count, v, *_row_tiles(g.ow, v, params))
            for first, count, v in channel_tile_kinds(g.c_out, params)]


def channel_tile_kinds(c_out: int, params: CpuKernelParams) -> list[tuple[int, int, int]]:
    """(first tile, tile count, vectors per tile): tiles of VECTORS output-channel vectors, then an odd last
    vector alone (also Winograd's product tiles, conv_winograd.py)."""
    total = _ceil(c_out, params.lanes)
    vectors = min(total, VECTORS)
    full, rest = divmod(total, vectors)
    return [(0, full, vectors)] + ([(full, 1, rest)] if rest else [])


def _row_tiles(ow: int, vectors: int, params: CpuKernelParams) -> tuple[int, int, int]:
    """(pixels per tile, tiles per row, pixels of a row's last tile) for tiles of ``vectors`` channel vectors."""
    widest = max(1, min(ow, ACCUMULATORS // vectors, params.acc_regs // vectors))  # AVX2: 16 registers
    positions = max(range(widest, widest // 2, -1), key=lambda r: (ow % r == 0, ow % r))
    per_row = _ceil(ow, positions)
    return positions, per_row, ow - (per_row - 1) * positions


def channel_vectors_pay(g: ConvGeom, planes: _Planes | None, params: CpuKernelParams) -> bool:
    """Whether a dense convolution costs less this way than in the form chosen for it. This form rounds output
    channels up to whole vectors and stores its sums one element at a time, charged STORE_VECTOR_FMAS vector FMAs
    per output element. Against shifted planes (``planes``): those compute the planes' padding columns and round
    up to whole tiles (``planes.pp`` positions). Against im2col (``planes`` None, small maps): that rounds pixels up
    to whole tiles and copies K x pixels, charged COPY_VECTOR_FMAS vector FMAs per element; not for stems (fewer
    input channels than a vector: their few products per output do not pay the stores) nor strided 1x1s (their
    im2col is a plain strided copy). Fitted on lone layers (AVX-512, one thread, channel vectors over the other
    form): 3x3 on 28x28 with 144-1152 products per output 1.07-1.10x (10% padding), 64 channels on 56x56 1.02x
    (4%), 3x3 on 8x8 and 4x4 maps 1.02-1.29x (im2col); but a 7x7/2 stem on 3 channels 0.90x, a 3x3 one 0.76x, and
    1x1/2 projections 0.80-1.21x."""
    if not CHANNEL_VECTORS or g.direct:
        return False
    lanes = params.lanes
    mine = _ceil(g.c_out, lanes) * lanes * (inside_products(g) + g.pixels * STORE_VECTOR_FMAS * lanes)
    if planes is not None:
        return mine < g.c_out * planes.pp * g.k
    if g.c_in < lanes or g.kh * g.kw == 1:
        return False
    tile = _conv_tile(g, params, None)
    return mine < (g.c_out + COPY_VECTOR_FMAS * lanes) * _ceil(g.pixels, tile) * tile * g.k


def inside_products(g: ConvGeom) -> int:
    """Products per output channel that the form computes: it skips the taps that read padding (a 3x3 conv with
    padding 1 on an 8x8 map: 16% of its products, 4x4 31%, 7x7 18%, 14x14 9%, 56x56 2.4%) along the rows
    (``_rows_by_loop``) and the columns."""
    rows = sum(len(_inside(oh, g.stride[0], g.pad[0], g.dilation[0], g.kh, g.h)) for oh in range(g.oh)) \
        if _rows_by_loop(g) else g.oh * g.kh
    cols_in = _cols_inside(g)
    return g.c_in * rows * sum(len(cols_in(ow)) for ow in range(g.ow))


def _rows_by_loop(g: ConvGeom) -> bool:
    """Whether tiles run the kernel's rows in a loop bounded to those inside the map: where some row reads padding
    and kernel row kh reads a fixed offset in phase plane (kh * dh) % sh (the phases' row ranks are the phases)."""
    (sh, dh) = g.stride[0], g.dilation[0]
    row_phases = {kh * dh % sh for kh in range(g.kh)}
    return SKIP_PADDING and g.pad[0] + g.pad[2] > 0 and row_phases == set(range(len(row_phases)))


def _cols_inside(g: ConvGeom):
    """Output column -> the kernel columns its tiles compute: those inside the map. Each kind of border tile is
    another copy of the tile's unrolled code (one kernel row of it: the rows are a loop), which costs little
    compile time (TVMScript's parser takes about a millisecond per expression; with the kernel rows unrolled too,
    one body per kind of row and tile made ResNet-18 compile in 29 s instead of 10)."""
    if not SKIP_PADDING:
        return lambda ow: frozenset(range(g.kw))
    return lambda ow: _inside(ow, g.stride[1], g.pad[1], g.dilation[1], g.kw, g.w)


def _inside(out: int, stride: int, pad: int, dilation: int, taps: int, size: int) -> frozenset[int]:
    """The taps of output index ``out`` along one axis that read inside the input (not its padding)."""
    return frozenset(k for k in range(taps) if 0 <= out * stride - pad + k * dilation < size)


def _runs(count: int, key) -> list[tuple[int, object]]:
    """(end, key) of the maximal runs of consecutive indices in [0, count) with equal ``key(index)``."""
    runs: list[tuple[int, object]] = []
    for i in range(count):
        k = key(i)
        if runs and runs[-1][1] == k:
            runs[-1] = (i + 1, k)
        else:
            runs.append((i + 1, k))
    return runs


def _branch(a: _Src, ind: int, var: str, runs: list[tuple[int, object]], body) -> None:
    """``body(ind, key)`` for each run of ``var`` (``_runs``), chosen by nested ifs on the runs' ends."""
    for i, (end, key) in enumerate(runs):
        if i < len(runs) - 1:
            a(ind, f"if {var} < {end}:")
            body(ind + 1, key)
            a(ind, "else:")
            ind += 1
        else:
            body(ind, key)


def channel_buffer_bytes(g: ConvGeom) -> int:
    """Bytes per image of this form's buffer: the padded planes (the sums go straight to the output)."""
    return 4 * g.c_in * _planes(g, 1).per_channel


def _conv2d_channel_vectors(name: str, g: ConvGeom, w_out_in: np.ndarray, bias: np.ndarray | None,
                            act: str | None, params: CpuKernelParams, n_static: int | None) -> Kernel:
    """A dense convolution on the zero-padded planes of conv_planes.py with the roles of the operands swapped:
    each tile accumulates ``positions`` output pixels of one row times ``vectors`` vectors of output channels,
    one broadcast input value per pixel and tap times one weight vector per tap. A row's pixels read consecutive
    plane elements, so no padding column is computed (the pixel-vector form computes OH x wq positions rounded to
    whole tiles: 10% more work on 28x28 maps, 30% on 7x7 ones); a tile's sums are stored pixel by pixel, one
    element per channel, after the bias and activation. One parallel loop per kind of tile (``channel_tiles``),
    channel-tile major: a tile of weights stays in cache while every pixel of the image uses it."""
    lanes = params.lanes
    planes = _planes(g, 1)
    kinds = channel_tiles(g, params)
    width = kinds[0].vectors * lanes  # the packed weight's tile width; a narrower last tile reads part of its own
    per_channel = planes.per_channel
    images = _images_per_launch(n_static, channel_buffer_bytes(g))
    a = _Src()
    n = _conv_head(a, name, g, n_static, False, None, _ceil(g.c_out, width), width, bias is not None)
    a(1, f'XP = T.alloc_buffer(({images * g.c_in * per_channel},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    _copy_planes(a, g, planes, images)
    for tiles in kinds:
        rows = g.oh * tiles.per_row
        per_image = tiles.count * rows
        channels = min(g.c_out, (tiles.first + tiles.count) * width) - tiles.first * width
        a(2, f"for t in {_loop(images * g.pixels * channels * g.k)}({images * per_image}):")
        slot = f"t // {per_image} * {g.c_in * per_channel} + " if images > 1 else ""
        oh, col = f"(t % {rows} // {tiles.per_row})", f"(t % {tiles.per_row})"
        at = _At(img=f"(nc * {images} + t // {per_image})" if images > 1 else "nc",
                 ct=f"({tiles.first} + t % {per_image} // {rows})" if tiles.count > 1 else str(tiles.first),
                 oh=oh, col=col, px=f"{slot}{oh} * {planes.wq} + {col} * {tiles.positions}")
        # one body per run of tiles that compute the same kernel columns (border tiles skip those that read
        # padding: unrolled per pixel, so their FMAs are simply left out)
        cols_in = _cols_inside(g)
        col_runs = _runs(tiles.per_row, lambda c: tuple(
            cols_in(c * tiles.positions + r) for r in range(tiles.last if c == tiles.per_row - 1 else tiles.positions)))
        _branch(a, 3, at.col, col_runs, lambda ind, cols: _tile(
            a, ind, g, planes, tiles, cols, at, width, bias is not None, act, lanes))
    src = a.text()
    consts = [pack_conv_weight(w_out_in, width)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(g.c_out))
    return Kernel(name, _parse(src, name), consts, src)


@dataclass(frozen=True)
class _At:
    """Index expressions of the tile a loop iteration computes."""

    img: str  # image of the batch
    ct: str  # channel tile (of the packed weight's width)
    oh: str  # output row
    col: str  # tile within the row
    px: str  # the tile's first pixel in its image's planes of input channel 0, tap (0, 0)


def _tile(a: _Src, ind: int, g: ConvGeom, planes: _Planes, tiles: _Tiles, cols_in: tuple[frozenset[int], ...],
          at: _At, width: int, bias: bool, act: str | None, lanes: int) -> None:
    """Accumulate one tile of ``len(cols_in)`` pixels x ``tiles.vectors`` channel vectors, then store it. Pixel r
    computes kernel columns ``cols_in[r]``; the kernel rows run in a loop bounded to the map's inside
    (``_rows_by_loop``), else unrolled with the columns."""
    w = tiles.vectors * lanes
    positions = len(cols_in)
    acc = _zero_accumulators(a, ind, positions, w)
    taps = g.kh * g.kw
    xp = f"{at.px} + ci * {planes.per_channel}"
    by_loop = _rows_by_loop(g)
    rows = ["kh"] if by_loop else range(g.kh)  # with the loop, one kernel row of FMAs in terms of its variable
    products = [(kh, kw, r) for kh in rows for kw in range(g.kw) for r in range(positions) if kw in cols_in[r]]
    if not products:  # every tap of the tile reads padding (a kernel wider than the padded map's inside)
        return _store(a, ind, g, tiles, at, acc, positions, width, bias, act, lanes)
    a(ind, f"for ci in range({g.c_in}):")
    if by_loop:
        (pt, pb), sh, dh = (g.pad[0], g.pad[2]), g.stride[0], g.dilation[0]

        def first_row_at_or_after(row: int) -> str:  # the least kh with oh * sh - pt + kh * dh >= row
            start = f"{at.oh} * {sh}" if sh > 1 else at.oh
            return f"{row + pt} - {start}" if dh == 1 else f"({row + pt + dh - 1} - {start}) // {dh}"

        lo = f"T.max({first_row_at_or_after(0)}, 0)" if pt else "0"
        hi = f"T.min({first_row_at_or_after(g.h)}, {g.kh})" if pb else str(g.kh)
        a(ind + 1, f"for kh in range({lo}, {hi}):")
        if sh == 1:
            xp = f"{xp} + kh * {dh * planes.wq}"
        else:  # the phase planes are ordered by (row phase, column phase)
            column_phases = len(planes.phases) // len({phase for phase, _ in planes.phases})
            xp = f"{xp} + kh * {dh} % {sh} * {column_phases * planes.length} + kh * {dh} // {sh} * {planes.wq}"
    for kh, kw, r in products:
        plane, offset = planes.tap(g, 0 if by_loop else kh, kw)
        k = f"kh * {g.kw} + {kw}" if by_loop else kh * g.kw + kw
        a(ind + 1 + by_loop, f"for v in T.vectorized({w}):")
        a(ind + 2 + by_loop, f"{acc}{r}[v] = {acc}{r}[v] + W[{at.ct}, ci * {taps} + {k}, v] * "
                             f"XP[{xp} + {plane * planes.length + offset + r}]")
    _store(a, ind, g, tiles, at, acc, positions, width, bias, act, lanes)


def _store(a: _Src, ind: int, g: ConvGeom, tiles: _Tiles, at: _At, acc: str, positions: int, width: int,
           bias: bool, act: str | None, lanes: int) -> None:
    """A tile's sums to Y, pixel by pixel, one element per channel, after the bias and activation."""
    w = tiles.vectors * lanes
    last_tile = tiles.first + tiles.count == _ceil(g.c_out, width)
    guarded = last_tile and tiles.count > 1 and (tiles.first + tiles.count) * width > g.c_out
    stored = min(w, g.c_out - (tiles.first + tiles.count - 1) * width) if last_tile and not guarded else w
    for r in range(positions):
        scratch = _spill(a, ind, f"{acc}{r}", w)
        co = f"{at.ct} * {width} + j"
        a(ind, f"for j in range({stored}):")
        ind2 = ind + 1
        if guarded:  # the last of several tiles: lanes past the last channel
            a(ind2, f"if {co} < {g.c_out}:")
            ind2 += 1
        val = _epilogue(f"{scratch}[j]", f"B[{co}]" if bias else None, act)
        a(ind2, f"Y[{at.img}, {co}, {at.oh} * {g.ow} + {at.col} * {tiles.positions} + {r}] = {val}")
