"""Noticing that files changed: the key file, TLS certificate files, the webhook's
certificate. Polled by their owners (no inotify: a Kubernetes Secret volume swaps a
symlink, which inotify on the file itself never reports)."""

from __future__ import annotations

import os

__all__ = ["FileWatch", "file_signature"]


def file_signature(path: str):
    """What changes when the file is replaced: Kubernetes swaps the `..data`
    symlink to a new directory's files, `mv` puts another inode in place, an editor
    writes in place (mtime, size). None when the file cannot be read. One `stat`,
    which follows the symlinks: `os.path.realpath` (an `lstat` per path component,
    in Python) cost ten times as much, on every session for a provider's secret and
    CA files."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


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
