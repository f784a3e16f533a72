"""The ZeroMQ door of the engine: msgpack messages over a ROUTER socket (see docs/ipc.md)."""

from ipc.client import EngineClient
from ipc.errors import EngineUnavailable, IpcError, RemoteError
from ipc.protocol import OPS, PROTOCOL_VERSION, array_from_wire, array_to_wire
from ipc.server import IpcServer
from ipc.settings import IpcSettings

__all__ = [
    "OPS",
    "PROTOCOL_VERSION",
    "EngineClient",
    "EngineUnavailable",
    "IpcError",
    "IpcServer",
    "IpcSettings",
    "RemoteError",
    "array_from_wire",
    "array_to_wire",
]
