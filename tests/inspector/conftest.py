"""Test setup for the napari plugin.

* Puts ``inspector/`` (and ``src/`` for the engine, after anything already on
  the path) on ``sys.path`` so the tests run from a plain checkout.
* Keeps napari's/Qt's config, cache and runtime folders inside the checkout
  (``tests/inspector/.xdg/``, git-ignored), never in the user's home.
* Registers the plugin manifest with npe2 when it is not installed.
GUI tests need an X server: run under ``xvfb-run -a`` (never the offscreen Qt
platform: napari needs OpenGL).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
XDG = HERE / ".xdg"
# The engine keeps compiled kernels under $XDG_CACHE_HOME; pin that location
# before XDG_CACHE_HOME is redirected, so the engine's tests are unaffected.
_orig_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
os.environ.setdefault("TORCHBRAGG_CACHE_DIR", os.path.join(_orig_cache, "torchbragg", "kernels"))
for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache"), ("XDG_RUNTIME_DIR", "runtime")):
    d = XDG / sub
    d.mkdir(parents=True, exist_ok=True)
    if var == "XDG_RUNTIME_DIR":
        d.chmod(0o700)
    os.environ[var] = str(d)
os.environ["NAPARI_CONFIG"] = str(XDG / "config" / "napari" / "settings.yaml")

if str(ROOT / "inspector") not in sys.path:
    sys.path.insert(0, str(ROOT / "inspector"))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(ROOT / "src") not in sys.path:
    sys.path.append(str(ROOT / "src"))

import shutil  # noqa: E402

import pytest  # noqa: E402
from inspector_helpers import DATA, SCREENSHOTS, register_manifest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _bragg_manifest():
    register_manifest()
    yield


@pytest.fixture
def small_hkl(tmp_path) -> Path:
    """Copy of the partial HKL table (h,k,l in -2..2) in a scratch folder."""
    dst = tmp_path / "f_hkl_m2p2.hkl"
    shutil.copy(DATA / "f_hkl_m2p2.hkl", dst)
    return dst


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """Where the tests save screenshots: a tmp folder, or docs/screenshots/
    (the README's pictures) when BRAGG_SCREENSHOTS=docs."""
    if os.environ.get("BRAGG_SCREENSHOTS") == "docs":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path


@pytest.fixture
def notes():
    """Messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    got: list[str] = []

    def _on(n):
        got.append(str(n.message))

    notification_manager.notification_ready.connect(_on)
    yield got
    notification_manager.notification_ready.disconnect(_on)


@pytest.fixture
def viewer(make_napari_viewer):
    """A shown viewer (real canvas under Xvfb), big enough for the docks."""
    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(1800, 1150)
    return v


@pytest.fixture
def insp(viewer, tmp_path, qtbot):
    from bragg_inspector import Inspector

    i = Inspector(viewer, cwd=tmp_path)
    qtbot.wait(10)
    return i
