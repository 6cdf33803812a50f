"""From a model to its prunable groups.

Every node's rule couples the axes it touches (see ``rules``); network inputs and outputs and whatever a rule leaves
unmentioned are pinned. The connected components of the coupling are *atoms*, the smallest removable units (one
channel, one head, one conv group, one hidden unit). Atoms that touch exactly the same dims form a *group*: the
channels of one layer together with everything coupled to them (a residual stream, a concat branch, an attention
layer's heads). Only groups that hold some weight are worth pruning; a group with a pinned atom says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx

from ..graph import Graph
from ..io import node_inputs
from .coupling import DimKey, DimSpace
from .grouping import same_dim_classes, unique_ints
from .rules import LinearLayer, OpContext, RuleRefused, rule_for

MAX_CHOICE_ROUNDS = 32


@dataclass
class Group:
    """A set of atoms coupled to the same dims; pruning removes some of its atoms."""

    id: int
    atoms: np.ndarray
    dims: list[DimKey]
    pin_reason: str | None = None
    inexact_reason: str | None = None
    name: str = ""
    nodes: list[str] = field(default_factory=list)
    width: int = 1  # channels per atom along its main weight axis (e.g. head dim for attention heads)

    @property
    def prunable(self) -> bool:
        return self.pin_reason is None

    @property
    def size(self) -> int:
        return int(self.atoms.size)


class Analysis:
    """The result of coupling: atoms, groups and what rules recorded (weight roles, linear layers, virtual dims)."""

    def __init__(self, graph: Graph, space: DimSpace, labels: np.ndarray, atom_count: int, records: dict,
                 allow_inexact: bool):
        self.graph = graph
        self.space = space
        self.labels = labels
        self.atom_count = atom_count
        self.records = records
        self.allow_inexact = allow_inexact
        self.roles: dict[str, str] = records.get("roles", {})
        self.layers: list[LinearLayer] = records.get("layers", [])
        self.pinned, self.pin_reasons, self.inexact = self._pins()
        self.groups = self._groups()

    @property
    def model(self) -> onnx.ModelProto:
        return self.graph.model

    @property
    def prunable_groups(self) -> list[Group]:
        return [group for group in self.groups if group.prunable]

    def dim_labels(self, key: DimKey) -> np.ndarray:
        """Atom label of each index of ``key``."""
        return self.labels[self.space.elements(key)]

    def _pins(self):
        pinned = np.zeros(self.atom_count, dtype=bool)
        reason = np.full(self.atom_count, -1, dtype=np.int64)
        inexact = np.full(self.atom_count, -1, dtype=np.int64)
        for index, pin in enumerate(self.space.pins):
            atoms = self.labels[pin.elements]  # repeats are harmless in these assignments
            if pin.soft and self.allow_inexact:
                inexact[atoms[inexact[atoms] < 0]] = index
                continue
            pinned[atoms] = True
            reason[atoms[reason[atoms] < 0]] = index
        return pinned, reason, inexact

    @cached_property
    def weight_dims(self) -> list[DimKey]:
        return [key for key in self.space.dims if self.graph.is_weight(key[0])]

    def _groups(self) -> list[Group]:
        keys = list(self.space.dims)
        has_weight = np.zeros(self.atom_count, dtype=bool)
        for key in self.weight_dims:
            has_weight[self.dim_labels(key)] = True
        if not keys:
            return []
        # element ids are allocated dim after dim, in the order the dims were created
        element_dim = np.repeat(np.arange(len(keys)), [self.space.dims[k].size for k in keys])
        relevant = has_weight[self.labels]
        pairs = unique_ints(self.labels[relevant] * len(keys) + element_dim[relevant])
        classes = same_dim_classes(pairs // len(keys), pairs % len(keys), len(keys), [self.pin_reasons, self.inexact])
        atom_class = np.full(self.atom_count, -1, dtype=np.int64)
        groups = []
        for index, (atoms, dims) in enumerate(classes):
            atom_class[atoms] = index
            reason, inexact = int(self.pin_reasons[atoms[0]]), int(self.inexact[atoms[0]])
            group = Group(
                id=index,
                atoms=atoms,
                dims=[keys[d] for d in dims.tolist()],
                pin_reason=self.space.pins[reason].reason if reason >= 0 else None,
                inexact_reason=self.space.pins[inexact].reason if inexact >= 0 else None,
            )
            if group.pin_reason is None and all(self.graph.is_weight(key[0]) for key in group.dims):
                group.pin_reason = "an axis of constants that no activation follows"
            groups.append(group)
        for group in groups:
            self._describe(group, atom_class)
        groups.sort(key=lambda g: (g.pin_reason is not None, self._first_node_index(g)))
        for index, group in enumerate(groups):
            group.id = index
        return groups

    @cached_property
    def _node_index(self) -> dict[str, int]:
        return {node.name: index for index, node in enumerate(self.graph.nodes)}

    def _first_node_index(self, group: Group) -> int:
        return min((self._node_index.get(name, 1 << 30) for name in group.nodes), default=1 << 30)

    @cached_property
    def _layer_of_output(self) -> dict[DimKey, int]:
        """Index of the first linear layer producing along each (weight, output axis)."""
        first: dict[DimKey, int] = {}
        for index, layer in enumerate(self.layers):
            first.setdefault((layer.weight, layer.weight_out_axis), index)
        return first

    def _describe(self, group: Group, atom_class: np.ndarray) -> None:
        """Name, nodes and width of ``group`` (whose atoms ``atom_class`` maps to ``group.id``)."""
        found = [self._layer_of_output[key] for key in group.dims if key in self._layer_of_output]
        producers = [self.layers[min(found)]] if found else []
        nodes: list[str] = []
        for key in group.dims:
            if self.graph.is_weight(key[0]):
                nodes.extend(node.name for node in self.graph.consumers.get(key[0], []))
        group.nodes = list(dict.fromkeys(nodes))
        weight_keys = [key for key in group.dims if self.graph.is_weight(key[0])]
        main = (producers[0].weight, producers[0].weight_out_axis) if producers else weight_keys[0]
        labels = self.dim_labels(main)
        group.width = max(1, int((atom_class[labels] == group.id).sum()) // max(group.size, 1))
        if producers:
            head = producers[0]
            node = self.graph.node_by_name[head.node]
            group.name = f"{node.op_type} '{head.node}' output"
        else:
            group.name = f"'{main[0]}' axis {main[1]}"
        extra = len(group.nodes) - 1
        if extra > 0:
            group.name += f" (+{extra} coupled)"


def couple(graph: Graph, choices: dict) -> tuple[DimSpace, dict]:
    """Run every node's rule once; return the dims with their ties and pins, and what the rules recorded."""
    space = DimSpace()
    records: dict = {}
    for name in graph.inputs:
        _pin_tensor(space, graph, name, f"network input '{name}'")
    for node in graph.nodes:
        ctx = OpContext(graph, node, space, choices, records)
        rule = rule_for(node)
        reason = None
        if rule is None or rule.couple is None:
            domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
            reason = f"{domain}{node.op_type} '{node.name}' is not understood by spc"
        else:
            try:
                rule.couple(ctx)
            except RuleRefused as refusal:
                reason = f"{node.op_type} '{node.name}': {refusal}"
            except Exception as error:  # a rule bug must not crash the run: pin, and keep the error for tests
                reason = f"spc's rule for {node.op_type} '{node.name}' failed ({type(error).__name__}: {error})"
                records.setdefault("rule_errors", []).append(reason)
        tensors = node_inputs(node) + [n for n in node.output if n]
        for tensor in dict.fromkeys(tensors):
            shape = graph.shape(tensor)
            for axis in range(len(shape) if shape is not None else 0):
                key = (tensor, axis)
                if reason is not None:
                    space.dim(key, shape[axis])
                    space.pin(key, reason)
                elif key not in ctx.mentioned:
                    space.dim(key, shape[axis])
                    space.pin(key, f"{node.op_type} '{node.name}' has no channel rule for axis {axis} of '{tensor}'")
    for name in graph.outputs:
        _pin_tensor(space, graph, name, f"network output '{name}'")
    return space, records


def _pin_tensor(space: DimSpace, graph: Graph, name: str, reason: str) -> None:
    shape = graph.shape(name)
    for axis in range(len(shape) if shape is not None else 0):
        space.dim((name, axis), shape[axis])
        space.pin((name, axis), reason)


def analyze(model: onnx.ModelProto | Graph, allow_inexact: bool = False) -> Analysis:
    """Couple every op and group the atoms. ``allow_inexact`` lifts soft pins (normalisation statistics)."""
    graph = model if isinstance(model, Graph) else Graph(model)
    choices: dict = {}
    for _ in range(MAX_CHOICE_ROUNDS):
        space, records = couple(graph, choices)
        count, labels = space.components()
        analysis = Analysis(graph, space, labels, count, records, allow_inexact)
        if not _revise_choices(analysis, records.get("choices", {}), choices):
            break
    return analysis


def _revise_choices(analysis: Analysis, candidates: dict, choices: dict) -> bool:
    """Move each choice whose chosen dim ended up entirely pinned to its next candidate. A choice pinned only by
    the choices of nodes revised in this same round waits: two choices that pin each other's axis (a channel
    shuffle) would otherwise swap forever."""
    counted = [pin for pin in analysis.space.pins if not (pin.soft and analysis.allow_inexact)]
    by_other = np.zeros(analysis.atom_count, dtype=bool)
    by_owner: dict[str, np.ndarray] = {}
    for pin in counted:
        atoms = analysis.labels[pin.elements]
        if pin.by_choice:
            by_owner[pin.by_choice] = np.concatenate([by_owner.get(pin.by_choice, np.zeros(0, np.int64)), atoms])
        else:
            by_other[atoms] = True
    revised: set[str] = set()
    for key, options in candidates.items():
        current = choices.get(key, 0)
        atoms = analysis.dim_labels(options[min(current, len(options) - 1)])
        if current + 1 >= len(options) or not analysis.pinned[atoms].all():
            continue
        if not by_other[atoms].any():
            owners = {owner for owner, pinned in by_owner.items() if np.isin(atoms, pinned).any()}
            if owners <= revised:
                continue
        choices[key] = current + 1
        revised.add(key[0])
    return bool(revised)
