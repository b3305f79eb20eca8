"""Evidence bundles: ``reports/<topic>/<phase>/<UTC STAMP>/``.

A bundle holds ``py_taps/`` (tap JSON written by this engine), ``comparison/``
(audits, comparisons with the C program) and ``commands.txt`` (the exact command
line and environment of every run that wrote into it, appended). Bundles are
never overwritten: a new one always gets a fresh stamp folder.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["new_bundle", "open_bundle", "is_bundle", "record_command", "utc_stamp"]

_ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TORCHBRAGG_FAST",
             "TORCHINDUCTOR_CACHE_DIR")


def utc_stamp(now: _dt.datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ`` in UTC.

    Parameters
    ----------
    now : datetime.datetime, optional
        The moment to format (expected in UTC); the current time when omitted.

    Returns
    -------
    str
        The stamp, e.g. ``20240131T235959Z``.
    """
    now = now or _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y%m%dT%H%M%SZ")


def is_bundle(path) -> bool:
    """True for a folder laid out as a bundle (has ``py_taps/`` and ``comparison/``).

    Parameters
    ----------
    path : str or os.PathLike
        The folder to test.

    Returns
    -------
    bool
        Whether both sub-folders exist.
    """
    p = Path(path)
    return (p / "py_taps").is_dir() and (p / "comparison").is_dir()


def new_bundle(parent) -> Path:
    """Create a fresh ``<parent>/<UTC STAMP>/`` bundle; never reuses an existing folder.

    When the stamp folder already exists, ``-2``, ``-3``, ... is appended to the stamp.

    Parameters
    ----------
    parent : str or os.PathLike
        Folder to create the bundle in (created with its parents when missing).

    Returns
    -------
    pathlib.Path
        The new bundle, holding empty ``py_taps/``, ``comparison/`` and ``commands.txt``.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = utc_stamp()
    n = 1
    while True:
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            break
        except FileExistsError:
            n += 1
    (path / "py_taps").mkdir()
    (path / "comparison").mkdir()
    (path / "commands.txt").touch()
    return path


def open_bundle(path) -> Path:
    """An existing bundle, or a fresh one under ``path`` when ``path`` is a parent folder.

    Parameters
    ----------
    path : str or os.PathLike
        A bundle, or the folder to create a new bundle in.

    Returns
    -------
    pathlib.Path
        The bundle.
    """
    return Path(path) if is_bundle(path) else new_bundle(path)


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def record_command(bundle, argv: Sequence[str], *, device: str = "cpu", dtype: str = "float64",
                   note: str | None = None) -> None:
    """Append the exact command line and the environment of a run to ``commands.txt``.

    Parameters
    ----------
    bundle : str or os.PathLike
        The bundle folder whose ``commands.txt`` is appended to.
    argv : sequence of str
        The command line; its first word is the program (only its file name is recorded).
    device : str
        Device of the run, as recorded in the entry.
    dtype : str
        Floating-point type of the run, as recorded in the entry.
    note : str, optional
        An extra comment line for the entry.
    """
    import torch

    lines = [
        f"# {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}",
        f"cd {shlex.quote(os.getcwd())}",
        shlex.join([Path(argv[0]).name if argv else "bragg-tap"] + list(argv[1:])),
        f"#   python {platform.python_version()} torch {torch.__version__} on {platform.platform()}",
        f"#   device {device} dtype {dtype} threads {torch.get_num_threads()} git {_git_commit() or 'unknown'}",
    ]
    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    if env:
        lines.append("#   env " + " ".join(f"{k}={v}" for k, v in env.items()))
    if note:
        lines.append(f"#   {note}")
    with open(Path(bundle) / "commands.txt", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n\n")
        fh.flush()
        os.fsync(fh.fileno())


def command_line() -> list:
    """The current process's command line.

    Returns
    -------
    list of str
        ``sys.argv`` as a new list.
    """
    return [sys.argv[0]] + sys.argv[1:]
