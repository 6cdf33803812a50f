"""scikit-learn front-end over skl2onnx.

Classifiers are converted without skl2onnx's ZipMap (a list of {class: probability} dicts): spc works on tensors,
so the probabilities come out as one ``[N, classes]`` tensor beside the labels.
"""

from __future__ import annotations

import onnx

from ._common import exporting, finish, require


def from_sklearn(pipeline, example_or_initial_types, **opts) -> onnx.ModelProto:
    """Convert a fitted estimator or pipeline. ``example_or_initial_types`` is an example input array (its dtype
    and feature count fix the input type) or skl2onnx's ``initial_types`` list of ``(name, type)`` pairs;
    ``opts`` go to ``skl2onnx.to_onnx`` (``target_opset``, ``options``, ...)."""
    skl2onnx = require("skl2onnx", "from_sklearn", "skl2onnx", "sklearn")
    from sklearn.base import is_classifier

    if _is_initial_types(example_or_initial_types):
        opts["initial_types"] = list(example_or_initial_types)
    else:
        opts["X"] = example_or_initial_types
    with exporting("scikit-learn (skl2onnx)"):
        if "options" not in opts and is_classifier(pipeline):
            opts["options"] = {id(_final_estimator(pipeline)): {"zipmap": False}}
        proto = skl2onnx.to_onnx(pipeline, **opts)
    return finish(proto, f"from_sklearn({type(pipeline).__name__})")


def _final_estimator(model):
    """The last step of (nested) pipelines, the estimator that owns the ZipMap option."""
    while hasattr(model, "steps"):
        model = model.steps[-1][1]
    return model


def _is_initial_types(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in value))
