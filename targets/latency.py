"""Per-layer latency tables: a layer's measured time at a few (input, output) widths, interpolated in between.

A table holds times on a grid of input x output widths (multiples of the target's ``round_to``). Between grid
points it interpolates bilinearly, which is exact for the ``a*ci*co + b*ci + c*co + d`` form a GEMM's time takes
once widths stay on the kernels' vector multiples; outside, it extends the edge segments linearly. Every
measurement is cached on disk (one small JSON file per target, device, thread count, layer shape and widths,
under ``$SPC_LATENCY_CACHE`` or ``~/.cache/spc/latency``), so a model is measured once per device.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

CACHE_FORMAT = 2


@dataclass
class LatencyTable:
    in_widths: list[int]
    out_widths: list[int]
    seconds: list[list[float]]  # [in width index][out width index]

    def predict(self, ci: float, co: float) -> float:
        along_out = [_interp(co, self.out_widths, row) for row in self.seconds]
        return max(_interp(ci, self.in_widths, along_out), 0.0)

    def without(self, seconds: float) -> "LatencyTable":
        """The table less a per-call constant (the overhead of timing a layer alone), at least a tenth of each time."""
        return LatencyTable(self.in_widths, self.out_widths,
                            [[max(s - seconds, 0.1 * s) for s in row] for row in self.seconds])

    def to_json(self) -> dict:
        return {"in_widths": self.in_widths, "out_widths": self.out_widths,
                "seconds": [[float(f"{s:.4g}") for s in row] for row in self.seconds]}


def _interp(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise linear through (xs, ys), extended linearly past both ends; constant for one point."""
    if len(xs) == 1:
        return float(ys[0])
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def candidate_widths(full: int, lowest: int, round_to: int, count: int) -> list[int]:
    """``count`` widths from ``lowest`` to ``full``, rounded up to multiples of ``round_to`` (``full`` kept as is)."""
    if lowest >= full or count < 2:
        return [full]
    step = max(round_to, 1)
    out = set()
    for i in range(count):
        raw = lowest + (full - lowest) * i / (count - 1)
        out.add(min(full, max(step, -(-int(round(raw)) // step) * step)))
    out.add(full)
    return sorted(out)


class LatencyCache:
    """One JSON file per measurement, written atomically; keyed by everything the time depends on."""

    def __init__(self, directory: str | Path | None = None):
        default = os.environ.get("SPC_LATENCY_CACHE") or Path.home() / ".cache" / "spc" / "latency"
        self.dir = Path(directory or default)

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return self.dir / f"{digest}.json"

    def get(self, key: dict) -> float | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        return float(data["seconds"]) if data.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: dict, seconds: float) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "seconds": seconds}, default=str))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs re-measurement


CODEGEN_SOURCES = ("compile.py", "fold.py", "depth_first.py", "lower.py", "fusion.py", "relax_util.py",
                   "glue_schedule.py", "layer_records.py", "kernels", "measure.py", "registry.py")  # files, or packages
_codegen: str | None = None


def codegen_fingerprint() -> str:
    """Digest of the sources that decide which code a layer compiles to and how it is timed: a time measured with
    other kernels or schedules (an older spc) is not this code's time. The cache once held conv times from before
    the latency code was committed, 3-5x what the layers now take, and the planner priced block-sparse kernels at
    many times their real gain from them."""
    global _codegen
    if _codegen is None:
        digest = hashlib.sha1()
        for name in CODEGEN_SOURCES:
            path = Path(__file__).parent / name
            for source in sorted(path.glob("*.py")) if path.is_dir() else [path]:
                digest.update(source.read_bytes())
        _codegen = digest.hexdigest()[:16]
    return _codegen


def _device_key(measurer) -> dict:
    """What every cached time depends on besides the layer: target, TVM, spc's code generation, device, threads."""
    import tvm

    spec = measurer.spec
    return {"format": CACHE_FORMAT, "target": spec.name, "tvm_target": spec.tvm_target, "tvm": tvm.__version__,
            "codegen": codegen_fingerprint(), "device": measurer.device_name,
            "threads": os.environ.get("TVM_NUM_THREADS", "")}


def measurement_key(measurer, layer, ci: int, co: int, density: float = 1.0) -> dict:
    key = {**_device_key(measurer), "layer": layer.key(), "ci": int(ci), "co": int(co)}
    if density < 1.0:
        key["density"], key["kernel"] = round(float(density), 4), "bsr"
    return key


def measure_layer(measurer, layer, ci: int, co: int, cache: LatencyCache | None, again: bool = False,
                  density: float = 1.0) -> float:
    """Seconds of ``layer`` at widths (ci, co), block-sparse at ``density`` < 1; ``again`` measures once more and
    keeps the faster time."""
    if density < 1.0:
        return _cached(cache, measurement_key(measurer, layer, ci, co, density), again,
                       lambda: measurer.time_layer(layer, ci, co, density=density))
    return _cached(cache, measurement_key(measurer, layer, ci, co), again, lambda: measurer.time_layer(layer, ci, co))


def measure_call_overhead(measurer, cache: LatencyCache | None, again: bool = False) -> float:
    """Seconds a layer timed alone spends outside its own work (``Measurer.time_call``), cached like a layer."""
    return _cached(cache, {**_device_key(measurer), "call_overhead": True}, again,
                   lambda: min(measurer.time_call() for _ in range(3)))


def _cached(cache: LatencyCache | None, key: dict, again: bool, measure) -> float:
    """The cached time for ``key``; else (or ``again``) ``measure()``, keeping the faster of it and a cached time."""
    hit = cache.get(key) if cache is not None else None
    if hit is not None and not again:
        return hit
    seconds = measure()
    seconds = min(seconds, hit) if hit is not None else seconds
    if cache is not None:
        cache.put(key, seconds)
    return seconds


RETRIES = 2  # re-measurements of points that a narrower layer contradicts (a narrower layer timed slower)


def _contradicted(seconds: list[list[float]]) -> list[tuple[int, int]]:
    """Grid points slower than some point at least as wide in both widths: noise (it only ever adds time)."""
    rows, cols = len(seconds), len(seconds[0])
    return [(i, j) for i in range(rows) for j in range(cols)
            if any(seconds[i][j] > 1.02 * seconds[a][b] for a in range(i, rows) for b in range(j, cols))]


def measure_table(measurer, layer, in_widths: list[int], out_widths: list[int],
                  cache: LatencyCache | None = None, again: bool = False) -> LatencyTable:
    """Time the grid; re-time points contradicted by wider ones, then take the monotone envelope (a point's time is
    at most that of any wider point) so that pruning never predicts a slow-down from noise. ``again`` times every
    point once more (keeping the faster of that and a cached time)."""
    if layer.depthwise:
        in_widths = in_widths[-1:]  # a depthwise layer's input width is its output width
    seconds = [[measure_layer(measurer, layer, ci, co, cache, again=again) for co in out_widths] for ci in in_widths]
    for _ in range(RETRIES):
        bad = _contradicted(seconds)
        for i, j in bad:
            seconds[i][j] = measure_layer(measurer, layer, in_widths[i], out_widths[j], cache, again=True)
        if not bad:
            break
    rows, cols = len(in_widths), len(out_widths)
    envelope = [[min(seconds[a][b] for a in range(i, rows) for b in range(j, cols)) for j in range(cols)]
                for i in range(rows)]
    return LatencyTable(list(in_widths), list(out_widths), envelope)
