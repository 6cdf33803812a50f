"""The report's sections, each a function of the build data that returns HTML (or says what is missing and how to
get it)."""

from __future__ import annotations

from . import plots
from .html import image, note, table, text
from .sources import BuildData, _number


def overview(data: BuildData) -> str:
    pruning, ev, manifest = data.pruning, data.evaluation, data.manifest
    facts = [["model", data.summary.get("model", "")],
             ["target", " ".join(str(x) for x in (manifest.get("target") or data.summary.get("target", ""),
                                                  manifest.get("description", "")) if x)],
             ["criterion", pruning.get("criterion", "not pruned")],
             ["budget", f"--ratio {pruning['ratio']} --by {pruning.get('by')}" if "ratio" in pruning else ""],
             ["sparsity", manifest.get("sparsity", "")],
             ["validation", pruning.get("validation", "")]]
    out = table(None, [row for row in facts if row[1] not in ("", None)])
    rows = []
    for key, label in (("macs", "MACs"), ("params", "parameters")):
        if isinstance(pruning.get(key), dict):
            before, after = pruning[key].get("before"), pruning[key].get("after")
            rows.append([label, before, after, _change(before, after)])
    if ev:
        rows.append([f"{ev.get('metric', 'metric')} (eval data)", ev["before"], ev["after"],
                     f"{ev['after'] - ev['before']:+.4f}"])
    if rows:
        out += table(["", "before", "after", "change"], rows, {1, 2, 3})
    if _number(pruning.get("speedup_macs")):
        out += note(f"{pruning['speedup_macs']}x fewer MACs after pruning.")
    if _number(manifest.get("expected_speedup")) and manifest.get("sparsity"):
        out += note(f"Expected speed-up of the block-sparse layers: {manifest['expected_speedup']}x.")
    if not pruning:
        out += note("The model was not pruned (no prune summary in summary.json).")
    return out


def _change(before, after) -> str:
    if not (_number(before) and _number(after)) or not before:
        return ""
    return f"{after / before - 1:+.1%}"


def layers(data: BuildData) -> str:
    if not data.layers:
        return note("No per-layer costs: neither summary.json nor a readable model.onnx is here.")
    out = note(f"From {text(data.layers_source)}.")
    rows, marked = [], set()
    for index, layer in enumerate(data.layers):
        got = [_pair(layer, key) for key in ("channels", "macs", "params")]
        if any(b != a for b, a in got):
            marked.add(index)
        rows.append([layer.get("node", ""), layer.get("op", "")] + [v for pair in got for v in pair])
    headers = ["layer", "op", "channels before", "channels after", "MACs before", "MACs after", "params before",
               "params after"]
    out += table(headers, rows, {2, 3, 4, 5, 6, 7}, marked)
    names = [str(layer.get("node", "")) for layer in data.layers]
    for key, title in (("channels", "Output channels per layer"), ("macs", "MACs per layer")):
        series = {"before": [_pair(layer, key)[0] for layer in data.layers],
                  "after": [_pair(layer, key)[1] for layer in data.layers]}
        if not marked:  # nothing pruned: one bar per layer
            series = {"as compiled": series["before"]}
        if any(_number(v) and v for v in next(iter(series.values()))):
            out += image(plots.grouped_bars(names, series, title, key if key == "channels" else "MACs"), title)
    out += _groups(data.pruning.get("groups"))
    return out


def _pair(layer: dict, key: str) -> tuple:
    value = layer.get(key)
    if isinstance(value, dict):
        return value.get("before"), value.get("after")
    return value, value


def _groups(groups) -> str:
    if not isinstance(groups, list) or not groups:
        return ""
    rows = [[g.get("group", ""), g.get("name", ""), g.get("units", ""), g.get("kept", ""),
             f"{g['kept'] / g['units']:.0%}" if _number(g.get("kept")) and g.get("units") else ""]
            for g in groups if isinstance(g, dict)]
    return "<h3>Prunable groups</h3>" + table(["#", "group", "units", "kept", "kept %"], rows, {0, 2, 3, 4})


def compiled(data: BuildData) -> str:
    layers = data.manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        return note("No bundle manifest here: the model was not compiled (spc compile writes manifest.json).")
    rows = [[layer.get("node", ""), layer.get("op", ""), layer.get("kernel", ""), layer.get("density"),
             layer.get("expected_speedup"), layer.get("reason", "")] for layer in layers if isinstance(layer, dict)]
    return (note("Dense or block-sparse (BSR) kernel per weight layer, as decided by the compiler.")
            + table(["layer", "op", "kernel", "density", "expected speed-up", "why"], rows, {3, 4}))
