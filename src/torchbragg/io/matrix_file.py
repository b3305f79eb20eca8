"""MOSFLM-style orientation matrix files (the C program's ``-mat``).

What the C program reads
------------------------
The first nine numbers of the file, as a free-format stream (line breaks do
not matter), into::

    a*_x  b*_x  c*_x
    a*_y  b*_y  c*_y
    a*_z  b*_z  c*_z

i.e. row ``i`` of the file holds component ``i`` (x, y, z of the C lab
frame) of the three reciprocal-cell vectors, which are the **columns**.
Everything after the ninth number (the rest of a MOSFLM matrix file:
missetting angles, U matrix, cell, ...) is ignored.

A MOSFLM ``A`` matrix carries the wavelength (it is dimensionless:
reciprocal vectors times lambda), so the C program divides every element by
the wavelength in Angstrom::

    a_star = A[:, 0] / lambda_A     # Angstrom^-1, likewise b_star, c_star

where ``lambda_A`` is the nominal wavelength (``-lambda`` / ``-energy``, or
the ``-img`` header), not a dispersion step.  The vectors are used as given in
the C lab frame (beam along +x in the default MOSFLM convention); choosing
another detector convention does *not* rotate them.  The C program then
rebuilds the direct cell from them (``a = (b* x c*) / V*`` etc.), applies any
``-misset`` rotation, and regenerates the reciprocal vectors from the direct
ones.  See :func:`mosflm_reciprocal_vectors`.

This reader is stricter than C's: a token that is not a number before the
ninth number, fewer than nine numbers, a non-finite value or a singular
matrix is an error naming the file and line.  Fortran-style numbers that run
together (``-0.02837711-0.00305386``), which C's reader splits, are split
here too.
"""

from __future__ import annotations

import math
import os
import re
from typing import Union

import numpy as np

__all__ = ["MatrixFormatError", "read_mosflm_matrix", "mosflm_reciprocal_vectors"]

PathLike = Union[str, "os.PathLike[str]"]

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class MatrixFormatError(ValueError):
    """An unreadable matrix file.

    Attributes
    ----------
    path : str
    line : int or None
        1-based line, None when the problem is the file as a whole.
    text : str
    reason : str
    """

    def __init__(self, path: PathLike, line, text: str, reason: str):
        self.path = str(path)
        self.line = line
        self.text = text
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        message = f"{where}: {reason}"
        if text:
            message += f": {text!r}"
        super().__init__(message)


MATRIX_MAX_BYTES = 1 << 20


def read_mosflm_matrix(path: PathLike) -> np.ndarray:
    """Read the 3x3 matrix the C program's ``-mat`` option reads.

    Parameters
    ----------
    path : str or os.PathLike
        A MOSFLM matrix file (or any text file starting with nine numbers).

    Returns
    -------
    numpy.ndarray
        float64, shape (3, 3), exactly as written: ``M[i, j]`` is component
        ``i`` (x, y, z) of reciprocal vector ``j`` (a*, b*, c*) times the
        wavelength.  Divide by lambda in Angstrom to get Angstrom^-1
        (:func:`mosflm_reciprocal_vectors`).

    Raises
    ------
    MatrixFormatError
        A non-number before the ninth number, fewer than nine numbers, a
        non-finite value, or a singular matrix.
    """
    with open(path, "rb") as handle:  # bounded: a matrix file is a few lines (/dev/zero never ends)
        raw = handle.read(MATRIX_MAX_BYTES + 1)
    if len(raw) > MATRIX_MAX_BYTES:
        raise MatrixFormatError(path, None, "",
                                f"larger than the limit of {MATRIX_MAX_BYTES} bytes (not a matrix file?)")
    text = raw.decode("utf-8", errors="replace")
    numbers = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        pos = 0
        while len(numbers) < 9:
            while pos < len(line) and line[pos] in " \t\f\v":
                pos += 1
            if pos >= len(line):
                break
            match = _NUMBER.match(line, pos)
            if match is None:
                token = (line[pos:].split() or [line[pos:]])[0]  # e.g. a lone carriage return
                raise MatrixFormatError(
                    path, lineno, line,
                    f"expected a number (matrix element {len(numbers) + 1} of 9), found {token!r}",
                )
            value = float(match.group(0))
            if not math.isfinite(value):
                raise MatrixFormatError(path, lineno, line, f"non-finite value {match.group(0)!r}")
            numbers.append(value)
            pos = match.end()
            if pos < len(line) and line[pos] not in " \t\f\v+-":
                token = line[match.start():].split()[0]
                raise MatrixFormatError(path, lineno, line, f"not a number: {token!r}")
        if len(numbers) == 9:
            break
    if len(numbers) < 9:
        raise MatrixFormatError(
            path, None, "", f"found only {len(numbers)} of the 9 numbers of an orientation matrix"
        )
    matrix = np.array(numbers, dtype=np.float64).reshape(3, 3)
    det = float(np.linalg.det(matrix))
    if det == 0.0 or not math.isfinite(det):
        raise MatrixFormatError(path, None, "", "the 3x3 matrix is singular (determinant 0)")
    return matrix


def mosflm_reciprocal_vectors(
    matrix: np.ndarray, wavelength_A: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reciprocal-cell vectors from a MOSFLM ``A`` matrix, as the C program does.

    Parameters
    ----------
    matrix : numpy.ndarray
        (3, 3) from :func:`read_mosflm_matrix`.
    wavelength_A : float
        The nominal wavelength in Angstrom.

    Returns
    -------
    a_star : numpy.ndarray
        Shape (3,), Angstrom^-1, in the C lab frame: the first column of
        ``matrix`` divided by ``wavelength_A``.
    b_star : numpy.ndarray
        The same from the second column.
    c_star : numpy.ndarray
        The same from the third column.

    Raises
    ------
    ValueError
        If ``wavelength_A`` is not positive or ``matrix`` is not 3x3.
    """
    if not wavelength_A > 0.0:
        raise ValueError(f"wavelength must be positive, got {wavelength_A!r}")
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"matrix must be 3x3, got {m.shape}")
    # Same arithmetic as C: lambda in metres = A / 1e10, factor = 1e-10 / metres.
    lambda_m = float(wavelength_A) / 1.0e10
    scaled = (1e-10 / lambda_m) * m
    return scaled[:, 0].copy(), scaled[:, 1].copy(), scaled[:, 2].copy()
