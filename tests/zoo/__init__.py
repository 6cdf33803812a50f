"""Model zoo for the pruning engine's tests.

Small random-weight versions of real architectures (hand-written CNNs / ViT-likes at
reduced width and depth, tiny Hugging Face transformers built from configs), exported
to self-contained ONNX files.

    from tests.zoo import ZOO, export
    inputs = export("resnet18", tmp_path / "resnet18.onnx")   # {"x": np.ndarray}
    onnxruntime.InferenceSession(str(tmp_path / "resnet18.onnx")).run(None, inputs)

See ``tests/zoo/core.py`` for the options and ``tests/zoo/check_zoo.py`` for a
script that exports every model and compares onnxruntime against torch.
"""

from .core import (
    DEFAULT_EXPORTER,
    INPUTS,
    OUTPUT_NAME,
    ZOO,
    InputSpec,
    build,
    example_inputs,
    export,
    randomize_,
)

__all__ = [
    "DEFAULT_EXPORTER",
    "INPUTS",
    "OUTPUT_NAME",
    "ZOO",
    "InputSpec",
    "build",
    "example_inputs",
    "export",
    "randomize_",
]
