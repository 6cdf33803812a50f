"""TVM code generation per target, installed as ``spc.targets``.

    from spc.targets import compile_model, load_bundle, get_target
    manifest = compile_model(model, "x86", "build/", sparsity=0.8)   # writes a deployable bundle
    outputs = load_bundle("build/").run({"input": x})                # x86 bundles on an x86 host
    get_target("arm").round_to                                        # channel multiple for pruning

Targets are declarations in registry.py ("x86", "x86-avx2", "arm", "cuda"); add one with register_target().

Importing this package sets TVM_NUM_THREADS to the number of usable cores when neither TVM_NUM_THREADS nor
OMP_NUM_THREADS is set: TVM's runtime otherwise uses half the hardware threads on x86 (it assumes hyper-threading),
and its thread pool reads the setting only once, when the first parallel kernel runs.
"""

from .bundle import Bundle, load_bundle, read_manifest, use_all_cores
from .compile import bundle_inputs, compile_model
from .registry import TargetSpec, get_target, list_targets, register_target

use_all_cores()

__all__ = [
    "Bundle",
    "TargetSpec",
    "bundle_inputs",
    "compile_model",
    "get_target",
    "list_targets",
    "load_bundle",
    "read_manifest",
    "register_target",
    "use_all_cores",
]
