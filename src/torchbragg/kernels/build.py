"""Building the compiled kernels: compiler, sources, on-disk cache.

The native sources are real files next to this module (``cpu_render.cpp``,
``gpu_render.cu`` and the header both include, ``kernel_math.h``). A variant is
one source compiled with ``-D`` switches (the render dtype, crystal shape, ...)
and the packed-parameter indices of :mod:`torchbragg.kernels.packing`; the
result is kept in a per-user cache folder under a name made of two hashes:
the sources' text (with the header) and everything else that went into it.
When a build finds files there that an older text of the same source made, it
removes them (:func:`prune_kernel_cache`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KERNEL_DIR", "NativeSource", "compiled_kernels_enabled", "kernel_cache_dir", "cxx_compiler",
           "cached_build", "compile_shared_library", "prune_kernel_cache", "NO_COMPILER_MESSAGE",
           "slow_path_note"]

#: the folder holding the native sources
KERNEL_DIR = Path(__file__).resolve().parent
#: the headers the sources include (``#include "kernel_math.h"``)
HEADERS = ("kernel_math.h", "cpu_kernel.h")
#: why the compiled CPU kernel cannot be built when no C++ compiler is found, and what to do
NO_COMPILER_MESSAGE = ("no C++ compiler found (g++, c++ or clang++ on PATH, or $CXX); install g++ "
                       "(bash scripts/bootstrap.sh does) for the compiled kernel")
#: the start of the one line the command line and the inspector show when a compiled kernel cannot be used
SLOW_PATH_MESSAGE = "rendering uses the slower PyTorch path (tens of times slower)"
#: how old a cached file of another source text must be before :func:`prune_kernel_cache` removes it (s):
#: a process of another version that has just built it may still be loading it
PRUNE_MIN_AGE_S = 600.0


def slow_path_note(problem: str | None) -> str:
    """The one plain line saying that renders take the PyTorch path, and why.

    Parameters
    ----------
    problem : str or None
        Why the compiled kernel could not be built or loaded (only its first line is kept).

    Returns
    -------
    str
        For example "rendering uses the slower PyTorch path (tens of times slower): no C++
        compiler found ...; install g++ (bash scripts/bootstrap.sh does) for the compiled kernel".
    """
    lines = (problem or "").strip().splitlines()
    first = lines[0].strip() if lines else "the compiled kernel is unavailable"
    return f"{SLOW_PATH_MESSAGE}: {first}"


def compiled_kernels_enabled() -> bool:
    """False when the environment says ``TORCHBRAGG_FAST=0`` (or ``off``/``false``/``no``).

    Returns
    -------
    bool
        Whether renders may use the compiled kernels.
    """
    return os.environ.get("TORCHBRAGG_FAST", "1").strip().lower() not in ("0", "off", "false", "no")


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept.

    Returns
    -------
    pathlib.Path
        ``$TORCHBRAGG_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchbragg/kernels`` (``~/.cache`` by default).
    """
    env = os.environ.get("TORCHBRAGG_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchbragg" / "kernels"


def cxx_compiler() -> str | None:
    """The C++ compiler the CPU kernel is built with.

    Returns
    -------
    str or None
        ``$CXX``, else the first of g++, c++ and clang++ on PATH; None when there is none.
    """
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cpu_signature() -> str:
    """The machine and its instruction-set flags (``-march=native`` builds are kept per CPU).

    Returns
    -------
    str
        ``platform.machine()`` followed by the ``flags``/``Features`` line of ``/proc/cpuinfo``, or by
        ``platform.processor()`` where there is no such line.
    """
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return sig + line
    except OSError:
        pass
    return sig + platform.processor()


@dataclass(frozen=True)
class NativeSource:
    """One native source file and the ``-D`` switches of a variant of it.

    Attributes
    ----------
    name : str
        The file's name in :data:`KERNEL_DIR` (``cpu_render.cpp`` or ``gpu_render.cu``).
    defines : tuple of str
        ``NAME=VALUE`` switches (empty by default).
    text_override : str or None
        The text to compile instead of the file's (for tests of compiler messages); None for the file.
    """

    name: str
    defines: tuple[str, ...] = ()
    #: the text to compile instead of the file's (for tests of compiler messages)
    text_override: str | None = None

    @property
    def path(self) -> Path:
        """The file.

        Returns
        -------
        pathlib.Path
            ``KERNEL_DIR / name``.
        """
        return KERNEL_DIR / self.name

    def text(self) -> str:
        """The file's text.

        Returns
        -------
        str
            :attr:`text_override` when set, else the file's contents.
        """
        return self.path.read_text() if self.text_override is None else self.text_override

    def with_text(self, text: str) -> NativeSource:
        """This source with another text (compiled from a temporary copy next to the file's headers).

        Parameters
        ----------
        text : str
            The source text to compile instead of the file's.

        Returns
        -------
        NativeSource
            The same name and switches with ``text_override=text``.
        """
        return NativeSource(self.name, self.defines, text)

    def headers(self) -> dict[str, str]:
        """Name -> text of the headers it may include (NVRTC takes them as a list).

        Returns
        -------
        dict of str to str
            Each header of :data:`HEADERS` and its text, read from :data:`KERNEL_DIR`.
        """
        return {name: (KERNEL_DIR / name).read_text() for name in HEADERS}

    def text_hash(self) -> str:
        """A hash of the source's and headers' text: what identifies its build in the cache.

        Returns
        -------
        str
            The first 12 hexadecimal digits of the SHA-256 of the name, text and headers.
        """
        parts = [self.name, self.text()] + [f"{k}\0{v}" for k, v in sorted(self.headers().items())]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]

    def define_flags(self) -> list[str]:
        """The switches as compiler options.

        Returns
        -------
        list of str
            ``-DNAME=VALUE`` for every switch, in order.
        """
        return [f"-D{d}" for d in self.defines]


_PRUNED: set = set()


def cached_build(prefix: str, source: NativeSource, key_parts: Sequence[str], suffix: str,
                 build: Callable[[str], None]) -> Path:
    """The cached file of one build, made by ``build(temporary path)`` when missing.

    The file is ``<cache>/<prefix><hash of the source text>-<hash of key_parts and defines><suffix>``,
    moved into place atomically (concurrent processes see a whole file or none). The first build of
    a prefix in a process prunes the files of older texts of the source.

    Parameters
    ----------
    prefix : str
        The kind of build (``tb_render_``, ``tb_gpu_``).
    source : NativeSource
        What is compiled.
    key_parts : sequence of str
        Everything else the result depends on (compiler, flags, architecture).
    suffix : str
        ``.so`` or ``.bin``.
    build : callable
        Writes the result to the path it is given.

    Returns
    -------
    pathlib.Path
        The cached file.
    """
    text_hash = source.text_hash()
    rest = hashlib.sha256("\0".join([*key_parts, *source.defines]).encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    path = folder / f"{prefix}{text_hash}-{rest}{suffix}"
    if (prefix, source.name, suffix) not in _PRUNED:
        _PRUNED.add((prefix, source.name, suffix))
        prune_kernel_cache(prefix, text_hash, suffix)
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=".tb_", dir=folder)
        os.close(fd)
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def prune_kernel_cache(prefix: str, text_hash: str, suffix: str, min_age_s: float = PRUNE_MIN_AGE_S) -> list[Path]:
    """Remove the cached builds of ``prefix`` that no current source can produce.

    Those are the files of another source text (an older version: a build names its source's
    text hash), files in the naming scheme of earlier versions, and temporaries left by an
    interrupted build; each only when older than ``min_age_s``.

    Parameters
    ----------
    prefix : str
        The build kind (``tb_render_``, ``tb_gpu_``).
    text_hash : str
        The current source text's hash (:meth:`NativeSource.text_hash`); its files are kept.
    suffix : str
        The file suffix (``.so`` or ``.bin``).
    min_age_s : float, optional
        Files younger than this are kept, seconds.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    folder = kernel_cache_dir()
    if not folder.is_dir():
        return []
    current = re.compile(re.escape(prefix) + r"([0-9a-f]{12})-[0-9a-f]{16}" + re.escape(suffix) + r"\Z")
    older = re.compile(re.escape(prefix) + r"[0-9a-f]{20}" + re.escape(suffix) + r"\Z")
    now = time.time()
    removed = []
    for p in folder.iterdir():
        m = current.match(p.name)
        stale = (m is not None and m.group(1) != text_hash) or older.match(p.name) is not None
        stale = stale or (p.name.startswith(".tb_") and now - _mtime(p) > 86400.0)
        if stale and now - _mtime(p) >= min_age_s:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return time.time()


def compile_shared_library(cxx: str, flag_sets: Sequence[Sequence[str]], source: NativeSource, out: str,
                           extra: Sequence[str] = ()) -> None:
    """Compile ``source`` (its own file, with ``-I`` its folder) into the shared library ``out``.

    Parameters
    ----------
    cxx : str
        The compiler.
    flag_sets : sequence of sequences of str
        Flags to try in turn; the first set that compiles wins.
    source : NativeSource
        The file and its switches.
    out : str
        The library to write.
    extra : sequence of str, optional
        More options for every try (``-x c++`` for the GPU source's host build).

    Raises
    ------
    RuntimeError
        With the compiler's messages when no flag set compiles.
    """
    cmd: list[str] = []
    proc = None
    with tempfile.TemporaryDirectory(prefix=".tb_src_", dir=os.path.dirname(out) or None) as tmp:
        path = source.path
        if source.text_override is not None:
            path = Path(tmp) / source.name
            path.write_text(source.text_override)
        for flags in flag_sets:
            cmd = [cxx, *flags, f"-I{KERNEL_DIR}", *source.define_flags(), *extra, str(path), "-o", out]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise RuntimeError(f"{cxx}: {err}") from None
            if proc.returncode == 0:
                return
    raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:] if proc else ''}")
