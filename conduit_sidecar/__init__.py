"""conduit-sidecar: a real-time WebSocket sidecar with virtual keys and a Cython relay."""

__version__ = "0.1.0"

from . import deferred

# websockets' version module imports it, for a development checkout's version only.
deferred.defer("importlib.metadata")
