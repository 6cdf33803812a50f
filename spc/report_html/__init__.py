"""``spc report BUILD``: one self-contained HTML page (inline CSS, figures embedded as base64 PNG, no external
links) from what a build directory holds; every input file is optional and each section says what it needs.

    from spc.report_html import build_report
    build_report("build/digits")          # writes build/digits/report.html
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SpcError
from . import measured, sections
from .html import note, page, text
from .sources import BuildData, read_build

__all__ = ["BuildData", "build_report", "read_build", "render"]


def render(data: BuildData) -> str:
    """The HTML of the report of ``data``."""
    parts = [("overview", "Overview", sections.overview(data)),
             ("layers", "Channels, MACs and parameters per layer", sections.layers(data)),
             ("kernels", "Compiled kernels", sections.compiled(data)),
             ("latency", "Latency", measured.latency(data)),
             ("sensitivity", "Sensitivity", measured.sensitivity(data)),
             ("accuracy", "Accuracy against speed-up", measured.accuracy_speedup(data))]
    if data.problems:
        parts.append(("problems", "Unreadable files",
                      "".join(note(text(problem), "warn") for problem in data.problems)))
    files = ", ".join(p.name for p in sorted(data.root.iterdir()) if p.is_file())
    return page(f"spc report: {data.root.name}", f"{text(data.root)} &middot; files: {text(files)}", parts)


def build_report(build: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of the build directory ``build`` to ``output`` (default ``build/report.html``)."""
    data = read_build(build)
    path = Path(output) if output else data.root / "report.html"
    if path.suffix.lower() not in (".html", ".htm"):
        raise SpcError(f"-o: '{path}' should be an .html file")
    if not path.parent.is_dir():
        raise SpcError(f"-o: directory '{path.parent}' does not exist")
    html = render(data)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(html, encoding="utf-8")
    temporary.replace(path)
    return path


def report_cli(args) -> int:
    path = build_report(args.build, args.output)
    print(f"wrote {path}")
    return 0
