"""Channel-coupling rules, one module per op family; importing this package registers them all."""

from . import attention, conv, elementwise, linear, norm, recurrent, reduce, shapes, slicing  # noqa: F401
from . import control_flow, msft, quant  # noqa: F401
from .base import RULES, LinearLayer, OpContext, OpRule, RuleRefused, couples, rule_for, updates  # noqa: F401
