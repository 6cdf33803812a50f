"""Channel coupling at the level of single indices.

Every tensor axis an op rule talks about becomes a *dim*: a run of element ids, one per index along the axis. Rules
*tie* elements that must be removed together (identity, offset, block and strided maps all reduce to "index i of A
goes with index m[i] of B") and *pin* elements that must never be removed. The connected components of the tie
graph are the *atoms* of pruning: the smallest sets of (tensor, axis, index) slices that can be removed while the
model stays consistent. Components are computed with scipy's sparse graph routines so that a BERT-sized model with
millions of elements still takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DimKey = tuple[str, int]


@dataclass
class DimInfo:
    offset: int
    size: int
    dynamic: bool


@dataclass
class Pin:
    elements: np.ndarray
    reason: str
    soft: bool  # soft pins guard exactness (e.g. LayerNorm statistics) and can be lifted on request
    by_choice: str = ""  # the node whose choice among couplings set this pin; the analysis may revisit it


@dataclass
class DimSpace:
    """Element ids for dims, the ties between them and the pins on them."""

    dims: dict[DimKey, DimInfo] = field(default_factory=dict)
    _ties_a: list[np.ndarray] = field(default_factory=list)
    _ties_b: list[np.ndarray] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)
    total: int = 0

    def dim(self, key: DimKey, size: int | str) -> DimInfo:
        """The dim for ``key``, created on first use; a dynamic axis is a single pinned element."""
        info = self.dims.get(key)
        if info is not None:
            return info
        dynamic = not isinstance(size, int)
        count = 1 if dynamic else int(size)
        info = DimInfo(self.total, count, dynamic)
        self.dims[key] = info
        self.total += count
        if dynamic:
            self.pins.append(Pin(np.array([info.offset]), f"axis {key[1]} of '{key[0]}' has a dynamic size", False))
        return info

    def elements(self, key: DimKey, indices: np.ndarray | None = None) -> np.ndarray:
        info = self.dims[key]
        if indices is None:
            return np.arange(info.offset, info.offset + info.size)
        return info.offset + np.asarray(indices, dtype=np.int64)

    def tie(self, a: DimKey, b: DimKey, index_map: np.ndarray | None = None, reason: str = "") -> None:
        """Tie index i of ``a`` to index ``index_map[i]`` of ``b`` (identity when no map is given)."""
        da, db = self.dims[a], self.dims[b]
        if da.dynamic or db.dynamic:
            if da.dynamic and db.dynamic:
                self._add(np.array([da.offset]), np.array([db.offset]))
            else:
                why = reason or "a dynamic axis meets a static one"
                self.pin(a, why)
                self.pin(b, why)
            return
        if index_map is None:
            if da.size != db.size:
                why = f"axis sizes differ ({da.size} vs {db.size})"
                self.pin(a, why)
                self.pin(b, why)
                return
            index_map = np.arange(da.size)
        index_map = np.asarray(index_map, dtype=np.int64)
        if index_map.shape != (da.size,) or (index_map.size and (index_map.min() < 0 or index_map.max() >= db.size)):
            raise ValueError(f"bad index map from {a} (size {da.size}) to {b} (size {db.size})")
        self._add(da.offset + np.arange(da.size), db.offset + index_map)

    def tie_elements(self, a: DimKey, a_indices: np.ndarray, b: DimKey, b_indices: np.ndarray) -> None:
        """Tie chosen indices of ``a`` pairwise to chosen indices of ``b`` (e.g. a Slice's kept range)."""
        self._add(self.elements(a, a_indices), self.elements(b, b_indices))

    def pin(self, key: DimKey, reason: str, soft: bool = False, indices: np.ndarray | None = None,
            by_choice: str = "") -> None:
        self.pins.append(Pin(self.elements(key, indices), reason, soft, by_choice))

    def _add(self, a: np.ndarray, b: np.ndarray) -> None:
        self._ties_a.append(a)
        self._ties_b.append(b)

    def components(self) -> tuple[int, np.ndarray]:
        """(number of atoms, atom label of every element)."""
        if self.total == 0:
            return 0, np.zeros(0, dtype=np.int64)
        if self._ties_a:
            rows = np.concatenate(self._ties_a)
            cols = np.concatenate(self._ties_b)
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        matrix = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(self.total, self.total))
        count, labels = connected_components(matrix, directed=False)
        return int(count), labels.astype(np.int64)
