"""spc: a graph-level structured pruning compiler for ONNX.

    import spc
    model = spc.load("model.onnx")
    print(spc.analyze(model).prunable_groups)
    result = spc.prune(model, ratio=0.5, by="macs", criterion="l1")
    spc.save(result.model, "model.pruned.onnx")
    curves = spc.sensitivity(model, fractions=[0.25, 0.5, 0.75])   # each group pruned alone
"""

from .analysis import Analysis, Group, analyze  # noqa: F401
from .api import PruneResult, load, prune, save  # noqa: F401
from .errors import SpcError  # noqa: F401
from .mask import mask_removal  # noqa: F401
from .rewrite import apply_removal  # noqa: F401
from .sensitivity import Sensitivity, sensitivity  # noqa: F401

__version__ = "0.1.0"

_LAZY = {"to_torch": ("spc.backends.torch_", "to_torch")}  # names whose modules import heavy frameworks
_LAZY.update({name: ("spc.frontends", name)  # spc/frontends: framework -> ONNX through its own exporter
              for name in ("from_torch", "from_keras", "from_jax", "from_paddle", "from_sklearn")})


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'spc' has no attribute '{name}'")
