"""Scripting API: ``Inspector(viewer)`` docks the panels through napari's plugin
machinery and drives them with the same code paths as the mouse and the buttons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ._npe2 import SIM_DOCK_NAME, TAP_DOCK_NAME
from .controller import InspectorController, controller_for
from .model import TapRecord

__all__ = ["Inspector"]

PLUGIN = "bragg-inspector"
PLUGIN_DISPLAY_NAME = "Bragg Inspector"  # napari.yaml's display_name


class Inspector:
    """Drive the inspector of a napari viewer from Python.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer to inspect; its controller is shared with the panels (:func:`controller_for`).
    dock : bool
        Dock both panels (by triggering their actions in napari's Plugins menu,
        as a user's click does); an already docked panel is reused.
    cwd : str or Path, optional
        Folder that relative paths in the arguments (and default exports) use.

    Attributes
    ----------
    viewer : napari.Viewer
        The viewer.
    controller : InspectorController
        The viewer's controller.
    simulation_widget, tap_widget : SimulationPanel or TapPanel or None
        The docked panels (None until :meth:`dock`).

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
        """True when both panels are docked."""
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
        """The controller's :class:`~bragg_inspector.model.InspectorModel`."""
        return self.controller.model

    def simulate(self, args: str | Sequence[str] | None = None, wait: bool = True, *,
                 device: str | None = None, dtype: str | None = None, timeout: float | None = None) -> bool:
        """Render nanoBragg arguments (default: the current ones) and add the
        layers.  True when a new image is shown (or, with ``wait=False``, when
        the render started); bad input shows a message and returns False.

        Parameters
        ----------
        args : str or sequence of str, optional
            An argument line or the split arguments; None renders the current ones.
        wait : bool
            Block (keeping the event loop running) until the render ends.
        device, dtype : str, optional
            Torch device and ``"float32"``/``"float64"`` (default: the model's).
        timeout : float, optional
            With ``wait``: seconds after which the render is cancelled.

        Returns
        -------
        bool
            Whether a new image is shown (``wait=True``) or the render started (``wait=False``).
        """
        return self.controller.simulate(args, device=device, dtype=dtype, wait=wait, timeout=timeout)

    def cancel(self) -> None:
        """Ask the running render to stop (the previous image stays)."""
        self.controller.cancel()

    def click(self, slow: int, fast: int, shift: bool = False) -> TapRecord | None:
        """Same code path as a mouse click on pixel (slow, fast).

        Parameters
        ----------
        slow, fast : int
            The pixel.
        shift : bool
            As a shift-click: also add the pixel to the selection.

        Returns
        -------
        TapRecord or None
            The tap; None when it failed (the reason in the status line).
        """
        return self.controller.click(slow, fast, shift=shift)

    def hover(self, slow: int, fast: int) -> str:
        """The status-bar text a mouse move over pixel (slow, fast) shows.

        Parameters
        ----------
        slow, fast : int
            The pixel.

        Returns
        -------
        str
            The readout.

        Raises
        ------
        ValueError
            Nothing rendered (and no SMV header geometry), or a pixel outside the detector.
        """
        return self.controller.hover(slow, fast)

    def rings(self, on: bool = True, d_spacings: Sequence[float] | None = None):
        """Resolution rings labelled in Å (``d_spacings`` None: the detector's defaults).

        Parameters
        ----------
        on : bool
            Show (True) or hide (False) the rings.
        d_spacings : sequence of float, optional
            d-spacings in Å; an empty sequence goes back to the defaults, None keeps the current choice.

        Returns
        -------
        napari.layers.Shapes or None
            The rings layer; None when hidden or when no ring crosses the detector.
        """
        return self.controller.rings(on, d_spacings=d_spacings)

    def pin(self, name: str | None = None) -> str:
        """Keep the current render as a named reference run (survives later runs).

        Parameters
        ----------
        name : str, optional
            Name of the run (default ``run N``; a taken name gets a suffix).

        Returns
        -------
        str
            The name it is pinned under.

        Raises
        ------
        ValueError
            Nothing rendered to pin.
        """
        pinned = self.controller.pin(name)
        if pinned is None:
            raise ValueError(self.controller.last_error or "nothing to pin")
        return pinned

    def compare_default_F(self, reference: str) -> dict:
        """default_F regions of the current render against a pinned run:
        ``{"both": n, "only_current": n, "only_reference": n, "neither": n, "reason_changed": n, "shape": ...}``.

        Parameters
        ----------
        reference : str
            Name of the pinned run.

        Returns
        -------
        dict
            The counts, as above.

        Raises
        ------
        ValueError
            The comparison failed (no render, no such run, another shape).
        """
        counts = self.controller.compare_default_F(reference)
        if counts is None:
            raise ValueError(self.controller.last_error or "comparison failed")
        return counts

    def measure_default_F(self, program: str) -> str:
        """Measure a renderer's default_F map (``torchbragg defaultf-map``) for the
        current arguments; adds a pinned run named after the program.

        Parameters
        ----------
        program : str
            The renderer's command line.

        Returns
        -------
        str
            Name of the pinned run.

        Raises
        ------
        ValueError
            The measurement failed.
        """
        pinned = self.controller.measure_default_F(program)
        if pinned is None:
            raise ValueError(self.controller.last_error or "measurement failed")
        return pinned

    def tap_table(self) -> list[dict]:
        """Rows of the tap table as shown (displayed columns + ``default_F``).

        Returns
        -------
        list of dict
            One dict per evaluation of the shown pixel; empty when no pixel is shown.
        """
        return self.controller.tap_table()

    def export(self, folder: str | Path | None = None) -> list[Path]:
        """Write one tap JSON per selected pixel (a fresh evidence bundle when
        ``folder`` is None); returns the written paths.

        Parameters
        ----------
        folder : str or Path, optional
            Folder (or existing evidence bundle) to write into; None: a fresh bundle.

        Returns
        -------
        list of Path
            The written files; empty when the export failed (the reason in the status line).
        """
        if self.tap_widget is not None:
            return self.tap_widget.export(folder)
        return self.controller.export(folder)

    def set_overlay(self, enabled: bool = True) -> None:
        """Show or hide the default_F regions.

        Parameters
        ----------
        enabled : bool
            Show (True) or hide (False) the overlay.
        """
        self.controller.set_overlay(enabled)

    def open_reference(self, path: str | Path, shape: tuple[int, int] | None = None,
                       tolerance: float | None = None):
        """Compare the render with a reference image (kept for later renders);
        ``shape`` for a raw float file without sidecar, ``tolerance`` relative to
        max|ref|.  Returns the :class:`~bragg_inspector.model.Comparison` or None
        (the reason in the status line).

        Parameters
        ----------
        path : str or Path
            The reference image (SMV or raw float32).
        shape : (int, int), optional
            (slow, fast) of a raw file without sidecar.
        tolerance : float, optional
            Relative tolerance (default: the model's).

        Returns
        -------
        Comparison or None
            The comparison; None when it failed.
        """
        return self.controller.open_reference(path, shape=shape, tolerance=tolerance)

    def set_tolerance(self, tolerance: float):
        """Outline the pixels with |sim − ref| > tolerance × max|ref|.

        Parameters
        ----------
        tolerance : float
            Relative tolerance (finite, ≥ 0).

        Returns
        -------
        Comparison or None
            The updated comparison; None without one or for a bad tolerance (the reason in the status line).
        """
        return self.controller.set_tolerance(tolerance)

    def clear_reference(self) -> None:
        """Forget the reference image and remove its layers."""
        self.controller.clear_reference()

    def flip(self):
        """Cycle the comparison's views: difference → reference → simulated.

        Returns
        -------
        str or None
            Name of the layer now shown; None without a reference image.
        """
        return self.controller.flip()


def dock_name(widget_name: str) -> str:
    """napari's dock title of a panel opened from the Plugins menu.

    Parameters
    ----------
    widget_name : str
        The widget's display name in napari.yaml.

    Returns
    -------
    str
        ``"<widget_name> (Bragg Inspector)"``.
    """
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
