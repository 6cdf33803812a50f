"""Row-wise ``layer_norm`` and ``softmax`` over the last axis, with vectorised reductions (TVM's legalized
reductions are serial scalar chains) and a polynomial exp."""

from __future__ import annotations

import numpy as np

from .source import CpuKernelParams, Kernel, _parse, _Src


def _fast_exp(x: str) -> str:
    """exp(x) as a vectorisable polynomial (the scheme of TVM's topi.fast_exp; max rel. error ~3e-7)."""
    xc = f"T.max(T.min({x}, T.float32(88.3762626647949)), T.float32(-88.3762626647949))"
    n = f"T.floor({xc} * T.float32(1.44269504088896341) + T.float32(0.5))"
    r = f"({xc} - {n} * T.float32(0.693147180559945))"
    p = "T.float32(1.9875691500e-4)"
    for c in ("1.3981999507e-3", "8.3334519073e-3", "4.1665795894e-2", "1.6666665459e-1", "5.0000001201e-1"):
        p = f"({p} * {r} + T.float32({c}))"
    poly = f"({p} * {r} * {r} + {r} + T.float32(1))"
    two_n = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {n}) + 127, 23))'
    return f"({poly} * {two_n})"


def _row_head(a: _Src, name: str, args: list[str], rows_static: int | None, d: int, bufs: list[tuple[str, str]]):
    rows = "rows" if rows_static is None else str(rows_static)
    a.signature(name, args, ("rows",) if rows_static is None else ())
    for var, decl in bufs:
        a(1, f"{var} = T.match_buffer({decl.format(rows=rows, d=d)})")
    return rows


def _lane_sum(a: _Src, ind: int, acc: str, out: str, lanes: int, op: str = "+") -> None:
    a(ind, f"{out}[0] = {acc}[0]")
    a(ind, f"for v in T.unroll({lanes - 1}):")
    if op == "+":
        a(ind + 1, f"{out}[0] = {out}[0] + {acc}[v + 1]")
    else:
        a(ind + 1, f"{out}[0] = T.max({out}[0], {acc}[v + 1])")


def layer_norm(
    name: str, d: int, eps: float, gamma: np.ndarray | None, beta: np.ndarray | None, params: CpuKernelParams,
    rows_static: int | None = None,
) -> Kernel:
    """Y[r, :] = (X[r, :] - mean) / sqrt(var + eps) * gamma + beta over the last axis (length d)."""
    lanes = params.lanes
    full, rest = divmod(d, lanes)
    if gamma is None and beta is None:  # see softmax: keep a second input
        gamma = np.ones(d, np.float32)
    args = ["x: T.handle"] + (["g: T.handle"] if gamma is not None else []) + (["b: T.handle"] if beta is not None else [])
    args.append("y: T.handle")
    bufs = [("X", 'x, ({rows}, {d}), "float32"')]
    if gamma is not None:
        bufs.append(("G", 'g, ({d},), "float32"'))
    if beta is not None:
        bufs.append(("Bt", 'b, ({d},), "float32"'))
    bufs.append(("Y", 'y, ({rows}, {d}), "float32"'))
    a = _Src()
    rows = _row_head(a, name, args, rows_static, d, bufs)
    a(1, f"for r in T.parallel({rows}):")
    a(2, f'acc = T.alloc_buffer(({lanes},), "float32")')
    a(2, 'tot = T.alloc_buffer((1,), "float32")')
    a(2, 'mean = T.alloc_buffer((1,), "float32")')
    a(2, 'rstd = T.alloc_buffer((1,), "float32")')
    for phase in ("sum", "var"):
        a(2, f"for v in T.vectorized({lanes}):")
        a(3, "acc[v] = T.float32(0)")
        term = (lambda i: f"X[r, {i}]") if phase == "sum" else (lambda i: f"(X[r, {i}] - mean[0]) * (X[r, {i}] - mean[0])")
        if full:
            a(2, f"for q in range({full}):")
            a(3, f"for v in T.vectorized({lanes}):")
            a(4, f"acc[v] = acc[v] + {term(f'q * {lanes} + v')}")
        _lane_sum(a, 2, "acc", "tot", lanes)
        for i in range(rest):
            a(2, f"tot[0] = tot[0] + {term(str(full * lanes + i))}")
        if phase == "sum":
            a(2, f"mean[0] = tot[0] * T.float32({1.0 / d!r})")
        else:
            a(2, f"rstd[0] = T.rsqrt(tot[0] * T.float32({1.0 / d!r}) + T.float32({float(eps)!r}))")

    def norm(i: str) -> str:
        val = f"(X[r, {i}] - mean[0]) * rstd[0]"
        if gamma is not None:
            val = f"{val} * G[{i}]"
        if beta is not None:
            val = f"{val} + Bt[{i}]"
        return val

    _store_row(a, full, rest, lanes, norm)
    src = a.text()
    consts = [np.ascontiguousarray(c, dtype=np.float32).reshape(d) for c in (gamma, beta) if c is not None]
    return Kernel(name, _parse(src, name), consts, src)


def _store_row(a: _Src, full: int, rest: int, lanes: int, value) -> None:
    """Y[r, i] = value(i) over a row: ``full`` vectorised chunks of ``lanes``, then ``rest`` scalar columns."""
    if full:
        a(2, f"for q in range({full}):")
        a(3, f"for v in T.vectorized({lanes}):")
        a(4, f"Y[r, q * {lanes} + v] = {value(f'q * {lanes} + v')}")
    if rest:
        a(2, f"for v in range({rest}):")
        a(3, f"Y[r, {full * lanes} + v] = {value(f'{full * lanes} + v')}")


def softmax(name: str, d: int, params: CpuKernelParams, rows_static: int | None = None) -> Kernel:
    """Y[r, :] = softmax(X[r, :]) over the last axis (length d), with a polynomial exp."""
    lanes = params.lanes
    full, rest = divmod(d, lanes)
    a = _Src()
    # S (a constant 1.0) is a second input only because TVM's reshape detection (RewriteDataflowReshape) asserts
    # block-form TIR on any function with exactly one input and one output of the same size.
    rows = _row_head(
        a, name, ["x: T.handle", "s: T.handle", "y: T.handle"], rows_static, d,
        [("X", 'x, ({rows}, {d}), "float32"'), ("S", 's, (1,), "float32"'), ("Y", 'y, ({rows}, {d}), "float32"')],
    )
    a(1, f"for r in T.parallel({rows}):")
    a(2, f'acc = T.alloc_buffer(({lanes},), "float32")')
    a(2, 'mx = T.alloc_buffer((1,), "float32")')
    a(2, 'tot = T.alloc_buffer((1,), "float32")')
    # max
    a(2, f"for v in T.vectorized({lanes}):")
    a(3, "acc[v] = T.float32(-3.4028234663852886e38)")
    if full:
        a(2, f"for q in range({full}):")
        a(3, f"for v in T.vectorized({lanes}):")
        a(4, f"acc[v] = T.max(acc[v], X[r, q * {lanes} + v])")
    _lane_sum(a, 2, "acc", "mx", lanes, op="max")
    for i in range(rest):
        a(2, f"mx[0] = T.max(mx[0], X[r, {full * lanes + i}])")
    # exp and sum (exp written to Y)
    a(2, f"for v in T.vectorized({lanes}):")
    a(3, "acc[v] = T.float32(0)")
    if full:
        a(2, f"for q in range({full}):")
        a(3, f"for v in T.vectorized({lanes}):")
        a(4, f"Y[r, q * {lanes} + v] = {_fast_exp(f'X[r, q * {lanes} + v] - mx[0]')}")
        a(4, f"acc[v] = acc[v] + Y[r, q * {lanes} + v]")
    _lane_sum(a, 2, "acc", "tot", lanes)
    for i in range(rest):
        j = full * lanes + i
        a(2, f"Y[r, {j}] = {_fast_exp(f'X[r, {j}] - mx[0]')}")
        a(2, f"tot[0] = tot[0] + Y[r, {j}]")
    a(2, "tot[0] = S[0] / tot[0]")
    _store_row(a, full, rest, lanes, lambda i: f"Y[r, {i}] * tot[0]")
    src = a.text()
    return Kernel(name, _parse(src, name), [np.ones(1, np.float32)], src)
