"""What every convolution kernel shares: its geometry, the packed dense weight, the pixel tile widths (dense
and BSR), how many images go in one launch, and the PrimFunc's signature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bsr import BSR, _bsr_buffers
from .source import CpuKernelParams, _ceil, _Src, window_count


@dataclass(frozen=True)
class ConvGeom:
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]

    @property
    def oh(self) -> int:
        return window_count(self.h, self.pad[0], self.pad[2], self.kh, self.dilation[0], self.stride[0])

    @property
    def ow(self) -> int:
        return window_count(self.w, self.pad[1], self.pad[3], self.kw, self.dilation[1], self.stride[1])

    @property
    def k(self) -> int:
        return self.c_in * self.kh * self.kw

    @property
    def pixels(self) -> int:
        return self.oh * self.ow

    @property
    def direct(self) -> bool:
        """1x1, stride 1, no padding: the input already is the im2col matrix."""
        return (
            self.kh == 1
            and self.kw == 1
            and self.stride == (1, 1)
            and self.pad == (0, 0, 0, 0)
        )


def pack_conv_weight(w_out_in: np.ndarray, mr: int) -> np.ndarray:
    """[Co, K] -> [ceil(Co/mr), K, mr] so that the mr output channels of one k are adjacent (broadcasts)."""
    co, k = w_out_in.shape
    cot = _ceil(co, mr)
    padded = np.zeros((cot * mr, k), dtype=np.float32)
    padded[:co] = w_out_in
    return np.ascontiguousarray(padded.reshape(cot, mr, k).transpose(0, 2, 1))


FOLD_BATCH_BYTES = 4 << 20  # buffers of a chunk of images: small convolutions run all images in one launch


def _conv_tile(g: ConvGeom, params: CpuKernelParams, block: tuple[int, int] | None) -> int:
    """Pixels per tile. Dense: nr, or one vector when an image has fewer pixels than nr (a 4x4 map in a 32-wide
    tile wastes half of every FMA). BSR: ``bsr_conv_tile``."""
    if block is None:
        return params.lanes if g.pixels < params.nr else params.nr
    return bsr_conv_tile(params, block[0], g.pixels)


def bsr_conv_tile(params: CpuKernelParams, br: int, positions: int) -> int:
    """Positions per BSR tile: the widest of (full BSR tile, 4, 2 vectors) dividing ``positions`` (no tail tile);
    else, for fewer positions than a full tile, the narrowest of those and one vector that holds them all (a 4x4
    map in the full 96-wide tile ran BSR at 0.67x of dense at 70% sparsity); else the full tile."""
    full = params.bsr_tile(br)
    for cand in (full, 4 * params.lanes, 2 * params.lanes):
        if cand <= full and positions % cand == 0:
            return cand
    if positions < full:
        return min(c for c in (full, 4 * params.lanes, 2 * params.lanes, params.lanes) if positions <= c <= full)
    return full


def _bsr_conv_chunk(params: CpuKernelParams, br: int, tile: int) -> int:
    """Lanes per BSR accumulator buffer in a tile of ``tile`` positions."""
    chunk = params.bsr_chunk(br)
    return chunk if tile % chunk == 0 else params.lanes


def _images_per_launch(n_static: int | None, per_image: int) -> int:
    """Images computed by one pair of parallel loops: the largest divisor of a static batch whose buffers
    (``per_image`` bytes each, ``conv_buffer_bytes``) stay under FOLD_BATCH_BYTES (small feature maps: one launch
    instead of two per image); 1 for a symbolic batch."""
    if n_static is None or n_static <= 1:
        return 1
    for images in range(n_static, 0, -1):
        if n_static % images == 0 and images * per_image <= FOLD_BATCH_BYTES:
            return images
    return 1


def _conv_head(a: _Src, name: str, g: ConvGeom, n_static: int | None, flat: bool, bsr: BSR | None,
               row_tiles: int, rows: int, bias: bool) -> str:
    """The PrimFunc's signature and buffers: X (flat over pixels or not), the weights (packed dense or BSR), the
    bias, Y [N, Co, OH * OW]. Returns the batch extent."""
    n = "n_batch" if n_static is None else str(n_static)
    args = ["x: T.handle"] + (["d: T.handle", "i: T.handle", "p: T.handle"] if bsr is not None else ["w: T.handle"])
    args += (["b: T.handle"] if bias else []) + ["y: T.handle"]
    a.signature(name, args, ("n_batch",) if n_static is None else ())
    if flat:
        a(1, f'X = T.match_buffer(x, ({n}, {g.c_in}, {g.h * g.w}), "float32")')
    else:
        a(1, f'X = T.match_buffer(x, ({n}, {g.c_in}, {g.h}, {g.w}), "float32")')
    if bsr is not None:
        _bsr_buffers(a, bsr)
    else:
        a(1, f'W = T.match_buffer(w, ({row_tiles}, {g.k}, {rows}), "float32")')
    if bias:
        a(1, f'B = T.match_buffer(b, ({g.c_out},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({n}, {g.c_out}, {g.pixels}), "float32")')
    return n
