"""Convolutions on padded planes vectorised over output channels (``_conv2d_channel_vectors``): no product work
on the planes' padding columns, which the pixel-vector form (conv_planes.py) computes and drops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv_layout import ConvGeom, _conv_head, _images_per_launch, pack_conv_weight
from .conv_planes import _copy_planes, _Planes, _planes
from .source import CpuKernelParams, Kernel, _ceil, _epilogue, _loop, _parse, _spill, _Src

CHANNEL_VECTORS = True  # False: the pixel-vector form for every dense convolution (A/B timing of the two)
VECTORS = 2  # output-channel vectors per tile (a power of two: LLVM scalarises odd vector widths)
STORE_VECTOR_FMAS = 2  # the time of storing one output element, in vector FMAs (about one cycle)
MAX_POSITIONS = 10  # pixels per tile, at most: 20 accumulators on AVX-512 (28 spilled: 0.4-0.7x)


@dataclass(frozen=True)
class _Tile:
    """A tile: ``positions`` consecutive output pixels of one row times ``vectors`` output-channel vectors."""

    positions: int  # per full tile of a row
    per_row: int  # tiles per output row (the last may be narrower: ``last``)
    last: int  # positions of a row's last tile
    vectors: int  # per full tile of channels
    channel_tiles: int  # the last may hold fewer vectors: ``last_vectors``
    last_vectors: int


def channel_tile(g: ConvGeom, params: CpuKernelParams) -> _Tile:
    """Two vectors of output channels (one broadcast per two FMAs) times up to 10 pixels of a row: the widest
    tile that divides the row, else the one that leaves the widest last tile (lone 3x3 layers, one thread: 7-10
    pixels 48-55 GMAC/s, 12 pixels 42-55, two vectors of 14 or four of 7 spilled registers: 16-22)."""
    lanes = params.lanes
    vectors_total = _ceil(g.c_out, lanes)
    vectors = min(vectors_total, VECTORS)
    widest = max(1, min(g.ow, MAX_POSITIONS, params.acc_regs // vectors))  # AVX2: 16 registers
    candidates = range(widest, widest // 2, -1)
    positions = max(candidates, key=lambda r: (g.ow % r == 0, g.ow % r))
    per_row = _ceil(g.ow, positions)
    channel_tiles = _ceil(vectors_total, vectors)
    return _Tile(positions, per_row, g.ow - (per_row - 1) * positions, vectors, channel_tiles,
                 vectors_total - (channel_tiles - 1) * vectors)


def channel_vectors_pay(g: ConvGeom, planes: _Planes | None, params: CpuKernelParams) -> bool:
    """Whether a dense convolution that reads shifted planes costs less this way. The pixel-vector form computes
    the planes' padding columns and rounds up to whole tiles (``planes.pp`` positions); this one rounds output
    channels up to whole vectors and stores its sums one element at a time, about STORE_VECTOR_FMAS vector FMAs'
    time per output element (AVX-512: a 7x7/2 stem on 3 channels, 147 products per output, ran 0.9x; 64 channels
    on 56x56, 576 products and 4% of padding, 1.0x)."""
    if not CHANNEL_VECTORS or planes is None:
        return False
    mine = _ceil(g.c_out, params.lanes) * params.lanes * g.pixels * (g.k + STORE_VECTOR_FMAS * params.lanes)
    return mine < g.c_out * planes.pp * g.k


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
    element per channel, after the bias and activation."""
    lanes = params.lanes
    planes = _planes(g, 1)
    tile = channel_tile(g, params)
    width = tile.vectors * lanes
    per_channel = planes.per_channel
    images = _images_per_launch(n_static, channel_buffer_bytes(g))
    a = _Src()
    n = _conv_head(a, name, g, n_static, False, None, tile.channel_tiles, width, bias is not None)
    a(1, f'XP = T.alloc_buffer(({images * g.c_in * per_channel},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    _copy_planes(a, g, planes, images)
    # channel-tile major: a tile of weights stays in cache while every pixel of the image uses it
    rows = g.oh * tile.per_row
    per_image = tile.channel_tiles * rows
    a(2, f"for t in {_loop(images * g.pixels * g.c_out * g.k)}({images * per_image}):")
    slot = f"(t // {per_image})" if images > 1 else "0"
    img = f"(nc * {images} + t // {per_image})" if images > 1 else "nc"
    ctile = f"(t % {per_image} // {rows})"
    oh = f"(t % {rows} // {tile.per_row})"
    col = f"(t % {tile.per_row})"
    ow0 = f"{col} * {tile.positions}"

    def body(ind: int, positions: int, vectors: int) -> None:
        w = vectors * lanes
        acc = a.fresh("acc")
        for r in range(positions):
            a(ind, f'{acc}{r} = T.alloc_buffer(({w},), "float32")')
        for r in range(positions):
            a(ind, f"for v in T.vectorized({w}):")
            a(ind + 1, f"{acc}{r}[v] = T.float32(0)")
        a(ind, f"for ci in range({g.c_in}):")
        for kh in range(g.kh):
            for kw in range(g.kw):
                plane, offset = planes.tap(g, kh, kw)
                base = (f"{slot} * {g.c_in * per_channel} + ci * {per_channel} + {plane * planes.length + offset}"
                        f" + {oh} * {planes.wq} + {ow0}")
                k = f"ci * {g.kh * g.kw} + {kh * g.kw + kw}"
                for r in range(positions):
                    a(ind + 1, f"for v in T.vectorized({w}):")
                    a(ind + 2, f"{acc}{r}[v] = {acc}{r}[v] + W[{ctile}, {k}, v] * XP[{base} + {r}]")
        for r in range(positions):
            scratch = _spill(a, ind, f"{acc}{r}", w)
            co = f"{ctile} * {width} + j"
            pixel = f"{oh} * {g.ow} + {ow0} + {r}"
            ind2 = ind + 1
            if vectors != tile.vectors:  # the narrower last tile of channels
                a(ind, f"for j in range({g.c_out - (tile.channel_tiles - 1) * width}):")
            else:
                a(ind, f"for j in range({width}):")
                if tile.channel_tiles * width > g.c_out and tile.last_vectors == tile.vectors:
                    a(ind2, f"if {co} < {g.c_out}:")  # the last tile's lanes past the last channel
                    ind2 += 1
            val = _epilogue(f"{scratch}[j]", f"B[{co}]" if bias is not None else None, act)
            a(ind2, f"Y[{img}, {co}, {pixel}] = {val}")

    def by_channels(ind: int, positions: int) -> None:
        if tile.last_vectors == tile.vectors:
            body(ind, positions, tile.vectors)
            return
        a(ind, f"if {ctile} < {tile.channel_tiles - 1}:")
        body(ind + 1, positions, tile.vectors)
        a(ind, "else:")
        body(ind + 1, positions, tile.last_vectors)

    if tile.last == tile.positions:
        by_channels(3, tile.positions)
    else:
        a(3, f"if {col} < {tile.per_row - 1}:")
        by_channels(4, tile.positions)
        a(3, "else:")
        by_channels(4, tile.last)
    src = a.text()
    consts = [pack_conv_weight(w_out_in, width)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(g.c_out))
    return Kernel(name, _parse(src, name), consts, src)
