"""If, Loop and Scan: ops that run subgraphs.

spc does not rewrite inside subgraphs, so everything such an op touches stays as it is: its inputs and outputs,
and every outer-scope tensor a subgraph reads (a captured weight sliced outside would no longer match the
subgraph's own shapes). The rule refuses with a reason that names what the subgraphs capture, so ``spc analyze``
says why those channels are pinned; the rest of the model prunes as usual.
"""

from __future__ import annotations

import onnx

from ...io import captured_names
from .base import RuleRefused, couples

CONTROL_FLOW = ("If", "Loop", "Scan", "SequenceMap")


def _subgraphs(node):
    for attr in node.attribute:
        yield from ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)


@couples(*CONTROL_FLOW)
def control_flow(ctx):
    captured = list(dict.fromkeys(name for sub in _subgraphs(ctx.node) for name in captured_names(sub)))
    reads = f"; its subgraphs read {', '.join(repr(n) for n in captured[:4])}" if captured else ""
    more = f" and {len(captured) - 4} more" if len(captured) > 4 else ""
    raise RuleRefused(f"spc does not rewrite inside subgraphs, so what it touches stays{reads}{more}")
