"""Files the user mounts, which change under a running sidecar: the key file, TLS
certificate files, provider secrets, the webhook's certificate. Noticing that they
changed is polled by their owners (no inotify: a Kubernetes Secret volume swaps a
symlink, which inotify on the file itself never reports)."""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["FileWatch", "file_signature", "read_regular"]


def read_regular(path: str, limit: int) -> bytes:
    """The file's bytes, at most `limit` + 1 (the caller refuses more). OSError when
    it is not a regular file: a FIFO put there by mistake would hold the open (and
    the event loop of a running sidecar) until something writes to it, a device
    such as /dev/zero the read. Opened without blocking, for the FIFO."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read(limit + 1)


def file_signature(path: str):
    """What changes when the file is replaced: Kubernetes swaps the `..data`
    symlink to a new directory's files, `mv` puts another inode in place, an editor
    writes in place (mtime, size), `chmod` or `chown` makes it readable again (ctime:
    a file that failed to load for its permissions is read once they change). None
    when the file cannot be read. One `stat`,
    which follows the symlinks: `os.path.realpath` (an `lstat` per path component,
    in Python) cost ten times as much, on every session for a provider's secret and
    CA files."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns


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
