"""File formats used by the plugin's readers and writer (no Qt).

Images are decoded by the engine (``torchbragg.smv.read_smv``,
``torchbragg.compare.load_image``); this module only decides which one to call
and where the shape of a headerless float image comes from.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _engine

SMV_SUFFIXES = (".img", ".smv")
RAW_SUFFIXES = (".bin", ".f32")


class ImageFormatError(ValueError):
    """A file that cannot be turned into an image (with a message for people)."""


# --------------------------------------------------------------------------- images
def sidecar_candidates(path: Path) -> list[Path]:
    path = Path(path)
    return [Path(str(path) + ".json"), path.with_suffix(".json")]


def _shape_from_mapping(d: Mapping[str, Any]) -> tuple[int, int] | None:
    if "shape" in d:
        s = d["shape"]
        if isinstance(s, Sequence) and len(s) == 2:
            return int(s[0]), int(s[1])
    if "slow" in d and "fast" in d:
        return int(d["slow"]), int(d["fast"])
    if "detpixels" in d:
        return int(d["detpixels"]), int(d["detpixels"])
    return None


def sidecar_shape(path: Path) -> tuple[tuple[int, int], Path] | None:
    """(shape, sidecar path) from a JSON next to a raw image, if there is one."""
    for cand in sidecar_candidates(path):
        if cand.is_file():
            try:
                d = json.loads(cand.read_text())
            except (OSError, ValueError) as exc:
                raise ImageFormatError(f"{cand.name}: sidecar JSON is unreadable ({exc})") from None
            if not isinstance(d, Mapping) or (shape := _shape_from_mapping(d)) is None:
                raise ImageFormatError(
                    f"{cand.name}: sidecar JSON has no image shape (expected \"shape\": [slow, fast])")
            return shape, cand
    return None


def raw_float_shape(path: Path, shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """Shape of a raw float32 image: given, from a sidecar JSON, or a perfect square."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as exc:
        raise ImageFormatError(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    if nbytes % 4:
        raise ImageFormatError(f"{path.name}: {nbytes} bytes is not a whole number of float32 values")
    n = nbytes // 4
    if shape is None:
        sc = sidecar_shape(path)
        if sc is not None:
            shape = sc[0]
    if shape is None:
        side = math.isqrt(n)
        if side * side != n or n == 0:
            raise ImageFormatError(
                f"{path.name}: {n} float32 values is not a square image; the shape is ambiguous. "
                f"Put a sidecar {path.name}.json with {{\"shape\": [slow, fast]}} next to it.")
        shape = (side, side)
    if shape[0] * shape[1] != n:
        raise ImageFormatError(
            f"{path.name}: {n} float32 values do not fit shape {shape[0]}×{shape[1]} "
            f"({shape[0] * shape[1]} values)")
    return (int(shape[0]), int(shape[1]))


def read_image(path: str | Path, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """Read an SMV or raw float image; returns (float32 array [slow, fast], metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ImageFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SMV_SUFFIXES:
        try:
            header, data = _engine.read_smv(path)
        except Exception as exc:
            raise ImageFormatError(f"{path.name}: not a readable SMV image ({exc})") from None
        meta = {"format": "smv", "path": str(path), "header": {str(k): str(v) for k, v in header.items()}}
    else:
        shp = raw_float_shape(path, shape)
        try:
            data = _engine.load_raw_float(path, shp)
        except Exception as exc:
            raise ImageFormatError(f"{path.name}: cannot load as float32 {shp} ({exc})") from None
        meta = {"format": "float32", "path": str(path)}
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ImageFormatError(f"{path.name}: expected a 2-D image, got shape {data.shape}")
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise ImageFormatError(
            f"{path.name}: image is {data.shape[0]}×{data.shape[1]}, expected {shape[0]}×{shape[1]}")
    return data, meta


# --------------------------------------------------------------------------- taps
def tap_pixel(d: Mapping[str, Any]) -> tuple[int, int]:
    """(slow, fast) of a tap JSON document."""
    px = d.get("pixel")
    if isinstance(px, Mapping) and "slow" in px and "fast" in px:
        return int(px["slow"]), int(px["fast"])
    if isinstance(px, Sequence) and not isinstance(px, str) and len(px) == 2:
        return int(px[0]), int(px[1])
    for key in ("pixel_slow_fast", "slow_fast"):
        if key in d:
            return int(d[key][0]), int(d[key][1])
    if "slow" in d and "fast" in d:
        return int(d["slow"]), int(d["fast"])
    raise ValueError("tap JSON has no pixel (slow, fast)")


def tap_rows(d: Mapping[str, Any]) -> list[dict]:
    for key in ("rows", "hkl_subpixel", "evaluations"):
        v = d.get(key)
        if isinstance(v, list):
            return v
        if isinstance(v, Mapping) and isinstance(v.get("rows"), list):
            return v["rows"]
    taps = d.get("taps")
    if isinstance(taps, Mapping):
        for v in taps.values():
            if isinstance(v, Mapping) and isinstance(v.get("rows"), list):
                return v["rows"]
    return []


def hkl_label(rows: Iterable[Mapping[str, Any]]) -> str:
    """"(h0,k0,l0)" of the most common nearest reflection among the rows."""
    c = Counter((int(r["h0"]), int(r["k0"]), int(r["l0"])) for r in rows if "h0" in r)
    if not c:
        return ""
    (h, k, l), _ = c.most_common(1)[0]
    label = f"({h},{k},{l})"
    if len(c) > 1:
        label += f" +{len(c) - 1}"
    return label


def is_tap_document(d: Any) -> bool:
    if not isinstance(d, Mapping):
        return False
    try:
        tap_pixel(d)
    except (ValueError, TypeError, KeyError, IndexError):
        return False
    return bool(tap_rows(d)) or "final_intensity" in d or "summary" in d


def load_tap_documents(path: str | Path) -> list[dict]:
    """One tap JSON file (a document or a list of documents)."""
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
    """Points data and layer kwargs (labels (h0,k0,l0)) for tap documents."""
    pts = np.array([tap_pixel(d) for d in docs], dtype=float).reshape(-1, 2)
    labels = [hkl_label(tap_rows(d)) for d in docs]
    kwargs = {
        "features": {"hkl": labels, "slow": pts[:, 0].astype(int), "fast": pts[:, 1].astype(int)},
        "text": {"string": "{hkl}", "color": "yellow", "size": 10, "anchor": "upper_left"},
        "metadata": {"tap_documents": [dict(d) for d in docs]},
    }
    return pts, kwargs


def exclusive_write_json(path: Path, doc: Any) -> Path:
    """Write JSON to a new file; never replaces an existing one."""
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
    """``path`` or ``stem-1.json``, ``stem-2.json``… whichever does not exist yet."""
    path = Path(path)
    if not path.exists():
        return path
    i = 1
    while True:
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not cand.exists():
            return cand
        i += 1
