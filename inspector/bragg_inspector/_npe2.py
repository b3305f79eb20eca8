"""npe2 entry points (see napari.yaml).  Each is a thin wrapper around the
Qt-free modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import RAW_SUFFIXES, SMV_SUFFIXES, is_tap_document, load_tap_documents, read_image, taps_to_points

IMAGE_SUFFIXES = SMV_SUFFIXES + RAW_SUFFIXES


# ------------------------------------------------------------------ widgets
def simulation_widget(napari_viewer):
    from .controller import controller_for
    from .widgets import SimulationWidget

    return SimulationWidget(controller_for(napari_viewer))


def tap_widget(napari_viewer):
    from .controller import controller_for
    from .widgets import TapWidget

    return TapWidget(controller_for(napari_viewer))


# ------------------------------------------------------------------ readers
def _single(path) -> str | None:
    if isinstance(path, (list, tuple)):
        return None if len(path) != 1 else str(path[0])
    return str(path)


def get_image_reader(path):
    p = _single(path)
    if p is None or Path(p).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return read_image_layers


def read_image_layers(path) -> list[tuple[Any, dict, str]]:
    """Errors (unreadable, ambiguous shape) are raised with a clear message;
    napari shows them as a notification."""
    p = _single(path) or str(path)
    data, meta = read_image(p)
    from .model import percentile_limits

    return [(data, {"name": Path(p).name, "metadata": meta, "colormap": "gray_r",
                    "contrast_limits": percentile_limits(data)}, "image")]


def get_tap_reader(path):
    p = _single(path)
    if p is None or Path(p).suffix.lower() != ".json":
        return None
    try:
        load_tap_documents(p)
    except ValueError:
        return None  # some other JSON: let another reader try
    return read_tap_layers


def read_tap_layers(path) -> list[tuple[Any, dict, str]]:
    p = _single(path) or str(path)
    docs = load_tap_documents(p)
    pts, kwargs = taps_to_points(docs)
    kwargs.update(name=f"taps {Path(p).stem}", symbol="ring", size=9, face_color="yellow",
                  border_width=0, canvas_size_limits=(14, 60))
    return [(pts, kwargs, "points")]


# ------------------------------------------------------------------ writer
def write_taps(path: str, data: Any, meta: dict) -> list[str]:
    """Save the tapped pixels of a points layer as tap JSON.

    The layer must come from the inspector (``metadata['tap_records']``) or from
    a tap JSON file (``metadata['tap_documents']``).  One tap → ``path``; several
    → ``<stem>_s<slow>_f<fast>.json`` next to it.  Never overwrites."""
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
    """The 4096² tap configuration, rendered by the engine (takes a while on a CPU)."""
    from . import _engine
    from .model import percentile_limits

    args = _engine.tap_config_args()
    sim = _engine.make_simulation(args)
    img, _fb = _engine.render(sim)
    return [(img, {"name": "tap configuration 4096²", "colormap": "gray_r",
                   "contrast_limits": percentile_limits(img), "metadata": {"args": args}}, "image")]
