"""Dependency analysis: which channels of an ONNX model are coupled, and which can be pruned."""

from .analyze import Analysis, Group, analyze  # noqa: F401
from .coupling import DimKey, DimSpace  # noqa: F401
