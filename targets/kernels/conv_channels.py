"""Convolutions on padded planes vectorised over output channels (``_conv2d_channel_vectors``): no product work
on the planes' padding columns, which the pixel-vector form (conv_planes.py) computes and drops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_layout import ConvGeom, _conv_head, _conv_tile, _images_per_launch, pack_conv_weight
from .conv_planes import _copy_planes, _Planes, _planes
from .source import CpuKernelParams, Kernel, _ceil, _epilogue, _loop, _parse, _spill, _Src, _zero_accumulators

CHANNEL_VECTORS = True  # False: the pixel-vector form for every dense convolution (A/B timing of the two)
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
    vectors_total = _ceil(g.c_out, params.lanes)
    vectors = min(vectors_total, VECTORS)
    full, rest = divmod(vectors_total, vectors)
    kinds = [(0, full, vectors)] + ([(full, 1, rest)] if rest else [])
    return [_Tiles(first, count, v, *_row_tiles(g.ow, v, params)) for first, count, v in kinds]


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
    mine = _ceil(g.c_out, lanes) * lanes * g.pixels * (g.k + STORE_VECTOR_FMAS * lanes)
    if planes is not None:
        return mine < g.c_out * planes.pp * g.k
    if g.c_in < lanes or g.kh * g.kw == 1:
        return False
    tile = _conv_tile(g, params, None)
    return mine < (g.c_out + COPY_VECTOR_FMAS * lanes) * _ceil(g.pixels, tile) * tile * g.k


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
        at = _At(slot=f"(t // {per_image})" if images > 1 else "0",
                 img=f"(nc * {images} + t // {per_image})" if images > 1 else "nc",
                 ctile=f"({tiles.first} + t % {per_image} // {rows})" if tiles.count > 1 else str(tiles.first),
                 oh=f"(t % {rows} // {tiles.per_row})", col=f"(t % {tiles.per_row})")
        if tiles.last == tiles.positions:
            _tile(a, 3, g, planes, tiles, tiles.positions, at, width, bias is not None, act, lanes)
        else:
            a(3, f"if {at.col} < {tiles.per_row - 1}:")
            _tile(a, 4, g, planes, tiles, tiles.positions, at, width, bias is not None, act, lanes)
            a(3, "else:")
            _tile(a, 4, g, planes, tiles, tiles.last, at, width, bias is not None, act, lanes)
    src = a.text()
    consts = [pack_conv_weight(w_out_in, width)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(g.c_out))
    return Kernel(name, _parse(src, name), consts, src)


@dataclass(frozen=True)
class _At:
    """Index expressions of the tile a loop iteration computes."""

    slot: str  # image within the launch's planes
    img: str  # image of the batch
    ctile: str  # channel tile (of the packed weight's width)
    oh: str  # output row
    col: str  # tile within the row


def _tile(a: _Src, ind: int, g: ConvGeom, planes: _Planes, tiles: _Tiles, positions: int, at: _At, width: int,
          bias: bool, act: str | None, lanes: int) -> None:
    """Accumulate one tile of ``positions`` pixels x ``tiles.vectors`` channel vectors, then store it."""
    w = tiles.vectors * lanes
    ow0 = f"{at.col} * {tiles.positions}"
    acc = _zero_accumulators(a, ind, positions, w)
    a(ind, f"for ci in range({g.c_in}):")
    per_channel = planes.per_channel
    for k, offset in planes.taps(g):
        base = f"{at.slot} * {g.c_in * per_channel} + ci * {per_channel} + {offset} + {at.oh} * {planes.wq} + {ow0}"
        for r in range(positions):
            a(ind + 1, f"for v in T.vectorized({w}):")
            a(ind + 2, f"{acc}{r}[v] = {acc}{r}[v] + W[{at.ctile}, {k}, v] * XP[{base} + {r}]")
    last_tile = tiles.first + tiles.count == _ceil(g.c_out, width)
    guarded = last_tile and tiles.count > 1 and (tiles.first + tiles.count) * width > g.c_out
    stored = min(w, g.c_out - (tiles.first + tiles.count - 1) * width) if last_tile and not guarded else w
    for r in range(positions):
        scratch = _spill(a, ind, f"{acc}{r}", w)
        co = f"{at.ctile} * {width} + j"
        a(ind, f"for j in range({stored}):")
        ind2 = ind + 1
        if guarded:  # the last of several tiles: lanes past the last channel
            a(ind2, f"if {co} < {g.c_out}:")
            ind2 += 1
        val = _epilogue(f"{scratch}[j]", f"B[{co}]" if bias else None, act)
        a(ind2, f"Y[{at.img}, {co}, {at.oh} * {g.ow} + {ow0} + {r}] = {val}")
