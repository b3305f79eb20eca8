"""File formats used by the plugin's readers and writer (no Qt).

Images are decoded by the engine (``torchbragg.io.smv.read_smv``,
``torchbragg.io.images.load_image_info``); this module only decides which one to call
and where the shape of a headerless float image comes from.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _engine

__all__ = [
    "image_suffixes", "ImageFormatError", "check_image_path", "read_image", "tap_pixel", "tap_rows", "hkl_label",
    "is_tap_document", "load_tap_documents", "taps_to_points", "exclusive_write_json", "unique_path",
    "header_geometry_args",
]


def image_suffixes() -> tuple[str, ...]:
    """Suffixes of the images the engine reads (SMV, then raw float).

    Returns
    -------
    tuple of str
        Lower-case suffixes with their dot, e.g. ``".img"``.
    """
    smv, raw = _engine.image_suffixes()
    return smv + raw


class ImageFormatError(ValueError):
    """A file that cannot be turned into an image (with a message for people)."""


# --------------------------------------------------------------------------- images
def check_image_path(path: str | Path) -> Path:
    """The path of an existing file with an image suffix the engine reads, else an
    :class:`ImageFormatError` that names it (nothing is read).

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    ImageFormatError
        The file does not exist, or its suffix (case-insensitive) is not one of :func:`image_suffixes`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageFormatError(f"{path}: no such file")
    smv, raw = _engine.image_suffixes()
    if path.suffix.lower() not in smv + raw:
        raise ImageFormatError(f"{path.name}: not a diffraction image (expected {', '.join(smv + raw)})")
    return path


def read_image(path: str | Path, shape: tuple[int, int] | None = None,
               fallback_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Read an SMV (.img/.smv) or raw float32 (.bin/.f32) image with the engine.

    A raw file's shape comes from ``shape``, its ``<name>.json`` sidecar
    (``{"shape": [slow, fast]}``), ``fallback_shape``, or a perfect square;
    anything else is an :class:`ImageFormatError` that names the file.
    Returns (float32 array [slow, fast], metadata).

    Parameters
    ----------
    path : str or Path
        The image file.
    shape : (int, int), optional
        (slow, fast) of a raw file.
    fallback_shape : (int, int), optional
        Shape tried for a raw file after its sidecar.

    Returns
    -------
    data : numpy.ndarray
        float32 ``[slow, fast]``.
    meta : dict
        ``path``, ``shape_from`` (how the shape was found) and, for an SMV file whose header could be
        read, ``header`` (keys and values as str).

    Raises
    ------
    ImageFormatError
        Missing file, unknown suffix, an error of the engine's reader, or data that are not 2-D.
    """
    path = check_image_path(path)
    smv, _raw = _engine.image_suffixes()
    try:
        data, note = _engine.load_image_info(path, shape, fallback_shape)
    except (ValueError, OSError) as exc:
        raise ImageFormatError(str(exc)) from None
    meta: dict[str, Any] = {"path": str(path), "shape_from": note}
    if path.suffix.lower() in smv:
        try:
            header, _ = _engine.read_smv(path)
            meta["header"] = {str(k): str(v) for k, v in header.items()}
        except Exception:  # header is a nicety; the image was read
            pass
    if data.ndim != 2:
        raise ImageFormatError(f"{path.name}: expected a 2-D image, got shape {data.shape}")
    return data, meta


# --------------------------------------------------------------------------- taps
def tap_pixel(d: Mapping[str, Any]) -> tuple[int, int]:
    """(slow, fast) of a tap JSON document.

    Looks at ``pixel`` (a mapping with ``slow``/``fast`` or a pair), then ``pixel_coords``,
    ``pixel_slow_fast``, ``slow_fast``, then top-level ``slow`` and ``fast``.

    Parameters
    ----------
    d : mapping
        The tap document.

    Returns
    -------
    (int, int)
        The pixel.

    Raises
    ------
    ValueError
        The document names no pixel.
    """
    px = d.get("pixel")
    if isinstance(px, Mapping) and "slow" in px and "fast" in px:
        return int(px["slow"]), int(px["fast"])
    if isinstance(px, Sequence) and not isinstance(px, str) and len(px) == 2:
        return int(px[0]), int(px[1])
    for key in ("pixel_coords", "pixel_slow_fast", "slow_fast"):
        if key in d:
            return int(d[key][0]), int(d[key][1])
    if "slow" in d and "fast" in d:
        return int(d["slow"]), int(d["fast"])
    raise ValueError("tap JSON has no pixel (slow, fast)")


def _normalise_row(r: Mapping[str, Any]) -> dict:
    """A tap-JSON subpixel record (``hkl_rounded`` …) as a flat row (``h0`` …)."""
    row = dict(r)
    if "hkl_rounded" in r and "h0" not in r:
        row["h0"], row["k0"], row["l0"] = (int(x) for x in r["hkl_rounded"])
    if "hkl_fractional" in r and "h" not in r:
        row["h"], row["k"], row["l"] = (float(x) for x in r["hkl_fractional"])
    if "subpixel_index" in r and "subS" not in r:
        row["subS"], row["subF"] = (int(x) for x in r["subpixel_index"])
    return row


def tap_rows(d: Mapping[str, Any]) -> list[dict]:
    """The per-evaluation rows of a tap document (``values.subpixels`` in
    specs/tap_schema.json), flattened to the keys of ``PixelTap.rows``.

    Parameters
    ----------
    d : mapping
        The tap document; ``values.subpixels``, else ``rows`` or ``subpixels``, is read.

    Returns
    -------
    list of dict
        One row per evaluation (``h0``, ``k0``, ``l0``, ``h``, ``k``, ``l``, ``subS``, ``subF`` added from
        ``hkl_rounded``, ``hkl_fractional`` and ``subpixel_index``); empty when there are none.
    """
    values = d.get("values")
    if isinstance(values, Mapping) and isinstance(values.get("subpixels"), list):
        return [_normalise_row(r) for r in values["subpixels"] if isinstance(r, Mapping)]
    for key in ("rows", "subpixels"):
        v = d.get(key)
        if isinstance(v, list):
            return [_normalise_row(r) for r in v if isinstance(r, Mapping)]
    return []


def hkl_label(rows: Iterable[Mapping[str, Any]]) -> str:
    """"(h0,k0,l0)" of the most common nearest reflection among the rows.

    Parameters
    ----------
    rows : iterable of mapping
        Tap rows; those without ``h0`` are ignored.

    Returns
    -------
    str
        ``"(h,k,l)"``, followed by ``" +N"`` when N other reflections occur; ``""`` without rows.
    """
    c = Counter((int(r["h0"]), int(r["k0"]), int(r["l0"])) for r in rows if "h0" in r)
    if not c:
        return ""
    (h, k, l), _ = c.most_common(1)[0]
    label = f"({h},{k},{l})"
    if len(c) > 1:
        label += f" +{len(c) - 1}"
    return label


def is_tap_document(d: Any) -> bool:
    """Whether ``d`` looks like a tap JSON document.

    Parameters
    ----------
    d : Any
        A decoded JSON value.

    Returns
    -------
    bool
        True for a mapping with a pixel (:func:`tap_pixel`) and rows, ``final_intensity`` or ``summary``.
    """
    if not isinstance(d, Mapping):
        return False
    try:
        tap_pixel(d)
    except (ValueError, TypeError, KeyError, IndexError):
        return False
    return bool(tap_rows(d)) or "final_intensity" in d or "summary" in d


def load_tap_documents(path: str | Path) -> list[dict]:
    """One tap JSON file (a document or a list of documents).

    Parameters
    ----------
    path : str or Path
        The JSON file.

    Returns
    -------
    list of dict
        The documents.

    Raises
    ------
    ValueError
        The file is not readable JSON, or not every document is a tap document (:func:`is_tap_document`).
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name}: not readable JSON ({exc})") from None
    docs = d if isinstance(d, list) else [d]
    if not docs or not all(is_tap_document(x) for x in docs):
        raise ValueError(f"{path.name}: not a tap JSON file (no pixel and rows)")
    return docs


def taps_to_points(docs: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, Any]]:
    """Points data and layer kwargs (labels (h0,k0,l0)) for tap documents.

    Parameters
    ----------
    docs : sequence of mapping
        Tap documents.

    Returns
    -------
    points : numpy.ndarray
        float ``[n, 2]`` (slow, fast).
    kwargs : dict
        ``features`` (``hkl``, ``slow``, ``fast``), ``text`` and ``metadata`` (``tap_documents``) of a
        napari points layer.
    """
    pts = np.array([tap_pixel(d) for d in docs], dtype=float).reshape(-1, 2)
    labels = [hkl_label(tap_rows(d)) for d in docs]
    kwargs = {
        "features": {"hkl": labels, "slow": pts[:, 0].astype(int), "fast": pts[:, 1].astype(int)},
        "text": {"string": "{hkl}", "color": "yellow", "size": 10, "anchor": "upper_left"},
        "metadata": {"tap_documents": [dict(d) for d in docs]},
    }
    return pts, kwargs


def exclusive_write_json(path: Path, doc: Any) -> Path:
    """Write JSON to a new file; never replaces an existing one.

    The document goes to a temporary file beside ``path`` that is then hard-linked to
    ``path``; NumPy values are written as plain numbers or lists.

    Parameters
    ----------
    path : Path
        The new file (its folder is created when missing).
    doc : Any
        The JSON document.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` already exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
    try:
        os.link(tmp, path)  # fails if path exists: no overwrite, no half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def unique_path(path: Path) -> Path:
    """``path`` or ``stem-1.json``, ``stem-2.json``… whichever does not exist yet.

    Parameters
    ----------
    path : Path
        The wanted file.

    Returns
    -------
    Path
        ``path`` when it does not exist, else the first free ``<stem>-<i><suffix>`` beside it.
    """
    path = Path(path)
    if not path.exists():
        return path
    i = 1
    while True:
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not cand.exists():
            return cand
        i += 1


# --------------------------------------------------------------------------- SMV geometry
def header_geometry_args(header: Mapping[str, Any]) -> list[str]:
    """nanoBragg flags that rebuild an SMV image's detector geometry from its header.

    Uses ``SIZE1``/``SIZE2``, ``PIXEL_SIZE``, ``DISTANCE``, ``WAVELENGTH`` and the
    direct-beam point ``DENZO_X_BEAM``/``DENZO_Y_BEAM`` (slow/fast mm from the
    first pixel's corner; ``MOSFLM_CENTER_X``/``_Y`` or ``BEAM_CENTER_X``/``_Y``
    when absent).  The crystal is a placeholder: only d, 2θ and the beam centre
    mean anything.  A ``TWOTHETA`` other than 0 is refused (the header does not
    say about which axis the detector swung).

    Parameters
    ----------
    header : mapping
        The SMV header (values may end with ``;``).

    Returns
    -------
    list of str
        nanoBragg arguments: a placeholder crystal and the detector's size, pixel, distance,
        wavelength and beam centre (``-mosflm``, ``-Xbeam``/``-Ybeam``).

    Raises
    ------
    ValueError
        A key missing or not a number, naming it.
    """
    def num(*keys: str) -> float:
        for k in keys:
            if k in header:
                try:
                    return float(str(header[k]).strip().rstrip(";"))
                except ValueError:
                    raise ValueError(f"header {k}={header[k]!r} is not a number") from None
        raise ValueError(f"the header has no {keys[0]}")

    if abs(num("TWOTHETA") if "TWOTHETA" in header else 0.0) > 1e-9:
        raise ValueError("a detector two-theta in the header is not supported")
    pixel = num("PIXEL_SIZE")
    if "DENZO_X_BEAM" in header:  # where the beam meets the detector: MOSFLM's Xbeam = Sbeam - pixel/2
        xbeam, ybeam = num("DENZO_X_BEAM") - pixel / 2, num("DENZO_Y_BEAM") - pixel / 2
    elif "MOSFLM_CENTER_X" in header:
        xbeam, ybeam = num("MOSFLM_CENTER_X"), num("MOSFLM_CENTER_Y")
    else:
        xbeam, ybeam = num("BEAM_CENTER_X"), num("BEAM_CENTER_Y")
    return ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1", "-N", "1", "-mosflm",
            "-detpixels_f", str(int(num("SIZE1"))), "-detpixels_s", str(int(num("SIZE2"))),
            "-pixel", repr(pixel), "-distance", repr(num("DISTANCE")), "-lambda", repr(num("WAVELENGTH")),
            "-Xbeam", repr(xbeam), "-Ybeam", repr(ybeam), "-oversample", "1"]
