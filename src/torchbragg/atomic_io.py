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
import tempfile
from pathlib import Path
from typing import Union

__all__ = ["atomic_write_bytes", "atomic_write_text", "exclusive_path"]

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
    dest = Path(path)
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
        os.chmod(tmp, _default_file_mode())
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
