"""A small cost model: does the block-sparse kernel beat the dense one for this layer?

Times are in units of one dense multiply-accumulate of spc's dense kernel. Fitted on the AVX-512 machine the
project benchmarks on (bench/bench_targets.py: BERT-base FFN 128x768x3072 with 4x1 blocks, one thread):

    t_dense = m * k * n / u_dense(m)
    t_bsr   = m * k * n * density / (efficiency * u_bsr(m)) + overhead * m * (k + n)

``efficiency`` (per target, TargetSpec.bsr_efficiency) is BSR throughput per stored weight relative to dense;
``overhead`` covers the transposed copy of the activations and the transposed store of a matmul (convolutions
skip it: their im2col or padded-plane layout is already pixel-major). ``u`` is the fraction of vector lanes/rows
doing useful work for m rows (tokens or pixels), which is what makes BSR lose at tiny batch: its tiles span tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernels import CpuKernelParams

MATMUL_OVERHEAD = 24.0  # MAC equivalents per transposed element (copy in + scattered store out)
CONV_OVERHEAD = 0.0
MIN_SPEEDUP = 1.1  # take BSR only when it is predicted at least this much faster
# a convolution's BSR form copying an element its dense form does not (im2col on small maps), in vector FMAs: one
# 32-channel 3x3 layer on an 8x8 map at 70-80% block sparsity ran 0.56-0.74x Winograd's dense time where the
# estimate without it read 1.25-1.87x (its im2col copy is as long as its products)
BSR_CONV_COPY_VECTOR_FMAS = 0.5


@dataclass(frozen=True)
class Estimate:
    dense: float
    sparse: float

    @property
    def speedup(self) -> float:
        return self.dense / self.sparse if self.sparse > 0 else float("inf")


def _util_rows(m: int, mr: int) -> float:
    """Dense row tiles: full tiles of mr rows, then 4-row and 1-row tiles (1-row tiles run at about 1/3)."""
    full, rest = divmod(m, mr)
    fours, ones = divmod(rest, 4) if mr > 4 else (0, rest)
    cost = full * mr + fours * 4 * 1.25 + ones * 3.0
    return m / cost if cost else 1.0


def _util_tokens(m: int, vt: int, chunk: int) -> float:
    """BSR token tiles: full tiles of vt tokens, the tail in tiles of one accumulator chunk."""
    full, rest = divmod(m, vt)
    padded = full * vt + -(-rest // chunk) * chunk
    return m / padded if padded else 1.0


def estimate(
    m: int,
    k: int,
    n: int,
    density: float,
    block: tuple[int, int],
    params: CpuKernelParams,
    efficiency: float,
    conv: bool = False,
    dense_speedup: float = 1.0,
    copy_elements: int = 0,
) -> Estimate:
    """``dense_speedup``: the dense kernel's predicted speed over plain multiply-accumulates (a 3x3 convolution by
    Winograd's algorithm: fewer multiplies than MACs); ``copy_elements``: what the BSR form copies beyond the dense
    one (``kernels.bsr_extra_copy``)."""
    m = max(int(m), 1)
    macs = float(m) * k * n
    dense = macs / _util_rows(m, params.mr) / dense_speedup
    from .kernels.bsr import _token_tile

    vt = _token_tile(params, block[0], m)
    sparse = macs * density / (max(efficiency, 1e-6) * _util_tokens(m, vt, params.bsr_chunk(block[0])))
    sparse += (CONV_OVERHEAD if conv else MATMUL_OVERHEAD) * m * (k + n)
    sparse += BSR_CONV_COPY_VECTOR_FMAS * params.lanes * copy_elements
    return Estimate(dense, sparse)
