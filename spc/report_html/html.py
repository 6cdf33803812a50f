"""Small HTML building blocks: escaped tables, embedded images, sections, the page with its inline CSS."""

from __future__ import annotations

from html import escape

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #222; max-width: 1080px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd;
  padding-bottom: 0.2em; } h3 { font-size: 1.05em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f6f6f6; border-bottom: 1px solid #ccc; } td.num, th.num { text-align: right;
  font-variant-numeric: tabular-nums; }
tr.changed td { background: #fbf7ee; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.note { color: #555; background: #f7f7f9; border-left: 3px solid #aab; padding: 0.4em 0.8em; }
.warn { color: #7a4b00; background: #fff6e5; border-left: 3px solid #e0a030; padding: 0.4em 0.8em; }
nav a { margin-right: 1em; } code { background: #f3f3f3; padding: 0 3px; }
"""


def text(value) -> str:
    return escape(str(value))


def number(value, digits: int = 4) -> str:
    """A readable cell: integers with thousands separators, floats to ``digits`` significant places."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return text(value)


def table(headers: list[str] | None, rows: list[list], numeric: set[int] = frozenset(),
          marked: set[int] = frozenset()) -> str:
    """Cells are escaped unless they are already ``Markup``; rows in ``marked`` are highlighted; no header row
    when ``headers`` is None (a key/value table)."""
    head = "".join(f'<th class="num">{text(h)}</th>' if i in numeric else f"<th>{text(h)}</th>"
                   for i, h in enumerate(headers or []))
    head = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{_cell(c)}</td>' if i in numeric else f"<td>{_cell(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="changed">{cells}</tr>' if index in marked else f"<tr>{cells}</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


class Markup(str):
    """HTML that is already safe (e.g. a ``<code>`` span)."""


def _cell(value) -> str:
    if isinstance(value, Markup):
        return value
    return number(value) if isinstance(value, (int, float)) else text(value)


def image(data: str, alt: str) -> str:
    return f'<img alt="{text(alt)}" src="data:image/png;base64,{data}">'


def note(message: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{message}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{text(title)}</h2>\n{body}\n</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = " ".join(f'<a href="#{anchor}">{text(name)}</a>' for anchor, name, _ in sections)
    parts = "\n".join(section(anchor, name, body) for anchor, name, body in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{text(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{text(title)}</h1><p class=\"sub\">{subtitle}</p>"
            f"<nav>{nav}</nav>\n{parts}\n</body></html>\n")
