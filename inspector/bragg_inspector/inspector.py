"""Scripting API: ``Inspector(viewer)`` docks the panels through napari's plugin
machinery and drives them with the same code paths as the mouse and the buttons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._npe2 import SIM_DOCK_NAME, TAP_DOCK_NAME
from .controller import InspectorController, controller_for
from .model import TapRecord

PLUGIN = "bragg-inspector"
PLUGIN_DISPLAY_NAME = "Bragg Inspector"  # napari.yaml's display_name


class Inspector:
    """Drive the inspector of a napari viewer from Python.

    Parameters
    ----------
    viewer : napari.Viewer
    dock : bool
        Dock both panels (through ``viewer.window.add_plugin_dock_widget``, as
        the Plugins menu does); an already docked panel is reused.
    cwd : str or Path, optional
        Folder that relative paths in the arguments (and default exports) use.

    Examples
    --------
    >>> insp = Inspector(viewer)
    >>> insp.simulate(args, wait=True)
    >>> insp.click(2048, 2048); insp.tap_table()
    >>> insp.hover(2048, 2048)
    >>> insp.rings(True)
    >>> insp.export("evidence/")
    """

    def __init__(self, viewer, *, dock: bool = True, cwd: str | Path | None = None):
        self.viewer = viewer
        self.controller: InspectorController = controller_for(viewer, cwd=None if cwd is None else str(cwd))
        if cwd is not None:
            self.controller.model.cwd = str(cwd)
        self.simulation_widget = None
        self.tap_widget = None
        if dock and getattr(viewer, "window", None) is not None:
            self.dock()

    @property
    def docked(self) -> bool:
        return self.simulation_widget is not None and self.tap_widget is not None

    def dock(self) -> None:
        """Both panels through napari's Plugins menu actions (the same command,
        the same dock names as a user's click; a docked panel is reused), the
        wide tap table below the canvas."""
        window = self.viewer.window
        self.simulation_widget = _open_from_plugins_menu(window, SIM_DOCK_NAME)
        self.tap_widget = _open_from_plugins_menu(window, TAP_DOCK_NAME)
        dock = self.tap_widget.native.parent()
        main = dock.parent() if dock is not None else None
        if hasattr(main, "addDockWidget") and main.dockWidgetArea(dock) != _bottom():
            main.addDockWidget(_bottom(), dock)

    @property
    def model(self):
        return self.controller.model

    def simulate(self, args: str | Sequence[str] | None = None, wait: bool = True, *,
                 device: str | None = None, dtype: str | None = None, timeout: float | None = None) -> bool:
        """Render nanoBragg arguments (default: the current ones) and add the
        layers.  True when a new image is shown (or, with ``wait=False``, when
        the render started); bad input shows a message and returns False."""
        return self.controller.simulate(args, device=device, dtype=dtype, wait=wait, timeout=timeout)

    def cancel(self) -> None:
        self.controller.cancel()

    def click(self, slow: int, fast: int, shift: bool = False) -> TapRecord | None:
        """Same code path as a mouse click on pixel (slow, fast)."""
        return self.controller.click(slow, fast, shift=shift)

    def hover(self, slow: int, fast: int) -> str:
        """The status-bar text a mouse move over pixel (slow, fast) shows."""
        return self.controller.hover(slow, fast)

    def rings(self, on: bool = True, d_spacings: Sequence[float] | None = None):
        """Resolution rings labelled in Å (``d_spacings`` None: the detector's defaults)."""
        return self.controller.rings(on, d_spacings=d_spacings)

    def pin(self, name: str | None = None) -> str:
        """Keep the current render as a named reference run (survives later runs)."""
        pinned = self.controller.pin(name)
        if pinned is None:
            raise ValueError(self.controller.last_error or "nothing to pin")
        return pinned

    def compare_default_F(self, reference: str) -> dict:
        """default_F regions of the current render against a pinned run:
        ``{"both": n, "only_current": n, "only_reference": n, "neither": n, "reason_changed": n, "shape": ...}``."""
        counts = self.controller.compare_default_F(reference)
        if counts is None:
            raise ValueError(self.controller.last_error or "comparison failed")
        return counts

    def measure_default_F(self, program: str) -> str:
        """Measure a renderer's default_F map (``torchbragg defaultf-map``) for the
        current arguments; adds a pinned run named after the program."""
        pinned = self.controller.measure_default_F(program)
        if pinned is None:
            raise ValueError(self.controller.last_error or "measurement failed")
        return pinned

    def tap_table(self) -> list[dict]:
        """Rows of the tap table as shown (displayed columns + ``default_F``)."""
        return self.controller.tap_table()

    def export(self, folder: str | Path | None = None) -> list[Path]:
        """Write one tap JSON per selected pixel (a fresh evidence bundle when
        ``folder`` is None); returns the written paths."""
        if self.tap_widget is not None:
            return self.tap_widget.export(folder)
        return self.controller.export(folder)

    def set_overlay(self, enabled: bool = True) -> None:
        self.controller.set_overlay(enabled)

    def open_reference(self, path: str | Path, shape: tuple[int, int] | None = None,
                       tolerance: float | None = None):
        """Compare the render with a reference image (kept for later renders);
        ``shape`` for a raw float file without sidecar, ``tolerance`` relative to
        max|ref|.  Returns the :class:`~bragg_inspector.model.Comparison` or None
        (the reason in the status line)."""
        return self.controller.open_reference(path, shape=shape, tolerance=tolerance)

    def set_tolerance(self, tolerance: float):
        """Outline the pixels with |sim − ref| > tolerance × max|ref|."""
        return self.controller.set_tolerance(tolerance)

    def clear_reference(self) -> None:
        self.controller.clear_reference()

    def flip(self):
        return self.controller.flip()


def dock_name(widget_name: str) -> str:
    """napari's dock title of a panel opened from the Plugins menu."""
    return f"{widget_name} ({PLUGIN_DISPLAY_NAME})"


def _open_from_plugins_menu(window, widget_name: str):
    """The docked panel, opening it first with its Plugins-menu action."""
    name = dock_name(widget_name)
    docked = window.dock_widgets
    if name not in docked:
        action = _plugins_menu_action(window.plugins_menu, name)
        if action is None:
            raise RuntimeError(f"no {name!r} in napari's Plugins menu: is the bragg-inspector plugin installed?")
        action.trigger()
        docked = window.dock_widgets
    return docked[name]


def _plugins_menu_action(menu, text: str):
    for action in menu.actions():
        if action.text().replace("&&", "&") == text:
            return action
        sub = action.menu()
        if sub is not None:
            found = _plugins_menu_action(sub, text)
            if found is not None:
                return found
    return None


def _bottom():
    from qtpy.QtCore import Qt

    return Qt.DockWidgetArea.BottomDockWidgetArea
