"""Builds the relay core (_relay.pyx + _relay.pxd, repo top level) into
conduit_sidecar._relay.

TLS legs are relayed by OpenSSL called from the relay when OpenSSL's headers are
found at build time (Debian: libssl-dev); without them the build still succeeds and
TLS legs use uvloop's SSL transport (`conduit_sidecar._relay.NATIVE_TLS` is False).
CONDUIT_NATIVE_TLS=0 forces the fallback build."""

import os
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup


def openssl_headers() -> bool:
    if os.environ.get("CONDUIT_NATIVE_TLS", "1") == "0":
        return False
    dirs = [sysconfig.get_config_var("INCLUDEDIR"), "/usr/include", "/usr/local/include"]
    dirs += [f[2:] for f in os.environ.get("CFLAGS", "").split() if f.startswith("-I")]
    return any(d and os.path.exists(os.path.join(d, "openssl", "ssl.h")) for d in dirs)


native_tls = openssl_headers()
# Cythonized under its own name so that Cython finds _relay.pxd beside it; the
# compiled module is then installed inside the package.
(relay,) = cythonize(
    [Extension("_relay", ["_relay.pyx"], extra_compile_args=["-O2"], include_dirs=["."],
               depends=["_tls.h"],
               define_macros=[("CONDUIT_OPENSSL", "1")] if native_tls else [],
               # The same libssl as Python's `ssl` (same soname, already loaded by it);
               # the relay checks the version at import.
               libraries=["ssl", "crypto"] if native_tls else [])],
    compiler_directives={"language_level": "3"},
)
relay.name = "conduit_sidecar._relay"

setup(ext_modules=[relay])
