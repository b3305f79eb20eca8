"""Helpers for the napari GUI tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FakeMouseEvent:
    """Enough of napari's mouse event for ``napari.utils.interactions``."""

    type: str
    position: tuple
    pos: tuple = (0, 0)
    button: int = 1
    modifiers: tuple = ()
    is_dragging: bool = False
    dims_displayed: tuple = (0, 1)
    dims_point: list = field(default_factory=lambda: [0.0, 0.0])
    view_direction: list | None = None
    handled: bool = False


def napari_click(viewer, slow, fast, *, shift=False, drag_to=None):
    """Press (and move) and release through napari's mouse-callback machinery."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    def ev(*a, **k):  # napari's canvas hands callbacks a read-only proxy of each event
        return ReadOnlyWrapper(FakeMouseEvent(*a, **k), exceptions=("handled",))

    mods = ("Shift",) if shift else ()
    pos = (100.0, 100.0)
    mouse_press_callbacks(viewer, ev("mouse_press", (slow, fast), pos, modifiers=mods))
    end_pos = pos
    if drag_to is not None:
        end_pos = (pos[0] + drag_to[0], pos[1] + drag_to[1])
        mouse_move_callbacks(viewer, ev("mouse_move", (slow, fast), end_pos, modifiers=mods,
                                                    is_dragging=True))
    mouse_release_callbacks(viewer, ev("mouse_release", (slow, fast), end_pos, modifiers=mods))


def canvas_widget(viewer):
    return viewer.window._qt_viewer.canvas._scene_canvas.native


def pixel_to_canvas(viewer, slow, fast):
    """Logical canvas position (x, y) of the centre of image pixel (slow, fast)."""
    canvas = viewer.window._qt_viewer.canvas
    tr = canvas.view.scene.transform
    x, y = tr.map([float(fast), float(slow), 0.0, 1.0])[:2]
    return float(x), float(y)


def zoom_to(viewer, slow, fast, zoom):
    """Centre the camera on a pixel at ``zoom`` screen pixels per image pixel."""
    c = list(viewer.scene.camera.center)
    c[-2:] = [float(slow), float(fast)]
    viewer.scene.camera.center = tuple(c)
    viewer.scene.camera.zoom = float(zoom)


def real_click(qtbot, viewer, slow, fast, shift=False):
    """A real Qt mouse click on the vispy canvas at the pixel's screen position."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    w = canvas_widget(viewer)
    x, y = pixel_to_canvas(viewer, slow, fast)
    mods = Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier
    pt = QPoint(int(round(x)), int(round(y)))
    QTest.mouseMove(w, pt)
    QTest.mouseClick(w, Qt.MouseButton.LeftButton, mods, pt)
    qtbot.wait(20)


def canvas_image(viewer) -> np.ndarray:
    return np.asarray(viewer.screenshot(canvas_only=True, flash=False))
