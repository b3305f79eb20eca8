"""Reading detector images for comparison: SMV files and raw float32 files.

* ``.smv`` / ``.img``: SMV files (:func:`torchbragg.io.smv.read_smv`);
* ``.bin`` / ``.f32`` / ``.raw``: raw little-endian float32, no header, fast
  index fastest.  The shape comes from, in order: the ``shape`` argument
  (``--shape SLOW FAST``), a sidecar ``<file>.json`` holding
  ``{"shape": [slow, fast]}``, the reference image's shape (for the second
  image of a comparison), or the square root of the pixel count when it is a
  perfect square (reported as a guess).  Anything else is an error.

:func:`load_image_photons` also turns SMV counts into photons. The suffixes
here are the only list of them: the command line and the inspector use these.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np

from .smv import read_smv, read_smv_header

__all__ = ["SMV_SUFFIXES", "RAW_SUFFIXES", "IMAGE_SUFFIXES", "load_image", "load_image_info", "load_image_photons"]

PathLike = Union[str, "os.PathLike[str]"]

#: SMV image suffixes
SMV_SUFFIXES = (".smv", ".img")
#: raw float32 image suffixes
RAW_SUFFIXES = (".bin", ".f32", ".raw")
#: every image suffix :func:`load_image_info` reads
IMAGE_SUFFIXES = SMV_SUFFIXES + RAW_SUFFIXES


def _sidecar_shape(path: Path) -> tuple[int, int] | None:
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        shape = meta["shape"]
        if len(shape) != 2:
            raise ValueError
        slow, fast = (int(n) for n in shape)
        if slow <= 0 or fast <= 0 or slow != shape[0] or fast != shape[1]:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{sidecar}: expected JSON like {{\"shape\": [slow, fast]}} with positive integers"
        ) from None
    return slow, fast


def load_image_info(
    path: PathLike,
    shape: Sequence[int] | None = None,
    *,
    fallback_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, str]:
    """Load an image and say where its shape came from.

    Parameters
    ----------
    path : str or os.PathLike
        ``.smv``/``.img`` (SMV) or ``.bin``/``.f32``/``.raw`` (raw float32).
    shape : (slow, fast), optional
        Shape of a raw file; ignored for SMV files except as a check.
    fallback_shape : (slow, fast), optional
        Tried after the sidecar and before the perfect-square guess (used for
        the second image of a comparison: the reference's shape).

    Returns
    -------
    image : numpy.ndarray
        2-D ``(slow, fast)``: the stored dtype (float32 for raw files).
    note : str
        How the shape was found, e.g. ``"SMV header"``, ``"--shape"``,
        ``"sidecar img.f32.json"``, ``"guessed square 512x512"``.

    Raises
    ------
    ValueError
        Unknown extension, a raw file whose size is not a whole number of
        float32 values or does not match the shape, no way to determine the
        shape, or an unreadable SMV file (message names the file).
    FileNotFoundError
        The file does not exist.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SMV_SUFFIXES:
        _, image = read_smv(p)
        if shape is not None and tuple(image.shape) != tuple(int(n) for n in shape):
            raise ValueError(f"{p}: SMV image is {image.shape[0]}x{image.shape[1]}, not {shape[0]}x{shape[1]}")
        return image, "SMV header"
    if suffix not in RAW_SUFFIXES:
        raise ValueError(
            f"{p}: unknown image type {suffix or '(no extension)'!r}; expected "
            f"{', '.join(SMV_SUFFIXES + RAW_SUFFIXES)}"
        )
    size = p.stat().st_size
    if size % 4:
        raise ValueError(f"{p}: {size} bytes is not a whole number of float32 values")
    n = size // 4
    if n == 0:
        raise ValueError(f"{p}: empty file")
    if shape is not None:
        target = tuple(int(x) for x in shape)
        note = "--shape"
    else:
        target = _sidecar_shape(p)
        note = f"sidecar {p.name}.json"
        if target is None and fallback_shape is not None:
            fb = tuple(int(x) for x in fallback_shape)
            if fb[0] * fb[1] != n:
                raise ValueError(
                    f"{p}: {n} float32 values ({size} bytes) do not fit the reference "
                    f"image's {fb[0]}x{fb[1]} = {fb[0] * fb[1]} pixels"
                )
            target, note = fb, "reference image's shape"
        if target is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(
                    f"{p}: cannot tell the shape of {n} float32 values ({size} bytes): not a "
                    f"perfect square; give --shape SLOW FAST or a {p.name}.json sidecar"
                )
            target, note = (side, side), f"guessed square {side}x{side} from the file size"
    if len(target) != 2 or min(target) <= 0:
        raise ValueError(f"{p}: shape must be two positive integers, got {target}")
    if target[0] * target[1] != n:
        raise ValueError(
            f"{p}: {n} float32 values ({size} bytes) do not fit shape "
            f"{target[0]}x{target[1]} = {target[0] * target[1]} pixels ({note})"
        )
    image = np.fromfile(p, dtype="<f4").reshape(target).astype(np.float32, copy=False)
    return image, note


def load_image(path: PathLike, shape: Sequence[int] | None = None) -> np.ndarray:
    """Load an SMV or raw float32 image (see :func:`load_image_info`).

    Parameters
    ----------
    path : str or os.PathLike
        ``.smv``/``.img`` (SMV) or ``.bin``/``.f32``/``.raw`` (raw float32).
    shape : (slow, fast), optional
        Shape of a raw file in pixels; for SMV files only checked against the header.

    Returns
    -------
    numpy.ndarray
        2-D ``(slow, fast)``, in the stored dtype (float32 for raw files).
    """
    return load_image_info(path, shape)[0]


def _log_scale(path: Path) -> tuple[float | None, str]:
    """Scale of an SMV image from the nanoBragg/torchbragg log saved beside it (``log.txt``, ``<name>.log``)."""
    import re

    for log in (path.with_name(path.name + ".log"), path.with_suffix(".log"), path.with_name("log.txt")):
        if not log.is_file():
            continue
        prev = ""
        for line in log.read_text(errors="replace").splitlines():
            line = line.strip()
            if line == f"writing {path.name} as 2-byte integers":
                m = re.match(r"intfile_scale = (\S+)$", prev)
                if m:
                    return float(m.group(1)), f"intfile_scale from {log.name}"
                if re.match(r"\S+ photons on noise image", prev):
                    return 1.0, f"noise image (scale 1) per {log.name}"
            if line:
                prev = line
    return None, ""


def load_image_photons(path: PathLike, shape: Sequence[int] | None = None, *, scale: float | None = None,
                       adc: float | None = None, fallback_shape: Sequence[int] | None = None
                       ) -> tuple[np.ndarray, dict]:
    """Load an image in photons: SMV counts become ``(count - adc) / scale``.

    nanoBragg writes ``count = photons * scale + adc`` and puts neither number in
    the header.  The scale comes from ``scale``, a header key ``SCALE`` /
    ``INTFILE_SCALE``, or the program's log beside the file (``log.txt`` or
    ``<file>.log``: the ``intfile_scale = X`` line before ``writing <file>``); the
    ADC offset from ``adc``, a header key ``ADC_OFFSET``/``ADC``, else nanoBragg's
    default 40.  Count 0 (outside ``-roi``) is 0 photons.

    Parameters
    ----------
    path : str or os.PathLike
        ``.smv``/``.img`` (SMV) or ``.bin``/``.f32``/``.raw`` (raw float32, already in photons).
    shape : (slow, fast), optional
        Shape of a raw file in pixels (see :func:`load_image_info`).
    scale : float, optional
        SMV counts per photon; overrides the header and the log.
    adc : float, optional
        SMV ADC offset in counts; overrides the header (default 40).
    fallback_shape : (slow, fast), optional
        Shape tried for a raw file after its sidecar (see :func:`load_image_info`).

    Returns
    -------
    image : numpy.ndarray
        float64 ``[slow, fast]`` (raw float images unchanged, as float64).
    info : dict
        ``converted`` (bool), ``scale``, ``adc``, ``note`` (how), ``warning``
        (a sentence naming the file when the counts were NOT converted, else None),
        ``shape_from``.
    """
    p = Path(path)
    image, shape_note = load_image_info(p, shape, fallback_shape=fallback_shape)
    info = {"converted": False, "scale": None, "adc": None, "note": "float image (photons)", "warning": None,
            "shape_from": shape_note}
    if p.suffix.lower() not in SMV_SUFFIXES:
        return image.astype(np.float64), info
    header = {k.upper(): v for k, v in read_smv_header(p).items()}
    how = []
    if scale is None:
        for key in ("SCALE", "INTFILE_SCALE"):
            if key in header:
                scale, src = float(header[key]), f"header {key}"
                break
        else:
            scale, src = _log_scale(p)
        how.append(src)
    else:
        how.append("scale given")
    if adc is None:
        for key in ("ADC_OFFSET", "ADC"):
            if key in header:
                adc = float(header[key])
                how.append(f"ADC from header {key}")
                break
        else:
            adc = 40.0
            how.append("ADC 40 (nanoBragg default)")
    counts = image.astype(np.float64)
    if scale is None or not scale > 0:
        info["warning"] = (f"{p}: SMV counts NOT converted to photons: no scale in the header or a log beside "
                           f"it (give --smv-scale); sums and maxima are in raw counts")
        info["note"] = "raw SMV counts"
        return counts, info
    photons = np.where(counts == 0, 0.0, (counts - adc) / scale)
    info.update(converted=True, scale=float(scale), adc=float(adc), note="photons = (count - adc) / scale: "
                + ", ".join(how))
    if np.any((counts > 0) & (counts < adc)):
        info["warning"] = f"{p}: counts below the ADC offset {adc:g}: the offset is probably wrong (give --smv-adc)"
    return photons, info
