"""Shared helpers for the inspector tests (imported by conftest and tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "tests" / "data" / "inspector"
SCREENSHOTS = ROOT / "docs" / "screenshots"
GOLDEN = Path(os.environ.get("BRAGG_GOLDEN", ROOT.parent / "shared" / "golden"))


def engine_ready() -> bool:
    try:
        import torchbragg
    except Exception:
        return False
    return hasattr(torchbragg, "Simulation")


def taps_ready() -> bool:
    try:
        import torchbragg.taps  # noqa: F401
    except Exception:
        return False
    return engine_ready()


needs_engine = pytest.mark.skipif(not engine_ready(), reason="torchbragg.Simulation is not available yet")
needs_taps = pytest.mark.skipif(not taps_ready(), reason="torchbragg.taps is not available yet")
SCHEMA = ROOT / "specs" / "tap_schema.json"


def validate_tap_json(doc) -> None:
    """Validate against specs/tap_schema.json (skipped while the schema does not exist)."""
    if not SCHEMA.is_file():
        return
    import jsonschema

    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))


def register_manifest() -> None:
    """Register napari.yaml with npe2 when the package is not installed."""
    try:
        from npe2 import PluginManager, PluginManifest
    except Exception:  # pragma: no cover
        return
    pm = PluginManager.instance()
    if "bragg-inspector" in pm:
        return
    pm.register(PluginManifest.from_file(ROOT / "inspector" / "bragg_inspector" / "napari.yaml"))


def small_args(hkl, detpixels: int = 64, pixel: float = 0.8, extra=()) -> list[str]:
    args = ["-cell", "100", "100", "100", "90", "90", "90"]
    if hkl is not None:
        args += ["-hkl", str(hkl)]
    args += ["-default_F", "50", "-N", "3", "-lambda", "1", "-distance", "100",
             "-detpixels", str(detpixels), "-pixel", str(pixel)]
    return args + list(extra)


def load_json(p):
    return json.loads(Path(p).read_text())
