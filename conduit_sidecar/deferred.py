"""Modules another package imports and `serve` never uses, loaded at their first use.

websockets' `version` module imports `importlib.metadata` (with `zipfile`, `pathlib`,
`csv` and `importlib.resources`: 1 MiB of every pod's RSS) to read a development
checkout's version, which a release never does. An import statement alone reads no
attribute of the module it binds, so a stand-in in `sys.modules` satisfies it, and
the first attribute anyone reads imports the module itself (as PEP 810's lazy
imports will). `importlib.util.LazyLoader` cannot do this: its module loads on any
attribute, `__spec__` included, which every import statement reads.
"""

import importlib
import importlib.util
import sys
import types


class _StandIn(types.ModuleType):
    """A module's place in `sys.modules` until an attribute it lacks is read."""

    def __getattr__(self, attr: str):
        # Reached only for what the stand-in lacks (its name and spec are its own).
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def defer(name: str) -> None:
    """Let `import name` bind a stand-in until the module is used."""
    spec = None if name in sys.modules else importlib.util.find_spec(name)  # (runs nothing)
    if spec is None:  # imported already, or missing: the import says so as before
        return
    stand_in = _StandIn(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in
    parent, _, child = name.rpartition(".")
    if parent:  # where `import a.b` followed by `a.b.x` looks
        setattr(sys.modules[parent], child, stand_in)
