"""spc: a graph-level structured pruning compiler for ONNX.

    import spc
    model = spc.load("model.onnx")
    print(spc.analyze(model).prunable_groups)
    result = spc.prune(model, ratio=0.5, by="macs", criterion="l1")
    spc.save(result.model, "model.pruned.onnx")
"""

from .analysis import Analysis, Group, analyze  # noqa: F401
from .api import PruneResult, load, prune, save  # noqa: F401
from .errors import SpcError  # noqa: F401
from .mask import mask_removal  # noqa: F401
from .rewrite import apply_removal  # noqa: F401

__version__ = "0.1.0"
