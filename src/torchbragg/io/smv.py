"""SMV (ADSC-style) image files, as written by the C program's ``-intfile``.

Layout of an SMV file
---------------------
A text header followed directly by the raw pixel array.

* The header starts with ``{`` and a newline, then ``KEY=VALUE;`` entries,
  one per line, then ``}``.  The header block is ``HEADER_BYTES`` long
  (512 for every file the C program writes); after the closing ``}`` the C
  program writes a form feed (``\\f``) and pads with spaces up to that size.
* ``SIZE1`` is the fast (column) dimension, ``SIZE2`` the slow (row)
  dimension; the pixels follow row by row, fast index varying fastest, so the
  array is ``(SIZE2, SIZE1)`` = ``(slow, fast)``.
* ``TYPE`` is the pixel type (``unsigned_short`` for the C program) and
  ``BYTE_ORDER`` is ``little_endian`` or ``big_endian`` (the writer's native
  order).

Header written by the C program (``-intfile`` and ``-noisefile``)
------------------------------------------------------------------
In this exact order, numbers printed with C's ``%g`` (six significant
digits, trailing zeros dropped); lengths in mm, angles in degrees::

    {
    HEADER_BYTES=512;
    DIM=2;
    BYTE_ORDER=little_endian;
    TYPE=unsigned_short;
    SIZE1=<fast pixels>;
    SIZE2=<slow pixels>;
    PIXEL_SIZE=<pixel size>;
    DISTANCE=<distance along the beam to the detector plane>;
    WAVELENGTH=<lambda0 in Angstrom>;
    BEAM_CENTER_X=<Xbeam>;
    BEAM_CENTER_Y=<Ybeam>;
    ADXV_CENTER_X=<Fbeam>;
    ADXV_CENTER_Y=<detsize_s - Sbeam>;
    MOSFLM_CENTER_X=<Sbeam - pixel/2>;
    MOSFLM_CENTER_Y=<Fbeam - pixel/2>;
    DENZO_X_BEAM=<Sbeam>;
    DENZO_Y_BEAM=<Fbeam>;
    DIALS_ORIGIN=<x>,<y>,<z>
    XDS_ORGX=<ORGX pixels>;
    XDS_ORGY=<ORGY pixels>;
    CLOSE_DISTANCE=<close distance>;
    PHI=<phi start>;
    OSC_START=<phi start>;
    OSC_RANGE=<osc>;
    TWOTHETA=<detector two-theta>;
    DETECTOR_SN=000;
    BEAMLINE=fake;
    }

followed by ``\\f`` and spaces up to byte 512.  Note that ``DIALS_ORIGIN``
has no terminating semicolon (reproduced here).  ``Xbeam``/``Ybeam`` are the
beam centre in the selected convention as given or defaulted (not updated
for detector rotations); ``Fbeam``/``Sbeam`` are where the direct beam meets
the (rotated) detector, along the fast/slow axes from the first pixel's
corner; ``ORGX``/``ORGY`` are ``Fclose/pixel + 0.5`` and ``Sclose/pixel +
0.5``.  There is no ADC-offset key.

Pixel values (``-intfile``)
---------------------------
``value = float_pixel * scale + adc_offset``, clipped to ``[0, 65535]``,
then rounded as ``floorf(value + 0.5)`` -- the sum is converted to single
precision *before* the floor, which can round a value just below ``n + 0.5``
up.  ``scale`` is ``-scale`` if given and positive, otherwise ``55000 /
max_pixel`` (1 if the image maximum is not positive); ``adc_offset`` is
``-adc`` (default 40).  See :func:`to_intimage`.  (The ``-noisefile`` image
instead adds ``adc_offset`` to the Poisson draw, clips only above 65535 and
truncates.)

Reading
-------
:func:`read_smv` accepts any ``HEADER_BYTES`` and the types in
:data:`SMV_TYPES`.  A duplicated key keeps its last value, as the C program's
header lookup does.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np

from .atomic_io import atomic_write_bytes

__all__ = [
    "SMVFormatError",
    "read_smv",
    "read_smv_header",
    "read_smv_header_text",
    "write_smv",
    "smv_header_fields",
    "c_beam_centers_mm",
    "intfile_auto_scale",
    "to_intimage",
]

PathLike = Union[str, "os.PathLike[str]"]

#: SMV ``TYPE`` names and their numpy element types (byte order applied later).
SMV_TYPES: dict[str, str] = {
    "unsigned_short": "u2",
    "signed_short": "i2",
    "short": "i2",
    "unsigned_int": "u4",
    "unsigned_long": "u4",
    "signed_int": "i4",
    "int": "i4",
    "signed_long": "i4",
    "long": "i4",
    "float": "f4",
    "double": "f8",
}

_WRITE_TYPES = {
    np.dtype(np.uint16): "unsigned_short",
    np.dtype(np.uint32): "unsigned_int",
    np.dtype(np.int32): "signed_int",
    np.dtype(np.float32): "float",
}

#: Keys the writer derives from the image; callers need not supply them.
STRUCTURAL_KEYS = ("HEADER_BYTES", "DIM", "BYTE_ORDER", "TYPE", "SIZE1", "SIZE2")

#: Keys the C program writes without the trailing semicolon.
NO_SEMICOLON_KEYS = frozenset({"DIALS_ORIGIN"})

_BLOCK = 512
#: largest SMV header read (bytes); nanoBragg writes 512, detectors a few KiB
HEADER_MAX_BYTES = 1 << 20


class SMVFormatError(ValueError):
    """A file that is not a readable SMV image; the message names the file."""


def _g(value: float) -> str:
    """Format like C's ``%g``."""
    return f"{float(value):g}"


def _header_block(path: PathLike) -> tuple[str, int, int]:
    """Return ``(header_text, header_bytes, file_size)`` for an SMV file."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as handle:
        first = handle.read(_BLOCK)
        if not first.startswith(b"{"):
            raise SMVFormatError(f"{p}: not an SMV file (does not start with '{{')")
        match = re.search(rb"HEADER_BYTES\s*=\s*([0-9]+)", first)
        if match is None:
            raise SMVFormatError(f"{p}: not an SMV file (no HEADER_BYTES in the first {_BLOCK} bytes)")
        header_bytes = int(match.group(1))
        if header_bytes <= 0:
            raise SMVFormatError(f"{p}: invalid HEADER_BYTES={header_bytes}")
        if header_bytes > HEADER_MAX_BYTES:
            raise SMVFormatError(f"{p}: HEADER_BYTES={header_bytes} is above the limit of {HEADER_MAX_BYTES} "
                                 f"bytes for an SMV header")
        if size < header_bytes:
            raise SMVFormatError(
                f"{p}: truncated SMV file: {size} bytes, shorter than its "
                f"HEADER_BYTES={header_bytes}"
            )
        handle.seek(0)
        block = handle.read(header_bytes)
    end = block.find(b"}")
    if end < 0:
        raise SMVFormatError(f"{p}: SMV header has no closing '}}' within HEADER_BYTES={header_bytes}")
    return block[1:end].decode("latin-1"), header_bytes, size


def _parse_header(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        for part in line.split(";"):
            part = part.strip()
            if not part or "=" not in part:
                continue
            key, value = part.split("=", 1)
            key = key.strip()
            if key:
                fields.pop(key, None)  # last one wins; keep file order of the last
                fields[key] = value.strip()
    return fields


def read_smv_header(path: PathLike) -> dict[str, str]:
    """Read the ``KEY=VALUE`` header of an SMV file.

    Parameters
    ----------
    path : str or os.PathLike
        The SMV file.

    Returns
    -------
    dict of str to str
        Keys and values as text, in file order (a repeated key keeps its
        last value).

    Raises
    ------
    SMVFormatError
        Not an SMV file, or a file shorter than its header.
    """
    text, _, _ = _header_block(path)
    return _parse_header(text)


def read_smv_header_text(path: PathLike) -> str:
    """The raw header text between ``{`` and ``}`` (for C's substring look-ups).

    Parameters
    ----------
    path : str or os.PathLike
        The SMV file.

    Returns
    -------
    str
        The header block's text after the opening ``{`` and before the first ``}``, decoded as Latin-1.

    Raises
    ------
    SMVFormatError
        Not an SMV file, or a file shorter than its header.
    """
    return _header_block(path)[0]


def _int_field(path: PathLike, header: Mapping[str, str], key: str) -> int:
    if key not in header:
        raise SMVFormatError(f"{path}: SMV header has no {key}")
    try:
        value = int(header[key])
    except ValueError:
        raise SMVFormatError(f"{path}: SMV header {key}={header[key]!r} is not an integer") from None
    if value <= 0:
        raise SMVFormatError(f"{path}: SMV header {key}={value} must be positive")
    return value


def read_smv(path: PathLike) -> tuple[dict[str, str], np.ndarray]:
    """Read an SMV image.

    Parameters
    ----------
    path : str or os.PathLike
        The SMV file.

    Returns
    -------
    header : dict of str to str
        The header fields (see :func:`read_smv_header`).
    image : numpy.ndarray
        Shape ``(SIZE2, SIZE1)`` = ``(slow, fast)``, native byte order, dtype
        from ``TYPE`` (``uint16`` for ``unsigned_short``).

    Raises
    ------
    SMVFormatError
        Not an SMV file, missing or invalid SIZE1/SIZE2/TYPE/BYTE_ORDER/DIM,
        or fewer pixel bytes than the header promises.  Extra trailing bytes
        are ignored.
    """
    text, header_bytes, size = _header_block(path)
    header = _parse_header(text)
    if "DIM" in header and header["DIM"].strip() != "2":
        raise SMVFormatError(f"{path}: SMV DIM={header['DIM']!r}; only 2-D images are supported")
    fast = _int_field(path, header, "SIZE1")
    slow = _int_field(path, header, "SIZE2")
    type_name = header.get("TYPE", "unsigned_short")
    if type_name not in SMV_TYPES:
        raise SMVFormatError(
            f"{path}: unsupported SMV TYPE={type_name!r} (known: {', '.join(SMV_TYPES)})"
        )
    dtype = np.dtype(SMV_TYPES[type_name])
    if dtype.itemsize > 1:
        order = header.get("BYTE_ORDER")
        if order == "little_endian":
            dtype = dtype.newbyteorder("<")
        elif order == "big_endian":
            dtype = dtype.newbyteorder(">")
        else:
            raise SMVFormatError(
                f"{path}: SMV BYTE_ORDER={order!r}; expected little_endian or big_endian"
            )
    needed = fast * slow * dtype.itemsize
    available = size - header_bytes
    if available < needed:
        raise SMVFormatError(
            f"{path}: truncated SMV data: {fast}x{slow} {type_name} pixels need {needed} "
            f"bytes after the {header_bytes}-byte header, found {available}"
        )
    with open(path, "rb") as handle:
        handle.seek(header_bytes)
        data = handle.read(needed)
    image = np.frombuffer(data, dtype=dtype).reshape(slow, fast)
    return header, image.astype(dtype.newbyteorder("="), copy=True)


def _format_value(key: str, value: object) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        raise TypeError(f"SMV header {key}: booleans are not header values")
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = _g(value)
    elif isinstance(value, (tuple, list, np.ndarray)):
        text = ",".join(_format_value(key, v) for v in value)
    else:
        raise TypeError(f"SMV header {key}: cannot format {type(value).__name__} value")
    if any(c in text for c in ";\n\r{}"):
        raise ValueError(f"SMV header {key}={text!r}: value may not contain ; newline or braces")
    return text


def write_smv(
    path: PathLike,
    image: np.ndarray,
    header_fields: Mapping[str, object],
    *,
    byte_order: str = "little_endian",
) -> Path:
    """Write an SMV image with the C program's header layout, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (replaced atomically if it exists).
    image : numpy.ndarray
        2-D array ``(slow, fast)`` of ``uint16`` (the C program's type; see
        :func:`to_intimage`), or ``uint32``, ``int32``, ``float32``.
    header_fields : mapping
        Header entries after the structural ones, written in the given order
        (e.g. from :func:`smv_header_fields`).  Values may be text, int,
        float (formatted like C's ``%g``) or a sequence (comma-joined).
        ``HEADER_BYTES``, ``DIM``, ``BYTE_ORDER``, ``TYPE``, ``SIZE1`` and
        ``SIZE2`` are derived from the image; if given they must agree.
    byte_order : {"little_endian", "big_endian"}, optional
        Byte order of the pixel data.

    Returns
    -------
    pathlib.Path
        The destination path.

    Raises
    ------
    TypeError
        Unsupported image dtype.
    ValueError
        Not 2-D, a structural key that disagrees with the image, or a key or
        value that cannot be written.

    Notes
    -----
    The header is ``{\\n``, the entries (``KEY=VALUE;\\n``; ``DIALS_ORIGIN``
    without the semicolon, as in C), ``}\\f``, then spaces up to 512 bytes --
    or up to the next multiple of 512 if the text is longer, with
    ``HEADER_BYTES`` set to match.
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{path}: SMV image must be 2-D (slow, fast), got shape {arr.shape}")
    native = arr.dtype.newbyteorder("=")
    if native not in _WRITE_TYPES:
        raise TypeError(
            f"{path}: cannot write {arr.dtype} pixels to SMV; use uint16 "
            f"(see to_intimage), uint32, int32 or float32"
        )
    type_name = _WRITE_TYPES[native]
    if byte_order == "little_endian":
        out_dtype = native.newbyteorder("<")
    elif byte_order == "big_endian":
        out_dtype = native.newbyteorder(">")
    else:
        raise ValueError(f"byte_order must be 'little_endian' or 'big_endian', not {byte_order!r}")
    slow, fast = arr.shape

    derived = {
        "DIM": "2",
        "BYTE_ORDER": byte_order,
        "TYPE": type_name,
        "SIZE1": str(fast),
        "SIZE2": str(slow),
    }
    body = []
    for key, value in header_fields.items():
        if not isinstance(key, str) or not key or any(c in key for c in "=;\n\r{} \t"):
            raise ValueError(f"{path}: invalid SMV header key {key!r}")
        text = _format_value(key, value)
        if key == "HEADER_BYTES":
            continue  # recomputed below
        if key in derived:
            if text != derived[key]:
                raise ValueError(
                    f"{path}: header {key}={text!r} disagrees with the image ({derived[key]!r})"
                )
            continue
        end = "\n" if key in NO_SEMICOLON_KEYS else ";\n"
        body.append(f"{key}={text}{end}")

    rest = (
        f"DIM=2;\nBYTE_ORDER={byte_order};\nTYPE={type_name};\n"
        f"SIZE1={fast};\nSIZE2={slow};\n" + "".join(body) + "}\f"
    )
    header_bytes = _BLOCK
    while True:
        text = f"{{\nHEADER_BYTES={header_bytes};\n" + rest
        encoded = text.encode("ascii")
        if len(encoded) <= header_bytes:
            break
        header_bytes = _BLOCK * math.ceil(len(encoded) / _BLOCK)
    header = encoded + b" " * (header_bytes - len(encoded))
    return atomic_write_bytes(path, header + arr.astype(out_dtype, copy=False).tobytes())


def c_beam_centers_mm(
    *, fbeam_mm: float, sbeam_mm: float, detsize_s_mm: float, pixel_size_mm: float
) -> dict[str, tuple[float, float]]:
    """Convention-specific beam centres the C program derives from Fbeam/Sbeam.

    Parameters
    ----------
    fbeam_mm : float
        Direct-beam position on the detector along the fast axis, measured
        from the outer corner of the first pixel (C ``Fbeam`` after the
        detector is placed), in mm.
    sbeam_mm : float
        The same along the slow axis (C ``Sbeam``), in mm.
    detsize_s_mm : float
        Detector size along the slow axis (slow pixels x pixel size), mm.
    pixel_size_mm : float
        Pixel size, mm.

    Returns
    -------
    dict
        ``adxv_center_mm = (Fbeam, detsize_s - Sbeam)``,
        ``mosflm_center_mm = (Sbeam - pixel/2, Fbeam - pixel/2)``,
        ``denzo_beam_mm = (Sbeam, Fbeam)``; pass it on to
        :func:`smv_header_fields` with ``**``.
    """
    return {
        "adxv_center_mm": (fbeam_mm, detsize_s_mm - sbeam_mm),
        "mosflm_center_mm": (sbeam_mm - 0.5 * pixel_size_mm, fbeam_mm - 0.5 * pixel_size_mm),
        "denzo_beam_mm": (sbeam_mm, fbeam_mm),
    }


def smv_header_fields(
    *,
    pixel_size_mm: float,
    distance_mm: float,
    wavelength_A: float,
    beam_center_x_mm: float,
    beam_center_y_mm: float,
    adxv_center_mm: Sequence[float],
    mosflm_center_mm: Sequence[float],
    denzo_beam_mm: Sequence[float],
    dials_origin_mm: Sequence[float],
    xds_org_px: Sequence[float],
    close_distance_mm: float,
    phi_deg: float = 0.0,
    osc_range_deg: float = 0.0,
    twotheta_deg: float = 0.0,
    osc_start_deg: float | None = None,
    detector_sn: str = "000",
    beamline: str = "fake",
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """Build the header entries the C program writes after ``SIZE2``.

    Parameters
    ----------
    pixel_size_mm : float
        ``PIXEL_SIZE``, mm.
    distance_mm : float
        ``DISTANCE``: sample to detector plane along the beam, mm.
    wavelength_A : float
        ``WAVELENGTH``: the nominal wavelength (``-lambda``), Angstrom.
    beam_center_x_mm : float
        ``BEAM_CENTER_X``: C ``Xbeam``, mm.
    beam_center_y_mm : float
        ``BEAM_CENTER_Y``: C ``Ybeam``, mm.
    adxv_center_mm : pair of float
        ``ADXV_CENTER_X`` / ``ADXV_CENTER_Y``, mm; see :func:`c_beam_centers_mm`
        for how C derives it and the next two.
    mosflm_center_mm : pair of float
        ``MOSFLM_CENTER_X`` / ``MOSFLM_CENTER_Y``, mm.
    denzo_beam_mm : pair of float
        ``DENZO_X_BEAM`` / ``DENZO_Y_BEAM``, mm.
    dials_origin_mm : three floats
        ``DIALS_ORIGIN``: the first pixel's corner projected on the DIALS
        lab axes (+z, +y, -x of the C frame), mm.
    xds_org_px : pair of float
        ``XDS_ORGX`` / ``XDS_ORGY``, pixels.
    close_distance_mm : float
        ``CLOSE_DISTANCE``: perpendicular sample-detector distance, mm.
    phi_deg : float, optional
        ``PHI``, the start of the rotation, degrees.
    osc_range_deg : float, optional
        ``OSC_RANGE``, degrees.
    twotheta_deg : float, optional
        ``TWOTHETA``, degrees.
    osc_start_deg : float, optional
        ``OSC_START``, degrees; C always writes ``phi`` here (the default).
    detector_sn : str, optional
        ``DETECTOR_SN``, a fixed text (``000`` in C).
    beamline : str, optional
        ``BEAMLINE``, a fixed text (``fake`` in C).
    extra : mapping, optional
        More entries appended at the end (not written by C).

    Returns
    -------
    dict of str to str
        Ordered entries, numbers formatted like C's ``%g``, ready for
        :func:`write_smv`.
    """

    def pair(name: str, value: Sequence[float], n: int = 2) -> tuple[float, ...]:
        values = tuple(float(v) for v in value)
        if len(values) != n:
            raise ValueError(f"{name} needs {n} values, got {len(values)}")
        return values

    ax, ay = pair("adxv_center_mm", adxv_center_mm)
    mx, my = pair("mosflm_center_mm", mosflm_center_mm)
    dx, dy = pair("denzo_beam_mm", denzo_beam_mm)
    ox, oy, oz = pair("dials_origin_mm", dials_origin_mm, 3)
    orgx, orgy = pair("xds_org_px", xds_org_px)
    start = phi_deg if osc_start_deg is None else osc_start_deg
    fields = {
        "PIXEL_SIZE": _g(pixel_size_mm),
        "DISTANCE": _g(distance_mm),
        "WAVELENGTH": _g(wavelength_A),
        "BEAM_CENTER_X": _g(beam_center_x_mm),
        "BEAM_CENTER_Y": _g(beam_center_y_mm),
        "ADXV_CENTER_X": _g(ax),
        "ADXV_CENTER_Y": _g(ay),
        "MOSFLM_CENTER_X": _g(mx),
        "MOSFLM_CENTER_Y": _g(my),
        "DENZO_X_BEAM": _g(dx),
        "DENZO_Y_BEAM": _g(dy),
        "DIALS_ORIGIN": f"{_g(ox)},{_g(oy)},{_g(oz)}",
        "XDS_ORGX": _g(orgx),
        "XDS_ORGY": _g(orgy),
        "CLOSE_DISTANCE": _g(close_distance_mm),
        "PHI": _g(phi_deg),
        "OSC_START": _g(start),
        "OSC_RANGE": _g(osc_range_deg),
        "TWOTHETA": _g(twotheta_deg),
        "DETECTOR_SN": str(detector_sn),
        "BEAMLINE": str(beamline),
    }
    if extra:
        for key, value in extra.items():
            fields[key] = _format_value(key, value)
    return fields


def intfile_auto_scale(image: np.ndarray) -> float:
    """The C program's automatic ``-intfile`` scale, ``55000 / max``.

    Parameters
    ----------
    image : numpy.ndarray
        The float image.

    Returns
    -------
    float
        ``55000 / max(image)`` when the maximum is positive, else 1.0
        (NaN pixels are ignored, as C's ``>`` comparison skips them).
    """
    arr = np.asarray(image, dtype=np.float32)
    finite = arr[~np.isnan(arr)]
    max_i = float(finite.max()) if finite.size else 0.0
    return 55000.0 / max_i if max_i > 0.0 else 1.0


def to_intimage(
    image: np.ndarray, scale: float | None = None, adc_offset: float = 40.0
) -> tuple[np.ndarray, float]:
    """Convert a float image to the C program's ``-intfile`` pixels.

    Parameters
    ----------
    image : numpy.ndarray
        The float image (used as float32, like C's ``floatimage``).
    scale : float, optional
        ``-scale``; None or <= 0 selects :func:`intfile_auto_scale`.
    adc_offset : float, optional
        ``-adc``, 40 by default.

    Returns
    -------
    pixels : numpy.ndarray
        ``uint16``, same shape.
    scale : float
        The scale used.

    Notes
    -----
    Per pixel: ``t = pixel * scale + adc_offset`` in double precision,
    clipped to ``[0, 65535]``, then ``floor(float32(t + 0.5))`` -- C's
    ``floorf`` converts to single precision before flooring.  NaN pixels
    become 0.
    """
    arr = np.asarray(image, dtype=np.float32)
    if scale is None or not scale > 0.0:
        scale = intfile_auto_scale(arr)
    test = arr.astype(np.float64) * float(scale) + float(adc_offset)
    test = np.clip(test, 0.0, 65535.0)
    rounded = np.floor((test + 0.5).astype(np.float32))
    rounded = np.where(np.isnan(rounded), 0.0, np.minimum(rounded, 65535.0))
    return rounded.astype(np.uint16), float(scale)
