"""What the host CPU likes: the channel multiple that keeps kernels on their vector fast paths.

Measured on this AVX-512 machine with ONNX Runtime: a stack of 3x3 convs at 63 channels ran 1.56x slower than at
64, so kept widths default to the vector width in floats (16 with AVX-512, 8 with AVX2, 4 with NEON or SSE).
"""

from __future__ import annotations

import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def default_round_to() -> int:
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return 4
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return 8
    if " avx512f" in flags:
        return 16
    if " avx2" in flags:
        return 8
    return 4
