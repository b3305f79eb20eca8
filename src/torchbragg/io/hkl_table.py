"""Structure-factor tables: HKL text files and the C program's ``Fdump.bin``.

The engine looks structure factors up in a dense box of ``F`` values indexed
by Miller indices.  This module builds that box, exactly as the C program
nanoBragg does, from either source:

* an **HKL text file** (``-hkl``), read by :func:`read_hkl`;
* an **Fdump.bin** binary cache, read by :func:`read_fdump` and written by
  :func:`write_fdump`.

HKL text files
--------------
One reflection per line: ``h k l F`` separated by blanks or tabs.  The box
spans the smallest and largest ``h``, ``k`` and ``l`` that occur.  The whole
box is first filled with ``default_F``; then every listed reflection is
stored in file order, so a reflection listed twice keeps its *last* value.
Cells of the box that the file does not list keep ``default_F`` (a lookup can
be inside the box and still return ``default_F``).

A file of nothing but ``int int int float`` lines (the usual case) is parsed in
one pass by numpy (about 0.5 s for 1.8 million reflections); any other file is
read line by line with the rules below, which also give the same table for a
plain file.

This reader is stricter and friendlier than the C program:

* ``#`` starts a comment (whole line or the end of a line) and blank lines
  are skipped.  The C program has no comment syntax: its reader silently stops
  at the first line it cannot parse, so a comment in the middle of a file
  drops every reflection after it, and a leading comment leaves it with no
  reflections at all ("not enough HKL indices", exit status 9).
* A line with other than four fields, or a field that is not a number, is an
  error (:class:`HKLFormatError`, naming file, line and text).  The C program
  reads numbers as a stream regardless of line breaks, so an extra column
  (``h k l F sigF``) silently shifts every following reflection.
* A file without reflections is an error.
* Non-integer indices are stored at the index the C program's bounds pass
  uses, ``trunc(value)`` (toward zero: ``1.7 -> 1``, ``-1.7 -> -1``), and a
  warning is recorded (:attr:`HKLTable.warnings` and :func:`warnings.warn`).
  Background: the C program makes two passes.  The first reads each index as
  a double and keeps the running minimum and maximum in ``int`` variables, so
  the box bounds are the truncated values.  The second pass, which fills the
  box, reads the indices with an integer conversion that does not round: it
  takes the integer prefix of the text (again truncation) but then cannot
  read the fractional part, so for a fractional ``h`` or ``k`` it stops
  filling the table at that line, and for a fractional ``l`` it stores the
  fraction as ``F`` and loses step with the rest of the file.  Indices written
  with a decimal point but an integer value (``1.0``) stop the C fill pass
  the same way; this reader accepts them and records a warning.

Fdump.bin
---------
Whenever the C program reads an HKL file it caches the filled box in
``Fdump.bin`` (in the working directory), and a later run without ``-hkl``
reads that cache back silently.  Layout:

1. One ASCII text line with the six bounds as decimal integers separated by
   single spaces, ``h_min h_max k_min k_max l_min l_max``, ended by a newline
   ``\\n`` and immediately followed by one form-feed byte ``\\f`` (0x0C).
   Example: ``b"-2 2 -2 2 -2 2\\n\\f"``.
2. Then raw IEEE-754 float64 values in the writer's native byte order
   (little-endian for every file here) with **one cell of padding on the high
   side of each axis**: the payload is ``(nh+1) * (nk+1) * (nl+1)`` doubles,
   where ``nh = h_max - h_min + 1`` etc., in C order with ``l`` varying
   fastest, i.e. ``numpy.fromfile(...).reshape(nh+1, nk+1, nl+1)`` indexed
   ``[h - h_min, k - k_min, l - l_min]``.  The padding cells are always 0.0.
   The real box already contains the ``default_F`` fill of the run that wrote
   it; the value of ``default_F`` itself is not stored.

File size = ``len(header) + 8 * (nh+1)*(nk+1)*(nl+1)``.

The C reader parses the header with a scanf pattern whose trailing newline
and form feed match *any* run of white space, so if the first payload byte
happens to be 0x09-0x0D or 0x20 it is swallowed and every value after it is
misread.  This reader takes the payload at its exact byte offset instead.

For a table read from an Fdump, which reflections the original file listed is
unknown; :attr:`HKLTable.listed` is approximated by the cells whose value
differs from ``default_F`` (0.0, the C program's default, when not given).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .atomic_io import atomic_write_bytes

__all__ = [
    "HKLFormatError",
    "HKLWarning",
    "HKLTable",
    "read_hkl",
    "read_fdump",
    "write_fdump",
    "fdump_bytes",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Most cells a table may have (float64: 2 GiB); guards against index typos.
MAX_CELLS = 1 << 28

#: Detailed warnings kept per category before they are summarised.
_MAX_DETAILED_WARNINGS = 20

_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


class HKLFormatError(ValueError):
    """A structure-factor file that cannot be read.

    Parameters
    ----------
    path : str
        The file.
    line : int or None
        1-based line number, or None when the problem is not on one line
        (an empty file, a truncated binary payload).
    text : str
        The offending text (the line, or a short excerpt).
    reason : str
        What is wrong.

    Notes
    -----
    ``str(error)`` reads ``"{path}:{line}: {reason}: {text!r}"``, or
    ``"{path}: {reason}"`` when there is no line.
    """

    def __init__(self, path: PathLike, line: int | None, text: str, reason: str):
        self.path = str(path)
        self.line = line
        self.text = text
        self.reason = reason
        if line is None:
            message = f"{self.path}: {reason}"
            if text:
                message += f": {text!r}"
        else:
            message = f"{self.path}:{line}: {reason}: {text!r}"
        super().__init__(message)


class HKLWarning(UserWarning):
    """Something in a structure-factor file that was accepted but is suspect."""


@dataclass(eq=False)
class HKLTable:
    """A dense box of structure factors indexed by Miller indices.

    Attributes
    ----------
    values : numpy.ndarray
        float64, shape ``(nh, nk, nl)``, indexed
        ``[h - h_min, k - k_min, l - l_min]``.  Unlisted cells hold
        ``default_F``.
    listed : numpy.ndarray
        bool, same shape: True where the file gave a value.  For an Fdump
        this is ``values != default_F`` (see module notes).
    h_min : int
        Smallest h in the box (inclusive).
    h_max : int
        Largest h in the box (inclusive).
    k_min : int
        Smallest k in the box (inclusive).
    k_max : int
        Largest k in the box (inclusive).
    l_min : int
        Smallest l in the box (inclusive).
    l_max : int
        Largest l in the box (inclusive).
    default_F : float
        The value of unlisted cells, and what the engine uses outside the box.
    source : str
        The file the table came from.
    kind : str
        ``"hkl"`` or ``"fdump"``.
    count : int
        Reflections read (HKL) or cells that differ from ``default_F``
        (Fdump).
    warnings : list of str
        Suspect things accepted while reading.
    """

    values: np.ndarray
    listed: np.ndarray
    h_min: int
    h_max: int
    k_min: int
    k_max: int
    l_min: int
    l_max: int
    default_F: float
    source: str
    kind: str
    count: int
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        expected = (
            self.h_max - self.h_min + 1,
            self.k_max - self.k_min + 1,
            self.l_max - self.l_min + 1,
        )
        if min(expected) < 1:
            raise ValueError(f"empty index range {self.bounds}")
        if tuple(self.values.shape) != expected or tuple(self.listed.shape) != expected:
            raise ValueError(
                f"values {self.values.shape} / listed {self.listed.shape} do not match "
                f"bounds {self.bounds} (expected {expected})"
            )
        if self.kind not in ("hkl", "fdump"):
            raise ValueError(f"kind must be 'hkl' or 'fdump', not {self.kind!r}")

    @property
    def bounds(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``((h_min, h_max), (k_min, k_max), (l_min, l_max))``.

        Returns
        -------
        tuple of three (int, int) pairs
            The inclusive index bounds along h, k and l.
        """
        return ((self.h_min, self.h_max), (self.k_min, self.k_max), (self.l_min, self.l_max))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(nh, nk, nl)``, the shape of :attr:`values`.

        Returns
        -------
        tuple of three int
            Cells along h, k and l.
        """
        return tuple(int(n) for n in self.values.shape)  # type: ignore[return-value]

    def lookup(self, h: int, k: int, l: int) -> float:
        """Nearest-neighbour lookup with the C program's rule.

        Parameters
        ----------
        h : int
            Integer Miller index h (already rounded by the caller).
        k : int
            Integer Miller index k.
        l : int
            Integer Miller index l.

        Returns
        -------
        float
            The cell value inside the box, ``default_F`` outside it.
        """
        if (
            self.h_min <= h <= self.h_max
            and self.k_min <= k <= self.k_max
            and self.l_min <= l <= self.l_max
        ):
            return float(self.values[h - self.h_min, k - self.k_min, l - self.l_min])
        return float(self.default_F)

    def same_values(self, other: HKLTable) -> bool:
        """True when both tables have the same bounds and bit-equal values.

        Parameters
        ----------
        other : HKLTable
            The table to compare with; ``listed``, ``default_F`` and the other fields are not compared.

        Returns
        -------
        bool
            Whether the bounds match and ``values`` are equal element by element.
        """
        return self.bounds == other.bounds and np.array_equal(self.values, other.values)

    def describe(self) -> str:
        """One-line human summary.

        Returns
        -------
        str
            e.g. ``"HKL table f.hkl: 125 reflections, h -2..2, k -2..2,
            l -2..2, default_F 50"``.
        """
        name = os.path.basename(self.source) or self.source
        if self.kind == "hkl":
            what = f"HKL table {name}: {self.count} reflections"
        else:
            what = f"Fdump table {name}: {self.count} cells differ from default_F"
        text = (
            f"{what}, h {self.h_min}..{self.h_max}, k {self.k_min}..{self.k_max}, "
            f"l {self.l_min}..{self.l_max}, default_F {self.default_F:g}"
        )
        if self.warnings:
            text += f" ({len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''})"
        return text


class _WarningLog:
    """Collects per-line warnings, keeping the first few of each category."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.counts: dict = {}

    def add(self, category: str, message: str) -> None:
        n = self.counts.get(category, 0) + 1
        self.counts[category] = n
        if n <= _MAX_DETAILED_WARNINGS:
            self.messages.append(message)

    def finish(self, path: str) -> list[str]:
        for category, n in self.counts.items():
            if n > _MAX_DETAILED_WARNINGS:
                self.messages.append(
                    f"{path}: ... and {n - _MAX_DETAILED_WARNINGS} more lines with {category}"
                )
        return self.messages


#: bounds of the HKL reader (specs/cli.md §1.5): file size, line length, index magnitude
HKL_MAX_BYTES = 1 << 30
HKL_MAX_LINE = 4096
HKL_MAX_INDEX = 1 << 20


def _read_bounded(path: PathLike, source: str) -> bytes:
    """The file's bytes, refusing to read more than HKL_MAX_BYTES (``/dev/zero`` never ends)."""
    with open(path, "rb") as handle:
        raw = handle.read(HKL_MAX_BYTES + 1)
    if len(raw) > HKL_MAX_BYTES:
        raise HKLFormatError(source, None, "", f"larger than the limit of {HKL_MAX_BYTES} bytes "
                             "(not an HKL file?)")
    return raw


def _parse_index(token: str) -> tuple[int, bool]:
    """Return ``(index, plain_integer_text)``; raise ValueError if not a number.

    The caller has already rejected lines with underscores or non-ASCII text,
    the only extras :func:`int` accepts beyond C's integer syntax.
    """
    try:
        return int(token), True
    except ValueError:
        pass
    if _FLOAT_RE.match(token):
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(token)
        return int(math.trunc(value)), False
    raise ValueError(token)


def _default_fill(default_F: float) -> float:
    # The C program only pre-fills when default_F != 0; its box is otherwise
    # calloc'ed, i.e. +0.0 (this matters for a -0.0 default).
    return float(default_F) if default_F != 0.0 else 0.0


def read_hkl(path: PathLike, default_F: float = 0.0) -> HKLTable:
    """Read an ``h k l F`` text file into a dense table, like the C program.

    Parameters
    ----------
    path : str or os.PathLike
        The HKL text file.
    default_F : float, optional
        Value of every cell not listed in the file (the C ``-default_F``,
        0 by default).

    Returns
    -------
    HKLTable
        ``kind="hkl"``; ``count`` is the number of reflection lines.

    Raises
    ------
    HKLFormatError
        A malformed line (wrong number of fields, a field that is not a
        finite number), a file without reflections, or an index range too
        large to hold.
    FileNotFoundError
        The file does not exist.

    Warns
    -----
    HKLWarning
        Non-integer indices (stored at ``trunc(value)``), indices written
        with a decimal point, duplicate reflections (the last one wins).

    Notes
    -----
    See the module docstring for the exact rules and how they differ from
    the C reader.
    """
    source = str(path)
    raw = _read_bounded(path, source)
    text = raw.decode("utf-8", errors="replace")
    log = _WarningLog()

    fast = _parse_plain(raw)
    if fast is not None:
        h, k, l, F, lines = fast
    else:
        h, k, l, F, lines = _parse_lines(text, source, log)
    return _build_table(source, text, log, h, k, l, F, lines, default_F)


def _parse_plain(raw: bytes):
    """The common case at C speed: every line exactly ``int int int float``, nothing else.

    Returns ``(h, k, l, F, line numbers)``, or None whenever the file holds anything the
    line-by-line reader (:func:`_parse_lines`) has a rule, a warning or an error for:
    comments, blank lines, carriage returns, underscores, non-ASCII text, indices that are
    not plain integers, a line without exactly four fields, an F that is not finite.
    """
    if not raw or not raw.isascii() or b"#" in raw or b"_" in raw or b"\r" in raw:
        return None
    if len(raw) > HKL_MAX_LINE and max(map(len, raw.split(b"\n"))) > HKL_MAX_LINE:
        return None  # the line reader names the over-long line
    n_lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    dtype = [("h", np.int64), ("k", np.int64), ("l", np.int64), ("F", np.float64)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. numpy's "empty input": the line reader says it better
            rows = np.loadtxt(io.BytesIO(raw), dtype=dtype, comments=None, ndmin=1)
    except (ValueError, UserWarning):
        return None
    if len(rows) != n_lines or not np.isfinite(rows["F"]).all():  # blank lines; nan or inf
        return None
    if max(int(np.abs(rows[n]).max()) for n in "hkl") > HKL_MAX_INDEX:  # the line reader names the line
        return None
    return rows["h"], rows["k"], rows["l"], rows["F"], np.arange(1, len(rows) + 1, dtype=np.int64)


def _parse_lines(text: str, source: str, log: _WarningLog):
    """Line by line, with every rule of the module docstring: ``(h, k, l, F, line numbers)``."""
    hs: list[int] = []
    ks: list[int] = []
    ls: list[int] = []
    fs: list[float] = []
    linenos: list[int] = []

    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if len(line) > HKL_MAX_LINE:
            raise HKLFormatError(source, lineno, line[:60] + "...",
                                 f"line longer than the limit of {HKL_MAX_LINE} characters")
        hash_pos = line.find("#")
        content = line if hash_pos < 0 else line[:hash_pos]
        fields = content.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise HKLFormatError(
                source, lineno, line, f"expected 4 fields (h k l F), found {len(fields)}"
            )
        if "_" in content or not content.isascii():
            bad = next((f for f in fields if "_" in f or not f.isascii()), fields[0])
            raise HKLFormatError(source, lineno, line, f"not a number: {bad!r}")
        index = []
        for name, token in zip("hkl", fields[:3], strict=True):
            try:
                value, plain = _parse_index(token)
            except ValueError:
                raise HKLFormatError(
                    source, lineno, line, f"{name} is not a finite number: {token!r}"
                ) from None
            if not plain:
                exact = float(token)
                if exact != value:
                    log.add(
                        "non-integer indices",
                        f"{source}:{lineno}: non-integer {name} = {token}, stored at "
                        f"{name} = {value} (truncated toward zero, as the C program's "
                        f"bounds pass does; its fill pass cannot read such a line)",
                    )
                else:
                    log.add(
                        "indices written with a decimal point",
                        f"{source}:{lineno}: {name} written as {token!r}; accepted as "
                        f"{value}, but the C program's fill pass stops at such a line",
                    )
            if abs(value) > HKL_MAX_INDEX:
                raise HKLFormatError(source, lineno, line, f"{name} = {token} is beyond the limit of "
                                     f"±{HKL_MAX_INDEX} on Miller indices")
            index.append(value)
        f_token = fields[3]
        try:
            # float() also takes nan/inf spellings; isfinite rejects them.
            f_value = float(f_token)
        except ValueError:
            f_value = math.nan
        if not math.isfinite(f_value):
            raise HKLFormatError(
                source, lineno, line, f"F is not a finite number: {f_token!r}"
            )
        hs.append(index[0])
        ks.append(index[1])
        ls.append(index[2])
        fs.append(f_value)
        linenos.append(lineno)

    if not fs:
        raise HKLFormatError(
            source,
            None,
            "",
            "no reflections found (the C program stops with 'not enough HKL indices')",
        )

    return (np.asarray(hs, dtype=np.int64), np.asarray(ks, dtype=np.int64), np.asarray(ls, dtype=np.int64),
            np.asarray(fs, dtype=np.float64), np.asarray(linenos, dtype=np.int64))


def _build_table(source: str, text: str, log: _WarningLog, h, k, l, F, lines, default_F: float) -> HKLTable:
    """The dense table of parsed reflections (the last of duplicates wins), with its warnings."""
    lo = (int(h.min()), int(k.min()), int(l.min()))
    hi = (int(h.max()), int(k.max()), int(l.max()))
    shape = tuple(b - a + 1 for a, b in zip(lo, hi, strict=True))
    cells = shape[0] * shape[1] * shape[2]
    if cells > MAX_CELLS:
        spread = np.maximum(np.abs(h), np.maximum(np.abs(k), np.abs(l)))
        worst = int(np.argmax(spread))
        raise HKLFormatError(
            source,
            int(lines[worst]),
            text.split("\n")[int(lines[worst]) - 1].rstrip("\r"),
            f"index box h {lo[0]}..{hi[0]}, k {lo[1]}..{hi[1]}, l {lo[2]}..{hi[2]} "
            f"has {cells} cells, more than the {MAX_CELLS} allowed",
        )

    flat = np.ravel_multi_index((h - lo[0], k - lo[1], l - lo[2]), shape)
    # Keep the last occurrence of each cell: unique over the reversed list.
    rev_unique, rev_first = np.unique(flat[::-1], return_index=True)
    keep = len(flat) - 1 - rev_first
    n_dupes = len(flat) - len(rev_unique)
    if n_dupes:
        counts = np.bincount(np.searchsorted(rev_unique, flat), minlength=len(rev_unique))
        first_dup_cell = rev_unique[np.argmax(counts > 1)]
        where = lines[flat == first_dup_cell]
        hh, kk, ll = (int(x) + o for x, o in zip(np.unravel_index(first_dup_cell, shape), lo, strict=True))
        log.add(
            "duplicates",
            f"{source}: {n_dupes} reflection line(s) repeat an earlier (h,k,l); the last "
            f"one listed wins, as in the C program (e.g. ({hh},{kk},{ll}) on lines "
            f"{', '.join(str(int(x)) for x in where[:5])})",
        )

    values = np.full(cells, _default_fill(default_F), dtype=np.float64)
    values[rev_unique] = F[keep]
    listed = np.zeros(cells, dtype=bool)
    listed[rev_unique] = True

    messages = log.finish(source)
    for message in messages:
        warnings.warn(message, HKLWarning, stacklevel=3)

    return HKLTable(
        values=values.reshape(shape),
        listed=listed.reshape(shape),
        h_min=lo[0],
        h_max=hi[0],
        k_min=lo[1],
        k_max=hi[1],
        l_min=lo[2],
        l_max=hi[2],
        default_F=float(default_F),
        source=source,
        kind="hkl",
        count=len(F),
        warnings=messages,
    )


def read_fdump(path: PathLike, default_F: float | None = None) -> HKLTable:
    """Read the C program's ``Fdump.bin`` structure-factor cache.

    Parameters
    ----------
    path : str or os.PathLike
        The Fdump file.
    default_F : float or None, optional
        The ``default_F`` of the run that wrote the file, used to decide
        which cells count as listed, and stored on the table.  None means
        0.0, the C program's default.

    Returns
    -------
    HKLTable
        ``kind="fdump"``; ``listed`` is ``values != default_F`` and ``count``
        is its number of True cells.

    Raises
    ------
    HKLFormatError
        A header that is not six integers followed by newline and form feed,
        an empty index range, or a payload of the wrong size (truncated or
        trailing bytes).

    Warns
    -----
    HKLWarning
        Non-zero values in the padding cells (the C program writes zeros).

    Notes
    -----
    The byte layout is described in the module docstring.
    """
    source = str(path)
    data = Path(path).read_bytes()
    newline = data.find(b"\n", 0, 256)
    if newline < 0:
        excerpt = data[:40].decode("latin-1")
        raise HKLFormatError(
            source, 1, excerpt, "not an Fdump file: no header line with six integer bounds"
        )
    try:
        header = data[:newline].decode("ascii")
    except UnicodeDecodeError:
        raise HKLFormatError(
            source, 1, data[:newline].decode("latin-1"), "not an Fdump file: binary header"
        ) from None
    fields = header.split()
    if len(fields) != 6 or not all(_INT_RE.match(f) for f in fields):
        raise HKLFormatError(
            source, 1, header, "Fdump header must be six integers h_min h_max k_min k_max l_min l_max"
        )
    if data[newline + 1 : newline + 2] != b"\f":
        raise HKLFormatError(
            source, 1, header, "Fdump header line must be followed by a form feed (\\f)"
        )
    h_min, h_max, k_min, k_max, l_min, l_max = (int(f) for f in fields)
    shape = (h_max - h_min + 1, k_max - k_min + 1, l_max - l_min + 1)
    if min(shape) < 1:
        raise HKLFormatError(source, 1, header, "Fdump header has an empty index range")
    padded = (shape[0] + 1, shape[1] + 1, shape[2] + 1)
    offset = newline + 2
    expected = 8 * padded[0] * padded[1] * padded[2]
    actual = len(data) - offset
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise HKLFormatError(
            source,
            None,
            "",
            f"Fdump payload {problem}: {actual} bytes after the header, expected {expected} "
            f"({padded[0]}x{padded[1]}x{padded[2]} float64 for bounds {header.strip()})",
        )
    box = np.frombuffer(data, dtype="<f8", offset=offset).reshape(padded)
    values = np.array(box[: shape[0], : shape[1], : shape[2]], dtype=np.float64)

    messages: list[str] = []
    pad = box.copy()
    pad[: shape[0], : shape[1], : shape[2]] = 0.0
    if np.any(pad != 0.0):
        messages.append(
            f"{source}: {int(np.count_nonzero(pad))} padding cell(s) are non-zero "
            f"(the C program writes zeros there); they were ignored"
        )
    for message in messages:
        warnings.warn(message, HKLWarning, stacklevel=2)

    default = 0.0 if default_F is None else float(default_F)
    listed = values != default
    return HKLTable(
        values=values,
        listed=listed,
        h_min=h_min,
        h_max=h_max,
        k_min=k_min,
        k_max=k_max,
        l_min=l_min,
        l_max=l_max,
        default_F=default,
        source=source,
        kind="fdump",
        count=int(np.count_nonzero(listed)),
        warnings=messages,
    )


def fdump_bytes(table: HKLTable) -> bytes:
    """Return the exact bytes the C program would write to ``Fdump.bin``.

    Parameters
    ----------
    table : HKLTable
        The table to serialise.

    Returns
    -------
    bytes
        Header line, form feed, then the zero-padded little-endian box.
    """
    header = (
        f"{table.h_min} {table.h_max} {table.k_min} {table.k_max} "
        f"{table.l_min} {table.l_max}\n\f"
    ).encode("ascii")
    nh, nk, nl = table.shape
    box = np.zeros((nh + 1, nk + 1, nl + 1), dtype="<f8")
    box[:nh, :nk, :nl] = table.values
    return header + box.tobytes()


def write_fdump(path: PathLike, table: HKLTable) -> Path:
    """Write ``table`` in the C program's ``Fdump.bin`` format, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (replaced atomically if it exists).
    table : HKLTable
        The table; only its bounds and values are stored.

    Returns
    -------
    pathlib.Path
        The destination path.

    Notes
    -----
    For a table read from an HKL file with the same ``default_F`` the output
    is byte-identical to the C program's ``Fdump.bin``.
    """
    return atomic_write_bytes(path, fdump_bytes(table))
