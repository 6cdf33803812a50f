"""Elementwise ops: every axis passes through, with numpy broadcasting for the n-ary ones.

Trivial ops are one line in a table. A weight operand of an n-ary op is a per-channel constant (a bias for Add,
a scale for Mul, a divisor for Div) and is sliced with the channel it broadcasts against.
"""

from __future__ import annotations

from .base import ROLE_BIAS, ROLE_DIVISOR, ROLE_SCALE, couples

UNARY = (
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Mish", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Sin", "Cos", "Tan", "Asin", "Acos",
    "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf",
    "Identity", "Cast", "ThresholdedRelu", "Shrink", "Relu6", "Swish",
)

# op -> role of a weight operand at each input position (None: no particular role)
NARY_ROLES = {
    "Add": (ROLE_BIAS, ROLE_BIAS),
    "Sub": (ROLE_BIAS, ROLE_BIAS),
    "Mul": (ROLE_SCALE, ROLE_SCALE),
    "Div": (None, ROLE_DIVISOR),
    "Pow": (None, None),
    "Max": (None,), "Min": (None,), "Sum": (ROLE_BIAS,), "Mean": (None,),
    "Where": (None, None, None),
    "And": (None,), "Or": (None,), "Xor": (None,), "Equal": (None,), "Less": (None,), "Greater": (None,),
    "LessOrEqual": (None,), "GreaterOrEqual": (None,), "Mod": (None, ROLE_DIVISOR),
    "PRelu": (None, ROLE_SCALE),
    "BitwiseAnd": (None,), "BitwiseOr": (None,), "BitwiseXor": (None,),
}


@couples(*UNARY)
def unary(ctx):
    ctx.tie_same(ctx.inputs[0], ctx.outputs[0])


@couples("Dropout")
def dropout(ctx):
    for out in ctx.outputs:
        if out:
            ctx.tie_same(ctx.inputs[0], out)


@couples("Clip")
def clip(ctx):
    ctx.tie_same(ctx.inputs[0], ctx.outputs[0])
    for name in ctx.inputs[1:]:
        if name and ctx.rank(name) > 0:
            ctx.tie_broadcast(ctx.outputs[0], [name])


@couples("CastLike")
def cast_like(ctx):
    ctx.tie_same(ctx.inputs[0], ctx.outputs[0])
    ctx.leave(ctx.inputs[1])  # only its element type is read


@couples(*NARY_ROLES)
def nary(ctx):
    roles = NARY_ROLES[ctx.op]
    ctx.tie_broadcast(ctx.outputs[0], ctx.inputs)
    for index, name in enumerate(ctx.inputs):
        role = roles[min(index, len(roles) - 1)]
        if role:
            ctx.role(name, role)
