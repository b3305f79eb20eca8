"""npe2 entry points (see napari.yaml).  Each is a thin wrapper around the
Qt-free modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import image_suffixes, is_tap_document, load_tap_documents, read_image, taps_to_points

__all__ = [
    "SIM_DOCK_NAME", "TAP_DOCK_NAME", "get_image_reader", "read_image_layers", "get_tap_reader", "read_tap_layers",
    "write_taps", "tap_config_sample",
]

# ------------------------------------------------------------------ widgets
# napari.yaml names the panel classes in bragg_inspector._qt directly: napari
# builds them with the viewer (their ``viewer: napari.viewer.Viewer`` argument).
SIM_DOCK_NAME = "Bragg simulation"
TAP_DOCK_NAME = "Bragg pixel tap"


# ------------------------------------------------------------------ readers
def _single(path) -> str | None:
    if isinstance(path, (list, tuple)):
        return None if len(path) != 1 else str(path[0])
    return str(path)


def get_image_reader(path):
    """napari's reader hook for diffraction images.

    Parameters
    ----------
    path : str or list of str
        What napari asks to open; only a single path is accepted.

    Returns
    -------
    callable or None
        :func:`read_image_layers` for one file with an image suffix (case-insensitive), else None.
    """
    p = _single(path)
    if p is None or Path(p).suffix.lower() not in image_suffixes():
        return None
    return read_image_layers


def read_image_layers(path) -> list[tuple[Any, dict, str]]:
    """Errors (unreadable, ambiguous shape) are raised with a clear message;
    napari shows them as a notification.

    Parameters
    ----------
    path : str or list of str
        The image file (or a one-element list of it).

    Returns
    -------
    list of tuple
        One ``(data, kwargs, "image")`` layer: the float32 image, its file name, metadata
        (see :func:`bragg_inspector.io.read_image`), ``gray_r`` and percentile contrast limits.
    """
    p = _single(path) or str(path)
    data, meta = read_image(p)
    from .model import percentile_limits

    return [(data, {"name": Path(p).name, "metadata": meta, "colormap": "gray_r",
                    "contrast_limits": percentile_limits(data)}, "image")]


TAP_FILENAME_PATTERNS = ("*tap*.json", "*_s*_f*.json")  # as in napari.yaml


def is_tap_filename(name: str) -> bool:
    """Whether a file name matches the tap JSON patterns of napari.yaml (``TAP_FILENAME_PATTERNS``).

    Parameters
    ----------
    name : str
        A file name (compared in lower case).

    Returns
    -------
    bool
        True when it matches ``*tap*.json`` or ``*_s*_f*.json``.
    """
    from fnmatch import fnmatch

    return any(fnmatch(name.lower(), pat) for pat in TAP_FILENAME_PATTERNS)


def get_tap_reader(path):
    """napari's reader hook for tap JSON files.

    Parameters
    ----------
    path : str or list of str
        What napari asks to open; only a single path is accepted.

    Returns
    -------
    callable or None
        :func:`read_tap_layers` for one file whose name matches the tap patterns and that holds tap
        documents; None otherwise (another reader may try).
    """
    p = _single(path)
    if p is None or not is_tap_filename(Path(p).name):
        return None
    try:
        load_tap_documents(p)
    except ValueError:
        return None  # some other JSON: let another reader try
    return read_tap_layers


def read_tap_layers(path) -> list[tuple[Any, dict, str]]:
    """The taps of a tap JSON file as one points layer.

    Parameters
    ----------
    path : str or list of str
        The tap JSON file (or a one-element list of it).

    Returns
    -------
    list of tuple
        One ``(points, kwargs, "points")`` layer named ``taps <stem>``, labelled (h0,k0,l0), with the
        documents in ``metadata['tap_documents']``.
    """
    p = _single(path) or str(path)
    docs = load_tap_documents(p)
    pts, kwargs = taps_to_points(docs)
    kwargs.update(name=f"taps {Path(p).stem}", symbol="disc", size=1.0, face_color="transparent",
                  border_color="yellow", border_width=0.16, border_width_is_relative=True,
                  canvas_size_limits=(22, 22))
    return [(pts, kwargs, "points")]


# ------------------------------------------------------------------ writer
def write_taps(path: str, data: Any, meta: dict) -> list[str]:
    """Save the tapped pixels of a points layer as tap JSON.

    The layer must come from the inspector (``metadata['tap_records']``) or from
    a tap JSON file (``metadata['tap_documents']``).  One tap → ``path`` (as
    ``<stem>.tap.json`` when its name does not say it holds a tap, so that the
    reader, which opens tap JSON by name, opens it again); several →
    ``<stem>_s<slow>_f<fast>.json`` next to it.  Never overwrites.

    Parameters
    ----------
    path : str
        The file napari's save dialog chose (``.json`` is put in place of another suffix).
    data : Any
        The layer's data (unused: the taps come from its metadata).
    meta : dict
        The layer's attributes; ``meta['metadata']`` holds the taps.

    Returns
    -------
    list of str
        The written files.

    Raises
    ------
    ValueError
        The layer holds no taps.
    FileExistsError
        A target file exists already.
    """
    from .io import exclusive_write_json

    md = meta.get("metadata") or {}
    docs: list[dict] = []
    for rec in md.get("tap_records") or []:
        from .controller import tap_doc

        docs.append(tap_doc(rec))
    docs.extend(d for d in (md.get("tap_documents") or []) if is_tap_document(d))
    if not docs:
        raise ValueError("this points layer holds no taps (use the inspector's tap or selection layer)")
    target = Path(path)
    if target.suffix.lower() != ".json":
        target = target.with_suffix(".json")
    if len(docs) == 1 and not is_tap_filename(target.name):
        # the reader opens tap JSON by name (*tap*.json, *_s<slow>_f<fast>*.json), not every JSON
        target = target.with_name(f"{target.stem}.tap.json")
    if len(docs) == 1:
        return [str(exclusive_write_json(target, docs[0]))]
    from .io import tap_pixel

    out = []
    for d in docs:
        s, f = tap_pixel(d)
        out.append(str(exclusive_write_json(target.with_name(f"{target.stem}_s{s}_f{f}.json"), d)))
    return out


# ------------------------------------------------------------------ sample data
def tap_config_sample() -> list[tuple[Any, dict, str]]:
    """The 4096² tap configuration, rendered by the engine.

    In a viewer the render runs in the inspector's worker thread (the window
    stays responsive, the progress shows in the simulation panel, which is
    docked with the tap panel): this returns the inspector's ``simulated``
    layer at once, blank, and the render fills it; a click taps it like any
    render of the panel.  Without a viewer it renders here.

    Returns
    -------
    list of tuple
        One ``(image, kwargs, "image")`` layer: with a viewer a blank float32 placeholder named
        ``simulated`` (``metadata['placeholder']`` True); without one the rendered image.
    """
    from . import _engine

    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # pragma: no cover - napari without Qt
        viewer = None
    if viewer is not None and getattr(viewer, "window", None) is not None:
        from .controller import SIM_LAYER
        from .inspector import Inspector

        args = _engine.tap_config_args()
        shape = _engine.make_simulation(args).shape
        insp = Inspector(viewer)
        if SIM_LAYER in viewer.layers:  # the sample replaces the image on screen
            viewer.layers.remove(SIM_LAYER)
        insp.simulate(args, wait=False)
        return [(np.zeros(shape, dtype=np.float32),
                 {"name": SIM_LAYER, "colormap": "gray_r", "interpolation2d": "nearest",
                  "metadata": {"args": list(args), "placeholder": True}}, "image")]
    from .model import percentile_limits

    args = _engine.tap_config_args()
    img, _fb = _engine.render(_engine.make_simulation(args))
    return [(img, {"name": "tap configuration 4096²", "colormap": "gray_r",
                   "contrast_limits": percentile_limits(img), "metadata": {"args": args}}, "image")]
