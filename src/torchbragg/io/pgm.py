"""8-bit greymap previews, as the C program's ``-pgmfile`` writes them.

File layout (binary PGM, "P5")::

    P5\\n
    <fast> <slow>\\n
    # pixels scaled by <scale, %g>\\n
    255\\n
    <fast*slow bytes, row by row, fast index fastest>

Pixel bytes are ``min(pixel * scale, 255)`` truncated toward zero (C casts the
double to ``unsigned char``; negative values, undefined in C, are written as
0 here).

The default scale (``-pgmscale`` absent or <= 0) is ``250 / (5 * rmsd)``,
where ``rmsd`` is the sample standard deviation of all pixels
(``sqrt(sum((p - mean)^2) / (n - 1))``); if ``rmsd`` is 0 it falls back to
the ``-intfile`` scale (``-scale``, or ``55000 / max``, or 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from .atomic_io import atomic_write_bytes

__all__ = ["pgm_auto_scale", "pgm_bytes", "write_pgm", "read_pgm"]

PathLike = Union[str, "os.PathLike[str]"]


def pgm_auto_scale(image: np.ndarray, intfile_scale: float | None = None) -> float:
    """The C program's default ``-pgmscale``.

    Parameters
    ----------
    image : numpy.ndarray
        The float image.
    intfile_scale : float, optional
        The ``-intfile`` scale in use (the fallback when the image is flat);
        None or <= 0 means C's automatic one, ``55000 / max`` (1 if the
        maximum is not positive).

    Returns
    -------
    float
        ``250 / (5 * rmsd)``, or the fallback when ``rmsd`` is 0.
    """
    arr = np.asarray(image, dtype=np.float32).astype(np.float64).ravel()
    n = arr.size
    mean = float(arr.sum()) / max(n, 1)
    rmsd = float(np.sqrt(np.sum((arr - mean) ** 2) / (max(n, 2) - 1)))
    if rmsd > 0.0:
        return 250.0 / (5.0 * rmsd)
    if intfile_scale is not None and intfile_scale > 0.0:
        return float(intfile_scale)
    max_i = float(arr.max()) if n else 0.0
    return 55000.0 / max_i if max_i > 0.0 else 1.0


def pgm_bytes(image: np.ndarray, scale: float | None = None) -> tuple[bytes, float]:
    """Return the PGM file contents and the scale used.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float image ``(slow, fast)``.
    scale : float, optional
        ``-pgmscale``; None or <= 0 selects :func:`pgm_auto_scale`.

    Returns
    -------
    data : bytes
    scale : float
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"PGM image must be 2-D (slow, fast), got shape {arr.shape}")
    if scale is None or not scale > 0.0:
        scale = pgm_auto_scale(arr)
    scaled = arr.astype(np.float64) * float(scale)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    pixels = np.trunc(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    slow, fast = arr.shape
    header = f"P5\n{fast} {slow}\n# pixels scaled by {float(scale):g}\n255\n".encode("ascii")
    return header + pixels.tobytes(), float(scale)


def write_pgm(path: PathLike, image: np.ndarray, scale: float | None = None) -> float:
    """Write an 8-bit PGM preview like the C program's ``-pgmfile``, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination.
    image : numpy.ndarray
        2-D float image ``(slow, fast)``.
    scale : float, optional
        ``-pgmscale``; None or <= 0 selects :func:`pgm_auto_scale`.

    Returns
    -------
    float
        The scale used.
    """
    data, used = pgm_bytes(image, scale)
    atomic_write_bytes(path, data)
    return used


def read_pgm(path: PathLike) -> np.ndarray:
    """Read a binary (P5) 8-bit PGM, comments allowed.

    Parameters
    ----------
    path : str or os.PathLike
        The PGM file.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``(height, width)``.

    Raises
    ------
    ValueError
        Not a P5 file, a maximum value other than 1..255, or too few bytes.
    """
    data = Path(path).read_bytes()
    if not data.startswith(b"P5"):
        raise ValueError(f"{path}: not a binary PGM file (no 'P5' magic)")
    pos = 2
    values = []
    while len(values) < 3:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
            continue
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ValueError(f"{path}: malformed PGM header near byte {start}")
        values.append(int(data[start:pos]))
    width, height, maxval = values
    if not 1 <= maxval <= 255:
        raise ValueError(f"{path}: PGM maximum value {maxval} is not 8-bit")
    pos += 1  # the single white-space byte before the pixels
    pixels = data[pos : pos + width * height]
    if len(pixels) < width * height:
        raise ValueError(
            f"{path}: truncated PGM: {width}x{height} needs {width * height} bytes, "
            f"found {len(pixels)}"
        )
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width).copy()
