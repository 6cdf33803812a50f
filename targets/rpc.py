"""Sessions on a remote device through TVM's RPC, so that latencies are measured where the model will run.

``--rpc HOST:PORT`` alone connects to an RPC server (``python -m tvm.exec.rpc_server``); with ``--rpc-key KEY`` the
address is a tracker (``python -m tvm.exec.rpc_tracker``) and a server registered under KEY is requested from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpcError


@dataclass(frozen=True)
class RpcAddress:
    host: str
    port: int
    key: str | None = None  # tracker key; None: the address is a server

    def __str__(self) -> str:
        return f"rpc://{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")


def parse_address(text: str, key: str | None = None) -> RpcAddress:
    """``HOST:PORT`` (and an optional tracker key) -> RpcAddress; one-line SpcError otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpcError(f"--rpc: '{text}' is not HOST:PORT")
    if key is not None and not key.strip():
        raise SpcError("--rpc-key: the key is empty")
    return RpcAddress(host, int(port), key)


def connect(address: RpcAddress, timeout: float = 600.0):
    """A ``tvm.rpc.RPCSession`` on the device (through the tracker when the address has a key)."""
    from tvm import rpc

    try:
        if address.key:
            tracker = rpc.connect_tracker(address.host, address.port)
            return tracker.request(address.key, priority=1, session_timeout=int(timeout))
        return rpc.connect(address.host, address.port, session_timeout=int(timeout))
    except ImportError as exc:  # the tracker client needs tornado on some TVM builds
        raise SpcError(f"--rpc {address}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - TVM raises TVMError/RuntimeError/socket errors
        line = str(exc).strip().splitlines()
        raise SpcError(f"--rpc {address}: cannot open a session ({line[-1] if line else type(exc).__name__})") from None
