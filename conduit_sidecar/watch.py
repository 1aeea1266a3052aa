"""Noticing that files changed: the key file, TLS certificate files, the webhook's
certificate. Polled by their owners (no inotify: a Kubernetes Secret volume swaps a
symlink, which inotify on the file itself never reports)."""

from __future__ import annotations

import os

__all__ = ["FileWatch", "file_signature"]


def file_signature(path: str):
    """What changes when the file is replaced: Kubernetes swaps the `..data`
    symlink (the resolved path changes), an editor or `mv` replaces the inode.
    None when the file cannot be read."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return real, st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


class FileWatch:
    """`changed()` is true once after any of `paths` changed since the last call
    (or since construction)."""

    def __init__(self, *paths: str):
        self.paths = paths
        self.signature = self._now()

    def _now(self) -> tuple:
        return tuple(file_signature(p) for p in self.paths)

    def changed(self) -> bool:
        now = self._now()
        if now == self.signature:
            return False
        self.signature = now
        return True
