"""Figures for the HTML report, drawn with matplotlib's Agg backend (no display needed) and returned as base64
PNG data so that the report is one self-contained file."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = ("#8da0cb", "#e78ac3", "#66c2a5", "#fc8d62", "#a6d854", "#ffd92f", "#e5c494", "#b3b3b3")
plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                     "axes.prop_cycle": matplotlib.cycler(color=COLOURS)})


def png(figure) -> str:
    """The figure as base64 PNG (closed afterwards, so loops over many figures do not leak)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def grouped_bars(labels: list[str], series: dict[str, list[float]], title: str, xlabel: str,
                 log: bool = False) -> str:
    """Horizontal bars, one row per label (layers top to bottom), one bar per series in each row."""
    count = max(len(series), 1)
    height = 0.8 / count
    figure, axes = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(labels) * max(1, count * 0.6)))
    for index, (name, values) in enumerate(series.items()):
        positions = [row + (index - (count - 1) / 2) * height for row in range(len(labels))]
        axes.barh(positions, [v if v is not None else 0 for v in values], height=height, label=name)
    axes.set_yticks(range(len(labels)), [_short(label) for label in labels])
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    if log:
        axes.set_xscale("log")
    elif max((abs(v) for values in series.values() for v in values if v is not None), default=0) >= 1e4:
        axes.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # 200k, 1.5M
    if len(series) > 1:
        axes.legend(loc="best", frameon=False)
    return png(figure)


def lines(curves: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
          percent_x: bool = True) -> str:
    """One line with markers per curve."""
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for index, (name, (xs, ys)) in enumerate(curves.items()):
        axes.plot(xs, ys, marker="o", markersize=3, label=_short(name, 60),
                  color=COLOURS[index % len(COLOURS)], linestyle="-" if index < len(COLOURS) else "--")
    if percent_x:
        axes.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", frameon=False, fontsize=7)
    return png(figure)


def scatter(points: list[tuple[str, float, float]], title: str, xlabel: str, ylabel: str) -> str:
    """Labelled points (e.g. accuracy against speed-up of the dense and the pruned model)."""
    figure, axes = plt.subplots(figsize=(6, 4))
    markers = "osD^v<>P"
    for index, (label, x, y) in enumerate(points):
        axes.scatter([x], [y], s=45, color=COLOURS[index % len(COLOURS)], marker=markers[index % len(markers)],
                     zorder=3, label=f"{label}: {x:.2f}x, {y:.4g}")
    axes.legend(loc="best", frameon=False, fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.margins(0.25)
    return png(figure)


def _short(text: str, limit: int = 40) -> str:
    text = str(text)
    return text if len(text) <= limit else "…" + text[-(limit - 1):]
