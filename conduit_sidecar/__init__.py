"""conduit-sidecar: a real-time WebSocket sidecar with virtual keys and a Cython relay."""

__version__ = "0.1.0"

from . import deferred

deferred.defer(*deferred.UNUSED)  # before anything of ours imports the packages that import them
