"""Scripting API: ``Inspector(viewer)`` docks the panels and drives them with
the same code paths as the mouse and the buttons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .controller import InspectorController, controller_for
from .model import TapRecord

SIM_DOCK_NAME = "Bragg simulation"
TAP_DOCK_NAME = "Bragg pixel tap"


class Inspector:
    """``insp = Inspector(viewer)``; ``insp.simulate(args, wait=True)``;
    ``insp.click(slow, fast, shift=False)``; ``insp.tap_table()``;
    ``insp.export(folder)``."""

    def __init__(self, viewer, *, dock: bool = True, cwd: str | Path | None = None):
        self.viewer = viewer
        self.controller: InspectorController = controller_for(viewer, cwd=None if cwd is None else str(cwd))
        if cwd is not None:
            self.controller.model.cwd = str(cwd)
        self.simulation_widget = None
        self.tap_widget = None
        if dock and getattr(viewer, "window", None) is not None:
            self._dock()

    def _dock(self) -> None:
        from .widgets import SimulationWidget, TapWidget

        window = self.viewer.window
        existing = getattr(window, "dock_widgets", {}) or {}
        if SIM_DOCK_NAME not in existing:
            self.simulation_widget = SimulationWidget(self.controller)
            window.add_dock_widget(self.simulation_widget, name=SIM_DOCK_NAME, area="right")
        else:
            self.simulation_widget = _inner(existing[SIM_DOCK_NAME])
        if TAP_DOCK_NAME not in existing:
            self.tap_widget = TapWidget(self.controller)
            window.add_dock_widget(self.tap_widget, name=TAP_DOCK_NAME, area="bottom")
        else:
            self.tap_widget = _inner(existing[TAP_DOCK_NAME])

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
        if self.simulation_widget is not None:
            self.simulation_widget.overlay_check.setChecked(bool(enabled))
        self.controller.set_overlay(enabled)

    def open_reference(self, path: str | Path):
        return self.controller.open_reference(path)

    def flip(self):
        return self.controller.flip()


def _inner(dock):
    w = getattr(dock, "widget", None)
    return w() if callable(w) else w
