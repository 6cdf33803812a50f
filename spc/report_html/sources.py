"""What a build directory holds, read defensively: every file is optional, may come from another spc version or
another tool, and a file that cannot be read is noted (the report says so) instead of stopping the report.

Files: ``summary.json`` (``spc compile`` writes it; ``spc prune --summary-json`` writes the prune part alone),
``manifest.json`` (the bundle's; per-layer dense/BSR decisions), ``latency.json`` (measured latencies, any shape),
``sensitivity.json`` (``spc sensitivity -o``), ``model.onnx`` (the bundle's model, for per-layer costs when there
is no prune summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpcError

FILES = ("summary.json", "manifest.json", "latency.json", "sensitivity.json", "model.onnx")


@dataclass
class BuildData:
    root: Path
    summary: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    latency: dict | list | None = None
    sensitivity: dict | None = None
    layers: list[dict] = field(default_factory=list)  # per-layer costs, before/after
    layers_source: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def pruning(self) -> dict:
        """The prune summary: nested under 'pruning' by spc compile, at the top level from spc prune."""
        if isinstance(self.summary.get("pruning"), dict):
            return self.summary["pruning"]
        return self.summary if "groups" in self.summary or "macs" in self.summary else {}

    @property
    def evaluation(self) -> dict:
        ev = self.summary.get("eval")
        return ev if isinstance(ev, dict) and _number(ev.get("before")) and _number(ev.get("after")) else {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path, problems: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path.name}: not readable JSON ({str(error)[:120]})")
        return None


def read_build(root: str | Path) -> BuildData:
    root = Path(root)
    if not root.is_dir():
        raise SpcError(f"{root}: no such directory")
    if not any((root / name).is_file() for name in FILES):
        raise SpcError(f"{root}: nothing to report (none of {', '.join(FILES)})")
    data = BuildData(root)
    found = {name: _read_json(root / name, data.problems) for name in FILES if name.endswith(".json")}
    data.summary = found["summary.json"] if isinstance(found["summary.json"], dict) else {}
    manifest = found["manifest.json"] or data.summary.get("manifest")
    data.manifest = manifest if isinstance(manifest, dict) else {}
    data.latency = found["latency.json"] if isinstance(found["latency.json"], (dict, list)) else None
    sens = found["sensitivity.json"]
    data.sensitivity = sens if isinstance(sens, dict) and isinstance(sens.get("groups", sens.get("curves")), list) \
        else None
    if found["sensitivity.json"] is not None and data.sensitivity is None:
        data.problems.append("sensitivity.json: not a file written by spc sensitivity")
    _fill_layers(data)
    return data


def _fill_layers(data: BuildData) -> None:
    layers = data.pruning.get("layers")
    if isinstance(layers, list) and layers:
        data.layers = [row for row in layers if isinstance(row, dict) and "node" in row]
        data.layers_source = "summary.json (the prune step's cost model)"
        return
    model = data.root / "model.onnx"
    if model.is_file():
        try:
            data.layers = dense_layers(model)
            data.layers_source = "model.onnx (no prune summary: the model as compiled, before = after)"
        except Exception as error:  # a model spc cannot read must not stop the report
            data.problems.append(f"model.onnx: per-layer costs unavailable ({str(error).splitlines()[0][:120]})")


def dense_layers(path: Path) -> list[dict]:
    """Per-layer MACs, weight parameters and output channels of a model as it is (no pruning: before = after)."""
    import numpy as np

    from ..cost import COSTED_OPS, count
    from ..graph import Graph
    from ..io import load

    graph = Graph(load(path))
    cost = count(graph)
    rows = []
    for node in graph.nodes:
        if node.op_type not in COSTED_OPS:
            continue
        params = sum(int(np.prod(graph.shape(name) or (), dtype=np.int64)) for name in node.input
                     if name and graph.is_weight(name))
        shape = graph.shape(node.output[0]) or ()
        axis = 1 if node.op_type.startswith("Conv") else -1
        channels = shape[axis] if len(shape) > 1 and isinstance(shape[axis], int) else None
        same = lambda value: {"before": value, "after": value}  # noqa: E731
        rows.append({"node": node.name, "op": node.op_type, "macs": same(cost.node_macs.get(node.name, 0)),
                     "params": same(params), "channels": same(channels)})
    return rows
