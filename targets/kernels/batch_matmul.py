"""``batch_matmul``: A[b, m, k] @ B[b, k, n] for two activations (attention), like ``dense_matmul`` with B
packed per call when n is symbolic or not a multiple of the panel width."""

from __future__ import annotations

from .dense import _row_tiles
from .source import CpuKernelParams, Kernel, _choose_mr, _parse, _spill, _Src, _tile_accumulate


def batch_matmul(
    name: str,
    params: CpuKernelParams,
    batch: int | None,
    m_static: int | None,
    k_static: int | None,
    n_static: int | None,
) -> Kernel:
    """C[b, m, n] = A[b, m, k] @ B[b, k, n]; any of b, m, k, n may be symbolic (None)."""
    nr, ku = params.nr, params.ku
    mr = _choose_mr(params, m_static)
    bs = "bb" if batch is None else str(batch)
    m = "m" if m_static is None else str(m_static)
    k = "kd" if k_static is None else str(k_static)
    n = "nd" if n_static is None else str(n_static)
    pack = n_static is None or n_static % nr != 0
    np_ = f"(({n} + {nr - 1}) // {nr})"
    mt = f"(({m} + {mr - 1}) // {mr})"
    a = _Src()
    sizes = (("bb", batch), ("m", m_static), ("kd", k_static), ("nd", n_static))
    a.signature(name, ["a: T.handle", "b: T.handle", "c: T.handle"], tuple(s for s, static in sizes if static is None))
    a(1, f'A = T.match_buffer(a, ({bs}, {m}, {k}), "float32")')
    a(1, f'B = T.match_buffer(b, ({bs}, {k}, {n}), "float32")')
    a(1, f'C = T.match_buffer(c, ({bs}, {m}, {n}), "float32")')
    if pack:
        a(1, f'BP = T.alloc_buffer(({bs}, {np_}, {k}, {nr}), "float32")')
        a(1, f"for t in T.parallel({bs} * {np_}):")
        a(2, f"for kk in range({k}):")
        a(3, f"for v in T.vectorized({nr}):")
        col = f"t % {np_} * {nr} + v"
        a(
            4,
            f"BP[t // {np_}, t % {np_}, kk, v] = T.if_then_else({col} < {n}, "
            f"B[t // {np_}, kk, T.min({col}, {n} - 1)], T.float32(0))",
        )
    a(1, f"for t in T.parallel({bs} * {np_} * {mt}):")
    bidx = f"(t // ({np_} * {mt}))"
    panel = f"(t % ({np_} * {mt}) // {mt})"
    tile = f"(t % {mt})"
    full_panels = None if n_static is None else n_static // nr

    def vload(kx: str, v: str) -> str:
        if pack:
            return f"BP[{bidx}, {panel}, {kx}, {v}]"
        return f"B[{bidx}, {kx}, {panel} * {nr} + {v}]"

    def emit_tile(ind: int, rows: int, row0: str) -> None:
        acc = _tile_accumulate(
            a,
            ind,
            rows=rows,
            width=nr,
            k_extent=k,
            k_static=k_static,
            ku=ku,
            bcast=lambda i, kx: f"A[{bidx}, {row0} + {i}, {kx}]",
            vload=vload,
        )

        def store(ind2: int, vec: bool) -> None:
            for i in range(rows):
                if vec:
                    a(ind2, f"for v in T.vectorized({nr}):")
                    a(ind2 + 1, f"C[{bidx}, {row0} + {i}, {panel} * {nr} + v] = {acc}{i}[v]")
                else:
                    scratch = _spill(a, ind2, f"{acc}{i}", nr)
                    a(ind2, f"for v in range(T.min({n} - {panel} * {nr}, {nr})):")
                    a(ind2 + 1, f"C[{bidx}, {row0} + {i}, {panel} * {nr} + v] = {scratch}[v]")

        if not pack:
            store(ind, True)
        else:
            cond = f"{panel} < {n} // {nr}" if full_panels is None else f"{panel} < {full_panels}"
            a(ind, f"if {cond}:")
            store(ind + 1, True)
            a(ind, "else:")
            store(ind + 1, False)

    _row_tiles(a, 2, m=m, m_static=m_static, mr=mr, tile=tile, emit_tile=emit_tile)
    src = a.text()
    return Kernel(name, _parse(src, name), [], src)
