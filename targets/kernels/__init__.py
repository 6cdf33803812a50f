"""Hand-written CPU kernels, generated as TVMScript text and parsed into TIR PrimFuncs.

TVM 0.27's default CPU pipeline leaves matmuls and convolutions as scalar loops and its sparse operators are gone,
so spc writes the compute-heavy kernels itself. Every kernel is an explicit register-blocked loop nest: a tile of
accumulators (one small buffer per row, under TVM's 1024-byte stack-alloca limit, so LLVM keeps them in vector
registers) is updated by ``broadcast(row operand) * vector load(column operand)`` fused multiply-adds over the
reduction axis, then written once with the epilogue (bias, ReLU) fused in. Tails are handled inside each kernel
(clamped/predicated tiles), so no shape restriction reaches the user. All kernels are float32.

One kernel family per module:

* ``dense.py``         ``dense_matmul``: X @ W with a constant, packed W.
* ``bsr.py``           ``bsr_matmul`` and the block-sparse (BSR) weight format.
* ``conv.py``          ``conv2d`` through im2col; ``conv_planes.py`` its shifted-view form (pixel vectors);
                       ``conv_channels.py`` the same planes with output-channel vectors; ``conv_winograd.py``
                       3x3 layers at stride 1 and 2 by Winograd's F(4x4, 3x3) and F(2x2, 3x3);
                       ``conv_layout.py`` their shared
                       geometry, tiles and signature.
* ``batch_matmul.py``  ``batch_matmul`` of two activations (attention).
* ``rows.py``          ``layer_norm`` and ``softmax`` over the last axis.
* ``depthwise.py``     ``depthwise_conv2d`` (NCHW, one input channel per output channel).
* ``expand_depthwise.py`` ``expand_depthwise``: a 1x1 conv and the depthwise conv after it, in one kernel.
* ``pool.py``          ``max_pool2d`` (NCHW).
* ``source.py``        what all of them are built from (target parameters, source builder, tile accumulation).
"""

from .batch_matmul import batch_matmul
from .bsr import BSR, bsr_matmul, scaled_indices, to_bsr
from .conv import bsr_extra_copy, conv2d, conv2d_takes_flat_input, conv_buffer_bytes
from .conv_layout import ConvGeom, bsr_conv_tile, pack_conv_weight
from .conv_planes import plane_offsets
from .conv_winograd import winograd_speedup
from .dense import dense_matmul, pack_dense_weight
from .depthwise import depthwise_conv2d
from .expand_depthwise import expand_depthwise
from .expand_depthwise import group_size as expand_group_size
from .pool import max_pool2d
from .rows import layer_norm, softmax
from .source import ACTIVATIONS, CpuKernelParams, Kernel

__all__ = [
    "ACTIVATIONS", "BSR", "ConvGeom", "CpuKernelParams", "Kernel", "batch_matmul", "bsr_conv_tile", "bsr_extra_copy",
    "bsr_matmul",
    "conv2d", "conv2d_takes_flat_input", "conv_buffer_bytes", "dense_matmul", "depthwise_conv2d", "expand_depthwise",
    "expand_group_size", "layer_norm", "max_pool2d",
    "pack_conv_weight", "pack_dense_weight", "plane_offsets", "scaled_indices", "softmax", "to_bsr", "winograd_speedup",
]
