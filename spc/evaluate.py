"""Accuracy and fidelity on evaluation data, for the CLI's ``--eval`` and the benchmarks.

An evaluation file is an ``.npz`` holding one array per model input (by input name; a single-input model also
accepts the array under any name) and, optionally, ``label``: then accuracy is top-1 on the first output.
Without labels, the pruned model is compared with the dense one (top-1 agreement).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import SpcError
from .validate import session

LABEL_KEY = "label"


def load_npz(path: str | Path, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    path = Path(path)
    if not path.is_file():
        raise SpcError(f"{path}: no such file")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise SpcError(f"{path}: not a readable .npz file ({exc})") from None
    labels = data.pop(LABEL_KEY, None)
    names = [value.name for value in model.graph.input]
    if len(names) == 1 and names[0] not in data and len(data) == 1:
        data = {names[0]: next(iter(data.values()))}
    missing = [name for name in names if name not in data]
    if missing:
        raise SpcError(f"{path}: no array for model input '{missing[0]}' (has {', '.join(sorted(data)) or 'none'})")
    return {name: data[name] for name in names}, labels


def predict(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """First output of the model over the whole data, in batches (inputs are batched on axis 0)."""
    sess = session(model)
    output = sess.get_outputs()[0].name
    count = len(next(iter(feeds.values())))
    parts = []
    for start in range(0, count, batch):
        chunk = {name: value[start:start + batch] for name, value in feeds.items()}
        parts.append(sess.run([output], chunk)[0])
    return np.concatenate(parts)


def score(model: onnx.ModelProto, feeds, labels: np.ndarray | None, reference: np.ndarray | None = None) -> float:
    """Top-1 accuracy against ``labels``, or top-1 agreement with ``reference`` outputs."""
    out = predict(model, feeds)
    predicted = out.reshape(len(out), -1).argmax(axis=1)
    if labels is not None:
        return float((predicted == labels.reshape(-1)).mean())
    return float((predicted == reference.reshape(len(reference), -1).argmax(axis=1)).mean())
