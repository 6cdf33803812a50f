"""What every front-end shares: importing its framework lazily, turning an exporter's failure into one line, and
normalising the exported model like ``spc.load`` does.

The frameworks are optional extras (``pip install 'spc[keras]'``), so nothing here imports one at module level.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from types import ModuleType

import onnx

from ..errors import SpcError
from ..io import from_proto

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")


def require(module: str, frontend: str, framework: str, extra: str) -> ModuleType:
    """Import ``module`` or say, in one line, which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SpcError(f"{frontend}: {framework} is not installed ({module}: {_first_line(exc)}); "
                       f"pip install 'spc[{extra}]'") from None


@contextlib.contextmanager
def exporting(framework: str):
    """Any exception the exporter raises becomes an SpcError naming the framework and its first line."""
    try:
        yield
    except SpcError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporters raise every kind of exception
        detail = _first_line(exc)
        if not detail.startswith(f"{type(exc).__name__}:"):
            detail = f"{type(exc).__name__}: {detail}"
        raise SpcError(f"{framework} export failed: {detail}") from None
    except SystemExit as exc:  # paddle2onnx logs its error and exits
        raise SpcError(f"{framework} export failed: the exporter exited with status {exc.code} "
                       "(its log above says why)") from None


def finish(model, source: str) -> onnx.ModelProto:
    """The normalised copy spc.analyze / spc.prune / compile take."""
    if not isinstance(model, onnx.ModelProto):
        raise SpcError(f"{source}: the exporter returned {type(model).__name__}, not an onnx.ModelProto")
    return from_proto(model, source=source)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (exporters write pages, some in colour), cut to
    ``limit``; an exporter that wraps the real error (torch.onnx does) gets its root cause appended."""
    line = _message(exc)[:limit]
    root, seen = exc, {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    if root is not exc:
        line = f"{line} ({type(root).__name__}: {_message(root)[:limit]})"
    return line


def _message(exc: BaseException) -> str:
    """The first line, or where it only introduces a traceback ("In transformed code:"), the error line in it."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":"):
        return next((line for line in lines[1:] if _ERROR_LINE.match(line)), lines[0])
    return lines[0]
