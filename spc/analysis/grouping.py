"""Sorting atoms into classes that touch exactly the same dims, fast enough for a BERT's 70k atoms.

Each atom's sorted list of dims is summarised by two random 64-bit sums (and its length); atoms with equal
summaries are classed together, then the classes are checked exactly (every member's dims equal its first member's),
falling back to comparing the lists as tuples should two different lists ever share a summary. numpy's own
``np.unique`` is hash-based since numpy 2 and far slower than a sort on large integer arrays, hence ``unique_ints``.
"""

from __future__ import annotations

import numpy as np


def unique_ints(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (``np.unique`` by sorting)."""
    ordered = np.sort(values)
    if ordered.size < 2:
        return ordered
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]]


def same_dim_classes(atom_of_pair: np.ndarray, dim_of_pair: np.ndarray, dim_count: int,
                     extras: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(atoms, dims) of each class of atoms with equal dim lists and equal ``extras`` (per-atom values), in the
    order of their smallest atom. Pairs are sorted by atom, then dim, without repeats."""
    if atom_of_pair.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, atom_of_pair[1:] != atom_of_pair[:-1]])
    atoms = atom_of_pair[starts]
    counts = np.diff(np.r_[starts, atom_of_pair.size])
    rng = np.random.default_rng(0x5BC)
    salts = rng.integers(0, np.iinfo(np.uint64).max, size=(2, dim_count), dtype=np.uint64, endpoint=True)
    columns = [np.add.reduceat(salt[dim_of_pair], starts).view(np.int64) for salt in salts]
    columns += [counts] + [np.asarray(extra)[atoms] for extra in extras]
    order = np.lexsort(columns[::-1])
    rows = np.stack(columns, axis=1)[order]
    new_class = np.r_[True, (rows[1:] != rows[:-1]).any(axis=1)]
    klass = np.empty(atoms.size, dtype=np.int64)
    klass[order] = np.cumsum(new_class) - 1
    first = np.full(int(klass.max()) + 1, atoms.size, dtype=np.int64)
    np.minimum.at(first, klass, np.arange(atoms.size))
    if not _exact(klass, first, starts, counts, dim_of_pair):
        return _by_tuple(atoms, starts, counts, dim_of_pair, extras)
    classes = []
    members = np.argsort(klass, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(klass))]
    for index in np.argsort(first, kind="stable"):
        rep = first[index]
        dims = dim_of_pair[starts[rep]: starts[rep] + counts[rep]]
        classes.append((atoms[members[bounds[index]: bounds[index + 1]]], dims))
    return classes


def _exact(klass, first, starts, counts, dim_of_pair) -> bool:
    """Whether every atom's dims equal those of its class's first atom (counts are equal by construction)."""
    owner = np.repeat(np.arange(starts.size), counts)
    position = np.arange(dim_of_pair.size) - starts[owner]
    return bool(np.array_equal(dim_of_pair, dim_of_pair[starts[first[klass[owner]]] + position]))


def _by_tuple(atoms, starts, counts, dim_of_pair, extras):
    by_signature: dict[tuple, list[int]] = {}
    for index, atom in enumerate(atoms):
        dims = tuple(dim_of_pair[starts[index]: starts[index] + counts[index]].tolist())
        signature = (dims,) + tuple(int(np.asarray(extra)[atom]) for extra in extras)
        by_signature.setdefault(signature, []).append(int(atom))
    return [(np.array(members, dtype=np.int64), np.array(signature[0], dtype=np.int64))
            for signature, members in by_signature.items()]
