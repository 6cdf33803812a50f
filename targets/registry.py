"""Target declarations: one small record per target, registered by name.

Everything target-specific lives in these records (TVM target dict, vector width, register blocking of the CPU
kernels, channel multiple for pruning, cross compiler, how to run a bundle), so the compiler has no per-target
branches. Add a target with ``register_target(TargetSpec(...))``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from .kernels import CpuKernelParams


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    tvm_target: dict  # the TVM target dict (TVM 0.27 takes dicts only)
    tvm_host: dict | None = None  # host target for device targets (cuda)
    vector_lanes: int = 1  # float32 lanes of one vector register (SIMD width)
    round_to: int = 1  # preferred channel multiple for structured pruning
    cpu_kernels: CpuKernelParams | None = None  # register blocking of spc's CPU kernels; None: TVM's GPU rules
    sparse_kernels: bool = False  # whether spc has BSR kernels for this target
    bsr_efficiency: float = 0.0  # cost model: BSR throughput per stored weight relative to dense (see cost.py)
    cross_compiler: str | None = None  # C compiler that links the exported library, None: the host's default
    host_machines: tuple[str, ...] = ()  # platform.machine() values that can load and run a bundle in-process
    required_cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo flags the library needs to run
    emits_source: str | None = None  # device source kept beside the library ("cuda")
    runtime_device: str = "cpu"  # TVM device kind a bundle runs on ("cpu", "cuda")
    # Relax VM mode: "compiled" turns the VM's instruction list into host code (less time between kernels: the
    # digits transformer 1.30x faster at batch 1, bench/README.md), "bytecode" interprets it
    vm_exec_mode: str = "compiled"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_cpu(self) -> bool:
        return self.cpu_kernels is not None

    def tvm(self):
        """The ``tvm.target.Target``."""
        import tvm

        if self.tvm_host is not None:
            return tvm.target.Target(self.tvm_target, host=self.tvm_host)
        return tvm.target.Target(self.tvm_target)

    def runs_here(self) -> bool:
        if platform.machine().lower() not in self.host_machines:
            return False
        if self.runtime_device == "cuda":
            return _has_cuda_gpu()
        if not self.required_cpu_flags:
            return True
        flags = _cpu_flags()
        return all(flag in flags for flag in self.required_cpu_flags)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _has_cuda_gpu() -> bool:
    from .cuda_runtime import ensure_cuda_runtime
    from .errors import SpcError

    try:
        ensure_cuda_runtime()
    except SpcError:
        return False
    return True


_REGISTRY: dict[str, TargetSpec] = {}


def register_target(spec: TargetSpec, *, replace: bool = False) -> TargetSpec:
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"target {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_target(name: str | TargetSpec) -> TargetSpec:
    """The registered target of that name (a TargetSpec is returned as it is: a variant built with
    ``dataclasses.replace``, as benchmarks do)."""
    if isinstance(name, TargetSpec):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        from .errors import SpcError

        raise SpcError(f"unknown target {name!r}; known targets: {', '.join(sorted(_REGISTRY))}") from None


def list_targets() -> list[str]:
    return sorted(_REGISTRY)


# ---- built-in targets -----------------------------------------------------------------------------------------

register_target(
    TargetSpec(
        name="x86",
        description="x86-64 with AVX-512 (Skylake-SP and newer), float32, all cores",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"},
        vector_lanes=16,
        round_to=16,
        # dense: 12 rows x 32 columns = 24 zmm accumulators; BSR: up to 24 zmm (4x1 blocks: 96 tokens, or 64 when
        # that divides a static token count)
        cpu_kernels=CpuKernelParams(lanes=16, mr=12, nr=32, ku=4, acc_regs=24),
        sparse_kernels=True,
        bsr_efficiency=0.75,
        host_machines=("x86_64", "amd64"),
        required_cpu_flags=("avx512f",),
    )
)

register_target(
    TargetSpec(
        name="x86-avx2",
        description="x86-64 with AVX2 + FMA (Haswell and newer), float32, all cores",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
        vector_lanes=8,
        round_to=8,
        # 16 ymm registers: 6 x 16 = 12 accumulators; BSR tiles 8 ymm
        cpu_kernels=CpuKernelParams(lanes=8, mr=6, nr=16, ku=4, acc_regs=8),
        sparse_kernels=True,
        bsr_efficiency=0.7,
        host_machines=("x86_64", "amd64"),
        required_cpu_flags=("avx2", "fma"),
    )
)

register_target(
    TargetSpec(
        name="arm",
        description="AArch64 Linux with NEON (ARMv8-A), float32, all cores; cross-compiled with aarch64-linux-gnu-gcc",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        vector_lanes=4,
        round_to=8,
        # 32 q registers: 6 x 16 = 24 accumulators; BSR tiles 24 q registers (4x1 blocks: 24 tokens)
        cpu_kernels=CpuKernelParams(lanes=4, mr=6, nr=16, ku=4, acc_regs=24),
        sparse_kernels=True,
        bsr_efficiency=0.7,
        cross_compiler="aarch64-linux-gnu-gcc",
        host_machines=("aarch64", "arm64"),
    )
)

register_target(
    TargetSpec(
        name="cuda",
        description="NVIDIA GPU, sm_80 (Ampere) and newer, float32; TVM's dlight GPU schedules",
        tvm_target={"kind": "cuda", "arch": "sm_80"},
        tvm_host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        vector_lanes=32,
        round_to=8,
        cpu_kernels=None,
        sparse_kernels=False,
        emits_source="cuda",
        runtime_device="cuda",
        vm_exec_mode="bytecode",  # the mode these bundles were run in on an H200 (bench_cuda.py); compiled: not yet
        host_machines=("x86_64", "amd64", "aarch64", "arm64"),
        notes=("block-sparse kernels are CPU-only: weights are compiled dense (zeros kept) on cuda",),
    )
)
