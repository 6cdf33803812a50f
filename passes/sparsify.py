"""Block sparsification of constant weights (magnitude of block norms, per layer).

``sparsify(model, sparsity, block=(4, 1))`` zeroes, in every constant MatMul/Gemm/Conv weight large enough to
matter, the fraction ``sparsity`` of its blocks with the smallest L2 norm, and returns the new model with a
per-layer report. Blocks are taken on the weight viewed as ``[outputs, inputs]`` (MatMul W[K, N] -> W^T, Gemm B
according to transB, Conv W[Co, Ci/g, kh, kw] -> [Co, Ci/g*kh*kw]): a (4, 1) block is 4 consecutive output
channels x 1 input, the layout spc's block-sparse (BSR) kernels consume. Edge blocks of dimensions that are not a
multiple of the block are ranked by their RMS so that they compete fairly with full blocks.

``sparsity`` may also be a map {weight name: fraction}: only those weights are sparsified, each at its own fraction
(the per-layer choice of ``--speedup``); the others are reported as skipped.

The input model is not modified. Weights shared by several layers are sparsified once (the first layer wins).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
from onnx import numpy_helper

from spc.graph import node_attr

DEFAULT_MIN_SIZE = 4096  # weights with fewer elements stay dense: their kernels are too small to profit


@dataclass
class LayerSparsity:
    node: str
    op: str
    weight: str
    shape: list[int]  # the weight as [outputs, inputs]
    block: list[int]
    blocks: int  # number of blocks (edge blocks included)
    zero_blocks: int  # blocks that are all zero after sparsification
    sparsity: float  # zero_blocks / blocks
    skipped: str = ""  # why the layer was left alone ("" if sparsified)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SparsifyReport:
    target_sparsity: float | dict[str, float]
    block: list[int]
    layers: list[LayerSparsity]

    @property
    def sparsified(self) -> list[LayerSparsity]:
        return [layer for layer in self.layers if not layer.skipped]

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zero weights (elements) over the sparsified layers."""
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.sparsified)
        if not total:
            return 0.0
        zero = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.sparsified)
        return zero / total

    def to_json(self) -> dict:
        return {
            "target_sparsity": self.target_sparsity,
            "block": self.block,
            "overall_sparsity": round(self.overall_sparsity, 4),
            "layers": [layer.to_json() for layer in self.layers],
        }


def _out_in_view(node, w: np.ndarray):
    """(view [out, in], inverse function back to the stored layout) or None when the layer is not supported."""
    if node.op_type == "MatMul":
        if w.ndim != 2:
            return None
        return w.T, lambda v: np.ascontiguousarray(v.T)
    if node.op_type == "Gemm":
        if w.ndim != 2:
            return None
        if node_attr(node, "transB", 0):
            return w, lambda v: v
        return w.T, lambda v: np.ascontiguousarray(v.T)
    if node.op_type == "Conv":
        if w.ndim < 3:
            return None
        shape = w.shape
        return w.reshape(shape[0], -1), lambda v: v.reshape(shape)
    return None


def block_mask(w_out_in: np.ndarray, sparsity: float, block: tuple[int, int]) -> np.ndarray:
    """Boolean [out, in] mask keeping the blocks with the largest RMS; exactly round(sparsity * blocks) are zeroed."""
    out, inp = w_out_in.shape
    br, bc = block
    nbr, nbc = -(-out // br), -(-inp // bc)
    padded = np.zeros((nbr * br, nbc * bc), dtype=np.float64)
    padded[:out, :inp] = w_out_in
    counts = np.zeros_like(padded)
    counts[:out, :inp] = 1.0
    sq = (padded**2).reshape(nbr, br, nbc, bc).sum(axis=(1, 3))
    cnt = counts.reshape(nbr, br, nbc, bc).sum(axis=(1, 3))
    rms = np.sqrt(sq / np.maximum(cnt, 1.0))
    n_zero = int(round(sparsity * rms.size))
    keep = np.ones(rms.size, dtype=bool)
    if n_zero > 0:
        order = np.argsort(rms.reshape(-1), kind="stable")
        keep[order[:n_zero]] = False
    keep = keep.reshape(nbr, nbc)
    mask = np.repeat(np.repeat(keep, br, axis=0), bc, axis=1)[:out, :inp]
    return mask


def zeroed_magnitude(w_out_in: np.ndarray, sparsity: float, block: tuple[int, int]) -> float:
    """Share of the weight's L1 magnitude in the blocks ``block_mask`` zeroes at ``sparsity`` (what they are worth)."""
    total = float(np.abs(w_out_in).sum())
    if total <= 0 or sparsity <= 0:
        return 0.0
    mask = block_mask(w_out_in, sparsity, block)
    return float(np.abs(w_out_in[~mask]).sum()) / total


def _check_fractions(sparsity) -> dict[str, float] | None:
    """The per-weight map (validated), or None for one global fraction (validated)."""
    if isinstance(sparsity, dict):
        for name, value in sparsity.items():
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"sparsity of weight {name!r} must be in [0, 1), got {value}")
        return {str(k): float(v) for k, v in sparsity.items()}
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return None


def sparsify(
    model,
    sparsity: float | dict[str, float],
    block: tuple[int, int] = (4, 1),
    min_size: int = DEFAULT_MIN_SIZE,
    skip: dict[str, str] | None = None,
):
    """Return (sparsified copy of ``model``, SparsifyReport).

    ``skip`` maps weight (initializer) names to a reason to leave them dense, e.g. a target's cost model saying
    that the block-sparse kernel would not be faster for that layer. A map ``sparsity`` gives each weight its own
    fraction; weights it does not name stay dense."""
    per_weight = _check_fractions(sparsity)
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be two positive ints, got {block}")
    model = copy.deepcopy(model)
    inits = {init.name: init for init in model.graph.initializer}
    layers: list[LayerSparsity] = []
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        name = node.input[1]
        init = inits.get(name)
        if init is None:
            continue
        w = numpy_helper.to_array(init)
        view = _out_in_view(node, w)
        shape = list(view[0].shape) if view is not None else list(w.shape)
        rec = LayerSparsity(node.name, node.op_type, name, shape, list(block), 0, 0, 0.0)
        if view is None:
            rec.skipped = "unsupported weight rank"
        elif w.dtype not in (np.float32, np.float64, np.float16):
            rec.skipped = f"dtype {w.dtype}"
        elif node.op_type == "Conv" and node_attr(node, "group", 1) != 1:
            rec.skipped = "grouped convolution"
        elif w.size < min_size:
            rec.skipped = f"smaller than min_size={min_size}"
        elif name in done:
            rec.skipped = "weight shared with an earlier layer (sparsified there)"
        elif skip and name in skip:
            rec.skipped = skip[name] or "skipped by the caller"
        elif per_weight is not None and not per_weight.get(name):
            rec.skipped = "dense in the per-layer sparsity map"
        fraction = per_weight.get(name, 0.0) if per_weight is not None else float(sparsity)
        w_out_in = view[0] if view is not None else None
        if w_out_in is not None:
            br, bc = block
            rec.blocks = (-(-shape[0] // br)) * (-(-shape[1] // bc))
        if not rec.skipped and fraction > 0:
            mask = block_mask(w_out_in, fraction, block)
            new_view = np.where(mask, w_out_in, 0).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(view[1](new_view), name))
            w_out_in = new_view
            done.add(name)
        if w_out_in is not None and w_out_in.ndim == 2:
            rec.zero_blocks = _zero_blocks(w_out_in, block)
            rec.sparsity = round(rec.zero_blocks / rec.blocks, 4) if rec.blocks else 0.0
        layers.append(rec)
    return model, SparsifyReport(per_weight if per_weight is not None else float(sparsity), list(block), layers)


def _zero_blocks(w_out_in: np.ndarray, block: tuple[int, int]) -> int:
    out, inp = w_out_in.shape
    br, bc = block
    nbr, nbc = -(-out // br), -(-inp // bc)
    padded = np.zeros((nbr * br, nbc * bc), dtype=bool)
    padded[:out, :inp] = w_out_in != 0
    return int((~padded.reshape(nbr, br, nbc, bc).any(axis=(1, 3))).sum())
