"""One process at a time in a folder: an exclusive flock on a lock file that holds the owner's pid.

`learn`, `rollback` and `forget` hold HOME/learn.lock (`store.versions.locked`); `train` holds
train.lock in its --adapter-path (`formats.checkpoint.locked`), each for its whole life. The
kernel drops a flock when its process dies (kill -9 included), so a lock file left by a killed
run is stale by construction: the next run takes it over.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


@contextmanager
def held(path: Path, busy: Callable[[str], Exception], mode: int = 0o644):
    """Hold an exclusive flock on `path` (created with `mode` when missing; its folder must exist)
    for the life of the block, the file holding this process's pid. Yields the pid a killed
    holder left behind (an int), else None. Held by a live process: raises `busy(pid)`, its pid as
    the file says ("unknown" if empty), having written nothing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise busy(holder) from None
        stale = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield int(stale) if stale.isdigit() else None
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty file is not a stale lock
    finally:
        os.close(fd)  # closing drops the flock
