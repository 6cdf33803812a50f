"""The op-rule registry and the context a rule works in.

A rule says, for one op, which (tensor, axis) pairs are coupled and by which index map; it may also name the role
of each weight (for importance and masking) and, if the op carries sizes in attributes or shape constants, how to
update them after pruning. Any axis of the op's inputs and outputs that the rule does not mention is pinned with a
reason, so a rule that forgets something is conservative, never wrong. Adding an op is one registration:

    @couples("Relu", "Sigmoid")          # or a one-line entry in a table of trivial ops
    def unary(ctx): ctx.tie_same(ctx.inputs[0], ctx.outputs[0])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from ...graph import Graph, Shape
from ..coupling import DimKey, DimSpace


@dataclass
class OpRule:
    couple: Callable[["OpContext"], None] | None = None
    update: Callable[[object], None] | None = None


RULES: dict[tuple[str, str], OpRule] = {}


def _key(domain: str, op_type: str) -> tuple[str, str]:
    return ("" if domain == "ai.onnx" else domain, op_type)


def couples(*op_types: str, domain: str = ""):
    """Register the coupling function of ``op_types``."""

    def register(fn):
        for op in op_types:
            RULES.setdefault(_key(domain, op), OpRule()).couple = fn
        return fn

    return register


def updates(*op_types: str, domain: str = ""):
    """Register how ``op_types`` update attributes or shape constants once channels are gone."""

    def register(fn):
        for op in op_types:
            RULES.setdefault(_key(domain, op), OpRule()).update = fn
        return fn

    return register


def rule_for(node: onnx.NodeProto) -> OpRule | None:
    return RULES.get(_key(node.domain, node.op_type))


class RuleRefused(Exception):
    """Raised by a rule that cannot couple this instance of its op; the message is the pin reason."""


# Roles of weights, used by importance (which slices measure a channel) and masking (what value removes one).
ROLE_WEIGHT = "weight"
ROLE_BIAS = "bias"
ROLE_SCALE = "scale"
ROLE_SHIFT = "shift"
ROLE_MEAN = "mean"
ROLE_VAR = "var"
ROLE_DIVISOR = "divisor"
NEUTRAL_FILL = {ROLE_VAR: 1.0, ROLE_DIVISOR: 1.0}


@dataclass
class LinearLayer:
    """A layer that contracts an input axis with a weight: the unit that cost and OBS compensation reason about."""

    node: str
    kind: str  # "conv", "convtranspose", "gemm", "matmul"
    weight: str
    weight_in_axis: int  # axis of the weight contracted with the input's channels
    weight_out_axis: int
    input: str
    input_axis: int
    output: str
    output_axis: int
    bias: str | None = None


class OpContext:
    """What a coupling rule sees of one node, and the calls it makes to couple or pin its axes."""

    def __init__(self, graph: Graph, node: onnx.NodeProto, space: DimSpace, choices: dict, records: dict):
        self.graph = graph
        self.node = node
        self.space = space
        self.op = node.op_type
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.opset = graph.opset
        self._choices = choices
        self._records = records
        self.mentioned: set[DimKey] = set()

    # --- what the rule can look at -------------------------------------------------------------
    def attr(self, name: str, default=None):
        for attr in self.node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def shape(self, name: str) -> Shape | None:
        return self.graph.shape(name) if name else None

    def rank(self, name: str) -> int:
        shape = self.shape(name)
        if shape is None:
            raise RuleRefused(f"the shape of '{name}' is unknown")
        return len(shape)

    def const(self, name: str) -> np.ndarray | None:
        return self.graph.weight(name) if name else None

    def value(self, name: str) -> np.ndarray | None:
        """``const``, or a small computation on constants only (``Graph.computed``): for values a rule reads and
        the rewrite never edits (a rule that slices a constant needs it to be an initializer: ``const``)."""
        return self.graph.computed(name) if name else None

    def input(self, index: int) -> str:
        return self.inputs[index] if index < len(self.inputs) else ""

    def choice(self, label: str, candidates: list) -> int:
        """Which of several valid couplings to use; the analysis moves on to the next candidate (a DimKey) when the
        chosen one ends up entirely pinned, so e.g. a channel shuffle's reshape follows the axis that stays free."""
        key = (self.node.name, label)
        self._records.setdefault("choices", {})[key] = list(candidates)
        return min(self._choices.get(key, 0), len(candidates) - 1)

    # --- what the rule declares -----------------------------------------------------------------
    def key(self, tensor: str, axis: int) -> DimKey:
        shape = self.shape(tensor)
        if shape is None:
            raise RuleRefused(f"the shape of '{tensor}' is unknown")
        axis = axis + len(shape) if axis < 0 else axis
        if not 0 <= axis < len(shape):
            raise RuleRefused(f"axis {axis} is out of range for '{tensor}'")
        key = (tensor, axis)
        self.space.dim(key, shape[axis])
        self.mentioned.add(key)
        return key

    def virtual(self, label: str, size: int) -> DimKey:
        """A dim that belongs to no tensor, e.g. the groups of a grouped conv or the heads of an attention op."""
        key = (f"@{self.node.name}/{label}", 0)
        self.space.dim(key, size)
        self._records.setdefault("virtual_size", {})[key] = size
        return key

    def size(self, key: DimKey) -> int | None:
        info = self.space.dims[key]
        return None if info.dynamic else info.size

    def tie(self, a: str, a_axis: int, b: str, b_axis: int, index_map=None) -> None:
        self.space.tie(self.key(a, a_axis), self.key(b, b_axis), index_map)

    def tie_keys(self, a: DimKey, b: DimKey, index_map=None) -> None:
        self.space.tie(a, b, index_map)

    def tie_same(self, a: str, b: str) -> None:
        """Tie every axis of ``a`` to the same axis of ``b`` (shapes of equal rank)."""
        for axis in range(self.rank(a)):
            self.tie(a, axis, b, axis)

    def tie_broadcast(self, out: str, operands: list[str]) -> None:
        """Numpy broadcasting: an operand's axis couples with the output's unless it is a size-1 axis stretched."""
        out_shape = self.shape(out)
        if out_shape is None:
            raise RuleRefused(f"the shape of '{out}' is unknown")
        for name in operands:
            if not name:
                continue
            shape = self.shape(name)
            if shape is None:
                raise RuleRefused(f"the shape of '{name}' is unknown")
            shift = len(out_shape) - len(shape)
            for axis, size in enumerate(shape):
                out_size = out_shape[axis + shift]
                if size == 1 and out_size != 1:
                    continue
                self.tie(name, axis, out, axis + shift)

    def leave(self, tensor: str) -> None:
        """The op reads only the shape or type of ``tensor``: its axes are neither tied nor pinned here."""
        shape = self.shape(tensor)
        for axis in range(len(shape) if shape is not None else 0):
            self.key(tensor, axis)

    def leave_axis(self, tensor: str, axis: int) -> None:
        """One axis the op neither ties nor constrains (e.g. a size-1 axis a reduction keeps)."""
        self.key(tensor, axis)

    def pin(self, tensor: str, axis: int, reason: str, soft: bool = False, by_choice: bool = False) -> None:
        self.space.pin(self.key(tensor, axis), reason, soft, by_choice=self.node.name if by_choice else "")

    def pin_key(self, key: DimKey, reason: str, soft: bool = False) -> None:
        self.space.pin(key, reason, soft)

    def role(self, tensor: str, role: str) -> None:
        """Declare what a weight input is (importance measures weights and scales; masking fills by role)."""
        if tensor and self.graph.is_weight(tensor):
            self._records.setdefault("roles", {}).setdefault(tensor, role)

    def layer(self, layer: LinearLayer) -> None:
        self._records.setdefault("layers", []).append(layer)

    def soft_pin_label(self) -> str:
        return f"{self.op} '{self.node.name}'"
