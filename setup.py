"""Builds the relay core (_relay.pyx + _relay.pxd, repo top level) into
conduit_sidecar._relay."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# Cythonized under its own name so that Cython finds _relay.pxd beside it; the
# compiled module is then installed inside the package.
(relay,) = cythonize(
    [Extension("_relay", ["_relay.pyx"], extra_compile_args=["-O2"])],
    compiler_directives={"language_level": "3"},
)
relay.name = "conduit_sidecar._relay"

setup(ext_modules=[relay])
