"""Modules other packages import and `serve` never uses, loaded at their first use.

websockets' `version` module imports `importlib.metadata` (with `zipfile`, `pathlib`,
`csv` and `importlib.resources`) to read a development checkout's version, which a
release never does; prometheus-client's exposition imports `gzip` and `http.server`
(with `mimetypes` and `html`) for an HTTP server of its own, and `mmap` for its
multiprocess mode; `email` imports `calendar`, `shutil` `bz2` and `lzma` (UNUSED below).
An import statement alone reads no attribute of the module it binds, so a stand-in in
`sys.modules` satisfies it, and the first attribute anyone reads imports the module
itself (as PEP 810's lazy imports will). `importlib.util.LazyLoader` cannot do this: its module loads on any
attribute, `__spec__` included, which every import statement reads. A module whose
attributes are read at import (`http.server`'s handler, which prometheus-client
subclasses) cannot be deferred, nor one taken with `from m import *` (without
`__all__`, a star import copies the stand-in's own few names).
"""

import importlib
import importlib.util
import sys
import types

# Each: who imports it, for what `serve` never does.
UNUSED = (
    "importlib.metadata",  # websockets.version: a development checkout's version
    "gzip",  # prometheus_client.exposition: gzip-encoded answers of its own server
    "bz2",  # shutil (which argparse reads for the terminal's width): archive formats
    "lzma",  # the same
    "mimetypes",  # http.server: serving files
    "html",  # http.server: error pages (with html.entities)
    "calendar",  # email._parseaddr: dates parsed out of mail headers
    "mmap",  # prometheus_client.mmap_dict: the multiprocess mode
)


class _StandIn(types.ModuleType):
    """A module's place in `sys.modules` until an attribute it lacks is read."""

    def __getattr__(self, attr: str):
        # Reached only for what the stand-in lacks (its name and spec are its own).
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def defer(*names: str) -> None:
    """Let `import name` bind a stand-in until the module is used."""
    for name in names:
        # find_spec imports a submodule's parent package, which may import the module
        # itself: only then is it known whether a stand-in would replace a loaded module.
        spec = importlib.util.find_spec(name)
        if spec is None or name in sys.modules:  # missing (the import says so), or imported
            continue
        stand_in = _StandIn(name)
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in
        parent, _, child = name.rpartition(".")
        if parent:  # where `import a.b` followed by `a.b.x` looks
            setattr(sys.modules[parent], child, stand_in)
