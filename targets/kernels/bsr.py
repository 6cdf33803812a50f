"""Block-sparse (BSR) weights and ``bsr_matmul``: the product of ``dense_matmul`` with W in block-sparse rows
over W^T [N, K]. It works on X^T (a transposed, padded copy made inside the kernel) so it is vectorised over
tokens; blocks of ``br`` output rows x ``bc`` inputs are broadcast, and results are scattered into Y."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .source import CpuKernelParams, Kernel, _ceil, _copy_loop, _epilogue, _loop, _parse, _spill, _Src


@dataclass
class BSR:
    """Block-sparse rows of a weight viewed as [out, in]: blocks of br outputs x bc inputs."""

    data: np.ndarray  # [nnz, br, bc]
    indices: np.ndarray  # [nnz] block column (input) index, int32
    indptr: np.ndarray  # [n_block_rows + 1], int32
    shape: tuple[int, int]  # (out, in) of the unpadded weight
    block: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        out, inp = self.shape
        br, bc = self.block
        total = _ceil(out, br) * _ceil(inp, bc)
        return self.nnz / total if total else 0.0


def to_bsr(w_out_in: np.ndarray, block: tuple[int, int]) -> BSR:
    """Convert a dense [out, in] weight to BSR with blocks (br, bc); zero blocks are dropped, tails zero padded."""
    out, inp = (int(d) for d in w_out_in.shape)
    br, bc = block
    nbr, nbc = _ceil(out, br), _ceil(inp, bc)
    padded = np.zeros((nbr * br, nbc * bc), dtype=np.float32)
    padded[:out, :inp] = w_out_in
    blocks = padded.reshape(nbr, br, nbc, bc).transpose(0, 2, 1, 3)  # [nbr, nbc, br, bc]
    nonzero = np.any(blocks != 0, axis=(2, 3))
    rows, cols = np.nonzero(nonzero)
    data = blocks[rows, cols]
    indptr = np.zeros(nbr + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=nbr), out=indptr[1:])
    if data.shape[0] == 0:  # keep buffers non-empty; indptr says there is nothing to read
        data = np.zeros((1, br, bc), dtype=np.float32)
        cols = np.zeros(1, dtype=np.int64)
    return BSR(
        np.ascontiguousarray(data, dtype=np.float32),
        np.ascontiguousarray(cols, dtype=np.int32),
        indptr,
        (out, inp),
        (br, bc),
    )


TILE_MAJOR = True  # tasks ordered token tile first: one tile of XT is shared by consecutive block rows (~8% faster)
SCALED_INDICES = True  # pre-multiply block indices into row offsets where the activation layout is static
BSR_UNROLL = 1  # blocks per iteration of the block loop (2 and 4 measured no faster on AVX-512)


def _bsr_accumulate(
    a: _Src,
    ind: int,
    *,
    br: int,
    bc: int,
    vt: int,
    chunk: int,
    block_row: str,
    vload,
    row_stride: int | None = None,
) -> tuple[str, list[int]]:
    """acc{r}_{c}[chunk] (r < br, c < vt / chunk) += D[j, r, :] * vload(k, c * chunk + v) over the blocks j of
    ``block_row``. Returns the buffer prefix and the chunk offsets.

    With ``row_stride`` the indices I are pre-multiplied by bc * row_stride (see ``scaled_indices``) and vload
    receives the element offset of the row instead of its index (saves the multiply per block)."""
    tag = a.fresh("acc")
    offsets = list(range(0, vt, chunk))
    # int64 loop bounds: an int32 loop variable costs a sign extension per block in the address arithmetic
    start, stop = f'T.Cast("int64", P[{block_row}])', f'T.Cast("int64", P[{block_row} + 1])'
    for r in range(br):
        for c, _ in enumerate(offsets):
            a(ind, f'{tag}{r}_{c} = T.alloc_buffer(({chunk},), "float32")')
    for r in range(br):
        for c, _ in enumerate(offsets):
            a(ind, f"for v in T.vectorized({chunk}):")
            a(ind + 1, f"{tag}{r}_{c}[v] = T.float32(0)")

    def body(ind2: int, j: str) -> None:
        for cc in range(bc):
            if row_stride is not None:
                kexpr = f"I[{j}] + {cc * row_stride}" if cc else f"I[{j}]"
            else:
                kexpr = f"I[{j}] * {bc} + {cc}" if bc > 1 else f"I[{j}]"
            for r in range(br):
                for c, off in enumerate(offsets):
                    a(ind2, f"for v in T.vectorized({chunk}):")
                    a(ind2 + 1, f"{tag}{r}_{c}[v] = {tag}{r}_{c}[v] + D[{j}, {r}, {cc}] * {vload(kexpr, f'{off} + v')}")

    u = BSR_UNROLL
    if u <= 1:
        a(ind, f"for j in range({start}, {stop}):")
        body(ind + 1, "j")
    else:
        a(ind, f"for jj in range(({stop} - {start}) // {u}):")
        for q in range(u):
            body(ind + 1, f"{start} + jj * {u} + {q}")
        a(ind, f"for jt in range(({stop} - {start}) % {u}):")
        body(ind + 1, f"{start} + ({stop} - {start}) // {u} * {u} + jt")
    return tag, offsets


def scaled_indices(bsr: BSR, row_stride: int) -> np.ndarray:
    """Block column indices as element offsets of the first input row of each block (int32)."""
    scaled = bsr.indices.astype(np.int64) * bsr.block[1] * row_stride
    if scaled.size and scaled.max() >= 2**31:
        raise ValueError("activation buffer too large for int32 offsets")
    return scaled.astype(np.int32)


def _bsr_buffers(a: _Src, bsr: BSR) -> None:
    br, bc = bsr.block
    a(1, f'D = T.match_buffer(d, ({bsr.data.shape[0]}, {br}, {bc}), "float32")')
    a(1, f'I = T.match_buffer(i, ({bsr.indices.shape[0]},), "int32")')
    a(1, f'P = T.match_buffer(p, ({bsr.indptr.shape[0]},), "int32")')


def _token_tile(params: CpuKernelParams, br: int, m_static: int | None) -> int:
    """Tokens per full BSR tile: the widest register tile, unless a narrower one (down to 4 vectors) divides a static
    token count (128 tokens: 2 x 64 beats 96 + a half-efficient 32-token tail)."""
    full = params.bsr_tile(br)
    if m_static is None or m_static % full == 0:
        return full
    chunk = params.bsr_chunk(br)
    for cand in range(full - chunk, 4 * params.lanes - 1, -chunk):
        if m_static % cand == 0:
            return cand
    return full


def bsr_matmul(
    name: str,
    bsr: BSR,
    bias: np.ndarray | None,
    act: str | None,
    params: CpuKernelParams,
    m_static: int | None = None,
) -> Kernel:
    """Y[m, N] = X[m, K] @ W[K, N] with W^T = bsr ([N, K]); vectorised over m through a transposed copy of X."""
    n_dim, k_dim = bsr.shape
    br, bc = bsr.block
    vt = _token_tile(params, br, m_static)
    nbr = _ceil(n_dim, br)
    kp = _ceil(k_dim, bc) * bc
    m = "m" if m_static is None else str(m_static)
    mtv = f"(({m} + {vt - 1}) // {vt})"
    chunk = params.bsr_chunk(br)
    # XT is flat when m is static (row offsets are then pre-multiplied into the block indices)
    flat = m_static is not None and SCALED_INDICES
    mp = _ceil(m_static, vt) * vt if flat else None
    a = _Src()
    args = ["x: T.handle", "d: T.handle", "i: T.handle", "p: T.handle"]
    args += (["b: T.handle"] if bias is not None else []) + ["y: T.handle"]
    a.signature(name, args, ("m",) if m_static is None else ())
    a(1, f'X = T.match_buffer(x, ({m}, {k_dim}), "float32")')
    _bsr_buffers(a, bsr)
    if bias is not None:
        a(1, f'B = T.match_buffer(b, ({n_dim},), "float32")')
    a(1, f'Y = T.match_buffer(y, ({m}, {n_dim}), "float32")')
    # stage 1: XT[k, token] (tokens padded to the tile, padded K rows and tokens are zero)
    if flat:
        a(1, f'XT = T.alloc_buffer(({kp * mp},), "float32")')
    else:
        a(1, f'XT = T.alloc_buffer(({kp}, {mtv} * {vt}), "float32")')
    a(1, f"for tt in {_copy_loop(kp * m_static if m_static is not None else None)}({mtv}):")
    a(2, f"for kk in range({kp}):")
    a(3, f"for v in T.vectorized({vt}):")
    dst = f"XT[kk * {mp} + tt * {vt} + v]" if flat else f"XT[kk, tt * {vt} + v]"
    a(
        4,
        f"{dst} = T.if_then_else(tt * {vt} + v < {m} and kk < {k_dim}, "
        f"X[T.min(tt * {vt} + v, {m} - 1), T.min(kk, {k_dim - 1})], T.float32(0))",
    )
    # stage 2: tiles of (block row, tokens): full tiles of vt tokens, then the tail in tiles of one chunk
    if m_static is not None:
        n_full, n_tail = m_static // vt, _ceil(m_static % vt, chunk)
        n_tiles = str(n_full + n_tail)
    else:
        n_full = n_tail = None
        n_tiles = f"({m} // {vt} + ({m} % {vt} + {chunk - 1}) // {chunk})"
    work = bsr.nnz * br * bc * m_static if m_static is not None else None
    a(1, f"for t in {_loop(work)}({nbr} * {n_tiles}):")
    if TILE_MAJOR:
        block_row = f"(t % {nbr})"
        tile = f"(t // {nbr})"
    else:
        block_row = f"(t // {n_tiles})"
        tile = f"(t % {n_tiles})"

    def emit(ind: int, width: int, tok0: str, guard: bool) -> None:
        acc, offsets = _bsr_accumulate(
            a,
            ind,
            br=br,
            bc=bc,
            vt=width,
            chunk=chunk,
            block_row=block_row,
            vload=(lambda k, v: f"XT[{k} + {tok0} + {v}]") if flat else (lambda k, v: f"XT[{k}, {tok0} + {v}]"),
            row_stride=mp,
        )

        def store_scalar(ind: int) -> None:
            """One float per store (tails), read back from a stack copy of the accumulators."""
            for r in range(br):
                ind2 = ind
                col = f"{block_row} * {br} + {r}"
                if n_dim % br:
                    a(ind2, f"if {col} < {n_dim}:")
                    ind2 += 1
                for c, off in enumerate(offsets):
                    scratch = _spill(a, ind2, f"{acc}{r}_{c}", chunk)
                    val = _epilogue(f"{scratch}[v]", f"B[{col}]" if bias is not None else None, act)
                    count = f"T.max(T.min({m} - ({tok0}) - {off}, {chunk}), 0)" if guard else str(chunk)
                    a(ind2, f"for v in range({count}):")
                    a(ind2 + 1, f"Y[{tok0} + {off} + v, {col}] = {val}")

        def store_rows(ind: int) -> None:
            """Transpose through a small stack scratch so that each token writes its br outputs at once."""
            for c, off in enumerate(offsets):
                scratch = a.fresh("tr")
                a(ind, f'{scratch} = T.alloc_buffer(({br}, {chunk}), "float32")')
                for r in range(br):
                    a(ind, f"for v in T.vectorized({chunk}):")
                    a(ind + 1, f"{scratch}[{r}, v] = {acc}{r}_{c}[v]")
                a(ind, f"for v in range({chunk}):")
                col = f"{block_row} * {br} + r"
                val = _epilogue(f"{scratch}[r, v]", f"B[{col}]" if bias is not None else None, act)
                a(ind + 1, f"for r in T.vectorized({br}):")
                a(ind + 2, f"Y[{tok0} + {off} + v, {col}] = {val}")

        store_full = store_rows
        if guard or n_dim % br and nbr == 1:
            store_scalar(ind)
        elif n_dim % br == 0:
            store_full(ind)
        else:
            a(ind, f"if {block_row} < {nbr - 1}:")
            store_full(ind + 1)
            a(ind, "else:")
            store_scalar(ind + 1)

    full = (vt, f"{tile} * {vt}", False)
    tail = (chunk, f"{m} // {vt} * {vt} + ({tile} - {m} // {vt}) * {chunk}", True)
    if n_full is not None and n_tail == 0:
        emit(2, *full)
    elif n_full == 0:
        emit(2, *tail)
    else:
        a(2, f"if {tile} < {m} // {vt}:")
        emit(3, *full)
        a(2, "else:")
        emit(3, *tail)
    src = a.text()
    consts = [bsr.data, scaled_indices(bsr, mp) if flat else bsr.indices, bsr.indptr]
    if bias is not None:
        consts.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(n_dim))
    return Kernel(name, _parse(src, name), consts, src)
