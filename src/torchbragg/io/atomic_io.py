"""Crash-safe file writing.

Every file the engine writes (images, ``Fdump.bin`` caches, reports) goes
through :func:`atomic_write_bytes`: the data are written to a temporary file in
the destination folder, flushed and fsync'ed, and only then moved over the
destination with :func:`os.replace`.  A reader therefore sees either the old
file or the complete new one, never a half-written file, even if the process
is killed mid-write.

:func:`exclusive_path` is the guard used for reports that must never be
overwritten.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["atomic_write_bytes", "atomic_write_text", "exclusive_path", "OutputSet", "blocked_signals"]

PathLike = Union[str, "os.PathLike[str]"]


def _default_file_mode() -> int:
    """Return the permission bits a plain ``open(path, "w")`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(folder: Path) -> None:
    """Flush a directory entry to disk where the platform allows it."""
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


def exclusive_path(path: PathLike) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, refusing existing paths.

    Parameters
    ----------
    path : str or os.PathLike
        Where a new file is about to be written.

    Returns
    -------
    pathlib.Path
        The same path, for chaining.

    Raises
    ------
    FileExistsError
        If something already exists at ``path``.  The message names the path.
    """
    p = Path(path)
    if os.path.lexists(p):
        raise FileExistsError(f"{p}: already exists; refusing to overwrite it")
    return p


def _replace_target(dest: Path) -> tuple[Path, int]:
    """Where a replacing write really goes and the mode it keeps.

    Like C's ``fopen(name, "w")``, a destination that is a symbolic link is written
    through (the link stays, its target gets the new contents), and an existing
    file keeps its permission bits.
    """
    real = Path(os.path.realpath(dest)) if dest.is_symlink() else dest
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except OSError:
        mode = _default_file_mode()
    return real, mode


def blocked_signals():
    """Block SIGINT/SIGTERM for a short step that must not be split (main thread only).

    Returns
    -------
    contextlib.AbstractContextManager
        A context inside which the two signals wait until it exits; a no-op off the main thread.
    """
    import contextlib
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def block():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    return block()


class OutputSet:
    """Several files written as one transaction.

    While the set is active (``with OutputSet() as out:``), :func:`atomic_write_bytes`
    with ``overwrite=True`` only stages: it writes a temporary file in the
    destination's folder.  :meth:`commit` (called when the ``with`` block ends
    normally) renames every temporary over its destination, with SIGINT/SIGTERM
    blocked so that no signal splits the set; an exception or a signal before that
    removes every temporary, so no destination changes.

    The constructor takes no arguments. Sets may be nested: the innermost active one stages.

    Attributes
    ----------
    temporaries : list[pathlib.Path]
        The temporary files staged so far, in the order they were written (read-only property).
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, str]] = []  # (temporary, destination, name shown)
        self._previous: OutputSet | None = None

    def __enter__(self) -> OutputSet:
        global _ACTIVE
        self._previous, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _ACTIVE
        _ACTIVE = self._previous
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    @property
    def temporaries(self) -> list[Path]:
        """The temporary files staged so far.

        Returns
        -------
        list[pathlib.Path]
            One temporary per staged write, in order.
        """
        return [t for t, _, _ in self._staged]

    def stage(self, path: PathLike, data: bytes) -> Path:
        """Write ``data`` to a temporary beside ``path``, to be renamed over it by :meth:`commit`.

        As with a replacing :func:`atomic_write_bytes`, a symbolic link is written through and an existing
        file keeps its permission bits.

        Parameters
        ----------
        path : str or os.PathLike
            The destination file; its folder must exist.
        data : bytes-like
            The complete new contents.

        Returns
        -------
        pathlib.Path
            ``path`` as a :class:`~pathlib.Path` (not yet written).

        Raises
        ------
        OSError
            If the temporary cannot be created or written; the message names ``path``.
        """
        dest = Path(path)
        real, mode = _replace_target(dest)
        folder = real.parent if str(real.parent) else Path(".")
        try:
            with blocked_signals():  # the temporary is recorded the moment it exists
                fd, tmp_name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=folder)
                self._staged.append((Path(tmp_name), real, str(dest)))
            with os.fdopen(fd, "wb") as handle:
                handle.write(memoryview(data))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, mode)
        except OSError as err:
            raise OSError(f"cannot write {dest}: {err.strerror}") from None
        return dest

    def commit(self) -> None:
        """Rename every staged temporary over its destination, with SIGINT/SIGTERM blocked.

        Whatever happens, no temporary is left behind afterwards.

        Raises
        ------
        OSError
            If a rename fails; the message names that destination (earlier ones have been replaced).
        """
        with blocked_signals():
            try:
                for tmp, real, shown in self._staged:
                    try:
                        os.replace(tmp, real)
                    except OSError as err:
                        raise OSError(f"cannot write {shown}: {err.strerror}") from None
            finally:
                self.rollback()
        for folder in {real.parent for _, real, _ in self._staged}:
            _fsync_directory(folder)

    def rollback(self) -> None:
        """Remove every staged temporary that still exists; no destination changes."""
        for tmp, _, _ in self._staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


_ACTIVE: OutputSet | None = None


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.  Its folder must exist.
    data : bytes-like
        The complete new contents.
    overwrite : bool, optional
        If False the write fails with :class:`FileExistsError` when ``path``
        already exists; the check and the creation are one atomic step
        (a hard link), so two writers cannot both succeed.

    Returns
    -------
    pathlib.Path
        The destination path.

    Raises
    ------
    FileExistsError
        ``overwrite`` is False and ``path`` exists.
    OSError
        The folder is missing or not writable.
    """
    if overwrite and _ACTIVE is not None:
        return _ACTIVE.stage(path, data)
    dest = Path(path)
    mode = _default_file_mode()
    if overwrite:
        dest, mode = _replace_target(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not overwrite:
        exclusive_path(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(memoryview(data))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise FileExistsError(
                    f"{dest}: already exists; refusing to overwrite it"
                ) from None
            tmp.unlink()
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(folder)
    return dest


def atomic_write_text(
    path: PathLike, text: str, *, encoding: str = "utf-8", overwrite: bool = True
) -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    text : str
        The complete new contents.
    encoding : str, optional
        Text encoding, UTF-8 by default.
    overwrite : bool, optional
        See :func:`atomic_write_bytes`.

    Returns
    -------
    pathlib.Path
        The destination path.
    """
    return atomic_write_bytes(path, text.encode(encoding), overwrite=overwrite)
