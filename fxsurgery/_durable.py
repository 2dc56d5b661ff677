"""Small file-system helpers shared by every writer (the command line's atomic files, streamed
checkpoints): making a rename durable, and the permissions a new file would get."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_folder", "umask"]


def fsync_folder(folder) -> None:
    """Makes a rename inside `folder` durable (POSIX); a system that cannot open a folder cannot
    fsync one either, which is no error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read rather than set and restored where possible: os.umask changes
    it for every thread meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
