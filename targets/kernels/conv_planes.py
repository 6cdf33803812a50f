"""Convolutions without im2col: shifted views of zero-padded input planes (``_conv2d_shifted``), chosen per
layer where they cost less than an im2col matrix (``_shifted_planes``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bsr import BSR, _bsr_accumulate
from .conv_layout import (
    ConvGeom, _bsr_conv_chunk, _conv_head, _conv_tile, _images_per_launch, bsr_conv_tile, pack_conv_weight,
)
from .source import (
    CpuKernelParams, Kernel, _ceil, _choose_mr, _copy_loop, _epilogue, _loop, _parse, _Src, _zero_accumulators,
)

SHIFTED_MAX_WORK = 1.15  # product positions of the shifted form (padding columns included) over im2col's, at most
SHIFTED = True  # False: im2col for every convolution (A/B timing of the two forms)


@dataclass(frozen=True)
class _Planes:
    """How a convolution reads its input as shifted views of padded planes (``_conv2d_shifted``)."""

    hq: int  # rows of a plane
    wq: int  # width of a plane's rows: also the row stride of the product's output positions
    tile: int  # output positions per product tile
    phases: tuple[tuple[int, int], ...]  # (row, column) phases that some tap reads (stride s: up to s * s planes)
    pp: int  # product positions per image: OH * wq rounded up to whole tiles
    length: int  # floats per plane: its rows, and room for every tap's view of every tile

    @property
    def per_channel(self) -> int:
        """Floats of one input channel's planes."""
        return len(self.phases) * self.length

    def buffer_bytes(self, g: ConvGeom) -> int:
        """Bytes per image of the planes and of the product's output (with its extra columns)."""
        return 4 * (g.c_in * self.per_channel + g.c_out * self.pp)

    def taps(self, g: ConvGeom) -> list[tuple[str, int]]:
        """Per tap (kh, kw), in the weight's order: its reduction index for input channel ``ci`` and the offset
        in that channel's planes that it reads for output position 0."""
        return [(f"ci * {g.kh * g.kw} + {kh * g.kw + kw}", plane * self.length + offset)
                for kh in range(g.kh) for kw in range(g.kw) for plane, offset in [self.tap(g, kh, kw)]]

    def tap(self, g: ConvGeom, kh: int, kw: int) -> tuple[int, int]:
        """(plane, offset in it) that tap (kh, kw) reads for output position 0."""
        (sh, sw), (dh, dw) = g.stride, g.dilation
        return (self.phases.index((kh * dh % sh, kw * dw % sw)),
                (kh * dh // sh) * self.wq + kw * dw // sw)


def _shifted_planes(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None = None) -> _Planes | None:
    """The planes a convolution (dense, or BSR with one input channel per block) reads when shifted views cost
    less than an im2col matrix: little more product work (im2col pads pixels to whole tiles; the shifted form
    computes (KW - 1) / stride extra columns per row, so 7x7 maps lose nothing and 8x8 ones 50%) and less to copy
    (the planes and the output less its extra columns, against im2col's K x pixels). Measured 1.05-1.6x faster
    than im2col on 14x14 to 56x56 maps (a 7x7/2 stem 1.3x), 0.8-0.9x on 8x8 ones."""
    if not SHIFTED or g.direct or (block is not None and block[1] != 1):
        return None
    positions = g.oh * _plane_width(g)
    tile = params.nr if block is None else bsr_conv_tile(params, block[0], positions)
    if block is None and params.nr < positions <= 2 * params.nr:
        tile = 2 * params.nr  # a 7x7 map: one tile per image (see _conv2d_shifted)
    planes = _planes(g, tile)
    im2col_tile = _conv_tile(g, params, block)
    if planes.pp > SHIFTED_MAX_WORK * _ceil(g.pixels, im2col_tile) * im2col_tile:
        return None
    if g.c_in * len(planes.phases) * planes.hq * planes.wq + g.c_out * g.pixels >= g.k * g.pixels:
        return None  # few input channels, or a strided 1x1: the planes and the compaction outweigh im2col
    return planes


def _plane_width(g: ConvGeom) -> int:
    """Columns of a plane: the padded width over the column stride (also the product's output row stride)."""
    return _ceil(g.w + g.pad[1] + g.pad[3], g.stride[1])


def _planes(g: ConvGeom, tile: int) -> _Planes:
    """The plane layout of ``g`` for product tiles of ``tile`` positions."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    hq, wq = _ceil(g.h + g.pad[0] + g.pad[2], sh), _plane_width(g)
    phases = tuple(sorted({(kh * dh % sh, kw * dw % sw) for kh in range(g.kh) for kw in range(g.kw)}))
    pp = _ceil(g.oh * wq, tile) * tile
    reach = ((g.kh - 1) * dh // sh) * wq + (g.kw - 1) * dw // sw
    return _Planes(hq, wq, tile, phases, pp, max(pp + reach, hq * wq))


def plane_offsets(g: ConvGeom, planes: _Planes, columns: np.ndarray) -> np.ndarray:
    """Element offsets in one image's planes of the views that im2col columns k = (ci, kh, kw) read (int32)."""
    per_channel = planes.per_channel
    taps = [plane * planes.length + offset
            for plane, offset in (planes.tap(g, kh, kw) for kh in range(g.kh) for kw in range(g.kw))]
    offsets = (np.arange(g.c_in, dtype=np.int64)[:, None] * per_channel + np.array(taps)).reshape(-1)[columns]
    if offsets.size and offsets.max() >= 2**31:
        raise ValueError("activation buffer too large for int32 offsets")
    return offsets.astype(np.int32)


def _copy_planes(a: _Src, g: ConvGeom, planes: _Planes, images: int) -> None:
    """XP[image, ci, phase] = the zero-padded input at rows ``i * sh + a``, columns ``j * sw + b``, flat with row
    width wq, zeros up to the plane's length; one (parallel) loop over (image, input channel). The valid rows and
    columns of each phase are resolved here, so the copy loops have no bounds checks."""
    (sh, sw), (pt, pl) = g.stride, g.pad[:2]
    length, wq = planes.length, planes.wq
    a(2, f"for q in {_copy_loop(images * g.c_in * planes.per_channel)}({images * g.c_in}):")
    img = f"(nc * {images} + q // {g.c_in})" if images > 1 else "nc"

    def valid(phase: int, pad: int, step: int, size: int, count: int) -> tuple[int, int]:
        """The plane indices i in [lo, hi) whose input index i * step + phase - pad lies in [0, size)."""
        lo = max(0, _ceil(pad - phase, step))
        return lo, max(lo, min(count, (size - 1 + pad - phase) // step + 1))

    for ph, (ra, cb) in enumerate(planes.phases):
        base = f"q * {planes.per_channel} + {ph * length}"
        i_lo, i_hi = valid(ra, pt, sh, g.h, planes.hq)
        j_lo, j_hi = valid(cb, pl, sw, g.w, wq)

        def zeros(start: int, count: int, ind: int, row: str = "") -> None:
            if count > 0:
                a(ind, f"for z in range({count}):")
                a(ind + 1, f"XP[{base} + {row}{start} + z] = T.float32(0)")

        zeros(0, i_lo * wq, 3)
        if i_hi > i_lo:
            a(3, f"for i in range({i_hi - i_lo}):")
            row = f"(i + {i_lo}) * {wq} + "
            zeros(0, j_lo, 4, row)
            if j_hi > j_lo:
                a(4, f"for j in range({j_hi - j_lo}):")
                src = f"X[{img}, q % {g.c_in}, (i + {i_lo}) * {sh} + {ra - pt}, (j + {j_lo}) * {sw} + {cb - pl}]"
                a(5, f"XP[{base} + {row}{j_lo} + j] = {src}")
            zeros(j_hi, wq - j_hi, 4, row)
        zeros(i_hi * wq, length - i_hi * wq, 3)


def _drop_extra_columns(a: _Src, g: ConvGeom, planes: _Planes, images: int) -> None:
    """Y[image, c, oh * OW + ow] = YP[image, c, oh * wq + ow]: contiguous row copies."""
    a(2, f"for q in {_copy_loop(images * g.c_out * g.pixels)}({images * g.c_out}):")
    img = f"(nc * {images} + q // {g.c_out})" if images > 1 else "nc"
    a(3, f"for oh in range({g.oh}):")
    a(4, f"for ow in range({g.ow}):")
    a(5, f"Y[{img}, q % {g.c_out}, oh * {g.ow} + ow] = YP[q * {planes.pp} + oh * {planes.wq} + ow]")


def _conv2d_shifted(name: str, g: ConvGeom, planes: _Planes, w_out_in: np.ndarray, bias: np.ndarray | None,
                    act: str | None, params: CpuKernelParams, n_static: int | None, bsr: BSR | None) -> Kernel:
    """A convolution without im2col. Each image is copied once into zero-padded planes, one per input channel and
    stride phase (a stride-2 kernel reads 4: even/odd rows x even/odd columns), flat with row width wq. Output
    position q = oh * wq + ow of tap (kh, kw) reads its plane at q + (kh * dh // sh) * wq + kw * dw // sw, so every
    row of the virtual im2col matrix is a contiguous view (9x less copying for a 3x3 kernel). The product (dense,
    or BSR through a table of view offsets) runs over OH * wq positions into YP; the extra columns of each row are
    dropped when YP is copied to Y. A dense layer on a map of 33-64 positions (7x7) takes them all in one tile of
    twice the width and half the rows: its weights (2.4-9.4 MB on ResNet's last stage, coming from memory in a
    model run) are then read once per image instead of once per 32-position tile; ResNet-18's 7x7 convolutions
    4.0 -> 2.8 ms in the model (no change timed alone, where the weights stay in cache)."""
    sparse = bsr is not None
    tile_w = planes.tile
    if sparse:
        rows = bsr.block[0]
    elif tile_w > params.nr:  # one double-width tile per image: half the rows, each weight read once per run
        rows = min(g.c_out, params.mr * params.nr // tile_w)
    else:
        rows = min(g.c_out, _choose_mr(params, g.c_out))
    n_row_tiles = _ceil(g.c_out, rows)
    pp, n_ptiles = planes.pp, planes.pp // tile_w
    per_channel = planes.per_channel
    images = _images_per_launch(n_static, planes.buffer_bytes(g))
    a = _Src()
    n = _conv_head(a, name, g, n_static, False, bsr, n_row_tiles, rows, bias is not None)
    a(1, f'XP = T.alloc_buffer(({images * g.c_in * per_channel},), "float32")')
    a(1, f'YP = T.alloc_buffer(({images * g.c_out * pp},), "float32")')
    a(1, f"for nc in range({n} // {images}):" if images > 1 else f"for nc in range({n}):")
    _copy_planes(a, g, planes, images)
    # the product: pixel-tile major, output-channel tiles inner (one tile of plane views stays in cache)
    per_image = n_row_tiles * n_ptiles
    work = images * g.pixels * (bsr.nnz * rows if sparse else g.c_out * g.k)
    a(2, f"for t in {_loop(work)}({images * per_image}):")
    row_tile = f"(t % {n_row_tiles})"
    ptile = f"(t % {per_image} // {n_row_tiles})"
    slot = f"(t // {per_image})" if images > 1 else "0"
    image_planes = f"{slot} * {g.c_in * per_channel}"
    if sparse:  # I holds each block's view offset (plane_offsets)
        chunk = _bsr_conv_chunk(params, rows, tile_w)
        acc, offsets = _bsr_accumulate(a, 3, br=rows, bc=1, vt=tile_w, chunk=chunk, block_row=row_tile,
                                       vload=lambda k, v: f"XP[{image_planes} + {k} + {ptile} * {tile_w} + {v}]",
                                       row_stride=1)
        chunks = [[(f"{acc}{r}_{c}", off, chunk) for c, off in enumerate(offsets)] for r in range(rows)]
    else:
        acc = _zero_accumulators(a, 3, rows, tile_w)
        a(3, f"for ci in range({g.c_in}):")
        for k, offset in planes.taps(g):
            view = f"XP[{image_planes} + ci * {per_channel} + {offset} + {ptile} * {tile_w} + v]"
            for i in range(rows):
                a(4, f"for v in T.vectorized({tile_w}):")
                a(5, f"{acc}{i}[v] = {acc}{i}[v] + W[{row_tile}, {k}, {i}] * {view}")
        chunks = [[(f"{acc}{r}", 0, tile_w)] for r in range(rows)]
    for r in range(rows):
        ind = 3
        co = f"{row_tile} * {rows} + {r}"
        if g.c_out % rows:
            a(ind, f"if {co} < {g.c_out}:")
            ind += 1
        for buf, off, size in chunks[r]:
            a(ind, f"for v in T.vectorized({size}):")
            val = _epilogue(f"{buf}[v]", f"B[{co}]" if bias is not None else None, act)
            a(ind + 1, f"YP[{slot} * {g.c_out * pp} + ({co}) * {pp} + {ptile} * {tile_w} + {off} + v] = {val}")
    _drop_extra_columns(a, g, planes, images)
    src = a.text()
    if sparse:
        consts = [bsr.data, plane_offsets(g, planes, bsr.indices), bsr.indptr]
    else:
        consts = [pack_conv_weight(w_out_in, rows)]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(g.c_out))
    return Kernel(name, _parse(src, name), consts, src)
