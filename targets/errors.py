"""The user-facing error type (``spc.errors.SpcError``: the CLI prints its one-line message and exits with 2)."""

try:
    from spc.errors import SpcError
except ImportError:  # pragma: no cover - targets/ imported without the spc package

    class SpcError(Exception):  # type: ignore[no-redef]
        exit_code = 2

        def __init__(self, message: str):
            super().__init__(" ".join(str(message).split()))


__all__ = ["SpcError"]
