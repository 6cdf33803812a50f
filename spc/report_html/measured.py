"""Sections from measurements made outside the compile step: latency (``latency.json``, whatever its layout),
sensitivity curves (``sensitivity.json``) and accuracy against speed-up."""

from __future__ import annotations

import re

from . import plots
from .html import Markup, image, note, table, text
from .sources import BuildData, _number

NAME_KEYS = ("node", "name", "layer", "op")
TIME_KEY = re.compile(r"(ms|us|sec|time|latency|before|after|dense|sparse)", re.IGNORECASE)
MAX_COLUMNS = 12


def flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts become dotted keys ({"latency": {"dense": 1}} -> {"latency.dense": 1}); lists are dropped."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif not isinstance(value, list):
            out[name] = value
    return out


def latency_parts(latency) -> tuple[dict, list[dict]]:
    """Top-level scalars and per-layer records, from a list of records or a dict holding one."""
    if isinstance(latency, list):
        return {}, [flatten(r) for r in latency if isinstance(r, dict)]
    lists = {k: v for k, v in latency.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    key = next((k for k in ("layers", "per_layer", "nodes") if k in lists), next(iter(lists), None))
    return flatten(latency), [flatten(r) for r in lists.get(key, []) if isinstance(r, dict)]


def latency(data: BuildData) -> str:
    if data.latency is None:
        return note("Latency was not measured: there is no <code>latency.json</code> in this directory.")
    scalars, records = latency_parts(data.latency)
    out = table(["", "value"], [[k, v] for k, v in scalars.items()], {1}) if scalars else ""
    if not records:
        return out + note("latency.json holds no per-layer records.")
    columns = list(dict.fromkeys(k for r in records for k in r))[:MAX_COLUMNS]
    numeric = {i for i, c in enumerate(columns) if all(_number(r.get(c)) or r.get(c) is None for r in records)}
    out += table(columns, [[r.get(c, "") for c in columns] for r in records], numeric)
    name = next((k for k in NAME_KEYS if k in columns), None)
    times = [c for i, c in enumerate(columns) if i in numeric and TIME_KEY.search(c)][:4]
    if name and times:
        series = {c: [r.get(c) for r in records] for c in times}
        out += image(plots.grouped_bars([str(r.get(name, "")) for r in records], series, "Latency per layer",
                                        ", ".join(times)), "latency per layer")
    return out


def sensitivity(data: BuildData) -> str:
    sens = data.sensitivity
    if sens is None:
        return note("No <code>sensitivity.json</code> here. Run <code>spc sensitivity MODEL.onnx [--eval "
                    "data.npz] -o " + text(data.root / "sensitivity.json") + "</code> to add the curves.")
    metric = "accuracy" if sens.get("metric") == "accuracy" else "error"
    curves, rows = {}, []
    for curve in sens.get("groups") or sens.get("curves") or []:
        points = [p for p in curve.get("points", []) if isinstance(p, dict) and _number(p.get(metric))
                  and _number(p.get("fraction"))]
        if not points:
            continue
        label = f"#{curve.get('group', '')} {curve.get('name', '')}"
        curves[label] = ([p["fraction"] for p in points], [p[metric] for p in points])
        rows.append([curve.get("group", ""), curve.get("name", ""), curve.get("units", "")]
                    + [Markup(f"{p[metric]:.4f}" if metric == "accuracy" else f"{p[metric]:.3g}") for p in points])
    if not curves:
        return note("sensitivity.json holds no curves.", "warn")
    fractions = next(iter(curves.values()))[0]
    ylabel = "top-1 accuracy" if metric == "accuracy" else "output error relative to the dense model"
    out = note(f"Each group pruned alone with criterion <code>{text(sens.get('criterion', '?'))}</code>, "
               f"measured on {text(sens.get('samples', '?'))} {text(sens.get('data', ''))} samples.")
    out += image(plots.lines(curves, "Sensitivity per group", "fraction of the group removed", ylabel),
                 "sensitivity curves")
    headers = ["#", "group", "units"] + [f"{f * 100:.4g}%" for f in fractions]
    width = len(headers)
    return out + table(headers, [row[:width] for row in rows], set(range(2, width)))


def accuracy_speedup(data: BuildData) -> str:
    ev, pruning = data.evaluation, data.pruning
    if not ev:
        return note("No evaluation figures: compile or prune with <code>--eval data.npz</code> to add them.")
    points = [("dense", 1.0, ev["before"])]
    if _number(pruning.get("speedup_macs")):
        points.append(("pruned (MACs)", float(pruning["speedup_macs"]), ev["after"]))
    scalars, _ = latency_parts(data.latency) if data.latency is not None else ({}, [])
    measured = [(k, v) for k, v in scalars.items() if _number(v) and "speedup" in k.replace("_", "").lower()]
    for key, value in measured[:2]:
        points.append((f"pruned ({key})", float(value), ev["after"]))
    if len(points) < 2:
        return note(f"{text(ev.get('metric', 'metric'))}: {ev['before']:.4f} before, {ev['after']:.4f} after "
                    "(no speed-up figure to plot against).")
    metric = str(ev.get("metric", "accuracy"))
    rows = [[label, Markup(f"{x:.3f}x"), y] for label, x, y in points]
    return (image(plots.scatter(points, f"{metric} against speed-up", "speed-up over the dense model", metric),
                  "accuracy against speed-up") + table(["model", "speed-up", metric], rows, {1, 2}))
