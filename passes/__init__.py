"""Importance and pruning passes, installed as ``spc.passes``.

``CRITERIA`` maps a criterion name (the CLI's ``--criterion``) to a factory of its pass.
"""

from .activation import ActivationImportance, WandaImportance
from .base import ImportancePass, PassContext  # noqa: F401
from .magnitude import MagnitudeImportance
from .obs import ObsImportance
from .obspa import ObspaImportance
from .random_ import RandomImportance

CRITERIA = {
    "l1": lambda: MagnitudeImportance(1),
    "l2": lambda: MagnitudeImportance(2),
    "random": RandomImportance,
    "obspa": ObspaImportance,
    "obs": ObsImportance,
    "activation": ActivationImportance,
    "wanda": WandaImportance,
}


def importance_pass(name: str) -> ImportancePass:
    from spc.errors import SpcError

    if name not in CRITERIA:
        raise SpcError(f"--criterion: unknown criterion '{name}' (choose from {', '.join(sorted(CRITERIA))})")
    return CRITERIA[name]()
