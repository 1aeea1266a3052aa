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
    """The file's bytes. OSError when it is not a regular file (a FIFO put there by
    mistake would hold the open, and the event loop of a running sidecar, until
    something writes to it; a device such as /dev/zero the read), or when it holds
    more than `limit` bytes (EFBIG). Opened without blocking, for the FIFO."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        data = f.read(limit + 1)
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
        raise OSError(errno.EFBIG, f"larger than {size}", path)
    return data


def file_signature(path: str, ctime: bool = False):
    """What changes when the file is replaced: Kubernetes swaps the `..data`
    symlink to a new directory's files, `mv` puts another inode in place, an editor
    writes in place (mtime, size). With `ctime`, a `chmod` or `chown` too (see
    FileWatch.after_failure). None when the file cannot be read. One `stat`,
    which follows the symlinks: `os.path.realpath` (an `lstat` per path component,
    in Python) cost ten times as much, on every session for a provider's secret and
    CA files."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if ctime:
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class FileWatch:
    """`changed()` is true once after any of `paths` changed since the last call
    (or since construction)."""

    def __init__(self, *paths: str):
        self.paths = paths
        self.ctime = False
        self.seen = self._now()  # with ctime, as changed() last found them: before the read
        self.signature = self._view(self.seen)

    def _now(self) -> tuple:
        return tuple(file_signature(p, True) for p in self.paths)

    def _view(self, seen: tuple) -> tuple:
        return seen if self.ctime else tuple(s and s[:4] for s in seen)

    def after_failure(self, failed: bool, signature: tuple | None = None) -> None:
        """While the last read failed, a permission change alone (ctime only: neither
        inode, mtime nor size) is a change: the file may be readable now. Not always:
        kubelets that re-apply a Secret volume's fsGroup ownership at every sync touch
        every file's ctime, which would reload the keys each minute. `signature`: the
        files' as read, for the switch back. Else the files as changed() found them,
        before the read: a write that ended after it is a change still to see."""
        if failed != self.ctime:
            self.ctime = failed
            self.signature = signature if signature is not None else self._view(self.seen)

    def changed(self) -> bool:
        self.seen = self._now()
        now = self._view(self.seen)
        if now == self.signature:
            return False
        self.signature = now
        return True
