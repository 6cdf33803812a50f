"""Random valid graphs from the supported ops, each checked with the mask-equivalence oracle.

Hypothesis draws a chain of blocks (plain, grouped and depthwise convs, ConvTranspose, com.microsoft FusedConv,
convs on QDQ-quantised activations with per-channel int8 weights, batch/instance/group norms, activations, residual
Add/Mul/Sub, Concat and Split branches, Slice, a sigmoid gate, NHWC transposes, a channel shuffle, pooling,
padding) on an image, then a flatten or a token reshape and blocks on features (Gemm, MatMul with float or
quantised weights, LayerNormalization, residuals, Split/Concat, a gate), and a head; sometimes a second output.
On every graph, masking and physically removing the same channels must give the same outputs
(``tests.helpers.check_oracle``), and analysis must not hit a rule error.

CI runs the default profile (150 graphs, derandomised, about 15 s). ``SPC_HYPOTHESIS_PROFILE=many`` runs 2000
random ones (``SPC_HYPOTHESIS_EXAMPLES`` changes the count):
``SPC_HYPOTHESIS_PROFILE=many python3 -m pytest tests/test_property_graphs.py --hypothesis-show-statistics``
tried 2000 graphs and found all 2000 clean: 1746 had prunable groups and passed the oracle, 254 had none (every
channel pinned, e.g. a grouped conv on the network input); 397 s on 2 busy cores (see bench/README.md, "Property
test"). Quantised graphs run with ONNX Runtime's optimisations off: its fused MatMulNBits kernel approximates
differently for different widths.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import spc
from spc.io import from_proto
from tests.helpers import (
    GraphBuilder,
    check_oracle,
    quantized_activation,
    quantized_weight,
)

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("many", max_examples=int(os.environ.get("SPC_HYPOTHESIS_EXAMPLES", "2000")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("SPC_HYPOTHESIS_PROFILE", "ci")

ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSwish", "Elu")


class Chain:
    """The tensor the next block reads, with its static channel count (axis 1 for images, last for features)."""

    def __init__(self, b: GraphBuilder, draw, tensor: str, channels: int, size: int = 8):
        self.b, self.draw, self.x, self.c, self.size = b, draw, tensor, channels, size

    def width(self) -> int:
        return self.draw(st.integers(2, 8))

    def conv(self, cout: int, x: str | None = None, cin: int | None = None, k: int | None = None,
             group: int = 1) -> str:
        b, cin = self.b, cin or self.c
        k = k or self.draw(st.sampled_from([1, 3]))
        inputs = [x or self.x, b.w(cout, cin // group, k, k)]
        if self.draw(st.booleans()):
            inputs.append(b.w(cout))
        return b.op("Conv", inputs, pads=[k // 2] * 4, group=group)


def image_block(chain: Chain) -> None:
    b, draw = chain.b, chain.draw
    kind = draw(st.sampled_from(["conv", "grouped", "depthwise", "bn", "act", "residual", "concat", "split",
                                 "gate", "nhwc", "pool", "pad", "instnorm", "groupnorm", "bias", "deconv",
                                 "slice", "shuffle", "qconv", "fused"]))
    c = chain.c
    if kind == "conv":
        cout = chain.width()
        chain.x, chain.c = chain.conv(cout), cout
    elif kind == "grouped" and c % 2 == 0:
        groups = draw(st.sampled_from([g for g in (2, c // 2, c) if c % g == 0]))
        cout = groups * draw(st.integers(1, 2))
        chain.x, chain.c = chain.conv(cout, group=groups), cout
    elif kind == "depthwise":
        cout = c * draw(st.integers(1, 2))
        chain.x, chain.c = chain.conv(cout, k=3, group=c), cout
    elif kind == "bn":
        chain.x = b.op("BatchNormalization", [chain.x, b.w(c, positive=True), b.w(c), b.w(c), b.w(c, positive=True)])
    elif kind == "act":
        chain.x = b.op(draw(st.sampled_from(ACTIVATIONS)), [chain.x])
    elif kind == "residual":
        branch = b.op("Relu", [chain.conv(c)])
        chain.x = b.op(draw(st.sampled_from(["Add", "Mul", "Sub"])), [chain.x, branch])
    elif kind == "concat":
        widths = [chain.width(), chain.width()]
        parts = [chain.conv(w) for w in widths] + ([chain.x] if draw(st.booleans()) else [])
        chain.x = b.op("Concat", parts, axis=1)
        chain.c = sum(widths) + (c if len(parts) == 3 else 0)
    elif kind == "split" and c >= 2:
        first = draw(st.integers(1, c - 1))
        s1, s2 = b.op("Split", [chain.x, b.ints(first, c - first)], outputs=2, axis=1)
        cout = chain.width()
        chain.x = b.op("Add", [chain.conv(cout, s1, first), chain.conv(cout, s2, c - first)])
        chain.c = cout
    elif kind == "gate":
        chain.x = b.op("Mul", [chain.x, b.op("Sigmoid", [chain.conv(c, k=1)])])
    elif kind == "nhwc":
        t = b.op("Transpose", [chain.x], perm=[0, 2, 3, 1])
        t = b.op("Add", [b.op("Mul", [t, b.w(c)]), b.w(c)])
        chain.x = b.op("Transpose", [t], perm=[0, 3, 1, 2])
    elif kind == "pool" and chain.size >= 4:
        op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
        chain.x = b.op(op, [chain.x], kernel_shape=[2, 2], strides=[2, 2])
        chain.size //= 2
    elif kind == "pad":
        chain.x = b.op("Pad", [chain.x, b.ints(0, 0, 1, 1, 0, 0, 1, 1)])
        chain.size += 2
    elif kind == "instnorm":
        chain.x = b.op("InstanceNormalization", [chain.x, b.w(c, positive=True), b.w(c)])
    elif kind == "groupnorm" and c % 2 == 0:
        groups = draw(st.sampled_from([2, c]))
        chain.x = b.op("GroupNormalization", [chain.x, b.w(c, positive=True), b.w(c)], num_groups=groups)
    elif kind == "bias":
        chain.x = b.op("Add", [chain.x, b.w(1, c, 1, 1)])
    elif kind == "deconv" and chain.size <= 8:
        cout = chain.width()
        chain.x = b.op("ConvTranspose", [chain.x, b.w(c, cout, 2, 2), b.w(cout)], strides=[2, 2])
        chain.c, chain.size = cout, chain.size * 2
    elif kind == "slice" and c >= 3:
        start = draw(st.integers(0, c - 2))
        end = draw(st.integers(start + 1, c))
        chain.x, chain.c = b.op("Slice", [chain.x, b.ints(start), b.ints(end), b.ints(1)]), end - start
    elif kind == "qconv":  # QDQ form: a per-tensor quantised activation, a per-channel quantised weight
        cout = chain.width()
        x = quantized_activation(b, chain.x, scale=0.02) if draw(st.booleans()) else chain.x
        chain.x, chain.c = b.op("Conv", [x, quantized_weight(b, (cout, c, 1, 1), 0, scale_floor=0.002)]), cout
    elif kind == "fused":
        cout = chain.width()
        fused = b.op("FusedConv", [chain.x, b.w(cout, c, 3, 3), b.w(cout)], domain="com.microsoft",
                     activation=draw(st.sampled_from(["Relu", "Sigmoid", "Tanh"])), pads=[1] * 4)
        chain.x, chain.c = fused, cout
    elif kind == "shuffle" and c % 2 == 0:  # ShuffleNet's channel shuffle with two groups
        s = chain.size
        t = b.op("Transpose", [b.op("Reshape", [chain.x, b.ints(0, 2, c // 2, s, s)])], perm=[0, 2, 1, 3, 4])
        chain.x = b.op("Reshape", [t, b.ints(0, c, s, s)])


def feature_block(chain: Chain, rank: int) -> None:
    b, draw, c = chain.b, chain.draw, chain.c
    kind = draw(st.sampled_from(["gemm", "matmul", "act", "layernorm", "residual", "split", "concat", "gate",
                                 "qmatmul"]))
    if kind == "gemm" and rank == 2:
        cout, trans = chain.width(), draw(st.booleans())
        w = b.w(cout, c) if trans else b.w(c, cout)
        chain.x, chain.c = b.op("Gemm", [chain.x, w, b.w(cout)], transB=int(trans)), cout
    elif kind in ("matmul", "gemm"):
        cout = chain.width()
        chain.x, chain.c = b.op("MatMul", [chain.x, b.w(c, cout)]), cout
    elif kind == "act":
        chain.x = b.op(draw(st.sampled_from(ACTIVATIONS)), [chain.x])
    elif kind == "qmatmul":
        cout = chain.width()
        chain.x, chain.c = b.op("MatMul", [chain.x, quantized_weight(b, (c, cout), 1, scale_floor=0.002)]), cout
    elif kind == "layernorm":
        chain.x = b.op("LayerNormalization", [chain.x, b.w(c, positive=True), b.w(c)], axis=-1)
    elif kind == "residual":
        hidden = chain.width()
        inner = b.op("Relu", [b.op("MatMul", [chain.x, b.w(c, hidden)])])
        chain.x = b.op("Add", [chain.x, b.op("MatMul", [inner, b.w(hidden, c)])])
    elif kind == "split" and c >= 2:
        first = draw(st.integers(1, c - 1))
        s1, s2 = b.op("Split", [chain.x, b.ints(first, c - first)], outputs=2, axis=-1)
        cout = chain.width()
        chain.x = b.op("Add", [b.op("MatMul", [s1, b.w(first, cout)]), b.op("MatMul", [s2, b.w(c - first, cout)])])
        chain.c = cout
    elif kind == "concat":
        widths = [chain.width(), chain.width()]
        chain.x = b.op("Concat", [b.op("MatMul", [chain.x, b.w(c, w)]) for w in widths], axis=-1)
        chain.c = sum(widths)
    elif kind == "gate":
        chain.x = b.op("Mul", [chain.x, b.op("Sigmoid", [b.op("MatMul", [chain.x, b.w(c, c)])])])


@st.composite
def graphs(draw):
    b = GraphBuilder(opset=21, seed=draw(st.integers(0, 2**16)))
    static_batch = draw(st.booleans())
    chain = Chain(b, draw, b.input("x", [2 if static_batch else "N", 3, 8, 8]), 3)
    width = chain.width()
    chain.x, chain.c = chain.conv(width), width  # a layer whose output channels nothing outside pins
    for _ in range(draw(st.integers(0, 5))):
        image_block(chain)
    extra = [b.op("GlobalAveragePool", [chain.x])] if draw(st.booleans()) else []
    transition = draw(st.sampled_from(["flatten", "gap", "tokens"]))
    if transition == "tokens":  # [N, C, H, W] -> [N, H*W, C]
        flat = b.op("Reshape", [chain.x, b.ints(0, chain.c, -1)])
        chain.x, rank = b.op("Transpose", [flat], perm=[0, 2, 1]), 3
    else:
        if transition == "gap":
            chain.x, chain.size = b.op("GlobalAveragePool", [chain.x]), 1
        chain.x, rank = b.op("Flatten", [chain.x], axis=1), 2
        chain.c *= chain.size * chain.size
    for _ in range(draw(st.integers(0, 3))):
        feature_block(chain, rank)
    y = b.op("MatMul", [chain.x, b.w(chain.c, 3)])
    return b.model(y, *extra)


@settings(settings.get_profile(PROFILE))
@given(graphs())
def test_random_graphs_pass_the_oracle(model):
    analysis = spc.analyze(from_proto(model))
    assert not analysis.records.get("rule_errors"), analysis.records.get("rule_errors")
    if not [group for group in analysis.prunable_groups if group.size > 1]:
        event("no prunable group")  # e.g. a grouped conv straight on the network input pins every channel
        assert all(group.pin_reason for group in analysis.groups if group.size > 1)
        return
    event("prunable")
    quantized = any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    check_oracle(model, trials=1, optimize=not quantized)  # ORT fuses DQ+MatMul into approximate MatMulNBits
