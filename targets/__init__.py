"""TVM code generation per target, installed as ``spc.targets``."""
