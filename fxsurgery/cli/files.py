"""Output files, written so that a failure never leaves a partial one.

Each file is written under a temporary name in its target's folder (so the rename cannot
cross file systems), flushed to disk, then renamed over the target with `os.replace`, which
is atomic: a reader sees the previous file or the complete new one. Several outputs of one
command are moved into place together; if a later rename fails, the earlier ones are rolled
back to the files they replaced. An error or an interrupt before that deletes the temporaries.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from .._durable import fsync_folder, umask
from .errors import CliError

__all__ = ["TEMP_PREFIX", "AtomicFile", "Outputs", "check_output", "check_distinct", "write_atomically"]

TEMP_PREFIX = ".fxsurgery-"


def check_output(path, what: str, flag: str) -> None:
    """Fails now, before any work, if `path` cannot be written: its folder is missing or not a
    folder, it is a folder, or a file cannot be created there (tried, since os.access says yes
    to root on a read-only mount)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CliError(f"cannot write {what} {flag} {path!r}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise CliError(f"cannot write {what} {flag} {path!r}: folder {folder!r} does not exist; create it first")
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {what} {flag} {path!r}: {folder!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CliError(f"cannot write {what} {flag} {path!r}: {err.strerror} in folder {folder!r}") from None


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(outputs, inputs) -> None:
    """No output overwrites an input of the command (the user's checkpoint or description
    files are never modified) or another output. Both are lists of (path or None, flag, what)."""
    outputs = [(os.fspath(p), f, w) for p, f, w in outputs if p]
    inputs = [(os.fspath(p), f, w) for p, f, w in inputs if p]
    for i, (path, flag, _) in enumerate(outputs):
        for other, other_flag, what in inputs:
            if _same_file(path, other):
                raise CliError(f"{flag} {path!r} is {what} ({other_flag}); write to another file: "
                               "fxsurgery never modifies its inputs")
        for other, other_flag, what in outputs[:i]:
            if _same_file(path, other):
                raise CliError(f"{flag} {path!r} is also {what} ({other_flag}); give two different files")


class AtomicFile:
    """The temporary file a writer writes to. It remembers the exception its write raised:
    torch.save writes through C++, which turns an exception raised in write (an interrupt,
    a full disk) into a RuntimeError of its own; the staging step raises the original."""

    def __init__(self, f):
        self._f = f
        self.failure: BaseException | None = None

    def write(self, data):
        try:
            return self._write(data)
        except BaseException as err:
            self.failure = err
            raise

    def _write(self, data):  # its own method so that tests can make the k-th write fail
        return self._f.write(data)

    def flush(self):
        self._f.flush()

    def __getattr__(self, name):  # tell, seek, ... as the file object has them
        return getattr(self._f, name)


def _mode_for_new_file(target: str) -> int:
    """The permissions the target would get from open(): mkstemp makes 0600 files."""
    if os.path.exists(target):
        return os.stat(target).st_mode & 0o7777
    return 0o666 & ~umask()


class Outputs:
    """The files one command writes, staged by `write`/`write_path` and moved into place together
    by `commit`. Leaving the `with` block without committing deletes what was staged."""

    def __init__(self):
        self._staged: list[tuple[str, str, str]] = []  # (temporary, target, what)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> bool:
        self.discard()
        return False

    def _temporary(self, target: str, what: str) -> tuple[int, str]:
        folder = os.path.dirname(os.path.abspath(target))
        try:
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(target)[1], dir=folder)
        except OSError as err:
            raise CliError(f"cannot write {what} {target!r}: {err.strerror}") from None
        self._staged.append((tmp, target, what))
        return fd, tmp

    def write(self, path, write: Callable[[AtomicFile], None], what: str, text: bool = False) -> None:
        """Stages `path`: `write` receives the open temporary file (binary unless `text`)."""
        target = os.fspath(path)
        fd, tmp = self._temporary(target, what)
        atomic = None
        try:
            with os.fdopen(fd, "w" if text else "wb") as f:
                atomic = AtomicFile(f)
                write(atomic)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:
            cause = atomic.failure if atomic is not None and atomic.failure is not None else err
            if isinstance(cause, OSError):
                raise CliError(f"cannot write {what} {target!r}: {one_os_error(cause)}") from cause
            if cause is not err:
                raise cause from err
            raise

    def write_path(self, path, write: Callable[[str], None], what: str) -> None:
        """Stages `path` for a writer that wants a file name (safetensors' save_model)."""
        target = os.fspath(path)
        fd, tmp = self._temporary(target, what)
        os.close(fd)
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise CliError(f"cannot write {what} {target!r}: {one_os_error(err)}") from err

    def commit(self) -> None:
        """Renames every staged file over its target; if one rename fails, the targets already
        replaced get their previous files back (kept as hard links, or copies, meanwhile)."""
        staged, backups, done = list(self._staged), {}, []
        try:
            if len(staged) > 1:
                for tmp, target, _ in staged:
                    if os.path.exists(target):
                        backups[target] = _backup(tmp, target)
            for tmp, target, what in staged:
                os.chmod(tmp, _mode_for_new_file(target))
                try:
                    os.replace(tmp, target)
                except OSError as err:
                    raise CliError(f"cannot write {what} {target!r}: {one_os_error(err)}") from err
                done.append(target)
                self._staged.remove((tmp, target, what))
        except BaseException:
            for target in reversed(done):
                _restore(target, backups.get(target))
            raise
        finally:
            for backup in backups.values():
                _unlink(backup)
        for folder in {os.path.dirname(os.path.abspath(t)) for _, t, _ in staged}:
            fsync_folder(folder)

    def discard(self) -> None:
        for tmp, _, _ in self._staged:
            _unlink(tmp)
        self._staged.clear()


def one_os_error(err: OSError) -> str:
    return err.strerror or str(err)


def _backup(tmp: str, target: str) -> str:
    backup = tmp + ".previous"
    try:
        os.link(target, backup)  # no copy: the old file's data stay where they are
    except OSError:
        shutil.copy2(target, backup)
    return backup


def _restore(target: str, backup: str | None) -> None:
    """Best effort: the rollback of a failed commit must not hide the failure itself."""
    try:
        if backup is None:
            os.unlink(target)
        else:
            os.replace(backup, target)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_atomically(path, write: Callable[[AtomicFile], None], what: str, text: bool = False) -> None:
    """One file, written and moved into place (see `Outputs`)."""
    with Outputs() as out:
        out.write(path, write, what, text=text)
        out.commit()
